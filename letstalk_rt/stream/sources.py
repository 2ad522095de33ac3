"""Live audio sources behind one async interface: each yields (pcm, sample_rate) chunks.

    source = FileSource("speech.wav")                  # a file played at real-time pace
    source = TrackSource(remote_audio_track)          # an aiortc track received from a peer
    source = MicrophoneSource()                       # the local microphone (pip install 'letstalk-rt[devices]')
    source = TextSource("Hello!", Speech("en-us"))    # text spoken by espeak-ng, a sentence at a time
    await source.run(session)                         # push every chunk, then end_speech()

An application that produces PCM itself (another TTS, a websocket) calls `session.push_audio` directly.
Any rate and channel count is accepted; the session resamples to 16 kHz mono with PyAV.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..aio import wait_for
from ..errors import InputError
from ..media import frame_pcm
from ..tts import Speech, check_text, sentences

if TYPE_CHECKING:
    from .engine import Session


class AudioSource(ABC):
    paced = True  # chunks come at real-time pace; False: as fast as they are made (run() waits for room)

    @abstractmethod
    def chunks(self) -> AsyncIterator[tuple]:
        """Yield (samples, sample_rate), or (samples, sample_rate, caption): samples int16/float32 shaped (n,) or
        (n, channels); caption: the text they say (a `caption` event when they start playing)."""

    async def run(self, session: "Session", end_speech: bool = True) -> None:
        """Push every chunk into `session` until the source ends (or the session closes)."""
        async for pcm, rate, *caption in self.chunks():
            if session.closed:
                return
            caption = caption[0] if caption else None
            if self.paced:  # AudioBufferFull from a live source this far ahead of playback: the application must know
                session.push_audio(pcm, rate, caption=caption)
            else:  # faster than real time: waits until playback makes room (a chunk an interrupt drops is not pushed)
                await session.push_audio_when_room(pcm, rate, caption=caption)
        if end_speech and not session.closed:
            session.end_speech()


class FileSource(AudioSource):
    """A file decoded with PyAV and released at real-time pace, or (realtime=False) as fast as the session takes
    it: run() then keeps up to the engine's `max_pending_seconds` queued, however long the file."""

    def __init__(self, path: str | Path, realtime: bool = True, chunk_ms: int = 20, sample_rate: int = 16000) -> None:
        from ..media import load_audio

        self._start(load_audio(path, sample_rate), realtime, chunk_ms, sample_rate)  # InputError at construction

    @classmethod
    def from_samples(cls, audio: np.ndarray, realtime: bool = True, chunk_ms: int = 20,
                     sample_rate: int = 16000) -> "FileSource":
        """Audio decoded already (float32 mono at `sample_rate`, e.g. `media.decode_audio` of an upload), played as a
        file is."""
        source = cls.__new__(cls)
        source._start(audio, realtime, chunk_ms, sample_rate)
        return source

    def _start(self, audio: np.ndarray, realtime: bool, chunk_ms: int, sample_rate: int) -> None:
        self.audio = audio
        self.paced = realtime
        self.rate = sample_rate
        self.chunk = int(sample_rate * chunk_ms / 1000)

    @property
    def seconds(self) -> float:
        return len(self.audio) / self.rate

    async def chunks(self) -> AsyncIterator[tuple[np.ndarray, int]]:
        start = time.monotonic()
        for i, pos in enumerate(range(0, len(self.audio), self.chunk)):
            if self.paced:  # absolute schedule: chunk i is released at start + i * chunk duration
                delay = start + i * self.chunk / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            yield self.audio[pos:pos + self.chunk], self.rate


class TrackSource(AudioSource):
    """Audio frames received on an aiortc track (e.g. the browser's microphone)."""

    def __init__(self, track) -> None:
        if getattr(track, "kind", None) != "audio":
            raise InputError(f"TrackSource needs an audio track, got {getattr(track, 'kind', track)!r}")
        self.track = track

    async def chunks(self) -> AsyncIterator[tuple[np.ndarray, int]]:
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                frame = await self.track.recv()
            except MediaStreamError:
                return
            pcm = frame_pcm(frame)  # (n, channels): int16, or float32 in -1..1 (an s32 track's too)
            yield (pcm[:, 0] if pcm.shape[1] == 1 else pcm), frame.sample_rate


