"""aiortc tracks of a session: video and audio paced against the session's one absolute clock.

aiortc's sender does not pace by pts, so `recv()` sleeps until each frame's due time itself. Both
tracks read the same `Player`: video frame i is due at `start + i / fps`, audio packet j (20 ms) at
`start + j * 0.02`, and packets 2i and 2i+1 carry frame i's own audio. No chained sleeps: every due
time is computed from `start`, so nothing drifts however long the stream runs. A reader that falls
more than `late_skip_ms` behind (a stalled consumer) jumps to the present instead of bursting.

The server's WebRTC senders get them as `SharedVideoTrack`s and `SharedAudioTrack`s: aiortc encodes per sender, so
each peer of a session (its owner, each viewer) was a whole video and Opus encode more; a `SharedVideoEncoder` encodes
each tick once for every peer that sends the same codec, a `SharedAudioEncoder` each 20 ms of sound once for all (48 kHz
stereo from `rtc.OpusFramer`, what aiortc's Opus encoder sends the moment it gets it), and each peer's sender only
packs what was encoded for its own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import math
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from ..aio import wait_for
from ..media import pcm16
from ..rtc import OPUS_PACKET, OPUS_RATE, OpusFramer, bitstream_encoder, is_keyframe, opus_encoder

if TYPE_CHECKING:
    from .engine import AVFrame, Session

VIDEO_CLOCK_RATE = 90000
AUDIO_PTIME = 0.020  # seconds per audio packet


class _SessionTrack(MediaStreamTrack):
    def __init__(self, session: "Session") -> None:
        super().__init__()
        self.session = session
        self.position = 0  # next video frame / audio packet index
        self.last_index: int | None = None  # AVFrame.index of what the last recv() carried (None: a held frame)

    def _skip_if_behind(self, per_tick: float) -> None:
        player = self.session.player
        now_index = int((time.monotonic() - player.start) / per_tick) if player.start is not None else 0
        behind = now_index - self.position
        if behind * per_tick * 1000 > self.session.engine.config.late_skip_ms:
            frames = int(behind * per_tick * player.fps)
            if self.kind == "video" and frames:
                self.session._count_drop(frames, "consumer")
            self.position = now_index

    async def _ensure_live(self) -> None:
        if self.readyState != "live" or self.session.closed:
            raise MediaStreamError
        await self.session.player.wait_start()
        if self.session.closed:
            raise MediaStreamError


class AvatarVideoTrack(_SessionTrack):
    kind = "video"

    async def _next_frame(self) -> tuple[int, AVFrame]:
        """The next tick this track sends, and its frame (at its due time)."""
        await self._ensure_live()
        player = self.session.player
        self._skip_if_behind(1 / player.fps)
        tick = self.position
        frame = await player.get(tick)
        self.position += 1
        return tick, frame

    async def recv(self) -> av.VideoFrame:
        tick, frame = await self._next_frame()
        self.last_index = None if frame.filler else frame.index
        return picture(frame, tick, self.session.player.fps)


def picture(frame: AVFrame, tick: int, fps: int) -> av.VideoFrame:
    """`frame`'s picture as aiortc's video encoders take it, timed at `tick`."""
    out = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame.video), format="rgb24")
    out.pts = tick * VIDEO_CLOCK_RATE // fps
    out.time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
    return out


def _keep(recent: dict, key: int, value, most: int):
    """Note `value` under `key` (the newest) in `recent`, which forgets its oldest past `most`; `value`."""
    recent[key] = value
    while len(recent) > most:
        del recent[next(iter(recent))]
    return value


@dataclass(frozen=True)
class EncodedTick:
    seq: int  # the encoder's count: a frame refers to the one before it (seq - 1) unless it is a key frame
    data: bytes  # the frame's bitstream (b"": the encoder gave nothing for this tick)
    keyframe: bool
    index: int | None  # AVFrame.index of the frame (None: a held frame)


class SharedVideoEncoder:
    """A session's video encoded once per tick for every peer connection that sends codec `mime` (the owner's and its
    viewers'), with aiortc's own encoder and settings (`rtc.bitstream_encoder`). A peer that joins, misses a frame
    (it fell behind what is kept) or asks for one (a PLI or FIR) makes the next frame a key frame for all; the bitrate
    is the lowest any of the peers' congestion control (REMB) asks for."""

    HISTORY = 50  # encoded ticks kept (2 s) for a peer a little behind the first
    KEYFRAME_INTERVAL_S = 0.25  # at most one key frame asked for in this long: a peer on a lossy link that keeps
    # reporting lost pictures must not turn every peer's stream into key frames

    def __init__(self, session: Session, mime: str) -> None:
        encoder = bitstream_encoder(mime)
        if encoder is None:
            raise ValueError(f"no shared encoder for {mime}")
        self.session, self.mime, self._encoder = session, mime, encoder
        self._lock = asyncio.Lock()
        self.encoded: dict[int, EncodedTick] = {}  # tick -> its frame, ascending
        self.last_tick = -1
        self.frames_encoded = 0  # also each frame's `EncodedTick.seq`
        self.keyframes_asked = 0  # frames encoded as key frames because a peer joined, missed one or asked
        self._keyframe_wanted = True
        self._keyframe_at = -math.inf  # monotonic time of the last key frame asked for
        self.readers: weakref.WeakSet[SharedVideoTrack] = weakref.WeakSet()

    def want_keyframe(self) -> None:
        self._keyframe_wanted = True

    def _bitrate(self) -> int | None:
        """The lowest bitrate a peer that is still reading asks for (a closed one's last word does not count)."""
        now = time.monotonic()
        wanted = [b for b in (r.target_bitrate() for r in self.readers if now - r.last_read < 1.0) if b]
        return min(wanted) if wanted else None

    async def get(self, tick: int, frame: AVFrame) -> EncodedTick | None:
        """The encoded frame of `tick` (`frame`), encoded now if no peer asked for it before; None when it is older
        than the last one encoded and no longer kept."""
        async with self._lock:
            if tick <= self.last_tick:
                return self.encoded.get(tick)
            image = picture(frame, tick, self.session.player.fps)
            bitrate = self._bitrate()
            if bitrate:
                self._encoder.target_bitrate = bitrate
            force = self._keyframe_wanted and time.monotonic() - self._keyframe_at >= self.KEYFRAME_INTERVAL_S
            if force:
                self._keyframe_wanted, self._keyframe_at = False, time.monotonic()
                self.keyframes_asked += 1
            # off the event loop, as aiortc's sender encodes
            payloads, _ = await asyncio.get_running_loop().run_in_executor(None, self._encoder.encode, image, force)
            data = payloads[0] if payloads else b""
            self.frames_encoded += bool(data)
            entry = EncodedTick(self.frames_encoded, data, bool(data) and is_keyframe(self.mime, data),
                                None if frame.filler else frame.index)
            self.last_tick = tick
            return _keep(self.encoded, tick, entry, self.HISTORY)


