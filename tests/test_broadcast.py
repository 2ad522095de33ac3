"""Streaming a session live to a streaming server (Session.broadcast): every tick shown reaches the server with its
sound, in sync; an unwatched session streams on its own clock; a server that goes away ends the broadcast with a
reason while the session streams on; bad URLs and unreachable servers are refused at once, the stream key never
shown. The server is FFmpeg listening in a process of its own (tests/live_receiver.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import signal
import textwrap
import time
from typing import Any

import numpy as np
import pytest

from conftest import speechlike
from letstalk_rt import cc608
from letstalk_rt.errors import InputError, LetsTalkError, OutputError
from letstalk_rt.media import LiveEncoder, LiveMuxer, check_live_url, redact_url
from letstalk_rt.stream import EngineConfig, StreamEngine
from letstalk_rt.stream.events import (BroadcastReconnecting, BroadcastResumed, BroadcastSkipped, BroadcastStopped,
                                       Caption)
from live_receiver import Receiver, closed_port, free_port, receiving
from server_helpers import run, wait_until
from test_recording import _portrait, _push_in_real_time


async def _connect(session, url: str, **kw):
    """session.broadcast(url), again while the receiver is not listening yet (it starts in its own process)."""
    for _ in range(100):
        try:
            return await session.broadcast(url, **kw)
        except OutputError as e:
            if "refused" not in str(e):
                raise
            await asyncio.sleep(0.1)
    raise AssertionError(f"nothing listened at {url}")


async def _next(events, kind, timeout: float = 15.0):
    async def find():
        async for event in events:
            if isinstance(event, kind):
                return event
    return await asyncio.wait_for(find(), timeout)


def _rms_per_frame(audio: np.ndarray, rate: int, times: np.ndarray) -> np.ndarray:
    """Each received frame's sound, by its presentation time: what a player plays with it."""
    n = rate // 25
    return np.array([np.sqrt(np.mean(audio[int(round(t * rate)):int(round(t * rate)) + n] ** 2))
                     for t in times if int(round(t * rate)) + n <= len(audio)])


CAPTION = "Hello from the stream. Ça va très bien? Sí, señor; niño"


def _cc_captions(cc: np.ndarray, rows: bool = False) -> list[tuple[int, Any]]:
    """The captions a stream's CEA-608 carried (the receiver's `cc` triplets): the frame each began in (its roll-up
    code), and its text (its rows joined by spaces; with `rows`, the list of them)."""
    letters = {code: letter for letter, code in cc608.SPECIAL.items()}  # 608's own, at some ASCII codes
    coded = {code: letter for letter, code in cc608.CODED.items()}  # and its special and extended characters
    captions: list[tuple[int, list[str]]] = []
    last = None
    for frame, flags, b1, b2 in cc.tolist():
        assert flags & 0x07 == 0x04 and bin(b1).count("1") % 2 and bin(b2).count("1") % 2  # valid, field 1, parity
        pair = (b1 & 0x7F, b2 & 0x7F)
        if pair == cc608.RU2 and last != pair:  # (control codes come twice)
            captions.append((frame, []))
        elif pair == cc608.CR and last != pair:
            captions[-1][1].append("")
        elif pair in coded and last != pair:  # (twice too); an extended one replaces the letter before it
            row = captions[-1][1]
            row[-1] = (row[-1][:-1] if pair[0] != 0x11 else row[-1]) + coded[pair]
        elif pair[0] >= 0x20:
            captions[-1][1][-1] += "".join(letters.get(c, chr(c)) for c in pair if c >= 0x20)
        last = pair
    return [(frame, lines if rows else " ".join(lines)) for frame, lines in captions]


def _reader_keeps_up() -> EngineConfig:
    """For a test that reads every tick a session shows, to compare them with what a server received: its reader must
    not skip ahead when its event loop lags on a busy CPU (`late_skip_ms`: a reader 200 ms behind the clock skips to
    the present), or the gap in what it read would look like a stream that sent the wrong pictures. The session's
    clock and its broadcasts are as with any reader."""
    return EngineConfig(warmup=False, late_skip_ms=2000.0)


def _shown_from(frames: np.ndarray, shown: list) -> int:
    """The received frame the reader's first shown tick is at (k): from there on each received picture is nearest the
    one shown at its tick (the tiny model's 32-px frames are noise-like: H.264 keeps them only roughly)."""
    want = np.stack([f.video for f in shown]).astype(float)
    # k: where the first 10 shown pictures match best together (the first alone can be a held frame, the picture before
    # it repeated, which the frame received a tick earlier matches as well: CI once picked that one)
    n = min(len(shown), 10)
    k = min(range(len(frames) - n + 1), key=lambda k: np.abs(frames[k:k + n].astype(float) - want[:n]).mean())
    got_frames = frames[k:k + len(shown)].astype(float)
    distance = np.abs(got_frames[:, None] - want[None, :len(got_frames)]).mean(axis=(2, 3, 4))
    assert len(got_frames) >= len(shown) - 1  # (a held frame repeats the picture before it: ties allowed)
    assert all(distance[i, i] <= distance[i].min() + 1e-9 for i in range(len(got_frames)))
    return k


