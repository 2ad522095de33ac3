"""Recording a live session (Session.record, the server's `record` field): every tick shown, in sync, saved whole or
not at all, a failure saying why while the stream goes on."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import av
import numpy as np
import pytest

from conftest import killed_video_writer, speechlike
from letstalk_rt.errors import InputError, OutputError
from letstalk_rt.stream import EngineConfig, StreamEngine
from letstalk_rt.stream.events import RecordingStopped, SessionClosed
from server_helpers import run


def _portrait(pipe, value: int = 90):
    rng = np.random.default_rng(value)
    img = np.clip(rng.normal(value, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
    return pipe.prepare_portrait(img, detect=False)


async def _push_in_real_time(session, pcm: np.ndarray, caption: str | None = None) -> None:
    start = time.monotonic()
    for i, pos in enumerate(range(0, len(pcm), 320)):
        await asyncio.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
        session.push_audio(pcm[pos:pos + 320], caption=caption if i == 0 else None)
    session.end_speech()


def read_mp4(path) -> tuple[list[np.ndarray], np.ndarray, int]:
    """(RGB frames, mono float audio, its rate) of an MP4."""
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].rate
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    return frames, audio.astype(np.float32), rate


def test_a_recording_holds_every_tick_shown_in_sync_and_appears_only_when_saved(tiny_pipeline, tmp_path):
    """The MP4 holds each tick the session showed, in order (the picture close to what the reader got, the sound the
    speech it played, not shifted); until it is saved only a hidden partial file exists; a second recording at once
    is refused; stop_recording() saves it and a recording_stopped event names it. The caption pushed with the speech is
    saved beside it as WebVTT, from the tick its speech began to show, written before the MP4."""
    path = tmp_path / "talk.mp4"

    async def main():
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False)).start()
        try:
            session = await engine.open_session(_portrait(tiny_pipeline))
            events = session.events()
            recording = session.record(path)
            with pytest.raises(InputError, match="already recording"):
                session.record(tmp_path / "other.mp4")
            feeder = asyncio.ensure_future(_push_in_real_time(session, speechlike(2.0), caption="Hi <you> & me"))
            shown = []
            async for frame in session.frames():
                shown.append(frame)
                if len(shown) == 60:
                    break
            await feeder
            during = sorted(p.name for p in tmp_path.iterdir())
            saved = await session.stop_recording()
            stopped = None
            async for event in events:
                if isinstance(event, RecordingStopped):
                    stopped = event
                    break
            return shown, recording, saved, during, stopped, session.stats()["recording"]
        finally:
            await engine.stop()

    shown, recording, saved, during, stopped, stats = run(main())
    assert len(during) == 1 and during[0].startswith(".talk.mp4.partial")  # nothing at the path before it is saved
    assert saved == path and sorted(p.name for p in tmp_path.iterdir()) == ["talk.mp4", "talk.vtt"]
    assert stopped.path == str(path) and stopped.error == "" and stopped.seconds == recording.seconds
    assert stopped.captions == str(tmp_path / "talk.vtt")
    assert stats == {"state": "finished", "path": str(path), "seconds": recording.seconds, "captions": 1}
    assert (tmp_path / "talk.vtt").stat().st_mtime_ns <= path.stat().st_mtime_ns
    said = next(i for i, f in enumerate(shown) if f.captions)  # the tick its speech began to show at
    assert shown[said].speech and not any(f.speech for f in shown[:said])
    head, cue = (tmp_path / "talk.vtt").read_text().split("\n\n")[:2]
    number, timing, text = cue.split("\n")
    start, end = (_seconds(t) for t in timing.split(" --> "))
    assert (head, number, text) == ("WEBVTT", "1", "Hi &lt;you&gt; &amp; me")
    assert start == pytest.approx(said * 0.04) and end > start + 1.0
    frames, audio, rate = read_mp4(path)
    assert len(frames) == recording.frames >= len(shown) and rate == 16000
    assert abs(len(audio) - 640 * len(frames)) <= 1024  # the sound lasts as long as the picture
    # each recorded picture is nearest the one shown at its tick (lossy H.264 of the tiny model's noisy 32-px frames)
    distance = np.array([[np.abs(got.astype(int) - want.video.astype(int)).mean() for want in shown]
                         for got in frames[:len(shown)]])
    assert all(distance[i, i] <= distance[i].min() + 1e-9 for i in range(len(shown)))
    played = np.concatenate([f.audio for f in shown])
    n = len(played) - 4000
    lags = range(-1600, 1601, 16)
    corr = [float(np.dot(audio[2000 + k:2000 + k + n], played[2000:2000 + n])) for k in lags if 2000 + k >= 0]
    best = list(lags)[int(np.argmax(corr))]
    assert abs(best) <= 32, f"the recorded sound is {best} samples off its pictures"
    assert max(corr) > 0.8 * float(np.dot(played[2000:2000 + n], played[2000:2000 + n]))


def test_a_session_nobody_watches_is_recorded_on_its_clock(tiny_pipeline, tmp_path):
    """No track, no frames() reader, no broadcast: the recording keeps the session's clock running itself, so the file
    holds every tick of the time it lasted (the idle avatar, then the speech and its caption), and the clock stops
    being read when it ends."""
    path = tmp_path / "alone.mp4"

    async def main():
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False)).start()
        try:
            session = await engine.open_session(_portrait(tiny_pipeline))
            recording = session.record(path)
            await asyncio.sleep(0.5)
            await _push_in_real_time(session, speechlike(1.5), caption="nobody watching")
            assert await session.wait_audio_shown(timeout=10.0)  # (a loaded machine's latency may pass 1 s)
            await asyncio.sleep(0.5)
            lasted = session.player.clock_tick()  # ticks due since the first frame (a loaded machine's comes late)
            await session.stop_recording()  # (its encoder's flush may take long there)
            tick = session.player.clock_tick()
            await asyncio.sleep(0.5)
            return recording, lasted, session.player.tick, tick, session.player.speech_frames
        finally:
            await engine.stop()

    recording, lasted, materialised, due, speech = run(main())
    frames, audio, _ = read_mp4(path)
    assert len(frames) == recording.frames >= lasted - 6  # every tick due (to a loaded event loop's 0.25 s)
    assert lasted >= 2.0 * 25  # (0.5 s idle, the speech's 1.5 s and its latency, 0.5 s after, less the first frame)
    # the speech was shown (~32 of its 37 frames voiced; a late session plays it up to 1.25x faster, pauses shortened)
    assert speech >= 18 and np.abs(audio).max() > 0.05  # and it is in the file
    assert "nobody watching" in (tmp_path / "alone.vtt").read_text()
    assert materialised <= due + 2  # nothing reads the clock after the recording ended


def _seconds(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def test_caption_cues_last_while_their_speech_shows_and_a_moment_after():
    """A caption's cue runs from its tick to the next caption's, or half a second after the last tick of speech under
    it, whichever is first; two captions on one tick are one line; the WebVTT text is escaped and stamped to the ms."""
    from letstalk_rt.stream.events import AVFrame
    from letstalk_rt.stream.recorder import CaptionCues

    def frame(speech, *captions):
        return AVFrame(index=0, video=np.zeros((2, 2, 3), np.uint8), audio=np.zeros(640, np.float32), speech=speech,
                       captions=captions)

    cues = CaptionCues(fps=25)
    ticks = ([frame(False)] * 3 + [frame(True, "One.")] + [frame(True)] * 9 + [frame(False)] * 40  # speech 3..12
             + [frame(True, "Two,", "  and\nthree.")] + [frame(True)] * 4  # tick 53: cut by the next at 58
             + [frame(True, "Four --> five")] + [frame(False)] * 2)  # tick 58, the stream ends at 61
    for tick, f in enumerate(ticks):
        cues.add(tick, f)
    cues.close(len(ticks))
    assert cues.cues == [(3, 13 + 12, "One."), (53, 58, "Two, and three."), (58, 61, "Four --> five")]
    assert cues.webvtt() == ("WEBVTT\n\n1\n00:00:00.120 --> 00:00:01.000\nOne.\n\n"
                             "2\n00:00:02.120 --> 00:00:02.320\nTwo, and three.\n\n"
                             "3\n00:00:02.320 --> 00:00:02.440\nFour --&gt; five\n\n")
    long = CaptionCues(fps=25)
    long.add(90000, frame(True, "Late."))
    long.close(90001)
    assert "01:00:00.000 --> 01:00:00.040" in long.webvtt()


def test_a_recording_that_falls_behind_is_dropped_whole_and_the_stream_goes_on(tiny_pipeline, tmp_path, monkeypatch):
    """An encoder slower than the stream: past max_behind_s the recording stops, its partial file is deleted and a
    recording_stopped event says why; the session keeps streaming and stop_recording() raises that reason. A path
    that cannot be written is refused at once. close() saves a running recording."""
    from letstalk_rt.media import VideoWriter

    write = VideoWriter.write_frame

    def slow(self, rgb):
        time.sleep(0.2)
        write(self, rgb)

    async def main():
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False)).start()
        try:
            session = await engine.open_session(_portrait(tiny_pipeline))
            with pytest.raises(OutputError, match="does not exist"):
                session.record(tmp_path / "nowhere" / "x.mp4")
            with pytest.raises(OutputError, match="MP4"):
                session.record(tmp_path / "x.webm")
            events = session.events()
            monkeypatch.setattr(VideoWriter, "write_frame", slow)
            session.record(tmp_path / "slow.mp4", max_behind_s=0.2)
            stopped = None
            count = 0
            async for _ in session.frames():
                count += 1
                if count == 50:
                    break
            async for event in events:
                if isinstance(event, RecordingStopped):
                    stopped = event
                    break
            with pytest.raises(OutputError, match="fell 0.2 s behind"):
                await session.stop_recording()
            more = 0
            async for _ in session.frames():  # the stream went on
                more += 1
                if more == 10:
                    break
            monkeypatch.setattr(VideoWriter, "write_frame", write)
            session.record(tmp_path / "closed.mp4")  # a new one: saved by close()
            async for _ in session.frames():
                more += 1
                if more == 20:
                    break
            await session.close()
            kinds = [type(e) async for e in events]
            return stopped, more, kinds
        finally:
            await engine.stop()

    stopped, more, kinds = run(main())
    assert stopped.path == "" and "fell 0.2 s behind" in stopped.error
    assert more == 20
    assert kinds.index(RecordingStopped) < kinds.index(SessionClosed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["closed.mp4"]  # nothing left of the failed one
    assert len(read_mp4(tmp_path / "closed.mp4")[0]) >= 5  # the ticks shown after it started


def test_the_server_records_a_session_when_asked_and_serves_its_file(tiny_pipeline, tmp_path):
    """`record`: refused (422) by a server without --recordings-dir; else the session's recording is served at its
    recording_url once saved (409 before: still recording) to the API key or that session's token only, saved by the
    websocket's stop_recording or by the session's end, listed, and deleted."""
    import aiohttp

    from letstalk_rt.client import AvatarClient, RecordingNotFoundError, RequestError
    from server_helpers import create_session, play_session, running_server, wait_until

    key = {"Authorization": "Bearer k"}

    async def main():
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            async with http.post(f"{srv.url}/v1/sessions", json={"record": True}) as r:
                assert r.status == 422 and "--recordings-dir" in (await r.json())["error"]
            async with http.get(f"{srv.url}/v1/recordings/abc") as r:
                assert r.status == 404
        async with running_server(tiny_pipeline, api_key="k", recordings_dir=tmp_path / "recordings") as srv, \
                aiohttp.ClientSession() as http:
            async with http.post(f"{srv.url}/v1/sessions", json={"record": "maybe"}, headers=key) as r:
                assert r.status == 422 and "true or false" in (await r.json())["error"]
            info = await create_session(http, srv.url, headers=key, record=True)
            other = await create_session(http, srv.url, headers=key)
            assert "recording_url" not in other
            url, mine = info["recording_url"], {"Authorization": f"Bearer {info['token']}"}
            assert url == f"{srv.url}/v1/recordings/{info['session_id']}"
            session = srv.engine.sessions[info["session_id"]]
            player = play_session(srv, info["session_id"])
            session.push_audio(speechlike(2.0), caption="Hello there.")
            session.end_speech()
            await wait_until(lambda: session.player.speech_frames >= 25, 60, "a second of the speech shown")
            async with http.get(url, headers=mine) as r:
                assert r.status == 409 and "still recording" in (await r.json())["error"]
            async with http.get(url, headers={"Authorization": f"Bearer {other['token']}"}) as r:
                assert r.status == 401
            async with http.ws_connect(f"{info['ws_url']}?token={info['token']}") as ws:
                await ws.send_json({"type": "stop_recording"})
                while True:
                    event = json.loads((await ws.receive(timeout=20)).data)
                    if event["type"] == "recording_stopped":
                        break
            assert event["path"].endswith(f"{info['session_id']}.mp4") and event["seconds"] >= 1.0
            async with http.get(f"{srv.url}/metrics") as r:
                metrics = await r.text()
            assert 'letstalk_recordings_total{result="saved"} 1' in metrics
            assert "letstalk_recordings_active 0" in metrics
            async with http.get(url, headers=mine) as r:
                assert r.status == 200 and r.content_type == "video/mp4"
                body = await r.read()
            async with http.get(f"{srv.url}/v1/recordings", headers=key) as r:
                listed = (await r.json())["recordings"]
            assert [(x["id"], x["bytes"], x["captions"]) for x in listed] == [(info["session_id"], len(body), True)]
            assert event["captions"].endswith(f"{info['session_id']}.vtt")
            async with http.get(f"{url}/captions", headers=mine) as r:
                assert r.status == 200 and r.content_type == "text/vtt"
                assert (await r.text()).startswith("WEBVTT\n\n1\n00:00:") and "Hello there." in await r.text()
            async with http.delete(url, headers=mine) as r:
                assert r.status == 204
            async with http.get(url, headers=key) as r:
                assert r.status == 404
            assert not any((tmp_path / "recordings").iterdir())  # its captions went with it
            # saved by the session's end
            second = await create_session(http, srv.url, headers=key, record=True)
            viewer = play_session(srv, second["session_id"])
            while srv.engine.sessions[second["session_id"]].player.tick < 10:
                await asyncio.sleep(0.05)
            async with http.delete(f"{srv.url}/v1/sessions/{second['session_id']}", headers=key) as r:
                assert r.status == 204
            async with http.get(second["recording_url"], headers=key) as r:
                assert r.status == 200
                ended = await r.read()
            async with AvatarClient(srv.url, api_key="k") as client:  # the SDK's side of it
                saved = await client.download_recording(second["session_id"], tmp_path / "sdk.mp4")
                assert saved.read_bytes() == ended
                with pytest.raises(RecordingNotFoundError, match="HTTP 404.*no captions"):  # nothing was said in it
                    await client.download_captions(second["session_id"], tmp_path / "sdk.vtt")
                assert not (tmp_path / "sdk.vtt").exists()
                assert [x["id"] for x in await client.recordings()] == [second["session_id"]]
                sdk_session = await client.start_session(record=True)
                assert sdk_session.info["recording_url"].endswith(sdk_session.id)
                with pytest.raises(RequestError, match="HTTP 409.*still recording"):
                    await client.download_recording(sdk_session.id, tmp_path / "early.mp4")
                assert not (tmp_path / "early.mp4").exists()
                await sdk_session.connect()
                async for _ in sdk_session.video_frames():
                    break
                await sdk_session.stop_recording()
                async for event in sdk_session.events():
                    if event["type"] == "recording_stopped":
                        break
                assert event["path"] and not event["error"]
                await client.download_recording(sdk_session.id, tmp_path / "sdk2.mp4")
                assert (tmp_path / "sdk2.mp4").stat().st_size > 0
            player.cancel()
            viewer.cancel()
            return body, ended

    body, ended = run(main())
    path = tmp_path / "check.mp4"
    path.write_bytes(body)
    frames, audio, _ = read_mp4(path)
    assert len(frames) >= 25 and np.abs(audio).max() > 0.05  # the speech is in it
    path.write_bytes(ended)
    assert len(read_mp4(path)[0]) >= 10


def test_an_encoder_that_dies_behind_a_full_queue_still_lets_the_session_close(tiny_pipeline, tmp_path, monkeypatch):
    """The encoder fails (here: its first frame, after the queue filled up behind it): stop_recording() and close()
    return with the reason instead of waiting forever to queue their end marker, and no file is left."""
    from letstalk_rt.media import VideoWriter

    queues = []

    def dies(self, rgb):  # once the frames behind it fill the queue
        while not (queues and queues[0].full()):
            time.sleep(0.01)
        raise OutputError("the disk is full (made up)")

    async def main():
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False)).start()
        try:
            session = await engine.open_session(_portrait(tiny_pipeline))
            monkeypatch.setattr(VideoWriter, "write_frame", dies)
            recording = session.record(tmp_path / "full.mp4", max_behind_s=0.2)  # 5 frames
            queues.append(recording._queue)
            async for _ in session.frames():
                if recording._queue.full():
                    break  # no more ticks are shown (none are read), so none is queued
            await asyncio.sleep(0.3)  # the encoder has died by now
            with pytest.raises(OutputError, match="disk is full"):
                await asyncio.wait_for(session.stop_recording(), 5)
            await asyncio.wait_for(session.close(), 5)
        finally:
            await engine.stop()

    run(main())
    assert list(tmp_path.iterdir()) == []


def _saved_at(directory, name: str, nbytes: int, age_s: float, captions: bool = False) -> None:
    path = directory / f"{name}.mp4"
    path.write_bytes(b"x" * nbytes)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    if captions:
        path.with_suffix(".vtt").write_text("WEBVTT\n\n")


def test_the_retention_limits_delete_the_oldest_recordings_and_keep_the_newest(tmp_path):
    """recordings.prune: past --recordings-keep-hours a recording goes (with its captions); past --recordings-max-gb
    the oldest go until the rest fit, but never the newest, even alone over the limit; recordings being made (hidden
    partial files) and other files are never touched."""
    from letstalk_rt.server import recordings

    for name, size, age in [("a", 100, 7200), ("b", 300, 1800), ("c", 200, 600), ("d", 50, 60)]:
        _saved_at(tmp_path, name, size, age, captions=name in "ab")
    (tmp_path / ".e.mp4.partial-1-1").write_bytes(b"x" * 1000)  # a recording being made
    (tmp_path / "notes.txt").write_text("mine")
    assert [r.id for r in recordings.saved(tmp_path)] == ["a", "b", "c", "d"]  # oldest first

    assert recordings.prune(tmp_path) == ([], 650)  # no limits: nothing goes
    deleted, left = recordings.prune(tmp_path, keep_s=3600)
    assert [r.id for r in deleted] == ["a"] and left == 550
    deleted, left = recordings.prune(tmp_path, max_bytes=260)
    assert [r.id for r in deleted] == ["b"] and left == 250  # 550 -> 250: c and d fit
    deleted, left = recordings.prune(tmp_path, max_bytes=10)
    assert [r.id for r in deleted] == ["c"] and left == 50  # d, the newest, stays though over the limit
    assert sorted(p.name for p in tmp_path.iterdir()) == [".e.mp4.partial-1-1", "d.mp4", "notes.txt"]


def test_an_unfinished_recording_left_by_a_killed_server_is_deleted_and_one_being_written_is_kept(tmp_path):
    """A server killed while recording (SIGKILL, a crash, a power cut) leaves the recording's hidden partial file,
    which nothing lists and, before, nothing ever deleted. The retention pass deletes the partial files no process
    writes any more: a VideoWriter holds a lock on its own while it writes (the kernel drops it with the process), so
    one being written stays however old, and an unlocked one (a caption file's, written in one go) once a minute old."""
    from letstalk_rt.media import VideoWriter
    from letstalk_rt.server import recordings

    left_behind = killed_video_writer(tmp_path / "killed.mp4")
    live = VideoWriter(tmp_path / "live.mp4", 32)
    live.write_frame(np.zeros((32, 32, 3), np.uint8))
    old_caption, young_caption = tmp_path / ".old.vtt.partial-1-2", tmp_path / ".young.vtt.partial-1-3"
    old_caption.write_text("WEBVTT\n")
    young_caption.write_text("WEBVTT\n")
    an_hour_ago = time.time() - 3600
    for path in (live._tmp, old_caption):
        os.utime(path, (an_hour_ago, an_hour_ago))

    assert left_behind.is_file()
    assert recordings.prune(tmp_path) == ([], 0)  # no recording saved, none deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live._tmp.name, young_caption.name])
    live.write_frame(np.zeros((32, 32, 3), np.uint8))
    live.close()  # the one being written was left whole: it is saved
    with av.open(str(tmp_path / "live.mp4")) as saved:
        assert saved.streams.video[0].frames == 2
    assert [r.id for r in recordings.saved(tmp_path)] == ["live"]


def test_the_server_applies_its_retention_limits_at_start_and_after_each_save(tiny_pipeline, tmp_path):
    """--recordings-keep-hours / --recordings-max-gb on a running server: a recording older than the limit is deleted
    at start; a new one saved over the size limit makes the oldest go at once; /metrics counts them and the size
    left. The options are refused without --recordings-dir, or below 0."""
    import aiohttp

    from letstalk_rt.errors import LetsTalkError
    from letstalk_rt.server.app import add_serve_arguments, config_from_args
    from server_helpers import create_session, play_session, running_server, wait_until

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    with pytest.raises(LetsTalkError, match="give that folder too"):
        config_from_args(parser.parse_args(["--recordings-keep-hours", "24"]))
    with pytest.raises(LetsTalkError, match="--recordings-max-gb must be 0"):
        config_from_args(parser.parse_args(["--recordings-dir", str(tmp_path / "r"), "--recordings-max-gb", "-1"]))
    config = config_from_args(parser.parse_args(["--recordings-dir", str(tmp_path / "r"), "--recordings-keep-hours",
                                                 "0.5", "--recordings-max-gb", "0.001"]))
    assert (config.recordings_keep_s, config.recordings_max_bytes) == (1800, 1_000_000)

    directory = tmp_path / "recordings"
    directory.mkdir()
    _saved_at(directory, "old", 1000, 7200, captions=True)
    _saved_at(directory, "recent", 3000, 600)

    async def main():
        async with running_server(tiny_pipeline, recordings_dir=directory, recordings_keep_s=3600,
                                  recordings_max_bytes=3500) as srv, aiohttp.ClientSession() as http:
            await wait_until(lambda: srv.manager.metrics.recordings_bytes is not None, 10, "the first look")
            at_start = sorted(p.name for p in directory.iterdir())
            info = await create_session(http, srv.url, record=True)
            viewer = play_session(srv, info["session_id"])
            session = srv.engine.sessions[info["session_id"]]
            await wait_until(lambda: session.player.tick >= 10, 30, "ten ticks shown")
            async with http.delete(f"{srv.url}/v1/sessions/{info['session_id']}",
                                   headers={"Authorization": f"Bearer {info['token']}"}) as r:
                assert r.status == 204
            await wait_until(lambda: srv.manager.metrics.recordings_pruned == 2, 10, "the oldest deleted")
            async with http.get(f"{srv.url}/metrics") as r:
                metrics = await r.text()
            async with http.get(f"{srv.url}/v1/recordings") as r:
                listed = (await r.json())["recordings"]
            viewer.cancel()
            return at_start, metrics, listed, info["session_id"]

    at_start, metrics, listed, sid = run(main())
    assert at_start == ["recent.mp4"]  # 2 hours old: deleted with its captions at start
    assert [x["id"] for x in listed] == [sid]  # the new one pushed the total (3000 + its size) over 3500
    assert "letstalk_recordings_pruned_total 2" in metrics
    assert f"letstalk_recordings_saved_bytes {listed[0]['bytes']}" in metrics
