"""Recording a live session: what its viewers were shown, to an MP4 (H.264 + AAC).

Every tick of the session's clock goes in as it is shown (`Player._observe`): the generated frames, the frames held
while a window was late, and the audio that played with each, so the recording is the stream itself, in sync, with
its stalls. The event loop only queues each frame; `media.VideoWriter` encodes in a thread of the recording's own,
and the file appears at its path only when the recording ends well (`Session.stop_recording()`, the session's
close). A failure (a full disk, an encoder that falls `max_behind_s` behind the stream on a CPU too busy) stops the
recording, deletes its partial file and says why in a `recording_stopped` event; the session streams on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OutputError
from ..media import VideoWriter
from .events import AVFrame, RecordingStopped

if TYPE_CHECKING:
    from .engine import Session

log = logging.getLogger(__name__)


QUEUE_BYTES = 128 * 2**20  # frames waiting for a recording's encoder


class Recording:
    """One session's recording to `path` (an .mp4; its folder must exist). Made by `Session.record`."""

    def __init__(self, session: Session, path: str | Path, crf: int = 23, preset: str = "veryfast",
                 max_behind_s: float = 10.0) -> None:
        self.session = session
        self.path = Path(path)
        self.fps = session.pipeline.fps
        width, height = session.frame_size
        # Opens the partial file now: a path that cannot be written raises OutputError here, before anything runs.
        self._writer = VideoWriter(self.path, (width, height), self.fps, session.sample_rate, crf=crf, preset=preset)
        self.frames = 0  # ticks written
        self.state = "recording"  # then "finished" or "failed"
        self.error: str | None = None
        # At most max_behind_s of frames waiting, and at most QUEUE_BYTES of them (a 1280x720 frame is 2.8 MB)
        most = min(int(max_behind_s * self.fps), QUEUE_BYTES // (width * height * 3))
        self._queue: queue.Queue[AVFrame | None] = queue.Queue(maxsize=max(1, most))
        self._max_behind_s = self._queue.maxsize / self.fps
        self._stopping = False
        self._ended = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        # Not a daemon: a process that exits while a recording is being finished waits for its file.
        self._thread = threading.Thread(target=self._run, name=f"record-{session.id}")
        self._thread.start()

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    def describe(self) -> dict:
        return {"state": self.state, "path": str(self.path), "seconds": round(self.seconds, 2),
                **({"error": self.error} if self.error else {})}

    def add(self, frame: AVFrame) -> None:
        """Queue a shown tick (event loop; never blocks). An encoder `max_behind_s` behind fails the recording."""
        if self._stopping or self.state != "recording":
            return
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            self._fail(f"the encoder fell {self._max_behind_s:g} s behind the stream (the CPU is too busy to record "
                       "this session too)")
            self._stopping = True
            with contextlib.suppress(queue.Empty):  # room for the end marker: the thread aborts and ends
                self._queue.get_nowait()
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)

    async def stop(self) -> Path:
        """Finish the file and move it into place (the encoder's tail and the MP4's index, off the loop); returns its
        path, or raises OutputError saying why there is none."""
        if not self._stopping:
            self._stopping = True
            await asyncio.to_thread(self._queue.put, None)
        await self._ended.wait()
        if self.state != "finished":
            raise OutputError(f"the recording '{self.path}' was not saved: {self.error}")
        return self.path

    # -- the recording's thread

    def _fail(self, reason: str) -> None:
        if self.state == "recording":
            self.state, self.error = "failed", reason

    def _run(self) -> None:
        try:
            while True:
                frame = self._queue.get()
                if frame is None or self.state != "recording":
                    break
                self._writer.write_frame(frame.video)
                self._writer.write_audio(frame.audio)
                self.frames += 1
            if self.state == "recording":
                self._writer.close()  # OutputError (and no file) when not even one frame was shown
                self.state = "finished"
        except OutputError as e:  # what VideoWriter raises for the disk and the encoders
            self._fail(str(e))
        except Exception as e:  # noqa: BLE001 - the thread's edge: anything else ends the recording too, said
            log.exception("recording %s failed", self.path)
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
        self._ended.set()
        s = self.session
        s._emit(RecordingStopped(s.id, path=str(self.path) if self.state == "finished" else "",
                                 seconds=round(self.seconds, 2), error=self.error or ""), force=True)
        if s.recording is self:
            s.recording = None
        s.last_recording = self
