"""Shared fixtures: tiny seeded models and short real inputs, all on the CPU."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _unfreeze_collector():
    """Every engine start freezes what the process holds (EngineConfig.freeze_gc): give it back after each test, so
    one test's objects are collected as always once it is done."""
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """An untrained tiny model directory (32x32 frames, 4-frame windows), random weights from seed 0.

    The transformer's zero-initialised output layer would make every video identical, so all weights
    are perturbed (seeded) to make the conditions matter the way they do in a trained model.
    """
    from letstalk_rt.checkpoint import build_components, save_model
    from letstalk_rt.config import model_preset

    comps = build_components(model_preset("tiny"), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in comps.transformer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return save_model(comps, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    from letstalk_rt.pipeline import LetsTalkPipeline

    # eager: traced (the CPU default), whichever test first met a window shape without a warm-up paid its trace live,
    # and its session ran late (a test run alone failed where the whole suite passed); tracing has its own tests
    return LetsTalkPipeline.from_pretrained(tiny_model_dir, traced=False)


@pytest.fixture(scope="session")
def second_pipeline(tiny_model_dir):
    """The tiny model loaded again: a second device's copy (an EnginePool's second engine, a second server)."""
    from letstalk_rt.pipeline import LetsTalkPipeline

    return LetsTalkPipeline.from_pretrained(tiny_model_dir, traced=False)


@pytest.fixture(scope="session")
def w2v_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised transformers wav2vec2 checkpoint, saved to disk (nothing downloaded)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(8,) * 7,  # the real kernels/strides: 400-sample receptive field, 320x downsampling
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w2v") / "tiny-wav2vec2"
    Wav2Vec2Model(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def astronaut_png(tmp_path_factory) -> Path:
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("img") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return path


def write_mkv_dropping_audio(path: Path, frames: list[np.ndarray] | np.ndarray, pcm: np.ndarray,
                             dropped: tuple[float, float]) -> None:
    """An mkv (as OBS and browsers record) of 25 fps frames and 16 kHz PCM audio, a frame's 640 samples per packet,
    each stamped with its own time, and the packets between dropped[0] and dropped[1] s never written: the audio
    timeline jumps over them (or, from 0, the track starts late)."""
    from fractions import Fraction

    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", format="matroska") as c:
        video = c.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        audio = c.add_stream("pcm_s16le", rate=16000, layout="mono")
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            for packet in video.encode(frame):
                c.mux(packet)
            lo = i * 640
            if dropped[0] * 16000 <= lo < dropped[1] * 16000:
                continue
            chunk = av.AudioFrame.from_ndarray((pcm[lo:lo + 640] * 32767).astype(np.int16)[None], format="s16",
                                               layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = 16000, lo, Fraction(1, 16000)
            for packet in audio.encode(chunk):
                c.mux(packet)
        for stream in (video, audio):
            for packet in stream.encode(None):
                c.mux(packet)


def client_example(name: str):
    """client_examples/NAME.py imported as a module (its `run`, `parse_args`...), as a user's copy would run it."""
    return _imported("client_examples", name)


def script(name: str):
    """scripts/NAME.py imported as a module (its functions, as the script runs them)."""
    return _imported("scripts", name)


def _imported(folder: str, name: str):
    import importlib.util

    path = Path(__file__).resolve().parent.parent / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def killed_video_writer(path: Path, age_s: float = 3600) -> Path:
    """The partial file a VideoWriter of `path` leaves when its process is killed (SIGKILL: nothing of its own runs)
    one frame in, its time set `age_s` back."""
    import os
    import signal
    import subprocess
    import sys

    killed = subprocess.run([sys.executable, "-c", f"""
import os, signal
import numpy as np
from letstalk_rt.media import VideoWriter
w = VideoWriter({str(path)!r}, 32)
w.write_frame(np.zeros((32, 32, 3), np.uint8))
print(w._tmp.name, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = path.parent / killed.stdout.strip()
    os.utime(partial, (time.time() - age_s, time.time() - age_s))
    return partial


def cpu_share(threads: int = 2, seconds: float = 0.3) -> float:
    """How many cores this process gets for `threads` torch threads of matrix products: CPU time over wall time
    (a quiet 2-core machine: 1.97-2.0, 1.87 once right after an engine test; beside one busy loop: 1.14-1.5)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a = torch.randn(256, 256)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - wall < seconds:
            for _ in range(20):
                a @ a
        return (time.process_time() - cpu) / (time.perf_counter() - wall)
    finally:
        torch.set_num_threads(before)


def skip_if_busy(*shares: float) -> None:
    """Skip a test whose premise is a quiet machine where another process took the cores (`cpu_share`, before and
    after it): such a test slows some windows on purpose, as another process would, and checks what the engine does
    about it (or that the machine has room for what it runs); on a machine busy for real the engine rightly does it to
    the other windows too (beside a busy loop, the thread tests' windows fell behind and the engine lowered the threads
    where the test wants them kept)."""
    if min(shares) < 1.6:
        pytest.skip(f"another process is busy on this machine's cores: 2 threads got {min(shares):.2f} cores")


def speechlike(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A deterministic voiced signal with syllable-rate amplitude modulation (float32 mono)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.5 * t)
    voice = np.sin(2 * np.pi * np.cumsum(f0) / rate) + 0.3 * np.sin(2 * np.pi * 3 * np.cumsum(f0) / rate)
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (0.3 * voice * envelope + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def speech_out(frames: list, drop_held: bool = False) -> np.ndarray:
    """What a session said, from its frames' audio: each held tick's (generation was late: it fades out the sound
    before it) silenced in place, or left out with `drop_held`, and the fade-in of the speech after it (the speech
    waits behind it and restarts from silence over FILLER_FADE samples) undone, to a float rounding or two."""
    from letstalk_rt.stream.engine import unfaded_audio
    return np.concatenate([unfaded_audio(f) if not f.filler else np.zeros_like(f.audio)
                           for f in frames if not (f.filler and drop_held)])


@pytest.fixture
def wav_file(tmp_path):
    """Factory: write `seconds` of speech-like audio as a wav at `rate` and return its path."""
    import av

    def make(seconds: float, rate: int = 16000, name: str = "speech.wav") -> Path:
        path = tmp_path / name
        pcm = (speechlike(seconds, rate) * 32767).astype(np.int16)
        with av.open(str(path), "w") as out:
            stream = out.add_stream("pcm_s16le", rate=rate, layout="mono")
            frame = av.AudioFrame.from_ndarray(pcm[None], format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        return path

    return make
