"""The avatar as a Pipecat video service: a voice agent built with Pipecat gets a face that speaks its TTS, in sync,
from this process's engine (`pip install 'letstalk-rt[pipecat]'`) or from a LetsTalk server on a GPU machine
(`pip install 'letstalk-rt[pipecat-client]'`: the bot's machine needs no model, torch or GPU).

    from letstalk_rt.integrations.pipecat import LetsTalkVideoService

    engine = await StreamEngine(LetsTalkPipeline.from_pretrained()).start()   # once per process, shared by every bot
    avatar = LetsTalkVideoService(engine=engine, portrait="face.jpg")
    avatar = LetsTalkVideoService(server="https://avatars.example.com", api_key=KEY, portrait="face.jpg")  # or
    pipeline = Pipeline([transport.input(), stt, user_agg, llm, tts, avatar, transport.output(), assistant_agg])

Placed after the TTS, it takes the TTS's audio (`TTSAudioRawFrame`, any rate and channel count) into a session of the
engine and pushes, one tick every 40 ms, the avatar's frame (`OutputImageRawFrame`, RGB) and, while it speaks, the
same speech delayed to line up with it (`TTSAudioRawFrame`, 16 kHz mono; 48 kHz from a server, as WebRTC's Opus
gives it): the output transport plays them together (each image waits in its audio queue behind the sound before it,
`sync_with_audio`). Between utterances the frames keep coming (the avatar blinks and moves; no audio, so the transport
does not take it for the bot speaking). `TTSStoppedFrame` is held until the utterance has been shown to its end, so
the bot stops speaking when its face does. Frames the TTS timed against its audio (`pts`: word timestamps, their
text) are put as late as the speech, by the avatar's measured latency. `InterruptionFrame` (the user spoke over the
bot) drops the speech not yet shown, in this service and in the engine. `EndFrame` lets what was said finish
showing first; `CancelFrame` stops at once.

A service without `engine=` or `server=` loads `model` (the bundled default when None) and starts an engine of its
own when its pipeline starts (a warm-up of a few seconds to ~20 s on a CPU), stopped with it; many bots in one process
should share one started engine (`StreamEngine` or `EnginePool`): their sessions' windows are batched into one forward
pass. With `server=`, each bot's session is one of the server's, batched there with every other bot's; the service
deletes it when its pipeline ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    from pipecat.frames.frames import (CancelFrame, EndFrame, Frame, InterruptionFrame, OutputImageRawFrame,
                                       StartFrame, TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame)
    from pipecat.processors.frame_processor import FrameDirection
    from pipecat.services.ai_service import AIService
    from pipecat.services.settings import ServiceSettings
except ModuleNotFoundError as e:  # one line saying what to install, as the engine's own extras do
    raise ModuleNotFoundError(f"letstalk_rt.integrations.pipecat needs Pipecat ({e.name} is missing): "
                              "pip install 'letstalk-rt[pipecat]'", name=e.name) from None

from ..aio import wait_for
from ..errors import InputError, LetsTalkError
from ..framing import FRAMING
from ..media import pcm16

_END = object()  # in the audio queue: the utterance before it is over (TTSStoppedFrame)
REMOTE_AHEAD_S = 20.0  # speech sent to a server beyond what has played, at most (its queue holds 30 s by default)
REMOTE_QUIET_RMS = 30.0  # int16 RMS (-61 dBFS) under which received audio is silence: idle frames', a speech's end
REMOTE_AFTER_SHOWN_S = 0.2  # audio still pushed after audio_played: the media may come a little after the event


@dataclass
class _Out:
    """What the avatar shows next: an image, or audio (int16 mono) it speaks."""

    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB
    audio: np.ndarray | None = None
    rate: int = 16000
    quiet: bool = False  # past all the speech given so far (the TTS's stop may follow it)
    error: str | None = None  # an error the server reported on the session, which goes on (audio refused, ...)


class LetsTalkVideoService(AIService):
    """A Pipecat service that turns the TTS's speech into the avatar's frames and that speech in sync with them.

    In this process: `portrait`, a photo (a file, read at once: InputError if it is not one; an RGB array or a PIL
    image) or a `Portrait` the engine prepared; `engine`, a started `StreamEngine` or `EnginePool` to open the
    session on (None: one of its own from `model`, the bundled one when None, on `device`, CUDA when there is one);
    `seed`, `full_frame`, `framing`, `detect_face`: as `StreamEngine.open_session`.

    On a LetsTalk server (`letstalk serve` on a GPU machine; the bot's own machine needs no model): `server`, its URL,
    with `api_key` if it asks for one; `portrait` (a photo, uploaded) or `avatar_id` (one the server holds, default
    "default"); `seed`, `full_frame`, `framing` as `AvatarClient.start_session`. The speech goes over the session's
    websocket, the frames and that speech come back over WebRTC, merged here by media time.

    Errors (no face in the portrait, the engine or server full or unreachable, a window that failed, the connection
    lost) are pushed upstream as `ErrorFrame`s saying what went wrong, and the bot goes on with its voice alone: the
    TTS's frames then pass through untouched. An error the server reports on a session that goes on (speech it
    refused: `audio_rejected`) is an `ErrorFrame` too, with the server's reason, and the avatar goes on."""

    def __init__(self, *, portrait: Any = None, engine: Any = None, model: str | Path | None = None,
                 device: str | None = None, server: str | None = None, api_key: str | None = None,
                 avatar_id: str | None = None, seed: int = 0, full_frame: int = 0, framing: float = FRAMING,
                 detect_face: bool = True, **kwargs: Any) -> None:
        super().__init__(settings=ServiceSettings(model=None), **kwargs)
        if server is not None and (engine is not None or model is not None or device is not None):
            raise ValueError("LetsTalkVideoService: give `server` (the avatar on a LetsTalk server) or `engine` / "
                             "`model` / `device` (in this process), not both")
        if portrait is not None and avatar_id is not None:
            raise ValueError("LetsTalkVideoService: give `portrait` or `avatar_id`, not both")
        if server is None and avatar_id is not None:
            raise ValueError("LetsTalkVideoService: `avatar_id` names an avatar a server holds; give `server` too, "
                             "or a `portrait`")
        if server is None and portrait is None:
            raise ValueError("LetsTalkVideoService: give the `portrait` to animate")
        if isinstance(portrait, (str, Path)):  # read now: a wrong path or file is an InputError here, not mid-call
            from ..media import load_image

            portrait = load_image(portrait)
        if server is None:
            self._avatar: Any = _LocalAvatar(portrait, engine, model, device, dict(
                seed=seed, full_frame=full_frame, framing=framing, detect_face=detect_face))
        else:
            self._avatar = _RemoteAvatar(server, api_key, portrait, avatar_id, dict(
                seed=seed, full_frame=full_frame or None, framing=framing))
        self._open = False  # the avatar's session is open (False again once it ends: the voice alone from then)
        self._audio: asyncio.Queue = asyncio.Queue()  # (int16 (n, channels), rate) or _END, in the order they came
        self._feeding = False  # the feeder holds a piece it has not given yet (waiting for room)
        self._held_stops: list[Frame] = []  # TTSStoppedFrames waiting for their speech to be shown
        self._context_id: str | None = None  # the TTS context of the latest speech, put on the audio pushed out
        self._tasks: list[asyncio.Task] = []
        # Frames timed against the TTS's audio (`pts`: its word timestamps, their text, the reply's end) are put as
        # late as the avatar puts the speech: by its latency, measured as the time from an utterance's first audio in
        # (the avatar quiet) to that utterance's first audio out.
        self._latency_ns: int | None = None
        self._audio_in_at: int | None = None  # the pipeline clock when the utterance being measured came in
        self._held_timed: list[Frame] = []  # timed frames waiting for that measurement
        self._after_interrupt = False  # an interruption came and no speech since: timed frames that come now were
        # sent before it and overtaken by it (a system frame skips the queues): theirs is the speech it dropped

    @property
    def session(self) -> Any:
        """The avatar's session while the pipeline runs, None before StartFrame and after the end: in this process the
        engine's `letstalk_rt.stream.engine.Session` (stats(), events(), record(), broadcast()); on a server the SDK's
        `letstalk_rt.client.AvatarSession` (stats(), on(), broadcast(), overlay_url())."""
        return self._avatar.session if self._open else None

    def can_generate_metrics(self) -> bool:
        return True  # TTFB: an answer's first audio in to its first audio out, with the pipeline's enable_metrics

    @property
    def frame_size(self) -> tuple[int, int] | None:
        """(width, height) of the images it pushes, once its session is open (None before): best the output
        transport's `video_out_width/height`, which Pipecat otherwise resizes each image to."""
        return self._avatar.frame_size if self._open else None

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        try:
            await self._avatar.open()
        except (LetsTalkError, OSError) as e:  # no face, an unreadable photo, full, unreachable: the bot has no face
            await self._avatar.close()
            await self.push_error(error_msg=f"LetsTalk avatar: {e}; the bot goes on with its voice alone", exception=e)
            return
        self._open = True
        self._tasks = [self.create_task(self._feed(), "letstalk-feed"),
                       self.create_task(self._show(), "letstalk-show")]

    async def stop(self, frame: EndFrame) -> None:
        """The graceful end: what was said is shown to its end (at most the engine's queue's length), then closed."""
        await super().stop(frame)
        if self._open:
            loop = asyncio.get_running_loop()
            limit = loop.time() + self._avatar.max_pending_s + 5
            while self._open and not self._spoken() and loop.time() < limit:
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
        if direction is FrameDirection.DOWNSTREAM and self._open:
            if isinstance(frame, (TTSStartedFrame, TTSAudioRawFrame)):  # speech again after an interruption
                self._after_interrupt = False
            if isinstance(frame, TTSAudioRawFrame):  # taken in; it comes out with the frames that say it
                if self._audio_in_at is None and self._spoken():  # the avatar quiet: its latency shows in this one
                    self._audio_in_at = self.get_clock().get_time()
                    await self.start_ttfb_metrics()
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
                # All of this before anything awaited: meanwhile `_show` may put out the speech's first sound, and
                # with a measurement still open it would release the held frames timed to the dropped speech.
                self._drain()
                self._audio_in_at = None
                # what was timed to speech now dropped goes, as the output transport drops it from its clock queue
                self._held_timed = [f for f in self._held_timed if not f.interruptible]
                self._after_interrupt = True
                await self._avatar.interrupt()
                await self.cancel_ttfb_metrics()
                await self.push_frame(frame, direction)
                await self._release_stops()  # their speech was dropped: the TTS's turns still end
                return
            if frame.pts:
                if self._after_interrupt and frame.interruptible:  # timed to speech the interruption dropped
                    return
                if self._audio_in_at is not None or self._latency_ns is None:
                    self._held_timed.append(frame)
                else:
                    frame.pts += self._latency_ns
                    await self.push_frame(frame, direction)
                return
        if isinstance(frame, EndFrame):  # after stop() above: the stops it held go first
            await self._release_stops()
        await self.push_frame(frame, direction)

    # ----------------------------------------------------------------------------------------------------------

    def _spoken(self) -> bool:
        """Everything the TTS gave has been shown (or dropped by an interrupt)."""
        return self._audio.empty() and not self._feeding and self._avatar.shown

    def _drain(self) -> None:
        while not self._audio.empty():
            self._audio.get_nowait()

    async def _feed(self) -> None:
        """TTS audio into the session in order, as fast as it takes it (a TTS makes speech faster than real time;
        more than the engine holds waits here, not in the engine; an interrupt drops the piece waiting)."""
        while self._open:
            item = await self._audio.get()
            if not self._open:
                break
            self._feeding = True
            try:
                if item is _END:
                    await self._avatar.end_speech()
                else:
                    await self._avatar.push(*item)
            except (InputError, ValueError) as e:  # audio that cannot be speech (a rate out of range): this piece
                await self.push_error(error_msg=f"LetsTalk avatar: {e}", exception=e)
            except LetsTalkError as e:  # the session ended meanwhile (_show says why) or a send failed
                if not self._avatar.closed:
                    await self.push_error(error_msg=f"LetsTalk avatar: {e}", exception=e)
            finally:
                self._feeding = False

    async def _show(self) -> None:
        """The avatar's paced frames downstream: each image, then the speech it shows (played behind it)."""
        async for out in self._avatar.output():
            if out.error is not None:
                await self.push_error(error_msg=f"LetsTalk avatar: {out.error}")
                continue
            if out.image is not None:
                height, width = out.image.shape[:2]
                image = OutputImageRawFrame(image=out.image.tobytes(), size=(width, height), format="RGB")
                image.sync_with_audio = True  # shown when the audio pushed before it has been played
                await self.push_frame(image)
            if out.audio is not None:  # the TTS's audio, its pauses too; idle frames' silence is not the bot speaking
                await self.push_frame(TTSAudioRawFrame(audio=out.audio.tobytes(), sample_rate=out.rate,
                                                       num_channels=1, context_id=self._context_id))
                if self._audio_in_at is not None:  # the measured utterance's first sound is out
                    self._latency_ns = self.get_clock().get_time() - self._audio_in_at
                    self._audio_in_at = None
                    await self.stop_ttfb_metrics()
                    await self._release_timed()
            # its speech shown, and what follows it quiet (audio after the stop would start the bot speaking again)
            if self._held_stops and out.quiet and self._spoken():
                await self._release_stops()
        error = self._avatar.error  # the engine or server ended it (a window that failed), or None: closed by us
        if error is not None:  # the voice goes on without the face: the TTS's frames pass from now on
            self._open = False
            self._drain()
            await self._release_stops()
            await self._avatar.close_session()
            await self.push_error(error_msg=f"LetsTalk avatar: the session ended: {error}; the bot goes on with its "
                                  "voice alone")

    async def _release_stops(self) -> None:
        """The TTS's stops, and what was timed to its speech (shifted where the avatar's latency is known: the rest
        of a speech dropped or never shown goes as it came)."""
        if self._audio_in_at is not None:  # no sound of it came out: no latency to tell
            self._audio_in_at = None
            await self.cancel_ttfb_metrics()
        await self._release_timed()
        stops, self._held_stops = self._held_stops, []
        for frame in stops:
            await self.push_frame(frame)

    async def _release_timed(self) -> None:
        timed, self._held_timed = self._held_timed, []
        for frame in timed:
            frame.pts += self._latency_ns or 0
            await self.push_frame(frame)

    async def _close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await self.cancel_task(task)
        self._open = False
        await self._avatar.close()


