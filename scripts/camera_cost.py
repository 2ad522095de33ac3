"""What showing a live session on local devices costs (`letstalk camera`, `letstalk_rt.devices`): the bundled speech played in
real time through the engine, its frames read on the session's clock, alone and then sent to a virtual camera scaled
to --size (a backend that takes the frames in place of pyvirtualcam's device: the scaling and the hand-over are what is
timed) and to an audio device (--speaker, optional; e.g. an ALSA file device). Prints a markdown row per run.

    python scripts/camera_cost.py --seconds 20 [--size 512] [--speaker DEVICE] [--portrait P] [--full-frame PX]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from letstalk_rt.media import load_image  # noqa: E402
from letstalk_rt.pipeline import LetsTalkPipeline  # noqa: E402
from letstalk_rt.stream import EngineConfig, FileSource, StreamEngine  # noqa: E402
from letstalk_rt.devices import AudioOutput, VirtualCamera, show_on_devices  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "letstalk_rt" / "assets"


class NullCamera:
    """Takes the scaled frames as pyvirtualcam's camera would, and counts them (the scaling is VirtualCamera's)."""

    device = "null"

    def __init__(self) -> None:
        self.sent = 0

    def send(self, frame) -> None:
        self.sent += 1

    def close(self) -> None:
        pass


async def one_run(pipe, image, seconds: float, size: int | None, speaker: str | None, full_frame: int) -> dict:
    async with StreamEngine(pipe, EngineConfig(max_sessions=1, max_batch=1)) as engine:
        session = await engine.open_session(image, full_frame=full_frame)
        feeder = asyncio.create_task(FileSource(ASSETS / "speech.ogg", realtime=True).run(session))
        camera = VirtualCamera(session.frame_size, pipe.fps, size=size, backend=NullCamera()) if size else None
        voice = AudioOutput(speaker, session.sample_rate) if speaker else None
        cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        shown = await show_on_devices(session, camera, voice, ticks=int(seconds * pipe.fps))
        took, cpu1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF)
        feeder.cancel()
        scale_ms = None
        if camera is not None:  # what the camera's thread does with one frame, timed alone
            frame = session.player.last.video
            start = time.perf_counter()
            for _ in range(250):
                camera._show(frame)
            scale_ms = (time.perf_counter() - start) / 250 * 1000
        for device in (camera, voice):
            if device is not None:
                device.close()
        stats = session.stats()
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    return {"devices": " + ".join(filter(None, [f"camera {camera.width}x{camera.height}" if camera else "",
                                                 f"speaker {voice.name}" if voice else ""])) or "none",
            "shown": shown, "p50": stats["latency_ms_p50"], "p95": stats["latency_ms_p95"], "held": stats["fillers"],
            "draws": pipe.noise_draws, "scale_ms": scale_ms,
            "cpu_per_s": cpu / took, "dropped": sum(d.dropped for d in (camera, voice) if d is not None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--size", type=int, default=512, help="the camera's longer side")
    p.add_argument("--speaker", default=None, help="an output device (sounddevice name or number); default: none")
    p.add_argument("--portrait", type=Path, default=ASSETS / "portrait.png")
    p.add_argument("--full-frame", type=int, default=0, metavar="PX", help="the whole photo, as `letstalk camera` "
                   "shows it by default (0: the face crop)")
    args = p.parse_args()
    pipe = LetsTalkPipeline.from_pretrained(ASSETS / "default_model")
    image = load_image(args.portrait)
    print("| devices | ticks | latency p50 / p95 (ms) | held | noise draws at the end | process CPU (cores) | "
          "device ticks dropped | camera's scaling and hand-over, a frame (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for size, speaker in ((None, None), (args.size, args.speaker)):
        r = asyncio.run(one_run(pipe, image, args.seconds, size, speaker, args.full_frame))
        scale = "-" if r["scale_ms"] is None else f"{r['scale_ms']:.2f}"
        print(f"| {r['devices']} | {r['shown']} | {r['p50']:.0f} / {r['p95']:.0f} | {r['held']} | {r['draws']} | "
              f"{r['cpu_per_s']:.2f} | {r['dropped']} | {scale} |", flush=True)


if __name__ == "__main__":
    main()
