"""The jump on screen where one session takes over from another (a move), with and without the old one's motion carried
(`Session.motion()` / `continue_from()`, letstalk_rt/stream/motion.py), on the bundled model.

    python scripts/motion_jump.py [--cuts 1.5,2.3,3.1,4.2]

Session A says the bundled speech up to each cut (seconds) and stops there; a new session on the same portrait says the
rest, once started from the portrait (what a move did before) and once from A's motion. Printed: the PSNR of the new
session's first frames against A's last one (higher: less of a jump), beside that of A's last two frames (what one tick
of A changes). Sessions are unpaced (frames as fast as made), so the figures do not depend on the machine's speed. The
figures of 2026-12-07 are in docs/server.md ("Moving a session").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from letstalk_rt.cli import ASSETS  # noqa: E402
from letstalk_rt.media import load_audio, load_image  # noqa: E402
from letstalk_rt.pipeline import LetsTalkPipeline  # noqa: E402
from letstalk_rt.stream import EngineConfig, Motion, StreamEngine  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255 ** 2 / max(mse, 1e-9))


async def say(engine: StreamEngine, portrait: np.ndarray, pcm: np.ndarray, motion: bytes | None = None,
              frames: int | None = None) -> tuple[list[np.ndarray], bytes]:
    """The frames a new session shows saying `pcm` (the first `frames` of them), and its motion after them."""
    session = await engine.open_session(portrait)
    try:
        session.unpace()
        if motion is not None:
            session.continue_from(Motion.from_bytes(motion))
        session.push_audio(pcm, ahead=True)
        session.end_speech()
        shown = []
        async for frame in session.frames():
            shown.append(frame.video)
            if session.audio_shown or (frames and len(shown) >= frames):
                break
        return shown, session.motion().to_bytes()
    finally:
        await session.close()


async def main(cuts: list[float], frames: int) -> None:
    engine = await StreamEngine(LetsTalkPipeline.from_pretrained(), EngineConfig(warmup=False)).start()
    portrait, speech = load_image(ASSETS / "portrait.png"), load_audio(ASSETS / "speech.ogg")
    rows = {"a tick of A": [], "from the portrait": [], "from A's motion": []}
    try:
        for cut in cuts:
            n = int(cut * engine.pipeline.config.audio.sample_rate)
            before, motion = await say(engine, portrait, speech[:n])
            fresh, _ = await say(engine, portrait, speech[n:], frames=frames)
            carried, _ = await say(engine, portrait, speech[n:], motion=motion, frames=frames)
            last = before[-1]
            rows["a tick of A"].append([psnr(before[-2], last)])
            rows["from the portrait"].append([psnr(f, last) for f in fresh])
            rows["from A's motion"].append([psnr(f, last) for f in carried])
            print(f"cut at {cut:.1f} s: A's last two frames {psnr(before[-2], last):.1f} dB; the new session's first "
                  f"{frames} frames against A's last: from the portrait "
                  f"{' '.join(f'{psnr(f, last):.1f}' for f in fresh)}, from A's motion "
                  f"{' '.join(f'{psnr(f, last):.1f}' for f in carried)} dB")
    finally:
        await engine.stop()
    print("mean PSNR of the first frame against A's last (dB): "
          + ", ".join(f"{name} {statistics.mean(r[0] for r in row):.1f}" for name, row in rows.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuts", default="1.5,2.3,3.1,4.2",
                        help="seconds of the bundled speech A says, comma-separated")
    parser.add_argument("--frames", type=int, default=4, help="the new session's first frames compared")
    args = parser.parse_args()
    asyncio.run(main([float(c) for c in args.cuts.split(",")], args.frames))
