"""A live session beside a render or a live stream, through a running `letstalk serve` (docs/benchmarks.md).

    python scripts/beside_live.py [--render | --broadcast [N]] [--full-frame PX] [--portrait IMAGE]
                                  [--server http://127.0.0.1:8080]

A live session through WebRTC: the SDK sends the bundled speech, looped, for 40 s at real-time pace over its
websocket and reads both tracks. With --render (a server started with --recordings-dir), a render of the bundled
speech is posted 10 s in. With --broadcast (a server started with --broadcast-to tcp://127.0.0.1), the live session
is also streamed from 5 s in, as MPEG-TS over TCP to N sinks in this process that drop the bytes (N destinations at
once, as YouTube and Twitch; a real ingest server is on another machine). Prints the server's figures of the live
session (speech-to-screen latency, held frames), and the render's time or the broadcasts' states and bitrates, and
the CPU time of their processes (the one encoding all of them, and each one sending).
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
    """A TCP server that reads and drops what it is sent: its URL, and the bytes it got so far."""
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


def broadcaster_cpu_s() -> dict[str, list[float]]:
    """CPU seconds so far of the broadcasts' processes (`python -m letstalk_rt.broadcaster encode|send`), by role."""
    lines = subprocess.run(["pgrep", "-af", "letstalk_rt.broadcaster"], capture_output=True, text=True).stdout
    cpu: dict[str, list[float]] = {"encode": [], "send": []}
    for pid, _, command in (line.partition(" ") for line in lines.splitlines()):
        role = "encode" if "broadcaster encode" in command else "send"
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu[role].append((int(fields[11]) + int(fields[12])) / 100)  # utime + stime, in clock ticks
    return cpu


async def main(args: argparse.Namespace) -> None:
    speech = np.tile(load_audio(SPEECH, 16000), 4)[: 40 * 16000]
    async with AvatarClient(args.server, api_key=args.api_key) as client:
        session = await client.start_session(args.portrait, avatar_id=None if args.portrait else "default",
                                             full_frame=args.full_frame or None)
        await session.connect()
        video = session.info["video"]
        print(f"live session: {video.get('width')}x{video.get('height')} at {video.get('fps')} fps", flush=True)

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

        sent, cpu = [], {}

        async def broadcast():
            nonlocal cpu
            await asyncio.sleep(5)
            for _ in range(args.broadcast):
                url, got = sink()
                sent.append(got)
                print("broadcast:", await session.broadcast(url), flush=True)
            await asyncio.sleep(30)
            cpu = broadcaster_cpu_s()

        beside = asyncio.ensure_future(render() if args.render else broadcast()) \
            if args.render or args.broadcast else None
        start = time.monotonic()
        for i, pos in enumerate(range(0, len(speech), 320)):  # 20 ms chunks on an absolute schedule
            await asyncio.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
            await session.send_audio(speech[pos:pos + 320], sample_rate=16000)
        await session.end_speech()
        await asyncio.sleep(1)
        if args.broadcast:
            await beside
        stats = (await session.stats())["stats"]
        for state, got in zip(stats.get("broadcasts", []), sent):
            print(f"broadcast: {state}; {got[0] * 8 / 1000 / state['seconds']:.0f} kb/s sent", flush=True)
        for role, used in cpu.items():  # (one encode for all of them; a sending process each)
            print(f"broadcast {role} processes: {len(used)}, CPU s in their first 30 s: "
                  f"{', '.join(f'{u:.2f}' for u in used)}", flush=True)
        print("live:", {k: stats[k] for k in ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "fillers",
                                              "ticks")}, flush=True)
        await session.close()
        for task in readers:
            task.cancel()
        if args.render:
            await beside


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    beside = p.add_mutually_exclusive_group()
    beside.add_argument("--render", action="store_true", help="post a render 10 s in")
    beside.add_argument("--broadcast", type=int, nargs="?", const=1, default=0, metavar="N",
                        help="stream the live session to N TCP sinks (default 1) 5 s in")
    p.add_argument("--server", default="http://127.0.0.1:8080")
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", default="render.mp4", help="where the render's MP4 goes")
    p.add_argument("--full-frame", type=int, default=0, metavar="PX",
                   help="the live session's frames the whole photo, fit to PX (default: the face crop)")
    p.add_argument("--portrait", default=None, metavar="IMAGE",
                   help="the live session's photo (default: the server's default avatar, a 320-px photo)")
    asyncio.run(main(p.parse_args()))
