"""The avatar on local devices (`letstalk_rt.devices`, `letstalk camera`): a microphone read through PortAudio, each tick's
frame to a virtual camera and its sound to an output device, together.

The audio devices are real PortAudio (ALSA) devices: ALSA's `file` plugin, configured here, reads a microphone's
samples from a file and writes what a speaker plays to one (untimed: over a `null` slave). No virtual camera can be
made on a machine without the v4l2loopback kernel module, so the camera's frames go to a recording backend in place of
pyvirtualcam's camera; pyvirtualcam itself is run as far as its search for a device (the error `letstalk camera`
gives)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import speechlike
from letstalk_rt.errors import InputError, OutputError
from letstalk_rt.stream import EngineConfig, FileSource, MicrophoneSource, StreamEngine
from server_helpers import run
from test_recording import _portrait

RATE = 16000


@pytest.fixture
def alsa(tmp_path, monkeypatch):
    """ALSA devices `letstalk_mic` (plays `mic.raw`, float32 mono, as its input) and `letstalk_speaker` (writes what it
    plays to `speaker.raw`), PortAudio started again to see them; the folder they use."""
    try:
        import sounddevice as sd
    except (ImportError, OSError) as e:
        pytest.skip(f"needs sounddevice and PortAudio ({e}; scripts/setup.sh --dev installs both)")
    speechlike(1.0).astype("<f4").tofile(tmp_path / "mic.raw")
    conf = tmp_path / "asound.conf"
    conf.write_text(
        f'pcm.letstalk_mic {{ type file; slave.pcm "null"; file "/dev/null"; infile "{tmp_path}/mic.raw"; '
        f'format "raw"; hint {{ show on; description "test microphone" }} }}\n'
        f'pcm.letstalk_speaker {{ type file; slave.pcm "null"; file "{tmp_path}/speaker.raw"; format "raw"; '
        f'hint {{ show on; description "test speaker" }} }}\n')
    monkeypatch.setenv("ALSA_CONFIG_PATH", f"/usr/share/alsa/alsa.conf:{conf}")
    sd._terminate()  # PortAudio lists devices when it starts
    sd._initialize()
    yield tmp_path
    monkeypatch.undo()
    sd._terminate()
    sd._initialize()


def test_the_microphone_source_reads_an_input_device_in_order(alsa):
    """What the device captures comes out in 20 ms blocks at the asked rate, every sample in order; a device that is
    not there is refused with the list of those that are."""
    async def main():
        got = []
        chunks = MicrophoneSource("letstalk_mic", max_queue=10_000).chunks()
        async for pcm, rate in chunks:
            assert rate == RATE and pcm.shape == (320,) and pcm.dtype == np.float32
            got.append(pcm)
            if len(got) == 50:
                break
        await chunks.aclose()
        with pytest.raises(InputError, match="(?s)cannot open the microphone 'no such mic'.*letstalk_mic"):
            MicrophoneSource("no such mic")
        return np.concatenate(got)

    heard = run(main())
    assert np.array_equal(heard, np.fromfile(alsa / "mic.raw", "<f4")), "the device's samples, in order"


def test_a_microphone_that_stops_or_goes_quiet_ends_its_source_saying_so(alsa, monkeypatch):
    """A device delivers blocks all the time, silent or not: one whose stream PortAudio ends (unplugged) ends the
    source with an InputError saying so, and one that stops delivering does too after `stall_s`. (PortAudio's stream is
    replaced here by one that delivers a few blocks, then does either.)"""
    import sounddevice as sd

    class DyingStream:
        def __init__(self, callback, finished_callback, blocksize, ends: bool, **_) -> None:
            self.callback, self.finished, self.blocksize, self.ends = callback, finished_callback, blocksize, ends

        def __enter__(self):
            def deliver():
                for _ in range(5):
                    self.callback(np.zeros((self.blocksize, 1), np.float32), self.blocksize, None, None)
                if self.ends:
                    self.finished()
            threading.Thread(target=deliver).start()
            return self

        def __exit__(self, *exc) -> None:
            pass

    async def read(ends: bool) -> tuple[int, str]:
        monkeypatch.setattr(sd, "InputStream", lambda **kw: DyingStream(ends=ends, **kw))
        got = 0
        with pytest.raises(InputError) as e:
            async for _ in MicrophoneSource("letstalk_mic", stall_s=0.5).chunks():
                got += 1
        return got, str(e.value)

    assert run(read(ends=True)) == (5, "the microphone 'letstalk_mic' stopped (unplugged?)")
    started = time.monotonic()
    got, error = run(read(ends=False))
    assert got == 5 and "sent no sound for 0.5 s" in error and 0.4 < time.monotonic() - started < 3


class RecordingCamera:
    """In place of pyvirtualcam's camera: keeps what it is sent; `hold` blocks its sends while set."""

    device = "test camera"

    def __init__(self, fail_after: int | None = None) -> None:
        self.frames: list[np.ndarray] = []
        self.hold = threading.Event()
        self.fail_after = fail_after
        self.closed = False

    def send(self, frame: np.ndarray) -> None:
        while self.hold.is_set():
            time.sleep(0.01)
        if self.fail_after is not None and len(self.frames) >= self.fail_after:
            raise RuntimeError("the camera went away")
        self.frames.append(frame.copy())

    def close(self) -> None:
        self.closed = True


