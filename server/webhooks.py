"""Webhooks: the server tells your backend what happened to its sessions (--webhook URL, --webhook-secret).

Each event is one JSON POST, `{"type", "id", "time", "data": {...}}`:

- `session.created`  a session was opened (`session_id`, `avatar_id` or null for an upload, `record`)
- `session.closed`   it ended, any way (`session_id`, `reason`, `seconds` it lasted, and what it did:
                     `frames_generated`, `ticks`, `held_frames`, `speech_seconds`, `latency_ms_p95`)
- `recording.saved`  its recording is saved (`session_id`, `url`, `bytes`, `seconds`, `captions_url` or null)
- `recording.failed` its recording was not saved (`session_id`, `error`)
- `render.done`, `render.failed`, `render.cancelled`  a render (POST /v1/renders) ended: its state (`render_id`,
                     `state`, `speech_seconds`, `rendered_seconds`, `seconds_taken`, `speed`, `video_url`,
                     `captions_url`, `error`: as GET /v1/renders/{id})
- `broadcast.stopped` a session's live stream to a streaming server ended (`session_id`, `broadcast_id`, `url` with
                     its stream key hidden, `seconds` sent, `error`: empty when it was stopped, else why it failed)
- `broadcast.dropped` its connection dropped and is being made again (`session_id`, `broadcast_id`, `url`, `error`)
- `broadcast.resumed` ... and was made again (`session_id`, `broadcast_id`, `url`, `attempts`, `down_s`); one that
                     never comes back ends with `broadcast.stopped` and its error
- `broadcast.skipped` its encode fell behind (a CPU too busy) and skipped the `frames` waiting (`session_id`,
                     `broadcast_id`, `url`, `frames`, `behind_s`); the stream goes on

With a secret, each POST is signed: `X-Letstalk-Timestamp: T` (unix seconds) and
`X-Letstalk-Signature: sha256=HEX`, HEX the HMAC-SHA256 of `T.BODY` under the secret, as Stripe and GitHub do: check
it, and refuse old timestamps, to know the server sent it. `id` is the same on every try of one event (deduplicate
on it). A delivery that fails (a connection error, a timeout, a 5xx or 429) is tried again after 1, 2, 4 ... s, up to
`attempts` times; a 4xx other than 429 is not tried again. Deliveries run on the event loop beside the sessions, one
at a time per URL, in order, from a bounded queue: a slow or dead endpoint delays only its own events, and past
`max_queued` the oldest are dropped (counted, logged), never the server's memory or the streams.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import json
import logging
import time
import uuid

import aiohttp

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Letstalk-Signature"
TIMESTAMP_HEADER = "X-Letstalk-Timestamp"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Letstalk-Signature` value of `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def verify(secret: str, headers, body: bytes, tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """Whether a webhook request (its headers and raw body) was signed with `secret` within `tolerance_s`: what a
    receiver in Python runs (the server never calls it)."""
    timestamp, signature = headers.get(TIMESTAMP_HEADER, ""), headers.get(SIGNATURE_HEADER, "")
    try:
        fresh = abs((time.time() if now is None else now) - float(timestamp)) <= tolerance_s
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature)


class Webhooks:
    """Delivers events to each URL in order, off the streams' way. `send` never blocks and never raises."""

    def __init__(self, urls: list[str], secret: str | None = None, attempts: int = 5, timeout_s: float = 5.0,
                 backoff_s: float = 1.0, max_queued: int = 1000) -> None:
        self.urls = list(urls)
        self.secret = secret
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_queued = max_queued
        self.results: collections.Counter[str] = collections.Counter()  # delivered / failed / dropped
        self._queues: dict[str, collections.deque[dict]] = {url: collections.deque() for url in self.urls}
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task] = []
        self._http: aiohttp.ClientSession | None = None

    def __bool__(self) -> bool:
        return bool(self.urls)

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def start(self) -> None:
        if not self.urls or self._tasks:
            return
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        for url in self.urls:
            self._wake[url] = asyncio.Event()
            self._tasks.append(asyncio.get_running_loop().create_task(self._deliver(url), name=f"webhook {url}"))

    def send(self, kind: str, data: dict) -> None:
        """Queue one event for every URL."""
        event = {"type": kind, "id": uuid.uuid4().hex, "time": round(time.time(), 3), "data": data}
        for url, queue in self._queues.items():
            if len(queue) >= self.max_queued:
                dropped = queue.popleft()
                self.results["dropped"] += 1
                log.warning("webhook %s: %d events waiting; the oldest (%s) dropped", url, len(queue) + 1,
                            dropped["type"])
            queue.append(event)
            if url in self._wake:
                self._wake[url].set()

    async def stop(self, flush_s: float = 5.0) -> None:
        """Deliver what is queued for up to `flush_s` (the sessions closed at shutdown say so), then stop."""
        if not self._tasks:
            return
        deadline = time.monotonic() + flush_s
        while self.queued and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.queued:
            log.warning("webhooks: %d event(s) not delivered before the server stopped", self.queued)
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _deliver(self, url: str) -> None:
        queue, wake = self._queues[url], self._wake[url]
        while True:
            if not queue:
                wake.clear()
                await wake.wait()
                continue
            event = queue[0]
            ok = await self._post(url, event)
            if queue and queue[0] is event:  # not dropped meanwhile by a full queue
                queue.popleft()
            self.results["delivered" if ok else "failed"] += 1

    async def _post(self, url: str, event: dict) -> bool:
        assert self._http is not None
        body = json.dumps(event).encode()
        why = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            headers = {"Content-Type": "application/json", "User-Agent": "letstalk-rt webhooks"}
            if self.secret:
                timestamp = str(int(time.time()))
                headers[TIMESTAMP_HEADER] = timestamp
                headers[SIGNATURE_HEADER] = sign(self.secret, timestamp, body)
            try:
                async with self._http.post(url, data=body, headers=headers) as resp:
                    if resp.status < 300:
                        return True
                    why = f"HTTP {resp.status}"
                    if 400 <= resp.status < 500 and resp.status != 429:
                        break  # the endpoint refuses this event: trying again will not change its mind
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        log.warning("webhook %s: %s %s not delivered (%s)", url, event["type"], event["id"], why)
        return False