def test_captions_become_608_rows_two_pairs_a_frame_that_ffmpeg_reads_back(tmp_path):
    """A long caption wraps into 608 rows of at most 32 characters at word boundaries; a frame carries 2 byte pairs;
    captions faster than 608 carries them skip the backlog for the newest; the SEI goes before a frame's first slice,
    after its parameter sets; FFmpeg's own 608 decoder (cc_dec, as players decode them) reads the rows back from an
    H.264 stream, and sees them erased 4 s after the last caption."""
    rollup = cc608.RollUp()
    text = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."
    rollup.add(text)
    per_caption = len(rollup)  # its pairs
    frames = []
    while len(rollup):
        frames.append(rollup.take())
    assert all(len(pairs) == 2 for pairs in frames[:-1]) and 1 <= len(frames[-1]) <= 2
    cc = np.array([(i, 0xFC, cc608.odd_parity(a), cc608.odd_parity(b)) for i, pairs in enumerate(frames)
                   for a, b in pairs])
    assert _cc_captions(cc, rows=True) == [(0, ["The quick brown fox jumps over", "the lazy dog, then naps in the",
                                                "warm afternoon sun."])]
    for _ in range(40):  # ~15 s of captions at once
        rollup.add(text)
    assert len(rollup) <= cc608.MAX_QUEUED and rollup.dropped >= 1 and len(rollup) % per_caption == 0  # (whole ones)
    sps, pps, idr = b"\x00\x00\x00\x01\x67\x64", b"\x00\x00\x00\x01\x68\xee", b"\x00\x00\x01\x65\x88\x84"
    sei = cc608.a53_sei([cc608.RU2])
    assert cc608.with_sei(sps + pps + idr, sei) == sps + pps + sei + idr
    # the rows as the viewer saw them, each change in turn: the second row, then the second caption rolling the
    # first row up, then, 4 s after its last pair, the rows erased (cc_dec gives what was shown when it goes)
    shown = _ffmpeg_608(tmp_path / "cc.ts", [CAPTION, "A second caption."])
    assert [text for _, text in shown] == ["Hello from the stream. Ça va",
                                           "Hello from the stream. Ça va\ntrès bien? Sí, señor; niño",
                                           "très bien? Sí, señor; niño\nA second caption."]
    assert 5.0 < shown[-1][0] < 5.6, shown  # the second caption's pairs out by ~1.3 s, then 4 s
    # 608's extended letters (each after the plain one it replaces), typography as ASCII, other scripts left out
    text = "Grüße aus São Paulo — “Øresund”, don’t 中文 worry!"
    rows = ['Grüße aus São Paulo - "Øresund",', "don't worry!"]
    assert textwrap.wrap(cc608.shown_text(text), cc608.ROW_CHARS) == rows
    rollup = cc608.RollUp()
    rollup.add(text)
    cc = np.array([(0, 0xFC, cc608.odd_parity(a), cc608.odd_parity(b)) for a, b in rollup.take(len(rollup))])
    assert _cc_captions(cc, rows=True) == [(0, rows)]
    shown = [text for _, text in _ffmpeg_608(tmp_path / "cc2.ts", [text])]
    assert shown[:2] == [rows[0], "\n".join(rows).replace("'", "’")]  # (FFmpeg shows 608's apostrophe as ’)


def _ffmpeg_608(path, captions: list[str]) -> list[tuple[float, str]]:
    """`captions` (one a second, then 5 s without) in the H.264 of an MPEG-TS at `path`, as LiveMuxer sends them; what
    FFmpeg's 608 decoder showed, each time it changed: (when it changed, in seconds; the text shown until then)."""
    import av
    from fractions import Fraction

    from letstalk_rt.media import with_captions

    rollup = cc608.RollUp()
    with av.open(str(path), "w", format="mpegts") as out:
        video = out.add_stream("libx264", rate=25, options={"preset": "veryfast", "tune": "zerolatency"})
        video.width = video.height = 64
        for i in range(25 * (len(captions) + 5)):
            if i % 25 == 0 and i // 25 < len(captions):
                rollup.add(captions[i // 25])
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i % 256, np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            for packet in video.encode(frame):
                out.mux(with_captions(packet, rollup.take()))
        for packet in video.encode(None):
            out.mux(packet)
    with av.open(f"movie={path}[out0+subcc]", format="lavfi") as source:  # (its rows' positions are ASS {tags})
        return [(float(packet.pts * packet.time_base), re.sub(r"{[^}]*}", "", sub.dialogue.decode()))
                for packet in source.demux(subtitles=0) for sub in packet.decode()]


@pytest.mark.parametrize("scheme", ["rtmp", "tcp"])
def test_a_broadcast_sends_every_tick_shown_with_its_sound_in_sync(tiny_pipeline, tmp_path, scheme):
    """The server receives each tick the session showed, in order and 40 ms apart (the pictures those a viewer got),
    and the sound played with each frame is the speech that frame showed: lined up by presentation time, as a player
    plays them. stop_broadcast() ends the stream, with a broadcast_stopped event; the stream key appears nowhere."""
    port = free_port()
    url = f"rtmp://127.0.0.1:{port}/live/s3cret-key" if scheme == "rtmp" else f"tcp://127.0.0.1:{port}"
    with receiving(url, tmp_path / "got.npz") as receiver:
        async def main():
            engine = await StreamEngine(tiny_pipeline, _reader_keeps_up()).start()
            try:
                session = await engine.open_session(_portrait(tiny_pipeline))
                events = session.events()
                broadcast = await _connect(session, url)
                with pytest.raises(InputError, match="already streaming"):
                    await session.broadcast(url)
                feeder = asyncio.ensure_future(_push_in_real_time(session, speechlike(2.0), caption=CAPTION))
                shown = []
                async for frame in session.frames():
                    shown.append(frame)
                    if len(shown) == 75:
                        break
                await feeder
                await session.stop_broadcast()
                return shown, broadcast, await _next(events, BroadcastStopped), session.stats()
            finally:
                await engine.stop()

        shown, broadcast, stopped, stats = run(main())
        got = receiver.result()
    frames, times = got["frames"], got["times"]
    assert len(frames) == broadcast.frames >= len(shown)
    assert np.allclose(np.diff(times), 0.04, atol=0.002)
    assert stopped.error == "" and stopped.seconds == broadcast.seconds and "s3cret" not in stopped.url
    assert "s3cret" not in str(stats["broadcasts"]) and stats["broadcasts"] == [broadcast.describe()]
    assert broadcast.describe()["state"] == "ended" and stopped.broadcast_id == broadcast.id
    k = _shown_from(frames, shown)
    # the sound under each received frame follows the loudness of the speech its shown frame played
    sent = np.array([np.sqrt(np.mean(f.audio ** 2)) for f in shown])
    heard = _rms_per_frame(got["audio"], int(got["rate"]), times)[k:k + len(shown)]
    assert int(got["rate"]) == 48000 and len(heard) >= len(shown) - 1
    sent = sent[:len(heard)]
    assert any(f.speech for f in shown) and sent.max() > 0.1
    lags = {lag: np.corrcoef(sent[5:-5], heard[5 + lag:len(heard) - 5 + lag])[0, 1] for lag in range(-3, 4)}
    assert max(lags, key=lags.get) == 0 and lags[0] > 0.9, lags
    # the speech's caption is inside the video as CEA-608 (what a platform's CC button shows), from the frame the
    # speech starts in, its accented letters 608's own, wrapped into 32-character rows
    (starts,) = [i for i, f in enumerate(shown) if f.captions]
    assert _cc_captions(got["cc"]) == [(k + starts, CAPTION)]


def test_an_unwatched_session_streams_on_its_own_clock(tiny_pipeline, tmp_path):
    """With no reader and no track, a broadcasting session's clock runs at real time: the speech pushed to it is shown
    and reaches the server, and the ticks sent match the time it streamed. Asked for no captions, the video has none
    (the speech's caption is not in it)."""
    port = free_port()
    url = f"rtmp://127.0.0.1:{port}/live/key"
    with receiving(url, tmp_path / "got.npz") as receiver:
        async def main():
            engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False)).start()
            try:
                session = await engine.open_session(_portrait(tiny_pipeline))
                broadcast = await _connect(session, url, captions=False)
                await _push_in_real_time(session, speechlike(1.5), caption="Not in the video.")
                # the speech shown to its end (later than its pushing on a busy CPU), then a moment of silence
                await wait_until(lambda: session.audio_shown, 20, "the speech to be shown")
                await asyncio.sleep(0.6)
                streamed_s = time.monotonic() - session.player.start  # (the stop's own time, longer on a busy CPU, has
                await session.stop_broadcast()  # no ticks in it)
                return broadcast, streamed_s, session.player.speech_frames
            finally:
                await engine.stop()

        broadcast, streamed_s, speech_frames = run(main())
        got = receiver.result()
    # the speech was shown with nobody watching: its 37 frames, a few fewer where a loaded CPU made it late (late speech
    # has its pauses shortened to catch up; 27 seen beside other work)
    assert speech_frames >= 22
    assert abs(broadcast.frames - streamed_s * 25) <= 5
    assert len(got["frames"]) == broadcast.frames
    heard = _rms_per_frame(got["audio"], int(got["rate"]), got["times"])
    assert (heard > 0.05).sum() >= 0.5 * speech_frames and heard[-10:].max() < 0.02  # speech, then the silence after
    assert len(got["cc"]) == 0 and not broadcast.describe()["captions"]


