"""`letstalk bench --webrtc`: the engine measured from the far side of a real WebRTC connection.

Each session is a real server session (`server.create_app` on 127.0.0.1, an ephemeral port) reached through the
Python SDK (`AvatarClient`): the bench's speech is the client's microphone (an aiortc audio track played in real
time and sent as Opus, as a browser sends it), and the avatar's video (VP8) and audio (Opus) come back over RTP.
One throwaway session is connected first (`warm_up`), as a running server has set WebRTC up before. What the
receiving peer measures, per session:

- **first frame received**: from asking the server for the session (HTTP) to its first frame in the SDK;
- **frame pacing**: the gaps between the SDK's hand-overs of consecutive video frames (40 ms at 25 fps);
- **lip-to-sound offset**: for every received frame, its arrival against the arrival of the audio of the same media
  time (RTP timestamps; positive: the picture after its sound), twice: as the application gets them from the SDK
  (after the SDK's receive buffers: what a player that shows and plays on arrival shows) and as their first RTP packets
  came off the wire (what the server sent; a browser lines the two up by the RTP timestamps and RTCP itself); and
  a third time at the server (`lip_to_sound_sent_ms`), as its senders took each frame from the tracks and sent it:
  what the server's clock did, whatever the network or the peer's own event loop did after;
- **speech to sound**: how long after the microphone sent a piece of speech the avatar's audio carrying it arrived
  (the loudness of what was sent and of what came back, cross-correlated over each `SEGMENT_S`); the picture of
  that speech arrives the lip-to-sound offset later;
- **lip sync of what arrived** (`sync_of_frames`, the first `CONTENT_S`): the received frames' mouth against the
  received speech placed by media time. Its best offset is 0 when a frame and the audio of the same media time
  belong together; it reads as much lip sync as the model has (a model with random weights has none).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import os
import time
from dataclasses import dataclass, field

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from .bench import LoopWatch, Marks, by_minute, pairs
from .errors import LetsTalkError
from .media import pcm16
from .rtc import OPUS_PACKET, OPUS_RATE

log = logging.getLogger(__name__)

PACKET_S = 0.020  # the microphone's packets
LEVEL_S = 0.010  # loudness is read per 10 ms on both sides
SEGMENT_S = 10.0  # speech to sound: one cross-correlation per this many seconds of the run
MAX_ROUND_TRIP_S = 3.0  # ... looking this far for the speech coming back
CONTENT_S = 60.0  # the lip sync of what arrived is read on the first this many seconds (frames kept in memory)
FLOOR_DB = -60.0  # a pause's loudness


def levels_db(pcm: np.ndarray, rate: int, levels: int | None = None) -> np.ndarray:
    """Mono float samples at `rate` -> their loudness per LEVEL_S (`eval.speech_energy`: dB, a pause at FLOOR_DB), for
    `levels` of them (default: the whole ones in `pcm`; past its end: silence)."""
    from .eval import speech_energy

    n = int(len(pcm) / (rate * LEVEL_S)) if levels is None else levels
    return speech_energy(pcm, n, fps=1 / LEVEL_S, sample_rate=rate)


class MicrophoneTrack(MediaStreamTrack):
    """Speech played in real time as a browser's microphone sends it: 48 kHz stereo in 20 ms packets on an absolute
    schedule (what aiortc's Opus encoder sends at once; at another rate it holds each packet back 20 ms), `speech`
    (16 kHz mono float, padded with silence to whole packets) looped for `seconds` (whole packets), then silence.
    Only one loop is kept (a 30-minute soak's speech written out would be 350 MB and ~0.7 s to build); `sent_at` keeps
    when each packet left."""

    kind = "audio"

    def __init__(self, speech: np.ndarray, seconds: float, rate: int = 48000) -> None:
        from .media import PcmResampler

        super().__init__()
        self.rate, self.packet = rate, int(rate * PACKET_S)
        resampler = PcmResampler(rate)
        loop = np.concatenate([resampler.push(np.asarray(speech, np.float32), 16000), resampler.flush()])
        self.loop = np.pad(loop, (0, -len(loop) % self.packet))  # packets never straddle the loop's end
        self.packets = round(seconds / PACKET_S)  # then silence
        self.start: float | None = None
        self.sent_at = Marks()  # (media s, monotonic) per packet

    def _chunk(self, k: int) -> np.ndarray:
        """Packet k's speech (float, `self.packet` samples)."""
        if k >= self.packets:
            return np.zeros(self.packet, np.float32)
        at = k * self.packet % len(self.loop)
        return self.loop[at:at + self.packet]

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        k = len(self.sent_at)
        if self.start is None:
            self.start = time.monotonic()
        due = self.start + k * PACKET_S
        if (wait := due - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        now = time.monotonic()
        self.sent_at.append((k * PACKET_S, now))
        pcm = np.repeat((np.clip(self._chunk(k), -1, 1) * 32767).astype(np.int16), 2)[None]  # (1, 2 n) packed stereo
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
        frame.sample_rate = self.rate
        frame.pts = k * self.packet
        frame.time_base = fractions.Fraction(1, self.rate)
        return frame

    def sent(self) -> np.ndarray:
        """(monotonic, dB) per LEVEL_S of what was sent, (n, 2): the loudness of the speech each packet carried (read
        once for the loop: a level never straddles a packet), timed from when the packet left."""
        per_packet = round(PACKET_S / LEVEL_S)
        loop_db = levels_db(self.loop, self.rate)
        _, left_at = pairs(self.sent_at)
        k = np.arange(len(left_at))
        db = loop_db[(k * per_packet % len(loop_db))[:, None] + np.arange(per_packet)]  # (packets, per_packet)
        db[k >= self.packets] = FLOOR_DB
        at = left_at[:, None] + np.arange(per_packet) * LEVEL_S
        return np.stack([at.ravel(), db.ravel()], -1)


@dataclass
class Received:
    """What one receiving peer saw: each video frame's and audio packet's media time and arrival, the loudness of
    the audio that arrived, and the first CONTENT_S of both (for the lip sync of what arrived). The pairs a soak
    notes all along are `Marks` (flat arrays, no object per pair)."""

    video: Marks = field(default_factory=Marks)  # (media s, arrival monotonic)
    audio: Marks = field(default_factory=Marks)
    levels: Marks = field(default_factory=Marks)  # (arrival monotonic, dB) per 10 ms
    frames: dict[int, np.ndarray] = field(default_factory=dict)  # frame index (media time x fps) -> RGB
    speech: dict[int, np.ndarray] = field(default_factory=dict)  # first 16 kHz sample -> mono float
    wire: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> (media s, first RTP packet's arrival
    # monotonic), (n, 2), from `wire_arrivals`
    mic_wire: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # the microphone's packets at the server
    sent_wire: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> (media s, sent monotonic) of the
    # server's senders, from `wire_departures` (same process only: --peer-process adds it to the summary itself)
    opened_at: float = 0.0  # monotonic, before the session was asked for
    connected_at: float = 0.0  # monotonic, when `connect()` returned (session made, offer answered, ICE and DTLS done)
    frame_size: list[int] | None = None  # [width, height] of the first frame that arrived


RTP_CLOCK = {"video": 90000, "audio": 48000}  # VP8 / H.264 and Opus RTP clock rates


@contextlib.contextmanager
def _around_received_packets(wrap):
    """While open, every aiortc receiver of this process hands each RTP packet to `wrap(its handler)` instead: yields
    True, or False where aiortc no longer has that handler (a private method: aiortc has no public hook for a packet's
    arrival), and then changes nothing."""
    from aiortc import RTCRtpReceiver

    original = getattr(RTCRtpReceiver, "_handle_rtp_packet", None)
    if original is None:
        yield False
        return
    RTCRtpReceiver._handle_rtp_packet = wrap(original)  # type: ignore[method-assign]
    try:
        yield True
    finally:
        RTCRtpReceiver._handle_rtp_packet = original  # type: ignore[method-assign]


@contextlib.contextmanager
def wire_arrivals():
    """While open, every aiortc receiver of this process notes when the first RTP packet of each media timestamp
    arrived: yields {receiver: Marks of (rtp timestamp, monotonic)}, a mark whenever a packet's timestamp is not the
    one before it (a frame's packets share one; `on_the_wire` keeps the first arrival of each). Where aiortc has no
    packet handler to wrap (`_around_received_packets`), nothing is noted and the wire figures are left out."""
    seen: dict = {}
    last: dict = {}  # receiver -> the timestamp of its last packet

    def wrap(original):
        async def handle(self, packet, *args, **kwargs):
            if last.get(self) != packet.timestamp:
                last[self] = packet.timestamp
                seen.setdefault(self, Marks()).append((packet.timestamp, time.monotonic()))
            return await original(self, packet, *args, **kwargs)
        return handle

    with _around_received_packets(wrap):
        yield seen


@contextlib.contextmanager
def lossy_receivers(fraction: float, seed: int = 0):
    """While open, every aiortc receiver of this process loses `fraction` of the RTP packets that reach it, drawn at
    random (seeded): a lossy Wi-Fi or cellular link, in both directions of a bench in one process (the server's
    microphone receivers and the SDK's). A lost packet is not noted by `wire_arrivals` (entered before this) and is
    asked for again as a real loss is (NACK, for video); a retransmission may be lost too. Yields {receiver: packets
    lost} (where aiortc has no packet handler to wrap, nothing is lost, and a warning says so)."""
    import random

    lost: dict = {}
    if not fraction:
        yield lost
        return
    draw = random.Random(seed).random

    def wrap(original):
        async def handle(self, packet, *args, **kwargs):
            if draw() < fraction:
                lost[self] = lost.get(self, 0) + 1
                return None
            return await original(self, packet, *args, **kwargs)
        return handle

    with _around_received_packets(wrap) as wrapped:
        if not wrapped:
            log.warning("--loss: this aiortc has no receiver packet handler to wrap; nothing is lost")
        yield lost


def lost_on(pc, lost: dict, side: str) -> dict[str, int]:
    """A peer connection's receivers' packets lost by `lossy_receivers`, as {"SIDE_KIND": n}."""
    out: dict[str, int] = {}
    for receiver in pc.getReceivers():
        if receiver.track is not None and receiver in lost:
            key = f"{side}_{receiver.track.kind}"
            out[key] = out.get(key, 0) + lost[receiver]
    return out


@contextlib.contextmanager
def wire_departures():
    """While open, every aiortc sender of this process notes when it took each frame from its track, encoded (or
    packed: a session's shared encoders), to send its packets at once: yields {sender: Marks of (media timestamp in RTP
    clock units, monotonic)}. It wraps the senders' frame fetch (a private method, as `wire_arrivals` does; where
    aiortc no longer has it, nothing is noted)."""
    from aiortc import RTCRtpSender

    sent: dict = {}
    original = getattr(RTCRtpSender, "_next_encoded_frame", None)
    if original is None:
        yield sent
        return

    async def next_frame(self, *args, **kwargs):
        frame = await original(self, *args, **kwargs)
        if frame is not None:
            sent.setdefault(self, Marks()).append((frame.timestamp, time.monotonic()))
        return frame

    RTCRtpSender._next_encoded_frame = next_frame  # type: ignore[method-assign]
    try:
        yield sent
    finally:
        RTCRtpSender._next_encoded_frame = original  # type: ignore[method-assign]


def on_the_wire(pc, seen: dict) -> dict[str, np.ndarray]:
    """A peer connection's receivers' `wire_arrivals` -> kind -> (media seconds since its first packet, arrival) per
    RTP timestamp (its first arrival), (n, 2) in order of arrival."""
    return _by_kind([(r, r.track.kind if r.track is not None else None) for r in pc.getReceivers()], seen)


def sent_on_the_wire(pc, sent: dict) -> dict[str, np.ndarray]:
    """A peer connection's senders' `wire_departures` -> kind -> (media seconds since its first frame, sent), (n, 2):
    as `on_the_wire`, at the sending side."""
    return _by_kind([(s, s.kind) for s in pc.getSenders()], sent)


def _by_kind(ends: list, seen: dict) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for end, kind in ends:
        ts, at = pairs(seen.get(end, Marks()))  # in order of arrival
        if len(ts) and kind in RTP_CLOCK:
            _, first = np.unique(ts, return_index=True)  # a timestamp seen again (a packet out of order): its first
            first.sort()
            media = ((ts[first].astype(np.int64) - int(ts[0])) % 2**32) / RTP_CLOCK[kind]
            out[kind] = np.stack([media, at[first]], -1)
    return out


def face_square(rgb: np.ndarray, box) -> np.ndarray:
    """The animated face square `box` (x, y, width, height; it may reach past the frame's edges, which are then
    repeated) of a frame: a full frame's face as a face-crop session's frame shows it."""
    x, y, w, h = box
    H, W = rgb.shape[:2]
    if (x, y, w, h) == (0, 0, W, H):
        return rgb
    rows, cols = np.clip(np.arange(y, y + h), 0, H - 1), np.clip(np.arange(x, x + w), 0, W - 1)
    return rgb[rows[:, None], cols[None, :]]


async def receive(session, out: Received, fps: float) -> None:
    """Read a connected `AvatarSession`'s video and audio until the connection ends (of the first CONTENT_S of video,
    the face square the server names: `content_sync` reads its mouth)."""
    box = session.info["video"].get("face_box")

    async def video():
        async for f in session.timed_video_frames():
            out.video.append((f.time, f.received_at))
            out.frame_size = out.frame_size or [f.rgb.shape[1], f.rgb.shape[0]]
            if f.time < CONTENT_S:
                out.frames[round(f.time * fps)] = f.rgb if box is None else face_square(f.rgb, box)

    async def audio():
        async for chunk in session.audio_frames():
            out.audio.append((chunk.time, chunk.received_at))
            mono = chunk.mono_float()
            db = levels_db(mono, chunk.sample_rate)
            out.levels.extend_columns(chunk.received_at + np.arange(len(db)) * LEVEL_S, db)
            if chunk.time < CONTENT_S:
                step = chunk.sample_rate // 16000  # Opus decodes at 48 kHz: every third sample (loudness only)
                out.speech[round(chunk.time * 16000)] = mono[::max(1, step)]

    await asyncio.gather(video(), audio())


def _quantiles_ms(values: np.ndarray) -> dict:
    return {"p50": round(float(np.percentile(values, 50)), 1), "p99": round(float(np.percentile(values, 99)), 1),
            "max": round(float(values.max()), 1)}


def pacing(video) -> dict:
    """Received frames per second and the gaps between consecutive arrivals (ms), from (media s, arrival) pairs: p50
    near 40 at 25 fps; the p99 and the max show bursts and stalls."""
    if len(video) < 2:
        return {"frames": len(video)}
    _, arrivals = pairs(video)
    gaps = np.diff(arrivals) * 1000
    return {"frames": len(video), "fps": round((len(video) - 1) / (arrivals[-1] - arrivals[0]), 2),
            "gap_ms": _quantiles_ms(gaps)}


def audio_missing_ms(audio) -> float:
    """The media time the received audio skipped, from its chunks' (media s, arrival) pairs (aiortc's Opus decoder
    hands over 20 ms a packet): lost packets left out rather than concealed, ms."""
    if len(audio) < 2:
        return 0.0
    times, _ = pairs(audio)
    return round(float(np.clip(np.diff(np.sort(times)) - OPUS_PACKET / OPUS_RATE, 0, None).sum()) * 1000, 1)


def arrival_offsets(later, earlier) -> dict:
    """(media s, arrival) of two streams -> each of `later`'s arrivals minus the arrival of `earlier`'s media of the same
    time (interpolated between its packets), ms. The signed median, the largest either way, and each minute's
    largest |offset| (minutes of media time): a drift grows minute by minute. `lip_to_sound`: the video against the
    audio, positive when the picture comes after its sound."""
    if not len(later) or len(earlier) < 2:
        return {}
    e_time, e_arrival = pairs(earlier)
    v = np.asarray(later, np.float64).reshape(-1, 2)
    v = v[(e_time[0] <= v[:, 0]) & (v[:, 0] <= e_time[-1])]
    if not len(v):
        return {}
    offsets = (v[:, 1] - np.interp(v[:, 0], e_time, e_arrival)) * 1000
    size = np.abs(offsets)
    return {"p50": round(float(np.median(offsets)), 1), "min": round(float(offsets.min()), 1),
            "max": round(float(offsets.max()), 1), "abs_p99": round(float(np.percentile(size, 99)), 1),
            "abs_max_by_minute": by_minute(size, v[:, 0], np.max)}


def speech_to_sound(sent, came_back) -> dict:
    """How long after the microphone sent speech the avatar's audio carrying it arrived: the loudness sent and the
    loudness received, on one 10 ms grid of arrival time, cross-correlated over each SEGMENT_S of sent speech that
    holds speech and pauses; the lag of the best correlation per segment (ms), and that correlation (the same speech
    reads near 1)."""
    if len(sent) < 2 or len(came_back) < 2:
        return {}
    s_t, s_db = pairs(sent)
    r_t, r_db = pairs(came_back)
    grid = np.arange(s_t[0], r_t[-1], LEVEL_S)
    s = np.interp(grid, s_t, s_db, left=FLOOR_DB, right=FLOOR_DB)
    r = np.interp(grid, r_t, r_db, left=FLOOR_DB, right=FLOOR_DB)
    seg, max_lag = round(SEGMENT_S / LEVEL_S), round(MAX_ROUND_TRIP_S / LEVEL_S)
    lags, peaks = [], []
    for start in range(0, int((s_t[-1] - s_t[0]) / LEVEL_S) - seg + 1, seg):
        x = s[start:start + seg]
        if x.std() < 3.0 or start + seg + max_lag > len(r):  # no speech in it, or its echo not all back
            continue
        x = (x - x.mean()) / x.std()
        corr = []
        for lag in range(max_lag + 1):
            y = r[start + lag:start + lag + seg]
            corr.append(float(np.mean(x * (y - y.mean()) / y.std())) if y.std() > 0 else -1.0)
        best = int(np.argmax(corr))
        lags.append(best * LEVEL_S * 1000)
        peaks.append(corr[best])
    if not lags:
        return {}
    ms = np.array(lags)
    return {"segments": len(ms), "p50": round(float(np.median(ms)), 1), "min": round(float(ms.min()), 1),
            "max": round(float(ms.max()), 1), "correlation_min": round(min(peaks), 3)}


def content_sync(got: Received, fps: float) -> dict:
    """The received frames' mouth against the received speech, both placed by media time (`sync_of_frames`, the
    closed mouth from the quietest moment): the best offset in frames (0: what arrived together belongs together)."""
    from .eval import MIN_CLIP_FRAMES, quietest_frame, sync_of_frames

    if len(got.frames) < MIN_CLIP_FRAMES or not got.speech:
        return {}
    n = max(got.frames) + 1
    shape = next(iter(got.frames.values())).shape
    frames, last = np.zeros((n,) + shape, np.uint8), np.zeros(shape, np.uint8)
    for i in range(n):  # a frame that did not arrive: the one before it, as a player holds it
        last = frames[i] = got.frames.get(i, last)
    speech = np.zeros(round(n / fps * 16000), np.float32)
    for at, pcm in got.speech.items():
        part = pcm[:max(0, len(speech) - at)]
        speech[at:at + len(part)] = part
    sync = sync_of_frames(frames, speech, frames[quietest_frame(speech, n, fps)], fps)
    return {"frames": n, "speech_sync": round(sync["speech_sync"], 3), "speech_offset": sync["speech_offset"],
            "peak_sync": round(sync["peak_sync"], 3)}


def first_frame_ms(got: Received) -> float | None:
    """From asking for the session (HTTP) to its first frame in the SDK (None: none came)."""
    return round((pairs(got.video)[1][0] - got.opened_at) * 1000, 1) if len(got.video) else None


def summary(got: Received, sent: np.ndarray, sent_at: Marks, fps: float) -> dict:
    """One session's receiver-side figures (the RunResult's `webrtc`)."""
    none = np.zeros((0, 2))
    wire = arrival_offsets(got.wire.get("video", none), got.wire.get("audio", none))
    return {"first_frame_received_ms": first_frame_ms(got), "frame_size": got.frame_size,
            "pacing": pacing(got.video), "lip_to_sound_ms": arrival_offsets(got.video, got.audio),
            "lip_to_sound_wire_ms": wire,
            "lip_to_sound_sent_ms": arrival_offsets(got.sent_wire.get("video", none), got.sent_wire.get("audio", none)),
            # where speech to sound goes, outside the engine's own latency: the microphone's packets from its track to
            # the server's wire, and the avatar's audio from the client's wire to the application (the SDK's receive buffer)
            "mic_to_server_wire_ms": arrival_offsets(got.mic_wire, sent_at),
            "audio_wire_to_app_ms": arrival_offsets(got.audio, got.wire.get("audio", none)),
            "audio_missing_ms": audio_missing_ms(got.audio),
            "speech_to_sound_ms": speech_to_sound(sent, got.levels), "content_sync": content_sync(got, fps)}


@contextlib.asynccontextmanager
async def local_server(engine, config=None):
    """The WebRTC server (`server.create_app`, `config`: a ServerConfig) around `engine` on 127.0.0.1, an ephemeral
    port (HTTPS where `config` has a TLS certificate): yields its URL and the aiohttp application."""
    from aiohttp import web

    from letstalk_rt.server import ServerConfig, create_app

    config = config or ServerConfig(port=0)
    app = create_app(engine, config)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ssl_context = config.ssl_context()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


async def stream(engine, n: int, seconds: float, speech: np.ndarray, peer_process: bool = False, full_frame: int = 0,
                 loss: float = 0.0) -> tuple[list, list[dict]]:
    """n sessions through the server, each with a microphone playing `speech` for `seconds` and a receiving peer ->
    (the engine's sessions, read after the run, and each session's receiver-side summary). `peer_process`: the peers
    (microphones and SDK) in a process of their own (`python -m letstalk_rt.bench_webrtc`), as a user's peer is; else
    in this one, sharing the server's event loop. `full_frame`: the sessions' frames the whole photo, fit to this many
    px (0: the face crop). `loss`: the fraction of RTP packets every receiver loses (`lossy_receivers`: the server's
    microphone receivers, and the SDK's, in the peer process too), from the measured sessions on (with `peer_process`
    the server's from the child's warm-up session on)."""
    from .client import AvatarClient

    from letstalk_rt.server.app import MANAGER

    with wire_arrivals() as seen, wire_departures() as sent:
        async with local_server(engine) as (url, app):
            if peer_process:
                return await _run_peer_process(url, app[MANAGER], n, seconds, speech, (seen, sent), full_frame, loss)
            async with AvatarClient(url) as client:
                sessions, peers = await _run(client, app[MANAGER], n, seconds, speech, (seen, sent), full_frame, loss)
    return sessions, [{**summary(p.got, p.mic.sent(), p.mic.sent_at, fps_of(p.avatar)), **p.lost} for p in peers]


@dataclass
class Peer:
    """One measured session at the receiving side: the SDK's session, its microphone, what it received and the task
    reading it."""

    avatar: object  # client.AvatarSession
    mic: MicrophoneTrack
    got: Received
    reader: asyncio.Task
    route: dict | None = None  # the candidate types ICE chose (`AvatarSession.route()`), noted at the close
    lost: dict = field(default_factory=dict)  # with --loss: {"packets_lost": {"sdk_audio": n, "server_audio": n, ...}}


async def start_session(client, patience_s: float = 15.0, full_frame: int = 0):
    """`client.start_session()` on the server's default avatar, asking again while the server is busy (the warm-up's
    slot is still being freed) for up to `patience_s`; `full_frame` as the server takes it."""
    from .client import ServerBusyError

    give_up = time.monotonic() + patience_s
    while True:
        try:
            return await client.start_session(avatar_id="default", full_frame=full_frame or None)
        except ServerBusyError:
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(0.1)


async def warm_up(client, manager=None) -> None:
    """One throwaway session connected and closed: a process's first WebRTC connection pays aiortc's one-time set-up
    (~0.7 s on 2 cores, and it held the engine's first window back as long); a running server has paid it. With the
    server's `manager` (same process), waits until its slot is free again before the measured sessions ask."""
    avatar = await start_session(client)
    await avatar.connect(audio_track=MicrophoneTrack(np.zeros(1600, np.float32), 1.0))
    async for _ in avatar.timed_video_frames():
        break
    await avatar.close()
    while manager is not None and (manager.sessions or manager.admitting):
        await asyncio.sleep(0.05)


def fps_of(avatar) -> float:
    """The frame rate the server stated for a session."""
    return float(avatar.info["video"]["fps"])


async def open_peers(client, n: int, seconds: float, speech: np.ndarray, opened=None, full_frame: int = 0
                     ) -> list[Peer]:
    """n sessions opened and connected as a user's are (one after another), each sending `speech` for `seconds` as
    its microphone and read by `receive`; `opened(avatar)` after each connects."""
    peers = []
    for _ in range(n):
        mic = MicrophoneTrack(speech, seconds)
        got = Received(opened_at=time.monotonic())
        avatar = await start_session(client, full_frame=full_frame)
        await avatar.connect(audio_track=mic)
        got.connected_at = time.monotonic()
        peers.append(Peer(avatar, mic, got, asyncio.create_task(receive(avatar, got, fps_of(avatar)))))
        if opened is not None:
            opened(avatar)
    return peers


async def close_peers(peers: list[Peer], seen: dict, lost: dict | None = None) -> None:
    """Note each peer's wire arrivals (and packets `lost`, `lossy_receivers`), then close its session and wait for its
    reader."""
    for p in peers:
        p.got.wire = on_the_wire(p.avatar.pc, seen)  # before close(): it drops the peer connection
        if lost is not None:
            p.lost.setdefault("packets_lost", {}).update(lost_on(p.avatar.pc, lost, "sdk"))
        p.route = p.avatar.route()
        await p.avatar.close()
    await asyncio.gather(*(p.reader for p in peers), return_exceptions=True)


def mic_on_the_server(pc, seen: dict) -> np.ndarray:
    """The server side of a session's peer connection -> its microphone packets' (media s, wire arrival)."""
    return on_the_wire(pc, seen).get("audio", np.zeros((0, 2))) if pc is not None else np.zeros((0, 2))


async def _run(client, manager, n, seconds, speech, wire, full_frame=0, loss=0.0):
    seen, sent = wire
    await warm_up(client, manager)
    sessions = []
    with lossy_receivers(loss) as lost:
        peers = await open_peers(client, n, seconds, speech,
                                 opened=lambda avatar: sessions.append(manager.sessions[avatar.id].session),
                                 full_frame=full_frame)
        await asyncio.sleep(seconds)
        for p in peers:
            pc = manager.sessions[p.avatar.id].pc
            p.got.mic_wire = mic_on_the_server(pc, seen)
            p.got.sent_wire = sent_on_the_wire(pc, sent)
            if loss:
                p.lost["packets_lost"] = lost_on(pc, lost, "server")
        await close_peers(peers, seen, lost if loss else None)
    return sessions, peers


async def _run_peer_process(url, manager, n, seconds, speech, wire, full_frame=0, loss=0.0
                            ) -> tuple[list, list[dict]]:
    """`stream` with the peers in a child process (`main`): the engine's session and the server's peer connection of
    each session the child reports opened are kept here; the child's summaries come back on its last line, and the
    microphone-to-server figure is made here from the server's wire and the child's send times (one monotonic clock
    for the machine), the server's lip to sound from its senders."""
    import json
    import sys
    import tempfile
    import wave

    sessions, server_pcs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/speech.wav"
        with wave.open(path, "wb") as w:  # the same speech, as the child's --audio (PCM16: what the microphone sends)
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
            w.writeframes(pcm16(speech).astype("<i2").tobytes())
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "letstalk_rt.bench_webrtc", url, "--sessions", str(n), "--seconds", str(seconds),
            "--audio", path, "--send-times", "--full-frame", str(full_frame), "--loss", str(100 * loss),
            stdout=asyncio.subprocess.PIPE, limit=2**28)
        result = None
        with lossy_receivers(loss, seed=1) as lost:  # the server's receivers (the child's: its own, seed 0)
            try:
                async for line in child.stdout:
                    try:
                        message = json.loads(line)
                    except ValueError:
                        message = None
                    if not isinstance(message, dict):  # not the peer's own (a library printing to stdout): passed on
                        sys.stderr.write(line.decode(errors="replace"))
                        continue
                    if "opened" in message:
                        ss = manager.sessions[message["opened"]]
                        sessions.append(ss.session), server_pcs.append(ss.pc)
                    else:
                        result = message
            finally:
                if child.returncode is None and result is None:
                    child.kill()
                code = await child.wait()
    if code != 0 or result is None:
        raise LetsTalkError(f"the bench's peer process failed (exit code {code}); its error is printed above")
    seen, sent = wire
    for peer, pc in zip(result["peers"], server_pcs):
        if loss:
            peer.setdefault("packets_lost", {}).update(lost_on(pc, lost, "server"))
        sent_at = peer.pop("send_times")
        peer["mic_to_server_wire_ms"] = arrival_offsets(mic_on_the_server(pc, seen), sent_at)
        sent_wire = sent_on_the_wire(pc, sent)
        peer["lip_to_sound_sent_ms"] = arrival_offsets(sent_wire.get("video", np.zeros((0, 2))),
                                                       sent_wire.get("audio", np.zeros((0, 2))))
    return sessions, result["peers"]


async def peers_main(url: str, n: int, seconds: float, speech: np.ndarray, api_key: str | None = None,
                     send_times: bool = False, full_frame: int = 0, relay: bool = False, loss: float = 0.0) -> None:
    """The peers of `stream(peer_process=True)`, or of anyone measuring a running server from the far side: n
    sessions on its default avatar for `seconds`; each line of stdout one JSON object: {"opened": session id} as
    each connects, then {"peers": [each session's summary]} (+ "peer_loop": this process's event loop and collector
    by minute, as `LoopWatch`; + its microphone packets' "send_times", (media s, monotonic) pairs, with
    `send_times`). `full_frame`: the sessions' frames the whole photo, fit to this many px (0: the face crop).
    `relay`: connect only through the TURN server the server names (its --ice-server, --turn-secret). `loss`: the
    fraction of RTP packets these peers lose on the way in (`lossy_receivers`), from the measured sessions on."""
    import json

    from .client import AvatarClient

    with wire_arrivals() as seen:
        async with AvatarClient(url, api_key, relay_only=relay) as client, LoopWatch() as watch:
            await warm_up(client)
            with lossy_receivers(loss) as lost:
                peers = await open_peers(client, n, seconds, speech, opened=lambda avatar: print(
                    json.dumps({"opened": avatar.id}), flush=True), full_frame=full_frame)
                await asyncio.sleep(seconds)
                await close_peers(peers, seen, lost if loss else None)
    loop = watch.figures()  # this process's, which the bench's own LoopWatch does not see
    loop.pop("gc_frozen_objects")
    out = []
    for p in peers:
        out.append({**summary(p.got, p.mic.sent(), p.mic.sent_at, fps_of(p.avatar)), "peer_pid": os.getpid(),
                    "peer_loop": loop, "route": p.route, **p.lost})
        for server_side in ("mic_to_server_wire_ms", "lip_to_sound_sent_ms"):  # not here (`stream` adds them there)
            del out[-1][server_side]
        if send_times:
            out[-1]["send_times"] = np.asarray(p.mic.sent_at).tolist()
    print(json.dumps({"peers": out}), flush=True)


RSS_METRIC = "letstalk_process_resident_memory_bytes"


async def churn_main(url: str, n: int, seconds: float, speech: np.ndarray, api_key: str | None = None,
                     relay: bool = False) -> None:
    """n sessions one after another, each connected as a user's is, sending `speech` for `seconds`, then closed: does a
    server that opens and closes sessions for days keep its memory and its service? One JSON line per session
    ({"churn": i, first frame, what arrived, the server's resident memory from its /metrics after the close}), then
    {"churn_summary": ...} with the memory's lows and their growth per 100 sessions over the second half (the first
    half fills allocator arenas and caches; `churn_summary`)."""
    import json

    from .client import AvatarClient

    rows = []
    async with AvatarClient(url, api_key, relay_only=relay) as client:
        await warm_up(client)
        for i in range(n):
            peers = await open_peers(client, 1, seconds, speech)
            await asyncio.sleep(seconds)
            await close_peers(peers, {})
            got = peers[0].got
            metrics = await client.metrics()
            rss = metrics.get(RSS_METRIC)
            connect_ms = round((got.connected_at - got.opened_at) * 1000, 1)
            rows.append({"churn": i, "first_frame_received_ms": first_frame_ms(got), "connect_ms": connect_ms,
                         "pacing": pacing(got.video),
                         "server_rss_mb": None if rss is None else round(rss / 2**20, 1),
                         "server_sessions_active": metrics.get("letstalk_sessions_active")})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"churn_summary": churn_summary(rows, seconds)}), flush=True)


