"""Lip sync as a browser plays it: the avatar's picture against its sound at Chromium's playout, second by second.

    python scripts/browser_sync.py [--url URL] [--seconds 60] [--json out.json]

`letstalk bench --webrtc` measures the offset where the SDK hands frames and audio over and where they come off the
wire; a browser then holds each in a buffer of its own (its audio jitter buffer, NetEq, ~30-60 ms; its video's, a few
ms) and lines the two up itself, from the RTP timestamps and the RTCP sender reports the server's senders send. This
reads what it plays: each second, `getStats()` gives each inbound stream's `estimatedPlayoutTimestamp`, the sender's
clock time of the media playing now; the video's minus the audio's is how far the picture on screen is ahead of the
sound heard (positive: the sound comes after its picture). Also each second's jitter buffer delay of each, and the
video buffer the page asked for (`jitterBufferTarget`, app.js's VIDEO_BUFFER_MS).

The index page (`?autostart=1&source=mic`) in headless Chromium (Debian's, through playwright, as the tests drive it),
its fake microphone playing the bundled speech, against `--url` (a running server) or a server started here on the
bundled model. Prints one JSON line a second, then a summary: when the offset settled (the first second from which it
stays within +-20 ms), its median and largest size after that, and each minute's largest. The figures of 2026-12-07
are in docs/benchmarks.md ("Lip sync as the browser plays it").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETTLED_MS = 20.0  # the offset counts as settled once it stays within this

STATS_JS = """async () => {
  const pc = window.letstalk?.conn?.pc;
  if (!pc) return null;
  const out = {};
  (await pc.getStats()).forEach((r) => {
    if (r.type === 'inbound-rtp') out[r.kind] = {playout: r.estimatedPlayoutTimestamp ?? null,
      delay: r.jitterBufferDelay ?? 0, emitted: r.jitterBufferEmittedCount ?? 0};
  });
  const video = pc.getReceivers().find((r) => r.track?.kind === 'video');
  if (out.video) out.video.target = video?.jitterBufferTarget ?? null;  // what the page asked of its buffer
  return out;
}"""


def summary(rows: list[dict]) -> dict:
    """The offsets read (`rows`, one a second) -> when it settled, and its size after that, overall and by minute."""
    offsets = np.array([r["offset_ms"] for r in rows if r["offset_ms"] is not None], float)
    times = np.array([r["t"] for r in rows if r["offset_ms"] is not None], float)
    if not len(offsets):
        return {"samples": 0}
    outside = np.flatnonzero(np.abs(offsets) > SETTLED_MS)
    settled = 0 if not len(outside) else outside[-1] + 1
    after = offsets[settled:]
    minute = (times // 60).astype(int)
    minutes = [float(np.abs(offsets[minute == m]).max()) for m in np.unique(minute)]
    return {"samples": len(offsets), "settled_after_s": round(float(times[settled]), 1) if len(after) else None,
            "median_ms_after": round(float(np.median(after)), 1) if len(after) else None,
            "abs_max_ms_after": round(float(np.abs(after).max()), 1) if len(after) else None,
            "first_abs_max_ms": round(float(np.abs(offsets[:max(settled, 1)]).max()), 1),
            "abs_max_ms_by_minute": [round(m, 1) for m in minutes]}


async def measure(url: str, seconds: float, workdir: Path, out=print) -> dict:
    from playwright.async_api import async_playwright

    from letstalk_rt.media import load_audio

    speech = np.asarray(load_audio(Path(__file__).resolve().parent.parent / "letstalk_rt" / "assets" / "speech.ogg"))
    wav = workdir / "speech.wav"  # Chromium's fake microphone plays a WAV file, looped
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.clip(speech, -1, 1) * 32767).astype("<i2").tobytes())
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
            "--autoplay-policy=no-user-gesture-required", "--disable-features=WebRtcHideLocalIpsWithMdns"]
    rows: list[dict] = []
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(str(workdir / "profile"), headless=True, args=args,
                                                              executable_path="/usr/bin/chromium")
        try:
            page = await context.new_page()
            await page.goto(f"{url}/?autostart=1&source=mic")
            await page.wait_for_function("window.letstalk?.frames?.frames > 0", timeout=60000)
            start = asyncio.get_running_loop().time()
            last = None
            while (t := asyncio.get_running_loop().time() - start) < seconds:
                stats = await page.evaluate(STATS_JS)
                audio, video = (stats or {}).get("audio"), (stats or {}).get("video")
                if audio and video:
                    row = {"t": round(t, 2), "offset_ms": video["playout"] - audio["playout"]
                           if audio["playout"] and video["playout"] else None, "video_target_ms": video["target"]}
                    if last is not None:  # this second's jitter buffer delay of each (ms a sample / a frame)
                        for kind, now, then in (("audio", audio, last["audio"]), ("video", video, last["video"])):
                            n = now["emitted"] - then["emitted"]
                            held = 1000 * (now["delay"] - then["delay"])
                            row[f"{kind}_buffer_ms"] = round(held / n, 1) if n else None
                    rows.append(row)
                    out(json.dumps(row))
                    last = stats
                await asyncio.sleep(1.0)
        finally:
            await context.close()
    result = summary(rows)
    out(json.dumps({"summary": result}))
    return {"rows": rows, "summary": result}


@contextlib.asynccontextmanager
async def bundled_server():
    """The server on 127.0.0.1 around an engine on the bundled model (as `letstalk serve` starts it)."""
    from letstalk_rt.bench_webrtc import local_server
    from letstalk_rt.cli import ASSETS
    from letstalk_rt.pipeline import LetsTalkPipeline
    from letstalk_rt.stream import EngineConfig, StreamEngine

    engine = await StreamEngine(LetsTalkPipeline.from_pretrained(ASSETS / "default_model"), EngineConfig()).start()
    try:
        async with local_server(engine) as (url, _):
            yield url
    finally:
        await engine.stop()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: one started here on the bundled model)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long to read the offset (default 60)")
    p.add_argument("--json", type=Path, default=None, help="also write every second's figures and the summary here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            result = await measure(args.url.rstrip("/"), args.seconds, Path(tmp))
        else:
            async with bundled_server() as url:
                result = await measure(url, args.seconds, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
