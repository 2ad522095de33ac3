"""The HTTP / WebRTC / websocket server on the tiny model: a real server on 127.0.0.1, real aiortc peers."""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiortc import RTCSessionDescription

import letstalk_rt
from letstalk_rt.stream.engine import unfaded_audio
from conftest import speechlike
from server_helpers import (
    Peer,
    SpeechTrack,
    create_session,
    hang,
    play_session,
    run,
    running_server,
    wait_until,
)

FIXTURES = Path(__file__).parent / "fixtures" / "server"

SDP_FIXTURES = {  # file -> expected status (see fixtures/server/README.md)
    "truncated.sdp": 400,
    "garbage.sdp": 400,
    "garbage_text.sdp": 400,
    "no_media.sdp": 400,
    "huge.sdp": 413,
    "many_sections.sdp": 400,
    "unsupported_codec.sdp": 415,
    "missing_ice.sdp": 400,
    "fuzz_bundle_unknown_mid.sdp": 400,
    "fuzz_fmtp_flag_without_value.sdp": 400,
    "fuzz_no_dtls_setup.sdp": 400,
}


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def _ws_json(ws, kind: str, timeout: float = 10.0) -> dict:
    """The next event of type `kind` on the websocket (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
        assert msg.type == aiohttp.WSMsgType.TEXT, f"expected {kind}, got {msg.type} {msg.data!r} {msg.extra!r}"
        event = json.loads(msg.data)
        if event["type"] == kind:
            return event


async def _raw_request(port: int, head: bytes, body: bytes = b""):
    """An HTTP request written by hand on a raw socket (to stall or cut a body); (reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + b"\r\n" + body)
    await writer.drain()
    return reader, writer


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def _health(http, url: str) -> dict:
    async with http.get(f"{url}/health") as r:
        return await r.json()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------------------
# Service endpoints
# --------------------------------------------------------------------------------------------------


def test_health_metrics_and_avatars(tiny_pipeline, monkeypatch):
    """/health reports occupancy, /metrics is valid Prometheus text whose counters move while a session
    streams, and the bundled portrait is preloaded as the `default` avatar. Neither the watchdog (every second) nor
    a scrape asks the sessions for their stats(): those read every kept latency (up to 10000 a session), which cost
    the event loop milliseconds a second and more the longer a session ran."""
    from letstalk_rt.stream import Session

    stats_calls = [0]
    stats = Session.stats

    def counted(self):
        stats_calls[0] += 1
        return stats(self)

    monkeypatch.setattr(Session, "stats", counted)

    async def main():
        # the heap trimmed every 0.3 s, so its counter has moved by the time /metrics is read
        async with running_server(tiny_pipeline, max_sessions=3, engine_config={"trim_heap_every_s": 0.3}) as srv, \
                aiohttp.ClientSession() as http:
            async with http.get(f"{srv.url}/health") as r:
                assert r.status == 200
                assert await r.json() == {"status": "ok", "version": letstalk_rt.__version__, "sessions": 0,
                                          "admitting": 0, "max_sessions": 3, "renders_queued": 0,
                                          "engines": [{"device": "cpu", "sessions": 0, "max_sessions": 3}]}
            async with http.get(f"{srv.url}/v1/avatars") as r:
                assert (await r.json())["avatars"] == [{"id": "default", "name": "Bundled portrait", "uploaded": False}]
            info = await create_session(http, srv.url)
            player = play_session(srv, info["session_id"])
            session = srv.engine.sessions[info["session_id"]]
            session.push_audio(speechlike(1.0))
            session.end_speech()
            await wait_until(lambda: session.stats()["frames_generated"] >= 25 and session.latencies, 30,
                             "frames and a latency sample")
            stats_calls[0] = 0
            await asyncio.sleep(1.5)  # the fps gauge samples once a second
            async with http.get(f"{srv.url}/health") as r:
                assert (await r.json())["sessions"] == 1
            trims_before = srv.engine.running_state()["heap_trims"]  # the trims go on while /metrics is read
            async with http.get(f"{srv.url}/metrics") as r:
                assert r.status == 200 and r.content_type == "text/plain"
                text = await r.text()
            assert stats_calls[0] == 0
            state = srv.engine.running_state()
            player.cancel()
        return text, state, trims_before

    text, state, trims_before = run(main())
    values = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"# (HELP|TYPE) letstalk_\w+ ", line), line
            continue
        m = re.fullmatch(r'(letstalk_\w+)(\{\w+="[^"]*"(?:,\w+="[^"]*")*\})? (-?[0-9.e+]+|NaN)', line)
        assert m, f"not Prometheus exposition format: {line!r}"
        values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    assert values["letstalk_sessions_active"] == 1
    assert values["letstalk_sessions_total"] == 1
    assert values["letstalk_sessions_max"] == 3
    assert values["letstalk_sessions_refused_total"] == 0
    assert values["letstalk_frames_generated_total"] >= 25
    assert values["letstalk_generated_fps"] > 0
    assert "letstalk_frames_held_total" in values and 'letstalk_frames_dropped_total{reason="interrupt"}' in values
    p50 = values['letstalk_speech_to_screen_latency_seconds{quantile="0.5"}']
    p95 = values['letstalk_speech_to_screen_latency_seconds{quantile="0.95"}']
    assert 0 < p50 <= p95 < 5
    assert values["letstalk_speech_to_screen_latency_seconds_count"] > 0
    assert values["letstalk_errors_total"] == 0
    assert values['letstalk_engine_info{engine="0",device="cpu"}'] == 1  # one engine: the device's
    assert values['letstalk_engine_sessions{engine="0"}'] == 1
    threads = values['letstalk_engine_torch_threads{engine="0"}']
    assert threads >= 1 or math.isnan(threads)
    assert values['letstalk_engine_threads_changes_total{engine="0",direction="lowered"}'] == 0
    assert values['letstalk_engine_noise_draws{engine="0"}'] == tiny_pipeline.noise_draws >= 1
    assert values['letstalk_engine_draws_lowered_total{engine="0"}'] == 0
    assert values['letstalk_engine_decode_overlapped{engine="0"}'] == int(state["decode_overlapped"])
    from letstalk_rt.stream.engine import _glibc

    trims = 2 if _glibc("malloc_trim") is not None else 0  # glibc only; 1.5 s of the stream alone holds 5 trims
    assert trims_before <= values['letstalk_engine_heap_trims_total{engine="0"}'] <= state["heap_trims"]
    assert values['letstalk_engine_heap_trims_total{engine="0"}'] >= trims
    if sys.platform.startswith("linux"):
        assert 50 * 2**20 < values["letstalk_process_resident_memory_bytes"] < 64 * 2**30


# --------------------------------------------------------------------------------------------------
# Auth
# --------------------------------------------------------------------------------------------------


def test_several_api_keys_are_each_accepted_while_one_is_rotated(tiny_pipeline):
    """--api-key OLD,NEW (or LETSTALK_API_KEY): each is accepted, as Bearer or X-API-Key, so clients move to the new key
    before the old one is taken out; nothing else is, not a part of one, nor the empty key an extra comma makes."""
    from letstalk_rt.server.auth import api_key_matches

    assert api_key_matches("new", "old, new") and api_key_matches("old", "old,new,")
    assert not any(api_key_matches(given, "old,new,") for given in ("", "ol", "old,new", None, "x"))

    async def main():
        async with running_server(tiny_pipeline, api_key="old-key,new-key") as srv, aiohttp.ClientSession() as http:
            statuses = []
            for headers in (_bearer("old-key"), {"X-API-Key": "new-key"}, _bearer("other"), {}):
                async with http.get(f"{srv.url}/v1/avatars", headers=headers) as r:
                    statuses.append(r.status)
            return statuses

    assert run(main()) == [200, 200, 401, 401]


def test_an_api_key_kept_in_a_file_is_read_again_when_the_file_changes(tiny_pipeline, tmp_path, monkeypatch):
    """--api-key-file (a Docker or Kubernetes secret): the key the file holds is required, and a key is rotated by
    writing the file (OLD,NEW, then NEW) with no restart; a file emptied or gone for a moment keeps the last key. A
    file that cannot be read or is empty at start, or given with --api-key, stops the server with one line; with it a
    public bind needs no --api-key."""
    from letstalk_rt.errors import LetsTalkError
    from letstalk_rt.server import ServerConfig
    from letstalk_rt.server.app import add_serve_arguments, config_from_args
    from letstalk_rt.server.auth import KeyFile

    monkeypatch.setattr(KeyFile, "CHECK_EVERY_S", 0.0)
    key_file = tmp_path / "api_key"
    key_file.write_text("first\n")

    async def main():
        async with running_server(tiny_pipeline, api_key_file=key_file) as srv, aiohttp.ClientSession() as http:
            async def status(key: str) -> int:
                async with http.get(f"{srv.url}/v1/avatars", headers=_bearer(key)) as r:
                    return r.status

            seen = [await status("first")]
            key_file.write_text("first,second")  # rotating: both, while the clients move
            seen += [await status("first"), await status("second")]
            key_file.write_text("second")
            seen += [await status("first"), await status("second")]
            (tmp_path / "empty").write_text("")
            os.replace(tmp_path / "empty", key_file)  # emptied as it is rewritten: the last key holds
            seen.append(await status("second"))
            key_file.unlink()  # gone for a moment: likewise
            seen.append(await status("second"))
            return seen

    assert run(main()) == [200, 200, 200, 401, 200, 200, 200]
    with pytest.raises(LetsTalkError, match="--api-key-file .*missing: cannot be read"):
        ServerConfig(api_key_file=tmp_path / "missing")
    with pytest.raises(LetsTalkError, match="the file is empty"):
        (tmp_path / "blank").write_text("\n")
        ServerConfig(api_key_file=tmp_path / "blank")
    with pytest.raises(LetsTalkError, match="either as --api-key .* or as --api-key-file"):
        ServerConfig(api_key="k", api_key_file=tmp_path / "blank")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    key_file.write_text("third")
    config = config_from_args(parser.parse_args(["--host", "0.0.0.0", "--api-key-file", str(key_file)]))
    assert config.current_api_key() == "third" and config.api_key is None


def test_api_key_and_session_tokens(tiny_pipeline):
    """The API key gates session creation; a session token opens only its own session, only until it
    expires, and cannot be forged (bad signature, alg=none, edited payload)."""

    async def main():
        async with running_server(tiny_pipeline, api_key="k3y") as srv, aiohttp.ClientSession() as http:
            url = srv.url
            async with http.get(f"{url}/health") as r:  # health stays open for load balancers
                assert r.status == 200
            for headers in ({}, _bearer("wrong"), {"Authorization": "Basic azN5"}):
                async with http.post(f"{url}/v1/sessions", json={"avatar_id": "default"}, headers=headers) as r:
                    assert r.status == 401 and "API key" in (await r.json())["error"]
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
            async with http.get(f"{url}/v1/avatars") as r:
                assert r.status == 401
            a = await create_session(http, url, _bearer("k3y"))
            b = await create_session(http, url, {"X-API-Key": "k3y"})
            assert srv.manager.sessions.keys() == {a["session_id"], b["session_id"]}
            offer = await Peer().offer()
            # A's token on B's session: refused everywhere
            for method, path in (("POST", "/offer"), ("GET", ""), ("DELETE", ""), ("GET", "/ws")):
                async with http.request(method, f"{url}/v1/sessions/{b['session_id']}{path}", data=offer,
                                        headers={**_bearer(a["token"]), "Content-Type": "application/sdp"}) as r:
                    assert r.status == 401, (method, path, r.status)
                    assert "another session" in (await r.json())["error"]
            async with http.get(f"{url}/v1/sessions/{b['session_id']}/ws", params={"token": a["token"]}) as r:
                assert r.status == 401
            # expired: a token signed with the server's secret two hours ago, valid for one
            expired, _ = srv.manager.signer.issue(a["session_id"], 3600, now=time.time() - 7200)
            async with http.get(f"{url}/v1/sessions/{a['session_id']}", headers=_bearer(expired)) as r:
                assert r.status == 401 and "expired" in (await r.json())["error"]
            # forged: payload edited to name B, and an unsigned alg=none token
            h, p, s = a["token"].split(".")
            claims = json.loads(base64.urlsafe_b64decode(p + "=="))
            claims["sid"] = b["session_id"]
            p2 = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
            none = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
            for token in (f"{h}.{p2}.{s}", f"{none}.{p2}.", "garbage", "a.b.c", "x" * 5000):
                async with http.get(f"{url}/v1/sessions/{b['session_id']}", headers=_bearer(token)) as r:
                    assert r.status == 401, token[:40]
            # the right token works, via header or ?token=; the API key may delete any session
            async with http.get(f"{url}/v1/sessions/{a['session_id']}", params={"token": a["token"]}) as r:
                assert r.status == 200 and (await r.json())["session_id"] == a["session_id"]
            async with http.delete(f"{url}/v1/sessions/{b['session_id']}", headers=_bearer("k3y")) as r:
                assert r.status == 204
            async with http.delete(f"{url}/v1/sessions/{a['session_id']}", headers=_bearer(a["token"])) as r:
                assert r.status == 204
            async with http.get(f"{url}/v1/sessions/{a['session_id']}", headers=_bearer(a["token"])) as r:
                assert r.status == 404
            assert not srv.manager.sessions and not srv.engine.sessions

    run(main())