def churn_summary(rows: list[dict], seconds: float) -> dict:
    """What `churn_main`'s sessions add up to: frames each received (against seconds x 25), first frames, and the
    server's resident memory: first, last, most, the lowest of each sixth of the run, and the growth per 100 sessions
    of those lows over the second half (None under 6 sessions with the server's figure). The lows, not every reading:
    the memory saws up and down as the server hands freed memory back (every `--trim-heap-every` seconds), and a fit
    through the saw reads its phase; a leak raises the lows."""
    frames = [r["pacing"]["frames"] for r in rows]
    firsts = [r["first_frame_received_ms"] for r in rows if r["first_frame_received_ms"] is not None]
    rss = np.array([r["server_rss_mb"] for r in rows if r["server_rss_mb"] is not None], np.float64)
    memory = None
    if len(rss):
        memory = {"first": float(rss[0]), "last": float(rss[-1]), "max": float(rss.max()),
                  "lowest_by_sixth": None, "growth_per_100_sessions_second_half": None}
        if len(rss) >= 6:
            edges = np.linspace(0, len(rss), 7).astype(int)
            at = [int(a + np.argmin(rss[a:b])) for a, b in zip(edges[:-1], edges[1:])]  # each sixth's lowest reading
            memory["lowest_by_sixth"] = [float(rss[i]) for i in at]
            slope = np.polyfit(at[3:], rss[at[3:]], 1)[0]
            memory["growth_per_100_sessions_second_half"] = round(float(slope) * 100, 1)
    return {"sessions": len(rows), "seconds_each": seconds,
            "frames_received": {"min": min(frames), "max": max(frames)} if frames else {},
            "sessions_without_frames": sum(f == 0 for f in frames),
            "first_frame_received_ms": {"p50": round(float(np.median(firsts)), 1), "max": max(firsts)} if firsts else {},
            "server_rss_mb": memory}