def test_a_dropped_stream_reconnects_then_gives_up_and_the_session_streams_on(tiny_pipeline, tmp_path):
    """The receiving server killed mid-stream: the broadcast connects again with back-off (broadcast_reconnecting, then
    broadcast_resumed once a server listens there again) and the new server gets the ticks, 40 ms apart, the caption of
    the sentence said while it was down with the first of them. A stream that stalls (its process stopped: the pipe
    fills, the stream falls max_behind_s behind) is cut and tried again, and stop_broadcast() during the wait ends it at
    once, well. The dropped connection's pipe to its process is closed at once (left to the collector, Python 3.14
    reports its failed flush). A server gone for reconnect_s ends the broadcast with a broadcast_stopped event saying
    why; stop_broadcast() raises it and the session keeps streaming to its reader."""
    import os
    import signal

    url = f"rtmp://127.0.0.1:{free_port()}/live/key"
    url2 = f"rtmp://127.0.0.1:{free_port()}/live/key2"
    with receiving(url, tmp_path / "got.npz") as receiver, receiving(url2, tmp_path / "got2.npz") as other:
        async def main():
            engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False)).start()
            try:
                session = await engine.open_session(_portrait(tiny_pipeline))
                events = session.events()
                broadcast = await _connect(session, url, reconnect_s=5.0, max_behind_s=0.5)
                stream = session.frames()
                for _ in range(25):
                    await anext(stream)
                first = broadcast._writer
                receiver.kill()
                tries = await _next(events, BroadcastReconnecting)
                session.push_audio(speechlike(1.0) + 0.05, ahead=True, caption="Said while it was down.")
                session.end_speech()
                await _next(events, Caption)  # shown while the stream was down
                again = Receiver(url, tmp_path / "again.npz")  # the server back at the same URL
                resumed = await _next(events, BroadcastResumed)
                assert broadcast.describe()["state"] == "streaming"
                assert first._proc.stdin.closed  # the dropped connection's pipe: closed, not left to the collector
                for _ in range(50):  # (the ticks in the pipe when it stalls never reach the server)
                    await anext(stream)
                os.kill(broadcast._writer._proc.pid, signal.SIGSTOP)  # a stream nobody takes from any more
                behind = await _next(events, BroadcastReconnecting)
                started = time.monotonic()
                await session.stop_broadcast()  # while it waits to try again
                stop_took = time.monotonic() - started
                gone = await _connect(session, url2, reconnect_s=1.0)
                await asyncio.sleep(0.5)
                other.kill()
                stopped = await _next(events, BroadcastStopped)
                while stopped.broadcast_id != gone.id:  # (the first broadcast's came first)
                    stopped = await _next(events, BroadcastStopped)
                with pytest.raises(OutputError, match="not reconnected"):
                    await session.stop_broadcast()
                for _ in range(10):  # the session streams on
                    await anext(stream)
                return (tries, resumed, behind, stop_took, stopped, broadcast, gone, session.closed,
                        session.broadcasts, again)
            finally:
                await engine.stop()

        tries, resumed, behind, stop_took, stopped, broadcast, gone, closed, broadcasts, again = run(main())
        got_again = again.result()
    assert tries.attempt == 1 and tries.delay_s == 1.0 and tries.error and tries.url.endswith("/live/***")
    assert resumed.attempts >= 1 and 0.9 < resumed.down_s < 5
    assert 25 <= len(got_again["frames"]) and np.allclose(np.diff(got_again["times"]), 0.04, atol=0.002)
    # the caption said while it was down reaches the viewers with the first tick after the resume
    assert _cc_captions(got_again["cc"]) == [(0, "Said while it was down.")]
    assert "s behind (the server took nothing" in behind.error and behind.attempt == 1
    assert stop_took < 1.0 and broadcast.describe() == {"id": "b1", "state": "ended", "url": broadcast.url,
                                                        "captions": True, "reconnects": 1,
                                                        "down_s": round(broadcast.down_s, 2),
                                                        "seconds": broadcast.seconds}
    assert resumed.down_s - 0.005 <= broadcast.down_s < resumed.down_s + 1  # and the wait it was stopped in (~0)
    assert "not reconnected in 1 s (tries: 1;" in stopped.error and "key" not in stopped.url
    assert gone.describe()["state"] == "failed" and gone.reconnects == 0 and 0.9 < gone.down_s < 2
    assert not closed and broadcasts == {}


