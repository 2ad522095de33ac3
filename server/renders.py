"""Renders (POST /v1/renders): a video of an avatar saying an audio file or a text, made on the server and fetched when
it is done, for an application that wants a clip rather than a stream (a video message, a clip to post).

A render is a session that nobody but the server watches: it is opened on the avatar like any session, unpaced
(`Session.unpace`: its frames come as fast as the engine makes them, with no real-time clock), recorded, read by the
server itself, and fed the whole speech ahead of time. Once every piece of the speech has been shown
(`Session.audio_shown`) and `REST_S` of rest after it, its recording is saved and the session closed. The engine
makes its windows in the time the live sessions leave it (`StreamEngine._time_for_unpaced`), and batches them with
theirs only where that is free: on a device with room a render goes faster than real time; where the live sessions
take the device (one on a 2-core CPU) it mostly waits for them, with a window each `UNPACED_MAX_WAIT_S` (in their
batch or alone, `StreamEngine._pick`). It holds one
of the server's session slots while it runs; its video is the session's recording (`/v1/recordings/{id}`, with
captions for a text).
A render that does not finish (cancelled, a failed synthesis or window, the server stopping) saves nothing: the
recording is discarded, so no partial video is left looking complete.

Asked with `queue` while every slot is in use, a render waits in `Renders.queue` (first come, first served, at most
--render-queue) holding its speech and portrait; its session opens with the render's id when its turn comes and a slot
is free (`app._start_queued`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from letstalk_rt.aio import wait_for
from letstalk_rt.errors import InputError, LetsTalkError, OutputError

if TYPE_CHECKING:
    from letstalk_rt.stream import Session
    from letstalk_rt.stream.sources import AudioSource

    from .sessions import ServerSession

log = logging.getLogger("letstalk.server")

MAX_SPEECH_S = 3600.0  # an audio upload's length (a text is at most tts.MAX_TEXT characters, ~5 minutes)
REST_S = 0.5  # of the avatar at rest after the speech (the mouth closes within one window)
MARGIN_S = 10.0  # a session's time limit (--max-session-minutes) must leave this after an upload's speech
STALL_S = 30.0  # a render that got no frame for this long has failed
BACKLOG_S = 2.0  # frames read ahead of the recording's encoder at most (it encodes more slowly than a GPU renders)
SPEED_S = 5.0  # a render's speed (and so the time it says is left) is over its last this many seconds
QUEUE_POLL_S = 0.1  # a queued render asks for a free session slot this often
KEPT = 1000  # finished renders whose state GET /v1/renders/{id} still answers (their videos are recordings)


@dataclass(eq=False)
class Render:
    id: str
    source: AudioSource | None  # FileSource (an upload) or TextSource, pushed ahead of time; None once all queued
    # or settled (a finished render kept for GET /v1/renders/{id} holds no audio)
    speech_s: float | None  # of speech (None: a text, until it is synthesised)
    video_url: str
    created_at: float = field(default_factory=time.time)
    state: str = "rendering"  # or "queued" until a slot frees (`queue`); then "done", "failed" or "cancelled"
    error: str | None = None
    video_s: float | None = None  # the saved video's length
    captions: bool = False  # the saved video has captions (a text's sentences)
    finished_at: float | None = None
    started_at: float | None = None  # when its session opened (queued: later than created_at)
    seen_error: str | None = None  # the session's last error event (why it closed)
    retryable: bool = True  # failed: the same request may succeed if made again (on this server later, or another):
    # the server stopped, a device failed, the disk filled; False for what the request itself holds (no face found)
    made: collections.deque = field(default_factory=collections.deque)  # (monotonic time, seconds rendered): the
    # frames of its last SPEED_S, and the one before them (`made_now`)
    waiter: asyncio.Task | None = None  # queued: the task that opens its session once a slot frees (app.py)

    def __post_init__(self) -> None:
        if self.state == "rendering":
            self.started_at = self.created_at

    def made_now(self, rendered_s: float) -> None:
        """Note that `rendered_s` seconds of its video are made now (its speed, `describe`)."""
        now = time.monotonic()
        self.made.append((now, rendered_s))
        while len(self.made) > 1 and self.made[1][0] <= now - SPEED_S:
            self.made.popleft()

    def _speed(self, rendered_s: float) -> float | None:
        """Seconds of video made per second over its last SPEED_S (slower while none comes: a stall shows); None
        until it has made frames for a second. Done, its speed over its whole run (from its start, not its wait)."""
        if self.state != "rendering":
            taken = (self.finished_at or time.time()) - (self.started_at or self.created_at)
            return rendered_s / taken if self.state == "done" and taken > 0 else None
        if not self.made:
            return None
        now = time.monotonic()
        old = [m for m in self.made if m[0] <= now - SPEED_S]
        since, first = old[-1] if old else self.made[0]  # from the last frame before its last SPEED_S
        return (rendered_s - first) / (now - since) if now - since >= 1.0 else None

    def describe(self, session: Session | None = None, position: int | None = None) -> dict:
        """Its state; `session`: its session while it is made (how far it got); `position`: queued, its place in the
        queue (1: next)."""
        rendered_s = session.player.tick / session.player.fps if session is not None else self.video_s or 0.0
        speed = self._speed(rendered_s)
        if self.state != "rendering":
            eta = 0.0 if self.state == "done" else None
        elif self.speech_s is None or not speed:
            eta = None
        else:
            eta = max(0.0, self.speech_s + REST_S - rendered_s) / speed
        live = None if session is None else sum(s.player.paced and not s.closed
                                                for s in list(session.engine.sessions.values()))
        return {"render_id": self.id, "state": self.state, "created_at": round(self.created_at, 3),
                "speech_seconds": None if self.speech_s is None else round(self.speech_s, 2),
                "rendered_seconds": round(rendered_s, 2),
                "seconds_taken": round((self.finished_at or time.time()) - self.created_at, 2),
                "speed": None if speed is None else round(speed, 3),  # seconds of video a second
                "eta_seconds": None if eta is None else round(eta, 1),
                **({"live_sessions": live} if live is not None else {}),
                **({"queue_position": position} if self.state == "queued" and position is not None else {}),
                "video_url": self.video_url,
                "captions_url": f"{self.video_url}/captions" if self.captions else None,
                **({"error": self.error} if self.error else {}),
                **({"retryable": self.retryable} if self.state == "failed" else {}),
                **({"started_at": round(self.started_at, 3)} if self.started_at is not None else {}),
                **({"finished_at": round(self.finished_at, 3)} if self.finished_at is not None else {})}

    def end(self, state: str, error: str | None = None, retryable: bool = True) -> bool:
        """Settle it (once); False when it was settled already. Queued, the task waiting for its slot is cancelled.
        `retryable`: a failure the same request may not meet again (`Render.retryable`)."""
        if self.state not in ("queued", "rendering"):
            return False
        self.state, self.error, self.finished_at, self.retryable = state, error, time.time(), retryable
        self.source = None
        self.made.clear()
        if self.waiter is not None and self.waiter is not asyncio.current_task():
            self.waiter.cancel()
        return True


class Renders:
    """The renders of a server: those queued, those running and the last KEPT finished ones, by id."""

    def __init__(self) -> None:
        self.all: collections.OrderedDict[str, Render] = collections.OrderedDict()
        self.results: collections.Counter[str] = collections.Counter()  # finished, by state
        self.queue: collections.deque[Render] = collections.deque()  # waiting for a session slot, first come first
        self.reading = 0  # requests to queue a render whose body is being read (they count against --render-queue)

    def add(self, render: Render) -> None:
        self.all[render.id] = render
        if render.state == "queued":
            self.queue.append(render)

    def position(self, render: Render) -> int | None:
        """A queued render's place in the queue (1: the next to start); None when it is not queued."""
        for i, r in enumerate(self.queue):
            if r is render:
                return i + 1
        return None

    def started(self, render: Render) -> None:
        """A queued render got its slot: out of the queue, being made."""
        self.queue.remove(render)
        render.state, render.started_at = "rendering", time.time()

    def ended(self, render: Render) -> None:
        if render in self.queue:
            self.queue.remove(render)
        self.results[render.state] += 1
        self.all.move_to_end(render.id)
        finished = [r for r in self.all.values() if r.state not in ("queued", "rendering")]
        for r in finished[:max(0, len(finished) - KEPT)]:
            del self.all[r.id]

    @property
    def active(self) -> int:
        return sum(r.state == "rendering" for r in self.all.values())


