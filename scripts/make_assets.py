"""Regenerate the bundled demo assets in letstalk_rt/assets/ (deterministically).

    python scripts/make_assets.py            # writes letstalk_rt/assets/portrait.png and speech.ogg

portrait.png  A real photograph that ships inside scikit-image: `skimage.data.astronaut()` (512x512,
              NASA portrait of Eileen Collins, public domain), cropped to the fixed head-and-shoulders
              box PORTRAIT_BOX (320x320, face centred horizontally, about 90-100 px wide) and saved as PNG.
              The box is fixed, not detected, so the file never depends on the face detector.

speech.ogg    About 10.6 s of English speech from eSpeak NG (Debian package `espeak-ng`, 1.51), one
              call per sentence; eSpeak's ~0.4 s of trailing silence is cut (samples below SILENCE,
              keeping 50 ms) and the sentences are joined with PAUSE_S of silence:

                  espeak-ng -v en-us+f3 -s 160 -p 50 -a 100 -w SENTENCE.wav "SENTENCE"

              (voice `en-us` with the female variant `f3`, 160 words/min, pitch 50, amplitude 100; eSpeak
              writes 22.05 kHz mono 16-bit WAV). The joined speech is resampled to 16 kHz mono with
              letstalk_rt.media.load_audio and encoded with PyAV as Opus (libopus, 24 kbit/s, 16 kHz
              mono) in an Ogg container, with FFmpeg's bitexact flags so reruns give identical bytes.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from letstalk_rt.media import SAMPLE_RATE, load_audio  # noqa: E402

ASSETS = ROOT / "letstalk_rt" / "assets"
PORTRAIT_BOX = (70, 0, 320, 320)  # (x, y, width, height) in astronaut(): head and shoulders, face well inside
SENTENCES = (
    "Hello, and welcome to lets talk.",
    "Each frame of video carries its own slice of sound.",
    "I am a portrait, animated from speech in real time.",
    "Thank you for listening.",
)
ESPEAK = ["espeak-ng", "-v", "en-us+f3", "-s", "160", "-p", "50", "-a", "100"]
PAUSE_S = 0.3  # silence between sentences (seconds)
SILENCE = 0.01  # |sample| below this at a sentence's end counts as eSpeak's trailing silence
OPUS_BITRATE = 24000  # bit/s: plenty for 16 kHz speech, ~3 kB per second


def make_portrait(path: Path) -> None:
    from PIL import Image
    from skimage import data

    x, y, w, h = PORTRAIT_BOX
    crop = data.astronaut()[y:y + h, x:x + w]  # (320, 320, 3) uint8
    Image.fromarray(crop).save(path, optimize=True)


def speak(text: str, workdir: Path) -> np.ndarray:
    wav = workdir / "sentence.wav"
    subprocess.run([*ESPEAK, "-w", str(wav), text], check=True)
    audio = load_audio(wav, SAMPLE_RATE)  # (n,) float32 at 16 kHz
    end = int(np.nonzero(np.abs(audio) > SILENCE)[0][-1]) + SAMPLE_RATE // 20
    return audio[:end]


def encode_opus(path: Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """float32 mono -> Ogg/Opus with PyAV, fed in the encoder's frame size (20 ms)."""
    import av

    with av.open(str(path), "w", format="ogg", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("libopus", rate=rate, layout="mono")
        stream.bit_rate = OPUS_BITRATE
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.codec_context.open()
        size = stream.codec_context.frame_size  # 320 samples = 20 ms at 16 kHz
        pcm = np.pad(audio, (0, -len(audio) % size)).astype(np.float32)  # whole frames; the tail is silence
        for i in range(0, len(pcm), size):
            frame = av.AudioFrame.from_ndarray(pcm[None, i:i + size], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, i, Fraction(1, rate)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def make_speech(path: Path) -> float:
    pause = np.zeros(int(PAUSE_S * SAMPLE_RATE), np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        parts = []
        for text in SENTENCES:
            parts += [speak(text, Path(tmp)), pause]
    audio = np.concatenate(parts[:-1])  # (n,) float32, no pause after the last sentence
    encode_opus(path, audio)
    return len(audio) / SAMPLE_RATE


def main() -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    portrait, speech = ASSETS / "portrait.png", ASSETS / "speech.ogg"
    make_portrait(portrait)
    seconds = make_speech(speech)
    print(f"{portrait.relative_to(ROOT)}: {PORTRAIT_BOX[2]}x{PORTRAIT_BOX[3]}, {portrait.stat().st_size / 1e3:.1f} kB")
    print(f"{speech.relative_to(ROOT)}: {seconds:.2f} s, {speech.stat().st_size / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
