"""`letstalk serve`'s options: its command line and `ServerConfig`, without the server's own imports (the engine, and
with it torch: the CLI builds every command's parser at start, and one that runs no model, `letstalk camera --server`
say, must not load torch for it). The server itself is `app`."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from letstalk_rt.cli import ASSETS
from letstalk_rt.errors import LetsTalkError
from letstalk_rt.rtc import ice_servers

from .auth import KeyFile, turn_credentials
from .avatars import DEFAULT_MAX_AVATARS
from .logs import FORMATS

log = logging.getLogger("letstalk.server")

# This package is the checkout's server/, installed as letstalk_rt.server (pyproject.toml): no top-level `server`
# module in site-packages for another distribution's to clash with
HERE = Path(__file__).resolve().parent
BUNDLED_PORTRAIT = ASSETS / "portrait.png"
# The browser client: in a checkout (an editable install) client_examples/browser; installed from a wheel, the same
# files as letstalk_rt/server/browser (pyproject.toml)
BROWSER_CLIENT = next((d for d in (HERE.parent / "client_examples" / "browser", HERE / "browser") if d.is_dir()), None)


@dataclass
class ServerConfig:
    """Everything the HTTP layer needs; the admission cap is the engine's `EngineConfig.max_sessions`."""

    host: str = "127.0.0.1"  # loopback by default: exposing the server is a decision (see --insecure-no-auth)
    port: int = 8080
    tls_cert: Path | None = None  # serve HTTPS (and wss) with this certificate chain (PEM) and ...
    tls_key: Path | None = None  # ... its private key (PEM); None: plain HTTP (behind a TLS proxy, or on loopback)
    behind_proxy: bool = False  # URLs in answers from the proxy's Forwarded / X-Forwarded-Proto/-Host/-Prefix
    # session (and render) ids start "ID-": a balancer in front of several servers routes each session's requests to
    # the one that holds it by that prefix (docs/server.md, "Several machines"); "": plain ids
    instance_id: str = ""
    api_key: str | None = None  # required as `Authorization: Bearer KEY` to list avatars and create sessions
    api_key_file: Path | None = None  # ... or kept in this file, read again when it changes (auth.KeyFile)
    token_secret: str | None = None  # HMAC secret of session tokens; random per start when None
    token_ttl_s: float = 3600.0  # a session's or render's token is accepted this long after it was given (renewable)
    idle_timeout_s: float = 60.0  # no audio, no websocket message, no media pulled for this long: closed
    peer_timeout_s: float = 6.0  # a connected peer silent this long (no RTCP, no RTP) is gone: closed
    peer_replace_s: float = 2.0  # a new offer replaces a peer connection whose peer was silent this long (a client
    # whose network changed reconnects); one whose peer was heard since is kept (409)
    ws_grace_s: float = 3.0  # a session without a peer connection whose websocket left: closed after this
    max_upload_mb: float = 10.0  # portrait upload limit (HTTP 413 above)
    upload_timeout_s: float = 30.0  # a request body (upload, SDP offer) not all there after this: 408
    max_image_pixels: int = 40_000_000  # decoded portrait size limit: no decompression bombs
    max_full_frame: int = 720  # the largest `full_frame` (whole-photo frames' longest side) a session may ask for
    max_sdp_bytes: int = 64 * 1024  # an SDP offer is a few kB; more is refused (413)
    max_media_sections: int = 3  # audio + video (+ an ignored data channel)
    negotiation_timeout_s: float = 10.0  # setRemoteDescription + answer + ICE gathering, all together
    pc_close_timeout_s: float = 5.0  # `RTCPeerConnection.close()` can hang; give up waiting after this
    ws_send_timeout_s: float = 5.0  # a websocket that does not take a message for this long is closed (Outbox)
    retry_after_s: int = 5  # `Retry-After` of a 503 when the engine is full
    render_queue: int = 16  # renders asked with `queue` that may wait for a session slot (each holds its speech)
    watch_interval_s: float = 1.0  # how often the watchdog looks at every session
    ice_servers: list[str] = field(default_factory=list)  # STUN/TURN URLs; none by default (LAN / localhost)
    turn_username: str | None = None  # long-term credentials of the TURN URLs in ice_servers, the same for every
    turn_credential: str | None = None  # session; or, better:
    turn_secret: str | None = None  # the secret shared with the TURN server: time-limited credentials per session
    turn_ttl_s: float = 86400.0  # how long a session's TURN credentials hold (the relay is refused after it)
    avatars: dict[str, str | Path] = field(default_factory=lambda: {"default": BUNDLED_PORTRAIT})  # configured
    avatar_dir: Path | None = None  # where uploaded avatars (POST /v1/avatars) are kept; None: in memory only
    max_avatars: int = DEFAULT_MAX_AVATARS  # uploaded avatars held at once (409 past them)
    max_session_s: float = 0.0  # a session is closed this long after it was created (0: no limit)
    session_end_warning_s: float = 60.0  # ... its websocket and event streams told `session_ending` this long before
    max_viewers: int = 4  # watch-only peer connections a session may have besides its own (POST .../viewers)
    broadcast_to: list[str] = field(default_factory=list)  # URL prefixes sessions may stream live to (none: no broadcasts)
    drain_s: float = 0.0  # on SIGTERM/SIGINT: refuse new sessions and let open ones go on this long before closing them
    webhooks: list[str] = field(default_factory=list)  # URLs told what happens to sessions (webhooks.py)
    webhook_secret: str | None = None  # signs each webhook (HMAC-SHA256)
    recordings_dir: Path | None = None  # sessions created with `record` saved here as SESSION_ID.mp4; None: not recorded
    recordings_keep_s: float = 0.0  # saved recordings older than this are deleted (0: kept until deleted)
    recordings_max_bytes: int = 0  # the oldest deleted while the saved MP4s hold more, the newest kept (0: no limit)
    recordings_prune_every_s: float = 60.0  # how often the limits are applied (and after each recording saved)
    cors_origins: list[str] = field(default_factory=list)  # web pages of these origins may call the API ("*": any)
    detect_face: bool = True  # crop uploaded portraits to the detected face (422 when there is none)
    static_dir: Path | None = BROWSER_CLIENT  # the browser client, served at /
    stop_engine_on_cleanup: bool = False  # serve_main owns its engine; tests own theirs

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def __post_init__(self) -> None:
        if self.api_key and self.api_key_file:
            raise LetsTalkError("give the API key either as --api-key (or LETSTALK_API_KEY) or as --api-key-file, not "
                                "both")
        self._key_file = KeyFile(self.api_key_file) if self.api_key_file else None
        self._tls: CertificateFiles | None = None
        if self.render_queue < 0:
            raise LetsTalkError(f"--render-queue {self.render_queue}: give 0 (no queue) or more")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise LetsTalkError("give --tls-cert and --tls-key together: the certificate (chain, PEM) and its private "
                                "key (PEM)")
        if not self.token_ttl_s >= 1:  # (a token's expiry is in whole seconds)
            raise LetsTalkError(f"--token-ttl {self.token_ttl_s:g}: give 1 second or more; the default is 3600")
        if not 0 <= self.port <= 65535:  # (0: any free port) said before the model loads, not by bind() after it
            raise LetsTalkError(f"--port {self.port}: a TCP port is 0-65535 (0: any free one); the default is 8080")
        if self.turn_secret and (self.turn_username or self.turn_credential):
            raise LetsTalkError("give the TURN server either a shared secret or a username and credential, not both")
        try:
            self.session_ice_servers("check", now=0.0)
        except ValueError as e:
            raise LetsTalkError(f"{e}: pass --turn-secret (the TURN server's static-auth-secret) or "
                                "--turn-username and --turn-credential") from None

    def current_api_key(self) -> str | None:
        """The API key (or keys, comma-separated) required now: --api-key's, or --api-key-file's as it is now."""
        return self._key_file.current() if self._key_file is not None else self.api_key

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context HTTPS is served with (--tls-cert, --tls-key), None for plain HTTP; a certificate or key that
        cannot be read, or that do not go together, raises LetsTalkError saying which. Made once: it serves the
        certificate its files hold as of each handshake (`CertificateFiles`)."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        if self._tls is None:
            self._tls = CertificateFiles(self.tls_cert, self.tls_key)
        return self._tls.served

    @property
    def tls(self) -> CertificateFiles | None:
        """The certificate served, once `ssl_context` made it (its expiry: /metrics)."""
        return self._tls

    def reload_files(self) -> None:
        """Read the files the server keeps watching again now (SIGHUP): the TLS certificate and the API key file, each
        kept as it was where the files cannot be used."""
        log.info("SIGHUP: reading the TLS certificate and the API key file again")
        if self._key_file is not None:
            self._key_file.current(force=True)
        if self._tls is not None:
            self._tls.check(force=True)

    def session_ice_servers(self, session_id: str, now: float | None = None) -> list[dict]:
        """The STUN/TURN servers of one session, as W3C RTCIceServer dicts: the server's peer connection and the
        client's use the same. TURN URLs carry the configured credentials, or ones made from `turn_secret` for
        this session, valid for `turn_ttl_s`."""
        turn = [u for u in self.ice_servers if u.startswith("turn")]
        servers: list[str | dict] = [u for u in self.ice_servers if not u.startswith("turn")]
        if turn:
            username, credential = self.turn_username, self.turn_credential
            if self.turn_secret:
                username, credential = turn_credentials(self.turn_secret, session_id, self.turn_ttl_s, now)
            servers.append({"urls": turn, "username": username, "credential": credential})
        return ice_servers(servers)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from letstalk_rt.cli import add_device_args, add_live_args, add_sampling_args  # (the CLI imports this module)

    d = ServerConfig()
    parser.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    parser.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port})")
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the bundled model)")
    add_device_args(parser, several=True)
    add_sampling_args(parser)
    add_live_args(parser)
    parser.add_argument("--max-sessions", type=int, default=None,
                        help="admission cap: concurrent sessions on each device (default 8; measure with `letstalk "
                             "bench`)")
    parser.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                        help="serve HTTPS and wss with this certificate (chain, PEM), with --tls-key: what a browser "
                             "on another machine needs to give the page its microphone (default: plain HTTP); a "
                             "renewed certificate is served as soon as the files change, or on SIGHUP")
    parser.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument("--behind-proxy", action="store_true",
                        help="behind a TLS proxy (Caddy, nginx, a load balancer) that sets Forwarded or "
                             "X-Forwarded-Proto/-Host (and -Prefix): the URLs in the answers (ws_url, status_url, ...) "
                             "name the proxy's scheme, host and path, not this server's")
    parser.add_argument("--instance-id", default=d.instance_id, metavar="NAME",
                        help="start every session's id with NAME- (1-16 letters and digits), so that a load balancer "
                             "in front of several servers sends each session's requests to the server that holds it "
                             "(docs/server.md, 'Several machines')")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' to create sessions (default: env LETSTALK_API_KEY); "
                             "several, comma-separated, are each accepted (rotating a key: OLD,NEW)")
    parser.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                        help="the API key kept in a file (a Docker or Kubernetes secret), read again when it changes: "
                             "rotate a key by writing OLD,NEW, then NEW, with no restart")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="allow listening on a non-loopback address without an API key")
    parser.add_argument("--token-secret", default=None,
                        help="HMAC secret of session tokens (default: env LETSTALK_TOKEN_SECRET, else random per start)")
    parser.add_argument("--token-ttl", type=float, default=d.token_ttl_s, metavar="S",
                        help="how long a session's or render's token holds (default %(default)g); the SDK and the page "
                             "renew a session's while it is open (POST /v1/sessions/{id}/token)")
    parser.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s,
                        help=f"close sessions idle this many seconds (default {d.idle_timeout_s:g})")
    parser.add_argument("--max-upload-mb", type=float, default=d.max_upload_mb,
                        help=f"portrait upload limit in MB (default {d.max_upload_mb:g})")
    parser.add_argument("--upload-timeout", type=float, default=d.upload_timeout_s,
                        help="seconds a request body (portrait upload, SDP offer) may take to arrive; 408 after "
                             f"(default {d.upload_timeout_s:g})")
    parser.add_argument("--ice-server", action="append", default=[], metavar="URL",
                        help="STUN/TURN server for WebRTC, e.g. stun:stun.example.org:3478 or "
                             "turn:turn.example.org:3478 (repeatable; default none). Sessions hand them to their "
                             "clients (browser and SDK) with the TURN credentials")
    parser.add_argument("--turn-secret", default=None,
                        help="the TURN server's shared secret (coturn: use-auth-secret, static-auth-secret): each "
                             "session gets credentials of its own that expire (default: env LETSTALK_TURN_SECRET)")
    parser.add_argument("--turn-ttl", type=float, default=d.turn_ttl_s, metavar="S",
                        help=f"how long a session's TURN credentials from --turn-secret hold (default "
                             f"{d.turn_ttl_s:g})")
    parser.add_argument("--turn-username", default=None, help="a fixed TURN username, for every session")
    parser.add_argument("--turn-credential", default=None,
                        help="the fixed TURN username's password (default: env LETSTALK_TURN_CREDENTIAL)")
    parser.add_argument("--avatar", action="append", default=[], metavar="ID=IMAGE",
                        help="preload a portrait as avatar ID (repeatable): sessions open on it by `avatar_id` with no "
                             "upload and no preparation (the bundled portrait is `default`)")
    parser.add_argument("--avatar-dir", type=Path, default=None, metavar="DIR",
                        help="keep avatars uploaded through POST /v1/avatars in DIR, loaded again at start (default: "
                             "in memory only, gone when the server stops)")
    parser.add_argument("--max-avatars", type=int, default=d.max_avatars, metavar="N",
                        help=f"how many uploaded avatars the server holds (default {d.max_avatars}; each keeps its "
                             "photo, up to ~5 MB, in memory)")
    parser.add_argument("--max-session-minutes", type=float, default=0.0, metavar="M",
                        help="close every session M minutes after it was created, its websocket told "
                             "`session_ending` a minute before (default 0: no limit)")
    parser.add_argument("--webhook", action="append", default=[], metavar="URL",
                        help="POST what happens to sessions to URL as JSON (session.created, session.closed, "
                             "recording.saved, recording.failed, broadcast.stopped; repeatable; docs/server.md, "
                             "'Webhooks')")
    parser.add_argument("--webhook-secret", default=None,
                        help="sign each webhook (X-Letstalk-Signature: HMAC-SHA256 of 'timestamp.body') with this "
                             "secret (default: env LETSTALK_WEBHOOK_SECRET, else unsigned)")
    parser.add_argument("--max-viewers", type=int, default=d.max_viewers, metavar="N",
                        help="watch-only peer connections a session may have besides its own (POST "
                             "/v1/sessions/{id}/viewers: an OBS overlay beside the app that drives the session); each "
                             f"costs the server one more video and audio encode (default {d.max_viewers}; 0: none)")
    parser.add_argument("--broadcast-to", action="append", default=[], metavar="PREFIX",
                        help="let sessions stream live to URLs under PREFIX (POST /v1/sessions/{id}/broadcast; "
                             "repeatable): an RTMP ingest such as rtmp://a.rtmp.youtube.com/live2/ or "
                             "rtmp://live.twitch.tv/app/, srt://HOST:PORT, udp:// or tcp://; a scheme alone "
                             "(rtmp://) allows any host (default: none)")
    parser.add_argument("--drain-seconds", type=float, default=0.0, metavar="S",
                        help="on SIGTERM or Ctrl-C, shut down gently: refuse new sessions (503; /health answers "
                             "503 'draining'), tell the open ones `session_ending` and let them go on until they end "
                             "or S seconds pass; a second signal stops at once (default 0: close them at once)")
    parser.add_argument("--log-format", choices=FORMATS, default="text",
                        help="the log on stderr: lines for a terminal (default), or json: one JSON object a line "
                             "(time, level, logger, message, session_id or render_id, exception) for a log collector")
    parser.add_argument("--hung-seconds", type=float, default=120.0, metavar="S",
                        help="an engine whose window has run S seconds is taken for hung (a GPU or driver that stopped "
                             "answering): said in the log, /health/live answers 503 (an orchestrator's liveness probe "
                             "restarts the server), new sessions go to another device (default 120; a window takes "
                             "well under a second)")
    parser.add_argument("--recordings-dir", type=Path, default=None, metavar="DIR",
                        help="let sessions ask to be recorded (`record`): each saved as DIR/SESSION_ID.mp4 when it "
                             "ends, served at /v1/recordings/SESSION_ID (default: no recording)")
    parser.add_argument("--render-queue", type=int, default=d.render_queue, metavar="N",
                        help="with --recordings-dir: how many renders (POST /v1/renders with `queue`) may wait for a "
                             "session slot when every one is in use, each holding its speech in memory (up to ~230 MB "
                             f"for an hour of audio), first come first served (default {d.render_queue}; 0: refuse "
                             "them, 503)")
    parser.add_argument("--recordings-keep-hours", type=float, default=0.0, metavar="H",
                        help="with --recordings-dir: delete saved recordings H hours after they were saved (default "
                             "0: kept until deleted)")
    parser.add_argument("--recordings-max-gb", type=float, default=0.0, metavar="G",
                        help="with --recordings-dir: when the saved recordings hold more than G GB, delete the oldest "
                             "until they fit, never the newest (default 0: no limit)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let web pages of ORIGIN (e.g. https://app.example.com; repeatable; * for any) call this "
                             "server's API from the browser (default: only the pages it serves itself)")
    parser.add_argument("--no-face-detect", action="store_true",
                        help="centre-crop uploaded portraits instead of detecting the face")
    parser.add_argument("--max-full-frame", type=int, default=d.max_full_frame, metavar="PX",
                        help="the largest `full_frame` a session may ask for: the longest side of whole-photo frames, "
                             "which cost the server's video encoder in proportion to their area; 0: none "
                             f"(default {d.max_full_frame})")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up forward pass at start")