class SharedVideoTrack(AvatarVideoTrack):
    """The session's video for one WebRTC sender, as frames encoded once for every sender of its codec
    (`SharedVideoEncoder`); `bind(sender, mime)` once the codec is negotiated. Unbound (or a codec without a shared
    encoder) it gives frames, which the sender encodes itself."""

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.shared: SharedVideoEncoder | None = None
        self.sender: Any = None
        self.last_seq: int | None = None  # the last frame this peer got (`EncodedTick.seq`)
        self.last_read = time.monotonic()  # its sender's last recv()
        self.first_tick: int | None = None  # the tick of the first frame this peer got
        self.started = asyncio.Event()  # set with it: this peer's audio starts at the same media time

    def bind(self, sender: Any, mime: str | None) -> bool:
        """Send through the session's shared encoder of `mime` on aiortc's RTCRtpSender `sender` (this track's):
        False (frames, as before) for a codec it has none for."""
        shared = self.session.shared_video_encoder(mime) if mime else None
        if shared is None:
            return False
        self.shared, self.sender = shared, sender
        sender._send_keyframe = shared.want_keyframe  # this peer's PLI / FIR (aiortc's sender calls it on either)
        shared.readers.add(self)
        shared.want_keyframe()  # this peer starts with one
        return True

    def target_bitrate(self) -> int | None:
        """What this peer's congestion control (REMB) asks of its sender's encoder; None until it exists."""
        encoder = getattr(self.sender, "_RTCRtpSender__encoder", None)  # aiortc keeps it in a private field
        return getattr(encoder, "target_bitrate", None)

    def _start(self, tick: int) -> None:
        if self.first_tick is None:
            self.first_tick = tick
            self.started.set()

    async def recv(self) -> av.VideoFrame | av.Packet:  # type: ignore[override]
        if self.shared is None:
            frame = await super().recv()
            self._start(self.position - 1)
            return frame
        while True:
            self.last_read = time.monotonic()
            tick, frame = await self._next_frame()
            entry = await self.shared.get(tick, frame)
            if entry is None or not entry.data:  # too far behind the others (or nothing to send): the next tick
                if entry is None:
                    self.shared.want_keyframe()
                continue
            if not entry.keyframe and (self.last_seq is None or entry.seq != self.last_seq + 1):
                # it refers to a frame this peer never got: wait for a key frame
                self.shared.want_keyframe()
                continue
            self.last_seq = entry.seq
            self.last_index = entry.index
            self._start(tick)
            packet = av.Packet(entry.data)
            packet.pts = tick * VIDEO_CLOCK_RATE // self.session.player.fps
            packet.time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
            return packet


