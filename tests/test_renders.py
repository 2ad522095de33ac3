"""Renders (POST /v1/renders, `AvatarClient.render`): a video of an avatar saying an audio file or a text, made by a
session the server watches itself, saved whole once all the speech has been shown, and nothing saved when it does not
finish. Also what they stand on: `Session.audio_shown` and a recording that a close discards."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time

import numpy as np
import pytest

from conftest import cpu_share, skip_if_busy, speech_out, speechlike
from letstalk_rt.stream import EngineConfig, StreamEngine
from letstalk_rt.stream import engine as engine_module
from letstalk_rt.stream.events import RecordingStopped
from server_helpers import run
from test_engine import _push_in_real_time
from test_recording import _portrait, read_mp4

KEY = {"Authorization": "Bearer k"}


def test_audio_shown_turns_true_on_the_frame_that_plays_the_last_piece_pushed(tiny_pipeline, tmp_path):
    """Pushed audio is shown whole exactly when the frame holding its last sample is (idle frames before it, the
    silence end_speech adds after it, do not count); more audio pushed makes it false again, an interrupt true at once.
    A recording made with save_on_close=False is discarded by a close (no file) and saved by stop_recording."""
    speech = speechlike(1.0)  # 25 frames' audio exactly

    async def main():
        # a loaded machine's session falls behind: nothing may be played faster or skipped, so the speech shown is
        # exactly what was pushed, with held frames (silent fillers: generation was late) left out
        config = EngineConfig(warmup=False, catch_up_tempo=1.0, late_skip_ms=1e9)
        engine = await StreamEngine(tiny_pipeline, config).start()
        try:
            session = await engine.open_session(_portrait(tiny_pipeline))
            assert session.audio_shown  # nothing pushed yet
            kept = session.record(tmp_path / "kept.mp4", save_on_close=False)
            session.push_audio(speech)
            session.end_speech()
            assert not session.audio_shown
            shown = []
            async for frame in session.frames():
                shown.append(frame)  # a late window's held frame once delayed the last piece (~1 run in 8, 2 cores)
                if session.audio_shown:
                    break
                assert len(shown) < 200, "the speech was never all shown"
            played = speech_out(shown, drop_held=True)
            start = int(np.flatnonzero(played)[0])  # idle frames' audio is silent; the speech's first sample is not
            assert np.allclose(played[start:start + len(speech)], speech, atol=1e-6)
            assert 0 <= len(played) - start - len(speech) < session.samples_per_frame  # true on its last frame
            session.push_audio(speechlike(2.0, seed=1))
            assert not session.audio_shown
            async for _ in session.frames():
                if session.player.pieces_shown > 25:  # some of the new speech is on screen
                    break
            session.interrupt()
            assert session.audio_shown  # what an interrupt dropped is never shown
            assert await session.stop_recording() == tmp_path / "kept.mp4"
            assert kept.state == "finished" and (tmp_path / "kept.mp4").is_file()

            events = session.events()
            discarded = session.record(tmp_path / "discarded.mp4", save_on_close=False)
            async for _ in session.frames():
                if discarded.frames >= 5:
                    break
            await session.close()
            async for event in events:
                if isinstance(event, RecordingStopped) and event.error:
                    break
            assert "closed" in event.error and event.path == ""
            assert discarded.state == "failed"
        finally:
            await engine.stop()

    run(main())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.mp4"]  # no partial file of the discarded one


async def _live_and_unpaced(engine, speech: np.ndarray):
    """A live session watched and fed `speech` at a microphone's pace, and an unpaced one beside it: (the live one,
    the unpaced one, the frames the live one showed so far, (the watching and feeding tasks))."""
    pipe = engine.pipeline
    live = await engine.open_session(_portrait(pipe, 40))
    fast = await engine.open_session(_portrait(pipe, 200))
    fast.unpace()
    watched = []

    async def watch_live():
        async for frame in live.frames():
            watched.append(frame)

    tasks = asyncio.create_task(watch_live()), asyncio.create_task(_push_in_real_time(live, speech))
    return live, fast, watched, tasks


@pytest.mark.parametrize("free_rows", [0, 1])
def test_an_unpaced_session_shows_frames_as_soon_as_they_are_made_and_leaves_a_live_one_on_time(tiny_pipeline,
                                                                                                monkeypatch, free_rows):
    """Unpaced (a render's session), frames come as soon as they are made: every pushed sample once and in order, no
    held frame, no frame before its speech, a window's frames together (how much faster than real time that is
    depends on the room the machine has: docs/benchmarks.md measures it). Beside it a paced (live) session keeps real
    time: the unpaced one takes the time the live one leaves, and rides in its batches only where that is
    free (a CUDA graph's padded rows: `free_rows` 1; on a CPU, 0: never)."""
    from letstalk_rt.errors import LetsTalkError
    from letstalk_rt.stream.events import WindowTimings

    speech = speechlike(4.0, seed=5)  # 100 frames' audio exactly
    monkeypatch.setattr(engine_module, "UNPACED_BACKOFF_S", 0.0)  # a frame the live one held at its start: no pause
    monkeypatch.setitem(engine_module.UNPACED_LOAD, "cpu", 1.0)  # the tiny live one's load: the next test's business
    monkeypatch.setattr(engine_module, "UNPACED_MAX_WAIT_S", 10.0)  # no window forced (it would ride): a later test's
    if free_rows:
        monkeypatch.setattr(StreamEngine, "_free_rows", lambda self, batch: free_rows)

    async def main():
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False, max_batch=2)).start()
        try:
            live, fast, watched, (watching, feeding) = await _live_and_unpaced(engine, speechlike(12.0, seed=6))
            began = time.monotonic()
            with pytest.raises(LetsTalkError, match="no real-time tracks"):
                fast.video_track()
            await asyncio.sleep(1.0)  # the live session streams on its clock first
            fast.push_audio(speech, ahead=True)
            fast.end_speech()
            shown, came = [], []
            async for frame in fast.frames():
                shown.append(frame)
                came.append(time.monotonic())
                if fast.audio_shown:
                    break
            gaps = np.diff(came)
            with pytest.raises(LetsTalkError, match="clock started at its first read"):
                live.unpace()
            await asyncio.sleep(0.5)
            watching.cancel()
            feeding.cancel()
            watched_s = time.monotonic() - began
            timings = [e for e in _events(fast) if isinstance(e, WindowTimings)]
            batches, frames = [e.batch for e in timings], {e.frames for e in timings}
            assert frames == {engine.window}, frames  # the first too: no short one (it would not ride with the live)
            return shown, gaps, live.player.fillers, len(watched), len(watched) / 25 / watched_s, batches, fast.stats()
        finally:
            await engine.stop()

    share = cpu_share()
    shown, gaps, live_held, live_ticks, live_pace, batches, stats = run(main())
    played = np.concatenate([f.audio for f in shown])
    start = int(np.flatnonzero(played)[0])
    assert start == 0  # no idle frame before the speech: nothing was waiting on a clock
    assert np.allclose(played[:len(speech)], speech, atol=1e-6)  # all of it, once, in order, whole
    assert not any(f.filler for f in shown) and stats["fillers"] == 0
    assert stats["latency_ms_p50"] is None  # no clock: no latency figure
    # as soon as they are made: a window's frames come together (on a clock they would come a tick, 40 ms, apart). How
    # much faster than real time depends on the room the machine has: docs/benchmarks.md "Renders faster than real time"
    assert np.mean(gaps < 0.01) > 0.6, np.round(gaps, 3)  # (3 of each window's 4 frames; 0 on a clock)
    assert (2 in batches) == bool(free_rows)  # it rode in the live one's batches only where that was free
    skip_if_busy(share, cpu_share())  # (what follows needs a machine with room for both)
    # the live one kept its clock meanwhile: a held frame or 2 at its start, a few more in a slow spell of a shared VM
    # (11 of ~90 once in CI); one the render starved would hold about as many frames as the render took to make
    assert live_pace > 0.9 and live_held <= max(2, 0.15 * live_ticks), (live_held, live_ticks)


