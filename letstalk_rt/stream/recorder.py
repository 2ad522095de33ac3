"""Recording a live session: what its viewers were shown, to an MP4 (H.264 + AAC), or live to a streaming server.

Every tick of the session's clock goes in as it is shown (`Player._observe`): the generated frames, the frames held
while a window was late, and the audio that played with each, so the recording is the stream itself, in sync, with
its stalls. The event loop only queues each frame; `media.VideoWriter` encodes in a thread of the recording's own,
and the file appears at its path only when the recording ends well (`Session.stop_recording()`, the session's
close). A failure (a full disk, an encoder that falls `max_behind_s` behind the stream on a CPU too busy) stops the
recording, deletes its partial file and says why in a `recording_stopped` event; the session streams on.

The captions the session showed (text said with `say`, or pushed with `caption=`) are saved beside the MP4 as WebVTT
subtitles (`captions_path`: the same name, `.vtt`), timed to the ticks their speech showed at, written before the MP4
moves into place.

`Broadcast` sends the same ticks live to a streaming server instead (RTMP, SRT, MPEG-TS; `broadcaster.LiveOutput`),
encoded once for all of a session's servers by a `BroadcastEncode` (`broadcaster.LiveEncoding`). All three are a
`TickStream`: the queue, the thread and the failure handling they share, and the session's clock kept running while
one lasts, so a session needs no viewer to be recorded or to stream to a platform.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import cc608
from ..errors import OutputError
from ..media import VideoWriter, write_text_atomic
from .events import (AVFrame, BroadcastReconnecting, BroadcastResumed, BroadcastSkipped, BroadcastStopped, Event,
                     RecordingStopped)

if TYPE_CHECKING:
    from ..broadcaster import LiveEncoding, LiveOutput
    from .engine import Session

log = logging.getLogger(__name__)


QUEUE_BYTES = 128 * 2**20  # frames waiting for a recording's encoder
RECONNECT_MAX_DELAY_S = 15.0  # the longest wait between a dropped broadcast's tries to connect again
AUDIO_TAIL_TICKS = 2  # a broadcast that stops waits for these ticks more: the AAC encoder's packets of the last one


def captions_path(video: str | Path) -> Path:
    """Where the captions of a video are saved: beside it, the same name with `.vtt` (players look there)."""
    return Path(video).with_suffix(".vtt")


@dataclass
class CaptionCues:
    """Captions timed to the ticks of a stream: each from the tick its speech began to show until the next caption, or
    `linger_s` after the last tick of speech shown under it (a player keeps the line up while it is read)."""

    fps: int
    linger_s: float = 0.5
    cues: list[tuple[int, int, str]] = field(default_factory=list)  # (first tick, tick after the last, text)
    _open: tuple[int, str] | None = None
    _last_speech: int = -1

    def add(self, tick: int, frame: AVFrame) -> None:
        """A shown tick (ticks in order, from 0)."""
        for text in frame.captions:
            text = " ".join(text.split())
            if self._open is not None and self._open[0] == tick:  # two on one tick: one line
                self._open = (tick, f"{self._open[1]} {text}")
            elif text:
                self.close(tick)
                self._open = (tick, text)
        if frame.speech:
            self._last_speech = tick

    @property
    def count(self) -> int:
        """The captions so far, the one still showing included."""
        return len(self.cues) + (self._open is not None)

    def close(self, tick: int) -> None:
        """End the open caption by `tick` at the latest (the next caption's tick, or the stream's end)."""
        if self._open is None:
            return
        start, text = self._open
        spoken = max(self._last_speech + 1, start + 1)
        self.cues.append((start, max(start + 1, min(tick, spoken + round(self.linger_s * self.fps))), text))
        self._open = None

    def webvtt(self) -> str:
        """The closed cues as a WebVTT file's text."""
        def stamp(tick: int) -> str:
            ms = round(tick * 1000 / self.fps)
            return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"

        def escape(text: str) -> str:  # a cue's text may not hold "-->", and '<' / '&' start markup
            return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

        return "WEBVTT\n\n" + "".join(f"{i}\n{stamp(a)} --> {stamp(b)}\n{escape(text)}\n\n"
                                       for i, (a, b, text) in enumerate(self.cues, 1))