class _LocalAvatar:
    """The avatar in this process: a session of a `StreamEngine` (its own, started on open and stopped on close,
    or one shared)."""

    def __init__(self, portrait: Any, engine: Any, model: str | Path | None, device: str | None,
                 open_args: dict) -> None:
        self.portrait, self.engine, self.model, self.device = portrait, engine, model, device
        self.open_args = open_args
        self.owns_engine = engine is None
        self.session: Any = None

    async def open(self) -> None:
        if self.engine is None:
            self.engine = await _start_engine(self.model, self.device)
        self.session = await self.engine.open_session(self.portrait, **self.open_args)

    @property
    def frame_size(self) -> tuple[int, int]:
        return self.session.frame_size

    @property
    def max_pending_s(self) -> float:
        return self.session.engine.config.max_pending_seconds  # (of a pool, the engine it opened on)

    @property
    def closed(self) -> bool:
        return self.session is None or self.session.closed

    @property
    def shown(self) -> bool:
        return self.closed or self.session.audio_shown

    @property
    def error(self) -> str | None:
        return self.session.error

    async def push(self, pcm: np.ndarray, rate: int) -> None:
        await self.session.push_audio_when_room(pcm, rate)

    async def end_speech(self) -> None:
        if not self.closed:
            self.session.end_speech()

    async def interrupt(self) -> None:
        if not self.closed:
            self.session.interrupt()

    async def output(self) -> AsyncIterator[_Out]:
        from ..stream.engine import unfaded_audio  # (local: the engine is loaded)

        rate = self.session.sample_rate
        async for av in self.session.frames():
            # a held frame's audio is left out, so the speech after it is sent as pushed, not faded back in
            audio = pcm16(unfaded_audio(av)) if av.pushed else None
            yield _Out(image=av.video, audio=audio, rate=rate,
                       quiet=not av.pushed and not av.filler)  # a held frame, late, tells nothing

    async def close_session(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def close(self) -> None:
        await self.close_session()
        self.session = None
        if self.owns_engine and self.engine is not None:
            engine, self.engine = self.engine, None
            await engine.stop()


class _RemoteAvatar:
    """The avatar on a LetsTalk server, through the SDK: speech sent on the session's websocket (ahead of real time,
    up to REMOTE_AHEAD_S beyond playback), its frames and that speech received over WebRTC (`connect(align=True)`:
    each frame once the audio of its time is in) and merged by media time. The received audio is pushed as the bot's
    speech only while it speaks: from its first sound after speech was sent until all that was sent has been shown
    (`AvatarSession.audio_shown`) and it has gone quiet; idle frames' silence is not the bot speaking."""

    def __init__(self, server: str, api_key: str | None, portrait: Any, avatar_id: str | None,
                 options: dict) -> None:
        self.url, self.api_key, self.portrait, self.avatar_id = server, api_key, portrait, avatar_id
        self.options = options
        self.client: Any = None
        self.session: Any = None
        self.speaking = False  # received audio is the bot's speech, pushed on
        self._shown_at: float | None = None  # when audio_shown was first seen while speaking
        self._mute_until = 0.0  # after an interrupt: what was on its way is not pushed
        self._ahead_until = 0.0  # loop time when everything sent would have played, at real-time pace
        self._epoch = 0  # interrupts so far: a send waiting for room is dropped by one
        self._closed_by_us = False

    async def open(self) -> None:
        from ..client import AvatarClient

        self.client = await AvatarClient(self.url, self.api_key).open()
        self.session = await self.client.start_session(self.portrait, avatar_id=None if self.portrait is not None
                                                       else self.avatar_id or "default", **self.options)
        await self.session.connect(align=True)

    @property
    def frame_size(self) -> tuple[int, int]:
        video = self.session.info["video"]
        return video["width"], video["height"]

    @property
    def max_pending_s(self) -> float:
        return self.session.max_queued_seconds

    @property
    def closed(self) -> bool:
        return self.session is None or self.session.closed or self.session.close_reason is not None

    @property
    def shown(self) -> bool:
        return self.closed or (self.session.audio_shown and not self.speaking)

    @property
    def error(self) -> str | None:
        if self._closed_by_us or self.session is None:
            return None
        reason = self.session.close_reason
        return f"closed by the server ({reason})" if reason else "the connection to the server was lost"

    async def push(self, pcm: np.ndarray, rate: int) -> None:
        loop, epoch = asyncio.get_running_loop(), self._epoch
        ahead = min(REMOTE_AHEAD_S, 0.7 * self.session.max_queued_seconds)  # what the server holds, with room
        while self._ahead_until - loop.time() > ahead:  # wait as playback goes
            await asyncio.sleep(0.1)
            if self._epoch != epoch or self.closed:
                return
        if pcm.shape[1] > 2:  # the SDK sends mono or stereo
            pcm = pcm.mean(axis=1).astype(np.int16)
        await self.session.send_audio(pcm, rate, ahead=True)
        self._ahead_until = max(self._ahead_until, loop.time()) + len(pcm) / rate

    async def end_speech(self) -> None:
        if not self.closed:
            await self.session.end_speech()

    async def interrupt(self) -> None:
        self._epoch += 1
        self._ahead_until = 0.0
        self.speaking, self._shown_at = False, None
        self._mute_until = time.monotonic() + REMOTE_AFTER_SHOWN_S
        if not self.closed:
            with contextlib.suppress(LetsTalkError, OSError):  # the connection went: _show ends and says so
                await self.session.interrupt()

    def _speech(self, chunk: Any) -> np.ndarray | None:
        """A received audio packet as int16 mono when it is the bot's speech, None when not."""
        mono = chunk.pcm.mean(axis=1)
        quiet = float(np.sqrt(np.mean(mono.astype(np.float64) ** 2))) < REMOTE_QUIET_RMS if len(mono) else True
        now = time.monotonic()
        if not self.speaking:
            self.speaking = not quiet and not self.session.audio_shown and now >= self._mute_until
        elif self.session.audio_shown:  # all sent has been shown: its last sound may still be on its way
            self._shown_at = self._shown_at or now
            if quiet and now - self._shown_at >= REMOTE_AFTER_SHOWN_S:
                self.speaking, self._shown_at = False, None
        else:
            self._shown_at = None
        return mono.astype(np.int16) if self.speaking else None

    async def output(self) -> AsyncIterator[_Out]:
        """Audio and video in media-time order: the audio before a frame's time, then the frame (its audio after it,
        as in-process). Audio a frame has not come for within 0.1 s goes on alone (video stalled or turned off)."""
        from ..client import AudioChunk

        received: asyncio.Queue = asyncio.Queue()

        async def read(iterator: AsyncIterator) -> None:
            try:
                async for item in iterator:
                    received.put_nowait(item)
            finally:
                received.put_nowait(None)

        async def errors() -> None:  # the server's `error` events: said, not fatal (the session goes on)
            with contextlib.suppress(LetsTalkError):  # the events end with the websocket: the media readers say why
                async for event in self.session.events():
                    if event.get("type") == "error":
                        received.put_nowait(event)

        readers = [asyncio.ensure_future(read(self.session.timed_video_frames())),
                   asyncio.ensure_future(read(self.session.audio_frames())), asyncio.ensure_future(errors())]
        held: list = []  # (media time, arrival, int16 mono, rate): speech waiting for the frame it follows
        ended = 0
        try:
            while ended < 2:
                try:
                    item = await wait_for(received.get(), 0.05)
                except asyncio.TimeoutError:
                    item = False
                if item is None:
                    ended += 1
                elif isinstance(item, dict):
                    yield _Out(error=f"the server said {item.get('code')}: {item.get('message')}")
                elif isinstance(item, AudioChunk):
                    speech = self._speech(item)
                    if speech is not None:
                        held.append((item.time, item.received_at, speech, item.sample_rate))
                elif item is not False:  # a TimedFrame
                    while held and held[0][0] < item.time:
                        _, _, speech, rate = held.pop(0)
                        yield _Out(audio=speech, rate=rate)
                    yield _Out(image=item.rgb, quiet=not self.speaking)
                while held and time.monotonic() - held[0][1] > 0.1:
                    _, _, speech, rate = held.pop(0)
                    yield _Out(audio=speech, rate=rate)
        finally:
            for reader in readers:
                reader.cancel()

    async def close_session(self) -> None:
        self._closed_by_us = True
        if self.session is not None:
            with contextlib.suppress(LetsTalkError, OSError, asyncio.TimeoutError):
                await self.session.close()

    async def close(self) -> None:
        await self.close_session()
        self.session = None
        if self.client is not None:
            client, self.client = self.client, None
            await client.close()


async def _start_engine(model: str | Path | None, device: str | None) -> Any:
    from ..cli import resolve_device
    from ..pipeline import LetsTalkPipeline
    from ..stream.engine import StreamEngine, run_off_loop

    device = resolve_device(device or "auto")  # CUDA where there is one; a wrong name is a LetsTalkError saying so
    pipe = await run_off_loop(lambda: LetsTalkPipeline.from_pretrained(model, device=device))
    return await StreamEngine(pipe).start()
