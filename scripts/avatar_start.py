"""How much sooner a session starts on an avatar uploaded once (POST /v1/avatars, then `avatar_id`) than on a portrait
uploaded with each session, through the server and the SDK on the bundled model.

    python scripts/avatar_start.py [--portrait PHOTO] [--side 1600] [--runs 5] [--device cpu]

The portrait (default: the bundled one) is scaled to `--side` px and sent as a JPEG, the size of a phone photo. Each
run starts a session each way (alternating which goes first) and reads: the time to the server's answer (201), and to
the first video frame received over WebRTC after `connect()`. The figures of 2026-11-30 are in docs/benchmarks.md
("Avatars uploaded once").
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from letstalk_rt.bench_webrtc import local_server  # noqa: E402
from letstalk_rt.cli import ASSETS  # noqa: E402
from letstalk_rt.client import AvatarClient  # noqa: E402
from letstalk_rt.pipeline import LetsTalkPipeline  # noqa: E402
from letstalk_rt.stream import EngineConfig, StreamEngine  # noqa: E402


def photo_bytes(path: Path, side: int) -> bytes:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    img = img.resize((side, round(side * img.height / img.width)), Image.LANCZOS)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


async def one_start(client: AvatarClient, **how) -> tuple[float, float]:
    """(s to the 201, s to the first video frame) of a session started `how`; the session is closed after."""
    t0 = time.perf_counter()
    session = await client.start_session(**how)
    answered = time.perf_counter() - t0
    try:
        await session.connect()
        async for _ in session.video_frames():
            break
        return answered, time.perf_counter() - t0
    finally:
        await session.close()


async def main(args: argparse.Namespace) -> None:
    pipe = LetsTalkPipeline.from_pretrained(None, device=args.device)
    photo = photo_bytes(args.portrait, args.side)
    async with StreamEngine(pipe, EngineConfig(max_sessions=2, max_batch=2)) as engine:
        async with local_server(engine) as (url, _app), AvatarClient(url) as client:
            t0 = time.perf_counter()
            made = await client.create_avatar(photo, name="benchmark")
            print(f"POST /v1/avatars: {1000 * (time.perf_counter() - t0):.0f} ms ({len(photo) // 1024} kB JPEG, "
                  f"{args.side} px)", flush=True)
            got: dict[str, list[tuple[float, float]]] = {"upload": [], "avatar": []}
            for run in range(args.runs):
                ways = [("upload", {"portrait": photo}), ("avatar", {"avatar_id": made["id"]})]
                for name, how in ways if run % 2 == 0 else ways[::-1]:
                    got[name].append(await one_start(client, **how))
                    await asyncio.sleep(0.5)
    for name, runs in got.items():
        answered = statistics.median(a for a, _ in runs) * 1000
        first = statistics.median(f for _, f in runs) * 1000
        print(f"{name:>6}: 201 after {answered:6.0f} ms, first frame after {first:6.0f} ms (median of {len(runs)}; "
              f"each: {', '.join(f'{1000 * a:.0f}/{1000 * f:.0f}' for a, f in runs)})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--portrait", type=Path, default=ASSETS / "portrait.png")
    parser.add_argument("--side", type=int, default=1600, help="the photo's width in px (default 1600)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    asyncio.run(main(parser.parse_args()))
