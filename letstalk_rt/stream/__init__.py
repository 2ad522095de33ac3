"""The live part: engine, audio sources, paced WebRTC tracks, typed events.

The engine (and with it torch) loads on first use of one of its names: a machine that only listens to a server
(`letstalk camera --server`, the SDK) reads its file or microphone through the sources without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

from .events import AVFrame, Event
from .sources import AudioSource, FileSource, MicrophoneSource, TextSource, TrackSource

_LAZY = {
    **dict.fromkeys(("AudioBufferFull", "CapacityError", "EngineConfig", "Session", "SessionClosedError",
                     "StreamEngine", "release_openmp_threads", "run_off_loop"), ".engine"),
    "EnginePool": ".pool",
    "Motion": ".motion",
    "Recording": ".recorder",
}

if TYPE_CHECKING:
    from .engine import (AudioBufferFull, CapacityError, EngineConfig, Session, SessionClosedError, StreamEngine,
                         release_openmp_threads, run_off_loop)
    from .motion import Motion
    from .pool import EnginePool
    from .recorder import Recording


__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "AVFrame", "AudioBufferFull", "AudioSource", "CapacityError", "EngineConfig", "EnginePool", "Event", "FileSource",
    "MicrophoneSource", "Motion", "Recording", "Session", "SessionClosedError", "StreamEngine", "TextSource",
    "TrackSource", "release_openmp_threads", "run_off_loop",
]
