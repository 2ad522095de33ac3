"""The browser client in WebKit, Safari's engine, against a live server: Debian's WebKitGTK (its MiniBrowser, driven by
WebKitWebDriver over the W3C WebDriver protocol, spoken here with aiohttp; under Xvfb, as WebKitGTK needs a display).

What this covers of Safari: its JavaScript engine (JavaScriptCore) and DOM running app.js and the pages, its file
inputs, fetch uploads and MP4 playback. What it does not: Debian builds WebKitGTK without WebRTC (no
RTCPeerConnection, where Safari has one, on Apple's own WebRTC stack), so the live avatar cannot be tested here; the
pages must then say so (`webrtcMissing` in app.js) and "Make a clip", which needs no WebRTC, must work. A WebKit with
WebRTC skips that case, saying so.

CI needs `apt-get install -y webkit2gtk-driver xvfb` (`bash scripts/setup.sh --dev` does it); without them this test
is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest
from server_helpers import run, running_server
from test_browser import _write_wav
from test_firefox import Tab, _free_port

DRIVER = shutil.which("WebKitWebDriver")
XVFB_RUN = shutil.which("xvfb-run")
MINIBROWSER = next(iter(sorted(glob.glob("/usr/lib/*/webkit2gtk-4.*/MiniBrowser"))), None)

pytestmark = pytest.mark.skipif(
    not (DRIVER and XVFB_RUN and MINIBROWSER),
    reason="needs WebKitGTK's WebDriver and MiniBrowser, and Xvfb (apt-get install -y webkit2gtk-driver xvfb)")


class WebKit(Tab):
    """One MiniBrowser window, over classic W3C WebDriver (HTTP)."""

    def __init__(self, http: aiohttp.ClientSession, base: str):
        self.http = http
        self.base = base  # http://127.0.0.1:PORT/session/ID

    async def call(self, method: str, path: str, body: dict | None = None, timeout: float = 60.0):
        """A command's value; AssertionError with WebKit's message for an error answer."""
        async with self.http.request(method, self.base + path, json=body,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            answer = await resp.json(content_type=None)
        value = answer.get("value") if isinstance(answer, dict) else None
        assert resp.status == 200, f"{method} {path}: HTTP {resp.status}: {value}"
        return value

    async def goto(self, url: str) -> None:
        await self.call("POST", "/url", {"url": url})

    async def evaluate(self, expression: str):
        """The value of a JS expression (awaited if a promise), through JSON."""
        script = (f"const done = arguments[0]; Promise.resolve().then(() => ({expression}))"
                  ".then((v) => done({ok: JSON.stringify(v ?? null)}), (e) => done({error: String(e)}));")
        value = await self.call("POST", "/execute/async", {"script": script, "args": []})
        assert "ok" in value, f"{expression}: {value}"
        return json.loads(value["ok"])

    async def _element(self, css: str) -> str:
        found = await self.call("POST", "/elements", {"using": "css selector", "value": css})
        assert len(found) == 1, f"{css}: {len(found)} elements"
        return next(iter(found[0].values()))

    async def set_files(self, css: str, path: Path) -> None:
        """Choose `path` in the file input `css`, as a user would."""
        await self.call("POST", f"/element/{await self._element(css)}/value", {"text": str(path)})

    async def click(self, css: str) -> None:
        """Click the element `css` as a user (WebDriver's element click: the mouse, at its centre)."""
        await self.call("POST", f"/element/{await self._element(css)}/click", {})


@contextlib.asynccontextmanager
async def webkit(directory: Path):
    """WebKitWebDriver under its own Xvfb display, and a session on a MiniBrowser window (its log in `directory`)."""
    port = _free_port()
    log = directory / "webkit.log"  # (a file: a pipe nobody reads would fill and stop it)
    with open(log, "wb") as out:
        proc = subprocess.Popen([XVFB_RUN, "-a", "-s", "-screen 0 1280x800x24", DRIVER, f"--port={port}"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,  # (a group: killed whole)
                                env={**os.environ, "WEBKIT_DISABLE_COMPOSITING_MODE": "1"})
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):  # it listens once Xvfb is up
                try:
                    async with http.get(f"http://127.0.0.1:{port}/status") as resp:
                        if (await resp.json(content_type=None))["value"]["ready"]:
                            break
                except (aiohttp.ClientError, KeyError, TypeError, ValueError):
                    pass
                assert proc.poll() is None, f"WebKitWebDriver exited: {log.read_text(errors='replace')[-2000:]}"
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"WebKitWebDriver never answered: {log.read_text(errors='replace')[-2000:]}")
            capabilities = {"webkitgtk:browserOptions": {"binary": MINIBROWSER, "args": [
                "--automation", "--enable-media-stream=true", "--enable-webrtc=true",
                "--enable-mock-capture-devices=true", "--media-playback-requires-user-gesture=false"]}}
            async with http.post(f"http://127.0.0.1:{port}/session",
                                 json={"capabilities": {"alwaysMatch": capabilities}}) as resp:
                answer = await resp.json(content_type=None)
            assert resp.status == 200, f"no WebKit session: {answer}"
            browser = WebKit(http, f"http://127.0.0.1:{port}/session/{answer['value']['sessionId']}")
            try:
                yield browser
            finally:
                with contextlib.suppress(Exception):
                    await browser.call("DELETE", "", timeout=10)
    finally:  # (off the loop: the server under test runs on it)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait)


