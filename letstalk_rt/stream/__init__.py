"""The live part: engine, audio sources, paced WebRTC tracks, typed events."""

from .engine import (AudioBufferFull, CapacityError, EngineConfig, Session, SessionClosedError, StreamEngine,
                     release_openmp_threads, run_off_loop)
from .events import AVFrame, Event
from .pool import EnginePool
from .recorder import Recording
from .sources import AudioSource, FileSource, MicrophoneSource, TextSource, TrackSource

__all__ = [
    "AVFrame", "AudioBufferFull", "AudioSource", "CapacityError", "EngineConfig", "EnginePool", "Event", "FileSource",
    "MicrophoneSource", "Recording", "Session", "SessionClosedError", "StreamEngine", "TextSource", "TrackSource",
    "release_openmp_threads", "run_off_loop",
]