def test_each_tick_goes_to_the_camera_and_its_sound_to_the_speaker_together(tiny_pipeline, alsa):
    """show_on_devices: the camera gets each tick's frame (scaled to its size) and the speaker plays the sound of those
    same ticks, sample for sample, in order, through PortAudio; a camera that stalls loses its oldest ticks (counted)
    while the clock and the voice go on; one that fails ends it with an OutputError naming it."""
    from PIL import Image

    from letstalk_rt.devices import CUSHION_S, AudioOutput, VirtualCamera, show_on_devices

    async def main():
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False)).start()
        try:
            session = await engine.open_session(_portrait(tiny_pipeline))
            feeder = asyncio.ensure_future(FileSource.from_samples(speechlike(2.0) + 0.05).run(session))
            backend = RecordingCamera()
            camera = VirtualCamera(session.frame_size, 25, size=64, backend=backend)
            voice = AudioOutput("letstalk_speaker", session.sample_rate, rate=RATE)
            shown = await show_on_devices(session, camera, voice, ticks=60)
            end = session.player.tick
            ticks = [session.player.shown[t] for t in range(end - shown, end)]
            camera.close()
            voice.close()
            await feeder
            # a camera that stalls for 2 s, then one that fails
            stalled = VirtualCamera(session.frame_size, 25, size=64, backend=RecordingCamera())
            stalled._camera.hold.set()
            asyncio.get_running_loop().call_later(2.0, stalled._camera.hold.clear)
            late = await show_on_devices(session, stalled, None, ticks=75)
            stalled.close()
            failing = VirtualCamera(session.frame_size, 25, size=64, backend=RecordingCamera(fail_after=3))
            with pytest.raises(OutputError, match="VirtualCamera failed: RuntimeError: the camera went away"):
                await show_on_devices(session, failing, None, ticks=100)
            failing.close()
            return shown, ticks, backend, camera, voice, late, stalled, session.closed
        finally:
            await engine.stop()

    shown, ticks, backend, camera, voice, late, stalled, closed = run(main())
    assert shown == 60 and len(backend.frames) == 60 and backend.closed and camera.dropped == 0
    assert all(f.shape == (64, 64, 3) for f in backend.frames)
    want = [np.asarray(Image.fromarray(t.video).resize((64, 64), Image.BILINEAR)) for t in ticks]
    assert all(np.abs(got.astype(int) - w).max() <= 2 for got, w in zip(backend.frames, want)), "each tick's frame, in order"
    played = np.fromfile(alsa / "speaker.raw", "<f4")
    sound = np.concatenate([t.audio for t in ticks])
    assert any(t.speech for t in ticks) and np.abs(sound).max() > 0.1
    cushion = round(CUSHION_S * RATE)  # the silence the speaker starts with, kept ahead in its buffer
    assert not played[:cushion].any() and np.array_equal(played[cushion:cushion + len(sound)], sound), \
        "the sound of the same ticks, sample for sample"
    assert voice.dropped == 0 and voice.error is None and voice.skipped_s == 0  # a device that keeps up: nothing skipped
    # the stalled camera: the clock went on (75 ticks in ~3 s), the camera got the newest second, not the backlog
    assert late == 75 and stalled.dropped >= 20 and len(stalled._camera.frames) == 75 - stalled.dropped
    assert not closed