def test_python_m_server_serves_and_stops_cleanly_on_sigterm(tiny_model_dir):
    """`python -m letstalk_rt.server` (what `letstalk serve` runs): warm-up, listen, answer, stop on SIGTERM with 0.
    With --drain-seconds and a session open, SIGTERM drains first (/health 503 "draining") and the server stops as soon
    as the session ends."""
    import signal
    import urllib.error
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "letstalk_rt.server", "--model", str(tiny_model_dir), "--port", "0",
                             "--max-sessions", "2", "--device", "cpu", "--drain-seconds", "120"],
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "server exited before listening"
            m = re.search(r"letstalk serve: (http://\S+)/ ", line)
            url = m.group(1) if m else None
        assert url, "server did not print its URL"
        with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
            assert json.load(r) == {"status": "ok", "version": letstalk_rt.__version__, "sessions": 0,
                                    "admitting": 0, "max_sessions": 2, "renders_queued": 0,
                                    "engines": [{"device": "cpu", "sessions": 0, "max_sessions": 2}]}
        request = urllib.request.Request(f"{url}/v1/sessions", data=b'{"avatar_id": "default"}',
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            info = json.load(r)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while True:  # draining: the load balancer's health check is told to send new sessions elsewhere
            try:
                urllib.request.urlopen(f"{url}/health", timeout=10).close()
            except urllib.error.HTTPError as e:
                assert e.code == 503 and json.load(e)["status"] == "draining"
                break
            assert time.monotonic() < deadline, "the server never started draining"
            time.sleep(0.1)
        assert proc.poll() is None  # the session is still open: the server waits for it
        delete = urllib.request.Request(f"{url}/v1/sessions/{info['session_id']}", method="DELETE",
                                        headers={"Authorization": f"Bearer {info['token']}"})
        urllib.request.urlopen(delete, timeout=10).close()
        assert proc.wait(timeout=30) == 0
        assert "draining: no new sessions; 1 open one(s)" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def test_sighup_reads_the_certificate_and_the_api_key_file_again_and_does_not_stop_the_server(tiny_model_dir,
                                                                                              tmp_path):
    """`letstalk serve --tls-cert --tls-key --api-key-file` given SIGHUP (certbot's deploy hook, `docker kill -s
    HUP`) serves the renewed certificate from the next connection on, at once (its files are otherwise looked at
    once every 10 s at most), and requires the key the file holds now; it goes on serving (SIGHUP's default would
    have ended it). Its start says until when the certificate is valid, a warning for one that ends within 14 days."""
    import shutil
    import signal
    import ssl
    import threading
    import urllib.error
    import urllib.request

    from server_helpers import certificate_der, self_signed_certificate, served_certificate

    (tmp_path / "old").mkdir(), (tmp_path / "new").mkdir()
    old_cert, old_key = self_signed_certificate(tmp_path / "old", days=1)
    new_cert, new_key = self_signed_certificate(tmp_path / "new", days=90)
    cert, key, key_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "api_key"
    shutil.copy(old_cert, cert), shutil.copy(old_key, key)
    key_file.write_text("old-key\n")
    proc = subprocess.Popen([sys.executable, "-m", "letstalk_rt.server", "--model", str(tiny_model_dir), "--port", "0",
                             "--max-sessions", "1", "--device", "cpu", "--no-trace", "--tls-cert", str(cert),
                             "--tls-key", str(key), "--api-key-file", str(key_file)],
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    unchecked = ssl.create_default_context()
    unchecked.check_hostname, unchecked.verify_mode = False, ssl.CERT_NONE

    def wait_for_line(pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(lines):
                if m := re.search(pattern, line):
                    return m
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.05)
        raise AssertionError(f"never said {pattern!r}: {''.join(lines)}")

    def status(api_key: str) -> int:
        request = urllib.request.Request(f"{url}/v1/sessions", headers={"Authorization": f"Bearer {api_key}"})
        try:
            with urllib.request.urlopen(request, timeout=10, context=unchecked) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        url = wait_for_line(r"letstalk serve: (https://\S+)/ ").group(1)
        warned = wait_for_line(r"letstalk serve: warning: TLS certificate .*: valid until .* days\)")
        assert str(cert) in warned.group(0)
        assert served_certificate(url) == certificate_der(old_cert)  # (a look at the files: the next is 10 s away)
        assert status("old-key") == 200
        shutil.copy(new_key, key), shutil.copy(new_cert, cert)
        key_file.write_text("new-key\n")
        proc.send_signal(signal.SIGHUP)
        wait_for_line(r"TLS certificate .* read again, served from the next connection on: valid until")
        assert served_certificate(url) == certificate_der(new_cert)
        assert status("new-key") == 200 and status("old-key") == 401
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
        proc.stderr.close()


def test_a_hung_engine_fails_the_liveness_check_until_it_answers_again(tiny_pipeline, caplog):
    """A window that never ends (a GPU or driver that stopped answering raises nothing): once it has run
    --hung-seconds, /health/live answers 503 "hung" (an orchestrator's liveness probe restarts the server), /health
    503 too (the only engine: no new sessions here), /metrics shows how long it has run, the log says so once, and
    its sessions' clients are told `session_ending` (reason device_hung) to go on in a new session. When the window
    ends after all, everything answers ok again."""
    import threading

    gate = threading.Event()

    async def main():
        async with running_server(tiny_pipeline, engine_config={"hung_after_s": 0.5}, watch_interval_s=0.1) as srv, \
                aiohttp.ClientSession() as http:
            async def health(path: str) -> tuple[int, dict]:
                async with http.get(f"{srv.url}{path}") as r:
                    return r.status, await r.json()

            assert (await health("/health/live"))[0] == 200
            hang(srv.engine, gate)  # a device that stopped answering
            info = await create_session(http, srv.url, avatar_id="default")
            ws = await http.ws_connect(f"{srv.url}/v1/sessions/{info['session_id']}/ws",
                                       headers={"Authorization": f"Bearer {info['token']}"})
            player = play_session(srv, info["session_id"])
            await wait_until(lambda: srv.engine.hung, 20, "the engine taken for hung")
            told = await _ws_json(ws, "session_ending")  # its client, to go on in a new session elsewhere
            live, ready = await health("/health/live"), await health("/health")
            async with http.get(f"{srv.url}/metrics") as r:
                busy = float(re.search(r'letstalk_engine_busy_seconds\{engine="0"\} (\S+)', await r.text()).group(1))
            await wait_until(lambda: any("stopped answering" in r.getMessage() for r in caplog.records), 5, "the log")
            gate.set()
            await wait_until(lambda: not srv.engine.hung, 20, "the engine answering again")
            await wait_until(lambda: any("answering again" in r.getMessage() for r in caplog.records), 5, "the log")
            after = await health("/health/live"), await health("/health")
            player.cancel()
            await ws.close()
            return live, ready, busy, after, told

    caplog.set_level(logging.INFO, logger="letstalk.server")
    try:
        live, ready, busy, after, told = run(main())
    finally:
        gate.set()
    assert told["reason"] == "device_hung" and told["seconds_left"] == 0
    assert live[0] == 503 and live[1]["status"] == "hung", live
    (engine,) = live[1]["engines"]
    assert engine["hung"] is True and engine["busy_seconds"] >= 0.5
    assert ready[0] == 503 and ready[1]["status"] == "hung" and ready[1]["engines"] == live[1]["engines"]
    assert busy >= 0.5
    assert [r.levelname for r in caplog.records if "stopped answering" in r.getMessage()] == ["ERROR"]
    assert after[0][0] == 200 and after[0][1] == {"status": "ok", "engines": [{"device": "cpu", "sessions": 1,
                                                                               "max_sessions": 4}]}
    assert after[1][0] == 200 and after[1][1]["status"] == "ok"


def test_a_device_that_hangs_in_a_sessions_memory_update_is_seen_and_the_session_still_closes(tiny_pipeline):
    """A device can stop answering outside a window too: an interrupt starts the session's memory again from the
    frames on screen, which syncs with the device. The worker stuck there is taken for hung like one stuck in a
    window, and the session's lock is not held meanwhile: a DELETE (the SDK moving away, told device_hung) closes it at
    once and the server goes on answering (the event loop takes that lock: held there, the whole server stopped)."""
    import threading

    gate = threading.Event()

    async def main():
        async with running_server(tiny_pipeline, engine_config={"hung_after_s": 0.5}, watch_interval_s=0.1) as srv, \
                aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url)
            player = play_session(srv, info["session_id"])
            session = srv.engine.sessions[info["session_id"]]
            await wait_until(lambda: session.player.tick > 5, 30, "the session's first frames")
            memory = session._w.stream.memory
            update, entered = memory.update, threading.Event()

            def stuck(*args, **kwargs):  # the device stops answering as the memory is written
                entered.set()
                gate.wait(15)
                return update(*args, **kwargs)

            memory.update = stuck
            session.interrupt()
            await wait_until(entered.is_set, 20, "the worker in the memory update")
            await wait_until(lambda: srv.engine.hung, 10, "the engine taken for hung")
            started = time.monotonic()
            async with http.delete(f"{srv.url}/v1/sessions/{info['session_id']}",
                                   headers=_bearer(info["token"])) as r:
                deleted = r.status
            async with http.get(f"{srv.url}/health/live") as r:
                live = r.status
            took = time.monotonic() - started
            gate.set()
            await wait_until(lambda: not srv.engine.hung, 20, "the engine answering again")
            player.cancel()
            return deleted, live, took, list(srv.manager.sessions)

    try:
        deleted, live, took, left = run(main())
    finally:
        gate.set()
    assert deleted == 204 and live == 503 and left == []
    assert took < 3.0, f"the server stood still {took:.1f} s waiting on the stuck session"


def test_a_session_deleted_by_a_client_that_moved_on_says_where_in_its_closed_event(tiny_pipeline):
    """DELETE with {"moved_to": {"session_id", "token"[, "url"]}} (the SDK moving a session off a stopping server):
    the `closed` event on the session's websocket and event streams carries it, for the pages watching it to follow.
    A body that is not JSON, or a moved_to that is not a session id and token, is refused and the session left open."""
    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url)
            sid, mine = info["session_id"], _bearer(info["token"])
            url = f"{srv.url}/v1/sessions/{sid}"
            refused = []
            for kwargs in ({"data": b"moved", "headers": {**mine, "Content-Type": "text/plain"}},
                           {"json": {"moved_to": {"session_id": "x y", "token": "t"}}, "headers": mine},
                           {"json": {"moved_to": {"session_id": "abc", "token": ""}}, "headers": mine},
                           {"json": {"moved_to": {"session_id": "abc", "token": "t", "url": "ftp://x"}},
                            "headers": mine},
                           {"json": {"moved_to": "abc"}, "headers": mine},
                           {"json": {"gone": True}, "headers": mine}):
                async with http.delete(url, **kwargs) as r:
                    refused.append((r.status, (await r.json())["error"]))
            still = sid in srv.manager.sessions
            ws = await http.ws_connect(info["ws_url"], headers=mine)
            events = await http.get(f"{url}/events", headers=mine)
            moved_to = {"session_id": "n3w-session_1", "token": "new.token", "url": "https://avatar-2.example.com/"}
            async with http.delete(url, json={"moved_to": moved_to}, headers=mine) as r:
                deleted = r.status
            closed = await _ws_json(ws, "closed")
            async for line in events.content:
                if line.startswith(b"data: ") and b'"closed"' in line:
                    streamed = json.loads(line[6:])
                    break
            events.close()
            await ws.close()
            return refused, still, deleted, closed, streamed, moved_to

    refused, still, deleted, closed, streamed, moved_to = run(main())
    assert [status for status, _ in refused] == [415, 422, 422, 422, 422, 422], refused
    assert "takes no body, or JSON" in refused[0][1] and "not a session id" in refused[1][1]
    assert "not a token" in refused[2][1] and "not an http(s) URL" in refused[3][1]
    assert "unknown field" in refused[5][1]
    assert still and deleted == 204
    assert closed["moved_to"] == streamed["moved_to"] == moved_to


