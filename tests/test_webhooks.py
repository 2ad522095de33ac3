"""Webhooks (--webhook, --webhook-secret): what happens to sessions POSTed to the operator's backend, signed, in order,
tried again when the endpoint fails, never in the streams' way."""

from __future__ import annotations

import contextlib
import json
import socket
import time

import pytest
from aiohttp import web

from conftest import speechlike
from letstalk_rt.server.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, Webhooks, sign, verify
from server_helpers import create_session, play_session, run, running_server, wait_until


@contextlib.asynccontextmanager
async def receiver(answers: list[int] | None = None):
    """An HTTP endpoint on 127.0.0.1 keeping every request's (headers, body); it answers each with the next status of
    `answers` (then 200)."""
    got: list[tuple[dict, bytes]] = []
    answers = list(answers or [])

    async def hook(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.read()))
        return web.Response(status=answers.pop(0) if answers else 200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/hook", got
    finally:
        await runner.cleanup()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_server_posts_each_sessions_life_signed_and_in_order(tiny_pipeline, tmp_path):
    """A recorded session, opened, spoken to (with a caption) and deleted: the backend gets session.created,
    recording.saved (its URL, size, captions URL) and session.closed (why, how long, what it did), each signed with
    the secret; a wrong secret, a changed body or an old timestamp does not verify. /metrics counts them."""
    import aiohttp

    async def main():
        async with receiver() as (url, got), running_server(
                tiny_pipeline, webhooks=[url], webhook_secret="s3cret", recordings_dir=tmp_path / "rec") as srv, \
                aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url, record=True)
            await wait_until(lambda: len(got) == 1, 10, "session.created")
            session = srv.engine.sessions[info["session_id"]]
            viewer = play_session(srv, info["session_id"])
            session.push_audio(speechlike(1.0), caption="Hello.")
            session.end_speech()
            await wait_until(lambda: session.player.speech_frames >= 10, 30, "speech shown")
            async with http.delete(f"{srv.url}/v1/sessions/{info['session_id']}",
                                   headers={"Authorization": f"Bearer {info['token']}"}) as r:
                assert r.status == 204
            await wait_until(lambda: len(got) == 3, 10, "recording.saved and session.closed")
            async with http.get(f"{srv.url}/metrics") as r:
                metrics = await r.text()
            viewer.cancel()
            return info, got, metrics

    info, got, metrics = run(main())
    events = [json.loads(body) for _, body in got]
    assert [e["type"] for e in events] == ["session.created", "recording.saved", "session.closed"]
    assert len({e["id"] for e in events}) == 3 and all(abs(e["time"] - time.time()) < 60 for e in events)
    sid = info["session_id"]
    assert events[0]["data"] == {"session_id": sid, "avatar_id": "default", "record": True}
    saved = events[1]["data"]
    assert saved["url"] == info["recording_url"] and saved["captions_url"] == info["recording_url"] + "/captions"
    assert saved["bytes"] == (tmp_path / "rec" / f"{sid}.mp4").stat().st_size and saved["seconds"] > 0.4
    closed = events[2]["data"]
    assert closed["session_id"] == sid and closed["reason"] == "deleted by the client" and closed["seconds"] > 0.4
    assert closed["frames_generated"] > 0 and closed["ticks"] >= 10 and closed["speech_seconds"] >= 0.4
    assert closed["latency_ms_p95"] > 0
    for headers, body in got:
        assert headers["Content-Type"] == "application/json"
        assert verify("s3cret", headers, body)
        assert not verify("other", headers, body)
        assert not verify("s3cret", headers, body.replace(b"session", b"sessiom"))
        assert not verify("s3cret", headers, body, now=float(headers[TIMESTAMP_HEADER]) + 301)
    assert 'letstalk_webhooks_total{result="delivered"} 3' in metrics and "letstalk_webhooks_queued 0" in metrics


def test_a_failing_endpoint_is_tried_again_and_a_dead_one_delays_only_its_own_events():
    """503 twice then 200: delivered on the third try, the same event (id, body) each time. A 400 is not tried
    again. An endpoint nobody listens on fails every try, while another URL gets every event, in order. Past
    max_queued the oldest waiting event is dropped, counted."""

    async def main():
        async with receiver([503, 503, 200, 400]) as (flaky, flaky_got), receiver() as (good, good_got):
            dead = f"http://127.0.0.1:{_closed_port()}/hook"
            hooks = Webhooks([flaky, good, dead], secret=None, attempts=3, backoff_s=0.05, timeout_s=2)
            hooks.start()
            for i in range(3):
                hooks.send("test.event", {"n": i})
            await wait_until(lambda: len(good_got) == 3, 5, "the good endpoint's events")
            await wait_until(lambda: hooks.results["delivered"] + hooks.results["failed"] == 9, 10, "every try")
            results = dict(hooks.results)
            small = Webhooks([dead], attempts=1, max_queued=2)  # not started: nothing is delivered
            for i in range(3):
                small.send("test.event", {"n": i})
            await hooks.stop(flush_s=0)
            return flaky_got, good_got, results, small

    flaky_got, good_got, results, small = run(main())
    flaky = [json.loads(body) for _, body in flaky_got]
    # event 0: 503, 503, 200 (the same event each time); event 1: 400, not tried again; event 2: 200
    assert [e["data"]["n"] for e in flaky] == [0, 0, 0, 1, 2] and len({e["id"] for e in flaky[:3]}) == 1
    assert [json.loads(b)["data"]["n"] for _, b in good_got] == [0, 1, 2]
    assert all(SIGNATURE_HEADER not in h for h, _ in good_got)  # no secret: unsigned
    assert results == {"delivered": 5, "failed": 4}  # flaky: 2 + 1 failed (the 400); dead: 3 failed
    assert small.results["dropped"] == 1 and [e["data"]["n"] for e in small._queues[small.urls[0]]] == [1, 2]


def test_a_signature_is_the_hmac_of_the_timestamp_and_the_body():
    import hashlib
    import hmac

    body = b'{"type": "session.created"}'
    assert sign("k", "1700000000", body) == "sha256=" + hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    headers = {TIMESTAMP_HEADER: "1700000000", SIGNATURE_HEADER: sign("k", "1700000000", body)}
    assert verify("k", headers, body, now=1700000100)
    assert not verify("k", {**headers, TIMESTAMP_HEADER: "soon"}, body, now=1700000100)


def test_serve_refuses_a_webhook_that_is_not_an_http_url():
    import argparse

    from letstalk_rt.errors import LetsTalkError
    from letstalk_rt.server.app import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    with pytest.raises(LetsTalkError, match="give an http\\(s\\) URL"):
        config_from_args(parser.parse_args(["--webhook", "ftp://x/y"]))
    config = config_from_args(parser.parse_args(["--webhook", "https://api.example.com/hooks", "--webhook-secret", "k"]))
    assert config.webhooks == ["https://api.example.com/hooks"] and config.webhook_secret == "k"