@pytest.mark.parametrize("down_s, carried", [(0.3, True), (2.5, False)])
def test_a_caption_queued_when_the_stream_dropped_is_carried_only_while_its_rows_would_still_show(
        tiny_pipeline, monkeypatch, down_s, carried):
    """A caption whose tick was still queued when the connection dropped (the server stalled, then went) goes out with
    the first tick after the resume only if that is within the CLEAR_AFTER_FRAMES its rows would have shown (here 2 s):
    it is dated when the stream dropped, not when it came back, so a long outage carries no stale caption. (The
    broadcaster's process is replaced by a stand-in whose connection the test stalls, drops and brings back.)"""
    import threading

    from letstalk_rt.stream import engine as engine_module

    monkeypatch.setattr(cc608, "CLEAR_AFTER_FRAMES", 50)
    stall, drop, back = threading.Event(), threading.Event(), threading.Event()
    writers = []

    class StandIn:
        """LiveOutput's interface: the first connection stalls at `stall` and drops at `drop`; the next connects at
        `back`."""

        def __init__(self, url, *args, **kwargs) -> None:
            self.url, self.name, self.sent = url, redact_url(url), []
            writers.append(self)

        @property
        def frames_written(self) -> int:
            return len(self.sent)

        def connect(self, timeout_s: float = 10.0) -> None:
            if len(writers) > 1:
                back.wait(30)

        def again(self):
            return StandIn(self.url)

        def write(self, packets, captions=(), tail=False) -> None:
            if self is writers[0] and stall.is_set():
                drop.wait(30)
                raise OutputError("the server went away")
            if not tail:
                self.sent.append(tuple(captions))

        def close(self) -> None:
            pass

        abort = close

    monkeypatch.setattr(engine_module, "LiveOutput", StandIn)

    async def main():
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False)).start()
        try:
            session = await engine.open_session(_portrait(tiny_pipeline))
            events = session.events()
            broadcast = await session.broadcast("rtmp://127.0.0.1:1935/live/key", reconnect_s=30.0)
            while len(writers[0].sent) < 10:
                await asyncio.sleep(0.04)
            stall.set()  # the server stops reading: the ticks queue up, the caption's among them
            session.push_audio(speechlike(0.5) + 0.05, ahead=True, caption="Queued when it dropped.")
            session.end_speech()
            await _next(events, Caption)
            await asyncio.sleep(0.2)
            drop.set()  # ... and goes away
            await _next(events, BroadcastReconnecting)
            await asyncio.sleep(down_s)  # the server back then (the first try comes 1 s after the drop)
            back.set()
            resumed = await _next(events, BroadcastResumed)
            while len(writers[-1].sent) < 5:
                await asyncio.sleep(0.04)
            await session.stop_broadcast(broadcast.id)
            return resumed, writers[-1].sent
        finally:
            await engine.stop()

    resumed, sent = run(main())
    assert len(writers) == 2 and max(1.0, down_s) <= resumed.down_s < max(1.0, down_s) + 0.5
    assert sent[0] == (("Queued when it dropped.",) if carried else ()), (resumed.down_s, sent[:3])
    assert not any(sent[1:]), "carried once, with the first tick"


def test_a_session_streams_to_several_servers_at_once_each_on_its_own(tiny_pipeline, tmp_path, monkeypatch):
    """Three destinations at once (as YouTube, Twitch and a recorder): each server gets every tick from its start, 40
    ms apart, and the servers get the same pictures at the same ticks. Each broadcast has its own id in its events and
    stats; the server of one going away ends that one with its error while the others stream on; stop_broadcast(id)
    ends one, stop_broadcast() the rest. The same URL twice, or more than MAX_BROADCASTS, is refused before
    connecting. The two at the same bitrate share one encode (each tick encoded once, not once a server); the third,
    at another bitrate, has its own; each encode ends with the last of its streams."""
    from letstalk_rt.stream import engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_BROADCASTS", 3)
    url1, url3 = (f"rtmp://127.0.0.1:{free_port()}/live/{key}" for key in ("one", "three"))
    url2 = f"tcp://127.0.0.1:{free_port()}"
    with receiving(url1, tmp_path / "one.npz") as one, receiving(url2, tmp_path / "two.npz") as two, \
            receiving(url3, tmp_path / "three.npz") as three:
        async def main():
            engine = await StreamEngine(tiny_pipeline, _reader_keeps_up()).start()
            try:
                session = await engine.open_session(_portrait(tiny_pipeline))
                events = session.events()
                first = await _connect(session, url1)
                second = await _connect(session, url2)
                third = await _connect(session, url3, reconnect_s=0, bitrate_kbps=400)
                encodes = dict(session.broadcast_encodes)
                with pytest.raises(InputError, match="already streaming to 'rtmp://.*/live/\\*\\*\\*'"):
                    await session.broadcast(url1)
                with pytest.raises(InputError, match="already streaming to 3 destinations"):
                    await session.broadcast(f"rtmp://127.0.0.1:{free_port()}/live/four")  # (nobody listens there)
                feeder = asyncio.ensure_future(_push_in_real_time(session, speechlike(3.0)))
                stream = session.frames()
                shown = [await anext(stream) for _ in range(40)]
                three.kill()
                failed = await _next(events, BroadcastStopped)
                shown += [await anext(stream) for _ in range(25)]  # the others stream on
                encodes_left = set(session.broadcast_encodes)
                first_stopped_at = session.player.clock_tick()
                await session.stop_broadcast(first.id)
                ended = await _next(events, BroadcastStopped)
                for _ in range(10):
                    await anext(stream)
                # ticks from one stop to the other: 10, or more where the reader lags on a busy CPU
                between = session.player.clock_tick() - first_stopped_at
                await session.stop_broadcast()  # the rest: the second
                ended2 = await _next(events, BroadcastStopped)
                await feeder
                return (first, second, third), (failed, ended, ended2), session.broadcasts, session.stats(), shown, \
                    between, (encodes, encodes_left, session.broadcast_encodes)
            finally:
                await engine.stop()

        (first, second, third), (failed, ended, ended2), running, stats, shown, between, \
            (encodes, encodes_left, encodes_after) = run(main())
        got1, got2 = one.result(), two.result()
    assert (first.id, second.id, third.id) == ("b1", "b2", "b3") and running == {}
    assert failed.broadcast_id == "b3" and failed.error and "not reconnected" not in failed.error
    assert (ended.broadcast_id, ended.error, ended2.broadcast_id, ended2.error) == ("b1", "", "b2", "")
    assert [(b["id"], b["state"]) for b in stats["broadcasts"]] == [("b3", "failed"), ("b1", "ended"),
                                                                     ("b2", "ended")]
    for got, broadcast in ((got1, first), (got2, second)):
        assert len(got["frames"]) == broadcast.frames and np.allclose(np.diff(got["times"]), 0.04, atol=0.002)
    # both servers got the pictures shown at the ticks the reader read (each nearest its own tick's); the second
    # joined k ticks after the first, and got every tick shown from then until it was stopped, `between` ticks after
    # the first
    k = _shown_from(got1["frames"], shown) - _shown_from(got2["frames"], shown)
    print(f"frames sent: {first.frames}, {second.frames}, {third.frames}; the second joined {k} ticks later and "
          f"stopped {between} later")
    assert 0 <= k <= 15 and between >= 10, (k, between)
    assert abs(second.frames - (first.frames - k + between)) <= 2 and 25 <= third.frames < first.frames - 25
    # one encode for the first two (each tick once: as many as the first sent, and the second's after it), another
    # for the third; each gone, its process ended, with its last stream
    shared = first.encode
    assert second.encode is shared and third.encode is not shared and set(encodes) == {300, 400}
    assert encodes_left == {300} and encodes_after == {} and shared.members == []
    assert first.frames + between <= shared.frames <= first.frames + between + 10, (shared.frames, first.frames)
    assert shared._writer._proc.wait(5) is not None and third.encode._writer._proc.wait(5) is not None


