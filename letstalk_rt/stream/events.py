"""Typed frames and events of a live session.

`AVFrame` is one 40 ms tick of output: a video frame and exactly the 640 audio samples the model was
conditioned on for it, so lips and sound travel together and cannot drift apart inside the engine.

Events are what an application subscribes to (`Session.events()`), in the conventions users know from
streaming-avatar APIs: the avatar started/stopped talking (at playback time, not at input time),
playback position, per-window timings, dropped frames, errors, closed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class AVFrame:
    """One output tick: a video frame and its audio."""

    index: int  # position in the session's generated sequence (0, 1, 2, ...)
    video: np.ndarray  # (H, W, 3) uint8 RGB
    audio: np.ndarray  # (samples_per_frame,) float32 mono 16 kHz: what this frame says
    speech: bool  # True when the audio holds the user's speech (not silence the engine inserted)
    latent: Tensor | None = None  # (C, h, w) the frame's clean latent, kept to roll the memory back on interrupt
    audio_time: float | None = None  # time.monotonic() when the last sample of this frame's speech arrived (latency)
    filler: bool = False  # True for a held frame shown because generation was late
    captions: tuple[str, ...] = ()  # captions of the audio that starts in this frame (push_audio(caption=...))
    pieces: int = 0  # the session's pushed audio played through by this frame: its last piece (Session.audio_shown)
    pushed: bool = False  # some of its audio is audio pushed to the session (speech, its pauses, end_speech's tail),
    # not only silence the engine put in while it had none (idle frames, held ones)
    faded_in: bool = False  # the first frame after a held one: its first 5 ms faded in from the held tick's silence
    # (`stream.engine.unfaded_audio` gives them back as pushed, for a reader that leaves held frames out)


@dataclass(frozen=True)
class Event:
    session_id: str
    time: float = field(default_factory=time.time)  # wall clock (seconds since the epoch)

    @property
    def type(self) -> str:
        return _EVENT_NAMES[type(self)]

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items()}
        d["type"] = self.type
        return d


@dataclass(frozen=True)
class SpeechStarted(Event):
    """The avatar started talking: the first frame with speech is being shown."""

    frame: int = 0


@dataclass(frozen=True)
class SpeechStopped(Event):
    """The avatar stopped talking (after a short hang-over of silence)."""

    frame: int = 0


@dataclass(frozen=True)
class AudioPlayed(Event):
    """Every piece of audio pushed to the session so far has now been shown and heard (`Session.audio_shown` became
    True): the frame that plays the last of it is being shown. Exact where `speech_stopped` is a guess from the sound
    (its level, after a hang-over of silence, mid-utterance at a long pause): after `end_speech()`, the utterance is
    over on screen. Not sent for audio an interrupt dropped (`interrupted` is). `pieces`: `Session.audio_pieces` when
    it was sent (the audio of every push that had queued by then has been shown)."""

    frame: int = 0
    pieces: int = 0


@dataclass(frozen=True)
class Caption(Event):
    """The audio pushed with this caption (`push_audio(caption=...)`; each sentence of a `say()`) starts playing now:
    subtitles in step with the lips, and, after an interrupt, exactly what was said before it."""

    text: str = ""
    frame: int = 0


@dataclass(frozen=True)
class PlaybackPosition(Event):
    """Emitted every second of playback: frames shown and seconds of output so far."""

    frame: int = 0
    seconds: float = 0.0
    speech_seconds: float = 0.0  # seconds of the user's speech played so far


@dataclass(frozen=True)
class WindowTimings(Event):
    """One generated window: how long it waited and took."""

    window: int = 0
    frames: int = 0
    batch: int = 1  # sessions in the forward pass
    encode_ms: float = 0.0  # audio encoding for this session's new audio (its share of the one call for all sessions)
    generate_ms: float = 0.0  # the sampling steps, whole batch
    decode_ms: float = 0.0  # DC-AE decode, whole batch
    lead_frames: int = 0  # frames generated ahead of playback after delivery


@dataclass(frozen=True)
class FramesDropped(Event):
    count: int = 0
    reason: Literal["interrupt", "late", "consumer"] = "late"


@dataclass(frozen=True)
class Interrupted(Event):
    """Pending speech was cleared; `dropped_frames` unshown frames were discarded."""

    dropped_frames: int = 0


@dataclass(frozen=True)
class SessionError(Event):
    message: str = ""


@dataclass(frozen=True)
class SessionClosed(Event):
    reason: str = "closed"


@dataclass(frozen=True)
class RecordingStopped(Event):
    """The session's recording ended (`Session.stop_recording()`, the session's close, or a failure): `path` the MP4
    it saved, or "" and `error` saying why nothing was saved; `captions` the WebVTT file of the captions it showed, saved
    beside it ("" when none were shown)."""

    path: str = ""
    captions: str = ""
    seconds: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class BroadcastStopped(Event):
    """One of the session's live streams to a streaming server ended (`Session.stop_broadcast()`, the session's close,
    or a failure: the server went away, the encoder fell behind): `url` with its stream key hidden, the `seconds` sent,
    and `error` saying why when it failed."""

    broadcast_id: str = ""  # which of the session's live streams (Broadcast.id)
    url: str = ""
    seconds: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class BroadcastReconnecting(Event):
    """The live stream's connection dropped (`error`: the server went away, or the stream fell behind a stalled one):
    connection `attempt` (1, 2, ...) is made in `delay_s`. The session streams on; the ticks shown meanwhile are not
    sent. Then `broadcast_resumed`, or `broadcast_stopped` with the error once `Session.broadcast`'s `reconnect_s` has
    passed without a connection."""

    broadcast_id: str = ""  # which of the session's live streams (Broadcast.id)
    url: str = ""
    attempt: int = 1
    delay_s: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class BroadcastResumed(Event):
    """The live stream is connected again after `attempts` tries, `down_s` seconds after it dropped: the server gets
    the session's ticks from now on (a new stream to it: the viewers of a platform see it resume)."""

    broadcast_id: str = ""  # which of the session's live streams (Broadcast.id)
    url: str = ""
    attempts: int = 1
    down_s: float = 0.0


