"""The browser client in Debian's headless Firefox ESR, against a live server: the pages are tested in Chromium
(test_browser.py, through playwright); this is the second engine users open them in, with its own WebRTC stack
(its own SDP, codecs, statistics and media elements).

Firefox is driven through WebDriver BiDi, the W3C protocol it serves itself with `--remote-debugging-port` (no
geckodriver, which Debian does not package; playwright drives only its own patched Firefox): a websocket of JSON
commands, spoken here with aiohttp. Its fake microphone (`media.navigator.streams.fake`) is a tone, which the page
sends as its WebRTC audio track.

CI needs `apt-get install -y firefox-esr` (`bash scripts/setup.sh --dev` does it); without it this test is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from conftest import script
from server_helpers import cut_network, run, running_server, two_device_server, wait_until
from test_browser import APP_PAGE, MOUTH_SNAPSHOT_JS, _write_wav, assert_moved, assert_reconnected, hang_until_moved

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")

pytestmark = pytest.mark.skipif(FIREFOX is None, reason="needs Firefox (apt-get install -y firefox-esr)")

PREFS = {
    "media.navigator.streams.fake": True,  # a fake camera and microphone (a tone) ...
    "media.navigator.permission.disabled": True,  # ... given without asking
    "media.autoplay.default": 0,  # the avatar's sound plays without a click
    "media.peerconnection.ice.obfuscate_host_addresses": False,  # plain host candidates, no mDNS names
    "browser.shell.checkDefaultBrowser": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "app.update.disabledForTesting": True,
    "network.captive-portal-service.enabled": False,  # no requests of its own to the internet
    "network.connectivity-service.enabled": False,
}


class Tab:
    """What the browser tests ask of a tab, over whichever protocol drives it (`evaluate`)."""

    async def evaluate(self, expression: str):
        raise NotImplementedError

    async def wait_for(self, expression: str, timeout: float, what: str) -> None:
        """Until the JS `expression` is true; AssertionError naming `what`, with what the page says, after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        check = f"(() => {{ try {{ return !!({expression}); }} catch (e) {{ return false; }} }})()"
        while not await self.evaluate(check):
            if loop.time() > deadline:
                text = await self.evaluate("(document.getElementById('log') || document.getElementById('error'))"
                                           "?.innerText")
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; the page says: {text!r}")
            await asyncio.sleep(0.1)