async def _skip_if_webrtc(wk: WebKit) -> None:
    if await wk.evaluate("typeof RTCPeerConnection === 'function'"):
        pytest.skip("this WebKit has WebRTC: the no-WebRTC case does not apply (the live avatar in WebKit is not "
                    "tested here)")


def test_the_page_in_webkit_without_webrtc_says_so_and_makes_a_clip_of_an_audio_file(tiny_pipeline, tmp_path,
                                                                                   astronaut_png):
    """index.html in WebKit without WebRTC: the page says at once that this browser cannot show the avatar live and what
    to do, and Start says it again without making a session; "Make a clip" of a photo and an audio file chosen in the
    page uploads both, waits for the server's video and shows it, and WebKit plays it: the model's size, the speech's
    length, its time going on."""
    wav = tmp_path / "speech.wav"
    _write_wav(wav, 3.0)

    async def main():
        async with running_server(tiny_pipeline, recordings_dir=tmp_path / "videos") as srv, webkit(tmp_path) as wk:
            await wk.goto(f"{srv.url}/?source=file")
            await _skip_if_webrtc(wk)
            await wk.wait_for("document.getElementById('avatar').options.length > 0", 30, "the avatars")
            await wk.wait_for("document.getElementById('log').innerText.includes('WebRTC')", 10, "the page to say it")
            said = await wk.evaluate("document.getElementById('log').innerText")
            await wk.set_files("#audiofile", wav)
            await wk.set_files("#photo", astronaut_png)
            await wk.click("input[name=face][value=upload]")
            await wk.click("#start")
            await wk.wait_for("document.getElementById('log').innerText.split('WebRTC').length > 2", 10,
                              "Start to say it again")
            await asyncio.sleep(0.5)
            made_by_start = srv.manager.metrics.sessions_total
            await wk.click("#clip")
            await wk.wait_for("document.getElementById('clipdownload')", 120, "the clip")
            played = await wk.evaluate("""new Promise((ok) => {
              const v = document.getElementById('clipvideo');
              v.muted = true;
              v.play().catch(() => {});
              setTimeout(() => ok({width: v.videoWidth, height: v.videoHeight, duration: v.duration,
                                   time: v.currentTime, error: v.error && v.error.code}), 2000);
            })""")
            size = await wk.evaluate(
                "fetch(document.getElementById('clipdownload').href).then((r) => r.blob()).then((b) => b.size)")
            log = await wk.evaluate("document.getElementById('log').innerText")
            return said, made_by_start, played, size, log

    said, made_by_start, played, size, log = run(main())
    assert "this browser cannot show the avatar live: it has no WebRTC" in said, said
    assert '"Make a clip" works without it' in said and "Can't find variable" not in log, log
    assert made_by_start == 0  # Start made no session for nothing
    assert " done: " in log, log
    saved = list((tmp_path / "videos").glob("*.mp4"))
    assert len(saved) == 1 and saved[0].stat().st_size == size  # the page's clip is the server's video, whole
    assert played["error"] is None and (played["width"], played["height"]) == (32, 32), played
    assert 3.0 <= played["duration"] <= 4.5, played  # the 3 s of speech and the rest after it
    assert played["time"] > 0.5, played  # WebKit decodes and plays it


def test_the_overlay_in_webkit_without_webrtc_says_so(tiny_pipeline, tmp_path):
    """overlay.html in WebKit without WebRTC: it says so in words where its errors go, and makes no session."""
    async def main():
        async with running_server(tiny_pipeline) as srv, webkit(tmp_path) as wk:
            await wk.goto(f"{srv.url}/overlay")
            await _skip_if_webrtc(wk)
            await wk.wait_for("document.getElementById('error').innerText.includes('WebRTC')", 30,
                              "the overlay to say it")
            await asyncio.sleep(0.5)
            return await wk.evaluate("document.getElementById('error').innerText"), srv.manager.metrics.sessions_total

    text, made = run(main())
    assert "this browser cannot show the avatar live: it has no WebRTC" in text and "Make a clip" not in text, text
    assert made == 0