def test_an_unpaced_window_runs_alone_only_where_a_live_windows_deadline_leaves_room_for_both(tiny_pipeline):
    """A window of unpaced sessions alone starts only if every paced session's playback runs dry later than it and
    the paced one's own window would take (2 windows' compute + the safety margin): else the live one would be late.
    Nor for a while after a live one held a frame, nor while the live windows take over a quarter of the worker's time
    on a CPU (the machine has no room to spare)."""
    async def main():
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False, safety_ms=30)).start()
        engine._plan = lambda: []  # the worker makes nothing: the sessions stay as set below
        try:
            live = await engine.open_session(_portrait(tiny_pipeline, 40))
            fast = await engine.open_session(_portrait(tiny_pipeline, 200))
            fast.unpace()
            engine._gen_ms[4] = 50.0  # a window's compute: both need 130 ms before the live one runs dry
            now = time.monotonic()
            verdicts = [engine._time_for_unpaced([live, fast], 4, now)]  # the live clock has not started
            for ahead_s in (0.1, 0.2):  # the live one's next frame is due in 100 ms, then 200 ms
                live.player.start = now + ahead_s  # tick 0, nothing queued: it runs dry at its start
                verdicts.append(engine._time_for_unpaced([live, fast], 4, now))
            engine.held_at = now - engine_module.UNPACED_BACKOFF_S + 0.5  # the live one held a frame lately
            verdicts.append(engine._time_for_unpaced([live, fast], 4, now))
            engine.held_at = -math.inf
            engine._paced_ms.append((now - 1.0, 600.0))  # the live windows took 0.3 of the last 2 s: over a CPU's 0.25
            verdicts.append(engine._time_for_unpaced([live, fast], 4, now))
            engine._paced_ms.popleft()
            engine._paced_ms.append((now - 3.0, 1900.0))  # in the 2 s before: no more
            verdicts.append(engine._time_for_unpaced([live, fast], 4, now))
            return verdicts
        finally:
            await engine.stop()

    assert run(main()) == [True, False, True, False, False, True]


def test_an_unpaced_session_the_live_ones_never_leave_room_for_gets_a_window_each_max_wait(tiny_pipeline,
                                                                                               monkeypatch):
    """On a device past what it holds the live sessions never leave room (`_time_for_unpaced` always no, no free rows
    on a CPU): an unpaced session still gets a window each UNPACED_MAX_WAIT_S (alone, or in the live one's batch), so
    a render goes slowly instead of never finishing (it once waited for good beside a live session a loaded machine
    kept late)."""
    monkeypatch.setattr(StreamEngine, "_time_for_unpaced", lambda self, sessions, frames, now: False)
    monkeypatch.setattr(engine_module, "UNPACED_MAX_WAIT_S", 0.3)
    speech = speechlike(1.0, seed=3)  # 25 frames' audio exactly

    async def main():
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False)).start()
        batches = []
        execute = engine._execute
        engine._execute = lambda jobs, **kw: (batches.append((time.monotonic(), [s for s, _, _ in jobs])),
                                              execute(jobs, **kw))[1]
        try:
            live, fast, watched, (watching, feeding) = await _live_and_unpaced(engine, speechlike(30.0, seed=4))
            await asyncio.sleep(0.5)
            fast.push_audio(speech, ahead=True)
            fast.end_speech()
            shown = []

            async def read():
                async for frame in fast.frames():
                    shown.append(frame)
                    if fast.audio_shown:
                        break

            await asyncio.wait_for(read(), 60)  # ~7 windows 0.3 s apart; before UNPACED_MAX_WAIT_S, never
            live_during = len(watched)
            watching.cancel()
            feeding.cancel()
            return shown, batches, fast, live_during
        finally:
            await engine.stop()

    shown, batches, fast, live_during = run(main())
    assert np.allclose(speech_out(shown)[:len(speech)], speech, atol=1e-6)  # all of it, once, in order
    theirs = [(t, sessions) for t, sessions in batches if fast in sessions]
    assert len(theirs) >= 3 and all(sessions[-1] is fast and len(sessions) <= 2 for _, sessions in theirs)
    assert np.diff([t for t, _ in theirs]).min() >= 0.3  # none sooner than the wait: the live ones left no room
    assert live_during > 25  # the live one went on meanwhile


def test_an_unpaced_session_that_waited_rides_in_the_live_batch_where_its_window_is_as_long(tiny_pipeline):
    """Once an unpaced session has waited UNPACED_MAX_WAIT_S it goes: in the paced sessions' batch where its window has
    their length and the batch a row left (a row costs a GPU little), else alone; before that, not at all (no room,
    no free rows on a CPU)."""
    async def main():
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False, max_batch=2)).start()
        engine._plan = lambda: []  # the worker makes nothing: the plans are made below
        engine._time_for_unpaced = lambda sessions, frames, now: False  # the live one never leaves room
        try:
            live = await engine.open_session(_portrait(tiny_pipeline, 40))
            fast = await engine.open_session(_portrait(tiny_pipeline, 200))
            fast.unpace()
            now = time.monotonic()
            pick = lambda n: engine._pick([(now, live, 4, 0), (math.inf, fast, n, 0)], [live, fast], now)  # noqa
            fast._w.waiting_since = now - engine_module.UNPACED_MAX_WAIT_S + 0.1
            picks = [pick(4)]  # not waited long enough: the live one alone
            fast._w.waiting_since = now - engine_module.UNPACED_MAX_WAIT_S
            picks += [pick(4), pick(2)]  # rides along; a window of another length (none of a render's) goes alone
            engine.config.max_batch = 1
            picks.append(pick(4))  # no row left in the live batch: alone
            return [[(s is fast, n) for s, n, _ in p] for p in picks]
        finally:
            await engine.stop()

    assert run(main()) == [[(False, 4)], [(False, 4), (True, 4)], [(True, 2)], [(True, 4)]]