def test_an_encode_that_falls_behind_skips_and_one_that_dies_ends_its_streams_cleanly(tiny_pipeline, tmp_path):
    """The process encoding a session's live streams stalls (stopped, as on a CPU too busy for it): once it is
    `max_behind_s` behind, the ticks waiting are skipped, each stream it feeds is told (broadcast_skipped, and its
    `skipped_frames`), and streams on once it runs again. Then it dies (killed): each stream it fed sends what it was
    given and ends cleanly, with a broadcast_stopped event saying the encoder stopped (reconnecting would not bring it
    back); the server got every tick the stream sent. A stream that was reconnecting (its server gone) gives up at once
    and fails too, saying why. The session keeps showing frames; a broadcast started after it has an encode of its
    own, and streams."""
    url, url2, url3 = (f"tcp://127.0.0.1:{free_port()}" for _ in range(3))
    with receiving(url, tmp_path / "one.npz") as one, receiving(url2, tmp_path / "two.npz") as two, \
            receiving(url3, tmp_path / "three.npz") as three:
        async def main():
            engine = await StreamEngine(tiny_pipeline, _reader_keeps_up()).start()
            try:
                session = await engine.open_session(_portrait(tiny_pipeline))
                events = session.events()
                broadcast = await _connect(session, url, max_behind_s=1.0)
                stream = session.frames()
                for _ in range(10):
                    await anext(stream)
                proc = broadcast.encode._writer._proc
                proc.send_signal(signal.SIGSTOP)
                try:
                    skipped = await _next(events, BroadcastSkipped)
                    sent_then = broadcast.frames
                finally:
                    proc.send_signal(signal.SIGCONT)
                await wait_until(lambda: broadcast.frames >= sent_then + 10, 10.0, "the stream to go on")
                state = broadcast.describe()
                down = await _connect(session, url3)  # the same encode; its server goes away
                await wait_until(lambda: down.frames >= 5, 10.0, "the third stream")
                three.kill()
                await wait_until(lambda: down.state == "reconnecting", 10.0, "the third stream to reconnect")
                proc.kill()
                stopped = {}
                while len(stopped) < 2:
                    event = await _next(events, BroadcastStopped, timeout=5.0)
                    stopped[event.broadcast_id] = event
                for _ in range(10):  # the session streams on
                    await anext(stream)
                encodes = dict(session.broadcast_encodes)
                again = await _connect(session, url2)  # a new encode
                await wait_until(lambda: again.frames >= 15, 10.0, "the new encode's stream")
                await session.stop_broadcast(again.id)
                return skipped, sent_then, state, stopped, broadcast, down, encodes, again
            finally:
                await engine.stop()

        skipped, sent_then, state, stopped, broadcast, down, encodes, again = run(main())
        got, got2 = one.result(), two.result()
    assert skipped.broadcast_id == broadcast.id and skipped.behind_s == 1.0 and skipped.frames >= 25
    assert state["state"] == "streaming" and state["skipped_frames"] >= skipped.frames
    assert "encoder stopped" in stopped[broadcast.id].error and broadcast.describe()["state"] == "failed"
    assert len(got["frames"]) == broadcast.frames  # ended, not cut: every tick it sent got there
    assert "encoder stopped" in stopped[down.id].error and down.describe()["state"] == "failed" and encodes == {}
    assert again.encode is not broadcast.encode and len(got2["frames"]) == again.frames >= 15


def test_the_demo_streams_to_two_servers_and_writes_its_video(tiny_model_dir, tmp_path, capsys):
    """`letstalk demo --broadcast URL --broadcast URL` (the README's first command, here on the tiny model saying a
    short text): the MP4 of what the tracks emitted and its captions are written, and both servers receive the stream,
    as many frames as the seconds it says it streamed to each. A destination nobody listens at fails the demo at once
    with one clear line, and no video is left."""
    from letstalk_rt.cli import main
    from letstalk_rt.media import probe

    urls = [f"rtmp://127.0.0.1:{free_port()}/live/k3y", f"tcp://127.0.0.1:{free_port()}"]
    out = tmp_path / "demo.mp4"
    demo = ["demo", "--model", str(tiny_model_dir), "--text", "Hello there.", "--quiet", "--out", str(out)]
    with receiving(urls[0], tmp_path / "one.npz") as one, receiving(urls[1], tmp_path / "two.npz") as two:
        one.wait_listening()
        two.wait_listening()
        code = main([*demo, "--broadcast", urls[0], "--broadcast", urls[1]])
        said = capsys.readouterr()
        got = [one.result(), two.result()]
    assert code == 0, said.err
    streamed = [float(re.search(rf"streamed ([\d.]+) s live to {re.escape(url)}\n", said.out).group(1))
                for url in (urls[0].replace("k3y", "***"), urls[1])]
    assert "k3y" not in said.out + said.err
    for received, seconds in zip(got, streamed):
        assert abs(len(received["frames"]) - seconds * 25) <= 1 and seconds >= 1.5
        assert [text for _, text in _cc_captions(received["cc"])] == ["Hello there."]  # the text said, as 608
    ticks = int(re.search(r"\((\d+) frames recorded", said.out).group(1))
    assert probe(out).video_frames == ticks and out.with_suffix(".vtt").exists()

    nowhere = tmp_path / "nowhere.mp4"
    with closed_port() as closed:
        code = main([*demo[:-1], str(nowhere), "--broadcast", f"tcp://127.0.0.1:{closed}"])
    err = capsys.readouterr().err
    (error,) = [line for line in err.splitlines() if line.startswith("letstalk: error:")]  # (no traceback)
    assert code != 0 and "cannot stream to 'tcp://127.0.0.1:" in error and "Traceback" not in err, err
    assert not nowhere.exists()