class Firefox(Tab):
    """One headless Firefox and its first tab, over WebDriver BiDi."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.context = ""
        self._id = 0

    async def call(self, method: str, params: dict, timeout: float = 30.0) -> dict:
        """A BiDi command's result; AssertionError with Firefox's message for an error answer."""
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        async with asyncio.timeout(timeout):
            while True:
                message = await self.ws.receive_json()
                if message.get("id") == self._id:
                    assert message["type"] == "success", f"{method}: {message}"
                    return message["result"]

    async def goto(self, url: str) -> None:
        await self.call("browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"})

    async def evaluate(self, expression: str):
        """The value of a JS expression (awaited if a promise), through JSON."""
        result = await self.call("script.evaluate", {
            "expression": f"Promise.resolve({expression}).then((v) => JSON.stringify(v ?? null))",
            "target": {"context": self.context}, "awaitPromise": True})
        assert result["type"] == "success", f"{expression}: {result.get('exceptionDetails', result)}"
        return json.loads(result["result"]["value"])

    async def _element(self, css: str) -> dict:
        nodes = (await self.call("browsingContext.locateNodes", {
            "context": self.context, "locator": {"type": "css", "value": css}}))["nodes"]
        assert len(nodes) == 1, f"{css}: {len(nodes)} elements"
        return {"sharedId": nodes[0]["sharedId"]}

    async def set_files(self, css: str, *paths: Path) -> None:
        """Choose `paths` in the file input `css`, as a user would."""
        await self.call("input.setFiles", {"context": self.context, "element": await self._element(css),
                                           "files": [str(p) for p in paths]})

    async def click(self, css: str) -> None:
        """Click the element `css` with the mouse: a user's click (a script's element.click() is not one, and what
        only a user's gesture may start, such as sound, stays off)."""
        await self.evaluate(f"document.querySelector({json.dumps(css)}).scrollIntoView({{block: 'center'}})")
        origin = {"type": "element", "element": await self._element(css)}
        await self.call("input.performActions", {"context": self.context, "actions": [{
            "type": "pointer", "id": "mouse", "actions": [
                {"type": "pointerMove", "x": 0, "y": 0, "origin": origin},
                {"type": "pointerDown", "button": 0}, {"type": "pointerUp", "button": 0}]}]})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def firefox(profile: Path, **prefs):
    """Headless Firefox on a fresh profile with PREFS and `prefs`, its BiDi session open on its first tab."""
    profile.mkdir()
    (profile / "user.js").write_text("".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n"
                                             for k, v in {**PREFS, **prefs}.items()))
    port = _free_port()
    env = {**os.environ, "MOZ_HEADLESS": "1"}
    log = profile.parent / "firefox.log"  # (a file: a pipe nobody reads would fill and stop Firefox)
    with open(log, "wb") as out:
        proc = subprocess.Popen([FIREFOX, "--headless", "--no-remote", "--profile", str(profile),
                                 "--remote-debugging-port", str(port), "about:blank"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    closed = False
    try:
        async with aiohttp.ClientSession() as http:
            ws = None
            for _ in range(300):  # its BiDi server listens a few seconds after the start
                try:
                    ws = await http.ws_connect(f"ws://127.0.0.1:{port}/session")
                    break
                except aiohttp.ClientError:
                    assert proc.poll() is None, f"Firefox exited: {log.read_text(errors='replace')[-2000:]}"
                    await asyncio.sleep(0.1)
            assert ws is not None, "Firefox's WebDriver BiDi server never answered"
            browser = Firefox(ws)
            await browser.call("session.new", {"capabilities": {}})
            tree = await browser.call("browsingContext.getTree", {})
            browser.context = tree["contexts"][0]["context"]
            try:
                yield browser
            finally:
                with contextlib.suppress(Exception):
                    await browser.call("browser.close", {}, timeout=10)
                    closed = True
                await ws.close()
    finally:  # (off the loop: the server under test runs on it)
        try:
            await asyncio.to_thread(proc.wait, 10 if closed else 0.1)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


AUDIO_RUNS_JS = """new Promise((resolve) => {
  const ctx = new AudioContext();
  ctx.resume().then(() => resolve(ctx.state === 'running'));
  setTimeout(() => resolve(ctx.state === 'running'), 1000);
})"""


@pytest.mark.parametrize("mode", ["microphone+avatar", "file+photo"])
def test_firefox_page_shows_the_talking_avatar(tiny_pipeline, tmp_path, astronaut_png, mode):
    """index.html in Firefox: the page creates a session (the bundled avatar, or an uploaded photo shown whole), sends
    speech as its WebRTC audio track (Firefox's fake microphone, a tone; or a WAV chosen as a file, decoded and played
    through WebAudio) and shows the avatar: frames of the model's size (the photo: `full_frame=128`), ~25 a second, a
    mouth region that changes, the avatar's sound (the speech said back); the server takes it for speech (the page
    gets speech_started). Stop deletes the session.

    Firefox runs no WebAudio on a machine with no sound output device (CI's): there the file's speech cannot be sent,
    and the page must say so in words with what to do (it sent silence, and said nothing, before)."""
    # the mouth: the lower middle of a face crop; in the whole astronaut photo, of the face's square (122, 6, 218)
    mouth, side = ([0.3, 0.55, 0.4, 0.35], 32) if mode == "microphone+avatar" else ([0.36, 0.25, 0.18, 0.15], 128)
    wav = tmp_path / "speech.wav"
    _write_wav(wav)

    async def main():
        async with running_server(tiny_pipeline) as srv, firefox(tmp_path / "profile") as ff:
            speaks = True
            if mode == "microphone+avatar":
                await ff.goto(f"{srv.url}/?autostart=1&source=mic")
            else:
                await ff.goto(f"{srv.url}/?source=file&full_frame=128")
                speaks = await ff.evaluate(AUDIO_RUNS_JS)  # this Firefox has a sound output: WebAudio runs
                await ff.set_files("#audiofile", wav)
                await ff.set_files("#photo", astronaut_png)
                await ff.click("input[name=face][value=upload]")
                await ff.click("#start")
            await ff.wait_for("window.letstalk?.conn?.pc?.connectionState === 'connected'", 30, "the connection")
            await ff.wait_for("document.getElementById('video').videoWidth > 0 && window.letstalk.frames.frames > 10",
                              30, "the avatar's frames")
            size = await ff.evaluate("[document.getElementById('video').videoWidth, "
                                     "document.getElementById('video').videoHeight]")
            first = await ff.evaluate("window.letstalk.conn.stats()")
            frames_first = await ff.evaluate("window.letstalk.frames.frames")
            snaps = []
            for _ in range(6):  # a few snapshots of the mouth, 0.4 s apart, while the speech plays
                snaps.append(np.array(await ff.evaluate(f"({MOUTH_SNAPSHOT_JS})({json.dumps(mouth)})"), np.int16))
                await asyncio.sleep(0.4)
            if speaks:
                await ff.wait_for("window.letstalk.events.includes('speech_started')", 20, "speech_started")
            else:
                await ff.wait_for("document.getElementById('log').innerText.includes(\"has not started this page's "
                                  "audio\")", 10, "the page to say its file is not being sent")
            log = await ff.evaluate("document.getElementById('log').innerText")
            later = await ff.evaluate("window.letstalk.conn.stats()")
            frames_later = await ff.evaluate("window.letstalk.frames.frames")
            (session,) = srv.manager.sessions.values()
            # the model made frames of this session, not only the track repeating one: counted against a deadline,
            # not a time, as a loaded machine generates fewer frames a second (the track keeps 25)
            await wait_until(lambda: session.session.stats()["frames_generated"] > 50, 30, "50 generated frames")
            await ff.click("#stop")
            await wait_until(lambda: not srv.manager.sessions, 10, "Stop to delete the session")
            return speaks, log, size, first, later, frames_first, frames_later, snaps

    speaks, log, size, first, later, frames_first, frames_later, snaps = run(main())
    assert size == [side, side] and later["video"]["frameWidth"] == side
    assert frames_later - frames_first >= 30  # ~25 a second for the 2.4 s of snapshots
    assert later["audio"]["packetsReceived"] > first["audio"]["packetsReceived"] > 0
    if speaks:
        assert later["audio"]["totalAudioEnergy"] > 0  # the speech, said back
        assert max(int(np.abs(a - b).sum()) for a, b in zip(snaps, snaps[1:])) > 0, "the mouth region never changed"
    else:
        assert "Firefox on a machine with no sound output device" in log and "click the page" in log, log


def test_firefox_plays_picture_and_sound_together_and_decodes_the_lost_sound_of_a_lossy_link(tiny_pipeline, tmp_path):
    """The server's sockets lose 5 % of the RTP packets each way (scripts/browser_sync.py --browser firefox --loss 5),
    the avatar saying a text (Firefox's fake microphone is a tone): Firefox decodes most of the lost sound from the
    in-band FEC of the packet after it (rtc.opus_encoder; with aiortc's encoder it concealed 5.4 %), asks for each lost
    video packet again (NACK), and plays picture and sound within two frames of each other (its getStats'
    `estimatedPlayoutTimestamp` of both streams), as Chromium does (test_browser.py)."""
    browser_sync = script("browser_sync")

    async def main():
        with browser_sync.impaired_sockets(5.0, seed=1) as lost:
            async with running_server(tiny_pipeline) as srv:
                return await browser_sync.measure(srv.url, 12.0, tmp_path, out=lambda line: None, browser="firefox",
                                                  speech="say"), lost

    result, lost = run(main())
    link = result["summary"]["link"]
    assert lost["sent"] >= 20, lost
    assert link["audio_packets_lost"] >= 15 and link["video_packets_lost"] >= 5, link
    assert link["audio_concealed_pct"] < 2.5, link  # (without FEC: 5 %, as lost)
    assert link["nacks_sent"] >= link["video_packets_lost"] - 2 and link["frames_decoded"] >= 200, link
    rows = [r for r in result["rows"] if r["offset_ms"] is not None]
    assert len(rows) >= 7 and all(abs(r["offset_ms"]) <= 80 for r in rows), rows


def test_firefox_page_refused_the_microphone_says_how_to_get_it(tiny_pipeline, tmp_path):
    """A microphone the browser refuses (its site settings block it) is said in words with what to do, not as the
    browser's bare NotAllowedError, and the page leaves no session behind on the server."""
    async def main():
        async with running_server(tiny_pipeline) as srv, \
                firefox(tmp_path / "profile", **{"media.navigator.permission.disabled": False,
                                                 "permissions.default.microphone": 2}) as ff:
            await ff.goto(f"{srv.url}/?autostart=1&source=mic")
            await ff.wait_for("document.getElementById('log').innerText.includes('microphone')", 30, "the refusal")
            log = await ff.evaluate("document.getElementById('log').innerText")
            await asyncio.sleep(0.5)
            return log, len(srv.manager.sessions)

    log, sessions = run(main())
    assert "the microphone was refused" in log and "allow it from the icon beside the address" in log, log
    assert "send an audio file instead" in log and "NotAllowedError" in log, log
    assert sessions == 0


@pytest.mark.parametrize("page", ["index", "overlay"])
def test_a_firefox_page_whose_connection_goes_silent_reconnects_and_the_avatar_goes_on(tiny_pipeline, tmp_path, page):
    """The server's side of the page's peer connection stops sending and hearing mid-stream (a network change): the
    page in Firefox sees no media for 2 s, offers a new connection, and the video goes on in the same page and session
    (test_browser.py's case, in Firefox)."""
    async def main():
        async with running_server(tiny_pipeline) as srv, firefox(tmp_path / "profile") as ff:
            await ff.goto(f"{srv.url}/?autostart=1&source=none" if page == "index" else f"{srv.url}/overlay")
            await ff.wait_for("window.letstalk?.frames?.frames > 25", 30, "the avatar's frames")
            (ss,) = srv.manager.sessions.values()
            first_pc = ss.pc
            assert cut_network(first_pc) > 0
            await wait_until(lambda: ss.pc is not None and ss.pc is not first_pc
                             and ss.pc.connectionState == "connected", 30, "the page's new peer connection")
            shown = await ff.evaluate("window.letstalk.frames.frames")
            await ff.wait_for(f"window.letstalk.frames.frames > {shown + 25}", 20, "frames on the new connection")
            text = await ff.evaluate("(document.getElementById('log') || document.getElementById('error')).innerText")
            return text, len(srv.manager.sessions)

    text, sessions = run(main())
    assert sessions == 1  # the same session, shown again
    assert_reconnected(page, text)


@pytest.mark.parametrize("page", ["index", "overlay"])
def test_a_firefox_page_whose_device_hung_moves_to_a_new_session_and_the_avatar_goes_on(tiny_pipeline, second_pipeline,
                                                                                        tmp_path, page):
    """The page's session is on a device that stops answering: the page in Firefox makes a session the same way (on the
    server's other device), goes on from the old one's motion, shows it and deletes the old one (test_browser.py's case,
    in Firefox)."""
    gate = threading.Event()

    async def main():
        async with two_device_server(tiny_pipeline, second_pipeline) as srv, firefox(tmp_path / "profile") as ff:
            await ff.goto(f"{srv.url}/?autostart=1&source=none" if page == "index" else f"{srv.url}/overlay")
            await ff.wait_for("window.letstalk?.frames?.frames > 25", 30, "the avatar's frames")
            ((old_id, _),) = srv.manager.sessions.items()
            new_id, elsewhere = await hang_until_moved(srv, old_id, gate)
            shown = await ff.evaluate("window.letstalk.frames.frames")
            await ff.wait_for(f"window.letstalk.frames.frames > {shown + 25}", 20, "frames of the new session")
            text = await ff.evaluate("(document.getElementById('log') || document.getElementById('error')).innerText")
            gate.set()
            return old_id, new_id, elsewhere, text

    try:
        old_id, new_id, elsewhere, text = run(main())
    finally:
        gate.set()
    assert new_id != old_id and elsewhere
    assert_moved(page, text, new_id)


def test_a_firefox_page_of_another_origin_uses_the_server_it_allows(tiny_pipeline, tmp_path):
    """--cors-origin: a page of another origin (an app's own web server) imports app.js from the avatar server in
    Firefox, creates a session (Firefox's preflights answered), connects over WebRTC, shows the avatar, and its close
    deletes the session (test_browser.py's case, in Firefox, whose CORS checks are its own)."""
    from aiohttp import web

    async def main():
        async def page(request):
            return web.Response(text=APP_PAGE, content_type="text/html")

        app = web.Application()
        app.router.add_get("/", page)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        origin = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            async with running_server(tiny_pipeline, cors_origins=[origin], api_key=None) as srv, \
                    firefox(tmp_path / "profile") as ff:
                await ff.goto(f"{origin}/?server={srv.url}")
                await ff.wait_for("window.app !== undefined", 30, "the page's module")
                error = await ff.evaluate("window.app.error || null")
                assert error is None, error
                await ff.wait_for("window.app.frames.frames > 10", 30, "the avatar's frames")
                assert len(srv.manager.sessions) == 1
                await ff.evaluate("window.app.conn.close()")
                await wait_until(lambda: not srv.manager.sessions, 10, "the page's close to delete the session")
        finally:
            await runner.cleanup()

    run(main())


@pytest.mark.parametrize("page", ["index", "overlay"])
def test_a_firefox_with_webrtc_turned_off_is_told_so_and_no_session_is_made(tiny_pipeline, tmp_path, page):
    """media.peerconnection.enabled false (privacy settings and extensions set it): the page says that the browser
    has no WebRTC and how to turn it on, in place of Firefox's "RTCPeerConnection is not defined", and makes no session
    on the server for nothing (it made one, then failed)."""
    async def main():
        async with running_server(tiny_pipeline) as srv, \
                firefox(tmp_path / "profile", **{"media.peerconnection.enabled": False}) as ff:
            await ff.goto(f"{srv.url}/?autostart=1&source=none" if page == "index" else f"{srv.url}/overlay")
            box = "log" if page == "index" else "error"
            await ff.wait_for(f"document.getElementById('{box}').innerText.includes('WebRTC')", 30,
                              "the page to say it")
            text = await ff.evaluate(f"document.getElementById('{box}').innerText")
            await asyncio.sleep(0.5)
            return text, srv.manager.metrics.sessions_total

    text, made = run(main())
    assert "this browser cannot show the avatar live: it has no WebRTC" in text, text
    assert "media.peerconnection.enabled" in text and "RTCPeerConnection is not defined" not in text, text
    assert ('"Make a clip" works without it' in text) == (page == "index"), text
    assert made == 0