class AvatarAudioTrack(_SessionTrack):
    kind = "audio"

    async def recv(self) -> av.AudioFrame:
        await self._ensure_live()
        player = self.session.player
        self._skip_if_behind(AUDIO_PTIME)
        packet = self.position
        rate = self.session.sample_rate
        per_packet = int(rate * AUDIO_PTIME)  # 320 samples at 16 kHz
        per_frame = self.session.samples_per_frame // per_packet  # packets per video frame (2)
        tick, part = divmod(packet, per_frame)
        frame = await player.get(tick, at=player.start + packet * AUDIO_PTIME)  # type: ignore[operator]
        self.position += 1
        self.last_index = None if frame.filler else frame.index
        chunk = frame.audio[part * per_packet:(part + 1) * per_packet]
        pcm = pcm16(chunk)[None]  # (1, 320)
        out = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        out.sample_rate = rate
        out.pts = packet * per_packet
        out.time_base = fractions.Fraction(1, rate)
        return out


class SharedAudioEncoder:
    """A session's sound encoded once every 20 ms for all of its peers, by aiortc's own Opus encoder with in-band FEC
    on (`rtc.opus_encoder`: a peer that lost a packet decodes it from the next one; 48 kHz stereo, as
    `rtc.OpusFramer` hands it over without delay). Opus needs no key frames: a peer may start at any packet, and a
    peer that misses some conceals them as after a loss on the network."""

    HISTORY = 50  # encoded packets kept (1 s) for a peer a little behind the first

    def __init__(self) -> None:
        self._framer = OpusFramer()
        self._encoder = opus_encoder()
        self.encoded: dict[int, bytes] = {}  # packet index -> its Opus packet, ascending
        self.last_packet = -1
        self.packets_encoded = 0

    def get(self, packet: int, frame: av.AudioFrame) -> bytes | None:
        """The Opus packet of the session's 20 ms `packet` (`frame`), encoded now if no peer asked for it before; None
        when it is older than the last one encoded and no longer kept, b"" when the encoder gave nothing."""
        if packet <= self.last_packet:
            return self.encoded.get(packet)
        self._framer.push(frame)
        data = b""
        while (pcm := self._framer.pop()) is not None:  # one 20 ms frame in, one out (~0.1 ms: on the loop)
            payloads, _ = self._encoder.encode(pcm)
            data = payloads[0] if payloads else data
        self.packets_encoded += bool(data)
        self.last_packet = packet
        return _keep(self.encoded, packet, data, self.HISTORY)


class SharedAudioTrack(AvatarAudioTrack):
    """The session's audio for one WebRTC sender, as Opus packets encoded once for all of its peers
    (`SharedAudioEncoder`), which the sender packs; `bind(sender, mime)` once the codec is negotiated. Unbound (or
    another codec: G.711) it gives frames, which the sender encodes itself.

    With `video` (the same peer's `SharedVideoTrack`) it starts at the tick of that track's first frame: a peer whose
    video waits for a key frame (it joined between two) then also hears from that frame on, so its two streams' first
    packets carry the same media time, which a receiver that lines them up by their first packets (the SDK) needs."""

    VIDEO_START_WAIT_S = 2.0  # past it (a video sender that never reads) the sound starts alone

    def __init__(self, session: Session, video: SharedVideoTrack | None = None) -> None:
        super().__init__(session)
        self.shared: SharedAudioEncoder | None = None
        self.video = video
        self.packets = 0  # Opus packets this peer was given
        self.first_packet: int | None = None  # the index of the first 20 ms this peer got

    def bind(self, sender: Any, mime: str | None) -> bool:
        """Send the session's shared Opus packets (False, frames as before, for another codec `mime`)."""
        if (mime or "").lower() != "audio/opus":
            return False
        self.shared = self.session.shared_audio_encoder()
        return True

    async def _start_with_video(self) -> None:
        video, self.video = self.video, None
        if video is not None and video.readyState == "live":
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(video.started.wait(), self.VIDEO_START_WAIT_S)
            if video.first_tick is not None:
                per_frame = self.session.samples_per_frame // int(self.session.sample_rate * AUDIO_PTIME)
                self.position = max(self.position, video.first_tick * per_frame)

    async def recv(self) -> av.AudioFrame | av.Packet:  # type: ignore[override]
        if self.video is not None:
            await self._start_with_video()
        if self.shared is None:
            frame = await super().recv()
            if self.first_packet is None:
                self.first_packet = self.position - 1
            return frame
        while True:
            frame = await super().recv()
            index = self.position - 1
            data = self.shared.get(index, frame)
            if data:
                self.packets += 1
                if self.first_packet is None:
                    self.first_packet = index
                packet = av.Packet(data)
                packet.pts = index * OPUS_PACKET
                packet.time_base = fractions.Fraction(1, OPUS_RATE)
                return packet
