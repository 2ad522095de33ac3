"""The pauses of said text as the avatar plays them: pushed ahead of real time (what `say` does) against pushed as
live audio (before `push_audio(ahead=True)`), on the bundled model, through the live engine in real time.

    python scripts/say_pauses.py [--text "..."] [--voice en-us] [--runs 2]

For each way: the time to the first word (say()/push to its first frame of speech on screen), the silences of
100 ms or more between the words as espeak-ng made them and as the frames' audio played them, and the held frames.
The figures of 2026-11-30 are in docs/benchmarks.md ("Text in").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from letstalk_rt.cli import ASSETS  # noqa: E402
from letstalk_rt.media import load_image  # noqa: E402
from letstalk_rt.pipeline import LetsTalkPipeline  # noqa: E402
from letstalk_rt.stream import EngineConfig, StreamEngine  # noqa: E402
from letstalk_rt.stream.events import SpeechStarted  # noqa: E402
from letstalk_rt.tts import Speech, sentences  # noqa: E402

TEXT = ("Hello there. I am a talking avatar. I speak text a sentence at a time; the pauses between my sentences "
        "stay as long as the voice made them. Thank you for listening.")


def pauses(audio: np.ndarray, least_s: float = 0.1, rate: int = 16000) -> list[float]:
    """Silences of at least `least_s` between sounds (runs of samples under 1 % of the peak), in seconds."""
    loud = np.flatnonzero(np.abs(audio) > 0.01 * np.abs(audio).max())
    gaps = np.diff(loud) / rate
    return [round(float(g), 3) for g in gaps if g >= least_s]


async def one_run(pipe, image, text: str, speech: Speech, ahead: bool) -> dict:
    async with StreamEngine(pipe, EngineConfig(max_sessions=1, max_batch=1)) as engine:
        session = await engine.open_session(image)
        said_at = time.time()
        if ahead:
            task = session.say(text, speech)
        else:  # the same sentences pushed at once as live audio, each after the one before, as say() queues them
            async def push_live():
                for piece in sentences(text):
                    session.push_audio(await asyncio.to_thread(speech.synthesize, piece))
                session.end_speech()
            task = asyncio.ensure_future(push_live())
        first_word = None
        frames = []
        events = session.events()

        async def watch():
            nonlocal first_word
            async for event in events:
                if isinstance(event, SpeechStarted) and first_word is None:
                    first_word = event.time - said_at

        watcher = asyncio.ensure_future(watch())
        quiet = 0
        async for frame in session.frames():
            frames.append(frame)
            quiet = 0 if frame.speech else quiet + 1
            if task.done() and quiet >= 50 and any(f.speech for f in frames):
                break
        watcher.cancel()
        stats = session.stats()
    played = np.concatenate([f.audio for f in frames])
    return {"first_word_ms": None if first_word is None else round(first_word * 1000),
            "pauses_played_s": pauses(played), "held": stats["fillers"],
            "silence_skipped_s": stats["silence_skipped_s"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", default=TEXT)
    p.add_argument("--voice", default="en-us")
    p.add_argument("--runs", type=int, default=2)
    args = p.parse_args()
    speech = Speech(args.voice)
    made = np.concatenate([speech.synthesize(piece) for piece in sentences(args.text)])
    print(f"pauses as espeak-ng made them (s): {pauses(made)}")
    pipe = LetsTalkPipeline.from_pretrained()
    image = load_image(ASSETS / "portrait.png")
    for run in range(args.runs):
        for ahead in (True, False):
            result = asyncio.run(one_run(pipe, image, args.text, speech, ahead))
            print(f"run {run + 1}, {'ahead (say)' if ahead else 'as live audio'}: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