def test_broadcast_urls_are_checked_and_unreachable_servers_refused_at_once(tiny_pipeline, tmp_path):
    """A file path, http:// or a URL without a host is refused (FFmpeg would write files or fetch pages); a server that
    is not there is an OutputError naming the URL without its stream key; an unpaced session has no live stream."""
    for bad in (str(tmp_path / "out.flv"), "file:///tmp/x.flv", "http://example.com/live", "rtmp:///live/key"):
        with pytest.raises(InputError, match="rtmp://"):
            check_live_url(bad)
    assert check_live_url("rtmps://a.rtmp.youtube.com/live2/abcd") == "flv"
    assert check_live_url("srt://ingest.example:9000?streamid=x") == "mpegts"
    assert redact_url("rtmp://user:pw@host:1935/live2/abcd-efgh") == "rtmp://host:1935/live2/***"
    assert redact_url("srt://host:9000?passphrase=xyz") == "srt://host:9000?***"
    assert redact_url("rtmp://") == "rtmp://" and redact_url("rtmp://a.example/live2/") == "rtmp://a.example/live2/"
    template = LiveEncoder(32).template()
    started = time.monotonic()
    with pytest.raises(OutputError, match=r"rtmp://127\.0\.0\.1:\d+/live/\*\*\*") as refused, closed_port() as closed:
        LiveMuxer(f"rtmp://127.0.0.1:{closed}/live/s3cret", template)
    assert "s3cret" not in str(refused.value) and time.monotonic() - started < 5

    async def main():
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False)).start()
        try:
            session = await engine.open_session(_portrait(tiny_pipeline))
            with pytest.raises(InputError, match="not a live streaming URL"):
                await session.broadcast(str(tmp_path / "out.flv"))
            with pytest.raises(OutputError, match="cannot stream"), closed_port() as closed:
                await session.broadcast(f"tcp://127.0.0.1:{closed}")
            assert session.broadcasts == {}
            unpaced = await engine.open_session(_portrait(tiny_pipeline), session_id="file")
            unpaced.unpace()
            with pytest.raises(LetsTalkError, match="unpaced"):
                await unpaced.broadcast(f"tcp://127.0.0.1:{free_port()}")
        finally:
            await engine.stop()

    run(main())
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_server_streams_a_session_to_an_allowed_url_with_no_viewer(tiny_pipeline, tmp_path):
    """POST /v1/sessions/{id}/broadcast starts a live stream to a URL under --broadcast-to (201, the key hidden); the
    session, with no peer and no viewer, shows the speech pushed to it and the streaming server receives it; GET shows
    its state, /metrics counts it, DELETE ends it (204, then 404). A server without --broadcast-to, a URL outside the
    prefixes, a file or http URL, a bad bitrate and an unreachable server are each refused with a reason."""
    import aiohttp

    from letstalk_rt.client import AvatarClient, AvatarClientError, RequestError
    from letstalk_rt.server.app import add_serve_arguments, broadcast_allowed, config_from_args
    from server_helpers import create_session, running_server, wait_until
    from test_webhooks import receiver as hook_receiver

    port = free_port()
    url = f"rtmp://127.0.0.1:{port}/live/s3cret"
    key = {"Authorization": "Bearer k"}

    async def main(closed: int):
        async with running_server(tiny_pipeline) as srv, aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url)
            async with http.post(f"{srv.url}/v1/sessions/{info['session_id']}/broadcast", json={"url": url},
                                 headers={"Authorization": f"Bearer {info['token']}"}) as r:
                assert r.status == 403 and "--broadcast-to" in (await r.json())["error"]
        async with hook_receiver() as (hook, hooked), \
                running_server(tiny_pipeline, api_key="k", webhooks=[hook],
                               broadcast_to=[f"rtmp://127.0.0.1:{port}/live/", f"tcp://127.0.0.1:{closed}",
                                             "rtmp://127.0.0.1/mine/pr1vate-key"]) as srv, \
                aiohttp.ClientSession() as http:
            info = await create_session(http, srv.url, headers=key)
            sid, mine = info["session_id"], {"Authorization": f"Bearer {info['token']}"}
            endpoint = f"{srv.url}/v1/sessions/{sid}/broadcast"
            for body, status, says in (({"url": f"rtmp://127.0.0.1:{port}/other/s3cret"}, 403, "not under"),
                                       ({"url": f"rtmp://127.0.0.1:{port + 1}/live/s3cret"}, 403, "not under"),
                                       ({"url": "file:///tmp/out.flv"}, 422, "not a live streaming URL"),
                                       ({}, 422, "give `url`"),
                                       ({"url": url, "bitrate_kbps": 5}, 422, "bitrate_kbps"),
                                       ({"url": url, "reconnect_s": -1}, 422, "reconnect_s"),
                                       ({"url": url, "captions": "maybe"}, 422, "`captions`"),
                                       ({"url": f"tcp://127.0.0.1:{closed}"}, 502, "cannot stream")):
                async with http.post(endpoint, json=body, headers=mine) as r:
                    answer = await r.json()
                    error = answer.get("error", "")
                    assert r.status == status and says in error, (body, r.status, answer)
                    assert "s3cret" not in error and "pr1vate" not in error  # no stream key, the prefixes' neither
            async with http.delete(endpoint, headers=mine) as r:
                assert r.status == 404
            async with AvatarClient(srv.url) as client:
                sdk = await client.session(sid, info["token"])
                for _ in range(100):  # the receiver listens once its process is up
                    try:
                        state = await sdk.broadcast(url)
                        break
                    except AvatarClientError as e:
                        assert e.status == 502
                        await asyncio.sleep(0.1)
                assert state == {"id": "b1", "state": "streaming", "url": f"rtmp://127.0.0.1:{port}/live/***",
                                 "seconds": 0.0, "captions": True}
                async with http.post(endpoint, json={"url": url}, headers=mine) as r:
                    assert r.status == 409
                session = srv.engine.sessions[sid]
                session.push_audio(speechlike(1.5))
                session.end_speech()
                await wait_until(lambda: session.player.speech_frames >= 30, 30, "the speech shown with no viewer")
                async with http.get(f"{srv.url}/v1/sessions/{sid}", headers=mine) as r:
                    assert [b["state"] for b in (await r.json())["stats"]["broadcasts"]] == ["streaming"]
                async with http.get(f"{srv.url}/metrics") as r:
                    assert "letstalk_broadcasts_active 1" in await r.text()
                with pytest.raises(RequestError, match="no live stream 'b2' running"):
                    await sdk.stop_broadcast("b2")
                await sdk.stop_broadcast(state["id"])
                with pytest.raises(RequestError, match="no live stream running"):
                    await sdk.stop_broadcast()
            async with http.get(f"{srv.url}/metrics") as r:
                metrics = await r.text()
            await wait_until(lambda: any(b'"broadcast.stopped"' in body for _, body in hooked), 10, "the webhook")
            told = next(json.loads(body) for _, body in hooked if b'"broadcast.stopped"' in body)["data"]
            assert told == {"session_id": sid, "broadcast_id": "b1", "url": f"rtmp://127.0.0.1:{port}/live/***",
                            "seconds": session.ended_broadcasts[-1].seconds, "error": ""}
            assert "letstalk_broadcasts_active 0" in metrics
            assert 'letstalk_broadcasts_total{result="ended"} 1' in metrics
            assert "letstalk_broadcast_reconnects_total 0" in metrics
            return session.ended_broadcasts[-1].frames

    with receiving(url, tmp_path / "got.npz") as receiver, closed_port() as closed:
        sent = run(main(closed))
        got = receiver.result()
    assert len(got["frames"]) == sent >= 30
    heard = _rms_per_frame(got["audio"], int(got["rate"]), got["times"])
    assert (heard > 0.05).sum() >= 12  # (the speech-like signal is loud half the time)

    assert broadcast_allowed("rtmp://a.example/live2/KEY", ["rtmp://"])
    assert not broadcast_allowed("rtmp://a.example.evil/live2/KEY", ["rtmp://a.example/live2/"])
    assert not broadcast_allowed("rtmps://a.example/live2/KEY", ["rtmp://a.example/live2/"])
    assert broadcast_allowed("tcp://127.0.0.1:9000", ["tcp://127.0.0.1"])
    assert not broadcast_allowed("tcp://127.0.0.1:9000", ["tcp://127.0.0.1:9001"])
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert config_from_args(parser.parse_args(["--broadcast-to", "rtmp://"])).broadcast_to == ["rtmp://"]
    for bad in ("/tmp", "http://example.com/", "rtmp:/x"):
        with pytest.raises(LetsTalkError, match="--broadcast-to"):
            config_from_args(parser.parse_args(["--broadcast-to", bad]))