def test_a_json_log_is_one_object_a_line_with_the_session_it_is_about(tiny_model_dir, tmp_path):
    """`--log-format json` (a log collector's): every line the server writes, from its start to its stop, is one JSON
    object with time, level, logger and message; what it says by itself (its URL) is among them, a record about a
    session names it as `session_id`, and a traceback stays inside its record (`exception`). A problem found at start
    is one record too, with exit status 2."""
    import signal
    import urllib.request

    from letstalk_rt.server.logs import JsonFormatter

    proc = subprocess.Popen([sys.executable, "-m", "letstalk_rt.server", "--model", str(tiny_model_dir), "--port", "0",
                             "--max-sessions", "1", "--device", "cpu", "--no-trace", "--log-format", "json"],
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        lines, url = [], None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "server exited before listening:\n" + "".join(lines)
            lines.append(line)
            m = re.search(r'"message": "(http://\S+)/ ', line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        request = urllib.request.Request(f"{url}/v1/sessions", data=b'{"avatar_id": "default"}',
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            info = json.load(r)
        delete = urllib.request.Request(f"{url}/v1/sessions/{info['session_id']}", method="DELETE",
                                        headers={"Authorization": f"Bearer {info['token']}"})
        urllib.request.urlopen(delete, timeout=10).close()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        lines += proc.stderr.read().splitlines(keepends=True)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    records = [json.loads(line) for line in lines if line.strip()]  # (a line that is not JSON fails here)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["logger"] == "letstalk.serve" and r["message"].startswith(url) for r in records)
    about = [r for r in records if r.get("session_id") == info["session_id"]]
    assert about and all(info["session_id"] in r["message"] for r in about), records
    assert records[-1]["message"] == "stopping (closing sessions) ..."

    try:
        raise ValueError("a window failed")
    except ValueError:
        record = logging.LogRecord("letstalk_rt.stream.engine", logging.ERROR, __file__, 1, "render %s: failed",
                                   ("r1",), sys.exc_info())
    out = JsonFormatter().format(record)
    assert "\n" not in out
    parsed = json.loads(out)
    assert parsed["render_id"] == "r1" and "Traceback" in parsed["exception"] and "ValueError" in parsed["exception"]

    refused = subprocess.run([sys.executable, "-m", "letstalk_rt.server", "--log-format", "json", "--port", "0",
                              "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tmp_path / "k.pem")],
                             capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert json.loads(line)["level"] == "ERROR" and "no such file" in json.loads(line)["message"]


def test_a_container_on_a_bridge_network_without_a_relay_is_told_its_media_will_not_reach_other_machines(monkeypatch):
    """`letstalk serve` in a container whose only addresses are a bridge network's (Docker's 172.16.0.0/12, Podman's
    10.88.0.0/16 or rootless Podman's slirp4netns 10.0.2.0/24) and no STUN/TURN server warns at start: clients
    elsewhere would load the pages and never get the media. Host networking (any other address among them), a
    STUN/TURN server, or no container: no warning."""
    from letstalk_rt import rtc

    bridged = rtc.bridged_host_addresses
    assert bridged(container=True, addresses=["172.17.0.2", "127.0.0.1"]) == ["172.17.0.2"]
    assert bridged(container=True, addresses=["172.18.0.5", "172.31.255.1"]) == ["172.18.0.5", "172.31.255.1"]
    assert bridged(container=True, addresses=["172.17.0.2", "192.168.1.20"]) == []  # host networking on a LAN
    assert bridged(container=True, addresses=["172.32.0.2"]) == []  # outside Docker's pool
    assert bridged(container=True, addresses=["10.88.0.7"]) == ["10.88.0.7"]  # Podman's network "podman"
    assert bridged(container=True, addresses=["10.0.2.100"]) == ["10.0.2.100"]  # rootless Podman, slirp4netns
    assert bridged(container=True, addresses=["10.88.0.7", "10.1.4.20"]) == []  # a cloud VPC's address: host networking
    assert bridged(container=True, addresses=["127.0.0.1"]) == []  # no address at all: nothing to say
    assert bridged(["turn:relay.example.org:3478"], container=True, addresses=["172.17.0.2"]) == []
    assert bridged(container=False, addresses=["172.17.0.2"]) == []
    # what it reads when not told: the container marker files and aioice's own host addresses
    monkeypatch.setattr(rtc, "in_container", lambda: True)
    monkeypatch.setattr("aioice.ice.get_host_addresses", lambda use_ipv4, use_ipv6: ["172.17.0.3"])
    assert bridged() == ["172.17.0.3"]


@pytest.mark.parametrize("flags, said", [(["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0"),
                                         (["--behind-proxy"], "refusing to serve behind a proxy")])
def test_public_bind_without_auth_is_refused_with_one_line(flags, said):
    """A server others reach (bound to a public address, or on loopback behind a proxy) needs an API key."""
    env = {**os.environ, "LETSTALK_API_KEY": ""}
    proc = subprocess.run([sys.executable, "-m", "letstalk_rt.server", *flags, "--port", "0"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0] and "--insecure-no-auth" in lines[0]


def test_turn_options_make_each_session_its_own_credentials_and_a_bad_ice_server_stops_the_start(monkeypatch):
    """--ice-server / --turn-secret (or LETSTALK_TURN_SECRET) reach the config; each session's TURN credentials name
    it, expire after --turn-ttl, and are the HMAC-SHA1 of the username under the secret (what coturn checks; the
    SDK and browser tests connect through a real coturn with them). A TURN server without credentials, or a
    malformed URL, stops `python -m letstalk_rt.server` before it loads anything, with one line saying what to give."""
    import hashlib
    import hmac

    from letstalk_rt.server.app import add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    monkeypatch.setenv("LETSTALK_TURN_SECRET", "from-env")
    config = config_from_args(parser.parse_args(["--ice-server", "stun:stun.example.org:3478", "--ice-server",
                                                 "turn:turn.example.org:3478", "--turn-ttl", "120"]))
    stun, turn = config.session_ice_servers("sess-a", now=1_000_000.0)
    assert stun == {"urls": ["stun:stun.example.org:3478"]}
    assert turn["urls"] == ["turn:turn.example.org:3478"] and turn["username"] == "1000120:sess-a"
    expected = base64.b64encode(hmac.new(b"from-env", b"1000120:sess-a", hashlib.sha1).digest()).decode()
    assert turn["credential"] == expected
    assert config.session_ice_servers("sess-b", now=1_000_000.0)[1]["credential"] != expected

    for argv, says in ((["--ice-server", "turn:turn.example.org"], "needs a username and a credential: pass "
                                                                   "--turn-secret"),
                       (["--ice-server", "turn.example.org:3478"], "malformed uri")):
        env = {**os.environ, "LETSTALK_TURN_SECRET": "", "LETSTALK_TURN_CREDENTIAL": ""}
        proc = subprocess.run([sys.executable, "-m", "letstalk_rt.server", "--port", "0", *argv], capture_output=True,
                              text=True, timeout=60, env=env, cwd=Path(__file__).parent.parent)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], (proc.returncode, lines)


# --------------------------------------------------------------------------------------------------
# Admission and session creation
# --------------------------------------------------------------------------------------------------


def test_admission_refuses_at_once_past_the_cap_and_reserves_before_work(tiny_pipeline, astronaut_png):
    """N sessions up to the cap; the next gets 503 + Retry-After immediately (without its upload being
    read); a slot is held while a slow upload is still arriving; a freed slot is reusable."""

    async def main():
        async with running_server(tiny_pipeline, max_sessions=2) as srv, aiohttp.ClientSession() as http:
            url = srv.url
            first = await create_session(http, url)
            # a slow upload holds the second slot while its bytes trickle in
            photo = astronaut_png.read_bytes()
            started = asyncio.Event()

            async def trickle():
                boundary = "xyz"
                head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"portrait\"; filename=\"a.png\"\r\n"
                        "Content-Type: image/png\r\n\r\n").encode()
                yield head
                started.set()
                for i in range(0, len(photo), len(photo) // 10):
                    await asyncio.sleep(0.15)
                    yield photo[i:i + len(photo) // 10]
                yield f"\r\n--{boundary}--\r\n".encode()

            slow = asyncio.ensure_future(http.post(f"{url}/v1/sessions", data=trickle(),
                                                   headers={"Content-Type": "multipart/form-data; boundary=xyz"}))
            await started.wait()
            await asyncio.sleep(0.1)
            big = b"\0" * (5 * 1024 * 1024)  # a 5 MB upload: refused before it is read
            t0 = time.monotonic()
            form = aiohttp.FormData()
            form.add_field("portrait", big, filename="big.png")
            async with http.post(f"{url}/v1/sessions", data=form) as r:
                took = time.monotonic() - t0
                assert r.status == 503, await r.text()
                assert r.headers["Retry-After"] == "5"
                assert "retry later" in (await r.json())["error"]
            assert took < 1.0, f"refusal took {took:.2f} s"
            resp = await slow
            assert resp.status == 201, await resp.text()
            second = await resp.json()
            resp.release()
            async with http.post(f"{url}/v1/sessions", json={"avatar_id": "default"}) as r:
                assert r.status == 503
            async with http.delete(f"{url}/v1/sessions/{first['session_id']}", headers=_bearer(first["token"])) as r:
                assert r.status == 204
            third = await create_session(http, url)
            assert {second["session_id"], third["session_id"]} == set(srv.engine.sessions)
            assert srv.manager.metrics.refused_total == 2

    run(main())


def test_an_uploaded_jpeg_over_the_pixel_limit_is_taken_scaled_down_a_png_is_refused(monkeypatch):
    """`--max-image-pixels` (40 MP) bounds what a portrait decodes to: a phone's 48 MP JPEG was refused (413) though
    libjpeg decodes it scaled down as it reads (`media.open_photo`), to less than the limit; now it is taken, scaled
    down. A PNG over the limit is still refused, before anything is decoded. Here at a small scale. And an iPhone's
    HEIC photo is taken."""
    from PIL import Image

    from letstalk_rt import media
    from server.app import ImageTooLarge, decode_image

    monkeypatch.setattr(media, "PHOTO_DECODE_SIDE", 64)
    rgb = np.random.default_rng(0).integers(0, 255, (384, 512, 3), dtype=np.uint8)
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG")
    Image.fromarray(rgb).save(png, format="PNG")
    assert decode_image(jpeg.getvalue(), max_pixels=10_000).shape == (48, 64, 3)  # 1/8: 3072 pixels decoded
    with pytest.raises(ImageTooLarge, match="512x384 pixels; at most"):
        decode_image(png.getvalue(), max_pixels=10_000)
    with pytest.raises(ImageTooLarge, match="64x48 pixels"):  # still over at 1/8
        decode_image(jpeg.getvalue(), max_pixels=3_000)
    heic = (FIXTURES.parent / "portrait.heic").read_bytes()  # an iPhone's photo: taken (pi-heif), was 415
    assert decode_image(heic, max_pixels=10**6).shape == (160, 160, 3)


def test_session_creation_errors_are_clear_json(tiny_pipeline, astronaut_png):
    async def main():
        async with running_server(tiny_pipeline, max_upload_mb=0.5) as srv, aiohttp.ClientSession() as http:
            url = srv.url

            async def post_form(fields: dict) -> tuple[int, dict]:
                form = aiohttp.FormData()
                for name, value in fields.items():
                    if isinstance(value, bytes):
                        form.add_field(name, value, filename="upload.bin")
                    else:
                        form.add_field(name, value)
                async with http.post(f"{url}/v1/sessions", data=form) as r:
                    return r.status, await r.json()

            noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
            corrupt = bytearray(astronaut_png.read_bytes())
            corrupt[11] = 0  # IHDR chunk length 13 -> 0: Pillow raises ValueError, which once meant "too large"
            from PIL import Image

            bmp = io.BytesIO()
            Image.open(astronaut_png).resize((256, 256)).save(bmp, format="BMP")  # a face Pillow could decode
            cases = [
                ({"portrait": b"this is not an image"}, 415, "not an image"),
                ({"portrait": bytes(corrupt)}, 415, "corrupt"),
                ({"portrait": bmp.getvalue()}, 415, "JPEG, PNG, HEIC or WebP"),
                ({"portrait": (FIXTURES.parent / "video_no_audio.mp4").read_bytes()}, 415,
                 "is a video (H264), not a photo"),  # a clip sent where its still belongs: said so
                ({"portrait": _png(noise)}, 422, "face"),
                ({"portrait": b""}, 422, "empty"),
                ({"portrait": b"\0" * (600 * 1024)}, 413, "limit"),
                ({"portrait": astronaut_png.read_bytes(), "seed": "abc"}, 422, "seed"),
                ({"portrait": astronaut_png.read_bytes(), "avatar_id": "default"}, 422, "either"),
                ({"avatar_id": "nobody"}, 422, "unknown avatar_id"),
                ({"avatar_id": "default", "color": "red"}, 422, "unknown field"),
                ({"avatar_id": "default", "steps": "7"}, 422, "steps"),
                ({"avatar_id": "default", "full_frame": "2000"}, 422, "`full_frame` must be an integer 0..720"),
                ({"avatar_id": "default", "full_frame": "8"}, 422, "longest side must be 16.."),
                ({"avatar_id": "default", "full_frame": "64", "framing": "1"}, 422, "`framing` must be 0 (the whole "
                                                                                    "photo) or 2..20"),
                ({"avatar_id": "default", "full_frame": "64", "framing": "wide"}, 422, "`framing` must be 0"),
            ]
            for fields, status, words in cases:
                got, body = await post_form(fields)
                assert got == status and words in body["error"], (fields.keys(), got, body)
            multipart = "multipart/form-data; boundary=xyz"
            for data, ctype, status in ((b"{not json", "application/json", 400), (b"[1, 2]", "application/json", 422),
                                        # malformed part headers: aiohttp's InvalidHeader / LineTooLong
                                        (b"--xyz\r\nContent-Disposition form-data\r\n\r\nx\r\n--xyz--\r\n",
                                         multipart, 400),
                                        (b"--xyz\r\nX: " + b"a" * 9000 + b"\r\n\r\nx\r\n--xyz--\r\n", multipart, 400),
                                        (b"avatar_id=default", "text/plain", 415),
                                        (json.dumps({"avatar_id": "default", "seed": -1}).encode(), "application/json", 422),
                                        (json.dumps({"avatar_id": "default", "seed": True}).encode(), "application/json", 422),
                                        # JSON's 0 or [] is no string: once taken as "none given", the default avatar
                                        (json.dumps({"avatar_id": 0}).encode(), "application/json", 422),
                                        (json.dumps({"avatar_id": []}).encode(), "application/json", 422)):
                async with http.post(f"{url}/v1/sessions", data=data, headers={"Content-Type": ctype}) as r:
                    assert r.status == status, (data[:60], r.status, await r.text())
                    assert "error" in await r.json()
            async with http.get(f"{url}/v1/nowhere") as r:
                assert r.status == 404 and "error" in await r.json()
            # a real photo: the face is found and cropped
            status, body = await post_form({"portrait": astronaut_png.read_bytes(), "seed": "7"})
            assert status == 201, body
            assert set(body) >= {"session_id", "token", "expires_at", "offer_url", "ws_url"}
            assert body["offer_url"] == f"{url}/v1/sessions/{body['session_id']}/offer"
            assert body["ws_url"] == f"{url.replace('http', 'ws')}/v1/sessions/{body['session_id']}/ws"
            assert body["video"] == {"width": 32, "height": 32, "fps": 25, "face_box": [0, 0, 32, 32]}
            assert body["expires_at"] > time.time()
            assert len(srv.engine.sessions) == 1  # none of the refused requests left a session behind
            assert srv.manager.metrics.errors_total == 0  # every refusal was a 4xx, none an internal error

    run(main())


def test_a_phone_photo_stored_sideways_is_read_upright(tiny_pipeline, astronaut_png):
    """Phones store a portrait's pixels sideways with an EXIF orientation tag. The server turns an upload upright, as
    `letstalk generate` does with files: its face is found, and the whole photo (`full_frame`) comes back upright
    (before, the pixels were read as stored: no frontal face in them, 422)."""
    from PIL import Image

    photo = Image.open(astronaut_png).convert("RGB").crop((0, 0, 512, 384))  # upright: wider than tall
    exif = Image.Exif()
    exif[274] = 6  # orientation: turn 90 degrees clockwise to view
    upload = io.BytesIO()
    photo.transpose(Image.Transpose.ROTATE_90).save(upload, format="JPEG", quality=95, exif=exif)  # stored sideways

    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            form = aiohttp.FormData()
            form.add_field("portrait", upload.getvalue(), filename="phone.jpg")
            form.add_field("full_frame", "96")
            async with http.post(f"{srv.url}/v1/sessions", data=form) as r:
                return r.status, await r.json()

    status, body = run(main())
    assert status == 201, body
    assert (body["video"]["width"], body["video"]["height"]) == (96, 72)


def test_stalled_or_cut_off_uploads_free_their_slot(tiny_pipeline, caplog):
    """A client that announces a body and stops sending gets 408 after --upload-timeout and its slot is
    free again (/health counts it while it is held); a stalled SDP offer does not block the session's
    negotiation; a client that hangs up mid-upload is a quiet disconnect, not an internal error."""

    async def main():
        async with running_server(tiny_pipeline, max_sessions=1, upload_timeout_s=1.0) as srv, \
                aiohttp.ClientSession() as http:
            url, port = srv.url, _port(srv.url)
            head = (b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 10\r\n")
            reader, writer = await _raw_request(port, head, b"{")  # 1 byte of 10, then nothing
            await wait_until(lambda: srv.manager.admitting == 1, 5, "the stalled request to hold a slot")
            assert await _health(http, url) == {"status": "ok", "version": letstalk_rt.__version__, "sessions": 1,
                                                 "admitting": 1, "max_sessions": 1, "renders_queued": 0,
                                                 "engines": [{"device": "cpu", "sessions": 0, "max_sessions": 1}]}
            async with http.post(f"{url}/v1/sessions", json={"avatar_id": "default"}) as r:
                assert r.status == 503  # the slot is held while the body is awaited ...
            t0 = time.monotonic()
            answer = await asyncio.wait_for(reader.read(4096), 10)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"--upload-timeout" in answer, answer
            assert time.monotonic() - t0 < 3
            writer.close()
            assert (await _health(http, url))["sessions"] == 0  # ... and only until the deadline
            info = await create_session(http, url)

            # a stalled SDP offer: 408, and the session can still negotiate
            offer_head = (f"POST /v1/sessions/{info['session_id']}/offer HTTP/1.1\r\nHost: x\r\n"
                          f"Authorization: Bearer {info['token']}\r\nContent-Type: application/sdp\r\n"
                          "Content-Length: 100\r\n").encode()
            reader, writer = await _raw_request(port, offer_head, b"v=0\r\n")
            answer = await asyncio.wait_for(reader.read(4096), 10)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            writer.close()
            peer = Peer()
            await peer.connect(http, info)  # not 409: the stalled offer let go of the negotiation
            await peer.close()
            async with http.delete(f"{url}/v1/sessions/{info['session_id']}", headers=_bearer(info["token"])) as r:
                assert r.status == 204

            # hanging up mid-upload (JSON, then multipart): quiet, not counted as an error, slot freed
            multipart = (b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                         b"boundary=xyz\r\nContent-Length: 100000\r\n")
            part = b'--xyz\r\nContent-Disposition: form-data; name="portrait"; filename="a.png"\r\n\r\n\x89PNG'
            for cut_head, cut_body in ((head, b"{"), (multipart, part)):
                caplog.clear()
                _, writer = await _raw_request(port, cut_head, cut_body)
                await wait_until(lambda: srv.manager.admitting == 1, 5, "the upload to start")
                writer.close()
                await wait_until(lambda: srv.manager.admitting == 0, 5, "the cut-off upload to free its slot")
                assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
                assert "disconnected" in caplog.text
            assert srv.manager.metrics.errors_total == 0
            await create_session(http, url)

    caplog.set_level(logging.INFO, logger="letstalk.server")
    run(main())


# --------------------------------------------------------------------------------------------------
# WebRTC
# --------------------------------------------------------------------------------------------------


def test_aiortc_peer_receives_both_tracks_and_its_microphone_drives_the_avatar(tiny_pipeline):
    """An in-process aiortc client: 32x32 frames at ~25 fps and audio arrive; the speech it sends as its
    own audio track (48 kHz stereo Opus) makes the avatar talk (speech events at playback); the video
    track it also sends is consumed and discarded. A second offer on the session is refused (409)."""

    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url)
            ws = await http.ws_connect(info["ws_url"], headers=_bearer(info["token"]))
            from aiortc.mediastreams import VideoStreamTrack

            peer = Peer(send_audio=SpeechTrack(2.0), send_video=VideoStreamTrack())
            await peer.connect(http, info)
            t0 = time.monotonic()
            await peer.wait_frames(video=50, audio=100, timeout=30)
            rate = 50 / (time.monotonic() - t0)
            started = await _ws_json(ws, "speech_started", timeout=20)
            stopped = await _ws_json(ws, "speech_stopped", timeout=20)
            assert stopped["frame"] > started["frame"]
            async with http.post(info["offer_url"], data=await Peer().offer(),
                                 headers={**_bearer(info["token"]), "Content-Type": "application/sdp"}) as r:
                assert r.status == 409
            ss = srv.manager.sessions[info["session_id"]]
            kinds = sorted(t.get_name().rsplit("-", 1)[-1] for t in ss.tasks)
            assert "mic" in kinds and "video" in kinds  # the received video track is being read
            await ws.close()
            await peer.close()
            return peer, rate

    peer, rate = run(main())
    assert set(peer.video_frames) == {(32, 32, 3)}
    assert 15 < rate < 40, f"{rate:.1f} fps"
    assert max(peer.audio_rms) > 0.01  # the avatar's audio carries the speech it was sent


def test_the_peers_of_a_session_share_one_encode_per_codec(tiny_pipeline):
    """aiortc encodes per sender; the server encodes a session's video once a tick, and its sound once every 20 ms,
    for all of its peers that send one codec (its owner, its viewers), and each sender packs those for its own peer.
    An H.264 owner that speaks and two VP8 viewers, one joining seconds later with G.711 sound, all decode the
    avatar's pictures and hear its voice; the VP8 frames were encoded once, not twice, and the Opus packets once for
    the owner and the first viewer (the G.711 viewer's own sender encodes its sound); a joining viewer and a
    picture-loss report (RTCP PLI) from a peer each make the next frame a key frame; each peer's sound starts with the
    frame its picture starts with."""

    async def viewer(http: aiohttp.ClientSession, url: str, info: dict, peer: Peer) -> str:
        async with http.post(f"{url}/v1/sessions/{info['session_id']}/viewers", data=await peer.offer(), headers={
                **_bearer(info["token"]), "Content-Type": "application/sdp"}) as r:
            assert r.status == 201, await r.text()
            await peer.pc.setRemoteDescription(RTCSessionDescription(sdp=await r.text(), type="answer"))
            return r.headers["Location"].rsplit("/", 1)[-1]

    async def main():
        async with running_server(tiny_pipeline, max_viewers=2) as srv, aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url)
            ss = srv.manager.sessions[info["session_id"]]
            owner = Peer(send_audio=SpeechTrack(4.0), video_codec="video/H264")
            first, late = Peer(video_codec="video/VP8"), Peer(audio_codec="audio/PCMU")
            await owner.connect(http, info)
            first_id = await viewer(http, srv.url, info, first)
            await first.wait_frames(video=25)
            await owner.wait_frames(video=25)
            encoders = ss.session.video_encoders
            vp8 = encoders["video/vp8"]
            assert sorted(encoders) == ["video/h264", "video/vp8"] and len(vp8.readers) == 1
            joined = vp8.keyframes_asked
            await viewer(http, srv.url, info, late)  # offers VP8 first, as a browser does
            await late.wait_frames(video=10, timeout=10)
            assert len(vp8.readers) == 2 and vp8.keyframes_asked > joined  # its picture from the next frame on
            # a picture-loss report from the first viewer: aiortc's receiver sends it, the server's sender gets it
            sender = next(t.sender for t in ss.viewers[first_id].pc.getTransceivers() if t.kind == "video")
            receiver = next(t.receiver for t in first.pc.getTransceivers() if t.kind == "video")
            lost = vp8.keyframes_asked
            await receiver._send_rtcp_pli(sender._ssrc)
            await wait_until(lambda: vp8.keyframes_asked > lost, 5, "the key frame the report asks for")
            encoded, ticks = vp8.frames_encoded, ss.session.player.tick
            opus = ss.session.audio_encoder
            shared = [s.track for pc in (ss.pc, ss.viewers[first_id].pc) for s in pc.getSenders()
                      if s.track is not None and s.track.kind == "audio"]
            assert all(t.shared is opus for t in shared) and all(
                s.track.shared is None for v in ss.viewers.values() if v.id != first_id for s in v.pc.getSenders()
                if s.track is not None and s.track.kind == "audio")  # G.711: encoded by its own sender
            audio = (opus.packets_encoded, sum(t.packets for t in shared))
            starts = []  # each peer's first frame's tick and its first 20 ms of sound (2 a tick)
            for pc in [ss.pc] + [v.pc for v in ss.viewers.values()]:
                tracks = {s.track.kind: s.track for s in pc.getSenders() if s.track is not None}
                starts.append((tracks["video"].first_tick, tracks["audio"].first_packet))
            assert all(t is not None and a == 2 * t for t, a in starts), starts  # (the late one joined between
            # two key frames: its sound starts with the one its picture starts with, not before)
            await owner.wait_frames(video=0, audio=200)
            heard = [max(p.audio_rms) for p in (owner, first, late)]
            # what each peer shows last is one of the frames the session showed lately, through its codec
            def coarse(image: np.ndarray) -> np.ndarray:  # 8x8 blocks' means: what a codec keeps of 32x32 noise
                return image.astype(np.float32).reshape(4, 8, 4, 8, 3).mean(axis=(1, 3))

            shown = [coarse(f.video) for f in ss.session.player.shown.values()]
            errors = [min(float(np.abs(coarse(p.last_video) - f).mean()) for f in shown) for p in (owner, first, late)]
            for p in (owner, first, late):
                await p.close()
            return encoded, ticks, errors, len(first.video_frames) + len(late.video_frames), audio, heard

    encoded, ticks, errors, received, audio, heard = run(main())
    assert encoded <= ticks + 1 < received, (encoded, ticks, received)  # one encode a tick for both VP8 viewers
    assert max(errors) < 5, errors  # (frames 10 ticks apart differ by ~10)
    assert audio[0] <= 2 * ticks + 2 < audio[1], audio  # one Opus encode every 20 ms for two peers
    assert min(heard) > 0.01, heard  # the owner's speech, in the avatar's voice, at every peer


def test_malformed_sdp_is_refused_while_other_sessions_stream(tiny_pipeline):
    """Every fixture offer gets its 4xx with a reason; the streaming session never stalls, no background
    task dies unhandled, and the session that got the bad offers can still negotiate a good one."""

    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            watched = await create_session(http, srv.url)
            viewer = Peer()
            await viewer.connect(http, watched)
            await viewer.wait_frames(video=10)
            target = await create_session(http, srv.url)
            headers = {**_bearer(target["token"]), "Content-Type": "application/sdp"}
            for name, status in SDP_FIXTURES.items():
                before = len(viewer.video_frames)
                async with http.post(target["offer_url"], data=(FIXTURES / name).read_bytes(), headers=headers) as r:
                    assert r.status == status, (name, r.status, await r.text())
                    body = await r.json()
                    assert len(body["error"]) > 10, (name, body)
                await viewer.wait_frames(video=before + 3, timeout=5)  # still streaming
            async with http.post(target["offer_url"], data=b"v=0\r\n", headers={**headers,
                                                                              "Content-Type": "text/plain"}) as r:
                assert r.status == 415
            good = Peer()
            await good.connect(http, target)
            await good.wait_frames(video=5, audio=5)
            await good.close()
            await viewer.close()

    run(main())


def test_a_delete_of_a_session_already_closing_answers_once_it_is_freed(tiny_pipeline):
    """A DELETE that lands while the server is closing the session by itself (its peer connection just closed, with no
    websocket: a client's close() closes both, then deletes) answers 204 once the session is freed, so the client
    finds it gone after; it used to answer 404 at once, the session still listed for the rest of its close."""
    from aiortc import RTCPeerConnection

    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url)
            ss = srv.manager.sessions[info["session_id"]]
            close_pc, gate = ss.close_pc, asyncio.Event()

            async def slow_close_pc(pc):  # a close that takes its time (a loaded machine)
                await gate.wait()
                await close_pc(pc)

            ss.close_pc = slow_close_pc
            ss.pc = RTCPeerConnection()  # (closed through slow_close_pc)
            closing = asyncio.ensure_future(srv.manager.close(ss, "peer connection closed"))
            await wait_until(lambda: ss.closing, 5, "the close under way")
            asyncio.get_running_loop().call_later(0.3, gate.set)
            async with http.delete(f"{srv.url}/v1/sessions/{ss.id}", headers=_bearer(info["token"])) as r:
                status = r.status
            listed = ss.id in srv.manager.sessions
            await closing
            async with http.delete(f"{srv.url}/v1/sessions/{ss.id}", headers=_bearer(info["token"])) as r:
                again = r.status
            return status, listed, again

    assert run(main()) == (204, False, 404)


def test_a_sessions_motion_is_read_and_put_on_another_session_of_the_same_portrait(tiny_pipeline, astronaut_png):
    """GET .../motion answers the latents of the frames the session showed last (409 before any); PUT .../motion
    gives them to another session of the same portrait, whose next window starts from them. Refused saying why: the
    wrong Content-Type (415), bytes that are not a motion (422), another portrait's session (409), another session's
    token (401); a refused PUT changes nothing."""
    import torch

    from letstalk_rt.stream import Motion

    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            a, b = await create_session(http, srv.url), await create_session(http, srv.url)
            form = aiohttp.FormData()
            form.add_field("portrait", astronaut_png.read_bytes(), filename="astronaut.png")
            async with http.post(f"{srv.url}/v1/sessions", data=form) as r:
                other_face = await r.json()

            def motion_url(info):
                return f"{srv.url}/v1/sessions/{info['session_id']}/motion"

            async def put(info, body, token=None, content_type="application/octet-stream"):
                headers = {**_bearer(token or info["token"]), "Content-Type": content_type}
                async with http.put(motion_url(info), data=body, headers=headers) as r:
                    return r.status, (await r.json())["error"] if r.status != 204 else ""

            statuses = {}
            async with http.get(motion_url(a), headers=_bearer(a["token"])) as r:
                statuses["before a frame"] = r.status, (await r.json())["error"]
            playing = play_session(srv, a["session_id"])
            await wait_until(lambda: srv.engine.sessions[a["session_id"]].player.tick > 8, 30, "frames shown")
            async with http.get(motion_url(a), headers=_bearer(a["token"])) as r:
                assert r.status == 200 and r.content_type == "application/octet-stream"
                body = await r.read()
            playing.cancel()
            # what b's memory is started again from (read as it is given: the worker may take it at once)
            session_b, restarts = srv.engine.sessions[b["session_id"]], []
            restart = session_b._restart
            session_b._restart = lambda latents: restarts.append(latents) or restart(latents)
            statuses["form"] = await put(b, body, content_type="application/json")
            statuses["garbage"] = await put(b, b"not a motion")
            statuses["other face"] = await put(other_face, body)
            statuses["a's token"] = await put(b, body, token=a["token"])
            untouched = not restarts
            statuses["put"] = await put(b, body)
            (reset,) = restarts
            return statuses, untouched, body, torch.stack(reset)

    statuses, untouched, body, reset = run(main())
    assert statuses["before a frame"][0] == 409 and "no frame yet" in statuses["before a frame"][1]
    assert statuses["form"][0] == 415 and "application/octet-stream" in statuses["form"][1]
    assert statuses["garbage"][0] == 422 and "not a motion" in statuses["garbage"][1]
    assert statuses["other face"][0] == 409 and "another portrait" in statuses["other face"][1]
    assert statuses["a's token"][0] == 401
    assert untouched and statuses["put"] == (204, "")
    motion = Motion.from_bytes(body)
    assert torch.equal(reset, motion.latents[-len(reset):])  # b's next window starts from a's last frames


def test_an_offer_racing_a_delete_leaves_no_peer_connection(tiny_pipeline, monkeypatch):
    """DELETE while the offer's body is still arriving, and a close while aiortc negotiates: the offer
    gets 404 (not a 201 for a dead session), and every peer connection the server made is closed, with
    none of its tasks (the client's microphone) left running."""
    import letstalk_rt.server.sessions
    from aiortc import RTCPeerConnection

    made: list = []

    class Recorded(RTCPeerConnection):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(letstalk_rt.server.sessions, "RTCPeerConnection", Recorded)

    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            # 1. the DELETE lands while the offer's body trickles in
            info = await create_session(http, srv.url)
            ss = srv.manager.sessions[info["session_id"]]
            sdp = (await Peer(send_audio=SpeechTrack(1.0)).offer()).encode()
            half, go = asyncio.Event(), asyncio.Event()

            async def trickle():
                yield sdp[:100]
                half.set()
                await go.wait()
                yield sdp[100:]

            offer = asyncio.ensure_future(http.post(info["offer_url"], data=trickle(), headers={
                **_bearer(info["token"]), "Content-Type": "application/sdp"}))
            await half.wait()
            await wait_until(lambda: ss.negotiating, 5, "the offer handler to start reading")
            async with http.delete(f"{srv.url}/v1/sessions/{ss.id}", headers=_bearer(info["token"])) as r:
                assert r.status == 204
            go.set()
            async with await offer as r:
                assert r.status == 404 and "closed" in (await r.json())["error"], (r.status, await r.text())

            # 2. the session closes while aiortc is negotiating (after the tracks are attached)
            info = await create_session(http, srv.url)
            ss = srv.manager.sessions[info["session_id"]]
            video_track = ss.session.video_track

            def close_meanwhile(**kw):
                ss.spawn(srv.manager.close(ss, "closed by the watchdog"), "close")
                return video_track(**kw)

            monkeypatch.setattr(ss.session, "video_track", close_meanwhile)
            async with http.post(info["offer_url"], data=await Peer(send_audio=SpeechTrack(1.0)).offer(),
                                 headers={**_bearer(info["token"]), "Content-Type": "application/sdp"}) as r:
                assert r.status == 404, (r.status, await r.text())
            await ss.closed.wait()

            await wait_until(lambda: all(pc.connectionState == "closed" for pc in made), 10,
                             "every server-side peer connection to be closed")
            await wait_until(lambda: not ss.tasks, 5, "the session's tasks to end")
            assert not srv.manager.sessions and not srv.engine.sessions
            return len(made)

    assert run(main()) >= 1  # the second offer made one (the first never got that far, or it was closed)


# --------------------------------------------------------------------------------------------------
# The websocket
# --------------------------------------------------------------------------------------------------


def test_tts_audio_sent_faster_than_the_session_plays_waits_on_the_server_in_order(tiny_pipeline):
    """A TTS's 2 s sent at once (`ahead`) to a session that queues 1 s: what does not fit waits on the server and is
    played as room frees, all of it, in order, once, end_of_speech after it (audio_played covers every message);
    more than as much again is refused (audio_rejected), and an interrupt drops what waits."""
    speech = ((speechlike(2.0, seed=3) / 2 + 0.3) * 32767).astype("<i2")  # 0.15..0.45: every sample tells

    async def main():
        config = {"max_pending_seconds": 1.0, "catch_up": False}
        async with running_server(tiny_pipeline, engine_config=config) as srv, aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url)
            sid = info["session_id"]
            ss, pushed = srv.manager.sessions[sid], []

            async def watch():
                async for frame in ss.session.frames():
                    if frame.pushed:  # (a held tick's fade back in undone: a busy machine held one mid-speech)
                        pushed.append(unfaded_audio(frame))

            viewer = asyncio.ensure_future(watch())
            ws = await http.ws_connect(info["ws_url"], params={"token": info["token"]})
            await _ws_json(ws, "ready")
            await ws.send_json({"type": "audio_format", "sample_rate": 16000, "channels": 1, "ahead": True})
            await _ws_json(ws, "audio_format")
            for i in range(0, len(speech), 8000):  # 0.5 s messages, all at once
                await ws.send_bytes(speech[i:i + 8000].tobytes())
            await ws.send_json({"type": "end_of_speech"})
            await wait_until(lambda: ss.audio_messages == 4, 10, "the server to take the 4 messages")
            held_then = ss.held_seconds
            errors, played = [], None
            while played is None:
                event = json.loads((await ws.receive(timeout=30)).data)
                errors += [event] if event["type"] == "error" else []
                played = event if event["type"] == "audio_played" else None
            # 4 s more at once: 1 s or so in the engine, 1 s waiting, the rest refused; an interrupt drops what waits
            for _ in range(8):
                await ws.send_bytes(speech[:8000].tobytes())
            await ws.send_json({"type": "ping", "id": 1})
            refused = []
            while not refused or refused[-1]["type"] != "pong":
                refused.append(json.loads((await ws.receive(timeout=10)).data))
            refused = [e for e in refused if e["type"] == "error"]
            waiting = len(ss._held)
            headers = {"Authorization": f"Bearer {info['token']}"}
            async with http.get(f"{srv.url}/v1/sessions/{sid}", headers=headers) as r:
                stats = (await r.json())["stats"]
            async with http.get(f"{srv.url}/metrics") as r:
                gauges = {k: float(v) for k, v in (line.split() for line in (await r.text()).splitlines()
                                                   if line.startswith("letstalk_audio_"))}
            await ws.send_json({"type": "interrupt"})
            await _ws_json(ws, "interrupted")
            viewer.cancel()
            return held_then, errors, played, refused, waiting, ss._held, ss.audio_messages_played, pushed, stats, gauges

    held_then, errors, played, refused, waiting, held_after, messages_played, pushed, stats, gauges = run(main())
    assert held_then >= 0.5  # it did wait on the server (the engine queues 1 s)
    assert not errors and played["audio_messages"] == 4  # none refused; all 4 shown when it came
    said = np.concatenate(pushed)
    loud = np.flatnonzero(said > 0.1)
    assert len(loud) == loud[-1] - loud[0] + 1 == len(speech)  # all of it, once, no gap (end_of_speech after it)
    np.testing.assert_allclose(said[loud[0]:loud[-1] + 1], speech / 32768, atol=1e-4)
    assert 2 <= len(refused) <= 4 and all(e["code"] == "audio_rejected" and "interrupt" in e["message"]
                                          for e in refused)
    assert waiting >= 2 + len(refused) and not held_after  # refused ones keep their place in the line
    assert messages_played == 4 + 8
    # an operator sees what waits: the session's stats and /metrics (1 s in the engine's queue at most, ~1 s held)
    assert 0 < stats["audio_held_s"] <= 1.0 and 0 <= stats["audio_queued_s"] <= 1.0
    assert 0 < gauges["letstalk_audio_held_seconds"] <= 1.0 and 0 <= gauges["letstalk_audio_queued_seconds"] <= 1.0


def test_websocket_audio_control_events_and_bad_input(tiny_pipeline):
    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url)
            sid = info["session_id"]
            player = play_session(srv, sid)
            ws = await http.ws_connect(info["ws_url"], params={"token": info["token"]})
            ready = await _ws_json(ws, "ready")
            assert ready["sample_rate"] == 16000 and ready["channels"] == 1
            # speech in 20 ms PCM16 chunks at real-time pace, then end of speech
            pcm = (speechlike(1.2) * 32767).astype("<i2")
            for i in range(0, len(pcm), 320):
                await ws.send_bytes(pcm[i:i + 320].tobytes())
                await asyncio.sleep(0.02)
            await ws.send_json({"type": "end_of_speech"})
            started = await _ws_json(ws, "speech_started", 15)
            played = await _ws_json(ws, "audio_played", 15)  # the last of it on screen: before the level's hang-over
            stopped = await _ws_json(ws, "speech_stopped", 15)
            assert started["session_id"] == sid and started["frame"] < played["frame"] <= stopped["frame"]
            await ws.send_json({"type": "ping", "id": 7})
            assert (await _ws_json(ws, "pong"))["id"] == 7
            # interrupt while speech is queued
            await ws.send_bytes((speechlike(1.0, seed=1) * 32767).astype("<i2").tobytes())
            await ws.send_json({"type": "interrupt"})
            assert (await _ws_json(ws, "interrupted"))["type"] == "interrupted"
            # bad text messages: an error event each, the connection stays up
            for bad in ("{not json", "[1, 2]", '{"type": 5}', '{"type": "dance"}', json.dumps({"x": "y" * 40000}),
                        '{"type": "audio_format", "sample_rate": 1, "channels": 9}',
                        '{"type": "audio_format", "sample_rate": 16000, "channels": 2.0}',  # 2.0 == 2, not an int
                        '{"type": "audio_format", "sample_rate": 16000.0, "channels": 1}',
                        '{"type": "audio_format", "sample_rate": 16000, "channels": 1, "ahead": "yes"}'):
                await ws.send_str(bad)
                err = await _ws_json(ws, "error")
                assert err["message"] and err["code"] == "bad_message", (bad, err)
            # another format: 48 kHz stereo, made ahead of real time (a TTS)
            await ws.send_json({"type": "audio_format", "sample_rate": 48000, "channels": 2, "ahead": True})
            answer = await _ws_json(ws, "audio_format")
            assert answer["sample_rate"] == 48000 and answer["ahead"] is True
            assert srv.manager.sessions[sid].audio_ahead
            stereo = np.repeat((speechlike(0.5, 48000) * 32767).astype("<i2"), 2)
            await ws.send_bytes(stereo.tobytes())
            # overflow the session's audio buffer (30 s): an error event, and the session goes on
            await ws.send_json({"type": "audio_format", "sample_rate": 16000, "channels": 1})
            second = np.zeros(16000, "<i2").tobytes()
            for _ in range(35):
                await ws.send_bytes(second)
            err = await _ws_json(ws, "error")
            assert err["code"] == "audio_rejected" and "interrupt" in err["message"]
            await ws.send_json({"type": "interrupt"})
            await ws.send_json({"type": "ping", "id": 8})
            assert (await _ws_json(ws, "pong"))["id"] == 8
            # binary garbage: odd length closes with 1003 and a reason
            await ws.send_bytes(b"\x01\x02\x03")
            msg = await ws.receive(timeout=5)
            while msg.type == aiohttp.WSMsgType.TEXT:
                msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1003 and "multiple of 2" in msg.extra
            # more than 1 s in one message closes with 1009; the session itself survives both
            ws = await http.ws_connect(info["ws_url"], headers=_bearer(info["token"]))
            await ws.send_bytes(np.zeros(16001, "<i2").tobytes())
            msg = await ws.receive(timeout=5)
            while msg.type == aiohttp.WSMsgType.TEXT:
                msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009 and "1 s" in msg.extra
            assert sid in srv.engine.sessions
            # a websocket over the transport cap is cut by aiohttp (1009) without reading it whole
            ws = await http.ws_connect(info["ws_url"], headers=_bearer(info["token"]))
            await ws.send_bytes(b"\0" * (600 * 1024))
            msg = await ws.receive(timeout=5)
            while msg.type == aiohttp.WSMsgType.TEXT:
                msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009
            # closing the session by DELETE sends `closed`, then closes the websocket
            ws = await http.ws_connect(info["ws_url"], headers=_bearer(info["token"]))
            async with http.delete(f"{srv.url}/v1/sessions/{sid}", headers=_bearer(info["token"])) as r:
                assert r.status == 204
            closed = await _ws_json(ws, "closed")
            assert closed["reason"] == "deleted by the client"
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE
            player.cancel()
            assert srv.manager.metrics.errors_total == 0

    run(main())


# --------------------------------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------------------------------


def test_dead_and_idle_clients_free_their_sessions(tiny_pipeline):
    """A peer killed mid-stream (its sockets closed, no goodbye), a websocket-only client that goes away,
    and a session nobody uses are all freed within seconds; a session that keeps streaming is not."""

    async def main():
        async with running_server(tiny_pipeline, idle_timeout_s=3.0, peer_timeout_s=2.0,
                                  ws_grace_s=1.0) as srv, aiohttp.ClientSession() as http:
            survivor = await create_session(http, srv.url)
            viewer = Peer()
            await viewer.connect(http, survivor)
            victim = await create_session(http, srv.url)
            doomed = Peer()
            await doomed.connect(http, victim)
            await doomed.wait_frames(video=10)
            doomed.kill()
            freed = await wait_until(lambda: victim["session_id"] not in srv.manager.sessions, 10,
                                     "the killed peer's session to be freed")
            assert victim["session_id"] not in srv.engine.sessions
            # websocket-only client leaves
            ws_only = await create_session(http, srv.url)
            ws = await http.ws_connect(ws_only["ws_url"], headers=_bearer(ws_only["token"]))
            await ws.close()
            await wait_until(lambda: ws_only["session_id"] not in srv.manager.sessions, 6, "ws-only session freed")
            # never used at all: the idle timeout
            idle = await create_session(http, srv.url)
            await wait_until(lambda: idle["session_id"] not in srv.manager.sessions, 8, "idle session freed")
            before = len(viewer.video_frames)
            await viewer.wait_frames(video=before + 10, timeout=5)
            assert survivor["session_id"] in srv.manager.sessions  # streaming all along: never idle
            await viewer.close()
            await wait_until(lambda: survivor["session_id"] not in srv.manager.sessions, 8,
                             "session freed after its peer closed")
            await doomed.close()
            # a peer killed while the session's websocket is open (a program behind an OBS overlay): only the peer
            # connection goes, a new peer reconnects to the same session, and once both are gone it is freed
            driven = await create_session(http, srv.url)
            ws = await http.ws_connect(driven["ws_url"], headers=_bearer(driven["token"]))
            first = Peer()
            await first.connect(http, driven)
            await first.wait_frames(video=5)
            first.kill()
            ss = srv.manager.sessions[driven["session_id"]]
            await wait_until(lambda: ss.pc is None, 10, "the dead peer's connection dropped")
            await ws.send_str(json.dumps({"type": "ping"}))  # the program is still there
            assert driven["session_id"] in srv.manager.sessions and not ss.closing
            second = Peer()
            await second.connect(http, driven)
            await second.wait_frames(video=5)
            await second.close()
            await first.close()
            await ws.close()
            await wait_until(lambda: driven["session_id"] not in srv.manager.sessions, 8, "freed once both left")
            return freed

    freed = run(main())
    assert freed < 6, f"killed peer freed after {freed:.1f} s"


def test_a_session_is_closed_when_its_time_limit_is_up_after_a_warning(tiny_pipeline):
    """--max-session-minutes: the session's answer says when it ends (ends_at); its websocket is told `session_ending`
    (with the seconds left) session_end_warning_s before, then `closed` with the reason, and the slot is free, while
    it streamed all along (a limit, not an idle timeout)."""

    async def main():
        async with running_server(tiny_pipeline, max_session_s=3.0, session_end_warning_s=1.5) as srv, \
                aiohttp.ClientSession() as http:
            started = time.time()
            info = await create_session(http, srv.url)
            assert started + 2.5 < info["ends_at"] < time.time() + 3.5
            player = play_session(srv, info["session_id"])
            ws = await http.ws_connect(info["ws_url"], headers=_bearer(info["token"]))
            ending = await _ws_json(ws, "session_ending", timeout=10)
            warned = time.time() - started
            closed = await _ws_json(ws, "closed", timeout=10)
            ended = time.time() - started
            await wait_until(lambda: not srv.manager.sessions, 5, "the session freed")
            player.cancel()
            await ws.close()
            return ending, warned, closed, ended

    ending, warned, closed, ended = run(main())
    assert 0 < ending["seconds_left"] <= 1.5 and 1.0 <= warned <= 3.0 and ending["reason"] == "time_limit"
    assert "time limit" in closed["reason"] and 2.9 <= ended < 5.5


def test_a_draining_server_refuses_new_sessions_and_lets_the_open_ones_finish(tiny_pipeline):
    """SessionManager.drain (what --drain-seconds runs on SIGTERM): /health answers 503 "draining", a new session is
    refused with 503 saying why, the open session is told `session_ending` (reason server_stopping, the seconds left)
    on its websocket and event stream and keeps streaming; drain returns True as soon as it ends. A session still
    open when the time is up: drain returns False then, not before. The SDK's health() reads "draining" as a state."""
    from letstalk_rt.client import AvatarClient

    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url)
            player = play_session(srv, info["session_id"])
            session = srv.engine.sessions[info["session_id"]]
            # streaming before the drain (its first frame can take seconds on a busy machine)
            await wait_until(lambda: session.player.tick > 0, 30, "the session's first frame")
            ws = await http.ws_connect(info["ws_url"], headers=_bearer(info["token"]))
            events = await http.get(f"{srv.url}/v1/sessions/{info['session_id']}/events",
                                    headers=_bearer(info["token"]))
            drain = asyncio.ensure_future(srv.manager.drain(30))
            ending = await _ws_json(ws, "session_ending", timeout=10)
            async for line in events.content:
                if line.startswith(b"data: ") and b"session_ending" in line:
                    streamed = json.loads(line[6:])
                    break
            async with http.get(f"{srv.url}/health") as r:
                health = (r.status, await r.json())
            async with AvatarClient(srv.url) as client:  # the SDK reads it as a state, not an error
                assert (await client.health())["status"] == "draining"
            async with http.post(f"{srv.url}/v1/sessions", json={"avatar_id": "default"}) as r:
                refused = (r.status, (await r.json())["error"], r.headers.get("Retry-After"))
            tick = session.player.tick
            await asyncio.sleep(1.0)
            streaming = session.player.tick - tick
            assert not drain.done()
            started = time.monotonic()
            async with http.delete(f"{srv.url}/v1/sessions/{info['session_id']}", headers=_bearer(info["token"])):
                pass
            drained = await asyncio.wait_for(drain, 10)
            took = time.monotonic() - started
            player.cancel()
            events.close()
            await ws.close()
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url)
            started = time.monotonic()
            late = await srv.manager.drain(0.5)
            waited = time.monotonic() - started
            left = list(srv.manager.sessions)
        return ending, streamed, health, refused, streaming, drained, took, late, waited, left, info["session_id"]

    ending, streamed, health, refused, streaming, drained, took, late, waited, left, sid = run(main())
    assert ending["reason"] == streamed["reason"] == "server_stopping" and 29 <= ending["seconds_left"] <= 30
    assert health[0] == 503 and health[1]["status"] == "draining" and health[1]["sessions"] == 1
    assert refused[0] == 503 and "shutting down" in refused[1] and refused[2] is None
    assert streaming >= 15  # ~25 ticks in the second: the open session goes on
    assert drained is True and took < 2.0
    assert late is False and 0.45 <= waited < 1.5 and left == [sid]


def test_fifty_connect_disconnect_cycles_keep_memory_flat(tiny_pipeline):
    """Create, connect (WebRTC + websocket), stream, delete - 50 times; resident memory after the cycles
    stays within 10 % of what it was after a warm-up, and nothing is left behind."""

    async def cycle(http, srv):
        info = await create_session(http, srv.url)
        ws = await http.ws_connect(info["ws_url"], headers=_bearer(info["token"]))
        peer = Peer()
        await peer.connect(http, info)
        await ws.send_bytes((speechlike(0.2) * 32767).astype("<i2").tobytes())
        await peer.wait_frames(video=3, audio=3)
        await ws.close()
        async with http.delete(f"{srv.url}/v1/sessions/{info['session_id']}", headers=_bearer(info["token"])) as r:
            assert r.status == 204
        await peer.close()

    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            for _ in range(8):  # warm-up: codecs, thread pools, allocator arenas
                await cycle(http, srv)
            gc.collect()
            await asyncio.sleep(0.5)
            start = _rss_bytes()
            for _ in range(50):
                await cycle(http, srv)
            await asyncio.sleep(0.5)
            gc.collect()
            end = _rss_bytes()
            assert not srv.manager.sessions and not srv.engine.sessions
            assert srv.manager.metrics.sessions_total == 58
            return start, end

    start, end = run(main(), timeout=600)
    assert end <= start * 1.10, f"RSS grew from {start / 2**20:.0f} MiB to {end / 2**20:.0f} MiB"


def test_websocket_bug_closes_with_1011_and_a_handshake_racing_a_close_is_closed(tiny_pipeline, monkeypatch,
                                                                                  caplog):
    """An unexpected error while handling a message closes that websocket with 1011 and a reason (logged
    once, counted as an error; the session stays open), never an HTTP 500 written into the socket; and a
    websocket whose session closes during the handshake is closed with the reason, not left open."""
    from aiohttp import web

    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url)
            ss = srv.manager.sessions[info["session_id"]]
            ws = await http.ws_connect(info["ws_url"], headers=_bearer(info["token"]))
            await _ws_json(ws, "ready")

            def broken(pcm, rate):
                raise RuntimeError("a bug")

            monkeypatch.setattr(ss, "audio_message", broken)
            await ws.send_bytes(np.zeros(320, "<i2").tobytes())
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1011 and "internal" in msg.extra, msg
            assert srv.manager.metrics.errors_total == 1
            assert len([r for r in caplog.records if r.name == "letstalk.server" and r.exc_info]) == 1, caplog.text
            monkeypatch.undo()
            ws = await http.ws_connect(info["ws_url"], headers=_bearer(info["token"]))  # the session lives on
            await ws.send_json({"type": "ping", "id": 3})
            assert (await _ws_json(ws, "pong"))["id"] == 3
            await ws.close()

            # the session is closed while the websocket handshake is under way
            prepare = web.WebSocketResponse.prepare

            async def prepare_then_close(self, request):
                out = await prepare(self, request)
                await srv.manager.close(ss, "deleted by the client")
                return out

            monkeypatch.setattr(web.WebSocketResponse, "prepare", prepare_then_close)
            ws = await http.ws_connect(info["ws_url"], headers=_bearer(info["token"]))
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and "session closed" in msg.extra, msg
            assert ss.ws is None and not srv.manager.sessions

    caplog.set_level(logging.INFO, logger="letstalk.server")
    run(main())