@dataclass(frozen=True)
class BroadcastSkipped(Event):
    """The encode of the session's live streams fell `behind_s` behind (the CPU too busy to encode them too): the
    `frames` it had not encoded yet were skipped, as a live stream does not catch up. The stream goes on from the next
    tick shown (its viewers see the avatar jump ahead, with its sound); `Broadcast.skipped_frames` counts them all. One
    event for each of the session's streams at that bitrate (they share the encode)."""

    broadcast_id: str = ""  # which of the session's live streams (Broadcast.id)
    url: str = ""
    frames: int = 0
    behind_s: float = 0.0


@dataclass(frozen=True)
class EngineAdjusted(Event):
    """The shared engine changed how much work a window gets, for every session on it: its windows fell
    `behind_ms` behind real time (another process took the cores), so it went from `before` to `after`
    noise draws per window (a little less lip sync, more flicker) or torch threads; or, later, tried more
    threads or draws again (`behind_ms` 0; EngineConfig.threads_raise_after_s)."""

    change: Literal["noise_draws", "threads"] = "threads"
    before: int = 0
    after: int = 0
    behind_ms: float = 0.0


_EVENT_NAMES: dict[type, str] = {
    SpeechStarted: "speech_started",
    SpeechStopped: "speech_stopped",
    AudioPlayed: "audio_played",
    Caption: "caption",
    PlaybackPosition: "playback_position",
    WindowTimings: "window_timings",
    FramesDropped: "frames_dropped",
    Interrupted: "interrupted",
    SessionError: "error",
    SessionClosed: "closed",
    RecordingStopped: "recording_stopped",
    BroadcastStopped: "broadcast_stopped",
    BroadcastReconnecting: "broadcast_reconnecting",
    BroadcastResumed: "broadcast_resumed",
    BroadcastSkipped: "broadcast_skipped",
    EngineAdjusted: "engine_adjusted",
}
