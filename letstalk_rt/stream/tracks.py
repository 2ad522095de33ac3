"""aiortc tracks of a session: video and audio paced against the session's one absolute clock.

aiortc's sender does not pace by pts, so `recv()` sleeps until each frame's due time itself. Both
tracks read the same `Player`: video frame i is due at `start + i / fps`, audio packet j (20 ms) at
`start + j * 0.02`, and packets 2i and 2i+1 carry frame i's own audio. No chained sleeps: every due
time is computed from `start`, so nothing drifts however long the stream runs. A reader that falls
more than `late_skip_ms` behind (a stalled consumer) jumps to the present instead of bursting.

The server hands the audio track to its WebRTC sender through `rtc.OpusAudioTrack`: as 48 kHz stereo, what aiortc's
Opus encoder sends the moment it gets it.
"""

from __future__ import annotations

import fractions
import time
from typing import TYPE_CHECKING

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

if TYPE_CHECKING:
    from .engine import Session

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

    async def recv(self) -> av.VideoFrame:
        await self._ensure_live()
        player = self.session.player
        self._skip_if_behind(1 / player.fps)
        tick = self.position
        frame = await player.get(tick)
        self.position += 1
        self.last_index = None if frame.filler else frame.index
        out = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame.video), format="rgb24")
        out.pts = tick * VIDEO_CLOCK_RATE // player.fps
        out.time_base = fractions.Fraction(1, VIDEO_CLOCK_RATE)
        return out


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
        pcm = (np.clip(chunk, -1.0, 1.0) * 32767).astype(np.int16)[None]  # (1, 320)
        out = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        out.sample_rate = rate
        out.pts = packet * per_packet
        out.time_base = fractions.Fraction(1, rate)
        return out