class TickStream(abc.ABC):
    """What a session shows, tick by tick, to an encoder in a thread of its own: the base of a `Recording` (to an MP4)
    and a `Broadcast` (live to a streaming server). The event loop only queues each tick (`add`, never blocking);
    `stop()` lets the thread write the rest and finish; a failure ends it, saying why (`error`), the session streaming
    on. Subclasses write a tick (`_write`, counting `frames`), finish (`_finish`) and say it ended (`_done`)."""

    def __init__(self, session: Session, writer: Any, max_behind_s: float, name: str, keep_clock: bool = True) -> None:
        self.session = session
        self.fps = session.pipeline.fps
        width, height = session.frame_size
        self._writer = writer
        self.frames = 0  # ticks written
        self.state = "recording"  # then "finished" or "failed"
        self.error: str | None = None
        # At most max_behind_s of frames waiting, and at most QUEUE_BYTES of them (a 1280x720 frame is 2.8 MB)
        most = min(int(max_behind_s * self.fps), QUEUE_BYTES // (width * height * 3))
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, most))
        self._max_behind_s = self._queue.maxsize / self.fps
        self._stopping = False
        self._ended = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        # Not a daemon: a process that exits while a recording is being finished waits for its file.
        self._thread = threading.Thread(target=self._run, name=f"{name}-{session.id}")
        self._thread.start()
        # It keeps the session's clock running while it lasts (a paced session's: an unpaced one's reader sets the
        # pace), so what it records or streams needs no viewer.
        self._clock = (session.loop.create_task(self._keep_clock(), name=f"session-{session.id}-{name}-clock")
                       if session.player.paced and keep_clock else None)

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    @property
    def queued(self) -> int:
        """Frames waiting for the encoder (a reader faster than real time, an unpaced session's, waits on it)."""
        return self._queue.qsize()

    def add(self, frame: AVFrame) -> None:
        """Queue a shown tick (event loop; never blocks). An encoder `max_behind_s` behind: `_fell_behind`."""
        if self._stopping or self.state != "recording":
            return
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            self._fell_behind()

    def _fell_behind(self) -> None:
        """The encoder is max_behind_s behind (event loop): it fails and ends."""
        self._end(f"the encoder fell {self._max_behind_s:g} s behind the stream (the CPU is too busy to record this "
                  "session too)")

    def _end(self, reason: str) -> None:
        """Fail with `reason` and end now, what is queued unwritten (event loop)."""
        self._fail(reason)
        self._stopping = True
        with contextlib.suppress(queue.Empty):  # room for the end marker: the thread aborts and ends
            self._queue.get_nowait()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    async def stop(self) -> None:
        """Write the rest and finish (off the loop); OutputError saying why when it had failed (`_failure`)."""
        if not self._stopping:
            self._stopping = True
            await asyncio.to_thread(self._queue.put, None)
        await self._ended.wait()
        if self.state != "finished":
            raise OutputError(self._failure())

    def _failure(self) -> str:
        return str(self.error)

    async def _keep_clock(self) -> None:
        """Read the session's frames on its clock (a viewer's reads and these share its ticks; each tick is written
        once, through `Player._observe`)."""
        async for _ in self.session.frames():
            if self._stopping or self.state not in ("recording", "reconnecting"):
                return

    # -- the thread

    def _fail(self, reason: str) -> None:
        if self.state == "recording":
            self.state, self.error = "failed", reason

    @abc.abstractmethod
    def _write(self, frame: AVFrame) -> None:
        """Write one tick (the thread), adding to `frames`; OutputError when the writer fails."""

    @abc.abstractmethod
    def _finish(self) -> None:
        """Write the end (the thread, after the last tick): the encoders' tail, the file's index or stream's end."""

    def _run(self) -> None:
        try:
            while True:
                frame = self._queue.get()
                if frame is None or self.state != "recording":
                    break
                self._write(frame)
            if self.state == "recording":
                self._finish()
                self.state = "finished"
        except OutputError as e:  # what the writers raise for the disk, the network and the encoders
            self._fail(str(e))
        except Exception as e:  # noqa: BLE001 - the thread's edge: anything else ends it too, said
            log.exception("%s of session %s failed", type(self).__name__, self.session.id)
            self._fail(f"{type(e).__name__}: {e}")
        finally:
            self._writer.abort()  # no-op once closed: a failed recording leaves no partial file
            with contextlib.suppress(queue.Empty):  # frames nobody will write: and room for stop()'s end marker,
                while True:  # which would otherwise wait forever on the queue an encoder that died left full
                    self._queue.get_nowait()
            try:
                self._loop.call_soon_threadsafe(self._done)
            except RuntimeError:  # the event loop is gone (the process is exiting): nobody is left to tell
                pass

    def _done(self) -> None:
        """On the event loop once the thread has ended: wake stop() and say how it ended."""
        self._ended.set()
        if self._clock is not None:
            self._clock.cancel()


