"""Server-side sessions: admission, the peer connection and websocket of each, liveness, metrics.

One `ServerSession` wraps one engine `Session` and everything the network attached to it:

- at most one `RTCPeerConnection` (the session's own video and audio tracks, one encoder per sender;
  the client's audio track is fed into the session, any other received track is read and discarded),
  and up to `max_viewers` watch-only ones (`Viewer`: the same tracks to one more peer each);
- at most one websocket at a time (a newer one replaces the older): PCM in, control in, events out;
- a task that forwards the engine's events to the websocket (the engine bounds that queue itself), through the
  websocket's `Outbox`: its own writer task, so a client that reads slowly delays nothing else.

`SessionManager` admits sessions (the slot is reserved before any expensive work and refused at once
when the engine is full), and a watchdog closes what nobody uses any more:

- idle: no audio, no websocket message and no media pulled for `idle_timeout_s`;
- a peer connection that failed or closed (at once), or whose peer went silent (no RTCP receiver
  report and no RTP for `peer_timeout_s`: a killed client never says goodbye); while the session's
  websocket is open only the peer connection goes (`peer_gone`), and a new offer reconnects;
- a websocket that went away from a session without a peer connection (after `ws_grace_s`);
- one whose time limit (`max_session_s`) is up, told `session_ending` `session_end_warning_s` before.

It also drains (`drain`: no new sessions, the open ones told `session_ending` and left to finish), applies the saved
recordings' retention limits (`recordings.py`) and sends the webhooks (`webhooks.py`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from aiortc import (
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
    sdp,
)
from aiortc.mediastreams import MediaStreamError

from letstalk_rt.aio import wait_for
from letstalk_rt.errors import InputError, LetsTalkError
from letstalk_rt.rtc import (
    answer_checks_at_once,
    asking_opus_fec,
    decodes_opus_fec,
    ice_configuration,
    peer_heard,
    relay_missing,
    release_frames_at_once,
    selected_route,
    sent_codec,
)
from letstalk_rt.stream import TrackSource
from letstalk_rt.stream.engine import AudioBufferFull, quantiles, resident_memory_bytes
from letstalk_rt.stream.events import Event, SessionClosed
from letstalk_rt.tts import Speech, SpeechUnavailable, check_text, sentences

from . import recordings
from .renders import Render, Renders
from .auth import TokenSigner
from .options import ServerConfig
from .webhooks import Webhooks

if TYPE_CHECKING:
    from aiohttp import web

    from letstalk_rt.stream import EnginePool, Session

log = logging.getLogger("letstalk.server")


class SdpRejected(Exception):
    """An offer the server will not negotiate: `status` is the HTTP status (400, 413 or 415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ViewersFull(Exception):
    """The session has its `max_viewers` already."""


class SessionGone(Exception):
    """The session was closed (DELETE, watchdog, engine) while a request on it was still being served."""


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def check_offer(body: bytes, config: ServerConfig) -> str:
    """Cheap checks of an SDP offer before aiortc sees it; the offer as text, or SdpRejected.

    aiortc's parser raises raw ValueError / AssertionError / IndexError ... on hostile input, and
    negotiates whatever it is given; here the offer is bounded (size, media sections, one audio and
    one video at most) and codecs are checked against what the server can send, with a reason.
    """
    if len(body) > config.max_sdp_bytes:
        raise SdpRejected(413, f"the SDP offer is {len(body)} bytes; the limit is {config.max_sdp_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SdpRejected(400, "the SDP offer is not UTF-8 text") from None
    if "\x00" in text:
        raise SdpRejected(400, "the SDP offer contains NUL characters")
    if not text.lstrip().startswith("v=0"):
        raise SdpRejected(400, "not an SDP offer: it must start with 'v=0'")
    sections = [line for line in text.splitlines() if line.startswith("m=")]
    if not sections:
        raise SdpRejected(400, "the SDP offer has no media sections (no m= line): offer audio and/or video")
    if len(sections) > config.max_media_sections:
        raise SdpRejected(400, f"the SDP offer has {len(sections)} media sections; at most "
                               f"{config.max_media_sections} (one audio, one video, one data channel)")
    try:
        description = sdp.SessionDescription.parse(text)
    except Exception as e:  # aiortc's parser: ValueError, AssertionError, IndexError, KeyError, ...
        raise SdpRejected(400, f"malformed SDP offer: {_short(e)}") from None
    kinds = [m.kind for m in description.media]
    for kind in set(kinds):
        if kind not in ("audio", "video", "application"):
            raise SdpRejected(400, f"unsupported media section {kind!r}: offer audio and/or video")
        if kinds.count(kind) > 1:
            raise SdpRejected(400, f"the offer has {kinds.count(kind)} {kind} sections; one is supported")
    if not {"audio", "video"} & set(kinds):
        raise SdpRejected(400, "the SDP offer has no audio or video section")
    # aiortc trusts these: a BUNDLE naming an unknown mid leaves a transceiver without a transport, and
    # then setRemoteDescription, a background task and even pc.close() raise AttributeError (a leak).
    mids = [m.rtp.muxId for m in description.media]
    for group in description.group:
        for mid in group.items:
            if mid not in mids:
                raise SdpRejected(400, f"a={group.semantic} group names mid {str(mid)[:40]!r}, which no media "
                                       "section has")
    for media in description.media:
        if media.dtls is None or not media.dtls.fingerprints:
            raise SdpRejected(400, f"the {media.kind} section has no DTLS fingerprint (a=fingerprint)")
        if media.ice is None or not media.ice.usernameFragment or not media.ice.password:
            raise SdpRejected(400, f"the {media.kind} section has no ICE credentials (a=ice-ufrag / a=ice-pwd)")
    for media in description.media:
        if media.kind not in ("audio", "video"):
            continue
        ours = [c.mimeType for c in RTCRtpSender.getCapabilities(media.kind).codecs if not c.mimeType.endswith("/rtx")]
        offered = {c.mimeType.lower() for c in media.rtp.codecs}
        if not offered & {m.lower() for m in ours}:
            names = ", ".join(sorted({c.mimeType for c in media.rtp.codecs})) or "none"
            raise SdpRejected(415, f"no supported {media.kind} codec in the offer (offered: {names}; "
                                   f"this server supports {', '.join(dict.fromkeys(ours))})")
    return text


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


class Metrics:
    """Counters of the whole server; gauges are read from live sessions at scrape time."""

    def __init__(self) -> None:
        self.sessions_total = 0
        self.refused_total = 0
        self.errors_total = 0
        self.says_total = 0  # `say` messages accepted
        self.reconnects_total = 0  # peer connections a new offer replaced (a client back after its network changed)
        self.peer_routes: collections.Counter[str] = collections.Counter()  # connections made: "direct" or "relay"
        self.recordings: collections.Counter[bool] = collections.Counter()  # recordings ended: saved (True) or not
        self.broadcasts: collections.Counter[bool] = collections.Counter()  # live streams ended: well (True) or failed
        self.broadcast_reconnects = 0  # live streams' connections made again after a drop
        self.broadcast_skipped = 0  # ticks live streams skipped, their encode behind (each stream's counted)
        self.recordings_pruned = 0  # saved recordings deleted by the retention limits
        self.recordings_bytes: int | None = None  # the saved MP4s' size at the last look (None: not looked yet)
        # totals of sessions already closed (live ones are added at scrape time)
        self.closed_frames = 0
        self.closed_held = 0
        self.closed_dropped: collections.Counter[str] = collections.Counter()
        self.closed_latencies: collections.deque[float] = collections.deque(maxlen=10000)
        self._fps_samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=16)

    def absorb(self, session: Session) -> None:
        self.closed_frames += session.frames_generated
        self.closed_held += session.player.fillers
        self.closed_dropped.update(session.dropped)
        self.closed_latencies.extend(session.latencies)

    def sample_fps(self, frames_total: int) -> None:
        self._fps_samples.append((time.monotonic(), frames_total))

    def fps(self) -> float:
        if len(self._fps_samples) < 2:
            return 0.0
        (t0, f0), (t1, f1) = self._fps_samples[0], self._fps_samples[-1]
        return (f1 - f0) / (t1 - t0) if t1 > t0 else 0.0


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    return f"{value:.6g}"


def render_metrics(manager: SessionManager) -> str:
    """Prometheus text exposition format 0.0.4, written by hand (no client library needed)."""
    m = manager.metrics
    live = [ss.session for ss in manager.sessions.values()]
    frames = manager.frames_total()
    held = m.closed_held + sum(s.player.fillers for s in live)
    dropped = collections.Counter(m.closed_dropped)
    for s in live:
        dropped.update(s.dropped)
    lat = [*m.closed_latencies, *(x for s in live for x in s.latencies)]
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {_fmt(value)}")

    metric("letstalk_sessions_active", "gauge", "Sessions open now.", [("", len(manager.sessions))])
    metric("letstalk_sessions_max", "gauge", "Admission cap (each engine's max_sessions, summed over the devices).",
           [("", manager.max_sessions)])
    metric("letstalk_draining", "gauge", "1 while the server shuts down gently: new sessions refused, open ones going "
           "on (--drain-seconds).", [("", int(manager.draining))])
    tls = manager.config.tls
    if tls is not None and tls.expires_at is not None:
        metric("letstalk_tls_certificate_expiry_timestamp_seconds", "gauge", "When the TLS certificate served now "
               "expires (seconds since the epoch): alert well before (a renewal that is not happening).",
               [("", int(tls.expires_at))])
    metric("letstalk_sessions_total", "counter", "Sessions created since start.", [("", m.sessions_total)])
    metric("letstalk_sessions_refused_total", "counter",
           "Session requests refused with 503 because the engine was full (or the server draining).",
           [("", m.refused_total)])
    metric("letstalk_frames_generated_total", "counter", "Video frames generated by the model.", [("", frames)])
    metric("letstalk_frames_held_total", "counter", "Ticks that showed a held frame because generation was late.",
           [("", held)])
    metric("letstalk_frames_dropped_total", "counter", "Frames generated but never shown, by reason.",
           [(f'{{reason="{r}"}}', dropped.get(r, 0)) for r in ("interrupt", "late", "consumer")])
    metric("letstalk_generated_fps", "gauge", "Frames generated per second over the last ~15 s, all sessions.",
           [("", float(m.fps()))])
    q = [(f'{{quantile="{p}"}}', v) for p, v in zip((0.5, 0.95), quantiles(lat, (0.5, 0.95)) or [float("nan")] * 2)]
    metric("letstalk_speech_to_screen_latency_seconds", "summary",
           "Speech arrival to the frame that says it being shown (recent sessions).",
           q + [("_sum", float(sum(lat))), ("_count", len(lat))])
    metric("letstalk_audio_queued_seconds", "gauge", "Speech pushed to the sessions and not taken by the engine yet, "
           "all sessions (each session's capped at its max_pending_seconds).",
           [("", round(sum(s.queued_seconds for s in live), 3))])
    metric("letstalk_audio_held_seconds", "gauge", "Speech sent ahead of playback (a TTS) waiting on the server for "
           "room in its session's queue, all sessions (up to max_pending_seconds more each; beyond, refused).",
           [("", round(sum(ss.held_seconds for ss in manager.sessions.values()), 3))])
    metric("letstalk_errors_total", "counter", "Session errors, failed negotiations and internal server errors.",
           [("", m.errors_total)])
    metric("letstalk_says_total", "counter", "Texts accepted to be spoken (`say`).", [("", m.says_total)])
    metric("letstalk_reconnects_total", "counter", "Peer connections replaced by a new offer after their peer went "
           "silent (a client back after its network changed).", [("", m.reconnects_total)])
    metric("letstalk_peer_connections_total", "counter", "Peer connections (sessions' and viewers') that connected, by "
           "route: relay when either end's candidate is a TURN relay's (its bandwidth is the relay's), else direct.",
           [(f'{{route="{r}"}}', m.peer_routes[r]) for r in ("direct", "relay")])
    metric("letstalk_renders_active", "gauge", "Renders being made now (POST /v1/renders; each is a session too).",
           [("", manager.renders.active)])
    metric("letstalk_renders_queued", "gauge", "Renders waiting for a session slot (POST /v1/renders with `queue`).",
           [("", len(manager.renders.queue))])
    metric("letstalk_renders_total", "counter", "Renders finished, by result (done: the video saved).",
           [(f'{{result="{r}"}}', manager.renders.results[r]) for r in ("done", "failed", "cancelled")])
    metric("letstalk_recordings_active", "gauge", "Sessions being recorded now (`record`).",
           [("", sum(s.recording is not None for s in live))])
    metric("letstalk_recordings_total", "counter", "Recordings ended, by result (failed: a full disk, an encoder too "
           "far behind; nothing saved).", [('{result="saved"}', m.recordings[True]),
                                          ('{result="failed"}', m.recordings[False])])
    metric("letstalk_broadcasts_active", "gauge", "Live streams to streaming servers running now (POST "
           ".../broadcast; a session may send several).", [("", sum(len(s.broadcasts) for s in live))])
    metric("letstalk_broadcasts_total", "counter", "Live streams ended, by result (failed: the streaming server went "
           "away, the encoder fell behind).", [('{result="ended"}', m.broadcasts[True]),
                                               ('{result="failed"}', m.broadcasts[False])])
    metric("letstalk_broadcast_reconnects_total", "counter", "Live streams' connections made again after they "
           "dropped (the streaming server went away or stopped reading).", [("", m.broadcast_reconnects)])
    metric("letstalk_broadcast_skipped_frames_total", "counter", "Frames live streams skipped because their encode "
           "fell behind (a CPU too busy; each stream counted).", [("", m.broadcast_skipped)])
    if manager.config.recordings_dir is not None:
        metric("letstalk_recordings_pruned_total", "counter", "Saved recordings deleted by the retention limits "
               "(--recordings-keep-hours, --recordings-max-gb).", [("", m.recordings_pruned)])
        metric("letstalk_recordings_saved_bytes", "gauge", "Size of the saved recordings' MP4s (looked at every "
               "minute and after each save).", [("", float("nan") if m.recordings_bytes is None
                                                 else m.recordings_bytes)])
    if manager.webhooks:
        w = manager.webhooks
        metric("letstalk_webhooks_total", "counter", "Webhook events by result (failed: every try; dropped: too many "
               "waiting for a slow endpoint).", [(f'{{result="{r}"}}', w.results[r])
                                                 for r in ("delivered", "failed", "dropped")])
        metric("letstalk_webhooks_queued", "gauge", "Webhook events waiting to be delivered.", [("", w.queued)])
    metric("letstalk_viewers", "gauge", "Watch-only peer connections open now (POST /v1/sessions/{id}/viewers).",
           [("", sum(len(ss.viewers) for ss in manager.sessions.values()))])
    metric("letstalk_event_streams", "gauge", "Event streams (GET /v1/sessions/{id}/events) open now.",
           [("", sum(len(ss.listeners) for ss in manager.sessions.values()))])
    # one engine per device (--device cuda:0,cuda:1), labelled by its index; letstalk_engine_info names its device
    engines = [(f'{{engine="{i}"}}', e, e.running_state()) for i, e in enumerate(manager.engines.engines)]
    metric("letstalk_engine_info", "gauge", "1 for each engine (one per device, its own copy of the model).",
           [(f'{{engine="{i}",device="{e.pipeline.device}"}}', 1) for i, e in enumerate(manager.engines.engines)])
    metric("letstalk_engine_sessions", "gauge", "Sessions open on each engine now (new ones go to the least busy).",
           [(label, len(e.sessions)) for label, e, _ in engines])
    metric("letstalk_engine_torch_threads", "gauge", "Torch threads the engine's worker runs (--threads); NaN: torch's own.",
           [(label, float("nan") if st["torch_threads"] is None else float(st["torch_threads"]))
            for label, _, st in engines])
    metric("letstalk_engine_threads_changes_total", "counter",
           "Times the worker lowered its auto threads (windows fell behind real time: another process took the cores) "
           "or tried more again.",
           [(f'{label[:-1]},direction="{d}"}}', st[f"threads_{d}"]) for label, _, st in engines
            for d in ("lowered", "raised")])
    metric("letstalk_engine_noise_draws", "gauge", "Noise draws averaged per window now (the model's, or 1 after the "
           "engine fell behind real time with more).", [(label, st["noise_draws"]) for label, _, st in engines])
    metric("letstalk_engine_draws_lowered_total", "counter",
           "Times the worker dropped to 1 noise draw per window because windows fell behind real time.",
           [(label, st["draws_lowered"]) for label, _, st in engines])
    metric("letstalk_engine_decode_overlapped", "gauge", "1 where a window is decoded beside the next one's sampling.",
           [(label, int(st["decode_overlapped"])) for label, _, st in engines])
    metric("letstalk_engine_heap_trims_total", "counter", "Times the engine handed the memory the C library held freed "
           "back to the system (--trim-heap-every).", [(label, st["heap_trims"]) for label, _, st in engines])
    metric("letstalk_engine_busy_seconds", "gauge", "How long the engine's current window has been running (0: "
           "waiting for work); past --hung-seconds the device is taken for hung and /health/live answers 503.",
           [(label, round(e.busy_s, 3)) for label, e, _ in engines])
    if (rss := resident_memory_bytes()) is not None:  # Linux
        metric("letstalk_process_resident_memory_bytes", "gauge", "The server process's resident memory.", [("", rss)])
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# One session
# --------------------------------------------------------------------------------------------------


END_OF_SPEECH = object()  # held in a session's audio queue: end_of_speech came after the audio held
MAX_LISTENERS = 8  # event streams (GET /v1/sessions/{id}/events) a session serves at once
DELETED = "deleted by the client"  # why a session closed by DELETE /v1/sessions/{id} closed
LISTENER_QUEUE = 256  # events held for one of them that does not read
WS_OUTBOX = 256  # messages queued for a websocket; a client that many behind does not read its events


async def close_ws(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    try:
        await wait_for(ws.close(code=code, message=reason.encode()[:120]), 2.0)
    except (asyncio.TimeoutError, ConnectionError, RuntimeError):
        pass


class Outbox:
    """What goes out on one websocket, written by a task of its own: the session's event pump (webhooks, event
    streams, metrics) and the handler reading the client's audio never wait on a client that reads slowly. One that
    leaves a message unsent for `timeout_s`, or falls WS_OUTBOX messages behind, is closed (1008)."""

    def __init__(self, ws: web.WebSocketResponse, timeout_s: float, session_id: str) -> None:
        self.ws = ws
        self.timeout_s = timeout_s
        self.session_id = session_id
        self.queue: asyncio.Queue = asyncio.Queue(WS_OUTBOX)
        self.dropped = False
        self.writer = asyncio.get_running_loop().create_task(self._write(), name=f"session-{session_id}-ws-out")

    def put(self, message: dict) -> None:
        if self.dropped or self.ws.closed:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.writer.cancel()
            self.writer = asyncio.get_running_loop().create_task(self._drop(f"{WS_OUTBOX} messages behind"))

    async def _write(self) -> None:
        while True:
            message = await self.queue.get()
            try:
                await wait_for(self.ws.send_str(json.dumps(message)), self.timeout_s)
            except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                if not self.ws.closed:  # else the client went: nothing to tell it
                    await self._drop(f"a message unsent for {self.timeout_s:g} s")
                return
            self.queue.task_done()

    async def _drop(self, why: str) -> None:
        self.dropped = True
        log.info("session %s: websocket stopped reading (%s); closing it", self.session_id, why)
        await close_ws(self.ws, 1008, "client does not read its events")

    async def close(self, code: int, reason: str, flush_s: float = 1.0) -> None:
        """Close with `code` and `reason` once what is queued went out (for up to `flush_s`)."""
        if not self.dropped and not self.writer.done():
            try:
                await wait_for(self.queue.join(), flush_s)
            except asyncio.TimeoutError:
                pass
        self.stop()
        await close_ws(self.ws, code, reason)

    def stop(self) -> None:
        if not self.dropped:  # a drop's task closes the socket itself
            self.writer.cancel()


@dataclass(eq=False)
class Viewer:
    """A watch-only peer connection of a session (POST /v1/sessions/{id}/viewers): its video and audio, nothing in."""

    id: str
    pc: RTCPeerConnection
    last_seen: float | None = None  # monotonic: RTCP or RTP from it, once connected
    marks: dict[str, Any] = field(default_factory=dict)


class ServerSession:
    """An engine session plus its peer connection, websocket, viewers and tasks."""

    def __init__(self, manager: SessionManager, session: Session, token: str, expires_at: int) -> None:
        self.manager = manager
        self.config = manager.config
        self.session = session
        self.id = session.id
        self.token = token
        self.expires_at = expires_at
        self.ice_servers = self.config.session_ice_servers(self.id)  # this server's pc and the client's use them
        self.voice: str | None = None  # the session's voice for `say` (the session request's `voice`)
        self.avatar_id: str | None = None  # the avatar it was opened on (None: a portrait uploaded with the request)
        self.pc: RTCPeerConnection | None = None
        self.viewers: dict[str, Viewer] = {}  # watch-only peer connections besides `pc`
        self.negotiating = False
        self.out: Outbox | None = None  # the current websocket's (a newer one replaces it)
        self.had_ws = False
        self.ws_left_at: float | None = None
        self.audio_format = (session.sample_rate, 1)  # (rate, channels) of binary websocket messages
        self.audio_ahead = False  # they are made ahead of real time (a TTS): push_audio(ahead=True)
        self.audio_messages = 0  # binary audio messages received, on all its websockets
        self.audio_messages_played = 0  # how many of them have been shown (or dropped by an interrupt, or refused)
        self._message_marks: collections.deque = collections.deque()  # (audio_pieces after it, its number), unplayed
        # audio messages made ahead of real time that the engine had no room for, and what came after them, in order:
        # (PCM, None for an empty or refused message, or END_OF_SPEECH; rate; ahead; its number, 0 for end_of_speech)
        self._held: collections.deque = collections.deque()
        self._feeding_held: asyncio.Task | None = None
        now = time.monotonic()
        self.created = now
        limit = self.config.max_session_s
        self.ends_at = time.time() + limit if limit else None  # unix time: closed by its time limit
        self.warned_end = False  # `session_ending` sent
        # DELETEd by a client that goes on in another session ({"session_id", "token"[, "url"]}): its `closed` event
        # says where, so that a page watching it (an overlay of an SDK's session) follows
        self.moved_to: dict | None = None
        self.recording_url: str | None = None  # where its recording is served (created with `record`)
        self.render: Render | None = None  # what it is making, if it is a render (POST /v1/renders)
        self.last_activity = now  # audio in, websocket message, media pulled
        self.last_peer_seen: float | None = None  # RTCP from / RTP of the peer, once connected
        self._peer_marks: dict[str, Any] = {}
        self._last_tick = 0
        self._last_buffer_error = 0.0
        self.closing = False
        self.closed = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.listeners: set[asyncio.Queue] = set()  # GET .../events streams: each gets the engine's events too
        self.pump = self.spawn(self._pump_events(), "events")

    def renew(self) -> None:
        """A new token, good for --token-ttl from now, and new TURN credentials (POST /v1/sessions/{id}/token): what a
        client whose session outlives its first ones reconnects, adds viewers and ends it with. The tokens given
        before stay good until they expire."""
        self.token, self.expires_at = self.manager.signer.issue(self.id, self.config.token_ttl_s)
        self.ice_servers = self.config.session_ice_servers(self.id)

    # -- tasks

    def spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"session-{self.id}-{name}")
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session %s: task %s failed", self.id, task.get_name(), exc_info=task.exception())
            self.manager.metrics.errors_total += 1

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    # -- events out

    @property
    def ws(self) -> web.WebSocketResponse | None:
        return None if self.out is None else self.out.ws

    def attach_ws(self, ws: web.WebSocketResponse) -> tuple[Outbox, Outbox | None]:
        """`ws` is now the session's websocket: (its outbox, the one it replaces)."""
        old, self.out = self.out, Outbox(ws, self.config.ws_send_timeout_s, self.id)
        self.had_ws, self.ws_left_at = True, None
        return self.out, old

    def send_json(self, message: dict) -> None:
        """Queue for the current websocket, if any (Outbox: nothing waits for it to go)."""
        if self.out is not None:
            self.out.put(message)

    def error_event(self, message: str, code: str = "error", request: Any = None) -> None:
        """An `error` the client can fix; `request`: the id of the control message it answers, if it had one."""
        self.send_json({"type": "error", "session_id": self.id, "code": code, "message": message,
                        "time": time.time(), **({"id": request} if request is not None else {})})

    def listen(self) -> asyncio.Queue | None:
        """A queue that gets every engine event of this session from now on (None at its end); None when the session
        has MAX_LISTENERS already."""
        if len(self.listeners) >= MAX_LISTENERS:
            return None
        queue: asyncio.Queue = asyncio.Queue(LISTENER_QUEUE)
        self.listeners.add(queue)
        return queue

    def tell_listeners(self, message: dict | None) -> None:
        for queue in self.listeners:
            if queue.full():  # a listener that does not read loses its oldest events, never the server's memory
                queue.get_nowait()
            queue.put_nowait(message)

    async def _pump_events(self) -> None:
        async for event in self.session.events():
            if event.type == "error":
                self.manager.metrics.errors_total += 1
                if self.render is not None:
                    self.render.seen_error = event.message
            elif event.type == "recording_stopped":
                self.manager.metrics.recordings[event.path != ""] += 1
                if event.path:  # a new file: within the limits at once
                    self.manager.prune_recordings()
                self._recording_webhook(event)
            elif event.type.startswith("broadcast_"):
                self._broadcast_event(event)
            message = event.to_dict()
            if event.type == "audio_played":
                message["audio_messages"] = self._messages_played(event.pieces)
            elif event.type == "closed" and self.moved_to is not None:
                message["moved_to"] = self.moved_to
            self.tell_listeners(message)
            self.send_json(message)
            if isinstance(event, SessionClosed):
                break
        # The engine closed the session (error, engine stop) or we did: free the rest.
        self.spawn(self.manager.close(self, self.session.close_reason or "closed"), "close")

    def _broadcast_event(self, event: Event) -> None:
        """Count a live stream's drops, skips and ends; tell the operator's backend (webhooks) of a stream to a platform
        that dropped, came back, skipped frames or ended, which nobody may be watching here."""
        data = {"session_id": self.id, "broadcast_id": event.broadcast_id, "url": event.url}
        if event.type == "broadcast_reconnecting":
            if event.attempt == 1:  # the drop itself (its later tries are events on the websocket only)
                self.manager.webhooks.send("broadcast.dropped", {**data, "error": event.error})
        elif event.type == "broadcast_resumed":
            self.manager.metrics.broadcast_reconnects += 1
            self.manager.webhooks.send("broadcast.resumed", {**data, "attempts": event.attempts,
                                                             "down_s": event.down_s})
        elif event.type == "broadcast_skipped":
            self.manager.metrics.broadcast_skipped += event.frames
            self.manager.webhooks.send("broadcast.skipped", {**data, "frames": event.frames,
                                                             "behind_s": event.behind_s})
        elif event.type == "broadcast_stopped":
            self.manager.metrics.broadcasts[not event.error] += 1
            self.manager.webhooks.send("broadcast.stopped", {**data, "seconds": event.seconds, "error": event.error})

    # -- audio in

    def audio_message(self, pcm: np.ndarray | None, rate: int) -> str | None:
        """One binary websocket message's audio (None: an empty message), pushed in order; an error message when it is
        refused. Audio made ahead of real time (`audio_ahead`: a TTS) that the engine's queue has no room for is held
        here, up to as much again (`max_pending_seconds`), and pushed as playback makes room: later messages and
        `end_of_speech` wait behind it, so a TTS sending faster than the session plays (a busy server) loses nothing.
        `audio_played` events say how many messages have been shown (`audio_messages`), so that a client knows when
        what it sent has been seen and heard to its end."""
        self.touch()
        self.audio_messages += 1
        number = self.audio_messages
        if self._held:  # behind what waits
            return self._hold(pcm, rate, number)
        problem = None
        try:
            if pcm is not None:
                self.session.push_audio(pcm, rate, self.audio_ahead)
        except AudioBufferFull as e:
            if self.audio_ahead:
                return self._hold(pcm, rate, number)
            problem = str(e)
        except LetsTalkError as e:  # SessionClosedError, InputError
            problem = str(e)
        self._mark(number)
        return problem

    def end_of_speech(self) -> None:
        """The `end_of_speech` control message: after the audio held, if any."""
        if self._held:
            self._held.append((END_OF_SPEECH, 0, False, 0))
        else:
            self.session.end_speech()

    @property
    def held_seconds(self) -> float:
        """Seconds of audio waiting on the server for room in the engine's queue."""
        return sum(len(pcm) / rate for pcm, rate, _, number in self._held if number and pcm is not None)

    def _hold(self, pcm: np.ndarray | None, rate: int, number: int) -> str | None:
        limit = self.session.engine.config.max_pending_seconds
        problem = None
        if pcm is not None and self.held_seconds + len(pcm) / rate > limit:
            problem = (f"session {self.id}: {limit:.0f} s of audio queued ahead of playback and as much again waiting; "
                       "send it at about real-time pace or call interrupt()")
            pcm = None  # its place kept: it counts as shown once what came before it has been
        self._held.append((pcm, rate, self.audio_ahead, number))
        if self._feeding_held is None or self._feeding_held.done():
            self._feeding_held = self.spawn(self._feed_held(), "held-audio")
        return problem

    async def _feed_held(self) -> None:
        """The audio held, into the engine as playback makes room (an interrupt empties it; a close ends this)."""
        while self._held and not self.session.closed:
            pcm, rate, ahead, number = item = self._held[0]
            try:
                if pcm is END_OF_SPEECH:
                    self.session.end_speech()
                elif pcm is not None and not await self.session.push_audio_when_room(pcm, rate, ahead=ahead):
                    continue  # interrupted (the queue emptied: what came since is next) or closed
            except LetsTalkError as e:  # closed meanwhile, or audio the engine refuses: this message only
                if self.session.closed:
                    return
                self.error_event(str(e), "audio_rejected")
            if self._held and self._held[0] is item:
                self._held.popleft()
                if number:
                    self._mark(number)

    def _mark(self, number: int) -> None:
        mark = self.session.audio_pieces
        if self._message_marks and self._message_marks[-1][0] == mark:  # nothing queued since: done with the last
            self._message_marks.pop()
        self._message_marks.append((mark, number))

    def _messages_played(self, pieces: int) -> int:
        while self._message_marks and self._message_marks[0][0] <= pieces:
            self.audio_messages_played = max(self.audio_messages_played, self._message_marks.popleft()[1])
        return self.audio_messages_played

    def interrupt(self) -> None:
        """The `interrupt` control message: every audio message received so far is dropped (those held too)."""
        self._held.clear()
        self.session.interrupt()
        self._message_marks.clear()
        self.audio_messages_played = self.audio_messages

    def push_audio(self, pcm: np.ndarray, rate: int, ahead: bool = False) -> str | None:
        """Push into the engine; returns an error message instead of raising for what the client can fix."""
        self.touch()
        try:
            self.session.push_audio(pcm, rate, ahead)
        except LetsTalkError as e:  # AudioBufferFull, SessionClosedError, InputError
            return str(e)
        return None

    # -- text to speech

    def say(self, message: dict) -> None:
        """The `say` control message: {"text", optional "voice", "rate", "pitch", "id"}. Accepted: a `say` reply
        (sentences, voice) at once; refused, or failed later while synthesising: an `error` with its id (code
        bad_message, tts_unavailable or tts). It is spoken after any text said before; `interrupt` drops it."""
        self.touch()
        request = message.get("id")
        try:
            text = check_text(message.get("text"))
            options = {k: message[k] for k in ("voice", "rate", "pitch") if k in message}
            if "voice" not in options and self.voice:
                options["voice"] = self.voice
            speech = Speech(**options)
            task = self.session.say(text, speech)
        except SpeechUnavailable as e:
            self.error_event(f"say: {e}", "tts_unavailable", request)
            return
        except InputError as e:
            self.error_event(f"say: {e}", "bad_message", request)
            return
        self.manager.metrics.says_total += 1
        self.send_json({"type": "say", "id": request, "sentences": len(sentences(text)), "voice": speech.voice,
                        "time": time.time()})
        self.spawn(self._said(task, request), "said")

    async def _said(self, task: asyncio.Task, request: Any) -> None:
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            self.error_event(f"say: {task.exception()}", "tts", request)

    # -- WebRTC

    def _check_open(self) -> None:
        # SessionManager.close() frees whatever pc it finds when it gets there; a pc made (or still being
        # negotiated) after that point would never be closed, nor its mic/discard tasks cancelled.
        if self.closing:
            raise SessionGone(f"session {self.id} was closed during the WebRTC negotiation")

    async def negotiate(self, offer_sdp: str) -> str:
        """Apply the offer, attach the session's tracks, return the answer SDP (closes the pc on failure).

        Raises SessionGone, with the pc closed, when the session starts closing at any point of it: the
        session's close() then either finds no pc or closes this one, so none outlives the session.
        """
        self._check_open()
        pc = RTCPeerConnection(ice_configuration(self.ice_servers))
        self.pc = pc
        received: list = []

        @pc.on("track")
        def on_track(track) -> None:
            received.append(track)
            if track.kind == "audio":
                if not release_frames_at_once(pc, track):
                    log.info("session %s: this aiortc's audio receiver holds packets back (~80 ms more latency)",
                             self.id)
                self.spawn(self._consume_audio(track), "mic")
            else:  # every received track is read, or aiortc buffers it without bound
                self.spawn(self._discard(track), f"discard-{track.kind}")

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            route = self.manager.count_connected(pc) if state == "connected" else None
            log.info("session %s: peer connection %s%s", self.id, state,
                     f" ({route['local']} to {route['remote']})" if route else "")
            if state == "connected":
                self.last_peer_seen = time.monotonic()
            elif state in ("failed", "closed") and self.pc is pc:
                reason = f"peer connection {state}"
                if not self.peer_gone(reason):
                    self.spawn(self.manager.close(self, reason), "close")

        try:
            return await self._answer(pc, offer_sdp)
        except BaseException:
            if self.pc is pc:
                self.pc = None
            for track in received:
                track.stop()
            await self.close_pc(pc)
            raise

    async def _answer(self, pc: RTCPeerConnection, offer_sdp: str) -> str:
        """Apply the offer to `pc`, add the session's video and audio tracks for the sections it has (each peer
        connection gets tracks of its own, all on the session's one clock) and return the answer SDP; SessionGone
        whenever the session started closing meanwhile."""
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        self._check_open()
        kinds = {t.kind for t in pc.getTransceivers()}
        if not kinds & {"audio", "video"}:
            raise SdpRejected(400, "the offer has no audio or video section")
        # each encoded once for this peer and every other of the session sending its codec (once bound to it)
        video = self.session.video_track(shared=True) if "video" in kinds else None
        video_sender = pc.addTrack(video) if video is not None else None
        audio = self.session.audio_track(shared=True, video=video) if "audio" in kinds else None
        if audio is not None:
            pc.addTrack(audio)
        answer = await pc.createAnswer()
        self._check_open()
        answer_checks_at_once(pc)
        await pc.setLocalDescription(answer)
        self._check_open()
        for track, sender in ((video, video_sender), (audio, None)):
            if track is not None:
                codec = sent_codec(pc.localDescription.sdp, track.kind)
                if not track.bind(sender, codec):
                    log.info("session %s: %s is encoded for this peer alone", self.id, codec)
        missing = relay_missing(self.ice_servers, pc.localDescription.sdp)
        if missing:  # the peer may still reach this host directly; if it cannot, the connection fails
            log.warning("session %s: %s", self.id, missing)
        # the peer's microphone with in-band FEC, which the receiver decodes where a packet was lost
        return asking_opus_fec(pc.localDescription.sdp) if decodes_opus_fec() else pc.localDescription.sdp

    async def _consume_audio(self, track) -> None:
        """The client's microphone: the avatar speaks what it hears. Read until the track ends, whatever
        happens to the audio (an unread received track makes aiortc buffer without bound)."""
        async for pcm, rate in TrackSource(track).chunks():
            if self.session.closed:
                continue  # keep draining until the peer connection closes the track
            try:
                problem = self.push_audio(pcm, rate)
            except Exception as e:  # never stop reading: log, drop this chunk, go on
                log.exception("session %s: received audio could not be used", self.id)
                problem = f"received audio could not be used: {type(e).__name__}"
            if problem and time.monotonic() - self._last_buffer_error > 1.0:  # at most one a second
                self._last_buffer_error = time.monotonic()
                self.error_event(problem, "audio_dropped")

    @staticmethod
    async def _discard(track) -> None:
        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return

    async def close_pc(self, pc: RTCPeerConnection) -> None:
        try:
            await wait_for(pc.close(), self.config.pc_close_timeout_s)
        except asyncio.TimeoutError:
            log.warning("session %s: RTCPeerConnection.close() did not finish in %.0f s; abandoned",
                        self.id, self.config.pc_close_timeout_s)
        except Exception:  # closing must never fail the caller
            log.exception("session %s: error while closing the peer connection", self.id)

    async def add_viewer(self, offer_sdp: str) -> tuple[str, str]:
        """A watch-only peer connection: the session's video and audio to one more peer (an OBS overlay beside the
        client that drives the session, a second screen), on the session's one clock. (viewer id, answer SDP);
        ViewersFull past max_viewers; the pc is closed on any failure, SessionGone as negotiate()."""
        self._check_open()
        if len(self.viewers) >= self.config.max_viewers:
            raise ViewersFull(f"session {self.id} has {len(self.viewers)} viewer(s), the most this server allows "
                              "(--max-viewers); close one (DELETE its Location)")
        pc = RTCPeerConnection(ice_configuration(self.ice_servers))
        viewer = Viewer(uuid.uuid4().hex[:12], pc)
        self.viewers[viewer.id] = viewer  # counted from now: two offers at once cannot both pass the cap

        @pc.on("track")
        def on_track(track) -> None:  # a viewer sends nothing the avatar uses: read and dropped
            self.spawn(self._discard(track), f"discard-{track.kind}")

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            if state == "connected":
                self.manager.count_connected(pc)
                viewer.last_seen = time.monotonic()
            elif state in ("failed", "closed"):
                self.remove_viewer(viewer.id, f"peer connection {state}")

        try:
            answer = await self._answer(pc, offer_sdp)
            log.info("session %s: viewer %s added (%d now)", self.id, viewer.id, len(self.viewers))
            return viewer.id, answer
        except BaseException:
            self.viewers.pop(viewer.id, None)
            await self.close_pc(pc)
            raise

    def remove_viewer(self, viewer_id: str, reason: str) -> bool:
        """Close one viewer's peer connection (in the background); the session goes on. False: no such viewer."""
        viewer = self.viewers.pop(viewer_id, None)
        if viewer is None:
            return False
        log.info("session %s: viewer %s removed (%s)", self.id, viewer_id, reason)
        self.spawn(self.close_pc(viewer.pc), "close-viewer")
        return True

    async def _check_viewers(self, now: float) -> None:
        """Drop viewers whose peer went silent (no RTCP, no RTP for peer_timeout_s): a closed tab never says so."""
        for viewer in list(self.viewers.values()):
            if viewer.pc.connectionState != "connected" or viewer.last_seen is None:
                continue
            if await peer_heard(viewer.pc, viewer.marks):
                viewer.last_seen = now
            elif now - viewer.last_seen > self.config.peer_timeout_s:
                self.remove_viewer(viewer.id, f"peer unreachable (no RTCP/RTP for {self.config.peer_timeout_s:.0f} s)")

    async def peer_alive(self, now: float, timeout: float | None = None) -> bool:
        """False when a connected peer sent neither an RTCP report nor an RTP packet for `timeout` (default
        peer_timeout_s)."""
        pc = self.pc
        if pc is None or pc.connectionState != "connected" or self.last_peer_seen is None:
            return True
        if await peer_heard(pc, self._peer_marks):
            self.last_peer_seen = now
        return now - self.last_peer_seen <= (self.config.peer_timeout_s if timeout is None else timeout)

    async def replaceable(self, now: float) -> bool:
        """May a new offer replace this session's peer connection? When its peer left: the connection failed,
        closed or disconnected, or its peer was silent for peer_replace_s (a client whose network went, back on
        another one). A connection still being set up, or whose peer is heard, is kept."""
        pc = self.pc
        if pc is None:
            return True
        if pc.connectionState in ("failed", "closed", "disconnected"):
            return True
        return pc.connectionState == "connected" and not await self.peer_alive(now, self.config.peer_replace_s)

    def drop_pc(self, reason: str) -> None:
        """Let the peer connection go (closed in the background); the session stays."""
        log.info("session %s: %s", self.id, reason)
        pc, self.pc = self.pc, None
        self.last_peer_seen = None
        self._peer_marks.clear()
        if pc is not None:
            self.spawn(self.close_pc(pc), "close-pc")

    def peer_gone(self, reason: str) -> bool:
        """The peer left (its connection failed or closed, or it went silent). With the session's websocket
        still open (the program that drives it, e.g. behind an OBS overlay that reloads) only the peer
        connection goes, and a new offer may reconnect: True. Else False, and the caller closes the session."""
        if self.ws is None or self.ws.closed or self.closing:
            return False
        self.drop_pc(f"{reason}; the session stays for its websocket (a new offer reconnects)")
        return True

    # -- watchdog

    async def check(self, now: float) -> str | None:
        """A reason to close this session now, or None."""
        tick = self.session.player.tick
        if tick != self._last_tick:  # media pulled by a peer or a viewer (or frames read in-process)
            self._last_tick = tick
            self.touch()
        if self.viewers:
            await self._check_viewers(now)
        gone = None
        if self.pc is not None and self.pc.connectionState in ("failed", "closed"):
            gone = f"peer connection {self.pc.connectionState}"
        elif not await self.peer_alive(now):
            gone = f"peer unreachable (no RTCP/RTP for {self.config.peer_timeout_s:.0f} s)"
        if gone is not None:
            return None if self.peer_gone(gone) else gone
        if (self.had_ws and self.ws is None and self.pc is None and self.ws_left_at is not None
                and not self.negotiating and now - self.ws_left_at > self.config.ws_grace_s):
            return "websocket disconnected"
        if now - self.last_activity > self.config.idle_timeout_s:
            return f"idle for {self.config.idle_timeout_s:.0f} s"
        limit = self.config.max_session_s
        if limit:
            left = limit - (now - self.created)
            if left <= 0:
                return f"its time limit of {limit / 60:g} min is up (--max-session-minutes)"
            if not self.warned_end and left <= self.config.session_end_warning_s:
                self.warned_end = True  # the app can tell its user, or start a new session to go on
                self.tell_ending(left, "time_limit")
        return None

    def summary(self, reason: str) -> dict:
        """What the session did, for the `session.closed` webhook (once, at its close: the latency quantile reads every
        kept latency)."""
        s = self.session
        p95 = quantiles(s.latencies, (0.95,))
        return {"session_id": self.id, "reason": reason, "seconds": round(time.monotonic() - self.created, 2),
                "frames_generated": s.frames_generated, "ticks": s.player.tick, "held_frames": s.player.fillers,
                "speech_seconds": round(s.player.speech_frames / s.player.fps, 2),
                "latency_ms_p95": round(p95[0] * 1000, 1) if p95 else None}

    def _recording_webhook(self, event) -> None:
        if not self.manager.webhooks:
            return
        if not event.path:
            self.manager.webhooks.send("recording.failed", {"session_id": self.id, "error": event.error})
            return
        try:
            size = Path(event.path).stat().st_size
        except OSError:  # deleted already (the retention limits, a DELETE): said as it is
            size = None
        self.manager.webhooks.send("recording.saved", {
            "session_id": self.id, "url": self.recording_url, "bytes": size, "seconds": event.seconds,
            "captions_url": f"{self.recording_url}/captions" if event.captions and self.recording_url else None})

    def tell_ending(self, seconds_left: float, reason: str) -> None:
        """`session_ending` to the websocket and the event streams: the app can tell its user, or open a new session
        (on another server, when this one is draining) to go on."""
        message = {"type": "session_ending", "session_id": self.id, "seconds_left": round(seconds_left, 1),
                   "reason": reason, "time": time.time()}
        self.tell_listeners(message)
        self.send_json(message)


# --------------------------------------------------------------------------------------------------
# All sessions
# --------------------------------------------------------------------------------------------------


class SessionManager:
    def __init__(self, engines: EnginePool, config: ServerConfig) -> None:
        self.engines = engines  # one engine per device
        self.config = config
        self.signer = TokenSigner(config.token_secret)
        self.metrics = Metrics()
        self.sessions: dict[str, ServerSession] = {}
        self._admitting = 0  # slots reserved by requests still reading / decoding / preparing
        self._watchdog: asyncio.Task | None = None
        self._pruning: asyncio.Task | None = None
        self._prune_again = False
        self._pruned_at = -math.inf
        self.draining = False  # shutting down: no new sessions; the open ones go on for a while (drain)
        self._hung: set[int] = set()  # engines the watchdog said are hung (by index)
        self.webhooks = Webhooks(config.webhooks, config.webhook_secret)
        self.renders = Renders()

    @property
    def max_sessions(self) -> int:
        return self.engines.max_sessions

    def count_connected(self, pc) -> dict | None:
        """Count a peer connection that has just connected by its route (`letstalk_peer_connections_total`), and
        return that route (`selected_route`: the server's end is "local")."""
        route = selected_route(pc)
        if route is not None:
            self.metrics.peer_routes["relay" if "relay" in route.values() else "direct"] += 1
        return route

    # -- admission

    def try_reserve(self, count_refused: bool = True) -> bool:
        """Take a slot before any expensive work, or say no at once (counted as a refusal unless `count_refused` is
        false: a render that may queue, and a queued one asking again)."""
        if self.draining or len(self.engines.sessions) + self._admitting >= self.max_sessions:
            if count_refused:
                self.metrics.refused_total += 1
            return False
        self._admitting += 1
        return True

    def release(self) -> None:
        self._admitting -= 1

    @property
    def admitting(self) -> int:
        """Slots reserved by session requests not finished yet (reading, decoding, preparing)."""
        return self._admitting

    def add(self, session: Session, voice: str | None = None, avatar_id: str | None = None) -> ServerSession:
        """Keep a session the engine opened, with its token, its voice for `say` (None: the server's) and the avatar it
        was opened on (None: a portrait uploaded with the request)."""
        token, exp = self.signer.issue(session.id, self.config.token_ttl_s)
        ss = ServerSession(self, session, token, exp)
        ss.voice, ss.avatar_id = voice, avatar_id
        self.sessions[ss.id] = ss
        self.metrics.sessions_total += 1
        return ss

    # -- teardown

    async def close(self, ss: ServerSession, reason: str) -> None:
        """Free everything of one session; safe to call many times from anywhere."""
        if ss.closing:
            await ss.closed.wait()
            return
        ss.closing = True
        log.info("session %s: closing (%s)", ss.id, reason)
        try:
            if not ss.session.closed:
                await ss.session.close(reason=reason)  # emits SessionClosed: the pump forwards it
            if ss.pump is not asyncio.current_task():  # let the last event (`closed`) reach the websocket
                await asyncio.wait({ss.pump}, timeout=1.0)
            if ss.out is not None:
                out, ss.out = ss.out, None
                await out.close(1000, f"session closed: {reason}")
            if ss.pc is not None:
                pc, ss.pc = ss.pc, None
                await ss.close_pc(pc)
            viewers, ss.viewers = list(ss.viewers.values()), {}
            await asyncio.gather(*(ss.close_pc(v.pc) for v in viewers))
            current = asyncio.current_task()
            for task in list(ss.tasks):
                if task is not current:
                    task.cancel()
        finally:
            render = ss.render
            if render is not None and render.end("failed", render.seen_error or f"its session closed before the "
                                                 f"speech was all shown ({reason})", retryable=reason != DELETED):
                self.render_ended(render)
            self.sessions.pop(ss.id, None)
            self.metrics.absorb(ss.session)
            ss.tell_listeners(None)  # their streams end
            ss.closed.set()
            if self.webhooks:
                self.webhooks.send("session.closed", ss.summary(reason))

    def render_ended(self, render: Render) -> None:
        """A render was settled (done, failed or cancelled): counted, kept for GET /v1/renders/{id}, and told."""
        self.renders.ended(render)
        if render.state == "done":
            log.info("render %s: done (%.1f s of video)", render.id, render.video_s or 0.0)
        else:
            log.info("render %s: %s (%s)", render.id, render.state, render.error)
        self.webhooks.send(f"render.{render.state}", render.describe())

    async def drain(self, seconds: float) -> bool:
        """Shut down gently: new sessions are refused (503, /health answers "draining" so a load balancer sends them
        elsewhere), every open session is told `session_ending` (reason "server_stopping") and goes on until it ends
        or `seconds` pass. True when every session ended by itself. The caller then closes what is left."""
        self.draining = True
        deadline = time.monotonic() + seconds
        for ss in list(self.sessions.values()):
            if not ss.closing:
                ss.tell_ending(seconds, "server_stopping")
        while self.sessions or self._admitting:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(0.1, left))
        return True

    async def close_all(self, reason: str = "server stopping") -> None:
        await asyncio.gather(*(self.close(ss, reason) for ss in list(self.sessions.values())),
                             return_exceptions=True)

    # -- watchdog

    def start(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch(), name="letstalk-watchdog")
        self.prune_recordings()
        self.webhooks.start()

    async def stop(self) -> None:
        for render in list(self.renders.queue):  # no slot will free for them now
            if render.end("failed", "the server stopped before a session slot freed for it"):
                self.render_ended(render)
        if self._watchdog is not None:
            self._watchdog.cancel()
            try:
                await self._watchdog
            except asyncio.CancelledError:
                pass
            self._watchdog = None
        await self.close_all()
        if self._pruning is not None:
            self._pruning.cancel()
        await self.webhooks.stop()  # after close_all: the sessions it closed are told

    def frames_total(self) -> int:
        """Frames generated since start, every second (the watchdog): counters only, not the sessions' stats()."""
        return self.metrics.closed_frames + sum(ss.session.frames_generated for ss in self.sessions.values())

    # -- saved recordings: the retention limits

    def prune_recordings(self) -> None:
        """Apply the recordings' retention limits off the loop (and read their size for /metrics); while a pass runs,
        one more follows it."""
        if self.config.recordings_dir is None:
            return
        self._pruned_at = time.monotonic()
        if self._pruning is not None and not self._pruning.done():
            self._prune_again = True
            return
        self._pruning = asyncio.get_running_loop().create_task(self._prune(), name="letstalk-recordings-prune")

    async def _prune(self) -> None:
        c = self.config
        again = True
        while again:
            self._prune_again = False
            try:
                deleted, total = await asyncio.to_thread(recordings.prune, c.recordings_dir, c.recordings_keep_s,
                                                         c.recordings_max_bytes)
            except Exception:  # a folder gone or unreadable: said; the server serves on, and looks again later
                log.exception("recordings: the retention limits could not be applied")
                return
            self.metrics.recordings_pruned += len(deleted)
            self.metrics.recordings_bytes = total
            again = self._prune_again

    def _watch_engines(self) -> None:
        """Say once when an engine is taken for hung (and once when it answers again): nothing else reports a device
        or driver that stopped answering, and its sessions' pictures stand still."""
        for i, engine in enumerate(self.engines.engines):
            hung = engine.hung
            if hung and i not in self._hung:
                log.error("engine %d (%s): its worker has been in one step for %.0f s (--hung-seconds %g): the device or "
                          "its driver stopped answering; /health/live answers 503 so that an orchestrator restarts the "
                          "server, new sessions go to another device if there is one", i, engine.pipeline.device,
                          engine.busy_s, engine.config.hung_after_s)
                self._hung.add(i)
                # its sessions' clients are told, to go on in a new session (on another device or server: the SDK
                # moves by itself and deletes the old one); not closed here: the device may answer again
                for ss in list(self.sessions.values()):
                    if ss.session.engine is engine and not ss.closing:
                        ss.tell_ending(0.0, "device_hung")
            elif not hung and i in self._hung:
                log.warning("engine %d (%s): answering again", i, engine.pipeline.device)
                self._hung.discard(i)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.watch_interval_s)
            now = time.monotonic()
            self.metrics.sample_fps(self.frames_total())
            self._watch_engines()
            if now - self._pruned_at >= self.config.recordings_prune_every_s:
                self.prune_recordings()
            for ss in list(self.sessions.values()):
                if ss.closing:
                    continue
                try:
                    reason = await ss.check(now)
                except Exception:
                    log.exception("session %s: watchdog check failed", ss.id)
                    continue
                if reason:
                    ss.spawn(self.close(ss, reason), "close")