class MicrophoneSource(AudioSource):
    """A microphone (or any input device) through sounddevice / PortAudio (optional extra `[devices]`): `device` a
    name (or part of one) or a number (`devices.audio_devices()`), None the system's default. InputError naming the
    devices when it cannot be opened, and when it stops sending sound (unplugged, or taken away by the system): a
    device delivers its blocks, silent or not, all the time, so `stall_s` without one means it is gone."""

    def __init__(self, device: int | str | None = None, sample_rate: int = 16000, chunk_ms: int = 20,
                 max_queue: int = 100, stall_s: float = 3.0) -> None:
        from ..devices import load_sounddevice, unusable_device

        sd = load_sounddevice()  # InputError, saying what to install, before anything runs
        self.device = device
        self.rate = sample_rate
        try:  # ... and for a device that is not there
            sd.check_input_settings(device=device, channels=1, dtype="float32", samplerate=sample_rate)
        except (ValueError, sd.PortAudioError) as e:
            raise unusable_device("microphone", self.device, e) from None
        self.blocksize = int(sample_rate * chunk_ms / 1000)
        self.max_queue = max_queue  # 2 s of 20 ms blocks; older blocks are dropped if the loop lags
        self.stall_s = stall_s

    async def chunks(self) -> AsyncIterator[tuple[np.ndarray, int]]:
        import sounddevice as sd

        from ..devices import device_name, unusable_device

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[np.ndarray | None] = asyncio.Queue(self.max_queue)

        def put(block: np.ndarray | None) -> None:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(block)

        def callback(indata, frames, time_info, status) -> None:  # PortAudio thread
            loop.call_soon_threadsafe(put, indata[:, 0].copy())

        def finished() -> None:  # PortAudio thread: the stream ended (its device went, or we closed it)
            with contextlib.suppress(RuntimeError):  # (the loop already gone)
                loop.call_soon_threadsafe(put, None)

        try:
            stream = sd.InputStream(samplerate=self.rate, channels=1, dtype="float32", blocksize=self.blocksize,
                                    device=self.device, callback=callback, finished_callback=finished)
        except (ValueError, sd.PortAudioError) as e:
            raise unusable_device("microphone", self.device, e) from None
        name = device_name("microphone", self.device)
        with stream:
            while True:
                try:
                    block = await wait_for(queue.get(), self.stall_s)
                except asyncio.TimeoutError:
                    raise InputError(f"{name} sent no sound for {self.stall_s:g} s: unplugged, or taken by another "
                                     "program?") from None
                if block is None:
                    raise InputError(f"{name} stopped (unplugged?)")
                yield block, self.rate


class TextSource(AudioSource):
    """Text spoken by espeak-ng (`letstalk_rt.tts`), a sentence at a time: each is synthesised off the event loop while
    the avatar speaks the ones before it, and pushed as fast as it is made (run() keeps at most the engine's
    `max_pending_seconds` queued). The text and voice are checked here, before anything is spoken."""

    paced = False

    def __init__(self, text: str, speech: Speech | str | None = None, sample_rate: int = 16000) -> None:
        self.pieces = sentences(check_text(text))
        if not self.pieces:
            raise InputError(f"text to speak has no words: {text[:60]!r}")
        if speech is not None and not isinstance(speech, (Speech, str)):
            raise InputError(f"speech must be a Speech or a voice such as 'en-us', got {type(speech).__name__}")
        self.speech = Speech(speech) if isinstance(speech, str) else speech or Speech()  # a voice alone: checked now
        self.rate = sample_rate
        self.seconds = 0.0  # of speech made so far

    async def chunks(self) -> AsyncIterator[tuple[np.ndarray, int, str]]:
        for piece in self.pieces:
            pcm = await asyncio.to_thread(self.speech.synthesize, piece, self.rate)
            self.seconds += len(pcm) / self.rate
            yield pcm, self.rate, piece  # each sentence its caption