def test_a_websocket_writer_stopped_as_its_send_finishes_stops():
    """Outbox.stop() landing just as a send completes: the writer task ends (asyncio.wait_for on 3.11 returned the
    send's result and dropped the cancel; the writer went back to wait on its queue forever, and was later destroyed
    pending: CI caught it once in the churn benchmark's test)."""
    from letstalk_rt.server.sessions import Outbox

    class Socket:
        closed = False

        def __init__(self):
            self.gate, self.sent = None, []

        async def send_str(self, text):
            self.gate = asyncio.get_running_loop().create_future()
            await self.gate
            self.sent.append(text)

    async def main():
        for ticks in range(4):  # the cancel lands 0..3 loop turns after the send's future resolves
            ws = Socket()
            out = Outbox(ws, 5.0, "s")
            out.put({"type": "caption", "text": "hello"})
            while ws.gate is None:
                await asyncio.sleep(0)
            ws.gate.set_result(None)
            for _ in range(ticks):
                await asyncio.sleep(0)
            out.stop()
            await asyncio.wait({out.writer}, timeout=1.0)
            assert out.writer.cancelled(), (ticks, out.writer)
            assert len(ws.sent) <= 1

    run(main())


def test_a_websocket_that_does_not_read_delays_no_event_and_is_closed(tiny_pipeline, monkeypatch):
    """A client whose websocket takes nothing more (its send hangs, the timeout far off): the session's events still
    reach its event stream at once (and so its webhooks and metrics: the pump never waits on the socket); the client's
    own messages queue up to WS_OUTBOX, past which it is closed (1008); a stalled send is closed at the timeout; the
    session lives on for a new websocket."""
    from aiohttp import web

    from letstalk_rt.server.sessions import WS_OUTBOX

    async def main():
        async with running_server(tiny_pipeline, ws_send_timeout_s=120.0) as srv, aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url)
            sid, auth = info["session_id"], _bearer(info["token"])
            ss = srv.manager.sessions[sid]
            player = play_session(srv, sid)
            ws = await http.ws_connect(info["ws_url"], headers=auth)
            await _ws_json(ws, "ready")
            stuck = asyncio.Event()

            async def never_sent(*args, **kwargs):
                stuck.set()
                await asyncio.Event().wait()

            monkeypatch.setattr(ss.ws, "send_str", never_sent)
            events = await http.get(f"{srv.url}/v1/sessions/{sid}/events", params={"token": info["token"]})
            ss.session.push_audio(speechlike(0.5) + 0.05, ahead=True, caption="first words")
            ss.session.push_audio(speechlike(0.5, seed=2) + 0.05, ahead=True, caption="second words")
            ss.session.end_speech()
            seen = []
            async for line in events.content:  # long before the websocket's 120 s timeout
                if line.startswith(b"data: "):
                    seen.append(json.loads(line[6:]))
                    if seen[-1]["type"] == "speech_stopped":
                        break
            events.close()
            assert stuck.is_set() and [e["text"] for e in seen if e["type"] == "caption"] == ["first words",
                                                                                           "second words"]
            assert not ws.closed and ss.out.queue.qsize() >= 1  # the events wait for the client
            for i in range(WS_OUTBOX):
                await ws.send_json({"type": "ping", "id": i})
            msg = await ws.receive(timeout=10)
            while msg.type == aiohttp.WSMsgType.TEXT:  # "ready", sent before the socket stalled
                msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1008, msg
            assert "does not read" in msg.extra

            ss.config.ws_send_timeout_s = 0.5  # the next websocket stalls too, and is closed at its timeout
            monkeypatch.setattr(web.WebSocketResponse, "send_str", never_sent)
            ws = await http.ws_connect(info["ws_url"], headers=auth)
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1008, msg
            monkeypatch.undo()
            ws = await http.ws_connect(info["ws_url"], headers=auth)
            await _ws_json(ws, "ready")
            await ws.send_json({"type": "ping", "id": 9})
            assert (await _ws_json(ws, "pong"))["id"] == 9 and sid in srv.manager.sessions
            player.cancel()

    run(main())


