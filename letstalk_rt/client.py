"""Async Python client of a letstalk-rt server: HTTP, WebRTC (aiortc) and a websocket. Never imports torch.

    from letstalk_rt.client import AvatarClient

    async with AvatarClient("http://127.0.0.1:8080", api_key=None) as client:
        session = await client.start_session(avatar_id="default")     # or portrait="face.jpg" (path, bytes, RGB array)
        await session.connect()                                         # WebRTC: receive the avatar's video + audio
        session.on("speech_started", lambda event: print("talking"))
        await session.send_audio(pcm16, sample_rate=16000)             # bytes or ndarray, any rate, 1-2 channels
        await session.end_speech()                                      # render the utterance's tail now
        await session.interrupt()                                       # drop queued speech at once
        async for frame in session.video_frames():                      # (H, W, 3) uint8 RGB, 25 fps
            ...
        async for frame in session.timed_video_frames():                # TimedFrame: .rgb, .time, .received_at
            ...
        async for chunk in session.audio_frames():                      # AudioChunk: int16 (n, channels) + rate
            ...
        async for event in session.events():                            # dicts: {"type": "speech_started", ...}
            ...
        await session.close()                                           # also done by the client's `async with`

        await client.render("hello.mp4", text="Hello!", avatar_id="default")   # or audio="speech.wav": an MP4, made
                                                                                # on the server (faster than real time
                                                                                # where it has room)

Each received frame and audio chunk carries its media time (`time`: seconds since its stream's first packet,
from the RTP timestamps; the server starts both streams together, so a frame and the audio of the same `time`
belong together) and when the SDK handed it over (`received_at`, `time.monotonic()`). The SDK's receivers hand each
audio packet and video frame over as soon as it is whole (`rtc.release_frames_at_once`; aiortc alone holds audio back
80 ms and video 40 ms). So that frames and audio read as they come play in step, a frame is handed over once the audio
of its time has arrived (while the audio stalls, at most `ALIGN_MAX_S`; `connect(align=False)`: as soon as it is
decoded).

`connect(audio_track=track)` sends a local aiortc audio track (a microphone, a file player; any rate, channel count
and sample format) as the session's speech instead of (or besides) `send_audio`. It goes through `rtc.OpusAudioTrack`,
as the server's own audio does: aiortc's Opus encoder alone holds each packet of a non-48 kHz track back 20 ms, and
refuses float audio; and it is encoded with in-band FEC (`rtc.opus_encoder`), from which the server decodes a packet
lost on the way, as the SDK does with the avatar's sound.

Server errors become exceptions carrying the server's message: `AuthenticationError` (401), `ServerBusyError` (503,
`.retry_after`), `SessionNotFoundError` (404; `AvatarNotFoundError` for an avatar,
`RecordingNotFoundError` for a recording or its captions), `RenderFailedError` (a render that ended without a video),
`RequestError` (other 4xx), `SessionClosedError` (sends and requests after the server closed the session: its
`reason`, also `AvatarSession.close_reason`), `AvatarClientError` (the rest, and a websocket the server closed without
closing the session, with its reason: sends fail with it, and `events()` ends with it). Errors the server reports while streaming (audio dropped, a bad control
message) arrive as `error` events.

Received frames wait in small bounded buffers (about 2 s); when nobody reads, the oldest are dropped,
so an application that only wants events never accumulates media.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime
import email.utils
import functools
import inspect
import io
import json
import logging
import os
import ssl as ssl_module
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from yarl import URL

from . import VERSION_HEADER, __version__
from .aio import wait_for, wait_state
from .errors import InputError, LetsTalkError, OutputError
from .media import (
    AUDIO_HINT,
    IMAGE_HINT,
    check_output_path,
    check_readable,
    check_video_path,
    float_pcm_problem,
    frame_pcm,
    pcm16,
)
from .rtc import (
    OpusAudioTrack,
    answer_checks_at_once,
    ice_configuration,
    relay_missing,
    release_frames_at_once,
    selected_route,
    sent_codec,
)
from .rtc import ice_servers as parse_ice_servers
from .tts import sentences

log = logging.getLogger(__name__)

ALIGN_MAX_S = 0.2  # connect(align=True): frames wait for the audio of their media time unless it has not moved this long
USER_AGENT = f"letstalk-rt/{__version__} (Python SDK; aiohttp/{aiohttp.__version__})"  # what a proxy logs
# connect(reconnect=True): the server sends 25 frames and 50 audio packets a second, silence or not, so this long
# without any is a connection gone (the server lets a new offer replace one whose peer was silent 2 s)
RECONNECT_STALL_S = 2.0
RECONNECT_POLL_S = 0.25
RECONNECT_FIRST_WAIT_S = 0.5  # between tries, doubling up to 4 s
RECONNECT_TIMEOUT_S = 30.0  # then give up: the iterators end, with an `error` event (code reconnect_failed)
# a websocket lost while the media goes on is opened again without touching the peer connection, each try given this
# long (a connect that hangs on a network gone must not keep the watchdog from seeing the media stop too)
REOPEN_TRY_S = 2.0
# connect(move=True): a session told `session_ending` because its server is stopping moves to a new session at the
# latest this long before it ends (or halfway through what is left, if that is sooner); one whose device hung tries for
# a new session this long
MOVE_MARGIN_S = 5.0
MOVE_TIMEOUT_S = 30.0
EVENTS_IDLE_S = 45.0  # a viewer's event stream with nothing for this long (the server writes every 15 s) is reopened
EVENTS_MOVE_WAIT_S = 2.0
ORPHAN_WAIT_S = 5.0  # close() waits this long for the delete of a session a move made and no longer wants
MOTION_TIMEOUT_S = 2.0  # a move reads the old session's motion and gives it to the new one in this, or goes on without
RENDER_LOST_S = 15.0  # render(): a server that has not answered its polls this long lost the render (asked again)
MOVE_REASONS = ("server_stopping", "device_hung")  # a time limit (`time_limit`) is a limit: not moved around

__all__ = [
    "AudioChunk", "AuthenticationError", "AvatarClient", "AvatarClientError", "AvatarNotFoundError", "AvatarSession",
    "RecordingNotFoundError", "RenderFailedError", "RequestError",
    "ServerBusyError", "SessionNotFoundError", "TimedFrame",
]


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class AvatarClientError(LetsTalkError):
    """A request the server refused or a connection it closed; the message is the server's."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthenticationError(AvatarClientError):
    """401: a missing or wrong API key or session token."""


class ServerBusyError(AvatarClientError):
    """503: every session slot is taken; retry after `retry_after` seconds."""

    def __init__(self, message: str, status: int | None = 503, retry_after: float | None = None) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class SessionNotFoundError(AvatarClientError):
    """404: the session was closed (idle timeout, peer gone, deleted) or never existed."""


class SessionClosedError(AvatarClientError):
    """The server closed the session (its time limit, a shutdown, an operator, a generator error): sends and requests
    after its `closed` event raise this, with the server's `reason` (also `AvatarSession.close_reason`)."""

    def __init__(self, session_id: str, reason: str) -> None:
        super().__init__(f"session {session_id} was closed by the server: {reason}")
        self.reason = reason


class AvatarNotFoundError(AvatarClientError):
    """404: no avatar of that id (deleted, or never uploaded): `AvatarClient.avatars()` lists them."""


class RecordingNotFoundError(AvatarClientError):
    """404: no saved recording of that session (not recorded, not saved: the `recording_stopped` event says why, or
    deleted), or, from `download_captions`, one that showed no captions: `AvatarClient.recordings()` lists them."""


class RenderFailedError(AvatarClientError):
    """A render (`AvatarClient.render`) that ended without a video: its session failed, it was cancelled, or the server
    stopped; the message says which. `state`: the render's last state; `retryable`: True when the same request may
    succeed made again (the server stopped, a device or the disk failed: again later, or on another server), False when
    what it holds failed (no face in its portrait), None where the server does not say (cancelled, an older server)."""

    def __init__(self, message: str, state: dict | None = None) -> None:
        super().__init__(message)
        self.state = state or {}
        self.retryable: bool | None = self.state.get("retryable")


class ServerMismatchError(AvatarClientError):
    """404/405 for a route this SDK uses: the URL leads to another web server (or a proxy with no route there), or to
    a letstalk-rt server older than the SDK, without that route; the message says which (`server_version`: the
    server's, None when it did not say it is letstalk-rt)."""

    def __init__(self, message: str, status: int | None = None, server_version: str | None = None) -> None:
        super().__init__(message, status)
        self.server_version = server_version


class RequestError(AvatarClientError):
    """Another 4xx: a bad portrait (415/422), a bad SDP offer (400), a second offer (409), too large (413)."""


def _upload(name: str, file: Any) -> tuple[bytes, str]:
    """A file to upload -> (its bytes, its file name): a path (read), bytes, or, for `portrait`, a picture held in
    memory, as the in-process `open_session` takes one: an RGB (H, W, 3), RGBA or grey uint8 array, or a PIL image
    (sent as PNG: lossless, so the server sees the pixels given)."""
    if isinstance(file, (bytes, bytearray, memoryview)):
        return bytes(file), name
    if isinstance(file, (str, os.PathLike)):  # InputError (a LetsTalkError) saying what to give when it is not a file
        kind, hint = ("image", IMAGE_HINT) if name == "portrait" else ("audio", AUDIO_HINT)
        check_readable(Path(file), kind, hint)
        return Path(file).read_bytes(), Path(file).name
    if name == "portrait" and (isinstance(file, np.ndarray) or hasattr(file, "save")):
        from PIL import Image

        if isinstance(file, np.ndarray):
            if file.dtype != np.uint8 or not (file.ndim == 2 or (file.ndim == 3 and file.shape[2] in (1, 3, 4))):
                raise ValueError(f"a portrait array must be uint8 (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey, got "
                                 f"{file.dtype} {file.shape}")
            file = Image.fromarray(file[..., 0] if file.ndim == 3 and file.shape[2] == 1 else file)
        out = io.BytesIO()
        file.save(out, format="PNG")
        return out.getvalue(), "portrait.png"
    kinds = "a path, image bytes, a uint8 RGB array or a PIL image" if name == "portrait" else "a path or bytes"
    raise TypeError(f"{name} must be {kinds}, got {type(file).__name__}")


async def _form(fields, **files: Any) -> aiohttp.FormData:
    """A multipart body: the `files` that are given (`_upload`: a path, read off the loop, bytes, or a picture in
    memory: `portrait`, `audio`; or what `_upload` made of one: (bytes, file name)) and the (name, value) `fields` that
    are not None."""
    form = aiohttp.FormData()
    for name, file in files.items():
        if file is None:
            continue
        data, filename = file if isinstance(file, tuple) else await asyncio.to_thread(_upload, name, file)
        form.add_field(name, data, filename=filename, content_type="application/octet-stream")
    for name, value in fields:
        if value is not None:
            form.add_field(name, str(value))
    return form


# What a 404's `code` says is missing. Another code (a viewer, a live stream, a page) is a RequestError.
_NOT_FOUND: dict[str, type[AvatarClientError]] = {
    "session_not_found": SessionNotFoundError, "render_not_found": SessionNotFoundError,
    "avatar_not_found": AvatarNotFoundError, "recording_not_found": RecordingNotFoundError,
    "no_captions": RecordingNotFoundError,
}


def _not_found_by_path(path: str) -> str | None:
    """The code of a 404 from a server whose 404s name none (an older one), told from the URL's path; "in", not
    "startswith": a server behind a proxy's path prefix."""
    if "/v1/avatars/" in path:
        return "avatar_not_found"
    if "/v1/recordings/" in path:
        return "recording_not_found"
    if "/broadcast" in path:  # a live stream the session does not have (or no session: it cannot tell)
        return None
    return "session_not_found"


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    text = await resp.text()
    try:
        body = json.loads(text)
        message = body.get("error") or text
    except (ValueError, AttributeError):
        body, message = {}, text.strip() or resp.reason or "error"
    request = f"{resp.method} {resp.url.path}"
    message = f"{request}: HTTP {resp.status}: {message}"
    server_version = resp.headers.get(VERSION_HEADER)
    if resp.status in (404, 405) and server_version is None:
        raise ServerMismatchError(f"{request}: HTTP {resp.status} from {resp.url.origin()}, which is not a letstalk-rt "
                                  f"server (its answers name their version in {VERSION_HEADER}): another web server, "
                                  "or a proxy with no route there; check the URL", resp.status)
    if resp.status in (404, 405) and body.get("code") == "no_route":
        fix = (f"check the URL: the server's root, e.g. {resp.url.origin()}" if server_version == __version__ else
               f"this SDK is letstalk-rt {__version__}: use a server as new as the SDK (or check the URL)")
        raise ServerMismatchError(f"{request}: HTTP {resp.status}: the letstalk-rt server at {resp.url.origin()} "
                                  f"({server_version}) has no such route; {fix}", resp.status, server_version)
    if resp.status == 401:
        raise AuthenticationError(message, resp.status)
    if resp.status == 503:
        retry = resp.headers.get("Retry-After")
        raise ServerBusyError(message, resp.status, float(retry) if retry and retry.isdigit() else None)
    if resp.status == 404:
        code = body.get("code") if isinstance(body, dict) else None
        error = _NOT_FOUND.get(code or _not_found_by_path(resp.url.path))
        if error is not None:
            raise error(message, resp.status)
    if 400 <= resp.status < 500:
        raise RequestError(message, resp.status)
    raise AvatarClientError(message, resp.status)