def test_the_server_tells_its_webhooks_of_a_stream_that_dropped_resumed_and_skipped(tiny_pipeline, tmp_path):
    """A platform's server gone mid-stream and back: the operator's backend hears `broadcast.dropped` (why), then
    `broadcast.resumed` (after how long), with the stream's id and no key; /metrics counts the reconnection. Then the
    stream's encode stalls (a CPU too busy for it) 5 s: the frames waiting are skipped, which the SDK's session hears
    (`broadcast_skipped`), the backend too (`broadcast.skipped`), and /metrics counts."""
    import aiohttp

    from letstalk_rt.client import AvatarClient, AvatarClientError
    from server_helpers import create_session, running_server, wait_until
    from test_webhooks import receiver as hook_receiver

    url = f"rtmp://127.0.0.1:{free_port()}/live/s3cret"

    async def main(receiver):
        async with hook_receiver() as (hook, hooked), \
                running_server(tiny_pipeline, webhooks=[hook], broadcast_to=["rtmp://127.0.0.1"]) as srv, \
                aiohttp.ClientSession() as http, AvatarClient(srv.url) as client:
            info = await create_session(http, srv.url)
            sdk = await client.session(info["session_id"], info["token"])
            heard = []
            sdk.on("broadcast_skipped", heard.append)
            await sdk.ping()  # its websocket open: the events come over it
            for _ in range(100):  # the receiver listens once its process is up
                with contextlib.suppress(AvatarClientError):
                    state = await sdk.broadcast(url, reconnect_s=20)
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            receiver.kill()
            again = Receiver(url, tmp_path / "again.npz")
            try:
                def told(kind):
                    return [json.loads(body)["data"] for _, body in hooked if f'"{kind}"'.encode() in body]

                await wait_until(lambda: told("broadcast.resumed"), 20, "the resumed webhook")
                encode, = srv.engine.sessions[info["session_id"]].broadcast_encodes.values()
                encode._writer._proc.send_signal(signal.SIGSTOP)
                try:
                    await wait_until(lambda: told("broadcast.skipped"), 20, "the skipped webhook")
                    await wait_until(lambda: heard, 5, "the SDK's broadcast_skipped event")
                finally:
                    encode._writer._proc.send_signal(signal.SIGCONT)
                async with http.get(f"{srv.url}/metrics") as r:
                    metrics = await r.text()
                await sdk.stop_broadcast()
            finally:
                again.kill()
            return (state, told("broadcast.dropped"), told("broadcast.resumed"), told("broadcast.skipped"), heard,
                    metrics)

    with receiving(url, tmp_path / "got.npz") as receiver:
        state, dropped, resumed, skipped, heard, metrics = run(main(receiver))
    where = {"session_id": dropped[0]["session_id"], "broadcast_id": state["id"],
             "url": url.replace("s3cret", "***")}
    assert len(dropped) == 1 and dropped[0].items() >= where.items() and dropped[0]["error"]
    assert len(resumed) == 1 and resumed[0].items() >= where.items() and 0.5 < resumed[0]["down_s"] < 10
    assert resumed[0]["attempts"] >= 1 and "s3cret" not in str(dropped + resumed)
    assert "letstalk_broadcast_reconnects_total 1" in metrics
    assert skipped[0].items() >= where.items() and skipped[0]["behind_s"] == 5.0 and skipped[0]["frames"] >= 125
    assert heard[0]["broadcast_id"] == state["id"] and heard[0]["frames"] == skipped[0]["frames"]
    assert f"letstalk_broadcast_skipped_frames_total {skipped[0]['frames']}" in metrics