def test_second_websocket_replaces_the_first(tiny_pipeline):
    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url)
            first = await http.ws_connect(info["ws_url"], headers=_bearer(info["token"]))
            await _ws_json(first, "ready")
            second = await http.ws_connect(info["ws_url"], headers=_bearer(info["token"]))
            await _ws_json(second, "ready")
            msg = await first.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.CLOSE and "replaced" in msg.extra
            await second.send_json({"type": "ping", "id": 1})
            assert (await _ws_json(second, "pong"))["id"] == 1
            assert info["session_id"] in srv.manager.sessions

    run(main())


def test_a_session_token_is_renewed_while_the_session_is_open(tiny_pipeline):
    """POST /v1/sessions/{id}/token: a session outlives its first token (--token-ttl from when it was given), so its
    holder gets a new one, good for --token-ttl from now, with new TURN credentials, which GET then says; the token it
    was asked with holds until it expires, then only the new one opens the session. None, or another session's
    token, is refused; the API key may renew it too; a closed session has none."""

    async def main():
        async with running_server(tiny_pipeline, api_key="k", token_ttl_s=4, ice_servers=["turn:relay.example.org"],
                                  turn_secret="s") as srv, aiohttp.ClientSession() as http:
            a = await create_session(http, srv.url, _bearer("k"))
            b = await create_session(http, srv.url, _bearer("k"))
            session_url = f"{srv.url}/v1/sessions/{a['session_id']}"
            for headers in ({}, _bearer(b["token"])):
                async with http.post(f"{session_url}/token", headers=headers) as r:
                    assert r.status == 401, headers
            # into the next second (tokens count whole ones): the new expiry, and the TURN username made from it, differ
            await asyncio.sleep(int(time.time()) + 1.05 - time.time())
            async with http.post(f"{session_url}/token", headers=_bearer(a["token"])) as r:
                assert r.status == 200
                renewed = await r.json()
            assert renewed["session_id"] == a["session_id"] and renewed["token"] != a["token"]
            assert renewed["expires_at"] > a["expires_at"]
            assert renewed["ice_servers"][0]["username"] != a["ice_servers"][0]["username"]
            async with http.get(session_url, headers=_bearer(a["token"])) as r:  # the old one, until it expires
                state = await r.json()
                assert r.status == 200 and state["expires_at"] == renewed["expires_at"]
                assert state["ice_servers"] == renewed["ice_servers"]
            await asyncio.sleep(max(0.0, a["expires_at"] - time.time()) + 0.1)
            async with http.get(session_url, headers=_bearer(a["token"])) as r:
                assert r.status == 401 and "expired" in (await r.json())["error"]
            async with http.post(f"{session_url}/token", headers=_bearer("k")) as r:
                assert r.status == 200
            async with http.delete(session_url, headers=_bearer(renewed["token"])) as r:
                assert r.status == 204
            async with http.post(f"{session_url}/token", headers=_bearer(renewed["token"])) as r:
                assert r.status == 404

    run(main())