def _speech_file(tmp_path) -> str:
    """A WAV: half a second of silence, 1.5 s of speech-like sound, a second of silence."""
    import av

    speech = tmp_path / "speech.wav"
    pcm = np.concatenate([np.zeros(RATE // 2, np.float32), speechlike(1.5) + 0.05, np.zeros(RATE, np.float32)])
    with av.open(str(speech), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray((pcm * 32767).astype(np.int16).reshape(1, -1), format="s16",
                                           layout="mono")
        frame.sample_rate = RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return str(speech)


def test_letstalk_camera_plays_the_voice_in_step_and_says_what_is_missing(tiny_model_dir, alsa, tmp_path, capsys,
                                                                         monkeypatch):
    """`letstalk camera --audio F --speaker N --no-camera --seconds S` shows S seconds and plays the avatar's voice on
    device number N at its own rate (resampled), the speech where the file has it; without a virtual camera on the
    machine it stops at once with one line saying how to get one; a microphone that is not there, the same. The camera
    shows the whole photo, as a webcam shows a person (`--face-crop`: the model's square crop)."""
    from letstalk_rt.cli import main

    speech = _speech_file(tmp_path)
    base = ["camera", "--model", str(tiny_model_dir), "--quiet"]
    import sounddevice as sd

    number = next(i for i, d in enumerate(sd.query_devices()) if d["name"] == "letstalk_speaker")  # (by its number)
    code = main([*base, "--audio", str(speech), "--speaker", str(number), "--no-camera", "--seconds", "3",
                 "--speaker-latency", "120"])
    said = capsys.readouterr()
    assert code == 0, said.err
    rate, buffered = map(int, re.search(r"letstalk_speaker \((\d+) Hz, (\d+) ms buffered\)", said.err).groups())
    assert 100 <= buffered <= 240, said.err  # what the device made of the 120 asked for
    assert re.search(r"showed 3\.0 s; speech-to-screen latency p95 \d+ ms", said.out), said.out
    played = np.fromfile(alsa / "speaker.raw", "<f4")
    assert abs(len(played) - 3 * rate) <= rate // 10, (len(played), rate)
    loud = np.array([np.sqrt(np.mean(played[i:i + rate // 10] ** 2)) for i in range(0, 3 * rate, rate // 10)])
    assert loud[:4].max() < 0.02 and loud[10:20].mean() > 0.1, loud  # its speech after half a second, shown late

    code = main([*base, "--audio", str(speech), "--speaker", "none", "--seconds", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "virtual camera" in err and ("modprobe v4l2loopback" in err or "pip install" in err), err
    code = main([*base, "--mic", "no such mic", "--speaker", "letstalk_speaker", "--no-camera", "--seconds", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot open the microphone 'no such mic'" in err, err
    assert main([*base, "--no-camera", "--speaker", "none"]) == 2 and "nothing to show" in capsys.readouterr().err
    assert main([*base, "--speaker-latency", "0"]) == 2 and "1..500 ms" in capsys.readouterr().err

    from PIL import Image

    import letstalk_rt.devices as devices
    from letstalk_rt.cli import ASSETS

    wide = tmp_path / "wide.png"  # the bundled 320x320 portrait on a 480x320 photo
    photo = Image.new("RGB", (480, 320), (90, 120, 150))
    photo.paste(Image.open(ASSETS / "portrait.png").convert("RGB"), (80, 0))
    photo.save(wide)
    cameras = []
    monkeypatch.setattr(devices, "_open_camera", lambda width, height, fps, device: cameras.append(
        (width, height, RecordingCamera())) or cameras[-1][2])
    for extra in ([], ["--face-crop"]):
        code = main([*base, "--portrait", str(wide), "--audio", speech, "--speaker", "none", "--seconds", "1",
                     *extra])
        assert code == 0, capsys.readouterr().err
    (width, height, whole), (crop_width, crop_height, crop) = cameras
    assert (width, height) == (512, 342) and (crop_width, crop_height) == (512, 512)
    assert len(whole.frames) == len(crop.frames) == 25 and whole.frames[0].shape == (342, 512, 3)
    assert np.abs(whole.frames[0][:, :40].astype(int) - (90, 120, 150)).max() <= 3, "the photo's own edge"


def test_the_microphone_example_drives_a_server_and_plays_the_avatars_voice(tiny_pipeline, alsa, tmp_path):
    """client_examples/microphone.py as a user runs it against a server: its microphone (an ALSA device read by
    FFmpeg, as the example reads any) drives the avatar over WebRTC; the avatar's voice comes back and plays on the
    speaker device, louder while it speaks; with no virtual camera on the machine it saves snapshots instead."""
    import sounddevice as sd

    from conftest import client_example
    from server_helpers import running_server

    example = client_example("microphone")
    # silence at the end: the device is untimed (FFmpeg reads it at once) and, past the file, repeats its last buffer
    voice = np.concatenate([np.zeros(24000), speechlike(3.0, rate=48000) + 0.05, np.zeros(96000)])
    (np.clip(voice, -1, 1) * 32767).astype("<i2").tofile(alsa / "mic.raw")  # FFmpeg's ALSA input: 48 kHz s16
    snapshot = tmp_path / "snap.png"
    args = example.parse_args(["--mic-format", "alsa", "--mic-device", "letstalk_mic", "--speaker", "letstalk_speaker",
                               "--cam-size", "64", "--snapshot", str(snapshot)])

    rate = int(sd.query_devices("letstalk_speaker", "output")["default_samplerate"])  # (the speaker's own)

    def loudness() -> list[float]:  # of each half second the speaker has played so far
        played = np.fromfile(alsa / "speaker.raw", "<f4") if (alsa / "speaker.raw").exists() else np.zeros(0)
        return [float(np.sqrt(np.mean(played[i:i + rate // 2] ** 2)))
                for i in range(0, len(played) - rate // 2, rate // 2)]

    def spoke_then_stopped(loud: list[float]) -> bool:  # 2.5 s of its speech at least, then quiet as the mic went
        top = max(loud, default=0.0)
        spoken = [i for i, rms in enumerate(loud) if rms > 0.2 * top]
        return top > 0.02 and len(spoken) >= 5 and min(loud[spoken[0]:]) < 0.2 * top

    async def main():
        async with running_server(tiny_pipeline) as srv:
            args.server = srv.url
            example_run = asyncio.ensure_future(example.run(args))
            ends = time.monotonic() + 20  # until its speech came back and played (~6 s; more in a VM's slow spell)
            while time.monotonic() < ends and not example_run.done():
                await asyncio.sleep(0.5)
                if spoke_then_stopped(loudness()):
                    break
            example_run.cancel()  # a user's Ctrl-C
            with contextlib.suppress(asyncio.CancelledError):
                await example_run

    run(main())
    loud = loudness()
    assert spoke_then_stopped(loud), loud
    assert snapshot.exists()


def _speech_and_pauses(voice, n: int, pauses: bool = True,
                       late_s: float = 0.0) -> tuple[list[bool], dict[int, float], float]:
    """Play n 40-ms ticks to `voice` in real time, each up to `late_s` late (at random: an event loop's jitter): 0.8 s
    of speech, 0.4 s of pause, again and again (or, not `pauses`, speech only), each tick's samples saying which tick
    it is (`_which_ticks`); whether each was loud, when each was queued, and when it started."""
    import random

    loud = [i % 30 < 20 or not pauses for i in range(n)]
    queued, rng = {}, random.Random(5)
    gc.disable()  # a full collection of this test process's heap could stall both threads past the cushion (an
    try:          # engine freezes its heap at start for the same reason: EngineConfig.freeze_gc)
        start = time.monotonic()
        for i in range(n):
            time.sleep(max(0.0, start + i * 0.04 + rng.uniform(0, late_s) - time.monotonic()))
            queued[i] = time.monotonic()
            voice.play(np.full(640, 0.5 + i * 1e-4 if loud[i] else (i + 1) * 1e-6, np.float32))
        voice.close()
    finally:
        gc.enable()
    return loud, queued, start


def _which_ticks(written: list[tuple[float, float]]) -> list[tuple[int, float]]:
    """(tick, time) of what a stand-in stream recorded, by the first sample each tick of `_speech_and_pauses` carries
    (the silence of the speaker's cushion left out)."""
    return [(round((v - 0.5) / 1e-4) if v >= 0.25 else round(v / 1e-6) - 1, at) for v, at in written if v > 0]


def test_a_speaker_slower_than_the_sessions_clock_keeps_the_voice_in_step_by_skipping_pauses(alsa, monkeypatch):
    """A sound card whose clock runs slower than the session's leaves its sound ever later against the camera's frames
    (100 ppm: a frame every 7 minutes; here 3%, so that 10 s show it). AudioOutput catches up by skipping quiet sound
    (the pauses between phrases): the voice stays within a few frames of when it was queued, and no speech is lost.
    Without it the voice is 300 ms late after 10 s (more on a busy machine), and drifts on until a second of it is
    dropped. (PortAudio's stream is modelled on the clock, playing 3% slow.)"""
    import sounddevice as sd

    from letstalk_rt.devices import AudioOutput

    monkeypatch.setattr(sd, "OutputStream", lambda **kw: TimedStream(speed=1 / 1.03, **kw))  # plays 3% slow
    voice = AudioOutput("letstalk_speaker", RATE, rate=RATE)
    n = 250
    loud, queued, start = _speech_and_pauses(voice, n)

    played = _which_ticks(voice._stream.starts)  # (tick, when it started to play)
    order = [i for i, _ in played]
    skipped = sorted(set(range(n)) - set(order))
    assert order == sorted(order) and skipped, "in order; some sound skipped"
    assert not any(loud[i] for i in skipped), f"only pauses are skipped: {skipped}"
    assert voice.skipped_s == pytest.approx(len(skipped) * 0.04) and voice.dropped == 0
    # over the last 3 s: back in step at each pause, the cushion's 40 ms and a tick behind at most (the old code: never
    # under 250 ms, and growing), and never far behind between them (loose: a slow spell of a shared VM delays the
    # writer's thread too)
    late = [at - queued[i] for i, at in played if queued[i] - start > 7.0]
    assert min(late) < 0.12 and max(late) < 0.35, f"the voice drifted: {min(late) * 1000:.0f}-{max(late) * 1000:.0f} ms"


def test_letstalk_camera_with_a_server_needs_no_engine(tmp_path):
    """A listening machine runs no model: `letstalk camera --server` reads its speech file and asks the server (here one
    that is not there: one line) in an install without the engine (no torch, ~5 s and ~300 MB on a laptop, nor the
    engine's other packages), as `pip install letstalk-rt` / `scripts/setup.sh --sdk` make."""
    from without_engine import PRELUDE

    code = (PRELUDE + "from letstalk_rt.cli import main\n"
            f"code = main(['camera', '--server', 'http://127.0.0.1:9', '--audio', {_speech_file(tmp_path)!r}, "
            "'--speaker', 'none']); assert code == 2, code; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert "127.0.0.1:9" in out.stderr and "engine" not in out.stderr, out.stderr


def test_letstalk_camera_shows_a_servers_avatar(tiny_pipeline, alsa, tmp_path, capsys, monkeypatch):
    """`letstalk camera --server URL`: the avatar made by a server (this machine runs no model): the speech goes up to
    it, and its frames (the whole photo, at the server's size) come back to the camera and its voice to the speaker,
    the speech where the file has it; a session the server closes ends it, saying why; a server that is not there is
    one line, a speaker that is not there too, and the flags of a model run here (both before the server is asked)."""
    import sounddevice as sd

    import letstalk_rt.devices as devices
    from letstalk_rt.cli import main
    from server_helpers import running_server

    speech = _speech_file(tmp_path)
    cameras = []
    monkeypatch.setattr(devices, "_open_camera", lambda width, height, fps, device: cameras.append(
        (width, height, RecordingCamera())) or cameras[-1][2])

    async def serve():
        async with running_server(tiny_pipeline) as srv:
            return await asyncio.to_thread(main, ["camera", "--server", srv.url, "--audio", speech, "--speaker",
                                                  "letstalk_speaker", "--camera-size", "64", "--seconds", "4",
                                                  "--quiet"])

    code = run(serve())
    said = capsys.readouterr()
    assert code == 0, said.err
    latency = re.search(r"showed 4\.0 s; speech-to-screen latency p95 at the server (\d+) ms", said.out)
    assert latency and int(latency.group(1)) > 0, said.out
    (width, height, camera), = cameras
    assert (width, height) == (64, 64) and len(camera.frames) == 100 and camera.closed
    assert np.std(camera.frames[-1]) > 5, "a picture, not a blank"
    rate = int(sd.query_devices("letstalk_speaker", "output")["default_samplerate"])
    played = np.fromfile(alsa / "speaker.raw", "<f4")
    assert len(played) >= 3 * rate, len(played) / rate
    # (all it played: on a busy machine the speech came 3 s into the 4)
    loud = np.array([np.sqrt(np.mean(played[i:i + rate // 10] ** 2))
                     for i in range(0, len(played) - rate // 10 + 1, rate // 10)])
    assert loud[:4].max() < 0.02 and loud.max() > 0.1, loud  # silence, then the speech

    async def closed_by_the_server():
        async with running_server(tiny_pipeline) as srv:
            cli = asyncio.ensure_future(asyncio.to_thread(main, ["camera", "--server", srv.url, "--audio", speech,
                                                                 "--speaker", "none", "--quiet"]))
            while not any(ss.pc is not None and ss.pc.connectionState == "connected"
                          for ss in srv.manager.sessions.values()):
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # streaming
            await srv.manager.close(next(iter(srv.manager.sessions.values())), "ended by the operator")
            return await asyncio.wait_for(cli, 20)

    assert run(closed_by_the_server()) == 2
    err = capsys.readouterr().err
    assert re.search(r"the server closed the session after \d+\.\d s: ended by the operator", err), err
    code = main(["camera", "--server", "http://127.0.0.1:9", "--audio", speech, "--speaker", "none", "--seconds", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "127.0.0.1:9" in err and len(err.strip().splitlines()) == 1, err
    code = main(["camera", "--server", "http://127.0.0.1:9", "--audio", speech, "--speaker", "no such speaker"])
    err = capsys.readouterr().err  # said before the server is asked
    assert code == 2 and "cannot open the speaker 'no such speaker'" in err and "127.0.0.1:9" not in err, err
    code = main(["camera", "--server", "http://127.0.0.1:9", "--audio", speech, "--threads", "1", "--no-trace"])
    err = capsys.readouterr().err  # the server's engine runs as `letstalk serve` started it: said before it is asked
    assert code == 2 and err.startswith("letstalk: error: --no-trace, --threads: with --server") and "127.0.0.1:9" \
        not in err, err


class TimedStream:
    """PortAudio's blocking output stream, modelled on the clock: a buffer of `latency` s that the device plays from at
    `speed` x real time; write() blocks until its samples fit and says whether the device ran dry since the last one.
    Records when each written piece starts to play."""

    def __init__(self, samplerate, latency, speed: float = 1.0, **_) -> None:
        self.rate, self.speed = samplerate, speed
        self.latency = 0.0086 if latency == "low" else float(latency)  # "low": what ALSA gives the test devices
        self.capacity = self.latency * samplerate
        self.level, self.at, self.dry, self.starts = 0.0, None, False, []

    def _drain(self) -> None:
        now = time.monotonic()
        if self.at is not None and self.level > 0:
            self.level -= (now - self.at) * self.rate * self.speed
            if self.level < 0:  # it ran out while playing
                self.dry, self.level = True, 0.0
        self.at = now

    @property
    def write_available(self) -> int:
        self._drain()
        return int(self.capacity - self.level)

    def write(self, data) -> bool:
        self._drain()
        underflow, self.dry = self.dry, False
        self.starts.append((data[0, 0], time.monotonic() + self.level / (self.rate * self.speed)))
        left = float(len(data))
        while left > 0:
            self._drain()
            take = min(left, self.capacity - self.level)
            self.level, left = self.level + take, left - take
            if left > 0:
                time.sleep(0.001)
        return underflow

    def start(self) -> None:
        pass

    stop = close = start


def test_the_speaker_keeps_a_cushion_so_a_late_event_loop_makes_no_click(alsa, monkeypatch):
    """A blocking write returns with the device's buffer just full, so without sound kept ahead the device runs dry
    whenever a tick comes later than the last one did: a click. AudioOutput starts with CUSHION_S of silence ahead in an 80-ms buffer: ticks up to
    6 ms late (an event loop's jitter) make none, and the voice plays ~40 ms after it is queued. Without the cushion,
    in PortAudio's "low" buffer (8.6 ms on ALSA), 4-5 ticks in 100 click: one a second. A device whose clock runs
    fast uses the cushion up (here 3%: in about a second; without top-ups it then ran dry on 117 of 150 ticks); pauses
    top it up, so it never runs dry. (The device is modelled on the clock.)"""
    import sounddevice as sd

    import letstalk_rt.devices as devices
    from letstalk_rt.devices import AudioOutput

    def feed(voice) -> list[float]:  # how long after it was queued each tick started to play
        _, queued, _ = _speech_and_pauses(voice, 100, pauses=False, late_s=0.006)
        return [at - queued[i] for i, at in _which_ticks(voice._stream.starts)]

    monkeypatch.setattr(sd, "OutputStream", TimedStream)
    cushioned = AudioOutput("letstalk_speaker", RATE, rate=RATE)
    delays = feed(cushioned)
    monkeypatch.setattr(sd, "OutputStream", lambda **kw: TimedStream(speed=1.03, **kw))  # a device 3% fast
    fast = AudioOutput("letstalk_speaker", RATE, rate=RATE)
    _speech_and_pauses(fast, 150)
    assert fast.underflows == 0 and fast.topped_up_s > 0.1, (fast.underflows, fast.topped_up_s)
    # a pause tops the cushion up whenever it is TOP_UP_S short or more, not only once half of it is gone (speech begun
    # on a cushion just over half full used it up on the fast device to 4 ms: one late write from a click)
    for ahead, fill in ((0.030, 0.010), (0.021, 0.019), (0.039, 0.0)):
        before = fast.topped_up_s
        fast._top_up(ahead)
        assert fast.topped_up_s - before == pytest.approx(fill, abs=1 / RATE), (ahead, fast.topped_up_s - before)
    monkeypatch.setattr(sd, "OutputStream", TimedStream)
    monkeypatch.setattr(devices, "CUSHION_S", 0.0)
    bare = AudioOutput("letstalk_speaker", RATE, rate=RATE, latency="low")
    feed(bare)
    assert cushioned.latency == 0.08 and cushioned.underflows == 0, cushioned.underflows
    assert 0.03 < float(np.median(delays)) < 0.06 and max(delays) < 0.1, (np.median(delays), max(delays))
    assert bare.underflows >= 1, bare.underflows  # 5-6 in 100 ticks here; 1, once, with both cores busy