def test_a_batch_takes_unpaced_sessions_along_only_in_the_rows_a_cuda_graph_pads_anyway(tiny_pipeline, monkeypatch):
    engine = StreamEngine(tiny_pipeline, EngineConfig(warmup=False))
    assert [engine._free_rows(b) for b in (1, 3, 4)] == [0, 0, 0]  # a CPU: every row costs its share
    monkeypatch.setattr(tiny_pipeline, "cuda_graphs", True)
    monkeypatch.setattr(tiny_pipeline, "noise_draws", 1)
    assert [engine._free_rows(b) for b in (1, 3, 4, 9, 128, 129)] == [0, 1, 0, 3, 0, 0]  # buckets 1 4 4 12 128 -
    monkeypatch.setattr(tiny_pipeline, "noise_draws", 2)
    assert [engine._free_rows(b) for b in (1, 3, 5)] == [0, 1, 1]  # 2 draws each: rows 2 -> 2, 6 -> 8, 10 -> 12


def _events(session) -> list:
    out = []
    while not session._events.empty():
        out.append(session._events.get_nowait())
    return out


def _envelope(audio: np.ndarray, rate: int, fps: int = 25) -> np.ndarray:
    n = rate // fps
    return np.sqrt(np.mean(np.square(audio[:len(audio) // n * n].reshape(-1, n)), axis=1))


def test_a_renders_state_says_its_speed_over_its_last_seconds_and_the_time_left(monkeypatch):
    """GET /v1/renders/{id}'s speed is the video made per second over the last SPEED_S (a render that stopped getting
    frames slows to 0: it does not keep its old speed), the time left is the speech and rest not made yet at that speed,
    unknown before a second of frames or while a text's length is; it says how many live sessions share its device.
    Done, its speed over its whole run."""
    from types import SimpleNamespace

    from letstalk_rt.server import renders

    clock = [100.0]
    monkeypatch.setattr(renders.time, "monotonic", lambda: clock[0])
    render = renders.Render("r", None, 20.0 - renders.REST_S, "http://x/v1/recordings/r")
    live = SimpleNamespace(player=SimpleNamespace(paced=True), closed=False)
    gone = SimpleNamespace(player=SimpleNamespace(paced=True), closed=True)
    session = SimpleNamespace(player=SimpleNamespace(tick=0, fps=25, paced=False), closed=False)
    session.engine = SimpleNamespace(sessions={"r": session, "a": live, "b": gone})

    def made(seconds, speed):  # `speed` s of video a second, for `seconds`, as its frames come
        for _ in range(round(seconds * 25)):
            clock[0] += 1 / 25 / speed
            session.player.tick += 1
            render.made_now(session.player.tick / 25)

    state = render.describe(session)
    assert state["speed"] is None and state["eta_seconds"] is None and state["live_sessions"] == 1  # nothing made yet
    made(1.0, 2.0)
    assert render.describe(session)["speed"] is None  # half a second: too soon to say
    made(6.0, 2.0)
    state = render.describe(session)
    assert state["speed"] == pytest.approx(2.0) and state["eta_seconds"] == pytest.approx(13.0 / 2.0, abs=0.1)
    made(4.0, 0.5)  # slower: past SPEED_S only the slow frames count
    state = render.describe(session)
    assert state["rendered_seconds"] == 11.0 and state["speed"] == pytest.approx(0.5, abs=0.01)
    assert state["eta_seconds"] == pytest.approx(9.0 / 0.5, abs=0.5)
    assert len(render.made) <= renders.SPEED_S * 25 + 2  # it keeps the last SPEED_S of frames, not every one
    clock[0] += 2.0  # no frame for 2 s: slower, a longer wait
    later = render.describe(session)
    assert later["speed"] == pytest.approx(0.5 * 3 / 5, abs=0.01) and later["eta_seconds"] > state["eta_seconds"]
    clock[0] += renders.SPEED_S
    later = render.describe(session)
    assert later["speed"] == 0.0 and later["eta_seconds"] is None  # stalled (STALL_S fails it)
    render.speech_s = None  # a text not synthesised yet: its length, so the time left, is not known
    assert render.describe(session)["eta_seconds"] is None
    render.created_at = time.time() - 25.0  # posted; its session opened 5 s later (it waited in the queue)
    render.started_at = render.created_at + 5.0
    render.video_s = 10.2
    render.end("done")
    state = render.describe()
    assert state["speed"] == pytest.approx(10.2 / 20.0, rel=0.01) and state["eta_seconds"] == 0.0 and not render.made
    assert state["seconds_taken"] == pytest.approx(25.0, abs=0.1)  # its wait counts there
    assert "live_sessions" not in state  # only while it is made


def test_the_finished_renders_kept_are_the_last_ones_and_never_a_queued_one(monkeypatch):
    """GET /v1/renders/{id} answers for the last KEPT finished renders; one waiting in the queue is never forgotten to
    make room for them, nor is one being made."""
    from letstalk_rt.server import renders

    monkeypatch.setattr(renders, "KEPT", 1)
    kept = renders.Renders()
    waiting = renders.Render("q", None, 1.0, "u", state="queued")
    making = renders.Render("m", None, 1.0, "u")
    kept.add(waiting)
    kept.add(making)
    for rid in ("a", "b", "c"):
        done = renders.Render(rid, None, 1.0, "u")
        kept.add(done)
        done.end("done")
        kept.ended(done)
    assert list(kept.all) == ["q", "m", "c"] and kept.position(waiting) == 1 and kept.results["done"] == 3
    waiting.end("cancelled")
    kept.ended(waiting)
    assert list(kept.all) == ["m", "q"] and not kept.queue and kept.position(waiting) is None


def test_a_render_of_an_audio_file_is_the_avatar_saying_all_of_it_saved_once_done(tiny_pipeline, tmp_path, wav_file):
    """POST /v1/renders with an audio upload (22.05 kHz here): 202 at once, 409 for its video while it is made, then
    `done`, and the video is the avatar saying the whole file, once, in order, and a short rest after it; the session
    it used is closed and its slot free. Refused with a clear 422 before any session opens: no recordings folder,
    audio and text both or neither, a file that is not audio, a voice for an upload; 404 for a render nobody made."""
    import aiohttp

    from server_helpers import create_session, running_server, wait_until

    wav = wav_file(1.6, rate=22050)

    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            form = aiohttp.FormData()
            form.add_field("audio", wav.read_bytes(), filename="speech.wav")
            async with http.post(f"{srv.url}/v1/renders", data=form) as r:
                assert r.status == 422 and "--recordings-dir" in (await r.json())["error"]
        async with running_server(tiny_pipeline, api_key="k", recordings_dir=tmp_path / "videos") as srv, \
                aiohttp.ClientSession() as http:
            for fields, says in [({"text": "Hi.", "audio": wav.read_bytes()}, "not both"),
                                 ({"avatar_id": "default"}, "either an `audio` file"),
                                 ({"audio": b"not audio at all"}, "audio upload"),
                                 ({"audio": wav.read_bytes(), "voice": "en-us"}, "played as it is"),
                                 ({"audio": wav.read_bytes(), "avatar_id": "nobody"}, "unknown avatar_id")]:
                form = aiohttp.FormData()
                for name, value in fields.items():
                    form.add_field(name, value, **({"filename": name} if isinstance(value, bytes) else {}))
                async with http.post(f"{srv.url}/v1/renders", data=form, headers=KEY) as r:
                    assert r.status == 422 and says in (await r.json())["error"], (fields.keys(), await r.text())
            assert not srv.engine.sessions  # none was opened, by any of them
            async with http.get(f"{srv.url}/v1/renders/nobody", headers=KEY) as r:
                assert r.status == 404
            live = await create_session(http, srv.url, headers=KEY)
            async with http.delete(f"{srv.url}/v1/renders/{live['session_id']}", headers=KEY) as r:
                assert r.status == 404 and "is a live session" in (await r.json())["error"]
            assert live["session_id"] in srv.engine.sessions  # a DELETE of renders never closes a live session
            async with http.delete(f"{srv.url}/v1/sessions/{live['session_id']}", headers=KEY) as r:
                assert r.status == 204
            form = aiohttp.FormData()
            form.add_field("audio", wav.read_bytes(), filename="speech.wav")
            async with http.post(f"{srv.url}/v1/renders", data=form, headers=KEY) as r:
                assert r.status == 202, await r.text()
                info = await r.json()
            rid = info["render_id"]
            assert info["state"] == "rendering" and info["speech_seconds"] == 1.6
            assert info["status_url"] == f"{srv.url}/v1/renders/{rid}"
            assert info["video_url"] == f"{srv.url}/v1/recordings/{rid}"
            mine = {"Authorization": f"Bearer {info['token']}"}
            async with http.get(info["video_url"], headers=mine) as r:
                assert r.status == 409 and "still being made" in (await r.json())["error"]
            offer = {**mine, "Content-Type": "application/sdp"}
            async with http.post(f"{srv.url}/v1/sessions/{rid}/offer", data="v=0", headers=offer) as r:
                assert r.status == 409 and "is a render" in (await r.json())["error"]  # no speech into it
            async with http.get(f"{srv.url}/v1/sessions/{rid}/ws", headers=mine) as r:
                assert r.status == 409 and f"/v1/renders/{rid}" in (await r.json())["error"]
            async with http.post(f"{srv.url}/v1/sessions/{rid}/viewers", data="v=0", headers=offer) as r:
                assert r.status == 409 and "not in real time" in (await r.json())["error"]  # no live tracks
            state, polled = info, []
            assert info["live_sessions"] == 0 and info["speed"] is None and info["eta_seconds"] is None
            while state["state"] == "rendering":
                polled.append(state)
                await asyncio.sleep(0.1)
                async with http.get(info["status_url"], headers=mine) as r:
                    assert r.status == 200
                    state = await r.json()
            assert state["state"] == "done", state
            assert all(p["live_sessions"] == 0 and "eta_seconds" in p for p in polled)  # (the figures: the test above)
            assert state["eta_seconds"] == 0.0 and state["speed"] == pytest.approx(
                state["rendered_seconds"] / state["seconds_taken"], rel=0.05)
            assert state["captions_url"] is None and state["rendered_seconds"] >= 1.6
            async with http.get(info["video_url"], headers=mine) as r:
                assert r.status == 200 and r.content_type == "video/mp4"
                (tmp_path / "render.mp4").write_bytes(await r.read())
            await wait_until(lambda: not srv.engine.sessions, 5, "the render's session to close")
            assert srv.manager.renders.all[rid].source is None  # a finished render kept holds no audio
            async with http.get(f"{srv.url}/health") as r:
                assert (await r.json())["sessions"] == 0
            async with http.get(f"{srv.url}/metrics") as r:
                metrics = await r.text()
            assert 'letstalk_renders_total{result="done"} 1' in metrics and "letstalk_renders_active 0" in metrics
            return state

    state = run(main())
    frames, audio, rate = read_mp4(tmp_path / "render.mp4")
    assert abs(len(frames) / 25 - state["rendered_seconds"]) < 0.1
    said, heard = _envelope(speechlike(1.6, 22050), 22050), _envelope(audio, rate)
    scores = np.nan_to_num([np.corrcoef(said, heard[k:k + len(said)])[0, 1]
                            for k in range(len(heard) - len(said) + 1)], nan=-1.0)  # nan: a window all silent
    lag = int(np.argmax(scores))
    assert scores[lag] > 0.9  # the whole speech is in it, in order (AAC and resampling blur it a little)
    before = audio[:max(0, lag - 1) * rate // 25]
    assert not before.size or np.abs(before).max() < 0.02  # before it, silence: nothing said twice or early
    rest = len(heard) - lag - len(said)  # frames after it: the rest (REST_S), not long waiting
    assert 12 <= rest <= 20, rest


def test_a_render_that_does_not_finish_leaves_no_video(tiny_pipeline, tmp_path, wav_file, monkeypatch):
    """A render cancelled (DELETE /v1/renders/{id}), whose session is closed under it (DELETE /v1/sessions/{id}) or
    whose recording fails (a full disk) or that stalls (no frame for STALL_S, a live session beside it or not) saves
    nothing: no file in the recordings folder, its state and the webhooks say why, and the SDK's render() raises
    RenderFailedError. Speech longer than the session time limit allows is refused at once."""
    import aiohttp

    from letstalk_rt.client import AvatarClient, RenderFailedError
    from letstalk_rt.errors import OutputError
    from letstalk_rt.media import VideoWriter
    from letstalk_rt.server import renders
    from server_helpers import running_server, wait_until
    from test_webhooks import receiver

    wav = wav_file(20.0)
    videos = tmp_path / "videos"

    async def post(http, url):
        form = aiohttp.FormData()
        form.add_field("audio", wav.read_bytes(), filename="speech.wav")
        async with http.post(f"{url}/v1/renders", data=form, headers=KEY) as r:
            assert r.status == 202, await r.text()
            return await r.json()

    async def main():
        async with running_server(tiny_pipeline, api_key="k", recordings_dir=videos, max_session_s=15) as srv, \
                aiohttp.ClientSession() as http:
            form = aiohttp.FormData()
            form.add_field("audio", wav.read_bytes(), filename="speech.wav")
            async with http.post(f"{srv.url}/v1/renders", data=form, headers=KEY) as r:
                assert r.status == 422 and "at most 5 s (its session's time limit" in (await r.json())["error"]
        async with receiver() as (hook, got), \
                running_server(tiny_pipeline, api_key="k", recordings_dir=videos, webhooks=[hook]) as srv, \
                aiohttp.ClientSession() as http:
            cancelled = await post(http, srv.url)
            session = srv.engine.sessions[cancelled["render_id"]]
            await wait_until(lambda: session.player.speech_frames >= 10, 60, "the render to be under way")
            async with http.delete(cancelled["status_url"], headers=KEY) as r:
                assert r.status == 204
            async with http.get(cancelled["status_url"], headers=KEY) as r:
                assert r.status == 404  # a cancelled render is forgotten
            closed = await post(http, srv.url)
            session = srv.engine.sessions[closed["render_id"]]
            await wait_until(lambda: session.player.speech_frames >= 10, 60, "the second render to be under way")
            async with http.delete(f"{srv.url}/v1/sessions/{closed['render_id']}", headers=KEY) as r:
                assert r.status == 204
            async with http.get(closed["status_url"], headers=KEY) as r:
                state = await r.json()
            assert state["state"] == "failed" and "deleted by the client" in state["error"], state
            assert state["retryable"] is False  # its session ended on purpose: made again, it would be again
            async with http.get(closed["video_url"], headers=KEY) as r:
                assert r.status == 404 and "deleted by the client" in (await r.json())["error"]
            async with http.get(f"{srv.url}/metrics") as r:
                metrics = await r.text()
            assert 'letstalk_renders_total{result="cancelled"} 1' in metrics
            assert 'letstalk_renders_total{result="failed"} 1' in metrics

            def full(self, rgb):
                raise OutputError("no space left on the device (made up)")

            monkeypatch.setattr(VideoWriter, "write_frame", full)
            disk = await post(http, srv.url)
            await wait_until(lambda: disk["render_id"] not in srv.engine.sessions, 30, "the render to end at once")
            async with http.get(disk["status_url"], headers=KEY) as r:
                state = await r.json()
            assert state["state"] == "failed" and "no space left" in state["error"], state
            assert state["retryable"] is True  # the server's disk, not the request
            monkeypatch.undo()
            told = lambda: [e["data"] for e in map(json.loads, (body for _, body in got))  # noqa: E731
                            if e["type"].startswith("render.")]
            await wait_until(lambda: len(told()) == 3, 10, "the three renders' webhooks")
            assert [(e["render_id"], e["state"]) for e in told()] == [
                (cancelled["render_id"], "cancelled"), (closed["render_id"], "failed"), (disk["render_id"], "failed")]
            assert "no space left" in told()[2]["error"] and told()[0]["error"] == "cancelled by the client"

            # a render that gets no frame for STALL_S fails, live sessions beside it or not (the engine gives it a
            # window each UNPACED_MAX_WAIT_S even where they leave no room): here a worker that makes nothing
            async with http.post(f"{srv.url}/v1/sessions", json={"avatar_id": "default"}, headers=KEY) as r:
                assert r.status == 201
                live = await r.json()
            monkeypatch.setattr(renders, "STALL_S", 1.0)
            monkeypatch.setattr(srv.engine, "_plan", lambda: [])
            stalled = await post(http, srv.url)
            await wait_until(lambda: stalled["render_id"] not in srv.engine.sessions, 30, "the stalled render to end")
            monkeypatch.undo()
            async with http.get(stalled["status_url"], headers=KEY) as r:
                state = await r.json()
            assert state["state"] == "failed" and state["error"] == "the render stalled: no frame was made for 1 s"
            assert state["retryable"] is True
            assert srv.engine.sessions[live["session_id"]].player.paced  # the live one is still there
            async with http.delete(f"{srv.url}/v1/sessions/{live['session_id']}", headers=KEY) as r:
                assert r.status == 204

            async with AvatarClient(srv.url, api_key="k") as client:
                task = asyncio.ensure_future(client.render(tmp_path / "sdk.mp4", audio=wav))
                await wait_until(lambda: any(s.player.speech_frames >= 10 for s in srv.engine.sessions.values()), 60,
                                 "the SDK's render to be under way")
                (rid,) = srv.engine.sessions
                async with http.delete(f"{srv.url}/v1/sessions/{rid}", headers=KEY) as r:
                    assert r.status == 204
                with pytest.raises(RenderFailedError, match="failed: .*deleted by the client") as failed:
                    await task
                assert failed.value.retryable is False and failed.value.state["render_id"] == rid
            assert not (tmp_path / "sdk.mp4").exists()

    run(main())
    assert list(videos.iterdir()) == []  # no partial video anywhere, hidden or not


def test_the_sdk_asks_again_for_a_render_that_failed_where_asking_again_may_do(tiny_pipeline, tmp_path, wav_file,
                                                                              monkeypatch):
    """client.render(): a render that fails for a reason of the server's (its disk, here; a device, a stop) or that the
    server no longer knows (404: it restarted, or another client cancelled it) is asked for again through the same URL,
    the files read once, and the video of the one that was made is saved; with `retries=0` the failure is raised
    (RenderFailedError, retryable). (A failure of the request's own is not asked again: the SDK's case of the test
    above.) A path the video cannot be saved at is refused before anything goes up."""
    from letstalk_rt.client import AvatarClient, RenderFailedError
    from letstalk_rt.errors import OutputError
    from letstalk_rt.media import VideoWriter
    from server_helpers import running_server, wait_until

    wav = wav_file(1.0)
    write_frame = VideoWriter.write_frame
    failing = [1]  # renders whose recording fails, from the next one on

    def full_once(self, rgb):
        if failing[0]:
            failing[0] -= 1
            raise OutputError("no space left on the device (made up)")
        return write_frame(self, rgb)

    monkeypatch.setattr(VideoWriter, "write_frame", full_once)

    async def main():
        async with running_server(tiny_pipeline, api_key="k", recordings_dir=tmp_path / "videos") as srv, \
                AvatarClient(srv.url, api_key="k") as client:
            for out, says in ((tmp_path / "no" / "out.mp4", "does not exist"), (tmp_path / "out.txt", "as MP4"),
                              (tmp_path, "is a directory")):
                with pytest.raises(OutputError, match=says):
                    await client.render(out, audio=wav)
            assert not srv.manager.renders.all  # none was asked for
            asked: list[str] = []

            def seen(state):
                if state["render_id"] not in asked:
                    asked.append(state["render_id"])

            done = await client.render(tmp_path / "again.mp4", audio=wav, on_progress=seen, poll_s=0.1)
            failing[0] = 1
            with pytest.raises(RenderFailedError, match="no space left") as failed:
                await client.render(tmp_path / "once.mp4", audio=wav, retries=0, poll_s=0.1)

            lost_first: list[str] = []

            async def cancel(rid):
                async with client._http.delete(f"{srv.url}/v1/renders/{rid}", headers=KEY) as r:
                    assert r.status == 204

            def forget(state):  # the server forgets the first one (cancelled: 404 after, as from one that restarted)
                if not lost_first:
                    lost_first.append(state["render_id"])
                    asyncio.ensure_future(cancel(state["render_id"]))

            lost = await client.render(tmp_path / "lost.mp4", audio=wav, on_progress=forget, poll_s=0.1)
            await wait_until(lambda: not srv.engine.sessions, 30, "the renders' sessions closed")
            return done, asked, failed.value, lost, lost_first

    done, asked, failed, lost, lost_first = run(main())
    assert done["state"] == "done" and len(asked) == 2 and done["render_id"] == asked[1] != asked[0]
    assert (tmp_path / "again.mp4").is_file() and len(read_mp4(tmp_path / "again.mp4")[0]) >= 25
    assert failed.retryable is True and not (tmp_path / "once.mp4").exists()
    assert lost["state"] == "done" and lost["render_id"] != lost_first[0] and (tmp_path / "lost.mp4").is_file()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (scripts/setup.sh installs it)")
def test_renders_asked_with_queue_wait_in_turn_for_a_session_slot(tiny_pipeline, tmp_path, wav_file, monkeypatch):
    """On a server whose session slots are all in use a render asked without `queue` is refused (503, saying it could
    queue) and one with it waits: 202 "queued" with its place, first come first served, at most --render-queue of
    them (then 503); its video is 409 meanwhile, and a DELETE gives its place up. Once the live session ends the
    queued renders are made in turn, each one whole; the SDK's render() waits through the queue (and asks a server
    older than the queue without it). One whose session cannot open when its turn comes (no face in its portrait)
    fails saying why; the server stopping fails those still queued."""
    import aiohttp

    from letstalk_rt.client import AvatarClient
    from letstalk_rt.server import app as app_module
    from server_helpers import create_session, running_server, wait_until

    wav = wav_file(1.2, rate=22050)

    async def post(http, url, queue):
        form = aiohttp.FormData()
        form.add_field("audio", wav.read_bytes(), filename="speech.wav")
        if queue is not None:
            form.add_field("queue", queue)
        async with http.post(f"{url}/v1/renders", data=form, headers=KEY) as r:
            return r.status, await r.json()

    async def state(http, info):
        async with http.get(info["status_url"], headers={"Authorization": f"Bearer {info['token']}"}) as r:
            assert r.status == 200
            return await r.json()

    async def main():
        async with running_server(tiny_pipeline, max_sessions=1, api_key="k", recordings_dir=tmp_path / "videos",
                                  render_queue=2) as srv, aiohttp.ClientSession() as http:
            live = await create_session(http, srv.url, headers=KEY)
            status, refused = await post(http, srv.url, None)
            assert status == 503 and "ask for a place in the render queue" in refused["error"], refused
            (s1, first), (s2, second), (s3, third) = [await post(http, srv.url, "true") for _ in range(3)]
            assert (s1, s2, s3) == (202, 202, 503), third
            assert "the render queue holds 2 already" in third["error"]
            assert first["state"] == "queued" and (first["queue_position"], second["queue_position"]) == (1, 2)
            async with http.get(f"{srv.url}/v1/renders", params={"state": "queued"}, headers=KEY) as r:
                listed = [(x["render_id"], x["queue_position"]) for x in (await r.json())["renders"]]
                assert listed == [(first["render_id"], 1), (second["render_id"], 2)]  # GET /v1/renders: in turn
            async with http.get(f"{srv.url}/v1/renders", params={"state": "waiting"}, headers=KEY) as r:
                assert r.status == 422 and "give one of queued, rendering" in (await r.json())["error"]
            async with http.get(f"{srv.url}/v1/renders") as r:
                assert r.status == 401
            async with http.get(first["video_url"], headers=KEY) as r:
                assert r.status == 409 and "is queued" in (await r.json())["error"]
            async with http.get(f"{srv.url}/metrics") as r:
                assert "letstalk_renders_queued 2" in await r.text()
            async with http.get(f"{srv.url}/health") as r:
                health = await r.json()
                assert (health["renders_queued"], health["sessions"], health["max_sessions"]) == (2, 1, 1)
            async with http.delete(first["status_url"], headers=KEY) as r:
                assert r.status == 204
            assert (await state(http, second))["queue_position"] == 1  # the first gave its place up
            seen = []
            async with AvatarClient(srv.url, api_key="k") as client:
                sdk = asyncio.ensure_future(client.render(tmp_path / "sdk.mp4", audio=wav, poll_s=0.1,
                                                          on_progress=seen.append))
                await wait_until(lambda: seen and seen[-1].get("queue_position") == 2, 20, "the SDK's render queued")
                await asyncio.sleep(0.5)
                assert list(srv.engine.sessions) == [live["session_id"]]  # none starts while the live one holds it
                async with http.delete(f"{srv.url}/v1/sessions/{live['session_id']}", headers=KEY) as r:
                    assert r.status == 204
                done = await asyncio.wait_for(sdk, 120)
            made = await state(http, second)
            fields = app_module.RENDER_FIELDS
            monkeypatch.setattr(app_module, "RENDER_FIELDS", fields[:-1])  # a server older than the queue
            async with AvatarClient(srv.url, api_key="k") as client:
                old = await client.render(tmp_path / "old.mp4", audio=wav)
            monkeypatch.setattr(app_module, "RENDER_FIELDS", fields)
            opened = app_module._open_checked

            async def no_face(app, opening, session_id=None):  # what only opening finds: no face in the portrait
                if session_id is not None:
                    raise app_module.api_error(422, "no face was found in the portrait")
                return await opened(app, opening)

            monkeypatch.setattr(app_module, "_open_checked", no_face)
            live = await create_session(http, srv.url, headers=KEY)
            _, faceless = await post(http, srv.url, "yes")
            async with http.delete(f"{srv.url}/v1/sessions/{live['session_id']}", headers=KEY) as r:
                assert r.status == 204
            await wait_until(lambda: srv.manager.renders.all[faceless["render_id"]].state != "queued", 20,
                             "the faceless render to start")
            failed = await state(http, faceless)
            await create_session(http, srv.url, headers=KEY)  # its slot: free again
            _, stranded = await post(http, srv.url, "1")
            assert srv.manager.renders.reading == 0  # (bodies read to be queued: each counted out)
            async with AvatarClient(srv.url, api_key="k") as client:
                finished = [x["render_id"] for x in await client.renders("done")]
            assert finished == [made["render_id"], done["render_id"], old["render_id"]]  # the first asked first
            return made, done, seen, old, failed, stranded, srv.manager.renders

    made, done, seen, old, failed, stranded, kept = run(main())
    assert failed["state"] == "failed" and failed["error"] == "no face was found in the portrait"
    assert failed["retryable"] is False  # what the request holds: made again, it fails again
    assert made["state"] == "done" and done["state"] == "done" and old["state"] == "done"
    assert made["finished_at"] < done["finished_at"]  # in turn: the one queued first was made first
    assert [s["state"] for s in seen][:1] == ["queued"] and seen[-1]["state"] == "rendering"
    frames, audio, rate = read_mp4(tmp_path / "sdk.mp4")
    assert len(frames) >= 1.2 * 25 and np.abs(audio).max() > 0.05  # the whole speech, said
    assert (tmp_path / "old.mp4").is_file()
    stopped = kept.all[stranded["render_id"]]  # still queued as the server stopped
    assert stopped.state == "failed" and "the server stopped before a session slot freed" in stopped.error
    assert stopped.describe()["retryable"] is True  # on another server, or this one once back
    assert sorted(p.stem for p in (tmp_path / "videos").glob("*.mp4")) == sorted(
        [made["render_id"], done["render_id"], old["render_id"]])  # nothing of the cancelled or the stranded


def test_a_renders_token_is_renewed_while_it_waits_and_is_made(tiny_pipeline, tmp_path, wav_file):
    """A render may wait and be made for longer than its token holds (--token-ttl from the POST): while it is queued
    or rendering, each GET of its state answers with a new token, so a holder of the token alone (the page) that
    follows it with the newest one still reads its state and fetches its video after the first expired."""
    import aiohttp

    from server_helpers import create_session, running_server

    wav = wav_file(1.0, rate=16000)

    async def main():
        async with running_server(tiny_pipeline, max_sessions=1, api_key="k", recordings_dir=tmp_path / "videos",
                                  token_ttl_s=3) as srv, aiohttp.ClientSession() as http:
            live = await create_session(http, srv.url, headers=KEY)
            form = aiohttp.FormData()
            form.add_field("audio", wav.read_bytes(), filename="speech.wav")
            form.add_field("queue", "true")
            async with http.post(f"{srv.url}/v1/renders", data=form, headers=KEY) as r:
                assert r.status == 202
                info = await r.json()
            token, answers = info["token"], []

            async def state() -> dict:
                nonlocal token
                async with http.get(info["status_url"], headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 200, await r.text()
                    answers.append(await r.json())
                token = answers[-1].get("token", token)
                return answers[-1]

            while time.time() < info["expires_at"] + 0.5:  # queued past its first token
                assert (await state())["state"] == "queued"
                await asyncio.sleep(0.5)
            async with http.get(info["status_url"], headers={"Authorization": f"Bearer {info['token']}"}) as r:
                assert r.status == 401 and "invalid render token (token expired)" in (await r.json())["error"]
            async with http.delete(f"{srv.url}/v1/sessions/{live['session_id']}", headers=KEY) as r:
                assert r.status == 204
            deadline = time.monotonic() + 60
            while (await state())["state"] in ("queued", "rendering"):
                assert time.monotonic() < deadline, answers[-1]
                await asyncio.sleep(0.5)
            async with http.get(answers[-1]["video_url"], headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
                video = await r.read()
            return answers, video

    answers, video = run(main())
    assert answers[-1]["state"] == "done" and "token" not in answers[-1]  # renewed only while it waits or is made
    assert answers[-2]["expires_at"] > answers[0]["expires_at"]  # a newer one each time, not the first again
    assert len(video) > 1000


def test_the_sdk_renders_a_text_with_its_captions(tiny_pipeline, tmp_path):
    """AvatarClient.render(text=...): the text is spoken with the voice asked for, the video and its captions saved."""
    from letstalk_rt.client import AvatarClient, RequestError
    from server_helpers import running_server

    async def main():
        async with running_server(tiny_pipeline, recordings_dir=tmp_path / "videos") as srv:
            async with AvatarClient(srv.url) as client:
                with pytest.raises(RequestError, match="HTTP 422.*rate"):
                    await client.render(tmp_path / "x.mp4", text="Hello.", rate=5)
                state = await client.render(tmp_path / "hello.mp4", text="Hello there. How are you?", voice="en-us",
                                            poll_s=0.1)
                await client.download_captions(state["render_id"], tmp_path / "hello.vtt")
            return state

    state = run(main())
    assert state["state"] == "done" and state["speech_seconds"] > 1.0
    assert state["captions_url"].endswith(f"/v1/recordings/{state['render_id']}/captions")
    frames, audio, _ = read_mp4(tmp_path / "hello.mp4")
    assert len(frames) / 25 >= state["speech_seconds"] and np.abs(audio).max() > 0.05
    captions = (tmp_path / "hello.vtt").read_text()
    assert "Hello there." in captions and "How are you?" in captions
    assert not (tmp_path / "x.mp4").exists()


def test_letstalk_generate_with_a_server_has_the_video_made_there_in_an_install_without_the_engine(
        tiny_pipeline, tmp_path, wav_file, astronaut_png):
    """`letstalk generate --server URL` in an install of the SDK alone (the engine's packages unimportable): the server
    makes the video of the portrait saying the file (or a text, its captions saved beside it); the flags of a model run
    here are refused, naming them, before anything goes up; a server that is not there is one line."""
    import subprocess
    import sys

    from server_helpers import running_server
    from without_engine import PRELUDE

    wav = wav_file(1.6, rate=22050)

    def generate(*args: str) -> subprocess.CompletedProcess:
        code = PRELUDE + f"import sys; from letstalk_rt.cli import main; sys.exit(main({list(args)!r}))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    async def main():
        async with running_server(tiny_pipeline, recordings_dir=tmp_path / "videos") as srv:
            base = ["generate", "--server", srv.url, "--portrait", str(astronaut_png), "--quiet"]
            return await asyncio.gather(
                asyncio.to_thread(generate, *base[:-1], "--audio", str(wav), "--out", str(tmp_path / "file.mp4")),
                asyncio.to_thread(generate, *base, "--text", "Hello there.", "--voice", "en-us", "--out",
                                  str(tmp_path / "text.mp4")),
                asyncio.to_thread(generate, *base, "--audio", str(wav), "--out", str(tmp_path / "no.mp4"), "--model",
                                  str(tmp_path), "--steps", "2"))

    from_file, from_text, refused = run(main())
    assert from_file.returncode == 0 and "wrote" in from_file.stdout, from_file.stderr
    assert "s made of 1.6 s of speech" in from_file.stderr  # its progress (not with --quiet)
    assert from_text.returncode == 0 and " made" not in from_text.stderr, from_text.stderr
    frames, audio, rate = read_mp4(tmp_path / "file.mp4")
    assert len(frames) >= 1.6 * 25 and frames[0].shape[:2] == (tiny_pipeline.config.image_size,) * 2
    assert 1.6 <= len(audio) / rate <= 1.6 + 1.0 and np.abs(audio).max() > 0.05  # the speech, and a short rest
    assert "Hello there." in (tmp_path / "text.vtt").read_text()
    assert len(read_mp4(tmp_path / "text.mp4")[0]) > 10
    assert refused.returncode == 2 and refused.stderr.startswith("letstalk: error: --model, --steps: with --server"), \
        refused.stderr
    assert not (tmp_path / "no.mp4").exists()
    gone = generate("generate", "--server", "http://127.0.0.1:9", "--portrait", str(astronaut_png), "--audio",
                    str(wav), "--out", str(tmp_path / "gone.mp4"))
    assert gone.returncode == 2 and "cannot reach the server at http://127.0.0.1:9" in gone.stderr, gone.stderr
    assert not (tmp_path / "gone.mp4").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no partial files left


def test_letstalk_generate_stopped_by_sigterm_cancels_its_render_on_the_server(tiny_pipeline, tmp_path, wav_file,
                                                                                astronaut_png):
    """`kill` or `timeout` stopping `letstalk generate --server` stops it as Ctrl-C does: the server's render is
    cancelled at once (it ran on to the end and was stored there, nobody to fetch it) and the command says it wrote
    nothing.
    A second SIGTERM while it stops does not cut that short."""
    import contextlib
    import signal
    import subprocess
    import sys

    from server_helpers import running_server, wait_until

    wav = wav_file(20.0)
    videos = tmp_path / "videos"

    async def main():
        async with running_server(tiny_pipeline, recordings_dir=videos) as srv:
            code = ("import sys; from letstalk_rt.cli import main; sys.exit(main(" + repr(
                ["generate", "--server", srv.url, "--portrait", str(astronaut_png), "--audio", str(wav), "--out",
                 str(tmp_path / "out.mp4"), "--quiet"]) + "))")
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=subprocess.PIPE,
                                                        stderr=subprocess.PIPE)
            try:
                await wait_until(lambda: any(s.player.speech_frames >= 10 for s in srv.engine.sessions.values()),
                                 90, "the render to be under way")
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.02)
                with contextlib.suppress(ProcessLookupError):  # as `timeout` does (to it and its group): the
                    proc.send_signal(signal.SIGTERM)  # repeat must not cut the cleanup short
                _, stderr = await asyncio.wait_for(proc.communicate(), 30)
                await wait_until(lambda: not srv.engine.sessions, 10, "the render's session to close")
            finally:
                if proc.returncode is None:
                    proc.kill()
            return proc.returncode, stderr.decode()

    returncode, stderr = run(main())
    assert returncode == 130 and "interrupted; no output was written" in stderr, (returncode, stderr)
    assert not videos.exists() or not list(videos.iterdir())  # nothing stored for nobody to fetch
    assert not list(tmp_path.glob("*out.mp4*"))


def test_the_batch_clips_example_makes_a_clip_of_each_file_in_turn_and_only_those_missing(tiny_pipeline, tmp_path,
                                                                                           wav_file, capsys):
    """client_examples/batch_clips.py as a user runs it on a folder of audio files, against a server with one slot
    and a queue of one: every clip is asked for at once, the server makes one, queues one and refuses the rest (503),
    which are asked again after Retry-After; each audio file becomes its whole MP4, a file that is not audio fails
    alone with the server's reason, and a second run makes only the clip that is missing."""
    from conftest import client_example
    from server_helpers import running_server

    example = client_example("batch_clips")
    folder, out = tmp_path / "voicemails", tmp_path / "clips"
    folder.mkdir()
    seconds = {"anna": 1.0, "ben": 1.4, "cleo": 0.8}
    for name, s in seconds.items():
        wav_file(s, name=f"{name}.wav").rename(folder / f"{name}.wav")
    (folder / "broken.wav").write_bytes(b"RIFF, but not audio at all")
    (folder / "notes.txt").write_text("not a clip")

    async def main():
        async with running_server(tiny_pipeline, max_sessions=1, recordings_dir=tmp_path / "videos", render_queue=1,
                                  retry_after_s=1) as srv:
            args = example.parse_args([str(folder), "--out", str(out), "--server", srv.url, "--parallel", "4"])
            first = await example.run(args)
            (out / "ben.mp4").unlink()
            return first, await example.run(args)

    first, again = run(main())
    err = capsys.readouterr().err
    assert {k: v.split(":")[0] for k, v in first.items()} == {"anna": "saved", "ben": "saved", "cleo": "saved",
                                                              "broken": "failed"}, first
    assert "could not be decoded" in first["broken"]
    assert {k: v.split(":")[0] for k, v in again.items()} == {"anna": "kept", "ben": "saved", "cleo": "kept",
                                                              "broken": "failed"}, again  # (it is asked again)
    assert "queued (1 in line)" in err and "the server is full; asking again" in err  # the queue, then a 503 retried
    assert sorted(p.name for p in out.iterdir()) == ["anna.mp4", "ben.mp4", "cleo.mp4"]  # no partial file
    for name, s in seconds.items():
        frames, audio, rate = read_mp4(out / f"{name}.mp4")
        assert s * 25 <= len(frames) <= (s + 1.0) * 25 and np.abs(audio).max() > 0.05, name  # all its speech, said
