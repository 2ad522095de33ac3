"""How long an SDK session's move to another server takes, and the largest gap it leaves in the frames that arrive, on
the bundled model: server A drains, the app moves its session to server B (`session.move`), as in a rolling update.

    python scripts/move_gap.py [--runs 4] [--no-motion]

Each run: a session on A watched over WebRTC, A drained once 50 frames came, the move timed by its `moved` event
(`after_s`), the frames' arrival times read until 50 more came from B. `--no-motion`: the move does not carry the old
session's motion (what moves did before), for the comparison. The first run is the second server's first window ever;
docs/server.md ("Moving to a new session") leaves it out. The figures of 2026-12-07 are there.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from letstalk_rt.bench_webrtc import local_server  # noqa: E402
from letstalk_rt.client import AvatarClient, AvatarSession  # noqa: E402
from letstalk_rt.pipeline import LetsTalkPipeline  # noqa: E402
from letstalk_rt.stream import EngineConfig, StreamEngine  # noqa: E402


async def until(predicate, timeout: float = 30.0) -> None:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("timed out")
        await asyncio.sleep(0.002)


async def once(engine_a: StreamEngine, engine_b: StreamEngine) -> tuple[float, bool, float]:
    """(the switch's seconds, whether the motion was carried, the largest gap between frames' arrivals)."""
    async with local_server(engine_a) as (url_a, app_a), local_server(engine_b) as (url_b, _), \
            AvatarClient(url_a) as client_a, AvatarClient(url_b) as client_b:
        from letstalk_rt.server.app import MANAGER

        session = await client_a.start_session(seed=3)
        seen: list[dict] = []
        session.on("*", seen.append)
        session.on("session_ending", lambda e: session.move(client_b, reason=e["reason"]))
        await session.connect(move=False)
        arrivals: list[float] = []

        async def read(iterator, arrived: list | None = None) -> None:
            async for _ in iterator:
                if arrived is not None:
                    arrived.append(time.monotonic())

        readers = [asyncio.ensure_future(read(session.video_frames(), arrivals)),
                   asyncio.ensure_future(read(session.audio_frames()))]  # (the audio is read too, as an app does)
        await until(lambda: len(arrivals) >= 50)
        drain = asyncio.ensure_future(app_a[MANAGER].drain(30))
        await until(lambda: any(e["type"] == "moved" for e in seen))
        n = len(arrivals)
        await until(lambda: len(arrivals) >= n + 50)
        await drain
        moved = next(e for e in seen if e["type"] == "moved")
        await session.close()
        await asyncio.gather(*readers, return_exceptions=True)
        return moved["after_s"], moved["motion"], max(b - a for a, b in zip(arrivals, arrivals[1:]))


async def main(runs: int) -> None:
    engines = [StreamEngine(LetsTalkPipeline.from_pretrained(), EngineConfig(warmup=False)) for _ in range(2)]
    for engine in engines:
        await engine.start()
    try:
        for i in range(runs):
            after_s, motion, gap = await once(*engines)
            print(f"run {i + 1}: switch {after_s * 1000:.0f} ms, motion carried {motion}, largest frame gap "
                  f"{gap * 1000:.0f} ms", flush=True)
    finally:
        for engine in engines:
            await engine.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--no-motion", action="store_true", help="moves do not carry the old session's motion")
    args = parser.parse_args()
    if args.no_motion:
        async def without(self, *args) -> bool:
            return False

        AvatarSession._carry_motion = without
    asyncio.run(main(args.runs))