def test_behind_a_proxy_the_answers_name_the_proxys_scheme_and_host(tiny_pipeline, tmp_path):
    """--behind-proxy (a TLS proxy in front sets the headers): the URLs a session's answer holds (offer_url, ws_url,
    recording_url) name the scheme, host and path prefix the client asked the proxy for: RFC 7239 `Forwarded` first,
    else X-Forwarded-Proto / X-Forwarded-Host, and X-Forwarded-Prefix; a value that is not a scheme, a host or a path
    is ignored, and the websocket opens through it. Without the flag the headers change nothing (anyone may send
    them)."""
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "avatar.example.com", "X-Forwarded-Prefix": "/avatar/"}
    rfc = {"Forwarded": 'for=192.0.2.1;proto=https;host="avatar.example.com:8443"', "X-Forwarded-Host": "other.example"}
    forged = {"X-Forwarded-Proto": "javascript", "X-Forwarded-Host": "evil.example/x?y",
              "X-Forwarded-Prefix": "/a/../b"}

    async def main():
        answers = {}
        for behind in (True, False):
            async with running_server(tiny_pipeline, behind_proxy=behind,
                                      recordings_dir=tmp_path / str(behind)) as srv, aiohttp.ClientSession() as http:
                got = []
                for headers in (proxied, rfc, forged):
                    got.append(await create_session(http, srv.url, headers, avatar_id="default", record=True))
                ws = await http.ws_connect(f"{srv.url}/v1/sessions/{got[0]['session_id']}/ws",
                                           headers={**proxied, **_bearer(got[0]["token"])})
                assert (await _ws_json(ws, "ready"))["type"] == "ready"
                await ws.close()
                viewer = Peer()  # a WHEP-style viewer DELETEs the Location its offer's answer names
                async with http.post(f"{srv.url}/v1/sessions/{got[0]['session_id']}/viewers", data=await viewer.offer(),
                                     headers={**proxied, **_bearer(got[0]["token"]),
                                              "Content-Type": "application/sdp"}) as r:
                    assert r.status == 201, await r.text()
                    location = r.headers["Location"]
                await viewer.close()
                answers[behind] = (srv.url, got, location)
        return answers

    answers = run(main())
    url, (a, b, c), location = answers[True]
    assert location.startswith(f"https://avatar.example.com/avatar/v1/sessions/{a['session_id']}/viewers/"), location
    assert a["offer_url"] == f"https://avatar.example.com/avatar/v1/sessions/{a['session_id']}/offer"
    assert a["ws_url"] == f"wss://avatar.example.com/avatar/v1/sessions/{a['session_id']}/ws"
    assert a["recording_url"] == f"https://avatar.example.com/avatar/v1/recordings/{a['session_id']}"
    assert b["ws_url"] == f"wss://avatar.example.com:8443/v1/sessions/{b['session_id']}/ws"
    assert c["offer_url"] == f"{url}/v1/sessions/{c['session_id']}/offer"
    url, got, location = answers[False]
    assert location.startswith(f"{url}/v1/sessions/{got[0]['session_id']}/viewers/"), location
    assert [g["offer_url"] for g in got] == [f"{url}/v1/sessions/{g['session_id']}/offer" for g in got]


