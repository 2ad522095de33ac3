"""What each extra viewer of a session (POST /v1/sessions/{id}/viewers) costs the server, on the bundled model.

    python scripts/viewer_cost.py [--viewers 0,1,2,4] [--seconds 20] [--full-frame 0] [--threads 0] [--device cpu]

Starts `python -m letstalk_rt.server` in a process of its own, opens one session (the bundled avatar; `--full-frame
PX`: the whole photo at PX) whose owner connects with the SDK and sends speech in real time, then, for each count of `--viewers`,
connects that many SDK viewers (`connect(viewer=True)`) and reads for `--seconds`: the server process's CPU (user +
system, % of one core, from /proc) and this process's, the ticks the session showed and how many of them were held (a
late window), the engine's threads and noise draws then, and the frames each viewer received per second. The viewers and the owner run in this process (they decode what they get),
so on a small machine they take cores from the server as a remote viewer would not. The figures are in
docs/benchmarks.md: "Peers of a session share one encode" (2026-12-02), and "Viewers of one session" (2026-11-30,
before a session's peers shared one video and one Opus encode).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from letstalk_rt.client import AvatarClient  # noqa: E402
from letstalk_rt.media import load_audio  # noqa: E402

SPEECH = ROOT / "letstalk_rt" / "assets" / "speech.ogg"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def speak(session, pcm: np.ndarray) -> None:
    """The bundled speech, looped, in 20 ms chunks at real-time pace."""
    start, i = time.monotonic(), 0
    while True:
        pos = (i * 320) % (len(pcm) - 320)
        await session.send_audio(pcm[pos:pos + 320], sample_rate=16000)
        i += 1
        await asyncio.sleep(max(0.0, start + i * 0.02 - time.monotonic()))


async def count_frames(session, counter: list[int]) -> None:
    async for _ in session.video_frames():
        counter[0] += 1


async def measure(url: str, pid: int, args: argparse.Namespace) -> None:
    pcm = load_audio(SPEECH)
    async with AvatarClient(url) as owner_client, AvatarClient(url) as viewer_client:
        owner = await owner_client.start_session(full_frame=args.full_frame or None)
        await owner.connect()
        tasks = [asyncio.ensure_future(speak(owner, pcm)), asyncio.ensure_future(count_frames(owner, [0]))]
        viewers: list = []
        counters: list[list[int]] = []
        await asyncio.sleep(5.0)  # past the start
        for count in args.viewers:
            while len(viewers) < count:
                viewer = await viewer_client.session(owner.id, owner.token)
                await viewer.connect(viewer=True)
                counters.append([0])
                tasks.append(asyncio.ensure_future(count_frames(viewer, counters[-1])))
                viewers.append(viewer)
            await asyncio.sleep(2.0)  # settle
            before = [c[0] for c in counters]
            state0 = (await owner.stats())["stats"]
            cpu0, own0, t0 = cpu_seconds(pid), time.process_time(), time.monotonic()
            await asyncio.sleep(args.seconds)
            cpu1, own1, t1 = cpu_seconds(pid), time.process_time(), time.monotonic()
            state1 = (await owner.stats())["stats"]
            ticks = state1["ticks"] - state0["ticks"]
            held = state1["fillers"] - state0["fillers"]
            rates = [(c[0] - b) / (t1 - t0) for c, b in zip(counters, before)]
            engine = state1["engine"]
            print(f"viewers {count}: server CPU {100 * (cpu1 - cpu0) / (t1 - t0):5.1f} % of a core (the peers here "
                  f"{100 * (own1 - own0) / (t1 - t0):5.1f} %), ticks {ticks / (t1 - t0):.1f}/s, held {held} "
                  f"({100 * held / max(ticks, 1):.1f} %), engine {engine['torch_threads']} thread(s) "
                  f"{engine['noise_draws']} draw(s), viewers' frames/s {', '.join(f'{r:.1f}' for r in rates) or '-'}",
                  flush=True)
        for task in tasks:
            task.cancel()
        for viewer in viewers:
            await viewer.close()
        await owner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", default="0,1,2,4", help="viewer counts, in order (default 0,1,2,4)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--full-frame", type=int, default=0, help="the session's full_frame (0: the face crop)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="the server's --threads (default 0: its own choice)")
    parser.add_argument("--server-log", type=Path, default=None, help="write the server's log to this file")
    args = parser.parse_args()
    args.viewers = [int(v) for v in args.viewers.split(",")]
    proc = subprocess.Popen([sys.executable, "-m", "letstalk_rt.server", "--port", "0", "--device", args.device,
                             "--max-viewers", str(max(args.viewers)), "--threads", str(args.threads)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        while url is None:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise SystemExit("the server exited before listening")
            if m := re.search(r"letstalk serve: (http://\S+)/ ", line):
                url = m.group(1)
        # the server logs on: read its stderr to the end (into --server-log), or a full pipe would stall it
        log = open(args.server_log, "w") if args.server_log else None  # noqa: SIM115 - the thread's, to the end
        threading.Thread(target=lambda: [log and (log.write(line), log.flush()) for line in proc.stderr],
                         daemon=True).start()
        asyncio.run(measure(url, proc.pid, args))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
