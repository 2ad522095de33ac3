"""Drive an avatar from text, as a voice assistant does: sentence by sentence, end of speech, barge-in.

    python client_examples/tts_stream.py                               # the server speaks the text (`say`)
    python client_examples/tts_stream.py --voice fr --text "Bonjour ! Je suis un avatar."
    python client_examples/tts_stream.py --own-tts                     # your TTS streams PCM (`send_audio`)
    python client_examples/tts_stream.py --own-tts --wav answer.wav --interrupt-after 2.5
    python client_examples/tts_stream.py --overlay                     # print a URL for an OBS browser source

Two ways to give the avatar its words:
- `session.say(text, voice=...)`: the server speaks it with its espeak-ng (the voices the bundled model was
  trained to follow; `client.voices()` lists them), a sentence at a time, each `say` after the one before.
- `session.send_audio(chunk, sample_rate, ahead=True)`: your own TTS (Piper, Coqui, a cloud API) streams PCM
  faster than real time; `ahead=True` says so, and the server plays it at its own pace, its pauses whole. Call
  `end_speech()` when a sentence is complete so its last frames render at once. `--own-tts` stands such a TTS in
  with espeak-ng on this machine (`letstalk_rt.tts`), cutting its output into 200 ms chunks produced 4x faster
  than real time; `--wav` speaks a file as if a TTS made it.
Either way `interrupt()` drops what is not yet spoken when the user talks over the avatar. With your own TTS,
`await session.wait_audio_shown()` returns when everything sent has been shown to its end (the answer is over on
screen). The server queues up to ~30 s ahead (`session.max_queued_seconds`) and, for audio sent `ahead`, as much again
waiting on the server; past that, sent audio is refused with `audio_rejected` errors (events), so a TTS that runs
further ahead should pace itself (`say` does). Something must watch the avatar for its clock to run: this script connects over
WebRTC (and just counts frames), or, with --overlay, leaves the watching to a browser page.
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

from letstalk_rt.aio import stop_on_sigterm
from letstalk_rt.client import AvatarClient, AvatarClientError
from letstalk_rt.errors import LetsTalkError

TEXT = "Hello there! I am a talking avatar, streamed in real time. Ask me anything."
CHUNK_S = 0.2


async def own_tts(sentence: str, voice: str) -> AsyncIterator[tuple[np.ndarray, int]]:
    """Stands in for your TTS engine: espeak-ng here, yielding 200 ms chunks 4x faster than real time."""
    from letstalk_rt.tts import Speech

    rate = 22050  # what many TTS engines produce; the server resamples
    pcm = (await asyncio.to_thread(Speech(voice).synthesize, sentence, rate) * 32767).astype(np.int16)
    step = int(rate * CHUNK_S)
    for pos in range(0, len(pcm), step):
        await asyncio.sleep(CHUNK_S / 4)
        yield pcm[pos:pos + step], rate


async def wav_tts(path: Path) -> AsyncIterator[tuple[np.ndarray, int]]:
    from letstalk_rt.media import load_audio

    rate = 24000
    pcm = (load_audio(path, rate) * 32767).astype(np.int16)
    step = int(rate * CHUNK_S)
    for pos in range(0, len(pcm), step):
        await asyncio.sleep(CHUNK_S / 4)
        yield pcm[pos:pos + step], rate


async def run(args: argparse.Namespace) -> dict:
    """Speak `args.text` (or `args.wav`) through a session; returns what was received (frames per kind)."""
    from letstalk_rt.tts import sentences

    async with AvatarClient(args.server, api_key=args.api_key) as client:
        session = await client.start_session(avatar_id=args.avatar)
        t0 = time.monotonic()
        stamp = lambda: f"{time.monotonic() - t0:6.2f}s"
        for kind in ("say", "speech_started", "speech_stopped", "interrupted", "error", "closed"):
            session.on(kind, lambda ev: print(f"{stamp()}  event {ev['type']}: "
                                              f"{ {k: v for k, v in ev.items() if k not in ('type', 'session_id', 'time')} }"))
        if args.overlay:
            print(f"open this in a browser / OBS browser source, then press Enter:\n  {session.overlay_url()}")
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            await session.ping()  # opens the websocket
        else:
            await session.connect()

        async def barge_in(delay: float) -> None:  # the user starts talking over the avatar
            await asyncio.sleep(delay)
            print(f"{stamp()}  user barged in: interrupt")
            await session.interrupt()

        barge = asyncio.ensure_future(barge_in(args.interrupt_after)) if args.interrupt_after else None
        if not args.own_tts:
            for sentence in sentences(args.text):  # one `say` each here; one `say` of the whole text also works
                await session.say(sentence, voice=args.voice)
                print(f"{stamp()}  said {sentence!r}")
        else:
            sources = [wav_tts(args.wav)] if args.wav else [own_tts(s, args.voice) for s in sentences(args.text)]
            for i, source in enumerate(sources):
                sent = 0.0
                async for chunk, rate in source:
                    await session.send_audio(chunk, sample_rate=rate, ahead=True)
                    sent += len(chunk) / rate
                await session.end_speech()  # the sentence is complete: render its tail now
                print(f"{stamp()}  sentence {i + 1}: {sent:.1f} s of audio sent")
            # the answer is over on screen once every message sent has been shown (a turn of a voice agent ends here)
            # or dropped by the barge-in; the avatar's clock runs while something watches it (here, or the overlay)
            shown = await session.wait_audio_shown(timeout=60)
            print(f"{stamp()}  {'all shown' if shown else 'not all shown in 60 s'} (audio_shown)")
        await asyncio.sleep(args.linger)
        if barge is not None:
            barge.cancel()
        received = session.frames_received
        if not args.overlay:
            print(f"received {received}")
        await session.close()
        return received


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="http://127.0.0.1:8080")
    p.add_argument("--api-key", default=None)
    p.add_argument("--avatar", default="default")
    p.add_argument("--text", default=TEXT, help="what the avatar says, a sentence at a time")
    p.add_argument("--voice", default="en-us", help="an espeak-ng voice (the server's: GET /v1/voices), e.g. fr, "
                   "en-us+f3")
    p.add_argument("--own-tts", action="store_true", help="synthesise here and stream PCM, as your own TTS would")
    p.add_argument("--wav", type=Path, default=None, help="with --own-tts: speak this file as if a TTS produced it")
    p.add_argument("--interrupt-after", type=float, default=None, help="barge in after this many seconds")
    p.add_argument("--overlay", action="store_true", help="show the avatar in a browser instead of receiving it here")
    p.add_argument("--linger", type=float, default=8.0, help="seconds to keep the session after the last sentence")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    try:
        with stop_on_sigterm():  # `kill` stops it as Ctrl-C does: the server's session closed, nothing half-written
            asyncio.run(run(args))
    except (LetsTalkError, AvatarClientError) as e:
        print(f"tts_stream: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"tts_stream: error: cannot reach {args.server}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or a `kill`: the session was closed on the way out
        print("tts_stream: stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
