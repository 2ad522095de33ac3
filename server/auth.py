"""Session tokens and the API key: HMAC-SHA256 signed, JWT-shaped, checked in constant time; and each session's
TURN credentials (`turn_credentials`).

    token = base64url(header) "." base64url(payload) "." base64url(HMAC-SHA256(secret, header "." payload))
    header  = {"alg": "HS256", "typ": "JWT"}
    payload = {"sid": session id, "iat": issued at, "exp": expiry (seconds since the epoch)}

A token grants one session (its `sid`) until `exp`; the server checks that the session in the URL is
the one the token names. The secret is random per server start unless one is given (then tokens stay
valid across restarts and across workers that share it). No PyJWT: the format is small enough to write
out, and only HS256 is ever accepted (a token naming another algorithm, "none" included, is refused).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from letstalk_rt.errors import LetsTalkError

log = logging.getLogger("letstalk.server")

_HEADER = {"alg": "HS256", "typ": "JWT"}
MAX_TOKEN_CHARS = 2048  # far above a real token; anything longer is refused before any work


class TokenError(Exception):
    """The token is missing, malformed, forged, for another session, or expired (HTTP 401)."""


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise TokenError("token is not base64url") from None


@dataclass(frozen=True)
class TokenClaims:
    session_id: str
    issued_at: int
    expires_at: int


class TokenSigner:
    """Issues and verifies session tokens with one secret."""

    def __init__(self, secret: bytes | str | None = None) -> None:
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        self._secret = secret or secrets.token_bytes(32)  # random per server start unless given

    def _sign(self, signing_input: bytes) -> bytes:
        return hmac.new(self._secret, signing_input, hashlib.sha256).digest()

    def issue(self, session_id: str, ttl_s: float, now: float | None = None) -> tuple[str, int]:
        """A token for `session_id` valid for `ttl_s` seconds; returns (token, expires_at)."""
        iat = int(time.time() if now is None else now)
        exp = iat + max(1, int(ttl_s))
        header = _b64encode(json.dumps(_HEADER, separators=(",", ":")).encode())
        payload = _b64encode(json.dumps({"sid": session_id, "iat": iat, "exp": exp}, separators=(",", ":")).encode())
        signing_input = f"{header}.{payload}".encode("ascii")
        return f"{header}.{payload}.{_b64encode(self._sign(signing_input))}", exp

    def verify(self, token: str, session_id: str | None = None, now: float | None = None) -> TokenClaims:
        """The token's claims, or TokenError. `session_id`: the session the request is about."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise TokenError("missing or oversized token")
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenError("token must have three dot-separated parts")
        header_b64, payload_b64, sig_b64 = parts
        try:
            signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
        except UnicodeEncodeError:
            raise TokenError("token is not ASCII") from None
        # Signature first, in constant time: nothing of an unsigned token is trusted or even parsed.
        if not hmac.compare_digest(_b64decode(sig_b64), self._sign(signing_input)):
            raise TokenError("bad token signature")
        try:
            header = json.loads(_b64decode(header_b64))
            payload = json.loads(_b64decode(payload_b64))
            if header.get("alg") != "HS256":
                raise TokenError("token algorithm must be HS256")
            claims = TokenClaims(str(payload["sid"]), int(payload["iat"]), int(payload["exp"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TokenError("malformed token payload") from None
        if claims.expires_at <= (time.time() if now is None else now):
            raise TokenError("token expired")
        if session_id is not None and not hmac.compare_digest(claims.session_id.encode(), session_id.encode()):
            raise TokenError("token is for another session")
        return claims


class KeyFile:
    """The API key kept in a file (`--api-key-file`: a Docker or Kubernetes secret, kept out of the command line and
    the environment), read again when it changes (its time, size or inode: Kubernetes swaps a link), at most once
    every CHECK_EVERY_S: a key is rotated by writing the file (`OLD,NEW`, then `NEW`), with no restart and no session
    lost. A file that is gone, unreadable or empty for a moment keeps the last key."""

    CHECK_EVERY_S = 1.0

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple | None = None
        self._checked = time.monotonic()
        try:
            self._stamp, self.key = self._stamp_of(), self.path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise LetsTalkError(f"--api-key-file {self.path}: cannot be read ({getattr(e, 'strerror', None) or e})"
                                ) from None
        if not self.key:
            raise LetsTalkError(f"--api-key-file {self.path}: the file is empty; write the API key in it")

    def _stamp_of(self) -> tuple:
        st = self.path.stat()
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self, force: bool = False) -> str:
        """The key as the file holds it now (as of CHECK_EVERY_S ago at most; `force`: now, SIGHUP)."""
        now = time.monotonic()
        if not force and now - self._checked < self.CHECK_EVERY_S:
            return self.key
        self._checked = now
        try:
            stamp = self._stamp_of()
            if stamp != self._stamp:
                key = self.path.read_text(encoding="utf-8").strip()
                if key:
                    self._stamp, self.key = stamp, key
                    log.info("API key file %s read again: %d key(s)", self.path, len(key.split(",")))
        except (OSError, UnicodeDecodeError):  # being replaced: the last key holds
            pass
        return self.key


def api_key_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented API key with the configured one, or ones: several, comma-separated,
    are each accepted (a key being rotated: the new one added, clients moved to it, the old one taken out)."""
    if given is None:
        return False
    presented = given.encode("utf-8", "replace")
    matched = False
    for key in expected.split(","):
        if key.strip():  # (every key compared: the time taken does not say which matched)
            matched |= hmac.compare_digest(presented, key.strip().encode("utf-8"))
    return matched


def bearer(headers, query) -> str | None:
    """The credential of a request: `Authorization: Bearer X`, else the `token` query parameter."""
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return query.get("token") or None


def turn_credentials(secret: str, user: str, ttl_s: float, now: float | None = None) -> tuple[str, str]:
    """Time-limited TURN credentials from a secret shared with the TURN server (the "TURN REST API" of
    draft-uberti-behave-turn-rest; coturn's `use-auth-secret` / `static-auth-secret`):

        username   = "<expiry, seconds since the epoch>:<user>"
        credential = base64(HMAC-SHA1(secret, username))

    The TURN server recomputes the credential and refuses it after the expiry; nothing is stored on either side,
    and a leaked credential opens the relay for one session's lifetime, not for good."""
    expires = int(time.time() if now is None else now) + max(1, int(ttl_s))
    username = f"{expires}:{user}"
    digest = hmac.new(secret.encode("utf-8"), username.encode("utf-8"), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")