class Recording(TickStream):
    """One session's recording to `path` (an .mp4; its folder must exist). Made by `Session.record`."""

    def __init__(self, session: Session, path: str | Path, crf: int = 23, preset: str = "veryfast",
                 max_behind_s: float = 10.0, save_on_close: bool = True) -> None:
        self.path = Path(path)
        self.save_on_close = save_on_close  # the session's close saves it (False: discards it; Session.record)
        self.captions_path = captions_path(self.path)
        self.cues = CaptionCues(session.pipeline.fps)  # the recording's thread adds to it
        # Opens the partial file now: a path that cannot be written raises OutputError here, before anything runs. On
        # the event loop: its folder is not scanned for a killed writer's files (the server does that in a thread)
        writer = VideoWriter(self.path, session.frame_size, session.pipeline.fps, session.sample_rate, crf=crf,
                             preset=preset, remove_stale=False)
        super().__init__(session, writer, max_behind_s, "record")

    def describe(self) -> dict:
        return {"state": self.state, "path": str(self.path), "seconds": round(self.seconds, 2),
                "captions": self.cues.count, **({"error": self.error} if self.error else {})}

    async def stop(self) -> Path:  # type: ignore[override]
        """Finish the file and move it into place (the encoder's tail and the MP4's index, off the loop); returns its
        path, or raises OutputError saying why there is none."""
        await super().stop()
        return self.path

    def _failure(self) -> str:
        return f"the recording '{self.path}' was not saved: {self.error}"

    async def abort(self, reason: str) -> None:
        """End the recording without saving it: its partial file is deleted and `recording_stopped` carries `reason`
        (what was shown so far is not the video that was asked for, and must not be left looking complete). A recording
        already being finished (`stop`) is saved as it would have been."""
        if not self._stopping:
            self._fail(reason)
            self._stopping = True
            await asyncio.to_thread(self._queue.put, None)
        await self._ended.wait()

    # -- the recording's thread

    def _write(self, frame: AVFrame) -> None:
        """One shown tick into the file (and `frames`)."""
        self.cues.add(self.frames, frame)
        self._writer.write_frame(frame.video)
        self._writer.write_audio(frame.audio)
        self.frames += 1

    def _finish(self) -> None:
        self.cues.close(self.frames)
        captions = self.frames > 0 and bool(self.cues.cues)
        if captions:  # before the MP4: a recording in place has its captions in place
            write_text_atomic(self.captions_path, self.cues.webvtt(), "free disk space")
        try:
            self._writer.close()  # OutputError (and no file) when not even one frame was shown
        except BaseException:
            if captions:
                self.captions_path.unlink(missing_ok=True)
            raise

    def _done(self) -> None:
        super()._done()
        s = self.session
        saved = self.state == "finished"
        s._emit(RecordingStopped(s.id, path=str(self.path) if saved else "",
                                 captions=str(self.captions_path) if saved and self.cues.cues else "",
                                 seconds=round(self.seconds, 2), error=self.error or ""), force=True)
        if s.recording is self:
            s.recording = None
        s.last_recording = self


@dataclass(frozen=True)
class EncodedTick:
    """One shown tick as the servers of a session's live streams get it: its packets (`broadcaster.pack`ed), whether
    they hold a keyframe (where a server may start), and the captions that start in it (each server adds its own)."""

    packets: bytes
    key: bool
    captions: tuple[str, ...]
    seq: int  # its place among the ticks its encode handed out (from 1)


