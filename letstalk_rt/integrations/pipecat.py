"""The avatar as a Pipecat video service: a voice agent built with Pipecat (`pip install 'letstalk-rt[pipecat]'`)
gets a face that speaks its TTS, in sync, from this process's engine.

    from letstalk_rt.integrations.pipecat import LetsTalkVideoService

    engine = await StreamEngine(LetsTalkPipeline.from_pretrained()).start()   # once per process, shared by every bot
    avatar = LetsTalkVideoService(engine=engine, portrait="face.jpg")
    pipeline = Pipeline([transport.input(), stt, user_agg, llm, tts, avatar, transport.output(), assistant_agg])

Placed after the TTS, it takes the TTS's audio (`TTSAudioRawFrame`, any rate and channel count) into a session of the
engine and pushes, one tick every 40 ms, the avatar's frame (`OutputImageRawFrame`, RGB) and, while it speaks, the
same speech delayed to line up with it (`TTSAudioRawFrame`, 16 kHz mono): the output transport plays them together
(each image waits in its audio queue behind the sound before it, `sync_with_audio`). Between utterances the frames keep
coming (the avatar blinks and moves; no audio, so the transport does not take it for the bot speaking).
`TTSStoppedFrame` is held until the utterance has been shown to its end, so the bot stops speaking when its face
does. `InterruptionFrame` (the user spoke over the bot) drops the speech not yet shown, in this service and in the
engine. `EndFrame` lets what was said finish showing first; `CancelFrame` stops at once.

A service without `engine=` loads `model` (the bundled default when None) and starts an engine of its own when its
pipeline starts (a warm-up of a few seconds to ~20 s on a CPU), stopped with it; many bots in one process should share
one started engine (`StreamEngine` or `EnginePool`): their sessions' windows are batched into one forward pass.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

try:
    from pipecat.frames.frames import (CancelFrame, EndFrame, Frame, InterruptionFrame, OutputImageRawFrame,
                                       StartFrame, TTSAudioRawFrame, TTSStoppedFrame)
    from pipecat.processors.frame_processor import FrameDirection
    from pipecat.services.ai_service import AIService
    from pipecat.services.settings import ServiceSettings
except ModuleNotFoundError as e:  # one line saying what to install, as the engine's own extras do
    raise ModuleNotFoundError(f"letstalk_rt.integrations.pipecat needs Pipecat ({e.name} is missing): "
                              "pip install 'letstalk-rt[pipecat]'", name=e.name) from None

from ..errors import InputError, LetsTalkError
from ..framing import FRAMING
from ..media import pcm16

_END = object()  # in the audio queue: the utterance before it is over (TTSStoppedFrame)


class LetsTalkVideoService(AIService):
    """A Pipecat service that turns the TTS's speech into the avatar's frames and that speech in sync with them.

    `portrait`: a photo (a file, read at once: InputError if it is not one; an RGB array or a PIL image) or a
    `Portrait` the engine prepared; `engine`: a started `StreamEngine` or `EnginePool` to open the session on (None:
    one of its own from `model` on `device`); `seed`, `full_frame`, `framing`, `detect_face`: as
    `StreamEngine.open_session`. Errors (no face in the portrait, the
    engine full, a window that failed) are pushed upstream as `ErrorFrame`s saying what went wrong, and the bot goes
    on with its voice alone: the TTS's frames then pass through untouched."""

    def __init__(self, *, portrait: Any, engine: Any = None, model: str | Path | None = None, device: str | None = None,
                 seed: int = 0, full_frame: int = 0, framing: float = FRAMING, detect_face: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(settings=ServiceSettings(model=None), **kwargs)
        if isinstance(portrait, (str, Path)):  # read now: a wrong path or file is an InputError here, not mid-call
            from ..media import load_image

            portrait = load_image(portrait)
        self._portrait = portrait
        self._engine = engine
        self._owns_engine = engine is None
        self._model, self._device = model, device
        self._open_args = dict(seed=seed, full_frame=full_frame, framing=framing, detect_face=detect_face)
        self._session: Any = None
        self._audio: asyncio.Queue = asyncio.Queue()  # (int16 (n, channels), rate) or _END, in the order they came
        self._feeding = False  # the feeder holds a piece it has not pushed yet (waiting for room in the engine)
        self._held_stops: list[Frame] = []  # TTSStoppedFrames waiting for their speech to be shown
        self._context_id: str | None = None  # the TTS context of the latest speech, put on the audio pushed out
        self._tasks: list[asyncio.Task] = []

    @property
    def session(self) -> Any:
        """The engine session (`letstalk_rt.stream.engine.Session`) while the pipeline runs: stats(), events(),
        record(), broadcast(); None before StartFrame and after the end."""
        return self._session

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        try:
            if self._engine is None:
                self._engine = await _start_engine(self._model, self._device)
            self._session = await self._engine.open_session(self._portrait, **self._open_args)
        except LetsTalkError as e:  # no face, an unreadable photo, the engine full: the bot cannot show a face
            await self.push_error(error_msg=f"LetsTalk avatar: {e}; the bot goes on with its voice alone", exception=e)
            return
        self._tasks = [self.create_task(self._feed(), "letstalk-feed"),
                       self.create_task(self._show(), "letstalk-show")]

    async def stop(self, frame: EndFrame) -> None:
        """The graceful end: what was said is shown to its end (at most the engine's queue's length), then closed."""
        await super().stop(frame)
        session = self._session
        if session is not None and not session.closed:
            limit = asyncio.get_running_loop().time() + self._engine_config().max_pending_seconds + 5
            while (not self._spoken()) and asyncio.get_running_loop().time() < limit and not session.closed:
                await asyncio.sleep(0.04)
        await self._close()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._close()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._close()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction is FrameDirection.DOWNSTREAM and self._session is not None:
            if isinstance(frame, TTSAudioRawFrame):  # taken in; it comes out with the frames that say it
                channels = max(1, frame.num_channels)
                pcm = np.frombuffer(frame.audio, np.int16)
                pcm = pcm[:len(pcm) // channels * channels].reshape(-1, channels)
                self._context_id = frame.context_id
                self._audio.put_nowait((pcm, frame.sample_rate))
                return
            if isinstance(frame, TTSStoppedFrame):
                self._audio.put_nowait(_END)
                self._held_stops.append(frame)
                return
            if isinstance(frame, InterruptionFrame):
                self._interrupt()
                await self.push_frame(frame, direction)
                await self._release_stops()  # their speech was dropped: the TTS's turns still end
                return
        if isinstance(frame, EndFrame):  # after stop() above: the stops it held go first
            await self._release_stops()
        await self.push_frame(frame, direction)

    # ----------------------------------------------------------------------------------------------------------

    def _engine_config(self) -> Any:
        engine = self._engine
        return (engine.engines[0] if hasattr(engine, "engines") else engine).config

    def _spoken(self) -> bool:
        """Everything the TTS gave has been shown (or dropped by an interrupt)."""
        return self._audio.empty() and not self._feeding and self._session.audio_shown

    def _interrupt_queue(self) -> None:
        while not self._audio.empty():
            self._audio.get_nowait()

    def _interrupt(self) -> None:
        self._interrupt_queue()
        if not self._session.closed:
            self._session.interrupt()

    async def _feed(self) -> None:
        """TTS audio into the session in order, as fast as its queue takes it (a TTS makes speech faster than real
        time; more than the engine holds waits here, not in the engine; an interrupt drops the piece waiting)."""
        session = self._session
        while not session.closed:
            item = await self._audio.get()
            if session.closed:
                break
            self._feeding = True
            try:
                if item is _END:
                    session.end_speech()
                else:
                    await session.push_audio_when_room(*item)
            except InputError as e:  # audio that cannot be speech (a rate out of range): this piece, said so
                await self.push_error(error_msg=f"LetsTalk avatar: {e}", exception=e)
            finally:
                self._feeding = False

    async def _show(self) -> None:
        """The session's paced frames downstream: each image, then the speech it shows (played behind it)."""
        session = self._session
        async for av in session.frames():
            height, width = av.video.shape[:2]
            image = OutputImageRawFrame(image=av.video.tobytes(), size=(width, height), format="RGB")
            image.sync_with_audio = True  # shown when the audio pushed before it has been played
            await self.push_frame(image)
            if av.pushed:  # the TTS's audio, its pauses too; idle frames' silence is not the bot speaking
                pcm = pcm16(av.audio)
                await self.push_frame(TTSAudioRawFrame(audio=pcm.tobytes(), sample_rate=session.sample_rate,
                                                       num_channels=1, context_id=self._context_id))
            # its speech shown, and end_speech's silent tail (audio after the stop would start the bot speaking
            # again): the first generated frame without pushed audio (a held one, late, tells nothing)
            if self._held_stops and not av.pushed and not av.filler and self._spoken():
                await self._release_stops()
        error = session.error  # the engine ended it (a window that failed), or None: closed by this service
        if error is not None:  # the voice goes on without the face: the TTS's frames pass from now on
            self._session = None
            self._interrupt_queue()
            await self._release_stops()
            await session.close()
            await self.push_error(error_msg=f"LetsTalk avatar: the session ended: {error}; the bot goes on with its "
                                  "voice alone")

    async def _release_stops(self) -> None:
        stops, self._held_stops = self._held_stops, []
        for frame in stops:
            await self.push_frame(frame)

    async def _close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await self.cancel_task(task)
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        if self._owns_engine and self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.stop()


async def _start_engine(model: str | Path | None, device: str | None) -> Any:
    from ..pipeline import LetsTalkPipeline
    from ..stream.engine import StreamEngine, run_off_loop

    pipe = await run_off_loop(lambda: LetsTalkPipeline.from_pretrained(model, device=device))
    return await StreamEngine(pipe).start()
