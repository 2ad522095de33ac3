"""Lip sync as a browser plays it: the avatar's picture against its sound at the browser's playout, second by second.

    python scripts/browser_sync.py [--url URL] [--seconds 60] [--browser chromium|firefox] [--speech mic|say]
                                   [--loss PERCENT] [--jitter MS] [--no-fec] [--json out.json]

`letstalk bench --webrtc` measures the offset where the SDK hands frames and audio over and where they come off the
wire; a browser then holds each in a buffer of its own (its audio jitter buffer, NetEq, ~30-60 ms; its video's, a few
ms) and lines the two up itself, from the RTP timestamps and the RTCP sender reports the server's senders send. This
reads what it plays: each second, `getStats()` gives each inbound stream's `estimatedPlayoutTimestamp`, the sender's
clock time of the media playing now; the video's minus the audio's is how far the picture on screen is ahead of the
sound heard (positive: the sound comes after its picture). Also each second's jitter buffer delay of each, and the
video buffer the page asked for (`jitterBufferTarget`, app.js's VIDEO_BUFFER_MS).

The index page (`?autostart=1`) in headless Chromium (Debian's, through playwright, as the tests drive it) or Firefox
(Debian's firefox-esr, over WebDriver BiDi as tests/test_firefox.py drives it: a checkout set up with `--dev`), against
`--url` (a running server) or a server started here on the bundled model. What the avatar says (`--speech`): what
the page's microphone hears (`mic`: Chromium's fake one plays the bundled speech; Firefox's is a tone), or a long text
the server speaks (`say`: espeak-ng, the page's microphone off; Firefox's default). Prints one JSON line a second, then
a summary: when the offset settled (the first second from which it stays within +-20 ms), its median and largest size
after that, and each minute's largest; and what the browser counted of a lossy link: the video's freezes
(`freezeCount`, `totalFreezesDuration`), the frames it dropped, the packets it lost and asked for again (NACK) or asked
a key frame for (PLI), the share of its sound it concealed (and of that, what it concealed as silence).

`--loss P` (a server started here): the server's UDP sockets lose P % of the RTP packets each way, at random (seeded),
the avatar's to the browser and the browser's microphone to the server; RTCP, STUN and DTLS pass. `--jitter MS`: they
hold each RTP packet a random 0 to MS ms, each way (packets overtake each other). This machine has no
netem; the loss is at the sockets of the server's process, under SRTP, where a lossy Wi-Fi or cellular link loses them.
`--no-fec`: the server sends its sound as it did before in-band FEC (aiortc's own encoder), to compare.
The figures of 2026-12-07 and 2026-12-08 are in docs/benchmarks.md ("Lip sync as the browser plays it", "A lost
packet no longer delays the rest of the call", "The browser on a lossy link", "Firefox").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import urllib.parse
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
      delay: r.jitterBufferDelay ?? 0, emitted: r.jitterBufferEmittedCount ?? 0, lost: r.packetsLost ?? 0,
      received: r.packetsReceived ?? 0, nacks: r.nackCount ?? 0, plis: r.pliCount ?? 0,
      freezes: r.freezeCount ?? 0, frozen_s: r.totalFreezesDuration ?? 0, decoded: r.framesDecoded ?? 0,
      dropped: r.framesDropped ?? 0, concealed: r.concealedSamples ?? 0,
      silent: r.silentConcealedSamples ?? 0, samples: r.totalSamplesReceived ?? 0};
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


@contextlib.contextmanager
def impaired_sockets(percent: float = 0.0, jitter_ms: float = 0.0, seed: int = 0):
    """While open, the UDP sockets of this process's ICE connections (aioice's) lose `percent` % of the RTP packets
    each way, and hold each other RTP packet a random 0 to `jitter_ms` ms (uniform: packets overtake each other as on
    a jittery link), drawn at random (seeded). Yields {"sent": n, "received": n} lost."""
    import random

    from aioice.ice import StunProtocol

    from letstalk_rt.rtc import is_rtp

    lost = {"sent": 0, "received": 0}
    draw = random.Random(seed).random
    send, received = StunProtocol.send_data, StunProtocol.datagram_received

    def held() -> float:
        return draw() * jitter_ms / 1000

    async def send_later(self, data, addr):
        await asyncio.sleep(held())
        if self.transport is not None and not self.transport.is_closing():  # (a connection closed meanwhile)
            await send(self, data, addr)

    def receive_later(self, data, addr):
        if self.transport is not None and not self.transport.is_closing():
            received(self, data, addr)

    async def send_data(self, data, addr):
        if is_rtp(data) and draw() * 100 < percent:
            lost["sent"] += 1
        elif is_rtp(data) and jitter_ms:
            asyncio.ensure_future(send_later(self, data, addr))
        else:
            await send(self, data, addr)

    def datagram_received(self, data, addr):
        if is_rtp(data) and draw() * 100 < percent:
            lost["received"] += 1
        elif is_rtp(data) and jitter_ms:
            asyncio.get_running_loop().call_later(held(), receive_later, self, data, addr)
        else:
            received(self, data, addr)

    if percent or jitter_ms:
        StunProtocol.send_data, StunProtocol.datagram_received = send_data, datagram_received
    try:
        yield lost
    finally:
        StunProtocol.send_data, StunProtocol.datagram_received = send, received


@contextlib.contextmanager
def without_fec(really: bool = True):
    """While open (`really`), sessions encode their sound as aiortc's own Opus encoder does (CELT, no in-band FEC):
    what the server sent before `rtc.opus_encoder`, to compare."""
    from aiortc.codecs.opus import OpusEncoder

    from letstalk_rt.stream import tracks

    kept = tracks.opus_encoder
    if really:
        tracks.opus_encoder = OpusEncoder
    try:
        yield
    finally:
        tracks.opus_encoder = kept


def link(stats: dict | None) -> dict:
    """What the browser counted of the link, from its last getStats: lost packets, NACKs and PLIs it sent, the video's
    freezes (Chromium counts a frame that came 150 ms or 3 frames' time later than the mean as one) and dropped
    frames, the share of its sound it concealed."""
    audio, video = (stats or {}).get("audio") or {}, (stats or {}).get("video") or {}
    share = lambda part, whole: round(100 * part / whole, 2) if whole else None  # noqa: E731
    if not audio or not video:
        return {}
    return {"audio_packets_lost": audio["lost"], "audio_packets_received": audio["received"],
            "audio_concealed_pct": share(audio["concealed"], audio["samples"]),
            "audio_concealed_silent_pct": share(audio["silent"], audio["samples"]),
            "video_packets_lost": video["lost"], "video_packets_received": video["received"],
            "nacks_sent": video["nacks"] + audio["nacks"], "plis_sent": video["plis"],
            "frames_decoded": video["decoded"], "frames_dropped": video["dropped"],
            "freezes": video["freezes"], "frozen_s": round(video["frozen_s"], 3)}


SAY = ("The avatar reads this text aloud, sentence after sentence, while the browser counts what it hears and what it "
       "sees. Each sentence has a pause after it, and the pauses carry no sound. ") * 24  # ~4 minutes of espeak-ng


@contextlib.asynccontextmanager
async def chromium(url: str, workdir: Path):
    """The index page in headless Chromium (Debian's, through playwright), its fake microphone playing the bundled
    speech (`url` says whether the page sends it); yields what evaluates a JS function there."""
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
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(str(workdir / "profile"), headless=True, args=args,
                                                              executable_path="/usr/bin/chromium")
        try:
            page = await context.new_page()
            await page.goto(url)
            yield lambda fn: page.evaluate(fn)
        finally:
            await context.close()


@contextlib.asynccontextmanager
async def firefox(url: str, workdir: Path):
    """The index page in Debian's headless Firefox ESR, driven over WebDriver BiDi as tests/test_firefox.py drives it
    (a checkout with the test dependencies: `bash scripts/setup.sh --dev`); its fake microphone is a tone."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_firefox import firefox as headless_firefox

    async with headless_firefox(workdir / "ff-profile") as browser:
        await browser.goto(url)
        yield lambda fn: browser.evaluate(f"({fn})()")


async def measure(url: str, seconds: float, workdir: Path, out=print, browser: str = "chromium",
                  speech: str = "mic") -> dict:
    """`browser` (chromium, firefox) on the index page of the server at `url`, the avatar saying what the page's
    microphone hears (`speech` mic) or a long text the server speaks (`say`, its microphone off); every second's
    figures and the summary."""
    page = f"{url}/?autostart=1&source=mic" if speech == "mic" else \
        f"{url}/?autostart=1&source=none&say={urllib.parse.quote(SAY)}"
    rows: list[dict] = []
    async with (chromium if browser == "chromium" else firefox)(page, workdir) as evaluate:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not await evaluate("() => (window.letstalk?.frames?.frames ?? 0) > 0"):
            if loop.time() > deadline:
                raise TimeoutError(f"{browser} showed no frame of the avatar in 60 s")
            await asyncio.sleep(0.2)
        start = loop.time()
        last = None
        while (t := loop.time() - start) < seconds:
            stats = await evaluate(STATS_JS)
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
    result = {**summary(rows), "link": link(last)}
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
    p.add_argument("--loss", type=float, default=0.0, metavar="PERCENT",
                   help="a server started here loses this share of the RTP packets each way (default 0)")
    p.add_argument("--jitter", type=float, default=0.0, metavar="MS",
                   help="a server started here holds each RTP packet a random 0 to MS ms each way (default 0)")
    p.add_argument("--browser", choices=("chromium", "firefox"), default="chromium",
                   help="which browser plays it (default chromium; firefox: Debian's firefox-esr, with --speech say)")
    p.add_argument("--speech", choices=("mic", "say"), default=None,
                   help="what the avatar says: the page's microphone (Chromium's plays the bundled speech; Firefox's "
                        "is a tone) or a long text the server speaks (espeak-ng); default mic in Chromium, say in "
                        "Firefox")
    p.add_argument("--no-fec", action="store_true",
                   help="a server started here sends its sound as aiortc's own encoder does (CELT, no in-band FEC)")
    p.add_argument("--json", type=Path, default=None, help="also write every second's figures and the summary here")
    args = p.parse_args()
    if (args.loss or args.jitter or args.no_fec) and args.url:
        p.error("--loss, --jitter and --no-fec need the server started here (no --url)")
    speech = args.speech or ("mic" if args.browser == "chromium" else "say")
    if not 0 <= args.loss < 100:
        p.error(f"--loss {args.loss:g}: give a percentage, 0 up to 100")
    if not 0 <= args.jitter <= 1000:
        p.error(f"--jitter {args.jitter:g}: give milliseconds, 0 up to 1000")
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            result = await measure(args.url.rstrip("/"), args.seconds, Path(tmp), browser=args.browser, speech=speech)
        else:
            with impaired_sockets(args.loss, args.jitter) as lost, without_fec(args.no_fec):
                async with bundled_server() as url:
                    result = await measure(url, args.seconds, Path(tmp), browser=args.browser, speech=speech)
            if args.loss:
                result["summary"]["server_lost"] = lost
                print(json.dumps({"server_lost": lost}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