def test_the_openapi_spec_has_every_route_and_field(tiny_pipeline):
    """server/openapi.yaml, the description of the API that clients are generated from, names every route the server
    answers (method and path), every field POST /v1/sessions and POST /v1/renders take, and every field of a
    render's state."""
    import yaml

    from letstalk_rt.server import app as app_module
    from letstalk_rt.server.renders import Render

    spec = yaml.safe_load((Path(app_module.__file__).parent / "openapi.yaml").read_text())

    async def main():
        async with running_server(tiny_pipeline) as srv:
            return {(route.method.lower(), route.resource.canonical) for route in srv.app.router.routes()}

    served = {(method, path) for method, path in run(main()) if method != "head" and not path.startswith("/static")}
    described = {(method, path) for path, item in spec["paths"].items() for method in item if method != "parameters"}
    assert served - described == set(), "routes missing from openapi.yaml"
    assert described - served == set(), "openapi.yaml describes routes the server does not have"

    def fields(path: str, content: str) -> set[str]:
        return set(spec["paths"][path]["post"]["requestBody"]["content"][content]["schema"]["properties"])

    assert set(app_module.SESSION_FIELDS) - fields("/v1/sessions", "multipart/form-data") == set()
    assert set(app_module.RENDER_FIELDS) - fields("/v1/renders", "multipart/form-data") == set()
    render = Render("r1", None, 2.0, "http://h/v1/recordings/r1", state="queued")
    states = [render.describe(position=1)]
    render.started_at = render.created_at
    render.end("failed", "why")
    states.append(render.describe())
    keys = set().union(*states) | {"token", "expires_at"}  # (GET adds a new token while it waits or is made)
    assert keys - set(spec["components"]["schemas"]["Render"]["properties"]) == set()