class BroadcastEncode(TickStream):
    """The encode of a session's live streams at one bitrate, done once for all of them (YouTube and Twitch at once
    cost one x264 encode, not two), in a process of its own (`broadcaster.LiveEncoding`). Made by `Session.broadcast`
    for its first stream at that bitrate; each `Broadcast` `join`s it and gets every tick's packets from then on (its
    `add`), asking for a keyframe to start at (`want_key`); it ends when the last one leaves.

    The event loop queues each tick shown while a stream is joined (as a recording does); the thread writes them to the
    encoding process, and a second thread reads what it says: the streams' template once (`template`), then each
    tick's packets, handed to the streams on the event loop. An encode that falls `max_behind_s` behind (a CPU too
    busy) skips the ticks waiting, as a live stream does not catch up, and tells its streams (`broadcast_skipped`); an
    encoding process that fails ends every stream it fed, cleanly and saying why."""

    def __init__(self, session: Session, writer: LiveEncoding, max_behind_s: float = 5.0) -> None:
        self.bitrate_kbps = writer.bitrate_kbps
        self.members: list[Broadcast] = []  # the streams it feeds
        self.pending = 0  # streams connecting, to join once connected
        self.template: bytes | None = None  # the streams' codecs and headers (`LiveEncoder.template`)
        self._templated = threading.Event()
        self._keys_wanted = self._keys_made = 0  # want_key() calls, and those the thread has made a keyframe for
        self._captions: collections.deque[tuple[str, ...]] = collections.deque()  # of the ticks the child has
        self.ticks_in = self.ticks_out = 0  # ticks queued to be encoded, and encoded ticks handed to the streams
        self._flushes: list[tuple[int, asyncio.Future]] = []  # flushed()'s: wait until ticks_out reaches each
        # (no clock of its own: its streams keep it running, and none has joined yet)
        super().__init__(session, writer, max_behind_s, "broadcast-encode", keep_clock=False)
        self._reader = threading.Thread(target=self._read, name=f"broadcast-read-{session.id}", daemon=True)
        self._reader.start()

    @property
    def running(self) -> bool:
        """Not failed, nor ended: a stream may join it."""
        return not self._stopping and self.state == "recording"

    def add(self, frame: AVFrame) -> None:
        if not self.members or not self.running:
            return
        try:
            self._queue.put_nowait(frame)
            self.ticks_in += 1
        except queue.Full:
            self._fell_behind()

    async def flushed(self, extra: int = 0, timeout_s: float = 1.0) -> None:
        """Wait until the ticks queued so far, and `extra` ticks more, have come out encoded and gone to the streams (a
        stream that stops sends what was shown until then, and the sound the encoder still held), `timeout_s` at
        most."""
        target = self.ticks_in + extra
        if self.ticks_out >= target or self.state != "recording":
            return
        waiter = self._loop.create_future()
        self._flushes.append((target, waiter))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(waiter, timeout_s)

    async def wait_template(self, timeout_s: float) -> bytes:
        """The streams' template, once the encoding process has started; OutputError if it failed, or did not start
        within `timeout_s`."""
        await asyncio.to_thread(self._templated.wait, timeout_s)
        if self.template is None:
            raise OutputError(self.error or f"the live stream's encoder did not start within {timeout_s:g} s")
        return self.template

    def want_key(self) -> None:
        """Make the next tick a keyframe (any thread): a stream joins, or is back, there."""
        self._keys_wanted += 1

    def join(self, broadcast: Broadcast) -> None:
        self.pending = max(0, self.pending - 1)
        self.members.append(broadcast)
        self.want_key()

    def leave(self, broadcast: Broadcast | None = None) -> None:
        """A stream ended (None: one that was connecting did not make it): the last one to go ends the encode."""
        if broadcast is None:
            self.pending = max(0, self.pending - 1)
        elif broadcast in self.members:
            self.members.remove(broadcast)
        if not self.members and not self.pending and not self._stopping:
            self._stopping = True  # nobody wants what it makes: its process is killed, the thread ends at once
            self._writer.abort()
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
            if self.session.broadcast_encodes.get(self.bitrate_kbps) is self:
                del self.session.broadcast_encodes[self.bitrate_kbps]

    def _fell_behind(self) -> None:
        dropped = 0
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
                dropped += 1
        self.ticks_in -= dropped
        skipped = dropped + 1  # and the tick that found the queue full
        log.warning("session %s: its live streams' encoder fell %g s behind; the %d ticks waiting are skipped",
                    self.session.id, self._max_behind_s, skipped)
        for broadcast in self.members:
            broadcast.skipped(skipped, self._max_behind_s)

    # -- the threads

    def _write(self, frame: AVFrame) -> None:
        wanted = self._keys_wanted  # (a count, not a flag: a call while this runs is not lost)
        key, self._keys_made = wanted != self._keys_made, wanted
        self._captions.append(frame.captions)
        self._writer.write(frame.video, frame.audio, key)
        self.frames += 1

    def _finish(self) -> None:
        self._writer.abort()  # (only when stopped: its streams had their packets, nothing waits for its tail)

    def _read(self) -> None:
        while True:
            kind, payload = self._writer.read()
            if kind == b"M":
                self.template = payload
                self._templated.set()
            elif kind == b"T":
                captions = self._captions.popleft() if self._captions else ()
                if not self._tell(self._deliver, payload, captions):
                    return
            else:  # E: it failed, or is gone
                if not self._stopping:
                    self._tell(self._broke, payload.decode(errors="replace"))
                self._templated.set()
                return

    def _tell(self, callback: Any, *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
            return True
        except RuntimeError:  # the event loop is gone
            return False

    # -- the event loop

    def _deliver(self, payload: bytes, captions: tuple[str, ...]) -> None:
        self.ticks_out += 1
        tick = EncodedTick(payload[1:], payload[:1] == b"\x01", captions, self.ticks_out)
        for broadcast in tuple(self.members):  # (one that falls behind may end and leave)
            broadcast.add(tick)
        self._release(self.ticks_out)

    def _release(self, ticks_out: float) -> None:
        """Wake the flushed() calls waiting for at most `ticks_out` ticks."""
        waiting, self._flushes = self._flushes, []
        for target, waiter in waiting:
            if target > ticks_out:
                self._flushes.append((target, waiter))
            elif not waiter.done():
                waiter.set_result(None)

    def _broke(self, reason: str) -> None:
        """The encoding process failed: every stream it fed ends (with what it was given), saying why."""
        self._fail(reason)
        self._stopping = True
        self._release(float("inf"))
        self._writer.abort()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        for broadcast in tuple(self.members):
            broadcast.lost_encode(reason)

    def _done(self) -> None:
        super()._done()
        self._templated.set()
        self._release(float("inf"))
        if self.session.broadcast_encodes.get(self.bitrate_kbps) is self:
            del self.session.broadcast_encodes[self.bitrate_kbps]
        if self.state == "failed" and self.members and not self._stopping:  # (the reader had not told them yet)
            self._broke(self.error or "the live stream's encoder stopped")


class Broadcast(TickStream):
    """One session's live stream to a streaming server (RTMP to YouTube Live, Twitch, OBS or nginx-rtmp; SRT; MPEG-TS
    over UDP/TCP), sent by a process of its own (`broadcaster.LiveOutput`), encoded by the session's `BroadcastEncode`
    at its bitrate (once for all its streams at that bitrate; the captions are each stream's own). Made by
    `Session.broadcast`, which connects first; a session may send several at once (YouTube and Twitch), each on its
    own, named by `id`.

    It sends what the session shows, tick by tick, from a keyframe it asks for when it starts, as a recording does (the
    same queue, thread and clock kept running while it lasts): a broadcast needs no viewer, so an application that
    only pushes speech (or `say`s text) streams a talking avatar to a platform. Nothing is written to disk. The
    captions of what is said (`say`'s sentences, `push_audio(caption=)`) go inside the video as CEA-608, from the frame
    their speech starts in: a platform's viewers see them with the player's CC button.

    When the connection drops (the server went away; or a server that stopped reading left the stream `max_behind_s`
    behind) it connects again, as a streaming app does: after 1, 2, 4 ... up to RECONNECT_MAX_DELAY_S seconds (the
    last try at `reconnect_s`), each try a `broadcast_reconnecting` event, then `broadcast_resumed`; the ticks shown
    while it is down are not sent (a live stream does not catch up). Once `reconnect_s` has passed without a
    connection (0: at once) it ends with a `broadcast_stopped` event carrying the error. The session streams on to its
    other viewers throughout."""

    def __init__(self, session: Session, writer: LiveOutput, encode: BroadcastEncode, broadcast_id: str,
                 max_behind_s: float = 5.0, reconnect_s: float = 60.0, timeout_s: float = 10.0,
                 captions: bool = True) -> None:
        self.id = broadcast_id  # names it among the session's broadcasts (stop_broadcast, events)
        self.encode = encode  # what it sends: the session's ticks, encoded once for all its streams at this bitrate
        self._keyed = False  # False until a keyframe went out on this connection: ticks before one are not sent
        self._last: int | None = None  # once stopping: the last tick (seq) shown; those after only finish its sound
        self.url = writer.name  # the stream key hidden
        self.reconnect_s, self._timeout_s = reconnect_s, timeout_s
        self.captions = captions  # the captions said go inside the video (CEA-608)
        self.reconnects = 0  # connections made again after a drop
        self.down_s = 0.0  # time spent reconnecting, all drops together
        self._behind: str | None = None  # why the event loop cut the connection (_fell_behind)
        self._broken: str | None = None  # why its encode failed: it ends its stream, failing (lost_encode)
        self.skipped_frames = 0  # ticks its encode skipped, falling behind (BroadcastEncode._fell_behind)
        self._connected = True  # False once stopped while it was down: nothing left to end
        # The last captions shown while it was down (and when), and those the first tick after it resumed carries: a
        # sentence still being said then is captioned, as the rows a viewer would still see were it never down.
        self._missed: tuple[tuple[str, ...], float] | None = None
        self._carried: tuple[str, ...] = ()
        self._wake = threading.Event()  # stop() during a reconnection's wait
        super().__init__(session, writer, max_behind_s, "broadcast")
        encode.join(self)

    @property
    def target(self) -> str:
        """The URL itself, its stream key too (a session streams to one only once)."""
        return self._writer.url

    def describe(self) -> dict:
        state = {"recording": "streaming", "finished": "ended"}.get(self.state, self.state)
        return {"id": self.id, "state": state, "url": self.url, "seconds": round(self.seconds, 2),
                "captions": self.captions,
                **({"reconnects": self.reconnects, "down_s": round(self.down_s, 2)} if self.down_s else {}),
                **({"skipped_frames": self.skipped_frames} if self.skipped_frames else {}),
                **({"error": self.error} if self.error else {})}

    def add(self, tick: EncodedTick) -> None:  # type: ignore[override]
        if tick.captions and (self.state == "reconnecting" or self._queue.full()):  # a tick not sent: its captions
            self._missed = (tick.captions, time.monotonic())  # wait for the resume
        super().add(tick)

    def skipped(self, frames: int, behind_s: float) -> None:
        """Its encode fell `behind_s` behind and skipped `frames` ticks (event loop): say so."""
        if frames and self.state in ("recording", "reconnecting") and not self._stopping:
            self.skipped_frames += frames
            s = self.session
            s._emit(BroadcastSkipped(s.id, broadcast_id=self.id, url=self.url, frames=frames, behind_s=behind_s))

    def lost_encode(self, reason: str) -> None:
        """Its encode failed (event loop): it sends the ticks it was given and ends its stream as a stream ends (its
        viewers see it end, not cut off), then fails with `reason` (connecting again would not bring the encode back).
        Down and reconnecting, it gives up at once."""
        if self._stopping or self.state not in ("recording", "reconnecting"):
            return
        self._broken = reason
        self._stopping = True
        self._wake.set()
        if self.state == "reconnecting":  # a connection being made: given up
            self._writer.abort()
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # (a stream this far behind is being cut anyway)
            self._end(reason)

    async def stop(self) -> None:
        """End the stream (the ticks shown until now and the end of stream go out, off the loop; a reconnection in
        progress is given up); OutputError if it had failed, saying why."""
        if not self._stopping and self.state == "recording":
            # the ticks shown by now, still being encoded, and the sound of the last (AAC holds ~2048 samples back)
            self._last = self.encode.ticks_in
            await self.encode.flushed(0 if self.session.closed else AUDIO_TAIL_TICKS)
        self._wake.set()
        if self.state == "reconnecting":
            self._writer.abort()  # a connection being made: given up
        await super().stop()

    def _failure(self) -> str:
        return f"the live stream to '{self.url}' failed: {self.error}"

    def _fell_behind(self) -> None:
        """A server that stopped reading (or a CPU too busy) left the stream max_behind_s behind: the connection is
        cut (its process killed, so a write blocked on it returns) and made again, the backlog dropped."""
        if self.reconnect_s <= 0:
            return super()._fell_behind()
        if self._behind is None:  # once: the ticks shown until the thread is reconnecting find the queue full
            self._behind = (f"the stream fell {self._max_behind_s:g} s behind (the server took nothing, or the CPU is "
                            "too busy)")
            self._writer.abort()

    # -- the broadcast's thread

    def _write(self, tick: EncodedTick) -> None:  # type: ignore[override]
        if self._last is not None and tick.seq > self._last:  # after the last tick shown: only its sound, if it went
            if self._keyed:
                self._writer.write(tick.packets, tail=True)
            return
        captions, self._carried = (*self._carried, *tick.captions) if self.captions else (), ()
        if not self._keyed:  # joined, or back, between keyframes: it starts at the one it asked for
            if not tick.key:
                self._carried = captions
                return
            self._keyed = True
        try:
            self._writer.write(tick.packets, captions)
        except OutputError as e:
            self._reconnect(self._behind or str(e))  # OutputError when it gives up
            return
        self.frames += 1

    def _reconnect(self, error: str) -> None:
        """The connection dropped with `error`: connect again with back-off until it works (the stream goes on), the
        broadcast is stopped, or reconnect_s has passed (OutputError: why it dropped, and why the last try failed)."""
        if self.reconnect_s <= 0 or self._stopping or self.state == "failed":
            raise OutputError(error)
        self.state = "reconnecting"
        dropped, last = time.monotonic(), ""
        for attempt in itertools.count(1):
            waited = time.monotonic() - dropped
            if waited >= self.reconnect_s:
                self.down_s += waited
                self.state = "recording"  # failing, as a stream that dropped for good (_run)
                raise OutputError(f"{error}; not reconnected in {waited:.0f} s (tries: {attempt - 1}; the last: "
                                  f"{last})")
            delay = min(RECONNECT_MAX_DELAY_S, 2.0 ** (attempt - 1), self.reconnect_s - waited)  # last: at reconnect_s
            self._tell(BroadcastReconnecting(self.session.id, broadcast_id=self.id, url=self.url, attempt=attempt,
                                             delay_s=delay, error=last or error))
            if self._wake.wait(delay) or self._stopping:
                break
            self._writer = self._writer.again()
            try:
                self._writer.connect(self._timeout_s)
            except OutputError as e:
                if self._stopping:
                    break
                last = str(e)
                continue
            self._keyed = False
            self.encode.want_key()
            down = time.monotonic() - dropped
            self.down_s += down
            self.reconnects += 1
            self._behind = None
            self._drop_queued(dropped)  # shown before it dropped: seconds old
            missed, self._missed = self._missed, None
            if missed is not None and time.monotonic() - missed[1] < cc608.CLEAR_AFTER_FRAMES / self.fps:
                self._carried = missed[0]
            self.state = "recording"
            self._tell(BroadcastResumed(self.session.id, broadcast_id=self.id, url=self.url, attempts=attempt,
                                        down_s=round(down, 2)))
            return
        # stopped while down: the broadcast ends (well) with what it sent before
        self.down_s += time.monotonic() - dropped
        self._connected = False
        self._drop_queued(dropped)
        self.state = "recording"

    def _drop_queued(self, shown_by: float) -> None:
        """Drop the ticks waiting, all shown by `shown_by` (monotonic: when the stream dropped), the last captions among
        them kept as missed, as of then; stop()'s end marker stays."""
        ended, last = False, None
        with contextlib.suppress(queue.Empty):
            while True:
                frame = self._queue.get_nowait()
                ended |= frame is None
                if frame is not None and frame.captions:
                    last = frame.captions
        if last is not None and self._missed is None:  # (captions of ticks shown later, while it was down, win)
            self._missed = (last, shown_by)
        if ended:
            self._queue.put_nowait(None)

    def _tell(self, event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone
            self._loop.call_soon_threadsafe(self.session._emit, event)

    def _finish(self) -> None:
        if not self._connected:
            pass
        elif self.frames and not self._writer.frames_written:  # stopped as it resumed, before a tick went out again:
            self._writer.abort()  # that connection has nothing to end (its encoder would call it a failure)
        else:
            self._writer.close()
        if self._broken:  # ended well, but because its encode failed: it failed
            raise OutputError(self._broken)

    def _fail(self, reason: str) -> None:
        super()._fail(reason)
        self._writer.abort()  # its process killed: a write blocked on a stalled server returns, and the thread ends

    def _done(self) -> None:
        super()._done()
        s = self.session
        self.encode.leave(self)
        s._emit(BroadcastStopped(s.id, broadcast_id=self.id, url=self.url, seconds=round(self.seconds, 2),
                                 error=self.error or ""), force=True)
        if s.broadcasts.get(self.id) is self:
            del s.broadcasts[self.id]
            s.ended_broadcasts.append(self)