def test_a_server_that_never_answers_costs_the_engine_nothing(tiny_pipeline):
    """An RTMP server that accepts the connection and never answers its handshake: broadcast() fails after its timeout
    with OutputError, and meanwhile the event loop and the session's stream never stall (the connection is made by the
    broadcast's own process: PyAV holds the GIL while it connects)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    url = f"rtmp://127.0.0.1:{listener.getsockname()[1]}/live/key"

    async def main():
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False)).start()
        try:
            session = await engine.open_session(_portrait(tiny_pipeline))
            lags, stop = [], False

            async def watch():
                while not stop:
                    before = time.monotonic()
                    await asyncio.sleep(0.01)
                    lags.append(time.monotonic() - before - 0.01)

            watcher = asyncio.ensure_future(watch())
            started = time.monotonic()
            with pytest.raises(OutputError, match=r"live/\*\*\*': it did not answer within 2 s"):
                await session.broadcast(url, timeout_s=2.0)
            took = time.monotonic() - started
            stop = True
            await watcher
            return took, max(lags), session.broadcasts
        finally:
            await engine.stop()
            listener.close()

    took, worst_lag, broadcasts = run(main())
    assert 1.9 < took < 4 and broadcasts == {}
    assert worst_lag < 0.15, f"the event loop stalled {worst_lag * 1000:.0f} ms while the broadcast connected"


def test_the_go_live_example_streams_the_lines_it_says_then_ends(tiny_pipeline, tmp_path, capsys, caplog):
    """client_examples/go_live.py as a user runs it, lines given, to two platforms at once: the server goes live to
    both, the avatar says the lines on each stream (speech in its sound), the streams end once they are said and the
    avatar is at rest, and no stream key is printed. None of its event callbacks failed (the first stream's end, with
    the second still live, raised KeyError in one, which the SDK logged and went on)."""
    from conftest import client_example
    from server_helpers import running_server

    example = client_example("go_live")
    port = free_port()
    urls = [f"rtmp://127.0.0.1:{port}/live/s3cret", f"rtmp://127.0.0.1:{free_port()}/live/0ther"]

    async def main():
        async with running_server(tiny_pipeline, broadcast_to=["rtmp://127.0.0.1"]) as srv:
            return await example.run(example.parse_args([*urls, "--server", srv.url, "--text", "Hello there.",
                                                         "--text", "Bye now.", "--tail", "0.5"]))

    with receiving(urls[0], tmp_path / "got.npz") as receiver, receiving(urls[1], tmp_path / "got2.npz") as other:
        stopped = run(main())
        got = [receiver.result(), other.result()]
    err = capsys.readouterr().err
    assert not [r for r in caplog.records if r.name == "letstalk_rt.client" and r.levelno >= logging.ERROR], caplog.text
    assert [ev["broadcast_id"] for ev in stopped] == ["b1", "b2"] and all(ev["error"] == "" for ev in stopped)
    assert "s3cret" not in err + str(stopped) and "0ther" not in err + str(stopped)
    assert f"live to rtmp://127.0.0.1:{port}/live/***" in err and "saying 1 sentence(s)" in err
    for received, ev in zip(got, stopped):
        heard = _rms_per_frame(received["audio"], int(received["rate"]), received["times"])
        print(f"{len(received['frames'])} frames, {ev['seconds']} s; loud frames {(heard > 0.02).sum()}, "
              f"last 10 max {heard[-10:].max():.4f}, max {heard.max():.3f}")
        assert abs(len(received["frames"]) - ev["seconds"] * 25) <= 2
        assert (heard > 0.02).sum() >= 25 and heard[-10:].max() < 0.005  # a second of speech or more, then rest
        assert [text for _, text in _cc_captions(received["cc"])] == ["Hello there.", "Bye now."]  # each line, as 608


def test_a_live_stream_goes_on_from_the_session_the_sdk_moves_to(tiny_pipeline, second_pipeline):
    """An SDK session streaming live (`broadcast`) is moved (its device hung): the old session's stream ends with it,
    then the SDK starts the same stream again from the new session, so the streaming server goes on receiving (here a
    UDP MPEG-TS destination, counted as its datagrams arrive). stop_broadcast() on the moved session ends it there."""
    import threading

    from letstalk_rt.client import AvatarClient
    from server_helpers import hang, two_device_server

    port = free_port()
    url = f"udp://127.0.0.1:{port}"
    gate = threading.Event()

    class Counter(asyncio.DatagramProtocol):
        received = 0

        def datagram_received(self, data, addr):
            Counter.received += 1

    async def main():
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(Counter, local_addr=("127.0.0.1", port))
        try:
            async with two_device_server(tiny_pipeline, second_pipeline, broadcast_to=[url]) as srv, \
                    AvatarClient(srv.url) as client:
                session = await client.start_session()
                old_id = session.id
                seen: list[dict] = []
                session.on("*", seen.append)
                await session.ping()  # its websocket (no media here: the stream is what is watched)
                started = await session.broadcast(url)
                await wait_until(lambda: Counter.received > 50, 20, "the stream arriving")
                hung = srv.engine.sessions[old_id].engine
                hang(hung, gate)  # a device that stopped answering
                await wait_until(lambda: any(e["type"] == "moved" for e in seen), 30, "the move")
                new = srv.engine.sessions[session.id]
                await wait_until(lambda: any(b.describe()["state"] == "streaming" for b in new.broadcasts.values()), 20,
                                 "the stream started again")
                before = Counter.received
                await wait_until(lambda: Counter.received > before + 50, 20, "the stream from the new session")
                gate.set()
                await session.stop_broadcast()
                streams = [b.describe() for b in new.broadcasts.values()] + [b.describe() for b in
                                                                            new.ended_broadcasts]
                return old_id, session.id, started, streams, seen, old_id in srv.manager.sessions
        finally:
            transport.close()

    try:
        old_id, new_id, started, streams, seen, old_left = run(main())
    finally:
        gate.set()
    assert new_id != old_id and not old_left
    assert started["state"] == "streaming"
    assert [s["state"] for s in streams] == ["ended"] and streams[0]["url"] == started["url"]
    assert not [e for e in seen if e["type"] == "error"], seen