@pytest.mark.parametrize("path", ["/", "/overlay", "/static/app.js", "/openapi.yaml"])
def test_browser_client_and_spec_are_served(tiny_pipeline, path):
    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            async with http.get(srv.url + path) as r:
                assert r.status == 200
                return await r.text()

    text = run(main())
    assert len(text) > 500


def test_the_event_stream_serves_a_sessions_events_to_readers_without_its_websocket(tiny_pipeline):
    """GET /v1/sessions/{id}/events: server-sent events, read-only, for up to MAX_LISTENERS readers at once (429
    past them), with the session token (401 without): every engine event (captions here, pushed in-process with
    audio) and, last, `closed`, after which the stream ends."""
    from letstalk_rt.server.sessions import MAX_LISTENERS

    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url)
            sid, url = info["session_id"], f"{srv.url}/v1/sessions/{info['session_id']}/events"
            async with http.get(url) as resp:
                assert resp.status == 401
            player = play_session(srv, sid)
            resp = await http.get(url, params={"token": info["token"]})
            assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
            others = [await http.get(url, params={"token": info["token"]}) for _ in range(MAX_LISTENERS - 1)]
            async with http.get(url, params={"token": info["token"]}) as refused:
                assert refused.status == 429 and str(MAX_LISTENERS) in (await refused.json())["error"]
            for other in others:
                other.close()
            await wait_until(lambda: len(srv.manager.sessions[sid].listeners) == 1, 10, "the others to go")
            session = srv.manager.sessions[sid].session
            session.push_audio(speechlike(0.5) + 0.05, ahead=True, caption="first words")
            session.push_audio(speechlike(0.5, seed=2) + 0.05, ahead=True, caption="second words")
            session.end_speech()
            events = []

            async def read():
                async for line in resp.content:
                    if line.startswith(b"data: "):
                        events.append(json.loads(line[6:]))
                        if events[-1]["type"] == "caption" and events[-1]["text"] == "second words":
                            async with http.delete(f"{srv.url}/v1/sessions/{sid}",
                                                   headers={"Authorization": f"Bearer {info['token']}"}) as r:
                                assert r.status == 204

            await asyncio.wait_for(read(), 30)  # the stream ends with the session
            player.cancel()
            return events

    events = run(main())
    types = [e["type"] for e in events]
    assert types[0] == "listening" and types[-1] == "closed"
    assert [e["text"] for e in events if e["type"] == "caption"] == ["first words", "second words"]
    assert "speech_started" in types and all(e.get("session_id") for e in events)