async def _next_frame(frames) -> bool:
    """Read the session's next frame: False when it closed; OutputError if none comes within STALL_S. Live sessions
    beside it do not excuse that: the engine gives a render the time they leave, and a window each UNPACED_MAX_WAIT_S
    where they leave none."""
    stall_s = STALL_S  # (the limit this wait uses, in its message too)
    try:
        await wait_for(anext(frames), stall_s)  # a cancel (DELETE, the server stopping) is never swallowed
        return True
    except StopAsyncIteration:
        return False
    except TimeoutError:
        raise OutputError(f"the render stalled: no frame was made for {stall_s:.0f} s") from None


async def _keep_recording(session: Session) -> None:
    """Wait while the recording's encoder is more than BACKLOG_S behind; OutputError (why) if it failed meanwhile (a
    full disk, an encoder too far behind): the render is lost, and ends now rather than at the end of its speech."""
    recording = session.recording
    while recording is not None and recording.queued > BACKLOG_S * session.player.fps:
        await asyncio.sleep(0.02)
        recording = session.recording
    if recording is None and not session.closed:
        await session.stop_recording()  # raises the recording's error


async def run(ss: ServerSession, render: Render) -> None:
    """Feed the speech, read every frame until it has all been shown and a rest after it, save the video, close the
    session. Anything that stops it first (a failed synthesis, a window that failed, a DELETE, the server stopping)
    ends the render without a video (`SessionManager.close` settles it, and cancels this)."""
    session, manager = ss.session, ss.manager
    fps = session.player.fps
    source = render.source
    assert source is not None, "a render runs once"
    feeding = asyncio.ensure_future(source.run(session))  # ahead of time: it waits for room in the audio queue
    frames = session.frames()
    try:
        rest_until = None
        while rest_until is None or session.player.tick < rest_until:
            if not await _next_frame(frames) or session.closed:  # settled by SessionManager.close
                return
            render.made_now(session.player.tick / fps)
            await _keep_recording(session)
            if feeding.done():
                feeding.result()  # a failed synthesis raises here
                if render.source is not None:
                    render.speech_s, render.source = source.seconds, None  # all queued: the session holds the rest
                if rest_until is None and session.audio_shown:
                    rest_until = session.player.tick + round(REST_S * fps)
        recording = session.recording
        await session.stop_recording()
        render.video_s = recording.seconds if recording is not None else None
        render.captions = recording is not None and recording.cues.count > 0
        if render.end("done"):
            manager.render_ended(render)
        await manager.close(ss, "rendered")
    except Exception as e:  # the synthesis failed (tts), the recording was not saved (disk), stalled
        if not isinstance(e, LetsTalkError):
            log.exception("render %s failed", render.id)
        if render.end("failed", str(e) if isinstance(e, LetsTalkError) else f"{type(e).__name__}: {e}",
                      retryable=not isinstance(e, InputError)):  # (a text its voice cannot speak: again the same)
            manager.render_ended(render)
        await manager.close(ss, "render failed")
    finally:
        feeding.cancel()
        await frames.aclose()