def main(argv: list[str] | None = None) -> None:
    """python -m letstalk_rt.bench_webrtc URL: the receiving side of `letstalk bench --webrtc` against any server."""
    import argparse
    import sys

    from .media import load_audio

    p = argparse.ArgumentParser(prog="python -m letstalk_rt.bench_webrtc", description=(
        "Measure a running letstalk-rt server from the far side of WebRTC: N sessions on its default avatar, each "
        "sending speech as its microphone; prints one JSON object per line (each session as it opens, then each "
        "session's frame pacing, lip-to-sound offset, speech-to-sound latency and lip sync of what arrived)."))
    p.add_argument("url", help="the server, like http://127.0.0.1:8080")
    p.add_argument("--sessions", type=int, default=1, help="concurrent sessions (default 1)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of speech per session (default 20)")
    p.add_argument("--audio", default=None, help="the speech to send (any format PyAV reads; default: the bundled "
                                                   "speech)")
    p.add_argument("--api-key", default=None, help="the server's API key, if it has one")
    p.add_argument("--send-times", action="store_true", help="add each microphone packet's send time (monotonic)")
    p.add_argument("--full-frame", type=int, default=0, metavar="PX",
                   help="sessions whose video is the whole photo, fit to PX (the server's full_frame; default 0: the "
                        "face crop)")
    p.add_argument("--churn", type=int, default=0, metavar="N", help=(
        "instead: N sessions one after another, each for --seconds, then closed; one line per session with the "
        "server's resident memory (from its /metrics), then a summary with its growth per 100 sessions"))
    p.add_argument("--relay", action="store_true",
                   help="connect only through the TURN server the server names (its --ice-server, --turn-secret): "
                        "what a relayed user gets")
    p.add_argument("--loss", type=float, default=0.0, metavar="PCT",
                   help="these peers lose PCT %% of the RTP packets that reach them, at random (a lossy link; default "
                        "0)")
    args = p.parse_args(argv)
    if not 0 <= args.loss <= 50:
        p.error(f"--loss {args.loss:g}: give a percentage from 0 to 50")
    if args.sessions < 1 or args.seconds <= 0 or args.churn < 0:
        p.error("--sessions and --seconds must be positive, --churn 0 or more")
    if args.churn and args.sessions != 1:
        p.error("--churn opens one session at a time; leave out --sessions")
    try:
        from pathlib import Path

        speech = np.asarray(load_audio(args.audio or Path(__file__).parent / "assets" / "speech.ogg"))
        if args.churn:
            asyncio.run(churn_main(args.url, args.churn, args.seconds, speech, args.api_key, args.relay))
        else:
            asyncio.run(peers_main(args.url, args.sessions, args.seconds, speech, args.api_key, args.send_times,
                                   args.full_frame, args.relay, args.loss / 100))
    except (LetsTalkError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
