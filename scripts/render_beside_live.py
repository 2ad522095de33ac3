"""A live session beside a render, through a running `letstalk serve --recordings-dir DIR` (docs/benchmarks.md).

    python scripts/render_beside_live.py [--render] [--server http://127.0.0.1:8080]

A live session through WebRTC (the SDK sends the bundled speech, looped, for 40 s at real-time pace over its websocket
and reads both tracks); with --render, a render of the bundled speech is posted 10 s in. Prints the server's figures
of the live session (speech-to-screen latency, held frames) and the render's time.
"""

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np

from letstalk_rt.client import AvatarClient
from letstalk_rt.media import load_audio

SPEECH = Path(__file__).resolve().parent.parent / "letstalk_rt" / "assets" / "speech.ogg"


async def main(args: argparse.Namespace) -> None:
    speech = np.tile(load_audio(SPEECH, 16000), 4)[: 40 * 16000]
    async with AvatarClient(args.server, api_key=args.api_key) as client:
        session = await client.start_session(avatar_id="default")
        await session.connect()

        async def drain(frames):
            async for _ in frames:
                pass

        readers = [asyncio.ensure_future(drain(session.timed_video_frames())),
                   asyncio.ensure_future(drain(session.audio_frames()))]

        async def render():
            await asyncio.sleep(10)
            t = time.monotonic()
            state = await client.render(args.out, audio=SPEECH, poll_s=0.1)
            print(f"render: {state['speech_seconds']} s of speech, {state['rendered_seconds']} s of video, "
                  f"{time.monotonic() - t:.2f} s to the MP4 downloaded", flush=True)

        rendering = asyncio.ensure_future(render()) if args.render else None
        start = time.monotonic()
        for i, pos in enumerate(range(0, len(speech), 320)):  # 20 ms chunks on an absolute schedule
            await asyncio.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
            await session.send_audio(speech[pos:pos + 320], sample_rate=16000)
        await session.end_speech()
        await asyncio.sleep(1)
        stats = (await session.stats())["stats"]
        print("live:", {k: stats[k] for k in ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "fillers",
                                              "ticks")}, flush=True)
        await session.close()
        for task in readers:
            task.cancel()
        if rendering is not None:
            await rendering


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--render", action="store_true", help="post a render 10 s in")
    p.add_argument("--server", default="http://127.0.0.1:8080")
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", default="render.mp4", help="where the render's MP4 goes")
    asyncio.run(main(p.parse_args()))
