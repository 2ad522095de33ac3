"""What a live stream to a streaming server costs a live session, through a running `letstalk serve --broadcast-to
tcp://127.0.0.1` (docs/benchmarks.md).

    python scripts/broadcast_cost.py [--broadcast] [--server http://127.0.0.1:8080]

A live session through WebRTC (the SDK sends the bundled speech, looped, for 40 s at real-time pace over its websocket
and reads both tracks); with --broadcast, the session is also streamed 5 s in, as MPEG-TS over TCP to a sink in this
process that reads and drops the bytes (a real ingest server is on another machine). Prints the server's figures of
the live session (speech-to-screen latency, held frames), the broadcast's state and its process's CPU time.
"""

import argparse
import asyncio
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from letstalk_rt.client import AvatarClient
from letstalk_rt.media import load_audio

SPEECH = Path(__file__).resolve().parent.parent / "letstalk_rt" / "assets" / "speech.ogg"


def sink() -> tuple[str, list[int]]:
    """A TCP server that reads and drops what it is sent; its URL and the bytes it got."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    got = [0]

    def run():
        conn, _ = server.accept()
        while data := conn.recv(1 << 16):
            got[0] += len(data)

    threading.Thread(target=run, daemon=True).start()
    return f"tcp://127.0.0.1:{server.getsockname()[1]}", got


def child_cpu_s() -> float | None:
    """CPU seconds of the broadcast's process (`python -m letstalk_rt.broadcaster`) so far."""
    pids = subprocess.run(["pgrep", "-f", "letstalk_rt.broadcaster"], capture_output=True, text=True).stdout.split()
    if not pids:
        return None
    fields = Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


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
        cpu = got = None

        async def broadcast():
            nonlocal cpu, got
            await asyncio.sleep(5)
            url, got = sink()
            print("broadcast:", await session.broadcast(url))
            await asyncio.sleep(30)
            cpu = child_cpu_s()

        task = asyncio.ensure_future(broadcast()) if args.broadcast else None
        start = time.monotonic()
        for i, pos in enumerate(range(0, len(speech), 320)):  # 20 ms chunks on an absolute schedule
            await asyncio.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
            await session.send_audio(speech[pos:pos + 320], sample_rate=16000)
        await session.end_speech()
        await asyncio.sleep(1)
        if task is not None:
            await task
        stats = (await session.stats())["stats"]
        if task is not None:
            print(f"broadcast: {stats['broadcast']}; its process used {cpu:.2f} s of CPU in its first 30 s; "
                  f"{got[0] * 8 / 1000 / stats['broadcast']['seconds']:.0f} kb/s sent")
        print(f"live: latency p50/p95 {stats['latency_ms_p50']:.0f}/{stats['latency_ms_p95']:.0f} ms, "
              f"held frames {stats['fillers']}, ticks {stats['ticks']}")
        await session.close()
        for r in readers:
            r.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:8080")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--broadcast", action="store_true")
    asyncio.run(main(parser.parse_args()))
