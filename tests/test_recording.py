"""Recording a live session (Session.record, the server's `record` field): every tick shown, in sync, saved whole or
not at all, a failure saying why while the stream goes on."""

from __future__ import annotations

import asyncio
import time

import av
import numpy as np
import pytest

from conftest import speechlike
from letstalk_rt.errors import InputError, OutputError
from letstalk_rt.stream import EngineConfig, StreamEngine
from letstalk_rt.stream.events import RecordingStopped, SessionClosed
from server_helpers import run


def _portrait(pipe, value: int = 90):
    rng = np.random.default_rng(value)
    img = np.clip(rng.normal(value, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
    return pipe.prepare_portrait(img, detect=False)


async def _push_in_real_time(session, pcm: np.ndarray) -> None:
    start = time.monotonic()
    for i, pos in enumerate(range(0, len(pcm), 320)):
        await asyncio.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
        session.push_audio(pcm[pos:pos + 320])
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
    is refused; stop_recording() saves it and a recording_stopped event names it."""
    path = tmp_path / "talk.mp4"

    async def main():
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False)).start()
        try:
            session = await engine.open_session(_portrait(tiny_pipeline))
            events = session.events()
            recording = session.record(path)
            with pytest.raises(InputError, match="already recording"):
                session.record(tmp_path / "other.mp4")
            feeder = asyncio.ensure_future(_push_in_real_time(session, speechlike(2.0)))
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
    assert saved == path and sorted(p.name for p in tmp_path.iterdir()) == ["talk.mp4"]
    assert stopped.path == str(path) and stopped.error == "" and stopped.seconds == recording.seconds
    assert stats == {"state": "finished", "path": str(path), "seconds": recording.seconds}
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
