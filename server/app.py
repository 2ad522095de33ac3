"""The HTTP / WebRTC / websocket API of letstalk-rt (aiohttp + aiortc). The API: server/openapi.yaml, docs/server.md.

    letstalk serve --model DIR --max-sessions 4 --api-key SECRET        # or: python -m letstalk_rt.server ...

    GET  /health                      readiness + occupancy          GET /metrics   Prometheus text
    GET  /health/live                 liveness: 503 when an engine is hung (--hung-seconds)
    GET  /v1/avatars                  portraits prepared once        GET /v1/voices  text-to-speech voices
    POST /v1/avatars                  upload a portrait once, open sessions on it by id   DELETE /v1/avatars/{id}
    POST /v1/sessions                 portrait upload or avatar id -> session id + token   (503 when full)
    POST /v1/sessions/{id}/offer      WHIP-style: SDP offer in, SDP answer out
    POST /v1/sessions/{id}/viewers    WHEP-style: one more watch-only peer (an overlay)   DELETE .../viewers/{vid}
    POST /v1/sessions/{id}/broadcast  stream it live to an RTMP/SRT server (--broadcast-to)   DELETE: end it
    GET  /v1/sessions/{id}/ws         websocket: PCM16 + control in, events out
    GET  /v1/sessions/{id}/events     server-sent events: the session's events, read-only (overlays, dashboards)
    GET  /v1/recordings[/{id}]        sessions created with `record`, saved as MP4 when they end   DELETE one
    GET  /v1/recordings/{id}/captions the captions a recording showed (WebVTT)
    POST /v1/renders                  an avatar saying an audio file or a text -> an MP4 (a recording) when done
    GET  /v1/renders/{id}             its state                   DELETE /v1/renders/{id}   cancel it
    GET  /v1/sessions/{id}            state and stats             DELETE /v1/sessions/{id}   free it
    GET  /, /overlay                  the browser client (client_examples/browser)

Handlers stay thin: admission, auth and error mapping live here; a session's peer connection,
websocket and lifetime live in `sessions.py`; tokens in `auth.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import io
import ipaddress
import json
import logging
import math
import os
import re
import signal
import ssl
import sys
import time
import urllib.parse
import uuid
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web
from aiohttp.http_exceptions import HttpProcessingError

from letstalk_rt import VERSION_HEADER, __version__
from letstalk_rt.aio import wait_for
from letstalk_rt.cli import check_live_args, check_sampling_args, live_config, pipeline_kwargs, resolve_devices
from letstalk_rt.errors import InputError, LetsTalkError, NoFaceError, OutputError
from letstalk_rt.framing import FRAMING, MAX_PHOTO_SIDE, check_framing
from letstalk_rt.media import (LIVE_FORMATS, WHITE, check_live_url, decode_audio, not_an_image, open_photo,
                               parse_colour, redact_url, upright_image)
from letstalk_rt.rtc import bridged_host_addresses, selected_route
from letstalk_rt.stream import CapacityError, EnginePool, FileSource, StreamEngine, TextSource, run_off_loop
from letstalk_rt.stream.engine import Session, SessionClosedError
from letstalk_rt.stream.motion import MAX_BYTES as MOTION_MAX_BYTES, Motion
from letstalk_rt.tts import (DEFAULT_VOICE, MAX_TEXT, PITCH_RANGE, RATE_RANGE, Speech, SpeechUnavailable, check_voice,
                             espeak_exe, voices)

from . import logs, recordings, renders
from .auth import TokenError, api_key_matches, bearer
from .avatars import AVATAR_ID, Avatar, AvatarRefused, AvatarStore, check_name
from .logs import say
from .options import ServerConfig, add_serve_arguments
from .renders import Render
from .sessions import (
    DELETED,
    MAX_LISTENERS,
    SdpRejected,
    ServerSession,
    SessionGone,
    SessionManager,
    ViewersFull,
    check_offer,
    close_ws,
    render_metrics,
)

log = logging.getLogger("letstalk.server")

MANAGER = web.AppKey("manager", SessionManager)
PREFIX = web.RequestKey("prefix", str)  # the path a proxy serves the server under (--behind-proxy), "/avatar"
CONFIG = web.AppKey("config", ServerConfig)
AVATARS = web.AppKey("avatars", AvatarStore)
ENGINES = web.AppKey("engines", EnginePool)  # one engine per device (--device cuda:0,cuda:1): one, mostly

MAX_WS_MESSAGE = 512 * 1024  # transport cap (1 s of 96 kHz stereo PCM16 is 384 kB); the 1 s rule is checked per format
MAX_CONTROL_MESSAGE = 32768  # JSON control messages are small; `say` text is at most 5000 characters
MAX_FORM_FIELD = 1024  # non-file multipart fields (seed, steps, avatar_id, full_frame, framing)
MAX_TEXT_FIELD = 4 * MAX_TEXT  # a render's `text` field: MAX_TEXT characters of UTF-8
CLOSING_WAIT_S = 10.0  # a DELETE of a session already closing waits this long, at most, for it to be freed
MAX_FORM_PARTS = 16  # more than any endpoint has fields (a render has 14)
SESSION_FIELDS = ("portrait", "avatar_id", "seed", "steps", "full_frame", "framing", "voice", "background", "record")
# POST /v1/renders: a session's fields but `record` (a render is recorded), and what it says: an `audio` upload, or a
# `text` spoken with `voice` at `rate` and `pitch`
RENDER_FIELDS = (*SESSION_FIELDS[:-1], "audio", "text", "rate", "pitch", "queue")  # queue: wait for a slot
FILE_FIELDS = ("portrait", "audio")  # multipart files; every other field is a short text
AVATAR_FIELDS = ("portrait", "id", "name", "background")  # POST /v1/avatars
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "HEIF")  # what the docs promise (HEIF: an iPhone's HEIC, with pi-heif);
# Pillow's other decoders are never reached


# --------------------------------------------------------------------------------------------------
# Errors and auth
# --------------------------------------------------------------------------------------------------


@functools.cache
def _http_error_class(status: int) -> type[web.HTTPException]:
    # One tiny class per status: aiohttp's own classes differ in their constructors (413, 405 ...).
    return type(f"HTTPError{status}", (web.HTTPException,), {"status_code": status})


def api_error(status: int, message: str, headers: dict[str, str] | None = None,
              code: str | None = None) -> web.HTTPException:
    """An HTTP error whose body is {"error": message} (and {"code": code} when given); raise it."""
    body = {"error": message} if code is None else {"error": message, "code": code}
    return _http_error_class(status)(text=json.dumps(body), content_type="application/json", headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status >= 400 and e.content_type != "application/json":  # aiohttp's own 404/405/413 ...
            headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
            if e.status in (404, 405):  # no such route (or method): "no_route" tells a client it is not a missing
                # session or avatar, but a URL this server (of this version) does not have
                raise api_error(e.status, f"{e.reason}: this server (letstalk-rt {__version__}) has no "
                                          f"{request.method} {request.path}", headers, code="no_route") from None
            raise api_error(e.status, e.reason, headers) from None
        raise
    except asyncio.CancelledError:
        raise
    except Exception as e:
        if isinstance(e, ConnectionError) and _client_gone(request):
            # The client hung up mid-request (an upload cut off): not a server error, and nobody is left
            # to read an answer (aiohttp drops it quietly).
            log.info("%s %s: the client disconnected before the request was read (%s)", request.method,
                     request.path, _describe(e))
            return web.Response(status=400)
        log.exception("internal error on %s %s", request.method, request.path)
        request.app[MANAGER].metrics.errors_total += 1
        return web.json_response({"error": "internal server error"}, status=500)


FORWARDED_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")  # host[:port]
FORWARDED_PREFIX = re.compile(r"(/(?!\.\.?(/|$))[A-Za-z0-9._~-]+)+")  # /avatar, /apps/avatar; no . or .. in it


def public_url(request: web.Request, path: str, websocket: bool = False) -> str:
    """An absolute URL of this server's `path` (/v1/...) as its client reaches it: the request's scheme and host (the
    proxy's, with --behind-proxy) and the path prefix the proxy serves it under (X-Forwarded-Prefix)."""
    origin = request.url.origin()
    if websocket:
        origin = origin.with_scheme("wss" if origin.scheme == "https" else "ws")
    return str(origin.with_path(request.get(PREFIX, "") + path))


@web.middleware
async def forwarded_middleware(request: web.Request, handler):
    """`--behind-proxy`: the URLs the server answers with (offer_url, ws_url, status_url, video_url ...) name the
    scheme and host the client asked the TLS proxy in front for, as the proxy says (RFC 7239 `Forwarded: proto=https;
    host=...`, else `X-Forwarded-Proto` / `X-Forwarded-Host`; the first hop's), and the path it serves the server
    under (`X-Forwarded-Prefix: /avatar`), not the proxy's own hop to this server (`public_url`). Only behind a proxy
    that sets them: anyone may send these headers."""
    first = request.forwarded[0] if request.forwarded else {}
    proto = (first.get("proto") or request.headers.get("X-Forwarded-Proto", "").split(",")[0]).strip().lower()
    host = (first.get("host") or request.headers.get("X-Forwarded-Host", "").split(",")[0]).strip()
    prefix = request.headers.get("X-Forwarded-Prefix", "").split(",")[0].strip().rstrip("/")
    changes = {}
    if proto in ("http", "https"):
        changes["scheme"] = proto
    if host and FORWARDED_HOST.fullmatch(host):
        changes["host"] = host
    request = request.clone(**changes) if changes else request
    if FORWARDED_PREFIX.fullmatch(prefix):
        request[PREFIX] = prefix
    return await handler(request)


def cors_headers(request: web.Request) -> dict[str, str] | None:
    """The CORS headers of an answer to a page of an origin the server allows (`--cors-origin`), else None."""
    origin, origins = request.headers.get("Origin"), request.app[CONFIG].cors_origins
    if origin is None or not ("*" in origins or origin in origins):
        return None
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Expose-Headers": "Retry-After, Content-Disposition, Location, Date"}


@web.middleware
async def cors_middleware(request: web.Request, handler):
    """Cross-origin access for the web pages of the allowed origins (`--cors-origin`; "*": any): a page served
    elsewhere (your app at https://app.example.com) may call this API and read its answers. Preflights are answered
    here; every answer to an allowed origin, errors too, carries Access-Control-Allow-Origin (a response a handler sends
    itself, the event stream, adds `cors_headers` on its own). A page of another origin gets no such header, so its
    browser keeps it out, as without this middleware."""
    headers = cors_headers(request)
    if headers is None:
        if request.method == "OPTIONS" and "Origin" in request.headers:
            raise api_error(403, f"origin {request.headers['Origin'][:100]} may not call this server (its "
                                 "--cors-origin list)")
        return await handler(request)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(status=204, headers={
            **headers, "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, X-API-Key", "Access-Control-Max-Age": "600"})
    try:
        response = await handler(request)
    except web.HTTPException as e:
        e.headers.update(headers)
        raise
    if not response.prepared:
        response.headers.update(headers)
    return response


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def require_api_key(request: web.Request) -> None:
    key = request.app[CONFIG].current_api_key()
    if not key:
        return
    given = request.headers.get("X-API-Key") or bearer(request.headers, {})
    if not api_key_matches(given, key):
        raise api_error(401, "missing or wrong API key: send 'Authorization: Bearer <api key>'",
                        headers={"WWW-Authenticate": 'Bearer realm="letstalk"'})


def require_token_or_api_key(request: web.Request, sid: str, what: str) -> None:
    """The request carries the token of `sid` (a session's or a render's, Bearer or ?token=) or the API key; else 401
    saying why a token was refused (expired, another one's ...), or that the key is wrong."""
    token = bearer(request.headers, request.query)
    try:
        request.app[MANAGER].signer.verify(token or "", session_id=sid)
    except TokenError as e:
        try:
            require_api_key(request)
        except web.HTTPException:
            if token and token.count(".") == 2:  # a token rather than a key: why it was refused
                raise api_error(401, f"invalid {what} token ({e}): send its token, or the API key, as "
                                     "'Authorization: Bearer ...'",
                                headers={"WWW-Authenticate": 'Bearer realm="letstalk"'}) from None
            raise


def authorize_session(request: web.Request, allow_api_key: bool = False, closing: bool = False) -> ServerSession:
    """The session in the URL, if the request carries its token (or, where allowed, the API key); `closing`: one that
    is being closed too (404 otherwise)."""
    manager = request.app[MANAGER]
    sid = request.match_info["session_id"]
    token = bearer(request.headers, request.query)
    key = request.app[CONFIG].current_api_key()
    if not (allow_api_key and key and api_key_matches(token, key)):
        try:
            manager.signer.verify(token or "", session_id=sid)
        except TokenError as e:
            raise api_error(401, f"invalid session token ({e}): send 'Authorization: Bearer <token>' or ?token=",
                            headers={"WWW-Authenticate": 'Bearer realm="letstalk-session"'}) from None
    ss = manager.sessions.get(sid)
    if ss is None or (ss.closing and not closing):
        raise api_error(404, f"session {sid} does not exist (closed, expired or never created)",
                        code="session_not_found")
    return ss


# --------------------------------------------------------------------------------------------------
# Handlers: service
# --------------------------------------------------------------------------------------------------


def _engines_state(manager: SessionManager) -> list[dict]:
    """Each device's sessions open and cap (new sessions go to the one with the most free slots), and whether it is
    hung (its window has run --hung-seconds: `busy_seconds`)."""
    return [{"device": str(e.pipeline.device), "sessions": len(e.sessions), "max_sessions": e.config.max_sessions,
             **({"hung": True, "busy_seconds": round(e.busy_s, 1)} if e.hung else {})}
            for e in manager.engines.engines]


async def health(request: web.Request) -> web.Response:
    """Readiness: 200 while new sessions are taken here. `sessions` counts every slot taken, those held by requests
    still uploading or preparing included: sessions == max_sessions is exactly when POST /v1/sessions answers 503.
    Draining (shutting down) or every engine hung, 503: a load balancer's health check sends new sessions elsewhere
    (while the open ones finish here, draining)."""
    manager = request.app[MANAGER]
    engines = _engines_state(manager)
    hung = all(e.get("hung") for e in engines)
    return web.json_response({"status": "draining" if manager.draining else "hung" if hung else "ok",
                              "version": __version__, "sessions": len(manager.sessions) + manager.admitting,
                              "admitting": manager.admitting, "max_sessions": manager.max_sessions,
                              "renders_queued": len(manager.renders.queue), "engines": engines},
                             status=503 if manager.draining or hung else 200)


async def health_live(request: web.Request) -> web.Response:
    """Liveness: 503 only when an engine is hung (a device or driver that stopped answering, which only a restart
    mends: an orchestrator's liveness probe restarts the server on it); 200 while draining, which a restart would cut
    short. An event loop that stopped answers nothing, which a probe's timeout counts as a failure too."""
    engines = _engines_state(request.app[MANAGER])
    hung = any(e.get("hung") for e in engines)
    return web.json_response({"status": "hung" if hung else "ok", "engines": engines}, status=503 if hung else 200)


async def metrics(request: web.Request) -> web.Response:
    text = render_metrics(request.app[MANAGER])
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def list_avatars(request: web.Request) -> web.Response:
    require_api_key(request)
    return web.json_response({"avatars": [a.describe() for a in request.app[AVATARS].values()]})


def _avatar_refused(e: AvatarRefused) -> web.HTTPException:
    return api_error(e.status, str(e), code="avatar_not_found" if e.status == 404 else None)


async def create_avatar(request: web.Request) -> web.Response:
    """Upload a portrait once; sessions then open on it by id (`avatar_id`) with no upload and no preparation."""
    require_api_key(request)
    app = request.app
    config, engines, store = app[CONFIG], app[ENGINES], app[AVATARS]
    fields = await read_in_time(request, _read_fields(request, AVATAR_FIELDS))
    upload = fields.get("portrait")
    if not upload:
        raise api_error(422, "upload the avatar's portrait as multipart/form-data, field `portrait` (JPEG, PNG, "
                             "HEIC or WebP)" + (": it is empty" if upload is not None else ""))
    name = _checked_field(fields, "name", check_name)
    background = _checked_field(fields, "background", lambda v: parse_colour(v, "`background`"))
    try:
        avatar_id = store.reserve(fields.get("id"))
    except AvatarRefused as e:
        raise _avatar_refused(e) from None
    try:
        image = await _decoded_upload(upload, config, background)
        try:
            portrait = await run_off_loop(engines.pipeline.prepare_portrait, image, config.detect_face)
        except InputError as e:  # no face (NoFaceError) or an image the model cannot take
            raise api_error(422, str(e)) from None
        avatar = Avatar(avatar_id, name or avatar_id, portrait, uploaded=True, created_at=time.time())
        try:
            await asyncio.to_thread(store.save, avatar, upload, background)
        except (OSError, OutputError) as e:
            with contextlib.suppress(OSError):  # an upload written without its record: not left behind
                await asyncio.to_thread(store.delete_files, avatar_id)
            log.error("avatar %s could not be saved under %s: %s", avatar_id, store.directory, e)
            why = getattr(e, "strerror", None) or e
            raise api_error(507, f"the avatar could not be saved on the server ({why}); it was not added") from None
        store.add(avatar)
    finally:
        store.release(avatar_id)
    log.info("avatar %s (%r) uploaded", avatar.id, avatar.name)
    return web.json_response(avatar.describe(), status=201)


async def get_avatar(request: web.Request) -> web.Response:
    require_api_key(request)
    try:
        avatar = request.app[AVATARS].get(request.match_info["avatar_id"])
    except AvatarRefused as e:
        raise _avatar_refused(e) from None
    return web.json_response(avatar.describe())


async def delete_avatar(request: web.Request) -> web.Response:
    """Forget an uploaded avatar and its files; sessions open on it go on."""
    require_api_key(request)
    store = request.app[AVATARS]
    try:
        avatar = store.remove(request.match_info["avatar_id"])
    except AvatarRefused as e:
        raise _avatar_refused(e) from None
    await asyncio.to_thread(store.delete_files, avatar.id)
    log.info("avatar %s (%r) deleted", avatar.id, avatar.name)
    return web.Response(status=204)


async def list_voices(request: web.Request) -> web.Response:
    """The voices the `say` message speaks with (this machine's espeak-ng); 503 saying how to install it if absent."""
    require_api_key(request)
    try:
        listed = await asyncio.to_thread(voices)
    except SpeechUnavailable as e:
        raise api_error(503, str(e)) from None
    return web.json_response({"engine": "espeak-ng", "default": DEFAULT_VOICE, "voices": listed})


# --------------------------------------------------------------------------------------------------
# Handlers: sessions
# --------------------------------------------------------------------------------------------------


class ImageTooLarge(InputError):
    """An image over the pixel limit (HTTP 413); every other unreadable image is a plain InputError (415)."""


def decode_image(data: bytes, max_pixels: int, background: tuple[int, int, int] = WHITE) -> np.ndarray:
    """Uploaded JPEG / PNG / HEIC / WebP bytes -> (H, W, 3) uint8 RGB, upright (a phone photo's EXIF orientation
    applied, transparency on `background`, white unless the request names a key colour, as `letstalk generate` reads
    files); ImageTooLarge, or InputError (not one of those)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open_photo(io.BytesIO(data), formats=UPLOAD_FORMATS) as img:
            w, h = img.size  # what will be decoded (a large JPEG scaled down as it decodes): nothing is decoded yet
            if w * h > max_pixels:
                raise ImageTooLarge(f"the portrait is {w}x{h} pixels; at most {max_pixels // 1_000_000} megapixels")
            return upright_image(img, background)  # writable (H, W, 3) uint8
    except UnidentifiedImageError:
        kind = not_an_image(io.BytesIO(data))  # a clip or the speech sent as the portrait: say so
        raise InputError(f"`portrait` is {kind or 'not an image this server can read'}"
                         f"{', not a photo' if kind else ''} (send JPEG, PNG, HEIC or WebP)") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"the portrait is too large to decode: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt files (Pillow raises all three)
        raise InputError(f"`portrait` image is corrupt or truncated ({e})") from None


async def _decoded_upload(upload: bytes, config: ServerConfig, background: tuple[int, int, int] | None) -> np.ndarray:
    """A portrait upload decoded off the loop (decode_image); 413 over the pixel limit, 415 not an image."""
    try:
        return await asyncio.to_thread(decode_image, upload, config.max_image_pixels, background or WHITE)
    except ImageTooLarge as e:
        raise api_error(413, str(e)) from None
    except InputError as e:
        raise api_error(415, str(e)) from None


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None when it is longer than `limit` (read stops there: nothing more is buffered).

    `StreamReader.read(n)` returns what has arrived so far, not n bytes: a body split over TCP
    segments needs the loop.
    """
    if request.content_length is not None and request.content_length > limit:
        return None
    buf = bytearray()
    while True:
        chunk = await request.content.read(64 * 1024)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            return None


async def read_in_time(request: web.Request, reading):
    """Await `reading` (the body being read) within --upload-timeout, or answer 408.

    aiohttp puts no deadline on a request body: a client that announces 10 bytes and sends one would
    otherwise hold its admission slot (or its session's negotiation) forever.
    """
    timeout = request.app[CONFIG].upload_timeout_s
    try:
        return await wait_for(reading, timeout)
    except asyncio.TimeoutError:
        err = api_error(408, f"the request body did not arrive within {timeout:g} s (--upload-timeout); "
                             "send it at once, or raise the limit")
        err.force_close()  # no keep-alive: aiohttp drains what still comes for its lingering time, then closes
        raise err from None


async def _read_limited(part, limit: int, what: str) -> bytes:
    buf = bytearray()
    while True:
        chunk = await part.read_chunk(64 * 1024)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            raise api_error(413, f"{what} is larger than the limit of {limit} bytes")


async def _read_fields(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The `allowed` fields of a request (POST /v1/sessions, /v1/avatars, /v1/renders) from multipart or JSON, every
    size bounded while reading; the files (`portrait`, `audio`) come only as multipart."""
    named = ", ".join(f for f in allowed if f not in FILE_FIELDS)  # what the errors list as expected
    files = [f for f in allowed if f in FILE_FIELDS]
    config = request.app[CONFIG]
    limit = config.max_upload_bytes
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise api_error(413, f"upload of {request.content_length} bytes; the limit is {config.max_upload_mb:g} MB "
                             "(--max-upload-mb)")
    ctype = request.content_type
    fields: dict[str, Any] = {}
    if ctype == "multipart/form-data":
        try:
            reader = await request.multipart()
            for _ in range(MAX_FORM_PARTS + 1):
                part = await reader.next()
                if part is None:
                    break
                if not hasattr(part, "read_chunk"):
                    raise api_error(422, "nested multipart bodies are not supported")
                name = part.name or ""
                if name not in allowed:
                    raise api_error(422, f"unknown field {name[:40]!r}; expected {', '.join(allowed)}")
                if name in FILE_FIELDS:
                    fields[name] = await _read_limited(part, limit, f"the {name} upload")
                else:
                    most = MAX_TEXT_FIELD if name == "text" else MAX_FORM_FIELD
                    fields[name] = (await _read_limited(part, most, f"field {name!r}")).decode(
                        "utf-8", "replace").strip()
            else:
                raise api_error(422, f"too many multipart fields; expected {', '.join(allowed)}")
        except web.HTTPException:
            raise
        except (ValueError, AssertionError, KeyError, UnicodeError, HttpProcessingError) as e:  # aiohttp's parser
            # HttpProcessingError: a part's headers are malformed (InvalidHeader) or too long (LineTooLong)
            message = e.message if isinstance(e, HttpProcessingError) else str(e)
            raise api_error(400, f"malformed multipart body: {' '.join(str(message).split())[:200]}") from None
    elif ctype == "application/x-www-form-urlencoded":  # a plain HTML form / FormData without a file
        body = await read_body(request, 64 * 1024)
        if body is None:
            raise api_error(413, "a form without a file is at most 64 kB")
        pairs = urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        for name, value in pairs:
            if name not in allowed or name in FILE_FIELDS:
                raise api_error(422, f"unknown field {name[:40]!r}; expected {named} (upload "
                                     f"{' or '.join(files)} files as multipart/form-data)")
            fields[name] = value
    elif ctype in ("application/json", "application/octet-stream") or not request.body_exists:
        body = await read_body(request, 64 * 1024) if request.body_exists else b"{}"
        if body is None:
            raise api_error(413, "a JSON request is at most 64 kB; upload portraits as multipart/form-data")
        try:
            data = json.loads(body or b"{}")
        except ValueError as e:
            raise api_error(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise api_error(422, f"the JSON body must be an object with the fields {named}")
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise api_error(422, f"unknown field(s) {unknown}; expected {named}")
        for name in files:
            if name in data:
                raise api_error(422, f"send a {name} file as multipart/form-data (field `{name}`), not in JSON")
        fields.update(data)
    else:
        raise api_error(415, f"Content-Type {ctype!r}: send multipart/form-data with a `portrait` file"
                             + (", or JSON like {\"avatar_id\": \"default\"}" if "avatar_id" in allowed else ""))
    return fields


def _int_field(fields: dict, name: str, lo: int, hi: int) -> int | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
        raise api_error(422, f"`{name}` must be an integer {lo}..{hi}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise api_error(422, f"`{name}` must be an integer {lo}..{hi}, got {str(value)[:40]!r}") from None
    if not lo <= number <= hi:
        raise api_error(422, f"`{name}` must be an integer {lo}..{hi}, got {number}")
    return number


def _boolean(value: Any, name: str) -> bool:
    """true/false, 1/0, yes/no (a form's text or JSON's boolean); InputError otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise InputError(f"{name} must be true or false, got {text[:20]!r}")


def _checked_field(fields: dict, name: str, check: Callable[[Any], Any], default: Any = None) -> Any:
    """`fields[name]` through `check`, which raises InputError saying what to give (answered 422); `default` when the
    field is absent or empty."""
    value = fields.get(name)
    if value is None or value == "":
        return default
    try:
        return check(value)
    except InputError as e:
        raise api_error(422, str(e)) from None


@dataclasses.dataclass
class _Opening:
    """A session request read and checked (`_read_opening`): what opening its session takes."""

    fields: dict  # with `voice` and `avatar_id` checked
    seed: int
    full_frame: int
    framing: float
    portrait: Any  # the avatar's prepared portrait, or the upload decoded
    extra: Any  # what the handler's check returned


async def _open_session(request: web.Request, allowed: tuple[str, ...], check: Callable[[dict], Any] | None = None
                        ) -> tuple[ServerSession, dict, Any]:
    """Admit a session and open it on the request's portrait upload or `avatar_id`, with its `seed`, `full_frame`,
    `framing`, `voice` and `background`: the slot is taken before the body is read (503 at once when full), and
    `check(fields)` (a coroutine) checks the handler's own fields before anything is opened, returning what the
    handler needs. Returns (the session, its fields with `voice` and `avatar_id` checked, what `check` returned)."""
    require_api_key(request)
    manager = request.app[MANAGER]
    if not manager.try_reserve():  # before reading the body: a full server answers at once
        raise _full(request)
    try:
        opening = await _read_opening(request, allowed, check)
        session = await _open_checked(request.app, opening)
    finally:
        manager.release()
    ss = manager.add(session, opening.fields["voice"], opening.fields["avatar_id"])
    return ss, opening.fields, opening.extra


def _full(request: web.Request, why: str = "retry later") -> web.HTTPException:
    """The 503 of a server with no session slot free (or shutting down)."""
    manager, config = request.app[MANAGER], request.app[CONFIG]
    if manager.draining:
        return api_error(503, "this server is shutting down; start the session on another one")
    return api_error(503, f"all {manager.max_sessions} sessions are in use; {why}",
                     headers={"Retry-After": str(config.retry_after_s)})


async def _read_opening(request: web.Request, allowed: tuple[str, ...], check: Callable[[dict], Any] | None
                        ) -> _Opening:
    """Read and check a session request's body (`_open_session`), its portrait decoded: everything but the opening."""
    app = request.app
    config, engines = app[CONFIG], app[ENGINES]
    fields = await read_in_time(request, _read_fields(request, allowed))
    seed = _int_field(fields, "seed", 0, 2**31 - 1) or 0
    steps = _int_field(fields, "steps", 1, 50)
    full_frame = _int_field(fields, "full_frame", 0, config.max_full_frame) or 0
    # framing: 0 (the whole photo) or FRAMING_RANGE sides of the face's square; voice: the session's voice for
    # `say` (the first check lists espeak-ng's voices: off the loop); background: RRGGBB, the colour an uploaded
    # portrait's transparent parts go on (a key colour)
    framing = _checked_field(fields, "framing", lambda v: check_framing(v, "`framing`"), FRAMING)
    fields["voice"] = await asyncio.to_thread(_checked_field, fields, "voice", check_voice)
    background = _checked_field(fields, "background", lambda v: parse_colour(v, "`background`"))
    if steps is not None and steps != engines.pipeline.num_steps:
        raise api_error(422, f"`steps`: this server samples {engines.pipeline.num_steps} step(s) per window for "
                             "every session (sessions are batched together); set it at start with --steps")
    avatar_id = fields.get("avatar_id")
    if avatar_id is not None and not isinstance(avatar_id, str):  # JSON's 0, [] or {} is not "none given"
        raise api_error(422, f"`avatar_id` must be a string, got {json.dumps(avatar_id)[:40]}")
    upload = fields.get("portrait")
    if upload is not None and avatar_id:
        raise api_error(422, "give either a `portrait` upload or an `avatar_id`, not both")
    if upload is None and background is not None:
        raise api_error(422, "`background` is the colour an uploaded portrait's transparent parts go on; it "
                             "needs a `portrait` upload (a PNG or WebP with transparency)")
    if upload is None:
        avatar_id = avatar_id or "default"
        if avatar_id not in app[AVATARS]:
            known = ", ".join(app[AVATARS]) or "none"
            raise api_error(422, f"unknown avatar_id {str(avatar_id)[:64]!r} (available: {known})")
        portrait: Any = app[AVATARS][avatar_id].portrait
    else:
        if not upload:
            raise api_error(422, "the `portrait` upload is empty")
        avatar_id = None
    fields["avatar_id"] = avatar_id
    extra = await check(fields) if check is not None else None
    if upload is not None:
        portrait = await _decoded_upload(upload, config, background)
    return _Opening(fields, seed, full_frame, framing, portrait, extra)


def new_session_id(config: ServerConfig) -> str:
    """A new session's (or render's) id: 16 hex digits, as the engine names its sessions, after `--instance-id`'s
    NAME- where the server has one (a balancer routes by it)."""
    name = uuid.uuid4().hex[:16]
    return f"{config.instance_id}-{name}" if config.instance_id else name


async def _open_checked(app: web.Application, opening: _Opening, session_id: str | None = None) -> Session:
    """Open the session of a request read and checked (`_read_opening`) in a slot the caller reserved; the errors a
    portrait can still raise (no face found) as the HTTP error to answer."""
    config = app[CONFIG]
    try:
        return await app[ENGINES].open_session(opening.portrait, seed=opening.seed, detect_face=config.detect_face,
                                               session_id=session_id or new_session_id(config),
                                               full_frame=opening.full_frame,
                                               framing=opening.framing)
    except NoFaceError as e:
        raise api_error(422, str(e)) from None
    except InputError as e:
        raise api_error(422, str(e)) from None
    except CapacityError as e:  # not reached while the server is its engines' only user
        raise api_error(503, str(e), headers={"Retry-After": str(config.retry_after_s)}) from None


async def _start_recording(app: web.Application, ss: ServerSession, save_on_close: bool = True) -> None:
    """Record the session to --recordings-dir/ID.mp4; 507 (the session closed) when the file cannot be made."""
    try:
        ss.session.record(app[CONFIG].recordings_dir / f"{ss.id}.mp4", save_on_close=save_on_close)
    except OutputError as e:
        await app[MANAGER].close(ss, "its recording could not start")
        log.error("session %s: recording refused: %s", ss.id, e)
        raise api_error(507, f"the recording could not start on the server ({e}); the session was closed") from None


def _recordings_dir_needed(request: web.Request, what: str) -> None:
    if request.app[CONFIG].recordings_dir is None:
        raise api_error(422, f"this server does not record {what}; start it with --recordings-dir DIR")


async def create_session(request: web.Request) -> web.Response:
    async def check(fields: dict) -> bool:
        record = _checked_field(fields, "record", lambda v: _boolean(v, "`record`"), False)
        if record:
            _recordings_dir_needed(request, "sessions")
        return record

    ss, fields, record = await _open_session(request, SESSION_FIELDS, check)
    manager, session = request.app[MANAGER], ss.session
    ss.recording_url = public_url(request, f"/v1/recordings/{ss.id}") if record else None
    manager.webhooks.send("session.created", {"session_id": ss.id, "avatar_id": fields["avatar_id"], "record": record})
    if record:
        await _start_recording(request.app, ss)
    width, height = session.frame_size
    voice = fields["voice"]
    return web.json_response({
        "session_id": ss.id,
        "token": ss.token,
        "expires_at": ss.expires_at,
        "offer_url": public_url(request, f"/v1/sessions/{ss.id}/offer"),
        "ws_url": public_url(request, f"/v1/sessions/{ss.id}/ws", websocket=True),
        "video": {"width": width, "height": height, "fps": request.app[ENGINES].pipeline.fps,
                  "face_box": list(session.face_box)},
        "audio": {"sample_rate": session.sample_rate, "channels": 1, "format": "pcm_s16le"},
        "ice_servers": ss.ice_servers,
        **({"voice": voice} if voice else {}),
        **({"recording_url": ss.recording_url} if record else {}),
        **({"ends_at": round(ss.ends_at, 3)} if ss.ends_at is not None else {}),
    }, status=201)


# --------------------------------------------------------------------------------------------------
# Handlers: renders (a video of an avatar saying an audio file or a text: server/renders.py)
# --------------------------------------------------------------------------------------------------


async def _render_source(request: web.Request, fields: dict) -> tuple[Any, float | None]:
    """What a render says, checked before its session opens: (an AudioSource pushed ahead of time, its seconds, None
    for a text until it is synthesised)."""
    config = request.app[CONFIG]
    _recordings_dir_needed(request, "renders (a render's video is a recording)")
    rate_hz = request.app[ENGINES].pipeline.config.audio.sample_rate
    audio, text = fields.get("audio"), fields.get("text")
    if (audio is None) == (text is None or text == ""):
        raise api_error(422, "give what the avatar says: either an `audio` file (multipart/form-data) or a `text`, "
                             "not both")
    rate, pitch = _int_field(fields, "rate", *RATE_RANGE), _int_field(fields, "pitch", *PITCH_RANGE)
    if audio is not None:
        if rate is not None or pitch is not None or fields["voice"]:
            raise api_error(422, "`voice`, `rate` and `pitch` are how a `text` is spoken; an `audio` upload is "
                                 "played as it is")
        if not audio:
            raise api_error(422, "the `audio` upload is empty")
        try:
            pcm = await asyncio.to_thread(decode_audio, audio, "the audio upload", rate_hz)
        except InputError as e:
            raise api_error(422, str(e)) from None
        seconds = len(pcm) / rate_hz
        most = min(renders.MAX_SPEECH_S,
                   max(0.0, config.max_session_s - renders.MARGIN_S) if config.max_session_s else math.inf)
        if seconds > most:
            raise api_error(422, f"the audio is {seconds:.0f} s long; a render here says at most {most:.0f} s ("
                                 + ("its session's time limit, --max-session-minutes" if most < renders.MAX_SPEECH_S
                                    else "render longer speech in parts") + ")")
        return FileSource.from_samples(pcm, realtime=False, sample_rate=rate_hz), seconds
    options = {k: v for k, v in (("voice", fields["voice"]), ("rate", rate), ("pitch", pitch)) if v is not None}
    try:
        speech = await asyncio.to_thread(lambda: Speech(**options))  # the voice's first check runs espeak-ng
        return TextSource(text, speech, rate_hz), None
    except SpeechUnavailable as e:
        raise api_error(501, f"this server cannot speak text: {e}; send an `audio` file instead") from None
    except InputError as e:
        raise api_error(422, str(e)) from None


async def create_render(request: web.Request) -> web.Response:
    """A render made in a session slot now, or, with `queue` true on a server whose slots are all in use, queued (202
    "queued") until one frees (`_start_queued`): at most --render-queue renders wait, each holding its speech."""
    require_api_key(request)
    app = request.app
    manager, config = app[MANAGER], app[CONFIG]

    def queue_full() -> bool:  # (the bodies being read to queue count: a full queue bounds what is read, as slots do)
        return manager.draining or len(manager.renders.queue) + manager.renders.reading >= config.render_queue

    def refused(queue: bool) -> web.HTTPException:
        manager.metrics.refused_total += 1
        if not config.render_queue:
            return _full(request)
        return _full(request, f"the render queue holds {config.render_queue} already; retry later" if queue else
                     "retry later, or ask for a place in the render queue (`queue`: true)")

    reserved = manager.try_reserve(count_refused=False)  # before the body: a full server with a full queue says so
    if not reserved and queue_full():
        raise refused(True)
    reading = not reserved  # to be queued, if it asks to be
    manager.renders.reading += reading
    try:
        opening = await _read_opening(request, RENDER_FIELDS, functools.partial(_render_source, request))
        queue = _checked_field(opening.fields, "queue", lambda v: _boolean(v, "`queue`"), False)
        if reading:
            manager.renders.reading -= 1
            reading = False
            if not queue or queue_full():
                raise refused(queue)
        session = await _open_checked(app, opening) if reserved else None
    finally:
        if reserved:
            manager.release()
        if reading:  # its body could not be read, or was refused
            manager.renders.reading -= 1
    source, seconds = opening.extra
    if session is None:
        rid = new_session_id(config)  # the render's session gets it when it opens
        token, expires_at = manager.signer.issue(rid, config.token_ttl_s)
        render = Render(rid, source, seconds, public_url(request, f"/v1/recordings/{rid}"), state="queued")
        manager.renders.add(render)
        render.waiter = asyncio.ensure_future(_start_queued(app, render, opening))
        log.info("render %s: queued (%d waiting)", rid, len(manager.renders.queue))
        return web.json_response({**render.describe(position=manager.renders.position(render)), "token": token,
                                  "expires_at": expires_at,
                                  "status_url": public_url(request, f"/v1/renders/{rid}")}, status=202)
    ss = manager.add(session, opening.fields["voice"], opening.fields["avatar_id"])
    render = Render(ss.id, source, seconds, public_url(request, f"/v1/recordings/{ss.id}"))
    manager.renders.add(render)
    await _start_render(app, ss, render, opening.fields)
    return web.json_response({**render.describe(ss.session), "token": ss.token, "expires_at": ss.expires_at,
                              "status_url": public_url(request, f"/v1/renders/{ss.id}"),
                              "events_url": public_url(request, f"/v1/sessions/{ss.id}/events")}, status=202)


async def _start_render(app: web.Application, ss: ServerSession, render: Render, fields: dict) -> None:
    """Make `render` in its session `ss`, opened on its avatar: unpaced, recorded (a video saved only once done),
    read by `renders.run`."""
    manager = app[MANAGER]
    ss.recording_url = render.video_url
    ss.render = render
    manager.webhooks.send("session.created", {"session_id": ss.id, "avatar_id": fields["avatar_id"], "record": True,
                                              "render": True})
    ss.session.unpace()  # frames as fast as they are made, the speech kept whole; before its recording keeps a clock
    await _start_recording(app, ss, save_on_close=False)  # a render that does not finish saves nothing
    ss.spawn(renders.run(ss, render), "render")


async def _start_queued(app: web.Application, render: Render, opening: _Opening) -> None:
    """A queued render: wait until it is the first in the queue and a session slot is free (a slot that frees goes to
    whoever asks first: a live session asked for meanwhile may take it), then open its session and make it. A
    DELETE or the server stopping settles it and cancels this while it waits; a portrait in which no face is found,
    or a recording that cannot start, fails it."""
    manager = app[MANAGER]
    try:
        while not (manager.renders.queue and manager.renders.queue[0] is render
                   and manager.try_reserve(count_refused=False)):
            if manager.draining:
                raise api_error(503, "the server shut down before a session slot freed for it")
            await asyncio.sleep(renders.QUEUE_POLL_S)
        render.waiter = None  # from here its end does not cancel this: the opening is seen through, then closed
        try:
            session = await _open_checked(app, opening, session_id=render.id)
        finally:
            manager.release()
        if render.state != "queued":  # cancelled (DELETE) or the server stopping while its session opened
            await session.close(reason=f"render {render.state}")
            return
        manager.renders.started(render)
        ss = manager.add(session, opening.fields["voice"], opening.fields["avatar_id"])
        log.info("render %s: started (it waited %.1f s)", render.id, time.time() - render.created_at)
        await _start_render(app, ss, render, opening.fields)
    except web.HTTPException as e:  # no face in its portrait; its recording could not start (its session closed)
        try:
            error = json.loads(e.text or "{}").get("error") or e.reason
        except ValueError:
            error = e.reason
        if render.end("failed", error, retryable=e.status >= 500):  # 422: its portrait (no face); 507: the disk
            manager.render_ended(render)
    except Exception as e:  # the engine stopping under it
        log.exception("render %s: its session could not open", render.id)
        if render.end("failed", f"its session could not open: {type(e).__name__}: {e}"):
            manager.render_ended(render)


def _render(request: web.Request) -> tuple[str, Render | None, ServerSession | None]:
    """The render in the URL (its id, what is known of it, its session while it runs), if the request carries the API
    key or the render's token."""
    manager = request.app[MANAGER]
    rid = request.match_info["render_id"]
    if not recordings.RECORDING_ID.fullmatch(rid):
        raise api_error(404, f"no render {rid[:70]!r}", code="render_not_found")
    require_token_or_api_key(request, rid, "render")
    ss = manager.sessions.get(rid)
    if ss is not None and ss.render is None:  # a live session's id (its recording is GET /v1/recordings/{id})
        raise api_error(404, f"no render {rid!r}: {rid} is a live session", code="render_not_found")
    return rid, manager.renders.all.get(rid), ss


def _describe_render(manager: SessionManager, render: Render) -> dict:
    """A render's state (GET /v1/renders/{id}): how far its session got while it is made, its place while queued."""
    if render.state == "queued":
        return render.describe(position=manager.renders.position(render))
    ss = manager.sessions.get(render.id)
    return render.describe(ss.session if ss is not None and render.state == "rendering" else None)


RENDER_STATES = ("queued", "rendering", "done", "failed", "cancelled")


async def list_renders(request: web.Request) -> web.Response:
    """The renders the server knows (API key): queued, being made, and the last finished ones, the first asked for
    first; `?state=` keeps those in one state."""
    require_api_key(request)
    state = request.query.get("state")
    if state is not None and state not in RENDER_STATES:
        raise api_error(422, f"?state={state[:40]!r}: give one of {', '.join(RENDER_STATES)}")
    manager = request.app[MANAGER]
    renders = sorted(manager.renders.all.values(), key=lambda r: r.created_at)
    return web.json_response({"renders": [_describe_render(manager, r) for r in renders
                                          if state is None or r.state == state]})


async def get_render(request: web.Request) -> web.Response:
    rid, render, _ = _render(request)
    if render is None:  # finished long ago, or before the server restarted: its video, if it was saved
        directory = request.app[CONFIG].recordings_dir
        if directory is not None and await asyncio.to_thread((directory / f"{rid}.mp4").is_file):
            return web.json_response({"render_id": rid, "state": "done",
                                      "video_url": public_url(request, f"/v1/recordings/{rid}")})
        raise api_error(404, f"no render {rid!r} (none was made, or its state is no longer kept and it has no video)",
                        code="render_not_found")
    manager = request.app[MANAGER]
    body = _describe_render(manager, render)
    if render.state in ("queued", "rendering"):  # a new token while it waits or is made: it may take hours
        body["token"], body["expires_at"] = manager.signer.issue(rid, request.app[CONFIG].token_ttl_s)
    return web.json_response(body)


async def delete_render(request: web.Request) -> web.Response:
    """Cancel a render that is running, or delete a finished one: its video goes too."""
    rid, render, ss = _render(request)
    manager = request.app[MANAGER]
    directory = request.app[CONFIG].recordings_dir
    if render is None and not (directory is not None and await asyncio.to_thread((directory / f"{rid}.mp4").is_file)):
        raise api_error(404, f"no render {rid!r}", code="render_not_found")
    if render is not None and render.end("cancelled", "cancelled by the client"):
        manager.render_ended(render)
    if ss is not None:
        await manager.close(ss, "render cancelled")
    manager.renders.all.pop(rid, None)
    if directory is not None:  # a video saved as the DELETE came goes too
        await asyncio.to_thread(recordings.delete, directory / f"{rid}.mp4")
    return web.Response(status=204)


# --------------------------------------------------------------------------------------------------
# Handlers: recordings (sessions created with `record`, under --recordings-dir)
# --------------------------------------------------------------------------------------------------


def _recording(request: web.Request) -> tuple[str, Path]:
    """The recording in the URL (its session's id) and its file, if the request carries the API key or that session's
    token; 404 on a server that does not record."""
    directory = request.app[CONFIG].recordings_dir
    rid = request.match_info["recording_id"]
    if directory is None:
        raise api_error(404, "this server does not record sessions (start it with --recordings-dir DIR)",
                        code="recording_not_found")
    if not recordings.RECORDING_ID.fullmatch(rid):
        raise api_error(404, f"no recording {rid[:70]!r}", code="recording_not_found")
    require_token_or_api_key(request, rid, "session")
    ss = request.app[MANAGER].sessions.get(rid)
    render = request.app[MANAGER].renders.all.get(rid)
    if ss is not None and ss.session.recording is not None:
        if render is not None:
            made = ss.session.player.tick / ss.session.player.fps
            raise api_error(409, f"render {rid} is still being made ({made:.0f} s so far); GET /v1/renders/{rid} says "
                                 "when it is done")
        raise api_error(409, f"session {rid} is still recording; its file is saved when the session ends or its "
                             "websocket sends stop_recording")
    if render is not None and render.state == "queued":
        raise api_error(409, f"render {rid} is queued, waiting for a session slot; GET /v1/renders/{rid} says when it "
                             "is done")
    path = directory / f"{rid}.mp4"
    if not path.is_file():
        last = ss.session.last_recording if ss is not None else None
        error = render.error if render is not None and render.error else last.error if last is not None else None
        why = f" (it was not saved: {error})" if error else ""
        raise api_error(404, f"no recording {rid!r}{why}", code="recording_not_found")
    return rid, path


async def list_recordings(request: web.Request) -> web.Response:
    require_api_key(request)
    directory = request.app[CONFIG].recordings_dir

    found = await asyncio.to_thread(recordings.saved, directory)
    return web.json_response({"recordings": [r.describe() for r in found]})


async def get_recording(request: web.Request) -> web.StreamResponse:
    rid, path = _recording(request)
    return web.FileResponse(path, headers={"Content-Type": "video/mp4",
                                           "Content-Disposition": f'attachment; filename="letstalk-{rid}.mp4"'})


async def get_recording_captions(request: web.Request) -> web.StreamResponse:
    rid, path = _recording(request)
    captions = recordings.captions_path(path)
    if not captions.is_file():
        raise api_error(404, f"recording {rid!r} has no captions: its session showed none (captions come with text "
                             "said through `say`)", code="no_captions")
    return web.FileResponse(captions, headers={"Content-Type": "text/vtt; charset=utf-8",
                                               "Content-Disposition": f'attachment; filename="letstalk-{rid}.vtt"'})


async def delete_recording(request: web.Request) -> web.Response:
    _, path = _recording(request)
    await asyncio.to_thread(recordings.delete, path)
    return web.Response(status=204)


async def session_events(request: web.Request) -> web.StreamResponse:
    """The session's engine events as server-sent events (`data: {json}` each), read-only and for any number of
    readers up to MAX_LISTENERS: an overlay showing captions of a session another client drives, a dashboard. Ends
    with the session (its `closed` event); a comment line every 15 s keeps proxies from closing it."""
    ss = authorize_session(request, allow_api_key=True)
    queue = ss.listen()
    if queue is None:
        raise api_error(429, f"this session already has {MAX_LISTENERS} event streams open; close one")
    try:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no", **(cors_headers(request) or {})})
        await resp.prepare(request)
        await resp.write(f"retry: 2000\ndata: {json.dumps({'type': 'listening', 'session_id': ss.id})}\n\n".encode())
        while True:
            try:
                message = await wait_for(queue.get(), 15.0)
            except asyncio.TimeoutError:
                await resp.write(b": keep-alive\n\n")
                continue
            if message is None:
                break
            await resp.write(f"data: {json.dumps(message)}\n\n".encode())
    except (ConnectionError, RuntimeError):  # the reader went away
        pass
    finally:
        ss.listeners.discard(queue)
    return resp


async def get_session(request: web.Request) -> web.Response:
    ss = authorize_session(request, allow_api_key=True)
    return web.json_response({
        "session_id": ss.id,
        "expires_at": ss.expires_at,
        "peer_connection": ss.pc.connectionState if ss.pc is not None else None,
        # how the server's side of it connected: host, srflx, prflx or relay on each end (a deployment behind NAT or in
        # a container checks here that its media goes through the TURN relay it was given)
        "route": selected_route(ss.pc) if ss.pc is not None else None,
        "viewers": len(ss.viewers),
        "websocket": ss.ws is not None,
        "ice_servers": ss.ice_servers,
        "device": str(ss.session.pipeline.device),  # the engine it runs on (one per device), for its whole life
        # audio_held_s: audio sent ahead (a TTS) waiting on the server for room in the engine's queue (audio_queued_s)
        "stats": {**ss.session.stats(), "audio_held_s": round(ss.held_seconds, 3)},
    })


async def list_sessions(request: web.Request) -> web.Response:
    """The sessions open on this server (API key): what a backend that lost track of some (it restarted) finds and
    ends, and what a dashboard shows. Renders' sessions too (`render` true)."""
    require_api_key(request)
    now, wall = time.monotonic(), time.time()
    return web.json_response({"sessions": [{
        "session_id": ss.id,
        "created_at": round(wall - (now - ss.created), 3),
        "avatar_id": ss.avatar_id,  # null: a portrait uploaded with the request
        "render": ss.render is not None,
        "peer_connection": ss.pc.connectionState if ss.pc is not None else None,
        "websocket": ss.ws is not None,
        "viewers": len(ss.viewers),
        "recording": ss.recording_url is not None,
        "idle_seconds": round(now - ss.last_activity, 1),
        "device": str(ss.session.pipeline.device),
        **({"ends_at": round(ss.ends_at, 3)} if ss.ends_at is not None else {}),
    } for ss in list(request.app[MANAGER].sessions.values()) if not ss.closing]})


async def renew_session_token(request: web.Request) -> web.Response:
    """A new token for a session, good for --token-ttl from now (a session outlives its first), and new TURN
    credentials: the SDK and the page ask for them while the session is open."""
    ss = authorize_session(request, allow_api_key=True)
    ss.renew()
    return web.json_response({"session_id": ss.id, "token": ss.token, "expires_at": ss.expires_at,
                              "ice_servers": ss.ice_servers})


async def get_motion(request: web.Request) -> web.Response:
    """The latents of the frames the session showed last (letstalk_rt.stream.motion; safetensors bytes): what a session
    taking over from it (a move's new one) is given (PUT) to go on from, rather than start again from the portrait."""
    ss = authorize_session(request, allow_api_key=True)
    try:
        motion = ss.session.motion()
    except LetsTalkError as e:
        raise api_error(409, str(e)) from None
    return web.Response(body=motion.to_bytes(), content_type="application/octet-stream")


async def put_motion(request: web.Request) -> web.Response:
    """Go on from another session's motion (GET .../motion of it, the bytes unchanged): the next window is generated
    from its frames. 422 for bytes that are not a motion, 409 for one of another model or portrait, or while speech
    sent to this session is not all shown (a motion is put between utterances: a move puts it before any speech)."""
    ss = authorize_session(request, allow_api_key=True)
    if request.content_type != "application/octet-stream":
        raise api_error(415, f"Content-Type {request.content_type!r}: send the motion as application/octet-stream, "
                             "the bytes GET .../motion answered")
    if (request.content_length or 0) > MOTION_MAX_BYTES:
        raise api_error(413, f"a motion is at most {MOTION_MAX_BYTES} bytes, this one {request.content_length}")
    data = await read_in_time(request, request.read())
    try:
        motion = Motion.from_bytes(data)
    except InputError as e:
        raise api_error(422, str(e)) from None
    try:
        ss.session.continue_from(motion)
    except LetsTalkError as e:
        raise api_error(409, str(e)) from None
    return web.Response(status=204)


async def delete_session(request: web.Request) -> web.Response:
    """Close the session. A client going on in another session (the SDK and the pages, moving off a server that stops)
    says which in a JSON body, {"moved_to": {"session_id", "token"[, "url"]}}: the `closed` event carries it, for the
    pages watching this session (an overlay of an SDK's session) to follow. Answered once the session is freed, also
    where it was closing already (its peer connection just closed): a client that deletes it finds it gone after."""
    ss = authorize_session(request, allow_api_key=True, closing=True)
    if ss.closing:
        with contextlib.suppress(asyncio.TimeoutError):  # (a close that hangs: the answer does not)
            await wait_for(ss.closed.wait(), CLOSING_WAIT_S)
        return web.Response(status=204)
    if request.body_exists:
        if request.content_type != "application/json":
            raise api_error(415, f"Content-Type {request.content_type!r}: a DELETE takes no body, or JSON like "
                                 '{"moved_to": {"session_id": "...", "token": "..."}}')
        fields = await read_in_time(request, _read_fields(request, ("moved_to",)))
        ss.moved_to = _moved_to(fields.get("moved_to"))
    await request.app[MANAGER].close(ss, DELETED)
    return web.Response(status=204)


def _moved_to(value: Any) -> dict | None:
    """DELETE's `moved_to`, checked: the session's id and token, and its server's URL when it is another one."""
    if value is None:
        return None
    expected = ('`moved_to` must be {"session_id": ..., "token": ...} (and "url": the other server\'s, if it is '
                'not this one)')
    if not isinstance(value, dict) or set(value) - {"session_id", "token", "url"}:
        raise api_error(422, expected)
    sid, token, url = value.get("session_id"), value.get("token"), value.get("url")
    if not (isinstance(sid, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,128}", sid)):
        raise api_error(422, f"{expected}: session_id is not a session id")
    if not (isinstance(token, str) and 0 < len(token) <= 4096 and token.isprintable()):
        raise api_error(422, f"{expected}: token is not a token")
    if url is not None and not (isinstance(url, str) and len(url) <= 2048 and re.fullmatch(r"https?://\S+", url)):
        raise api_error(422, f"{expected}: url is not an http(s) URL")
    return {"session_id": sid, "token": token, **({"url": url} if url is not None else {})}


def _no_input_to_renders(ss: ServerSession, what: str) -> None:
    """A render's session takes no speech or control (they would change the video) and has no live tracks (it is made
    faster than real time): 409 saying how to follow it."""
    if ss.render is not None:
        raise api_error(409, f"session {ss.id} is a render: it takes no {what}. Follow it at /v1/renders/{ss.id} or "
                             f"its events at /v1/sessions/{ss.id}/events, and fetch its video at "
                             f"/v1/recordings/{ss.id} once it is done")


async def offer(request: web.Request) -> web.Response:
    ss = authorize_session(request)
    _no_input_to_renders(ss, "peer connection of its own (its microphone would be speech)")
    config = request.app[CONFIG]
    if request.content_type != "application/sdp":
        raise api_error(415, f"Content-Type {request.content_type!r}: send the SDP offer as application/sdp")
    if ss.negotiating:
        raise api_error(409, "this session's peer connection is being negotiated; wait for its answer")
    ss.negotiating = True  # before any await: a second offer meanwhile is refused
    try:
        if ss.pc is not None:
            if not await ss.replaceable(time.monotonic()):
                raise api_error(409, f"this session already has a peer connection, and its peer was heard within "
                                     f"{config.peer_replace_s:g} s; a client whose network went reconnects once it "
                                     "is silent that long; another viewer watches through POST "
                                     f"/v1/sessions/{ss.id}/viewers")
            ss.drop_pc("a new offer replaces the peer connection (its peer went silent: a reconnect)")
            ss.manager.metrics.reconnects_total += 1
        answer = await _answer_offer(request, ss, ss.negotiate)
    finally:
        ss.negotiating = False
    ss.touch()
    return web.Response(status=201, text=answer, content_type="application/sdp",
                        headers={"Location": public_url(request, f"/v1/sessions/{ss.id}")})


async def _answer_offer(request: web.Request, ss: ServerSession, negotiate):
    """Read the SDP offer (bounded in size and time), check it and `await negotiate(text)` within the negotiation
    timeout: its result, or the HTTP error saying what went wrong."""
    config = request.app[CONFIG]
    body = await read_in_time(request, read_body(request, config.max_sdp_bytes))
    if ss.closing:  # DELETE / the watchdog closed it while the offer arrived
        raise _session_gone(ss)
    try:
        if body is None:
            raise SdpRejected(413, f"the SDP offer is larger than the limit of {config.max_sdp_bytes} bytes")
        result = await wait_for(negotiate(check_offer(body, config)), config.negotiation_timeout_s)
    except web.HTTPException:
        raise
    except Exception as e:
        if ss.closing or isinstance(e, SessionGone):  # negotiate() closed its pc (or close() did)
            raise _session_gone(ss) from None
        if isinstance(e, SdpRejected):
            raise api_error(e.status, str(e)) from None
        if isinstance(e, ViewersFull):
            raise api_error(409, str(e)) from None
        if isinstance(e, asyncio.TimeoutError):
            request.app[MANAGER].metrics.errors_total += 1
            raise api_error(504, f"WebRTC negotiation did not finish within {config.negotiation_timeout_s:g} s"
                            ) from None
        # aiortc: raw ValueError / AssertionError / OperationError on hostile offers
        log.info("session %s: offer rejected: %r", ss.id, e)
        raise api_error(400, f"the SDP offer cannot be negotiated: {_describe(e)}") from None
    if ss.closing:  # closed right after negotiate() returned: close() found this pc and closes it
        raise _session_gone(ss)
    return result


async def add_viewer(request: web.Request) -> web.Response:
    """WHEP-style: a watch-only peer connection of the session (an overlay beside the client that drives it)."""
    ss = authorize_session(request, allow_api_key=True)
    _no_input_to_renders(ss, "viewer (it is made as fast as the device allows, not in real time)")
    if request.content_type != "application/sdp":
        raise api_error(415, f"Content-Type {request.content_type!r}: send the SDP offer as application/sdp")
    if request.app[CONFIG].max_viewers <= 0:
        raise api_error(403, "this server allows no viewers besides a session's own peer (--max-viewers 0)")
    viewer_id, answer = await _answer_offer(request, ss, ss.add_viewer)
    ss.touch()
    return web.Response(status=201, text=answer, content_type="application/sdp",
                        headers={"Location": public_url(request, f"/v1/sessions/{ss.id}/viewers/{viewer_id}")})


async def delete_viewer(request: web.Request) -> web.Response:
    ss = authorize_session(request, allow_api_key=True)
    viewer_id = request.match_info["viewer_id"]
    if not ss.remove_viewer(viewer_id, "deleted by the client"):
        raise api_error(404, f"session {ss.id} has no viewer {viewer_id[:40]!r}", code="viewer_not_found")
    return web.Response(status=204)


def broadcast_allowed(url: str, prefixes: list[str]) -> bool:
    """`url` lies under one of `prefixes` (--broadcast-to): the same scheme, the same host (a prefix without one,
    `rtmp://`, allows any) and port (where the prefix names one), and a path under the prefix's."""
    u = urllib.parse.urlsplit(url)
    for prefix in prefixes:
        p = urllib.parse.urlsplit(prefix)
        if u.scheme.lower() != p.scheme.lower():
            continue
        if p.hostname and (u.hostname != p.hostname or p.port is not None and u.port != p.port):
            continue
        if u.path.startswith(p.path):
            return True
    return False


async def start_broadcast(request: web.Request) -> web.Response:
    """Stream the session live to a streaming server the operator allowed (--broadcast-to): an RTMP ingest (YouTube
    Live, Twitch, OBS), SRT or MPEG-TS. The session needs no viewer while it lasts."""
    ss = authorize_session(request, allow_api_key=True)
    _no_input_to_renders(ss, "live stream (it is made as fast as the device allows, not in real time)")
    allowed = request.app[CONFIG].broadcast_to
    if not allowed:
        raise api_error(403, "this server streams to no streaming server; start it with --broadcast-to PREFIX (such as "
                             "rtmp://a.rtmp.youtube.com/live2/) to allow the URLs under PREFIX")
    fields = await read_in_time(request, _read_fields(request, ("url", "bitrate_kbps", "reconnect_s", "captions")))
    url = fields.get("url")
    if not isinstance(url, str) or not url:
        raise api_error(422, "give `url`: the streaming server's ingest URL with its stream key, such as "
                             "rtmp://a.rtmp.youtube.com/live2/KEY")
    try:
        check_live_url(url)
    except InputError as e:
        raise api_error(422, str(e)) from None
    if not broadcast_allowed(url, allowed):
        raise api_error(403, f"'{redact_url(url)}' is not under a URL this server may stream to (--broadcast-to: "
                             f"{', '.join(map(redact_url, allowed))})")
    bitrate = _int_field(fields, "bitrate_kbps", 100, 20_000) or 0
    reconnect = _int_field(fields, "reconnect_s", 0, 3600)
    captions = _checked_field(fields, "captions", lambda v: _boolean(v, "`captions` (what is said, as CEA-608 in the "
                                                                       "video)"), True)
    try:
        broadcast = await ss.session.broadcast(url, bitrate_kbps=bitrate,
                                               captions=captions,
                                               **({"reconnect_s": reconnect} if reconnect is not None else {}))
    except SessionClosedError:
        raise _session_gone(ss, "its live stream connected") from None
    except InputError as e:  # streaming to that URL already, or to as many destinations as a session may
        raise api_error(409, str(e)) from None
    except OutputError as e:  # the streaming server cannot be reached
        raise api_error(502, str(e)) from None
    ss.touch()
    return web.json_response({"broadcast": broadcast.describe()}, status=201)


async def stop_broadcast(request: web.Request) -> web.Response:
    """End one live stream (DELETE .../broadcast/{broadcast_id}) or every one the session sends (.../broadcast)."""
    ss = authorize_session(request, allow_api_key=True)
    broadcast_id = request.match_info.get("broadcast_id")
    session = ss.session
    running = bool(session.broadcasts) if broadcast_id is None else broadcast_id in session.broadcasts
    if not running:
        ended = [b for b in session.ended_broadcasts if broadcast_id in (None, b.id)][-1:]
        failed = f" (it failed: {ended[0].error})" if ended and ended[0].error else ""
        what = f"live stream {broadcast_id[:40]!r}" if broadcast_id is not None else "live stream"
        raise api_error(404, f"session {ss.id} has no {what} running{failed}", code="broadcast_not_found")
    try:
        await session.stop_broadcast(broadcast_id)
    except OutputError as e:  # it failed while being stopped
        raise api_error(502, str(e)) from None
    return web.Response(status=204)


def _session_gone(ss: ServerSession, before: str = "its WebRTC negotiation finished") -> web.HTTPException:
    reason = ss.session.close_reason or "closed"
    return api_error(404, f"session {ss.id} was closed ({reason}) before {before}", code="session_not_found")


def _describe(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return text if len(text) <= 200 else text[:200] + "..."


# --------------------------------------------------------------------------------------------------
# Handler: the websocket
# --------------------------------------------------------------------------------------------------


async def websocket(request: web.Request) -> web.StreamResponse:
    """Binary = PCM16 LE audio in the current format; text = JSON control; events go out as JSON.

    A binary message that is not whole samples closes with 1003, one holding more than 1 s of audio
    with 1009 (the reason says which); any unusable text message gets an `error` event and the
    connection stays open.
    """
    ss = authorize_session(request)
    _no_input_to_renders(ss, "websocket (audio, say, interrupt)")
    ws = web.WebSocketResponse(max_msg_size=MAX_WS_MESSAGE, heartbeat=30.0)
    if not ws.can_prepare(request).ok:
        raise api_error(400, "this URL expects a websocket upgrade")
    await ws.prepare(request)
    if ss.closing:  # closed during the handshake: its close() did not see this socket, so nobody else would
        await close_ws(ws, 1000, f"session closed: {ss.session.close_reason or 'closed'}")
        return ws
    out, old = ss.attach_ws(ws)
    ss.audio_format, ss.audio_ahead = (ss.session.sample_rate, 1), False  # every websocket starts at 16 kHz mono, live
    ss.touch()
    try:
        if old is not None:
            await old.close(1000, "replaced by a newer websocket")
        rate, channels = ss.audio_format
        ss.send_json({"type": "ready", "session_id": ss.id, "sample_rate": rate, "channels": channels,
                      "audio_messages": ss.audio_messages,
                      "max_queued_seconds": ss.session.engine.config.max_pending_seconds,
                      "max_seconds_per_message": 1.0, "time": time.time()})
        async for msg in ws:
            if ss.closing:
                # its close() (a time limit, the operator, a shutdown) sends the `closed` event, then closes this socket
                # with the reason: returning now, aiohttp would close it first (1000, no reason), the event maybe unsent
                with contextlib.suppress(asyncio.TimeoutError):
                    await wait_for(ss.closed.wait(), 10.0)
                break
            ss.touch()
            if msg.type == WSMsgType.BINARY:
                problem = _on_audio(ss, msg.data)
                if problem is not None:
                    code, reason = problem
                    if code:
                        await out.close(code, reason)
                        break
                    ss.error_event(reason, "audio_rejected")
            elif msg.type == WSMsgType.TEXT:
                await _on_control(ss, msg.data)
            else:  # ERROR (e.g. a message over the transport cap: aiohttp closes with 1009)
                break
    except Exception:
        # A bug, not the client's doing. Escaping, it would reach the error middleware, which would write
        # an HTTP 500 into the upgraded socket; close it with 1011 instead (the session stays open).
        log.exception("session %s: websocket handler failed", ss.id)
        ss.manager.metrics.errors_total += 1
        await out.close(1011, "internal server error (see the server log); reconnect")
    finally:
        out.stop()
        if ss.out is out:
            ss.out, ss.ws_left_at = None, time.monotonic()
    return ws


def _on_audio(ss: ServerSession, data: bytes) -> tuple[int, str] | None:
    """Push one binary message; (close code or 0, reason) when it is refused."""
    rate, channels = ss.audio_format
    frame_bytes = 2 * channels
    if len(data) % frame_bytes:
        return 1003, f"binary messages are PCM16 LE: length must be a multiple of {frame_bytes} bytes"
    if len(data) > rate * frame_bytes:
        return 1009, f"a binary message holds at most 1 s of audio ({rate * frame_bytes} bytes)"
    pcm = None
    if data:
        pcm = np.frombuffer(data, dtype="<i2").astype(np.int16, copy=False)  # (n * channels,)
        pcm = pcm.reshape(-1, channels) if channels > 1 else pcm
    problem = ss.audio_message(pcm, rate)
    return None if problem is None else (0, problem)


async def _on_control(ss: ServerSession, text: str) -> None:
    if len(text) > MAX_CONTROL_MESSAGE:
        ss.error_event(f"control messages are at most {MAX_CONTROL_MESSAGE} characters", "bad_message")
        return
    try:
        message = json.loads(text)
    except ValueError as e:
        ss.error_event(f"control message is not JSON: {e}", "bad_message")
        return
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        ss.error_event('a control message is a JSON object with a string "type"', "bad_message")
        return
    kind = message["type"]
    try:
        if kind == "ping":
            ss.send_json({"type": "pong", "id": message.get("id"), "time": time.time()})
        elif kind == "end_of_speech":
            ss.end_of_speech()
        elif kind == "interrupt":
            ss.interrupt()
        elif kind == "say":
            ss.say(message)
        elif kind == "stop_recording":  # saved now; its recording_stopped event follows (or an error saying why not)
            try:
                await ss.session.stop_recording()
            except OutputError as e:
                ss.error_event(str(e), "recording")
        elif kind == "audio_format":
            rate, channels = message.get("sample_rate", 16000), message.get("channels", 1)
            ahead = message.get("ahead", False)
            # ints only: 2.0 == 2 would pass `in (1, 2)` and later break the reshape of every message
            if (not isinstance(rate, int) or isinstance(rate, bool) or not 8000 <= rate <= 96000
                    or not isinstance(channels, int) or isinstance(channels, bool) or channels not in (1, 2)
                    or not isinstance(ahead, bool)):
                ss.error_event("audio_format: sample_rate must be an integer 8000..96000, channels 1 or 2 and "
                                     "ahead true or false", "bad_message")
                return
            ss.audio_format, ss.audio_ahead = (rate, channels), ahead
            ss.send_json({"type": "audio_format", "sample_rate": rate, "channels": channels, "ahead": ahead})
        else:
            ss.error_event(f"unknown message type {kind[:40]!r}; expected audio_format, end_of_speech, "
                                 "interrupt, say, stop_recording or ping", "bad_message")
    except LetsTalkError as e:  # SessionClosedError and friends
        ss.error_event(str(e), "session")


# --------------------------------------------------------------------------------------------------
# The browser client
# --------------------------------------------------------------------------------------------------


def _static_page(name: str):
    async def handler(request: web.Request) -> web.StreamResponse:
        static = request.app[CONFIG].static_dir
        if static is None or not (static / name).is_file():
            raise api_error(404, "the browser client is not installed here (client_examples/browser)",
                            code="not_installed")
        return web.FileResponse(static / name, headers={"Cache-Control": "no-cache"})

    return handler


async def openapi(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(Path(__file__).parent / "openapi.yaml", headers={"Content-Type": "application/yaml"})


# --------------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------------


def _load_avatar_image(source) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source
    return decode_image(Path(source).read_bytes(), 100_000_000)


async def _on_startup(app: web.Application) -> None:
    engines, config = app[ENGINES], app[CONFIG]
    await engines.start()  # no-op for an engine the caller started
    try:
        espeak_exe()
    except SpeechUnavailable as e:  # the server runs; only `say` and GET /v1/voices answer with this
        log.warning("text to speech (say) is off: %s", e)
    if config.recordings_dir is not None:
        await asyncio.to_thread(config.recordings_dir.mkdir, parents=True, exist_ok=True)
    store = app[AVATARS]
    for avatar_id, source in config.avatars.items():
        try:
            image = await asyncio.to_thread(_load_avatar_image, source)
            portrait = await run_off_loop(engines.pipeline.prepare_portrait, image, config.detect_face)
        except (LetsTalkError, OSError) as e:
            log.warning("avatar %r is not available: %s", avatar_id, e)
            continue
        name = "Bundled portrait" if avatar_id == "default" else (
            Path(source).stem if not isinstance(source, np.ndarray) else avatar_id)
        store.add(Avatar(avatar_id, name, portrait))
    for kept in await asyncio.to_thread(store.stored):  # uploaded ones, kept under --avatar-dir
        if kept.id in store:
            log.warning("uploaded avatar %r is not loaded: --avatar configures that id", kept.id)
            continue
        try:
            image = await asyncio.to_thread(decode_image, kept.data, config.max_image_pixels, kept.background or WHITE)
            portrait = await run_off_loop(engines.pipeline.prepare_portrait, image, config.detect_face)
        except LetsTalkError as e:
            log.warning("uploaded avatar %r is not loaded: %s", kept.id, e)
            continue
        store.add(Avatar(kept.id, kept.name, portrait, uploaded=True, created_at=kept.created_at))
    if store.directory is not None:
        log.info("%d uploaded avatar(s) loaded from %s", store.uploaded, store.directory)
    app[MANAGER].start()


async def _on_cleanup(app: web.Application) -> None:
    await app[MANAGER].stop()
    if app[CONFIG].stop_engine_on_cleanup:
        await app[ENGINES].stop()


async def _say_version(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[VERSION_HEADER] = __version__  # every answer, errors, pages and websockets included


async def _on_shutdown(app: web.Application) -> None:
    await app[MANAGER].close_all("server stopping")


def create_app(engines: StreamEngine | EnginePool, config: ServerConfig | None = None) -> web.Application:
    """The aiohttp application around a (started or not) engine, or a pool of them (one per device): the sum of their
    max_sessions is the cap."""
    if isinstance(engines, StreamEngine):
        engines = EnginePool([engines])
    config = config or ServerConfig()
    middlewares = [error_middleware]
    if config.cors_origins:
        middlewares.insert(0, cors_middleware)
    if config.behind_proxy:
        middlewares.insert(0, forwarded_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=config.max_upload_bytes + 64 * 1024)
    app[ENGINES] = engines
    app[CONFIG] = config
    app[MANAGER] = SessionManager(engines, config)
    app[AVATARS] = AvatarStore(config.avatar_dir, config.max_avatars)
    app.on_response_prepare.append(_say_version)
    r = app.router
    r.add_get("/health", health)
    r.add_get("/health/live", health_live)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.yaml", openapi)
    r.add_get("/v1/avatars", list_avatars)
    r.add_post("/v1/avatars", create_avatar)
    r.add_get("/v1/avatars/{avatar_id}", get_avatar)
    r.add_delete("/v1/avatars/{avatar_id}", delete_avatar)
    r.add_get("/v1/voices", list_voices)
    r.add_post("/v1/sessions", create_session)
    r.add_get("/v1/sessions", list_sessions)
    r.add_get("/v1/sessions/{session_id}", get_session)
    r.add_delete("/v1/sessions/{session_id}", delete_session)
    r.add_post("/v1/sessions/{session_id}/token", renew_session_token)
    r.add_get("/v1/sessions/{session_id}/motion", get_motion)
    r.add_put("/v1/sessions/{session_id}/motion", put_motion)
    r.add_post("/v1/sessions/{session_id}/offer", offer)
    r.add_post("/v1/sessions/{session_id}/viewers", add_viewer)
    r.add_delete("/v1/sessions/{session_id}/viewers/{viewer_id}", delete_viewer)
    r.add_post("/v1/sessions/{session_id}/broadcast", start_broadcast)
    r.add_delete("/v1/sessions/{session_id}/broadcast", stop_broadcast)
    r.add_delete("/v1/sessions/{session_id}/broadcast/{broadcast_id}", stop_broadcast)
    r.add_get("/v1/sessions/{session_id}/ws", websocket)
    r.add_get("/v1/sessions/{session_id}/events", session_events)
    r.add_get("/v1/recordings", list_recordings)
    r.add_get("/v1/recordings/{recording_id}", get_recording)
    r.add_get("/v1/recordings/{recording_id}/captions", get_recording_captions)
    r.add_delete("/v1/recordings/{recording_id}", delete_recording)
    r.add_post("/v1/renders", create_render)
    r.add_get("/v1/renders", list_renders)
    r.add_get("/v1/renders/{render_id}", get_render)
    r.add_delete("/v1/renders/{render_id}", delete_render)
    r.add_get("/", _static_page("index.html"))
    r.add_get("/overlay", _static_page("overlay.html"))
    if config.static_dir is not None and config.static_dir.is_dir():
        r.add_static("/static/", config.static_dir, follow_symlinks=False)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    app.on_cleanup.append(_on_cleanup)
    return app


# --------------------------------------------------------------------------------------------------
# Command line: `letstalk serve` / `python -m letstalk_rt.server`
# --------------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    api_key = args.api_key or (os.environ.get("LETSTALK_API_KEY") if args.api_key_file is None else None) or None
    keyed = bool(api_key or args.api_key_file)
    if not _is_loopback(args.host) and not keyed and not args.insecure_no_auth:
        raise LetsTalkError(f"refusing to listen on {args.host} without authentication: set --api-key "
                            "(or LETSTALK_API_KEY, or --api-key-file), or pass --insecure-no-auth to allow it")
    if args.behind_proxy and not keyed and not args.insecure_no_auth:  # a proxy's clients reach a loopback bind
        raise LetsTalkError("refusing to serve behind a proxy without authentication (its clients reach this server "
                            "however it listens): set --api-key (or LETSTALK_API_KEY, or --api-key-file), or pass "
                            "--insecure-no-auth")
    if not (math.isfinite(args.max_session_minutes) and args.max_session_minutes >= 0):
        raise LetsTalkError(f"--max-session-minutes {args.max_session_minutes:g}: give minutes > 0, or 0 for no limit")
    for url in args.webhook:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise LetsTalkError(f"--webhook {url!r}: give an http(s) URL, e.g. https://api.example.com/letstalk-events")
    if not (math.isfinite(args.hung_seconds) and args.hung_seconds > 0):
        raise LetsTalkError(f"--hung-seconds {args.hung_seconds:g}: give seconds > 0 (a window takes well under one; "
                            "the default is 120)")
    if not (math.isfinite(args.drain_seconds) and args.drain_seconds >= 0):
        raise LetsTalkError(f"--drain-seconds {args.drain_seconds:g}: give seconds > 0, or 0 to close sessions at once")
    for name, value in (("--idle-timeout", args.idle_timeout), ("--max-upload-mb", args.max_upload_mb),
                        ("--upload-timeout", args.upload_timeout), ("--turn-ttl", args.turn_ttl)):
        if not value > 0:
            raise LetsTalkError(f"{name} must be positive, got {value}")
    if not 0 <= args.max_full_frame <= MAX_PHOTO_SIDE:
        raise LetsTalkError(f"--max-full-frame must be 0 (no whole-photo frames) .. {MAX_PHOTO_SIDE}, "
                            f"got {args.max_full_frame}")
    if args.max_sessions is not None and args.max_sessions < 1:
        raise LetsTalkError(f"--max-sessions must be at least 1, got {args.max_sessions}")
    if args.max_viewers < 0:
        raise LetsTalkError(f"--max-viewers must be 0 (none) or more, got {args.max_viewers}")
    if args.max_avatars < 0:
        raise LetsTalkError(f"--max-avatars must be 0 (no uploads) or more, got {args.max_avatars}")
    if args.recordings_dir is not None:
        try:
            args.recordings_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LetsTalkError(f"--recordings-dir {args.recordings_dir}: cannot create it ({e.strerror or e})") from None
        if not os.access(args.recordings_dir, os.W_OK | os.X_OK):
            raise LetsTalkError(f"--recordings-dir {args.recordings_dir}: not writable; choose another folder")
    for name, value in (("--recordings-keep-hours", args.recordings_keep_hours),
                        ("--recordings-max-gb", args.recordings_max_gb)):
        if not (math.isfinite(value) and value >= 0):
            raise LetsTalkError(f"{name} must be 0 (no limit) or more, got {value}")
        if value and args.recordings_dir is None:
            raise LetsTalkError(f"{name} limits the recordings kept under --recordings-dir; give that folder too")
    for origin in args.cors_origin:
        parsed = urllib.parse.urlsplit(origin)
        if origin != "*" and (parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path
                              or parsed.query or origin.endswith("/")):
            raise LetsTalkError(f"--cors-origin {origin!r}: give an origin like https://app.example.com (scheme, host "
                                "and port if not the default; no path), or *")
    for prefix in args.broadcast_to:
        parts = urllib.parse.urlsplit(prefix)
        if parts.scheme.lower() not in LIVE_FORMATS or not prefix.startswith(f"{parts.scheme}://") or parts.query:
            raise LetsTalkError(f"--broadcast-to {redact_url(prefix)!r}: give a streaming URL prefix such as "
                                "rtmp://a.rtmp.youtube.com/live2/ or srt://HOST:PORT, or a scheme alone (rtmp://)")
    if args.instance_id and not re.fullmatch(r"[A-Za-z0-9]{1,16}", args.instance_id):
        raise LetsTalkError(f"--instance-id {args.instance_id!r}: give 1-16 letters and digits (it starts each "
                            "session's id, before a '-')")
    avatars: dict[str, str | Path] = {"default": ServerConfig().avatars["default"]}
    for spec in args.avatar:
        avatar_id, sep, path = spec.partition("=")
        if not sep or not AVATAR_ID.fullmatch(avatar_id) or not path:
            raise LetsTalkError(f"--avatar {spec!r}: give ID=IMAGE, the ID 1-64 letters, digits, '-' or '_'")
        if not Path(path).is_file():
            raise LetsTalkError(f"--avatar {avatar_id}: no such file {path!r}")
        avatars[avatar_id] = Path(path)
    return ServerConfig(
        host=args.host, port=args.port, api_key=api_key, api_key_file=args.api_key_file, tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        behind_proxy=args.behind_proxy, instance_id=args.instance_id,
        token_secret=args.token_secret or os.environ.get("LETSTALK_TOKEN_SECRET") or None, token_ttl_s=args.token_ttl,
        idle_timeout_s=args.idle_timeout, max_upload_mb=args.max_upload_mb, upload_timeout_s=args.upload_timeout,
        ice_servers=list(args.ice_server), turn_ttl_s=args.turn_ttl, turn_username=args.turn_username,
        turn_secret=args.turn_secret or os.environ.get("LETSTALK_TURN_SECRET") or None,
        turn_credential=args.turn_credential or os.environ.get("LETSTALK_TURN_CREDENTIAL") or None,
        max_full_frame=args.max_full_frame, avatars=avatars, avatar_dir=args.avatar_dir, max_avatars=args.max_avatars,
        recordings_dir=args.recordings_dir, recordings_keep_s=args.recordings_keep_hours * 3600,
        recordings_max_bytes=int(args.recordings_max_gb * 1e9), cors_origins=list(args.cors_origin),
        max_session_s=args.max_session_minutes * 60, drain_s=args.drain_seconds, webhooks=list(args.webhook),
        max_viewers=args.max_viewers, broadcast_to=list(args.broadcast_to), render_queue=args.render_queue,
        webhook_secret=args.webhook_secret or os.environ.get("LETSTALK_WEBHOOK_SECRET") or None,
        detect_face=not args.no_face_detect, stop_engine_on_cleanup=True,
    )


def _build_engines(args: argparse.Namespace) -> EnginePool:
    """One engine per --device, each with its own copy of the model; --max-sessions is each one's cap."""
    from letstalk_rt.pipeline import LetsTalkPipeline
    from letstalk_rt.stream import EngineConfig

    devices = resolve_devices(args.device)
    check_sampling_args(args)
    check_live_args(args)
    defaults = EngineConfig()
    cap = args.max_sessions or defaults.max_sessions
    engines = []
    for i, device in enumerate(devices):
        pipe = LetsTalkPipeline.from_pretrained(args.model, **pipeline_kwargs(args, device))
        config = EngineConfig(max_sessions=cap, max_batch=min(cap, defaults.max_batch), warmup=not args.no_warmup,
                              hung_after_s=args.hung_seconds, **live_config(args))
        if i:  # handing freed memory back is the process's, not a device's: the first engine does it for all
            config = dataclasses.replace(config, trim_heap_every_s=0)
        engines.append(StreamEngine(pipe, config))
    if not engines[0].pipeline.config.trained:
        say("this model is UNTRAINED (random weights): the avatar will not look like a talking face. "
            + engines[0].pipeline.config.description, logging.WARNING)
    return EnginePool(engines)


async def _serve(app: web.Application, config: ServerConfig, ssl_context: ssl.SSLContext | None = None) -> None:
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()  # on_startup: engine warm-up, avatars
    try:
        site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as e:
            raise LetsTalkError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
        engines = app[ENGINES]
        port = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else config.port
        auth = ("API key" if config.current_api_key() else "none (loopback)" if _is_loopback(config.host)
                else "NONE (insecure)")
        on = ", ".join(str(e.pipeline.device) for e in engines.engines)
        scheme = "https" if ssl_context else "http"
        say(f"{scheme}://{config.host}:{port}/  (max {engines.max_sessions} sessions on {on}, "
            f"{engines.pipeline.config.image_size}px @ {engines.pipeline.fps} fps, auth: {auth}); Ctrl-C to stop")
        if config.tls is not None:
            said, alarming = config.tls.describe_expiry()
            say(f"TLS certificate {config.tls.cert}: {said}; a renewed one is served as soon as its files change (or "
                "on SIGHUP)", logging.WARNING if alarming else logging.INFO)
        if config.ice_servers:
            turn = (f"TURN credentials made per session, valid {config.turn_ttl_s:g} s" if config.turn_secret
                    else "fixed TURN credentials" if config.turn_username else "no TURN")
            say(f"ICE servers {', '.join(config.ice_servers)} ({turn}), handed to every session's client")
        bridged = [] if _is_loopback(config.host) else bridged_host_addresses(config.ice_servers)
        if bridged:
            say(f"this container's addresses ({', '.join(bridged)}) are a bridge network's: clients on other "
                "machines load the pages but their WebRTC media never connects. Run it with --network host, or give "
                "it a TURN relay (--ice-server turn:HOST:PORT, LETSTALK_TURN_SECRET; docs/server.md, \"In a "
                "container\")", logging.WARNING)
        signals: asyncio.Queue[int] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        # SIGINT/SIGTERM stop it (gently with --drain-seconds); SIGHUP (not on Windows) is a daemon's reload, not its
        # end (the default): a renewed certificate, a rotated API key file. A loop that takes no signal handlers
        # (Windows' own: NotImplementedError; one outside the main thread, an application's or a test's:
        # RuntimeError) keeps the defaults: Ctrl-C still ends it, as KeyboardInterrupt.
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, signals.put_nowait, sig)
        if hasattr(signal, "SIGHUP"):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, config.reload_files)
        await signals.get()
        manager = app[MANAGER]
        if config.drain_s > 0 and manager.sessions:
            say(f"draining: no new sessions; {len(manager.sessions)} open one(s) go on for up to {config.drain_s:g} "
                "s (send the signal again to stop now) ...")
            drained = asyncio.ensure_future(manager.drain(config.drain_s))
            again = asyncio.ensure_future(signals.get())
            await asyncio.wait({drained, again}, return_when=asyncio.FIRST_COMPLETED)
            again.cancel()
            drained.cancel()
        say("stopping (closing sessions) ...")
    finally:
        await runner.cleanup()


def serve_main(args: argparse.Namespace) -> None:
    """Run the server until SIGINT/SIGTERM; user-fixable problems raise LetsTalkError (one line; in a JSON log, one
    record, then exit status 2)."""
    logs.configure(args.log_format)
    try:
        config = config_from_args(args)  # refuse an unauthenticated public bind before loading anything
        ssl_context = config.ssl_context()  # a certificate or key that cannot be used: said before the model loads too
        engines = _build_engines(args)
        asyncio.run(_serve(create_app(engines, config), config, ssl_context))
    except LetsTalkError as e:
        if args.log_format != "json":
            raise
        say(str(e), logging.ERROR)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m letstalk_rt.server", description="letstalk-rt HTTP/WebRTC server")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        serve_main(args)
    except LetsTalkError as e:
        print(f"letstalk serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = ["ServerConfig", "add_serve_arguments", "create_app", "main", "serve_main"]