class CertificateFiles:
    """The TLS certificate HTTPS is served with (--tls-cert, --tls-key), read again when either file changes (its time,
    size or inode: certbot's renewal points the links under live/ at new files, Kubernetes swaps a secret's), at most
    once every CHECK_EVERY_S, at the next handshake, and at once on SIGHUP (`letstalk serve`, `reload_files`): a
    renewed certificate is served from the next connection on, with no restart and no session lost. Files that cannot
    be used (written half way: a new certificate beside the old key) leave the last certificate served, with a warning.

    The server listens with one context (`served`) whose SNI callback, which OpenSSL calls in every handshake, with or
    without a server name, hands the handshake over to the context of the files as they are now (`current`)."""

    CHECK_EVERY_S = 10.0
    EXPIRING_S = 14 * 86400.0  # a certificate this close to its end is warned of (a renewal that is not happening)

    def __init__(self, cert: str | Path, key: str | Path) -> None:
        self.cert, self.key = Path(cert), Path(key)
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key)):
            if not path.is_file():
                raise LetsTalkError(f"{flag} {path}: no such file")
        self._stamp = self._stamp_of()
        self.current = self._load()
        self.served = self.current
        self.served.sni_callback = self._handshake
        self.expires_at = self._expiry()
        self._refused: tuple | None = None  # the files as they were when they could not be used (warned once)
        self._checked = time.monotonic()

    def _stamp_of(self) -> tuple:
        return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in map(os.stat, (self.cert, self.key)))

    def _load(self) -> ssl.SSLContext:
        def no_pass_phrase():  # (else OpenSSL asks for it on the terminal, and a reload would wait there for good)
            raise LetsTalkError(f"--tls-key {self.key}: the key is encrypted with a pass phrase, which a server that "
                                "reads it again by itself cannot type: give it decrypted (openssl pkey -in "
                                f"{self.key} -out key.pem), readable only by the server's user")

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.cert, self.key, password=no_pass_phrase)
        except ssl.SSLError as e:
            raise LetsTalkError(f"--tls-cert {self.cert} / --tls-key {self.key}: cannot be used "
                                f"({e.reason or e}): give the certificate chain and its private key, both PEM (a Let's "
                                "Encrypt fullchain.pem and privkey.pem)") from None
        except OSError as e:
            raise LetsTalkError(f"--tls-cert {self.cert} / --tls-key {self.key}: cannot be read "
                                f"({e.strerror or e})") from None
        return context

    def _expiry(self) -> float | None:
        """When the certificate (the chain's first) expires, seconds since the epoch; None where it cannot be read."""
        from cryptography import x509  # (aiortc's dependency)

        try:
            cert = x509.load_pem_x509_certificate(self.cert.read_bytes())
        except (OSError, ValueError):
            return None
        ends = getattr(cert, "not_valid_after_utc", None)  # (cryptography 42; before, a naive UTC time)
        return (ends or cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)).timestamp()

    def describe_expiry(self, now: float | None = None) -> tuple[str, bool]:
        """("valid until ..." or "EXPIRED on ...", True where that needs the operator: expired or expiring soon)."""
        if self.expires_at is None:
            return "its expiry unknown", False
        left = self.expires_at - (time.time() if now is None else now)
        when = datetime.datetime.fromtimestamp(self.expires_at, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        if left <= 0:
            return f"EXPIRED on {when}: browsers and the SDK refuse it; renew it (SIGHUP reads it at once)", True
        return f"valid until {when} ({left / 86400:.1f} days)", left < self.EXPIRING_S

    def check(self, force: bool = False) -> bool:
        """Read the files again if they changed (`force`: whatever the time since the last look); True when a new
        certificate is served from now on."""
        now = time.monotonic()
        if not force and now - self._checked < self.CHECK_EVERY_S:
            return False
        self._checked = now
        try:
            stamp = self._stamp_of()
        except OSError:  # being replaced: the last certificate holds
            return False
        if stamp == self._stamp or (stamp == self._refused and not force):
            if force:
                log.info("TLS certificate %s: unchanged", self.cert)
            return False
        try:
            context = self._load()
        except LetsTalkError as e:
            if stamp != self._refused:
                log.warning("%s; the certificate read before is still served", e)
            self._refused = stamp
            return False
        self.current, self._stamp, self._refused = context, stamp, None
        self.expires_at = self._expiry()
        said, alarming = self.describe_expiry()
        log.log(logging.WARNING if alarming else logging.INFO,
                "TLS certificate %s read again, served from the next connection on: %s", self.cert, said)
        return True

    def _handshake(self, ssl_object, server_name, context) -> None:
        """The SNI callback (every handshake): serve the files' certificate as of now."""
        try:
            self.check()
        except Exception:  # a handshake never fails for it: the last certificate is served
            log.exception("TLS certificate %s: reading it again failed", self.cert)
        if ssl_object.context is not self.current:
            ssl_object.context = self.current