# --------------------------------------------------------------------------------------------------
# Bounded buffers of received media
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioChunk:
    """Received avatar audio: int16 samples shaped (n, channels) (Opus decodes to 48 kHz stereo)."""

    pcm: np.ndarray  # (n, channels) int16
    sample_rate: int
    time: float  # seconds since the stream's first packet (from the RTP timestamps)
    received_at: float = 0.0  # time.monotonic() when it arrived (the SDK handed it over)

    @property
    def channels(self) -> int:
        return self.pcm.shape[1]

    def mono_float(self) -> np.ndarray:
        """(n,) float32 in [-1, 1], channels averaged."""
        return self.pcm.astype(np.float32).mean(axis=1) / 32768.0


@dataclass
class TimedFrame:
    """A received video frame with its media time and arrival; converted to RGB when `rgb` is first read."""

    frame: av.VideoFrame
    time: float  # seconds since the stream's first frame (from the RTP timestamps), on the audio's timeline
    received_at: float  # time.monotonic() when the SDK handed it over (with `align`, once its audio had arrived)

    @functools.cached_property
    def rgb(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        return self.frame.to_ndarray(format="rgb24")


class _Buffer:
    """Drop-oldest bounded queue with async iteration that ends when the buffer is closed (or fails)."""

    def __init__(self, maxlen: int) -> None:
        self.items: collections.deque = collections.deque(maxlen=maxlen)
        self.dropped = 0
        self.received = 0
        self.closed = False
        self.error: BaseException | None = None
        self._event = asyncio.Event()

    def put(self, item: Any) -> None:
        if len(self.items) == self.items.maxlen:
            self.dropped += 1
        self.items.append(item)
        self.received += 1
        self._event.set()

    def close(self, error: BaseException | None = None) -> None:
        """No more items; once drained, readers get StopAsyncIteration, or `error` if one is given."""
        if not self.closed:
            self.closed, self.error = True, error
        self._event.set()

    async def get(self) -> Any:
        """The next item, or raises StopAsyncIteration (or the close error) once closed and drained."""
        while not self.items:
            if self.closed:
                if self.error is not None:
                    raise self.error
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        return self.items.popleft()


# --------------------------------------------------------------------------------------------------
# A session
# --------------------------------------------------------------------------------------------------


def _pcm16_bytes(arr: np.ndarray, channels: int | None) -> tuple[bytes, int]:
    """send_audio's array -> (PCM16 LE bytes, channels). (n,) is mono, or interleaved when `channels` says so;
    (n, channels) as is. Floats in -1..1 and integers in int16's range; anything else is a ValueError saying what
    it got, never noise on the other side (NaN cast to int16, int32 PCM wrapped round)."""
    if arr.ndim == 1 and channels and channels > 1:
        if len(arr) % channels:
            raise ValueError(f"send_audio: {len(arr)} interleaved samples are not whole frames of {channels} channels")
        arr = arr.reshape(-1, channels)
    if arr.ndim not in (1, 2):
        raise ValueError(f"send_audio: audio must be shaped (n,) or (n, channels), got {arr.shape}")
    shaped = arr.shape[1] if arr.ndim == 2 else 1
    if channels is not None and channels != shaped:
        raise ValueError(f"send_audio: channels={channels}, but the array shaped {arr.shape} holds {shaped}")
    if arr.ndim == 2 and shaped > 2 and arr.shape[0] <= 2:
        raise ValueError(f"send_audio: audio shaped {arr.shape} is (channels, n); send its transpose (.T), "
                         "shaped (n, channels)")
    if arr.dtype.kind == "f":
        if problem := float_pcm_problem(arr):
            raise ValueError(f"send_audio: {problem}")
        arr = pcm16(arr)
    elif arr.dtype.kind == "i" and arr.dtype != np.int16:
        if arr.size and (arr.min() < -32768 or arr.max() > 32767):
            raise ValueError(f"send_audio: {arr.dtype} samples outside int16's range (32-bit PCM? give int16, or "
                             "floats in -1..1)")
    elif arr.dtype != np.int16:
        raise ValueError(f"send_audio: audio must be int16 or float samples, got {arr.dtype}")
    return np.ascontiguousarray(arr).astype("<i2").tobytes(), shaped


async def _server_sent(resp: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The JSON objects of a server-sent event stream (`data:` lines; comments and other fields skipped)."""
    data: list[str] = []
    async for raw in resp.content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            try:
                event = json.loads("\n".join(data))
            except ValueError:
                event = None
            data = []
            if isinstance(event, dict):
                yield event


def _token_expiry(token: str) -> int | None:
    """When a session token expires (its JWT's `exp`, unix time), read without checking its signature (the server
    does); None for what is not one (an API key)."""
    try:
        payload = token.split(".")[1]
        return int(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def _server_time(resp: aiohttp.ClientResponse) -> float:
    """The server's clock as its answer says (its `Date` header, to the second); this machine's where it says none. A
    token's expiry is on the server's clock: a client whose own is off (a kiosk without a real-time clock, before NTP
    set it) counts down to it from the server's time, on its monotonic clock (`AvatarSession._token_deadline`)."""
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        when = email.utils.parsedate_to_datetime(resp.headers.get("Date", ""))
        return when.timestamp() if when.tzinfo is not None else when.replace(tzinfo=datetime.timezone.utc).timestamp()
    return time.time()


class AvatarSession:
    """One avatar on the server: WebRTC media, a websocket for audio/control/events, and its lifetime."""

    def __init__(self, client: AvatarClient, info: dict, owner: bool = True, server_time: float | None = None,
                 how: dict | None = None) -> None:
        """`server_time`: the server's clock when it gave `info` (`_server_time`), which the token's expiry is on.
        `how`: the request that made it (`AvatarClient._create`), which a move makes again."""
        self.owner = owner  # made by start_session: close() deletes the session; else (session()) only its viewer
        self._how = how
        self._token_task: asyncio.Task | None = None
        self._identify(client, info, server_time)
        self.viewer_url: str | None = None  # connect(viewer=True): this client's viewer (its DELETE frees it)
        self.pc: RTCPeerConnection | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ws_lock = asyncio.Lock()
        self._format = (16000, 1, False)  # the server's default binary audio format: (rate, channels, ahead)
        self._ws_close: str | None = None  # how the websocket ended: "closed by the server (code ...)" or "lost ..."
        self._ws_lost_at: float | None = None  # monotonic: lost (no close from the server) while reconnect is on
        self._ws_back = asyncio.Event()  # while lost: set once a new one is open or none will come (sends wait on it)
        self._callbacks: dict[str, list[Callable]] = collections.defaultdict(list)
        self._events = _Buffer(1000)
        self._video = _Buffer(50)  # 2 s at 25 fps
        self._audio = _Buffer(100)  # 2 s of 20 ms packets
        self._tasks: set[asyncio.Task] = set()
        self._replies: dict[int, asyncio.Future] = {}  # control messages awaiting their answer (ping, say), by id
        self._request_id = 0
        self._failed: str | None = None
        self._link: dict = {}  # how connect() connected: a reconnect connects the same way
        self._watching = False  # connect(reconnect=True): a watchdog replaces a connection whose media stopped
        self.close_reason: str | None = None  # the server closed the session: its `closed` event's reason
        self._media_at = 0.0  # monotonic: when media last arrived (or the connection came up)
        self._time_offset = 0.0  # the current connection's media time 0 on the session's timeline (reconnects)
        self._last_media_time = 0.0  # the end of the last video frame received, on that timeline
        self.closed = False
        self._align = False  # connect(align=...) with audio received
        self._audio_until = -1.0  # media time up to which audio has arrived
        self._audio_at = 0.0  # monotonic: when it last moved (or the first frame came, before any audio)
        self._audio_moved = asyncio.Event()
        # Binary audio messages, numbered as the server counts them (its `ready` says how many it had): sent; shown by
        # an `audio_played` event (its `audio_messages`) or dropped by interrupt(); sent on the current websocket.
        self._audio_sent = self._audio_done = self._ws_sent = 0
        # what of it is not yet shown (start_session's: a move sends it again), [PCM16, (rate, channels, ahead), ended]
        self._unshown: collections.deque[list] = collections.deque()
        self._unshown_s = 0.0  # its seconds
        # say() texts not yet all shown (a move says them again), [sentences, say's options, index of
        # the sentence shown now (-1: none yet)]: a sentence starts with its `caption` event; a text is over when the
        # next one's first caption comes, or speech stops on its last sentence
        self._said: collections.deque[list] = collections.deque()
        self._sends_held: asyncio.Event | None = None  # a move's switch: sends wait for it (set when it is over)
        self.max_queued_seconds = 30.0  # speech the server queues ahead of playback (its `ready` says), more refused
        self._shown_moved = asyncio.Event()  # set when audio_shown may have changed (wait_audio_shown)
        self.move_on_ending = how is not None  # (public) move() by itself on `session_ending` (connect(move=))
        self._broadcasts: dict[str, dict] = {}  # broadcast()'s live streams running, by id: a move starts them again
        self._moving = False  # move() or connect(move=True)'s: a new session is being made, or switched to
        self._leaving: tuple[AvatarClient, str, str] | None = None  # a switch's old session, until it is deleted
        self._orphans: set[asyncio.Task] = set()  # a move's new session being made or deleted: close() waits for them
        self._follows = False  # connect(viewer=True, move=True): watch the session the one watched moved to
        self._own_client: AvatarClient | None = None  # a viewer that followed a move to another server: its client
        self._link_lock = asyncio.Lock()  # the watchdog's look and reconnect, or a move's switch: one at a time
        self._keep_token_for(client)

    def _identify(self, client: AvatarClient, info: dict, server_time: float | None) -> None:
        """Be the session `info` describes (at first, and after a move)."""
        self.client = client
        self.info = info
        self.id: str = info["session_id"]
        self.token: str = info["token"]
        self.expires_at: int = info["expires_at"]
        # when the token expires on this machine's monotonic clock: its own time of day may be off (`_server_time`)
        now = time.time() if server_time is None else server_time
        self._token_deadline = time.monotonic() + self.expires_at - now
        self.offer_url = client._url(info["offer_url"])
        self.viewers_url = client._url(f"/v1/sessions/{self.id}/viewers")
        self.ws_url = client._url(info["ws_url"], websocket=True)

    def _keep_token_for(self, client: AvatarClient) -> None:
        if self._token_task is not None:  # a moved session's: its URL names the old session
            self._token_task.cancel()
            self._token_task = None
        if self.token != client.api_key and self._token_deadline > time.monotonic():  # (the API key: none to renew)
            self._token_task = self._spawn(self._keep_token(), "token")

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=f"avatar-{self.id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _keep_token(self) -> None:
        """Renew the session's token, and its TURN credentials, while it is open: each time half of what is left of
        the token has gone (30 minutes into the server's hour). A session outlives its first token, and a reconnect,
        a viewer or close() needs one that holds. A failure is tried again once half of what is then left has gone; a
        server without the renewal (older) or that no longer has the session leaves the token as it is."""
        url = self.client._url(f"/v1/sessions/{urllib.parse.quote(self.id, safe='')}/token")
        while True:
            left = self._token_deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(max(left / 2, 0.25))
            http = self.client._http
            if self.closed or http is None or http.closed:
                return
            try:
                async with http.post(url, headers=self._headers()) as resp:
                    if resp.status in (401, 404, 405):  # the session is gone, or the server is older than the renewal
                        log.info("session %s: its token is not renewed (HTTP %d)", self.id, resp.status)
                        return
                    await _raise_for_status(resp)
                    renewed = await resp.json()
                    server_time = _server_time(resp)
            except (aiohttp.ClientError, asyncio.TimeoutError, AvatarClientError, ValueError) as e:
                log.warning("session %s: renewing its token failed (%s); trying again", self.id,
                            str(e) or type(e).__name__)
                continue
            self.token, self.expires_at = renewed["token"], int(renewed["expires_at"])
            self._token_deadline = time.monotonic() + self.expires_at - server_time
            self.info.update(token=self.token, expires_at=self.expires_at)
            if "ice_servers" in renewed:
                self.info["ice_servers"] = renewed["ice_servers"]

    # -- WebRTC

    async def connect(self, audio_track: MediaStreamTrack | None = None, *, video: bool = True, audio: bool = True,
                      websocket: bool | None = None, timeout: float = 20.0, align: bool = True,
                      reconnect: bool = True, viewer: bool = False, move: bool = True) -> None:
        """Negotiate WebRTC (receive video/audio; send `audio_track` if given) and open the websocket. `align`: hand
        each video frame over once the audio of its media time has arrived (module docstring).

        `viewer`: watch only, as one more viewer of a session another client drives (`AvatarClient.session(id,
        token)`; POST /v1/sessions/{id}/viewers): its video and audio, on the session's one clock, with no websocket
        and nothing sent; the session's own peer connection, and its other viewers, are left as they are. A session
        has at most the server's `--max-viewers` (409 past it).

        `reconnect`: when no media has arrived for RECONNECT_STALL_S (the network went: a Wi-Fi/cellular switch, a
        laptop's sleep) or the peer connection fails, connect again with a new one (and a new websocket), for up to
        RECONNECT_TIMEOUT_S; the frame, audio and event iterators go on across it, media times continuing from where
        they were. A websocket lost alone (its TCP connection ended with no close: a proxy restarted) is opened again
        at once, the peer connection left as it is; sends made meanwhile wait for it. Events `reconnecting` and
        `reconnected` (or an `error` with code `reconnect_failed`, after which the iterators end and sends raise) say
        so.

        A viewer's events (`events()`, `on()`) come from the session's event stream (GET /v1/sessions/{id}/events,
        read-only, opened again if it drops), not its websocket: the driving client keeps that.

        `move`: when the server says it will end the session because it is stopping (`session_ending` reason
        `server_stopping`: a rolling update) or its device hung (`device_hung`), go on in a new session made as this
        one was, through the same URL (a balancer sends it to a server that is up; a server with several devices puts
        it on another): `move()`, with speech already sent shown first where there is time. (`move_on_ending`, the
        same for a session that is never connected here: one shown by an overlay page, or live-streamed: True for
        start_session's.) A viewer follows the session instead: when the client driving it moves it (its `closed`
        event names the new session, `moved_to`), the viewer watches the new one, on its server, the iterators going
        on and a `moved` event saying so. A session this client only attached to and drives is not moved."""
        if self.closed:
            raise AvatarClientError(f"session {self.id} is closed")
        if self.pc is not None:
            raise AvatarClientError(f"session {self.id} is already connected")
        if not (video or audio or audio_track is not None):
            raise ValueError("connect(): nothing to negotiate (video=False, audio=False and no audio_track)")
        if viewer and (audio_track is not None or websocket):
            raise ValueError("connect(viewer=True) watches only: no audio_track, no websocket (the client driving the "
                             "session has them)")
        websocket = not viewer if websocket is None else websocket
        if audio_track is not None and getattr(audio_track, "kind", None) != "audio":
            raise ValueError(f"connect(audio_track=...): expected an audio track, got a "
                             f"{getattr(audio_track, 'kind', type(audio_track).__name__)!s} one")
        servers = self.info.get("ice_servers", []) if self.client.ice_servers is None else self.client.ice_servers
        try:
            servers = parse_ice_servers(servers)
        except ValueError as e:
            raise AvatarClientError(f"session {self.id}: {e}") from None
        if websocket:
            await self._open_ws()
        self._align = align and audio and video
        self.move_on_ending = move and self._how is not None
        self._follows = viewer and move
        self._link = dict(servers=servers, audio_track=audio_track, video=video, audio=audio, websocket=websocket,
                          timeout=timeout, viewer=viewer)
        await self._negotiate(**self._link)
        if viewer and not websocket:
            self._spawn(self._read_events(), "events")
        if reconnect:
            self._spawn(self._watch_media(), "reconnect")

    async def _negotiate(self, servers: list[dict], audio_track: MediaStreamTrack | None, video: bool, audio: bool,
                         websocket: bool, timeout: float, viewer: bool = False) -> None:
        """One peer connection, offered and connected (self.pc); closed again if that fails."""
        pc = RTCPeerConnection(ice_configuration(servers, relay_only=self.client.relay_only))
        self.pc = pc
        connected = asyncio.Event()
        failed: list[str] = []

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if not release_frames_at_once(pc, track):
                log.info("session %s: this aiortc's %s receiver holds frames back (%s ms more latency)", self.id,
                         track.kind, "~80" if track.kind == "audio" else "~40")
            self._spawn(self._read_track(track, pc), f"recv-{track.kind}")

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected":
                connected.set()
            elif pc.connectionState in ("failed", "closed"):
                failed.append(f"peer connection {pc.connectionState}")
                connected.set()
                if self.pc is pc and not self._watching:  # with reconnect on, the watchdog decides
                    self._failed = failed[0]
                    self._video.close()
                    self._audio.close()

        try:
            if video:
                pc.addTransceiver("video", direction="recvonly")
            if audio_track is not None:
                pc.addTransceiver(OpusAudioTrack(audio_track), direction="sendrecv" if audio else "sendonly")
            elif audio:
                pc.addTransceiver("audio", direction="recvonly")
            await pc.setLocalDescription(await pc.createOffer())  # gathers candidates: the offer is complete
            missing = relay_missing(servers, pc.localDescription.sdp)
            if missing and self.client.relay_only:
                raise AvatarClientError(f"session {self.id}: cannot connect through the relay only: {missing}")
            if missing:
                log.warning("session %s: %s; connecting without it", self.id, missing)
            answer_checks_at_once(pc)
            http = self.client._require_http()
            if viewer and self.viewer_url is not None:  # a reconnect: the old viewer goes now, not once silent
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    async with http.delete(self.viewer_url, headers=self._headers(),
                                           timeout=aiohttp.ClientTimeout(total=2)):
                        pass
                self.viewer_url = None
            async with http.post(self.viewers_url if viewer else self.offer_url, data=pc.localDescription.sdp.encode(),
                                 headers={**self._headers(), "Content-Type": "application/sdp"}) as resp:
                await _raise_for_status(resp)
                answer = await resp.text()
                if viewer:  # DELETEd by close(), or by the next reconnect before it offers again
                    self.viewer_url = self.client._url(resp.headers["Location"])
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            for transceiver in pc.getTransceivers():  # (before the sender's first read, which waits for the link)
                if isinstance(transceiver.sender.track, OpusAudioTrack):
                    transceiver.sender.track.bind(sent_codec(answer, "audio"))
            await wait_for(connected.wait(), timeout)
            if failed:
                raise AvatarClientError(f"WebRTC connection to session {self.id} failed ({failed[0]})")
            self._media_at = time.monotonic()
        except BaseException as e:
            if self.pc is pc:
                self.pc = None
            await _close_pc(pc)
            if isinstance(e, asyncio.TimeoutError):
                raise AvatarClientError(f"WebRTC connection to session {self.id} not established within "
                                        f"{timeout:g} s") from None
            raise

    async def _watch_media(self) -> None:
        """Reconnect when media stops (connect(reconnect=True))."""
        self._watching = True
        while not self.closed:
            await asyncio.sleep(RECONNECT_POLL_S)
            async with self._link_lock:  # (not while a move switches: it replaces the connection itself)
                if not await self._look():
                    return

    async def _look(self) -> bool:
        """The watchdog's look at the connection: reconnect where it went; False once there is nothing to watch."""
        if self.close_reason is not None:  # its connection closes with it: the media iterators end once drained
            self._video.close()
            self._audio.close()
            return False
        if self._moving:  # a viewer about to follow its session to the new one (`_view_moved`)
            return True
        pc = self.pc
        # (not before the first media: a server slow to its first frame is not a network gone)
        stalled = (self._video.received + self._audio.received > 0
                   and time.monotonic() - self._media_at > RECONNECT_STALL_S)
        if pc is not None and not stalled and pc.connectionState not in ("failed", "closed"):
            return self._ws_lost_at is None or await self._reopen_ws()
        reason = (f"no media for {RECONNECT_STALL_S:g} s" if stalled
                  else f"peer connection {pc.connectionState if pc else 'gone'}")
        return await self._reconnect(reason)

    async def _reconnect(self, reason: str) -> bool:
        """Replace the peer connection (and the websocket) until one connects or RECONNECT_TIMEOUT_S has passed;
        False when it gave up (the iterators then end with the reason)."""
        started = time.monotonic()
        log.info("session %s: %s; reconnecting", self.id, reason)
        self._dispatch({"type": "reconnecting", "session_id": self.id, "reason": reason, "time": time.time()})
        # media times go on from where they stopped, by the time the outage took (both tracks start again at 0)
        self._time_offset = max(self._last_media_time, self._audio_until) + (time.monotonic() - self._media_at)
        old, self.pc = self.pc, None
        if old is not None:
            self._spawn(_close_pc(old), "close-pc")
        wait, last = RECONNECT_FIRST_WAIT_S, reason
        while not self.closed and time.monotonic() - started < RECONNECT_TIMEOUT_S:
            try:
                if self._link["websocket"]:  # over a network that went, the old one is dead too: a fresh one
                    await self._open_ws(replace=True)
                self._audio_until, self._audio_at = -1.0, time.monotonic()
                await self._negotiate(**self._link)
                self._dispatch({"type": "reconnected", "session_id": self.id, "time": time.time(),
                                "after_s": round(time.monotonic() - started, 3)})
                return True
            except (SessionNotFoundError, AuthenticationError) as e:  # the session is gone: nothing to go back to
                if await self._moved_soon():  # a viewer's, moved: the event stream's `closed` says where (it follows)
                    return True
                last = str(e)
                break
            except (AvatarClientError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                last = str(e) or type(e).__name__  # 409 (the server still hears the old peer), no network yet
            await asyncio.sleep(min(wait, max(0.0, RECONNECT_TIMEOUT_S - (time.monotonic() - started))))
            wait = min(2 * wait, 4.0)
        if not self.closed:
            self._give_up(reason, last)
        return False

    def _give_up(self, reason: str, last: str) -> None:
        """The connection could not be made again: an `error` event, then the iterators end and sends raise."""
        self._failed = f"reconnect failed: {last}"
        self._dispatch({"type": "error", "session_id": self.id, "code": "reconnect_failed", "time": time.time(),
                        "message": f"session {self.id}: lost the connection ({reason}) and could not reconnect "
                                   f"within {RECONNECT_TIMEOUT_S:g} s: {last}"})
        self._video.close()
        self._audio.close()
        self._events.close(AvatarClientError(self._failed))
        self._ws_back.set()

    async def _reopen_ws(self) -> bool:
        """One try at a new websocket for one lost while the media goes on (the peer connection is left as it is);
        False when it gave up: the session is gone, or none opened within RECONNECT_TIMEOUT_S of the loss."""
        lost_at = self._ws_lost_at
        assert lost_at is not None
        try:
            await wait_for(self._open_ws(), REOPEN_TRY_S)
        except (SessionNotFoundError, AuthenticationError) as e:  # the session is gone: nothing to go back to
            self._give_up("websocket lost", str(e))
            return False
        except (AvatarClientError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            if time.monotonic() - lost_at < RECONNECT_TIMEOUT_S:
                return True  # tried again at the watchdog's next look
            self._give_up("websocket lost", str(e) or type(e).__name__)
            return False
        log.info("session %s: websocket open again after %.1f s", self.id, time.monotonic() - lost_at)
        self._dispatch({"type": "reconnected", "session_id": self.id, "time": time.time(),
                        "after_s": round(time.monotonic() - lost_at, 3), "websocket_only": True})
        return True

    # -- moving to a new session

    async def move(self, client: AvatarClient | None = None, *, reason: str = "moved by the application",
                   timeout: float = 30.0) -> None:
        """Go on in a new session made as this one was (the same portrait or avatar, seed and options), on `client`'s
        server (another server, for one that is stopping: `session_ending`) or by default through this session's client,
        and end this one. The frame, audio and event iterators go on across it, media times continuing; sends go to the
        new session (`id`, `token` and the URLs are its); a `moved` event (`session_id` the new one, `from_session_id`,
        `reason`, `after_s`, `motion`) says when its media flows. Speech sent (`send_audio`) and not yet shown is sent
        again to the new session, whole messages (up to half a second may be heard twice), and `say()` text from the
        sentence on screen, sends meanwhile waiting for it; the new session goes on from this one's motion (the frames
        it showed last: `motion`), not from the portrait. The old session's DELETE says where it went, and its pages
        follow (an overlay page, `overlay_url()`, on the same server); the live streams `broadcast()` started start
        again on the new session once the old one's have ended (an `error` event, code `broadcast_not_moved`, if one is
        refused). Raises what making the new session raised (ServerBusyError: that server is full or stopping too), this
        session left as it was; AvatarClientError for a session this client did not start."""
        if self._how is None:
            raise AvatarClientError(f"session {self.id}: only a session this client started (start_session) can move")
        if self.closed or self.close_reason is not None:
            raise AvatarClientError(f"session {self.id} is closed")
        if self._moving:
            raise AvatarClientError(f"session {self.id} is moving already")
        client = client or self.client
        self._moving = True
        try:
            info, server_time = await self._made(client, timeout)
            await self._switch(client, info, server_time, reason)
        finally:
            self._moving = False

    async def _follow(self, event: dict) -> None:
        """connect(move=True): move when told `session_ending` for a reason in MOVE_REASONS. A stopping server's
        session goes on meanwhile: what was sent is shown first, until MOVE_MARGIN_S before its end; a new session is
        asked for (through the same URL) until then (MOVE_TIMEOUT_S for a hung device, whose session shows nothing
        more), a full or stopping server tried again. An `error` event with code `move_failed` if none came: the old
        session goes on until it ends."""
        reason = str(event.get("reason"))
        left = max(0.0, float(event.get("seconds_left") or 0.0))
        now = time.monotonic()
        switch_by = now + left - min(MOVE_MARGIN_S, left / 2) if left else now + MOVE_TIMEOUT_S
        try:
            if left:  # speech sent before the news is shown first (a live stream of it may never end: not past then)
                await self.wait_audio_shown(timeout=max(0.0, switch_by - time.monotonic() - 1.0), said=True)
            made = await self._new_session_by(switch_by, reason)
            if made is None:
                return
            try:
                if left and not (self.audio_shown and not self._said):  # what was sent while the new one was made
                    await self.wait_audio_shown(timeout=max(0.0, switch_by - time.monotonic()), said=True)
            except BaseException:  # (cancelled: close())
                self._drop(self.client, made[0])
                raise
            if self.closed or self.close_reason is not None:  # ended meanwhile: the new one is not wanted
                self._drop(self.client, made[0])
                return
            await self._switch(self.client, *made, reason)
        except Exception:  # (a callback's task: nobody would see it)
            log.exception("session %s: moving it failed", self.id)

    async def _new_session_by(self, deadline: float, reason: str) -> tuple[dict, float] | None:
        """A new session made as this one was (`_create`'s answer and server time), asked for until `deadline`
        (monotonic), a full or stopping server tried again with backoff; None once this one closed, or when none came
        (an `error` event, code `move_failed`, says why)."""
        wait, last = RECONNECT_FIRST_WAIT_S, ""
        while not (self.closed or self.close_reason is not None):
            try:
                return await self._made(self.client, max(1.0, deadline - time.monotonic()))
            except ServerBusyError as e:  # full, or stopping (a balancer that has not yet seen its /health)
                last = str(e)
            except (AuthenticationError, RequestError, AvatarNotFoundError) as e:  # not going to change
                last, deadline = str(e), 0.0
            except (AvatarClientError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                last = str(e) or type(e).__name__
            if time.monotonic() + wait > deadline:
                self._dispatch({"type": "error", "session_id": self.id, "code": "move_failed", "time": time.time(),
                                "message": f"session {self.id}: told it ends ({reason}) and could not move to a new "
                                           f"session: {last}"})
                return None
            await asyncio.sleep(wait)
            wait = min(2 * wait, 4.0)
        return None

    async def _made(self, client: AvatarClient, timeout: float) -> tuple[dict, float]:
        """`client._create(self._how)` within `timeout`. A session the server makes after this stopped waiting for it
        (timed out; cancelled by close()) is deleted once it is there, not left open until its idle timeout."""
        task = asyncio.get_running_loop().create_task(client._create(self._how), name=f"avatar-{self.id}-create")
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)
        try:
            return await wait_for(asyncio.shield(task), timeout)
        except BaseException:
            task.add_done_callback(lambda t: t.cancelled() or t.exception() or self._drop(client, t.result()[0]))
            raise

    def _drop(self, client: AvatarClient, info: dict) -> None:
        """Delete a session made for a move that did not happen (close() waits for it, rather than cancel it)."""
        task = asyncio.get_running_loop().create_task(self._delete(client, info["session_id"], info["token"]),
                                                      name=f"avatar-{self.id}-drop")
        self._orphans.add(task)
        task.add_done_callback(self._orphans.discard)

    async def _switch(self, client: AvatarClient, info: dict, server_time: float, reason: str) -> None:
        """Become the new session `info` (made on `client`'s server): its websocket; the old session deleted, saying
        where it went (before its peer connection closes: the server would end it for that first, without the news);
        then a peer connection in place of the old one's (connect()'s way; a reconnect's tries if that fails). If its
        websocket cannot be opened, this stays the old session and the new one is deleted."""
        async with self._link_lock:  # (a reconnect under way finishes first; the watchdog waits for this)
            if self._failed is not None or self.closed or self.close_reason is not None:
                self._drop(client, info)
                raise AvatarClientError(f"session {self.id}: {self._failed or self.close_reason or 'closed'}")
            started = time.monotonic()
            old = {name: getattr(self, name) for name in ("client", "info", "id", "token", "expires_at",
                                                          "_token_deadline", "offer_url", "viewers_url", "ws_url")}
            old_ws = self._ws
            self._identify(client, info, server_time)
            self._leaving = (old["client"], old["id"], old["token"])  # (close() meanwhile deletes both)
            held = self._sends_held = asyncio.Event()  # sends wait: none to the old session, none before the replay
            try:
                try:
                    if self._link.get("websocket", old_ws is not None):
                        await self._open_ws(replace=True)  # (the old one closed: its events are not this session's)
                    if self.closed:
                        raise AvatarClientError(f"session {old['id']} was closed while it moved")
                except BaseException:
                    self.__dict__.update(old)
                    self._leaving = None
                    self._drop(client, info)
                    raise
                old["client"]._sessions.discard(self)
                client._sessions.add(self)
                self._keep_token_for(client)
                replay, said = list(self._unshown), list(self._said)
                self._unshown.clear()
                self._unshown_s = 0.0
                self._said.clear()
                self._audio_sent = self._audio_done = self._ws_sent = 0  # the server counts each session's messages
                self._shown_moved.set()
                if old_ws is not None and self._ws is old_ws:  # connect(websocket=False) with one opened by a send
                    self._ws = None
                    self._spawn(_close_quietly(old_ws), "ws-close")
                carried = await self._carry_motion(old["client"], old["id"], old["token"])  # (before any speech)
                await self._replay(replay, said)
            finally:
                self._sends_held = None
                held.set()
            old_pc, self.pc = self.pc, None  # (its frames stop here: what it still brings would go back in time)
            if self._link:
                self._time_offset = (max(self._last_media_time, self._audio_until)
                                     + (time.monotonic() - self._media_at))
            await self._leave(old["client"], old["id"], old["token"])
            self._leaving = None
            if old_pc is not None:
                self._spawn(_close_pc(old_pc), "close-pc")
            if self.closed:  # (close() deleted the new session)
                raise AvatarClientError(f"session {old['id']} was closed while it moved")
            if self._link:
                await self._connect_moved()
        log.info("session %s: moved to session %s (%s)", old["id"], self.id, reason)
        self._dispatch({"type": "moved", "session_id": self.id, "from_session_id": old["id"], "reason": reason,
                        "motion": carried, "time": time.time(), "after_s": round(time.monotonic() - started, 3)})

    async def _connect_moved(self) -> None:
        """A move's peer connection to the new session, connect()'s way; a reconnect's tries if that fails (with
        connect(reconnect=True))."""
        self._audio_until, self._audio_at = -1.0, time.monotonic()
        try:
            await self._negotiate(**self._link)
        except (AvatarClientError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            if not self._watching or not await self._reconnect(f"moved; its new connection failed: {e}"):
                raise

    async def _replay(self, unshown: list[list], said: list[list]) -> None:
        """A move: send the new session the speech the old one had not shown (each message whole: up to its half
        second may be heard twice), its formats and utterance ends as they were, then the say() texts it had not
        finished, from the sentence it was showing (said again from its start). A send that fails loses the rest."""
        try:
            for chunk, form, ended in unshown:
                await self._send(functools.partial(self._send_chunk, chunk=chunk, form=form), held=True)
                if ended:
                    await self._send(self._send_end, held=True)
            for pieces, options, at in said:
                rest = pieces[max(at, 0):]
                await self._send(functools.partial(self._send_say, text=" ".join(rest), options=options), held=True)
                self._said.append([rest, options, -1])
        except (AvatarClientError, aiohttp.ClientError, OSError) as e:
            log.warning("session %s: the speech the old session had not shown was not all sent again (%s)", self.id, e)
        if unshown or said:
            log.info("session %s: %.1f s of speech and %d say() texts not yet shown sent again", self.id,
                     sum(len(c) / (2 * f[0] * f[1]) for c, f, _ in unshown), len(said))

    @staticmethod
    async def _send_say(ws: aiohttp.ClientWebSocketResponse, text: str, options: dict) -> None:
        await ws.send_str(json.dumps({"type": "say", "text": text, **options}, ensure_ascii=False))

    async def _leave(self, client: AvatarClient, session_id: str, token: str) -> None:
        """A move: delete the old session saying where it went (an overlay page of it follows), then start its live
        streams again on the new one (after: a streaming server may take one connection per stream key)."""
        where = {"session_id": self.id, "token": self.token}
        if self.client.base_url != client.base_url:
            where["url"] = str(self.client.base_url)
        await self._delete(client, session_id, token, moved_to=where)
        if self._broadcasts:
            self._spawn(self._carry_broadcasts(session_id, self._broadcasts), "broadcasts")
            self._broadcasts = {}

    async def _carry_broadcasts(self, old_id: str, carried: dict[str, dict]) -> None:
        for body in carried.values():
            try:
                state = await self._start_broadcast(body)
                log.info("session %s: its live stream to %s goes on from this session", self.id, state.get("url"))
            except (aiohttp.ClientError, asyncio.TimeoutError, AvatarClientError) as e:
                self._dispatch({"type": "error", "session_id": self.id, "code": "broadcast_not_moved",
                                "time": time.time(), "message": f"session {self.id}: the live stream the old session "
                                                                f"{old_id} had did not start again: {e}"})

    async def _delete(self, client: AvatarClient, session_id: str, token: str, url: str | None = None,
                      moved_to: dict | None = None) -> None:
        """DELETE a session (close(), or the one a move left: `moved_to` says where it went, for the pages watching
        it) or `url` (this client's viewer of it); one gone already (404) or whose token expired (401) is fine."""
        http = client._http
        if http is None or http.closed:
            return
        url = url or client._url(f"/v1/sessions/{urllib.parse.quote(session_id, safe='')}")
        try:
            async with http.delete(url, headers={"Authorization": f"Bearer {token}"},
                                   json=None if moved_to is None else {"moved_to": moved_to}) as resp:
                if resp.status not in (204, 401, 404):
                    await _raise_for_status(resp)
        except (aiohttp.ClientError, asyncio.TimeoutError, AvatarClientError) as e:
            log.warning("session %s: DELETE failed (%s); the server frees it after its idle timeout", session_id,
                        str(e) or type(e).__name__)

    # -- a viewer: the session's event stream, and following its move

    async def _read_events(self) -> None:
        """A viewer's events, from the session's event stream (server-sent events; the websocket is the driving
        client's), opened again when it drops, until the session closes. A `closed` event naming where the session
        went (`moved_to`) is followed (`_view_moved`) when connect(move=True)."""
        wait = RECONNECT_FIRST_WAIT_S
        while not self.closed and self.close_reason is None and self._failed is None:
            moved: tuple[dict, dict] | None = None
            url = self.client._url(f"/v1/sessions/{urllib.parse.quote(self.id, safe='')}/events")
            try:  # (no total timeout: the stream lasts the session; the server writes every 15 s)
                async with self.client._require_http().get(url, headers=self._headers(), timeout=aiohttp.ClientTimeout(
                        total=None, sock_connect=self.client.timeout, sock_read=EVENTS_IDLE_S)) as resp:
                    await _raise_for_status(resp)
                    wait = RECONNECT_FIRST_WAIT_S
                    async for event in _server_sent(resp):
                        if event.get("type") == "listening":
                            continue
                        if event.get("type") == "closed" and self._follows and isinstance(event.get("moved_to"), dict):
                            self._moving = True  # (the watchdog leaves the connection, whose end is coming, alone)
                            moved = event, event["moved_to"]
                            break
                        self._dispatch(event)
            except (SessionNotFoundError, AuthenticationError) as e:  # gone: no event will come
                self._events.close(AvatarClientError(f"session {self.id}: its event stream: {e}"))
                return
            except (aiohttp.ClientError, asyncio.TimeoutError, AvatarClientError, OSError) as e:
                log.info("session %s: its event stream dropped (%s); opening it again", self.id,
                         str(e) or type(e).__name__)
            if moved is not None:
                try:
                    await self._view_moved(*moved)
                finally:
                    self._moving = False
                continue
            if self.closed or self.close_reason is not None:
                return
            await asyncio.sleep(wait)
            wait = min(2 * wait, 4.0)

    async def _view_moved(self, closed: dict, moved_to: dict) -> None:
        """A viewer whose session moved (its `closed` event's `moved_to`): watch the new session, on its server (a
        client of this one's settings for another URL), with a new peer connection. If that fails, an `error` event
        (code `move_failed`) and the old session's `closed`."""
        started, old_id = time.monotonic(), self.id
        try:
            client, url = self.client, moved_to.get("url")
            made = bool(url) and URL(str(url).rstrip("/") + "/") != client.base_url
            if made:  # (closed by close(), or once it follows on again)
                client = await AvatarClient(str(url), timeout=client.timeout, ice_servers=client.ice_servers,
                                            relay_only=client.relay_only, ssl=client._ssl).open()
            try:
                info, server_time = await client._attached(str(moved_to["session_id"]), str(moved_to["token"]))
                async with self._link_lock:
                    if self.closed:
                        raise AvatarClientError("closed")
                    old_pc, self.pc, self.viewer_url = self.pc, None, None  # (its viewers went with the old session)
                    self._time_offset = (max(self._last_media_time, self._audio_until)
                                         + (time.monotonic() - self._media_at))
                    if old_pc is not None:
                        self._spawn(_close_pc(old_pc), "close-pc")
                    self._identify(client, info, server_time)  # (in its first client's sessions still: closed with it)
                    self._keep_token_for(client)
                    old_own = self._own_client
                    self._own_client = client if made or client is old_own else None
                    if old_own is not None and old_own is not client:
                        self._spawn(old_own.close(), "close-client")
                    await self._connect_moved()
            except BaseException:
                if made and client is not self._own_client:
                    await client.close()
                raise
        except (AvatarClientError, aiohttp.ClientError, OSError, asyncio.TimeoutError, KeyError) as e:
            if self.closed:
                return
            self._dispatch({"type": "error", "session_id": old_id, "code": "move_failed", "time": time.time(),
                            "message": f"session {old_id} moved to session {moved_to.get('session_id')}, which this "
                                       f"viewer could not watch: {e}"})
            self._dispatch(closed)
            return
        log.info("session %s: its viewer follows it to session %s", old_id, self.id)
        self._dispatch({"type": "moved", "session_id": self.id, "from_session_id": old_id,
                        "reason": closed.get("reason"), "time": time.time(),
                        "after_s": round(time.monotonic() - started, 3)})

    async def _moved_soon(self) -> bool:
        """A viewer's session gone (404): whether its event stream says, within EVENTS_MOVE_WAIT_S, that it moved
        (the peer connection may end before the `closed` event that says where to has come)."""
        until = time.monotonic() + EVENTS_MOVE_WAIT_S
        while self._follows and not self.closed and self.close_reason is None and time.monotonic() < until:
            if self._moving:
                return True
            await asyncio.sleep(0.05)
        return self._moving

    async def _read_track(self, track: MediaStreamTrack, pc: RTCPeerConnection) -> None:
        buffer = self._video if track.kind == "video" else self._audio
        first_pts: float | None = None
        offset = self._time_offset  # where this connection's media time 0 lies on the session's timeline
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                if self.pc is pc and not self._watching:  # a replaced connection's tracks end quietly
                    buffer.close()
                return
            if self.pc is not pc:  # replaced (a move, a reconnect): what it still brings would go back in time
                return
            t = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else 0.0
            if first_pts is None:
                first_pts = t
                if track.kind == "video" and self._audio_until < 0:  # the audio's wait starts with the first frame
                    self._audio_at = time.monotonic()
            t = t - first_pts + offset
            self._media_at = time.monotonic()
            if track.kind == "video":  # converted to RGB only when read: unread frames cost no conversion
                if self._align:
                    await self._wait_audio(t)
                buffer.put(TimedFrame(frame, t, time.monotonic()))
                self._last_media_time = max(self._last_media_time, t + 1 / 25)
            else:
                pcm = frame_pcm(frame)  # (n, channels): int16 as aiortc decodes it, or float32 in -1..1
                buffer.put(AudioChunk(pcm=pcm16(pcm), sample_rate=frame.sample_rate, time=t,
                                      received_at=time.monotonic()))
                self._audio_until = t + frame.samples / frame.sample_rate
                self._audio_at = time.monotonic()
                self._audio_moved.set()

    async def _wait_audio(self, until: float) -> None:
        """Until audio past media time `until` has arrived or the audio track has ended; but never while the audio
        has not moved for ALIGN_MAX_S: a stalled audio stream holds no frame back longer than that, however many
        frames queue behind the first (a cap per frame would add up, frame after frame)."""
        while self._audio_until <= until and not self._audio.closed:
            left = self._audio_at + ALIGN_MAX_S - time.monotonic()
            if left <= 0:
                return
            self._audio_moved.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(self._audio_moved.wait(), left)

    async def video_frames(self) -> AsyncIterator[np.ndarray]:
        """Received video frames as (H, W, 3) uint8 RGB, until the connection ends (one reader)."""
        async for frame in self.timed_video_frames():
            yield frame.rgb

    async def timed_video_frames(self) -> AsyncIterator[TimedFrame]:
        """Received video frames with their media time and arrival (`TimedFrame`), until the connection ends (one
        reader, of this or of `video_frames`)."""
        while True:
            try:
                yield await self._video.get()
            except StopAsyncIteration:
                return

    async def audio_frames(self) -> AsyncIterator[AudioChunk]:
        """Received audio packets (20 ms each), until the connection ends (one reader)."""
        while True:
            try:
                yield await self._audio.get()
            except StopAsyncIteration:
                return

    @property
    def frames_received(self) -> dict[str, int]:
        """Counts of received video frames / audio packets, and how many were dropped unread."""
        return {"video": self._video.received, "audio": self._audio.received,
                "video_dropped": self._video.dropped, "audio_dropped": self._audio.dropped}

    # -- websocket: audio and control in, events out

    async def _open_ws(self, replace: bool = False) -> aiohttp.ClientWebSocketResponse:
        """The session's websocket, opened if there is none (`replace`: a new one even so; the server closes the
        old one, which may be dead already)."""
        async with self._ws_lock:
            if self._ws is not None and not self._ws.closed and not replace:
                return self._ws
            if self.closed:
                raise AvatarClientError(f"session {self.id} is closed")
            http = self.client._require_http()
            try:
                ws = await http.ws_connect(self.ws_url, headers=self._headers(), heartbeat=20.0,
                                           max_msg_size=1024 * 1024)
            except aiohttp.WSServerHandshakeError as e:
                fake = AvatarClientError(f"websocket: HTTP {e.status}: {e.message}", e.status)
                if e.status == 401:
                    raise AuthenticationError(str(fake), e.status) from None
                if e.status == 404:
                    raise SessionNotFoundError(str(fake), e.status) from None
                raise fake from None
            old, self._ws, self._ws_close, self._format = self._ws, ws, None, (16000, 1, False)
            self._ws_sent = 0
            self._ws_lost_at = None
            self._ws_back.set()
            if old is not None and not old.closed:
                self._spawn(_close_quietly(old), "ws-close")
            if self._events.error is not None:  # the last websocket failed the event stream: a fresh one
                self._events = _Buffer(1000)
            self._spawn(self._read_ws(ws), "ws")
            return ws

    async def _read_ws(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        reason = ""
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                if msg.type == aiohttp.WSMsgType.CLOSE:
                    reason = msg.extra or ""
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    reason = str(msg.data)
                break
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                event = json.loads(msg.data)
            except ValueError:
                continue
            if isinstance(event, dict) and (self._ws is ws or self._ws is None):  # (not a moved session's old one)
                self._dispatch(event)
        current = self._ws is ws
        if not current:  # replaced by a newer one of ours (a reconnect): nothing of it matters any more
            return
        lost = ws.close_code in (None, 1006)  # no close from the server: it stopped, or the network went
        self._ws_close = (f"lost with no close from the server (code {ws.close_code or 1006}: the server stopped or "
                          f"the network went{f'; {reason}' if reason else ''})" if lost else
                          f"closed by the server (code {ws.close_code}{f': {reason}' if reason else ''})")
        self._ws = None
        for future in self._replies.values():
            if not future.done():
                future.set_exception(AvatarClientError(f"websocket {self._ws_close}"))
        self._replies.clear()
        if self._watching and lost and not self.closed:
            # the watchdog opens a new one (with a new peer connection if the media went too; if it gives up, it ends
            # the events); sends wait for it
            self._ws_lost_at, self._ws_back = time.monotonic(), asyncio.Event()
            self._dispatch({"type": "reconnecting", "session_id": self.id, "reason": f"websocket {self._ws_close}",
                            "time": time.time()})
            return
        if not self.closed:
            # Ended without a `closed` event (replaced by a newer websocket, a protocol error, the server
            # gone, the network down): no event will ever come, so end events() with why, not a hang.
            self._events.close(AvatarClientError(f"session {self.id}: websocket {self._ws_close}; no more events"))

    def _dispatch(self, event: dict) -> None:
        kind = event.get("type")
        future = self._replies.get(event.get("id")) if kind in ("pong", "say", "error") else None  # type: ignore
        if future is not None and not future.done():
            if kind == "error":
                future.set_exception(AvatarClientError(f"session {self.id}: {event.get('message')}"))
            else:
                future.set_result((time.monotonic(), event))
        if kind == "pong":
            return
        if kind == "ready":
            self._format = (event.get("sample_rate", 16000), event.get("channels", 1), False)
            if isinstance(event.get("max_queued_seconds"), (int, float)):
                self.max_queued_seconds = float(event["max_queued_seconds"])
            if isinstance(event.get("audio_messages"), int):  # those sent into a websocket that died never came
                self._audio_sent = event["audio_messages"] + self._ws_sent
                self._audio_done = min(self._audio_done, self._audio_sent)
                self._forget_shown()
                self._shown_moved.set()
        elif kind == "broadcast_stopped":  # ended (failed, or given up): not one a move starts again
            self._broadcasts.pop(event.get("broadcast_id"), None)
        elif kind == "audio_played":
            self._audio_done = max(self._audio_done, event.get("audio_messages", self._audio_sent))
            self._forget_shown()
            self._shown_moved.set()
        elif kind in ("caption", "speech_stopped"):
            self._said_shown(kind, event.get("text"))
            self._shown_moved.set()
        elif kind == "interrupted":  # (say() texts: dropped)
            self._said.clear()
            self._shown_moved.set()
        self._events.put(event)
        for cb in self._callbacks.get(kind, []) + self._callbacks.get("*", []):  # type: ignore[arg-type]
            try:
                result = cb(event)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            except Exception:
                log.exception("event callback for %r failed", kind)
        if (kind == "session_ending" and self.move_on_ending and event.get("reason") in MOVE_REASONS
                and not self._moving):
            self._moving = True  # (set now: a second `session_ending` before the task starts must not move it again)
            # (reset when it ends, cancelled by close() before it even started too)
            self._spawn(self._follow(event), "move").add_done_callback(lambda _: setattr(self, "_moving", False))
        if kind == "closed":  # the server closed the session: nothing to reconnect to, nothing more to send
            self.close_reason = str(event.get("reason") or "closed")
            self._events.close()

    async def _send(self, send: Callable[[aiohttp.ClientWebSocketResponse], Any], held: bool = False) -> None:
        """`send` on the session's websocket; `held`: the move's own, while the others wait for its switch."""
        while self._sends_held is not None and not held:
            await self._sends_held.wait()
        for attempt in range(2):
            ws = await self._usable_ws()
            try:
                await send(ws)
                return
            except (ConnectionError, RuntimeError) as e:
                if self.close_reason is not None:
                    raise SessionClosedError(self.id, self.close_reason) from None
                if attempt == 0 and self._watching and not self.closed:
                    # lost as it was sent (connect(reconnect=True)): sent again on the one that replaces it, once its
                    # reader has seen how it ended (lost, or closed by the server)
                    until = time.monotonic() + REOPEN_TRY_S
                    while self._ws is ws and time.monotonic() < until:
                        await asyncio.sleep(0.02)
                    continue
                raise AvatarClientError(f"session {self.id}: websocket send failed ({e}); "
                                        f"websocket {self._ws_close or 'closing'}") from None

    async def _usable_ws(self) -> aiohttp.ClientWebSocketResponse:
        """The websocket to send on: the open one; the one replacing a lost one (waited for); or a new one."""
        if self.close_reason is not None:  # whether or not its websocket's close has come in yet: one error, why
            raise SessionClosedError(self.id, self.close_reason)
        ws = self._ws
        if (ws is None or ws.closed) and self._ws_lost_at is not None and not self.closed:
            # lost, not closed: the watchdog is opening a new one (connect(reconnect=True)); what is sent waits for it
            with contextlib.suppress(asyncio.TimeoutError):
                await wait_for(self._ws_back.wait(), RECONNECT_TIMEOUT_S + 2 * REOPEN_TRY_S)
            if self.close_reason is not None:
                raise SessionClosedError(self.id, self.close_reason)
            ws = self._ws
        if ws is not None and not ws.closed:
            return ws
        if self.closed:
            raise AvatarClientError(f"session {self.id} is closed")
        if self._failed is not None:
            raise AvatarClientError(f"session {self.id}: {self._failed}")
        if self._ws_close is not None:
            raise AvatarClientError(f"session {self.id}: websocket {self._ws_close}")
        return await self._open_ws()

    async def _control(self, message: dict) -> None:
        await self._send(lambda ws: ws.send_str(json.dumps(message, ensure_ascii=False)))

    async def send_audio(self, pcm: bytes | bytearray | memoryview | np.ndarray, sample_rate: int = 16000,
                         channels: int | None = None, ahead: bool = False) -> None:
        """Stream speech: PCM16 LE bytes, or an int16/float ndarray shaped (n,) or (n, channels).

        Any rate 8-96 kHz and 1-2 channels; the format is announced to the server when it changes.
        Live audio: send it at about real time (the server queues at most ~30 s ahead and reports `audio_rejected`);
        audio that queues up behind earlier audio is late, and its pauses are shortened to catch up. `ahead=True`:
        the audio is made faster than real time (a TTS) and sent before it is due: it plays at its own pace, its
        pauses whole; what the session's queue has no room for waits on the server, in order, as much again (~60 s in
        all), and is played as room frees, so a busy server that plays it late loses none of it.
        """
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)) \
                or int(sample_rate) != sample_rate:
            raise ValueError(f"send_audio: sample_rate must be a whole number of Hz, got {sample_rate!r}")
        sample_rate = int(sample_rate)  # a numpy integer or 48000.0 too (announced as JSON)
        if isinstance(pcm, (bytes, bytearray, memoryview)):
            data, channels = bytes(pcm), channels or 1
        else:
            data, channels = _pcm16_bytes(np.asarray(pcm), channels)
        if channels not in (1, 2) or not 8000 <= sample_rate <= 96000:
            raise ValueError(f"send_audio: {channels} channels at {sample_rate} Hz; give 1 or 2 channels at "
                             "8000..96000 Hz")
        frame_bytes = 2 * channels
        if len(data) % frame_bytes:
            raise ValueError(f"PCM16 with {channels} channel(s) needs a multiple of {frame_bytes} bytes")
        form = (sample_rate, channels, ahead)
        step = (sample_rate // 2) * frame_bytes  # 0.5 s of whole samples per message (server limit: 1 s)
        for pos in range(0, len(data), step):
            await self._send(functools.partial(self._send_chunk, chunk=data[pos:pos + step], form=form))

    async def _send_chunk(self, ws: aiohttp.ClientWebSocketResponse, chunk: bytes, form: tuple[int, int, bool]) -> None:
        """One audio message, its format (rate, channels, ahead) announced first where it changed."""
        if self._format != form:  # announced on each websocket (a new one, after a reconnect, starts at 16 kHz)
            await ws.send_str(json.dumps({"type": "audio_format", "sample_rate": form[0], "channels": form[1],
                                          "ahead": form[2]}))
            self._format = form
        await ws.send_bytes(chunk)
        self._audio_sent += 1
        self._ws_sent += ws is self._ws
        if self._how is not None:  # (a session a move can make again)
            self._unshown.append([chunk, form, False])
            self._unshown_s += len(chunk) / (2 * form[0] * form[1])
            self._forget_shown()

    async def end_speech(self) -> None:
        """The utterance is over: the server renders its last frames now instead of waiting for more audio."""
        await self._send(self._send_end)

    async def _send_end(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        await ws.send_str(json.dumps({"type": "end_of_speech"}))
        if self._unshown:
            self._unshown[-1][2] = True

    def _forget_shown(self) -> None:
        """Keep, of the audio sent, only what is not yet shown (or dropped); at most what the server queues (twice
        max_queued_seconds: `ahead` audio waits as much again), whatever its events said."""
        while self._unshown and (len(self._unshown) > self._audio_sent - self._audio_done
                                 or self._unshown_s > 2 * self.max_queued_seconds + 1.0):
            chunk, (rate, channels, _), _ = self._unshown.popleft()
            self._unshown_s -= len(chunk) / (2 * rate * channels)

    async def interrupt(self) -> None:
        """Drop queued speech and unshown frames (barge-in); the avatar goes on from the frame on screen."""
        async def send(ws: aiohttp.ClientWebSocketResponse) -> None:
            sent = self._audio_sent  # the server drops these: they come before the interrupt
            await ws.send_str(json.dumps({"type": "interrupt"}))
            self._audio_done = max(self._audio_done, sent)
            self._forget_shown()
            self._said.clear()  # (the say() texts too)
            self._shown_moved.set()

        await self._send(send)

    @property
    def audio_shown(self) -> bool:
        """Every audio message `send_audio` sent so far has been shown and heard (an `audio_played` event covered it),
        or dropped by `interrupt()`: after `end_speech()`, the utterance is over on the avatar's screen (as
        `Session.audio_shown` in-process). True before anything is sent; `say()` audio is the server's, not counted."""
        return self._audio_done >= self._audio_sent

    async def wait_audio_shown(self, timeout: float | None = None, said: bool = False) -> bool:
        """Wait until `audio_shown` (True), `timeout` seconds pass, or no event can come any more: the session closed or
        its websocket ended (False). Something must be watching the avatar (this client's `connect()`, a viewer, an
        overlay page) for its clock, and so its playback, to run. `said`: the texts this client's say() gave too
        (its sentences' `caption` events, and the speech stopping after the last, tell)."""
        return await wait_state(lambda: self.audio_shown and not (said and self._said),
                                lambda: self.closed or self.close_reason is not None or self._events.closed,
                                self._shown_moved, timeout)

    async def stop_recording(self) -> None:
        """End the recording of a session started with `record=True` now (it is saved; a `recording_stopped` event
        follows, or an `error` saying why not); `AvatarClient.download_recording` then fetches it."""
        await self._control({"type": "stop_recording"})

    async def broadcast(self, url: str, bitrate_kbps: int | None = None, reconnect_s: int | None = None,
                        captions: bool = True) -> dict:
        """Stream this session live to a streaming server: an RTMP ingest URL with its stream key (YouTube Live,
        Twitch, OBS), `srt://`, `udp://` or `tcp://`, under a prefix the server allows (`letstalk serve --broadcast-to
        PREFIX`). Returns its state (`id`, `url` with the key hidden). Each call adds a destination (YouTube and
        Twitch at once, up to 4), each with its own connection. While one lasts the session needs no viewer. A dropped
        connection is made again for up to `reconnect_s` (the server's default: 60; 0: never), with
        `broadcast_reconnecting` / `broadcast_resumed` events; a `broadcast_stopped` event says when it ended, and why
        if it failed (each event's `broadcast_id` says which). What is said goes inside the video as CEA-608 captions
        unless `captions` is False. RequestError: 403 (the server does not stream there), 422
        (not a streaming URL), 409 (already streaming to that URL, or to 4); AvatarClientError 502: the streaming
        server could not be reached."""
        body = {"url": url, **({"bitrate_kbps": bitrate_kbps} if bitrate_kbps else {}),
                **({"reconnect_s": reconnect_s} if reconnect_s is not None else {}),
                **({} if captions else {"captions": False})}
        return await self._start_broadcast(body)

    async def _start_broadcast(self, body: dict) -> dict:
        """POST the live stream `body` on this session; kept (by its id) for a move to start it again."""
        http = self.client._require_http()
        async with http.post(self.client._url(f"/v1/sessions/{self.id}/broadcast"), json=body,
                             headers=self._headers()) as resp:
            await _raise_for_status(resp)
            state = (await resp.json())["broadcast"]
        self._broadcasts[state["id"]] = body
        return state

    async def stop_broadcast(self, broadcast_id: str | None = None) -> None:
        """End the live stream `broadcast_id` (the `id` broadcast() returned), or every one (RequestError 404 when
        none is running, saying why the last one ended if it failed)."""
        http = self.client._require_http()
        path = f"/v1/sessions/{self.id}/broadcast" + (f"/{urllib.parse.quote(broadcast_id)}" if broadcast_id else "")
        async with http.delete(self.client._url(path), headers=self._headers()) as resp:
            await _raise_for_status(resp)
        if broadcast_id is None:
            self._broadcasts.clear()
        else:
            self._broadcasts.pop(broadcast_id, None)

    async def _request(self, message: dict, timeout: float) -> tuple[float, dict]:
        """Send a control message with a fresh id; (monotonic time, answer) once the server answers it."""
        self._request_id += 1
        rid = self._request_id
        future = asyncio.get_running_loop().create_future()
        self._replies[rid] = future
        try:
            await self._control({**message, "id": rid})
            return await wait_for(future, timeout)
        finally:
            self._replies.pop(rid, None)

    async def ping(self, timeout: float = 5.0) -> float:
        """Keep-alive; returns the websocket round trip in seconds."""
        start = time.monotonic()
        answered, _ = await self._request({"type": "ping"}, timeout)
        return answered - start

    async def say(self, text: str, voice: str | None = None, rate: int | None = None, pitch: int | None = None,
                  timeout: float = 10.0) -> dict:
        """Have the avatar speak `text` with the server's text to speech (espeak-ng; `voice`: a language code from
        `client.voices()`, e.g. "en-us", "fr", "en-us+f3"; `rate` 80..450 words a minute; `pitch` 0..99).

        Spoken after any text said before, a sentence at a time; `interrupt()` drops what is not yet spoken. Returns
        the server's acceptance ({"sentences", "voice"}) once it has checked the request; raises AvatarClientError
        saying what is wrong (unknown voice, empty or over-long text, no espeak-ng on the server). A synthesis that
        fails later comes as an `error` event with code "tts". `wait_audio_shown(said=True)` waits until it is shown."""
        options = {k: v for k, v in {"voice": voice, "rate": rate, "pitch": pitch}.items() if v is not None}
        _, answer = await self._request({"type": "say", "text": text, **options}, timeout)
        pieces = sentences(text)
        if answer.get("sentences") == len(pieces):  # (cut as the server cut it)
            self._said.append([pieces, options, -1])
        return answer

    def _said_shown(self, kind: str, text: str | None = None) -> None:
        """Follow the say() texts being shown: a `caption` event (`text`) starts the next sentence of the first one
        (or the first sentence of the next, the first then over); `speech_stopped` on a text's last sentence ends it."""
        if not self._said:
            return
        pieces, _, at = self._said[0]
        if kind == "speech_stopped":
            if at == len(pieces) - 1:
                self._said.popleft()
        elif at + 1 < len(pieces) and pieces[at + 1] == text:
            self._said[0][2] = at + 1
        elif len(self._said) > 1 and at == len(pieces) - 1 and self._said[1][0][0] == text:
            self._said.popleft()
            self._said[0][2] = 0

    async def motion(self) -> bytes:
        """The latents of the frames this session showed last (GET .../motion; letstalk_rt.stream.motion): what
        another session of the same portrait, on a server of the same model, goes on from (`continue_from`) rather
        than start again from the portrait: a move's new session does. AvatarClientError (409) before its first
        frame is shown."""
        return await self._get_motion(self.client, self.id, self.token)

    async def continue_from(self, motion: bytes) -> None:
        """Go on from another session's `motion()`: the next window is generated from its frames (PUT .../motion).
        Between utterances (409 while speech sent here is not all shown; 409 too for the motion of another portrait
        or model, 422 for bytes that are not a motion)."""
        url = self.client._url(f"/v1/sessions/{urllib.parse.quote(self.id, safe='')}/motion")
        async with self.client._require_http().put(
                url, data=motion, headers={**self._headers(), "Content-Type": "application/octet-stream"},
                timeout=aiohttp.ClientTimeout(total=MOTION_TIMEOUT_S)) as resp:
            await _raise_for_status(resp)

    async def _get_motion(self, client: "AvatarClient", session_id: str, token: str) -> bytes:
        url = client._url(f"/v1/sessions/{urllib.parse.quote(session_id, safe='')}/motion")
        async with client._require_http().get(url, headers={"Authorization": f"Bearer {token}"},
                                              timeout=aiohttp.ClientTimeout(total=MOTION_TIMEOUT_S)) as resp:
            await _raise_for_status(resp)
            return await resp.read()

    async def _carry_motion(self, client: "AvatarClient", session_id: str, token: str) -> bool:
        """A move: the new session goes on from the old one's motion (the frames it showed last), so the face does not
        jump back to the portrait's on screen; False (logged) where that failed and the move goes on without."""
        try:
            await self.continue_from(await self._get_motion(client, session_id, token))
            return True
        except (AvatarClientError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            log.warning("session %s: going on without session %s's motion (%s): the face starts again from the "
                        "portrait", self.id, session_id, str(e) or type(e).__name__)
            return False

    def on(self, event_type: str, callback: Callable[[dict], Any] | None = None):
        """Call `callback(event)` for each event of `event_type` ("*" for all); usable as a decorator.

        Types: ready, speech_started, speech_stopped, audio_played (all audio sent so far has been shown), caption,
        playback_position, window_timings, frames_dropped,
        interrupted, engine_adjusted, say, recording_stopped, broadcast_reconnecting, broadcast_resumed,
        broadcast_skipped, broadcast_stopped, session_ending (the server will close the session in
        `seconds_left`: `reason` time_limit or server_stopping; device_hung, 0: no frame will come), error, closed;
        and this SDK's own reconnecting / reconnected, moved (`move()`: `session_id` the new session's,
        `from_session_id`, `motion` whether it went on from the old one's frames) and errors with code
        reconnect_failed, move_failed or broadcast_not_moved. Coroutine callbacks run as tasks. Events flow once the
        websocket is open (`connect()` opens it; so does the first `send_audio`).
        """
        def register(cb: Callable[[dict], Any]) -> Callable[[dict], Any]:
            self._callbacks[event_type].append(cb)
            return cb

        return register(callback) if callback is not None else register

    async def events(self) -> AsyncIterator[dict]:
        """Events as dicts until the session closes (the last one has type "closed"); a viewer's (connect(viewer=True))
        from the session's event stream, read-only.

        Raises AvatarClientError, with the close code and reason, when the server ends the websocket
        without closing the session (a newer websocket replaced it, a protocol error, the server gone).
        """
        if (self._ws is None and not self.closed and self._ws_close is None  # like sends: no silent reconnect
                and not (self._link.get("viewer") and not self._link.get("websocket"))):  # (a viewer's: its stream)
            await self._open_ws()
        while True:
            try:
                yield await self._events.get()
            except StopAsyncIteration:
                return

    def overlay_url(self, chroma: str | None = None, relay: bool | None = None, captions: bool = False,
                    transparent: str | None = None, viewer: bool = False) -> str:
        """A page showing only this avatar (OBS browser source); it takes the WebRTC side, this object keeps
        the websocket (audio, control, events). Call it instead of `connect()`, not after, or with `viewer` True: the
        page then watches as one more viewer (the server's `--max-viewers`), beside this object's own `connect()`
        and any other overlay. `relay`: the page connects
        only through the server's TURN server (default: as this client does, `relay_only`). `captions`: the page shows
        what the avatar says (`say` text, audio sent with a caption) as each sentence starts. `transparent` "RRGGBB":
        the page makes that colour of the video transparent (a portrait put on it with `start_session(background=)`),
        so a compositor shows the avatar cut out with no chroma-key filter of its own."""
        relay = self.client.relay_only if relay is None else relay
        url = URL(self.client._url("/overlay")).with_query({"session": self.id, "token": self.token,
                                                             **({"chroma": chroma} if chroma else {}),
                                                             **({"relay": "1"} if relay else {}),
                                                             **({"captions": "1"} if captions else {}),
                                                             **({"transparent": transparent} if transparent else {}),
                                                             **({"viewer": "1"} if viewer else {})})
        return str(url)

    def route(self) -> dict | None:
        """How this session's WebRTC connection went, once connected: {"local": ..., "remote": ...} candidate types,
        "host", "srflx" (through a NAT, found by STUN), "prflx" or "relay" (through the TURN server); else None."""
        return None if self.pc is None else selected_route(self.pc)

    async def stats(self) -> dict:
        """The server's view: peer connection state, websocket, frames generated, latency percentiles."""
        http = self.client._require_http()
        async with http.get(self.client._url(f"/v1/sessions/{self.id}"), headers=self._headers()) as resp:
            await _raise_for_status(resp)
            return await resp.json()

    # -- lifetime

    async def close(self) -> None:
        """Hang up and free the session on the server (idempotent). A session this client only attached to
        (`AvatarClient.session`) is left open: only this client's viewer, if it connected one, is freed. A move under
        way stops: the session it left and the one it was making (waited for, up to ORPHAN_WAIT_S) are freed too."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._ws is not None:
                try:
                    await wait_for(self._ws.close(), 2.0)
                except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                    pass
            if self.pc is not None:
                pc, self.pc = self.pc, None
                await _close_pc(pc)
            if self.owner:  # unreachable, slow or failing: the server frees the session itself once it is idle
                await self._delete(self.client, self.id, self.token)
                if self._leaving is not None:  # closed while it moved: the session it left, too
                    await self._delete(*self._leaving)
            elif self.viewer_url is not None:
                await self._delete(self.client, self.id, self.token, self.viewer_url)
            if self._own_client is not None:
                await self._own_client.close()
        finally:  # whatever the server said: nothing of this session may outlive close() here
            for task in list(self._tasks):
                task.cancel()
            until = time.monotonic() + ORPHAN_WAIT_S  # a move's new session, made or being made: deleted, not left
            while (self._orphans or self._moving) and until > time.monotonic():  # (move() sees closed, and drops it)
                if self._orphans:
                    await asyncio.wait(set(self._orphans), timeout=until - time.monotonic())
                await asyncio.sleep(0.01)
            self._video.close()
            self._audio.close()
            self._events.close()
            self._ws_back.set()  # a send waiting for a lost websocket's successor: none will come
            self.client._sessions.discard(self)

    async def __aenter__(self) -> AvatarSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _close_quietly(ws: aiohttp.ClientWebSocketResponse, timeout: float = 2.0) -> None:
    with contextlib.suppress(Exception):  # over a network that went, the close handshake never completes
        await wait_for(ws.close(), timeout)


async def _close_pc(pc: RTCPeerConnection, timeout: float = 5.0) -> None:
    try:
        await wait_for(pc.close(), timeout)  # RTCPeerConnection.close() can hang
    except asyncio.TimeoutError:
        log.warning("RTCPeerConnection.close() did not finish within %g s; left to the garbage collector", timeout)
    except Exception:
        log.warning("RTCPeerConnection.close() failed", exc_info=True)


# --------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------


def _client_ssl(value: ssl_module.SSLContext | str | Path | bool) -> ssl_module.SSLContext | bool:
    """`AvatarClient(ssl=...)` as aiohttp takes it: a CA certificate's path made a context that trusts it."""
    if isinstance(value, (bool, ssl_module.SSLContext)):
        return value
    if not Path(value).is_file():
        raise InputError(f"ssl={str(value)!r}: no such file; give the CA certificate (PEM) that signed the server's "
                         "certificate (a self-signed server: its own --tls-cert), or True for this machine's")
    try:
        return ssl_module.create_default_context(cafile=str(value))
    except (ssl_module.SSLError, ValueError) as e:
        raise InputError(f"ssl={str(value)!r}: not a PEM certificate ({e})") from None


class AvatarClient:
    """Connection to one letstalk-rt server; `async with` closes every session it started."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 ice_servers: list[str | dict] | None = None, relay_only: bool = False,
                 ssl: ssl_module.SSLContext | str | Path | bool = True) -> None:
        """`ice_servers`: the STUN/TURN servers of every session's peer connection, as URLs or W3C RTCIceServer dicts
        (`{"urls": ..., "username": ..., "credential": ...}`); by default the ones the server hands each session
        (`--ice-server`, with TURN credentials made for it). `relay_only`: connect only through the TURN server.
        `ssl`, for an https:// server: True (default) trusts the certificates this machine trusts (and SSL_CERT_FILE);
        a CA certificate's path (PEM) trusts that one instead (a server's own self-signed --tls-cert); an
        ssl.SSLContext as it is; False checks none (tests only: anyone between may read and change everything).
        InputError (a LetsTalkError) if `base_url` is not an http(s) URL or `ssl` a file that is not there."""
        self.base_url = URL(base_url.rstrip("/") + "/")
        if self.base_url.scheme not in ("http", "https") or not self.base_url.host:
            raise InputError(f"server URL {base_url!r} is not an http(s) URL; give one such as http://127.0.0.1:8080 "
                             f"(`letstalk serve` prints its own)")
        self.api_key = api_key
        self.timeout = timeout
        self.ice_servers = None if ice_servers is None else parse_ice_servers(ice_servers)  # a bad URL fails here
        self.relay_only = relay_only
        self._ssl = _client_ssl(ssl)
        self._http: aiohttp.ClientSession | None = None
        self._sessions: set[AvatarSession] = set()

    def _url(self, url: str, websocket: bool = False) -> str:
        """A server path (or the server's absolute URL) resolved against base_url (keeps a proxy prefix: the server's
        own URLs carry it already behind a proxy that says it, X-Forwarded-Prefix)."""
        path = URL(url).path
        prefix = self.base_url.path.rstrip("/")
        out = self.base_url.with_path(path if prefix and (path + "/").startswith(prefix + "/") else prefix + path)
        if websocket:
            out = out.with_scheme("wss" if out.scheme == "https" else "ws")
        return str(out)

    def _require_http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            raise AvatarClientError("use `async with AvatarClient(...) as client:` (or await client.open())")
        return self._http

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def open(self) -> AvatarClient:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                               headers={"User-Agent": USER_AGENT},
                                               connector=aiohttp.TCPConnector(ssl=self._ssl))
        return self

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in list(self._sessions)), return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> AvatarClient:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def health(self) -> dict:
        """{"status": "ok", "version", "sessions", "admitting", "max_sessions", "renders_queued", "engines"}
        ("version": the server's letstalk-rt; "engines": each device's sessions and cap); "status": "draining" while
        the server shuts down gently (its 503: open sessions go on, new ones are refused)."""
        async with self._require_http().get(self._url("/health")) as resp:
            if resp.status == 503 and resp.content_type == "application/json":
                body = await resp.json()
                if isinstance(body, dict) and body.get("status") == "draining":
                    return body
            await _raise_for_status(resp)
            return await resp.json()

    async def metrics(self) -> dict[str, float]:
        """The server's /metrics (Prometheus text) as {sample: value}, a sample named with its labels as the server
        writes them: {"letstalk_sessions_active": 1.0, 'letstalk_frames_dropped_total{reason="stale"}': 0.0, ...}."""
        async with self._require_http().get(self._url("/metrics")) as resp:
            await _raise_for_status(resp)
            text = await resp.text()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    async def avatars(self) -> list[dict]:
        """The server's avatars: [{"id": "default", "name": "Bundled portrait", "uploaded": False}, {"id": ...,
        "name": ..., "uploaded": True, "created_at": unix time}, ...]."""
        async with self._require_http().get(self._url("/v1/avatars"), headers=self._auth()) as resp:
            await _raise_for_status(resp)
            return (await resp.json())["avatars"]

    async def create_avatar(self, portrait: str | Path | bytes | np.ndarray | Any, *, name: str | None = None,
                            avatar_id: str | None = None, background: str | None = None) -> dict:
        """Upload a portrait once (a path, image bytes, a uint8 RGB array or a PIL image): the server finds the face
        and prepares it now, and sessions then start on it by id (`start_session(avatar_id=...)`) with no upload and
        no preparation. `avatar_id`: 1-64 letters, digits, '-' or '_' (default: one the server makes); `background`
        "RRGGBB": as in `start_session`.
        Returns {"id", "name", "uploaded": True, "created_at"}; kept across restarts where the server has an
        `--avatar-dir`."""
        form = await _form((("id", avatar_id), ("name", name), ("background", background)), portrait=portrait)
        async with self._require_http().post(self._url("/v1/avatars"), data=form, headers=self._auth()) as resp:
            await _raise_for_status(resp)
            return await resp.json()

    async def delete_avatar(self, avatar_id: str) -> None:
        """Delete an uploaded avatar (sessions already open on it go on)."""
        url = self._url(f"/v1/avatars/{urllib.parse.quote(avatar_id, safe='')}")
        async with self._require_http().delete(url, headers=self._auth()) as resp:
            await _raise_for_status(resp)

    async def sessions(self) -> list[dict]:
        """The sessions open on the server (needs the API key, where it has one): [{"session_id", "created_at",
        "avatar_id" (None: a portrait uploaded with the request), "render", "peer_connection", "websocket", "viewers",
        "recording", "idle_seconds", "device", "ends_at" (with a time limit)}, ...]: what a backend that lost track of
        some (it restarted) finds, and ends with end_session()."""
        async with self._require_http().get(self._url("/v1/sessions"), headers=self._auth()) as resp:
            await _raise_for_status(resp)
            return (await resp.json())["sessions"]

    async def renders(self, state: str | None = None) -> list[dict]:
        """The renders the server knows (needs the API key, where it has one): queued, being made and the last 1000
        finished, the first asked for first, each as `render()`'s states ("render_id", "state", "queue_position",
        "rendered_seconds", "speed", "eta_seconds", ...); `state` ("queued", "rendering", "done", "failed",
        "cancelled") keeps those in it."""
        params = {"state": state} if state is not None else {}
        async with self._require_http().get(self._url("/v1/renders"), params=params, headers=self._auth()) as resp:
            await _raise_for_status(resp)
            return (await resp.json())["renders"]

    async def end_session(self, session_id: str) -> None:
        """End a session on the server by its id, whoever started it (needs the API key, where it has one), as its
        owner's close() would; SessionNotFoundError when it is not open (any more)."""
        url = self._url(f"/v1/sessions/{urllib.parse.quote(session_id, safe='')}")
        async with self._require_http().delete(url, headers=self._auth()) as resp:
            await _raise_for_status(resp)

    async def recordings(self) -> list[dict]:
        """The server's saved session recordings: [{"id": session id, "bytes", "saved_at": unix time, "captions": whether
        its captions were saved beside it}, ...]."""
        async with self._require_http().get(self._url("/v1/recordings"), headers=self._auth()) as resp:
            await _raise_for_status(resp)
            return (await resp.json())["recordings"]

    async def download_recording(self, session_id: str, path: str | Path) -> Path:
        """Save a session's recording (once it ended, or stop_recording() was sent) to `path`: written under a
        temporary name and renamed, so an interrupted download leaves nothing at `path`. 409 (RequestError) while it
        is still recording."""
        return await self._download(f"/v1/recordings/{urllib.parse.quote(session_id, safe='')}", Path(path))

    async def download_captions(self, session_id: str, path: str | Path) -> Path:
        """Save the captions a session's recording showed (text said with `say`) to `path`, as WebVTT subtitles timed
        to the MP4 (a player shows them with it). RecordingNotFoundError when it showed none."""
        return await self._download(f"/v1/recordings/{urllib.parse.quote(session_id, safe='')}/captions", Path(path))

    async def _download(self, url_path: str, path: Path) -> Path:
        """GET `url_path` into `path`, written whole or not at all; OutputError (a LetsTalkError) before anything is
        fetched where `path` cannot be written, or with the reason where writing it failed."""
        check_output_path(path)
        url = self._url(url_path)
        tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            async with self._require_http().get(url, headers=self._auth()) as resp:
                await _raise_for_status(resp)
                with open(tmp, "wb") as f:
                    async for chunk in resp.content.iter_chunked(256 * 1024):
                        f.write(chunk)
            os.replace(tmp, path)
        except OSError as e:
            raise OutputError(f"could not write '{path}': {e.strerror or e}; free some space or choose another path")
        finally:
            tmp.unlink(missing_ok=True)
        return path

    async def delete_recording(self, session_id: str) -> None:
        url = self._url(f"/v1/recordings/{urllib.parse.quote(session_id, safe='')}")
        async with self._require_http().delete(url, headers=self._auth()) as resp:
            await _raise_for_status(resp)

    async def render(self, out: str | Path, *, audio: str | Path | bytes | None = None, text: str | None = None,
                     portrait: str | Path | bytes | np.ndarray | Any | None = None, avatar_id: str | None = None,
                     voice: str | None = None, rate: int | None = None, pitch: int | None = None,
                     seed: int | None = None, full_frame: int | None = None, framing: float | None = None,
                     background: str | None = None, queue: bool = True, poll_s: float = 0.5,
                     on_progress: Callable[[dict], Any] | None = None, retries: int = 2) -> dict:
        """Have the server make a video of the avatar saying `audio` (a file's path or bytes, any format PyAV reads) or
        `text` (spoken with `voice`, `rate`, `pitch`), and save it to `out` (MP4, written under a temporary name and
        renamed). The avatar: `portrait` (uploaded for this render) or `avatar_id` (default "default"); `seed`,
        `full_frame`, `framing` and `background` as in `start_session`. The server (started with `--recordings-dir`)
        makes it in one of its session slots, as fast as its live sessions leave the device room (faster than real
        time where it has room); where every slot is in use, `queue` (default) has it wait for one on the server, in
        turn ("state": "queued", "queue_position"), instead of ServerBusyError at once. This waits for it, asking every
        `poll_s` (`on_progress(state)` with each answer while it is queued or made: "rendered_seconds" of
        "speech_seconds", "speed" in seconds of video a second, "eta_seconds", "live_sessions" sharing its device),
        and returns the render's final state ({"render_id", "state": "done",
        "speech_seconds", "rendered_seconds", "seconds_taken", "speed", "video_url", "captions_url"}: a text's captions,
        `download_captions(render_id, ...)`). Cancelled on the server if this is
        cancelled. A render that fails where asking again may do (`retryable`: the server stopped, a device failed)
        or that the server lost (it restarted: 404, or no answer for RENDER_LOST_S) is asked for again, up to
        `retries` times, through the same URL (a balancer sends it to a server that is up), from the start: the files
        are read once. RenderFailedError when it ends without a video; RequestError (422) for what the server refuses
        at once, ServerBusyError (503) when it is full (and its render queue too, or `queue` is false)."""
        if (audio is None) == (text is None):
            raise ValueError("render(): give either audio or text")
        check_video_path(Path(out), "render(out=...)")  # before anything goes up
        if portrait is not None and avatar_id is not None:
            raise ValueError("give either portrait or avatar_id, not both")
        options = (("avatar_id", avatar_id), ("text", text), ("voice", voice), ("rate", rate), ("pitch", pitch),
                   ("seed", seed), ("full_frame", full_frame), ("framing", framing), ("background", background))
        http = self._require_http()
        files = {name: None if file is None else await asyncio.to_thread(_upload, name, file)  # (read once)
                 for name, file in (("portrait", portrait), ("audio", audio))}
        for attempt in range(max(0, retries) + 1):
            # with the queue, then, from a server older than the render queue (422 "unknown field 'queue'"), without it
            for asked in ((*options, ("queue", "true")), options) if queue else (options,):
                async with http.post(self._url("/v1/renders"), data=await _form(asked, **files),
                                     headers=self._auth()) as resp:
                    if asked is not options and resp.status == 422 and "unknown field 'queue'" in await resp.text():
                        continue
                    await _raise_for_status(resp)
                    state = await resp.json()
                    break
            rid = state["render_id"]
            state = await self._follow_render(state, poll_s, on_progress)
            if state["state"] == "done":
                break
            why = f"render {rid}: {state['state']}: {state.get('error') or 'no video'}"
            if not (state.get("retryable") or state["state"] == "lost") or attempt == max(0, retries):
                raise RenderFailedError(why, state)
            log.warning("%s; asking for it again (%d of %d)", why, attempt + 1, retries)
        try:
            await self._download(f"/v1/recordings/{urllib.parse.quote(rid, safe='')}", Path(out))
        except OutputError as e:  # made, and kept on the server: say how to fetch it
            raise OutputError(f"render {rid} is done, but saving it failed: {e} (download_recording({rid!r}, path) "
                              "fetches it again)") from None
        return state

    async def _follow_render(self, state: dict, poll_s: float, on_progress: Callable[[dict], Any] | None) -> dict:
        """Poll a render until it ends: its last state, or {"state": "lost", ...} when the server no longer knows it
        (404: it restarted) or has not answered for RENDER_LOST_S (stopped, or unreachable). Cancelled: it is
        cancelled on the server too."""
        http = self._require_http()
        url = self._url(f"/v1/renders/{urllib.parse.quote(state['render_id'], safe='')}")
        answered = time.monotonic()
        try:
            while state["state"] in ("queued", "rendering"):
                if on_progress is not None:
                    on_progress(state)
                await asyncio.sleep(poll_s)
                try:
                    async with http.get(url, headers=self._auth()) as resp:
                        await _raise_for_status(resp)
                        state, answered = await resp.json(), time.monotonic()
                except SessionNotFoundError as e:  # (`render_not_found`)
                    return {**state, "state": "lost", "error": f"the server no longer knows it ({e})"}
                except (aiohttp.ClientError, asyncio.TimeoutError, ServerBusyError) as e:
                    if time.monotonic() - answered > RENDER_LOST_S:
                        return {**state, "state": "lost",
                                "error": f"the server has not answered for {RENDER_LOST_S:g} s ({e})"}
                except AvatarClientError as e:
                    if (e.status or 0) < 500 or time.monotonic() - answered > RENDER_LOST_S:  # (a balancer's 502)
                        raise
        except asyncio.CancelledError:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.delete(url, headers=self._auth(), timeout=aiohttp.ClientTimeout(total=5)):
                    pass
            raise
        return state

    async def voices(self) -> list[dict]:
        """The voices `AvatarSession.say` speaks with: [{"id": "en-us", "name": "English_(America)"}, ...]."""
        async with self._require_http().get(self._url("/v1/voices"), headers=self._auth()) as resp:
            await _raise_for_status(resp)
            return (await resp.json())["voices"]

    async def session(self, session_id: str, token: str | None = None) -> AvatarSession:
        """A session another client created, to watch (`connect(viewer=True)`) or drive: its id and token (or this
        client's API key). `close()` on it leaves the session open. SessionNotFoundError when it is gone."""
        token = token or self.api_key
        if not token:
            raise ValueError("session(): give the session's token (or make the client with the API key)")
        info, server_time = await self._attached(session_id, token)
        session = AvatarSession(self, info, owner=False, server_time=server_time)
        self._sessions.add(session)
        return session

    async def _attached(self, session_id: str, token: str) -> tuple[dict, float]:
        """What an AvatarSession needs of a session this client did not make (session(), a viewer following a move):
        its URLs, token expiry and ICE servers; and the server's clock."""
        url = self._url(f"/v1/sessions/{urllib.parse.quote(session_id, safe='')}")
        async with self._require_http().get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            await _raise_for_status(resp)
            state = await resp.json()
            server_time = _server_time(resp)
        return {"session_id": session_id, "token": token, "expires_at": _token_expiry(token) or state["expires_at"],
                "offer_url": f"/v1/sessions/{session_id}/offer", "ws_url": f"/v1/sessions/{session_id}/ws",
                "ice_servers": state["ice_servers"]}, server_time

    async def start_session(self, portrait: str | Path | bytes | np.ndarray | Any | None = None, *,
                            avatar_id: str | None = None, seed: int | None = None, steps: int | None = None,
                            full_frame: int | None = None, framing: float | None = None,
                            voice: str | None = None, background: str | None = None,
                            record: bool | None = None) -> AvatarSession:
        """Create a session from a portrait (a path, image bytes, a uint8 RGB array or a PIL image) or an avatar the
        server holds (default "default"; `avatars()`, `create_avatar()`): a portrait is uploaded and prepared for this
        session alone.

        `full_frame` N: the video is the whole portrait photo, its longest side at most N px, with the animated face
        pasted back in (up to the server's `--max-full-frame`); by default the face crop at the model's size.
        `framing` K: a face small in a large photo is shown with at most K sides of its square on the frames' shorter
        side (head and shoulders; the server's default 3); 0: the whole photo however small the face.
        `voice`: the voice `say` speaks with in this session unless a `say` names another (`voices()`).
        `background` "RRGGBB": the colour a portrait's transparent parts go on (white by default): a key colour, which
        `overlay_url(transparent=...)` turns back into transparency. `record`: the server (started with
        `--recordings-dir`) records what the session shows, saved when it ends (`download_recording(session.id)`)."""
        self._require_http()
        options = (("seed", seed), ("steps", steps), ("full_frame", full_frame), ("framing", framing), ("voice", voice),
                   ("background", background), ("record", None if record is None else str(bool(record)).lower()))
        if portrait is not None and avatar_id is not None:
            raise ValueError("give either portrait or avatar_id, not both")
        how: dict[str, Any] = {"options": {k: v for k, v in options if v is not None}}
        if portrait is not None:  # read once: a move uploads it again
            how["portrait"] = await asyncio.to_thread(_upload, "portrait", portrait)
        else:
            how["avatar_id"] = avatar_id or "default"
        info, server_time = await self._create(how)
        session = AvatarSession(self, info, server_time=server_time, how=how)
        self._sessions.add(session)
        return session

    async def _create(self, how: dict) -> tuple[dict, float]:
        """POST /v1/sessions as start_session asked (`how`: its portrait, read, or avatar id, and options): the
        server's answer and its clock (`_server_time`)."""
        http = self._require_http()
        if "portrait" in how:
            form = await _form(how["options"].items(), portrait=how["portrait"])
            request = http.post(self._url("/v1/sessions"), data=form, headers=self._auth())
        else:
            request = http.post(self._url("/v1/sessions"), json={"avatar_id": how["avatar_id"], **how["options"]},
                                headers=self._auth())
        async with request as resp:
            await _raise_for_status(resp)
            return await resp.json(), _server_time(resp)
