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
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from server_helpers import run, running_server, wait_until
from test_browser import MOUTH_SNAPSHOT_JS

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
}


class Firefox:
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

    async def wait_for(self, expression: str, timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self.evaluate(f"(() => {{ try {{ return !!({expression}); }} catch (e) {{ return false; }} }})()"):
            if loop.time() > deadline:
                log = await self.evaluate("document.getElementById('log')?.innerText")
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; the page's log: {log!r}")
            await asyncio.sleep(0.1)


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
    proc = subprocess.Popen([FIREFOX, "--headless", "--no-remote", "--profile", str(profile),
                             "--remote-debugging-port", str(port), "about:blank"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        async with aiohttp.ClientSession() as http:
            ws = None
            for _ in range(300):  # its BiDi server listens a few seconds after the start
                try:
                    ws = await http.ws_connect(f"ws://127.0.0.1:{port}/session")
                    break
                except aiohttp.ClientError:
                    assert proc.poll() is None, f"Firefox exited: {proc.stderr.read()[-2000:]}"
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
                await ws.close()
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_firefox_page_shows_the_talking_avatar_from_its_microphone(tiny_pipeline, tmp_path):
    """index.html in Firefox: the page creates a session, sends its microphone (Firefox's fake one: a tone) as its
    WebRTC audio track and shows the avatar: the video at the model's size, ~25 frames a second, a mouth region that
    changes, the avatar's sound (the tone said back); the server takes the tone for speech (the page gets
    speech_started). Stop deletes the session."""
    async def main():
        async with running_server(tiny_pipeline) as srv, firefox(tmp_path / "profile") as ff:
            await ff.goto(f"{srv.url}/?autostart=1&source=mic")
            await ff.wait_for("window.letstalk?.conn?.pc?.connectionState === 'connected'", 30, "the connection")
            await ff.wait_for("document.getElementById('video').videoWidth > 0 && window.letstalk.frames.frames > 10",
                              30, "the avatar's frames")
            size = await ff.evaluate("[document.getElementById('video').videoWidth, "
                                     "document.getElementById('video').videoHeight]")
            first = await ff.evaluate("window.letstalk.conn.stats()")
            frames_first = await ff.evaluate("window.letstalk.frames.frames")
            snaps = []
            for _ in range(6):  # a few snapshots of the mouth, 0.4 s apart
                snaps.append(np.array(await ff.evaluate(f"({MOUTH_SNAPSHOT_JS})([0.3, 0.55, 0.4, 0.35])"), np.int16))
                await asyncio.sleep(0.4)
            await ff.wait_for("window.letstalk.events.includes('speech_started')", 20, "speech_started")
            later = await ff.evaluate("window.letstalk.conn.stats()")
            frames_later = await ff.evaluate("window.letstalk.frames.frames")
            (session,) = srv.manager.sessions.values()
            generated = session.session.stats()["frames_generated"]
            await ff.evaluate("document.getElementById('stop').click()")
            await wait_until(lambda: not srv.manager.sessions, 10, "Stop to delete the session")
            return size, first, later, frames_first, frames_later, snaps, generated

    size, first, later, frames_first, frames_later, snaps, generated = run(main())
    assert size == [32, 32] and later["video"]["frameWidth"] == 32
    assert frames_later - frames_first >= 30  # ~25 a second for the 2.4 s of snapshots
    assert later["audio"]["packetsReceived"] > first["audio"]["packetsReceived"] > 0
    assert later["audio"]["totalAudioEnergy"] > 0  # the tone, said back
    assert max(int(np.abs(a - b).sum()) for a, b in zip(snaps, snaps[1:])) > 0, "the mouth region never changed"
    assert generated > 50  # the model made them, not the track repeating one


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
