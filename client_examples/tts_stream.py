"""Feed PCM to an avatar the way a TTS engine does: bursts of chunks per sentence, end of speech, barge-in.

    python client_examples/tts_stream.py                              # synthetic "TTS" (tones), 3 sentences
    python client_examples/tts_stream.py --wav answer.wav --interrupt-after 2.5
    python client_examples/tts_stream.py --overlay                     # print a URL for an OBS browser source

A real TTS (Piper, Coqui, a cloud API streaming PCM) yields audio chunks faster than real time; send each
chunk as it comes (`session.send_audio`), call `end_speech()` when a sentence is complete so its last
frames render at once, and `interrupt()` when the user talks over the avatar. The server queues up to
~30 s ahead; past that it reports `audio_dropped` errors (events), so a TTS that runs far ahead should
pace itself. Something must watch the avatar for its clock to run: this script connects over WebRTC
(and just counts frames), or, with --overlay, leaves the watching to a browser page.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from letstalk_rt.client import AvatarClient, AvatarClientError
from letstalk_rt.errors import LetsTalkError

RATE = 24000  # many TTS engines produce 22.05 or 24 kHz; the server resamples


async def fake_tts(sentence: str, rate: int = RATE) -> AsyncIterator[np.ndarray]:
    """Stands in for a TTS engine: ~0.08 s of audio per character, produced 4x faster than real time."""
    seconds = 0.08 * len(sentence)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voice = np.sin(2 * np.pi * np.cumsum(f0) / rate) * np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    pcm = (0.4 * voice * 32767).astype(np.int16)
    chunk = rate // 5  # 200 ms chunks
    for pos in range(0, len(pcm), chunk):
        await asyncio.sleep(chunk / rate / 4)
        yield pcm[pos:pos + chunk]


async def wav_tts(path: Path) -> AsyncIterator[np.ndarray]:
    from letstalk_rt.media import load_audio

    pcm = (load_audio(path, RATE) * 32767).astype(np.int16)
    for pos in range(0, len(pcm), RATE // 5):
        await asyncio.sleep(0.05)
        yield pcm[pos:pos + RATE // 5]


async def run(args: argparse.Namespace) -> None:
    async with AvatarClient(args.server, api_key=args.api_key) as client:
        session = await client.start_session(avatar_id=args.avatar)
        t0 = time.monotonic()
        stamp = lambda: f"{time.monotonic() - t0:6.2f}s"
        for kind in ("speech_started", "speech_stopped", "interrupted", "error", "closed"):
            session.on(kind, lambda ev: print(f"{stamp()}  event {ev['type']}: "
                                              f"{ {k: v for k, v in ev.items() if k not in ('type', 'session_id', 'time')} }"))
        if args.overlay:
            print(f"open this in a browser / OBS browser source, then press Enter:\n  {session.overlay_url()}")
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            await session.ping()  # opens the websocket
        else:
            await session.connect()

        sentences = ["Hello there.", "I am a talking avatar, streamed in real time.", "Ask me anything!"]

        async def barge_in(delay: float) -> None:  # the user starts talking over the avatar
            await asyncio.sleep(delay)
            print(f"{stamp()}  user barged in: interrupt")
            await session.interrupt()

        barge = asyncio.ensure_future(barge_in(args.interrupt_after)) if args.interrupt_after else None
        sources = [wav_tts(args.wav)] if args.wav else [fake_tts(s) for s in sentences]
        for i, source in enumerate(sources):
            sent = 0.0
            async for chunk in source:
                await session.send_audio(chunk, sample_rate=RATE)
                sent += len(chunk) / RATE
            await session.end_speech()  # the sentence is complete: render its tail now
            print(f"{stamp()}  sentence {i + 1}: {sent:.1f} s of audio sent")
        await asyncio.sleep(args.linger)
        if barge is not None:
            barge.cancel()
        if not args.overlay:
            print(f"received {session.frames_received}")
        await session.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="http://127.0.0.1:8080")
    p.add_argument("--api-key", default=None)
    p.add_argument("--avatar", default="default")
    p.add_argument("--wav", type=Path, default=None, help="speak this file as if a TTS produced it")
    p.add_argument("--interrupt-after", type=float, default=None, help="barge in after this many seconds")
    p.add_argument("--overlay", action="store_true", help="show the avatar in a browser instead of receiving it here")
    p.add_argument("--linger", type=float, default=8.0, help="seconds to keep the session after the last sentence")
    args = p.parse_args()
    try:
        asyncio.run(run(args))
    except (LetsTalkError, AvatarClientError) as e:
        print(f"tts_stream: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"tts_stream: error: cannot reach {args.server}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
