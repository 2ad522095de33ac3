"""The streaming engine on the tiny model, in real time (each test streams a few seconds)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from conftest import cpu_share, skip_if_busy, speech_out, speechlike
from letstalk_rt.errors import InputError, LetsTalkError
from letstalk_rt.stream import AudioBufferFull, CapacityError, EngineConfig, StreamEngine
from letstalk_rt.stream.engine import SessionClosedError, unfaded_audio
from letstalk_rt.stream.events import (AudioPlayed, EngineAdjusted, SessionClosed, SessionError, SpeechStarted, SpeechStopped,
                                      WindowTimings)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


def _portrait(pipe, value: int):
    rng = np.random.default_rng(value)
    img = np.clip(rng.normal(value, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
    return pipe.prepare_portrait(img, detect=False)


async def _engine(pipe, **kw) -> StreamEngine:
    return await StreamEngine(pipe, EngineConfig(**{"warmup": False, **kw})).start()


async def _collect(session, seconds: float) -> list:
    out = []
    async for frame in session.frames():
        out.append(frame)
        if len(out) >= seconds * 25:
            return out
    return out


async def _collect_made(session, made: int, seconds: float = 4.0) -> list:
    """Frames until `made` of them were generated (not fillers, the last frame held while a window is late), or
    `seconds` of them: a session that keeps running gets there however busy the machine (under a busy loop beside
    the tests, the first windows of a fresh engine came late and 1.5 s held 29 generated frames, not 37)."""
    out = []
    async for frame in session.frames():
        out.append(frame)
        if sum(not f.filler for f in out) >= made or len(out) >= seconds * 25:
            return out
    return out


def _assert_played(audio: np.ndarray, speech: np.ndarray) -> None:
    """`audio` (`speech_out`'s) is `speech`, sample for sample: exact, but for the few samples after a held tick,
    whose fade-in was undone (a float32 rounding or two)."""
    np.testing.assert_allclose(audio, speech, rtol=1e-6, atol=0)


def _assert_said(audio: np.ndarray, speech: np.ndarray) -> None:
    """`audio`'s sound (its non-zero samples) is `speech` (`_assert_played`)."""
    _assert_played(audio[audio != 0], speech)


async def _push_in_real_time(session, pcm: np.ndarray, started=None) -> None:
    """Push `pcm` in 20 ms chunks at real-time pace, then end_speech(); `started(t0)` is called first."""
    start = time.monotonic()
    if started is not None:
        started(start)
    for i, pos in enumerate(range(0, len(pcm), 320)):
        await asyncio.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
        session.push_audio(pcm[pos:pos + 320])
    session.end_speech()


def _real_time_session(pipe, pushed: np.ndarray, seconds: float, portrait: int) -> tuple[dict, list]:
    """A fresh session on a warmed-up engine (catch-up tempo 1.5) fed `pushed` in real time from the moment
    it opens: its stats and the first `seconds` of frames."""
    async def main():
        engine = await _engine(pipe, catch_up_tempo=1.5, warmup=True)
        session = await engine.open_session(_portrait(pipe, portrait))
        feeder = asyncio.create_task(_push_in_real_time(session, pushed))
        frames = await _collect(session, seconds)
        await feeder
        await engine.stop()
        return session.stats(), frames

    return run(main())


def _drain_events(session) -> list:
    out = []
    while not session._events.empty():
        out.append(session._events.get_nowait())
    return out


def test_every_pushed_sample_comes_out_once_in_order_on_whole_frames(tiny_pipeline):
    """Frame count = audio duration x 25, and each frame carries its own 40 ms: the pushed speech
    appears sample-exact and contiguous in the frames' audio, starting on a frame boundary."""
    speech = speechlike(1.0) + 0.05  # 16000 samples = 25 frames, never exactly zero

    async def main():
        engine = await _engine(tiny_pipeline)
        session = await engine.open_session(_portrait(tiny_pipeline, 100))
        for bad, said in ((np.full(320, np.nan, np.float32), "NaN"), (speech[:320] * 32767, "divide them by 32768")):
            for rate in (16000, 48000):  # as is, and through the resampler: refused, and nothing of it queued (a NaN
                with pytest.raises(InputError, match=said):  # once blacked out the session's picture for good)
                    session.push_audio(bad, rate)
        for pos in range(0, len(speech), 320):  # 20 ms chunks
            session.push_audio(speech[pos:pos + 320])
        session.end_speech()
        frames = await _collect(session, 2.5)
        await engine.stop()
        return frames

    frames = run(main())
    audio = speech_out(frames, drop_held=True)  # held frames (a slow machine) are silent
    nonzero = np.flatnonzero(audio)
    start = nonzero[0]
    assert start % 640 == 0
    _assert_played(audio[start:start + len(speech)], speech)
    assert not audio[start + len(speech):].any()  # nothing after: no repeated or leaked speech
    speech_frames = [f for f in frames if f.audio.any() and not f.filler]
    assert len(speech_frames) == 25
    assert all(f.video.shape == (32, 32, 3) for f in frames)
    idx = [f.index for f in frames if not f.filler]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)


def test_speech_at_another_rate_comes_out_whole_at_its_end(tiny_pipeline):
    """0.5 s pushed at 24 kHz in 100 ms chunks comes out as 0.5 s at 16 kHz, its last millisecond too (held in the
    resampler's filter until end_speech() lets it out), contiguous."""
    speech = speechlike(0.5, rate=24000) / 2 + 0.3  # 0.15..0.45: never near zero, at 24 kHz or resampled

    async def main():
        engine = await _engine(tiny_pipeline)
        session = await engine.open_session(_portrait(tiny_pipeline, 100))
        for pos in range(0, len(speech), 2400):
            session.push_audio(speech[pos:pos + 2400], 24000)
        session.end_speech()
        frames = await _collect(session, 1.5)
        await engine.stop()
        return frames

    audio = speech_out(run(main()), drop_held=True)
    loud = np.flatnonzero(audio > 0.1)
    assert len(loud) == loud[-1] - loud[0] + 1 == 8000


def test_tracks_are_paced_on_one_clock_with_monotonic_pts_and_matching_audio(tiny_pipeline):
    from letstalk_rt.stream.tracks import AUDIO_PTIME

    async def main():
        engine = await _engine(tiny_pipeline)
        session = await engine.open_session(_portrait(tiny_pipeline, 80))
        speech = speechlike(1.0) + 0.05
        session.push_audio(speech)
        session.end_speech()
        video, audio = session.video_track(), session.audio_track()

        async def read(track, n):
            out = []
            for _ in range(n):
                frame = await track.recv()
                out.append((frame, time.monotonic()))
            return out

        v, a = await asyncio.gather(read(video, 50), read(audio, 100))
        player = session.player
        shown = [player.shown[i] for i in range(50)]
        start = player.start
        video.stop(); audio.stop()
        await engine.stop()
        return v, a, shown, start

    v, a, shown, start = run(main())
    vpts = [f.pts for f, _ in v]
    apts = [f.pts for f, _ in a]
    assert np.all(np.diff(vpts) == 3600) and vpts[0] == 0
    assert np.all(np.diff(apts) == 320) and apts[0] == 0
    # nothing is released before its due time on the shared clock
    assert all(t >= start + i / 25 - 1e-3 for i, (_, t) in enumerate(v))
    assert all(t >= start + j * AUDIO_PTIME - 1e-3 for j, (_, t) in enumerate(a))
    # audio packets 2i, 2i+1 are exactly frame i's audio: lips and sound cannot be offset
    track_audio = np.concatenate([f.to_ndarray()[0] for f, _ in a])
    frame_audio = (np.clip(np.concatenate([f.audio for f in shown]), -1, 1) * 32767).astype(np.int16)
    np.testing.assert_array_equal(track_audio, frame_audio)


def test_silence_keeps_the_avatar_alive_without_speech_events(tiny_pipeline):
    async def main():
        engine = await _engine(tiny_pipeline, warmup=True)  # measured window time: deadlines start in time
        session = await engine.open_session(_portrait(tiny_pipeline, 60))
        frames = await _collect(session, 2.0)
        events = _drain_events(session)
        await engine.stop()
        assert session.stats()["gap_inserted_s"] == 0  # idle filler is not a gap: nothing was pushed
        return frames, events

    frames, events = run(main())
    assert len(frames) == 50
    real = [f for f in frames if not f.filler]
    assert len(real) >= 45  # generated, not held: the avatar keeps moving
    assert len({f.video.tobytes() for f in real}) > 10
    assert not any(f.speech or f.pushed for f in frames)  # no audio of anyone's: idle frames, the engine's silence
    assert not any(isinstance(e, (SpeechStarted, SpeechStopped)) for e in events)
    assert any(isinstance(e, WindowTimings) for e in events)


def _say(pipe, pcm: np.ndarray, seconds: float, portrait_seed: int, then=None, **config) -> tuple:
    """One session says `pcm` (pushed at once, then end_speech): its frames over `seconds`, its events, and
    what `await then(session)` returns, run before the engine stops (`config`: EngineConfig fields)."""
    async def main():
        engine = await _engine(pipe, **config)
        session = await engine.open_session(_portrait(pipe, portrait_seed))
        session.push_audio(pcm)
        session.end_speech()
        frames = await _collect(session, seconds)
        events = _drain_events(session)
        after = await then(session) if then is not None else None
        await engine.stop()
        return frames, events, after

    return run(main())


def test_speech_events_follow_playback(tiny_pipeline):
    frames, events, _ = _say(tiny_pipeline, speechlike(1.0) + 0.05, 2.5, 60)
    kinds = [type(e) for e in events if isinstance(e, (SpeechStarted, SpeechStopped))]
    assert kinds == [SpeechStarted, SpeechStopped]
    first_speech = next(i for i, f in enumerate(frames) if f.speech)
    started = next(e for e in events if isinstance(e, SpeechStarted))
    assert started.frame == first_speech


def test_audio_played_comes_once_when_the_last_pushed_audio_is_shown(tiny_pipeline):
    """Two words with a 0.8 s pause between them, pushed at once: `speech_stopped` (from the sound's level) comes at
    the pause too, `audio_played` once, with the frame that plays the last pushed sample, and audio_shown is True from
    then on (a client can end its turn on it)."""
    word = speechlike(0.6, seed=13) + 0.05
    speech = np.concatenate([word, np.zeros(12800, np.float32), word])
    # (catch_up off: pushed at once, as live audio the pause is a backlog, cut to catch_up_keep_ms)
    frames, events, shown = _say(tiny_pipeline, speech, 3.6, 60, then=lambda s: _now(s.audio_shown), catch_up=False)
    played = [e for e in events if isinstance(e, AudioPlayed)]
    stops = [e for e in events if isinstance(e, SpeechStopped)]
    last_piece = max(f.pieces for f in frames)
    assert last_piece > 0 and len(played) == 1 and shown
    assert played[0].frame == next(i for i, f in enumerate(frames) if f.pieces == last_piece)
    assert len(stops) == 2 and stops[0].frame < played[0].frame  # the pause looked like the end to the sound's level
    assert played[0].frame >= max(i for i, f in enumerate(frames) if f.speech)


async def _now(value):
    return value


def test_quiet_speech_counts_as_speech(tiny_pipeline):
    """Speech 28 dB quieter than usual (RMS ~0.006, under speech_rms) is raised for the encoder, and
    counted as speech at that level too: events fire for it, and it comes out whole and unraised. The
    raise outlives an interrupt (the microphone did not change)."""
    speech = (speechlike(2.0, seed=5) * 0.04).astype(np.float32)

    async def interrupted(session):
        before = session.stats()["input_gain"]
        session.interrupt()
        await _collect(session, 0.4)  # idle frames: the worker has started over
        return before, session.stats()["input_gain"]

    # on a loaded machine the session falls behind: nothing may be played faster, skipped or dropped (a held
    # frame only delays the speech), so what comes out is exactly what was pushed
    frames, events, (gain, gain_after) = _say(tiny_pipeline, speech, 6.0, 65, then=interrupted, catch_up=False,
                                              catch_up_tempo=1.0, late_skip_ms=1e9)
    # ~16x (its cap) before; after, still raised, not back to 1 (the level may have moved on a little
    # with the last chunks the worker fed as the interrupt came)
    assert gain > 4 and gain_after > 4, (gain, gain_after)
    assert any(isinstance(e, SpeechStarted) for e in events)
    assert sum(f.speech for f in frames) >= 25  # most of its 50 frames (onsets and tails are quieter)
    audio = speech_out(frames, drop_held=True)  # a held frame is silent: speech waits
    start = np.flatnonzero(audio)[0]
    _assert_played(audio[start:start + len(speech)], speech)  # played back as pushed


def test_interrupt_flushes_speech_and_continues_quickly(tiny_pipeline):
    async def main():
        engine = await _engine(tiny_pipeline)
        session = await engine.open_session(_portrait(tiny_pipeline, 120))
        session.push_audio(speechlike(6.0) + 0.05)
        frames = []
        interrupted_at = None
        after = []
        async for f in session.frames():
            frames.append(f)
            if interrupted_at is None and sum(x.speech for x in frames) >= 10:
                session.interrupt()
                interrupted_at = time.monotonic()
                continue
            if interrupted_at is not None:
                after.append((f, time.monotonic()))
                if len(after) >= 25:
                    break
        await engine.stop()
        return after, interrupted_at

    after, interrupted_at = run(main())
    assert not any(f.speech for f, _ in after)  # queued speech is gone at once
    first_new = next(t for f, t in after if not f.filler)
    assert first_new - interrupted_at < 0.5  # generous for CI; `letstalk bench` measures the real figure


def test_queues_stay_bounded_when_the_consumer_stalls(tiny_pipeline):
    async def main():
        engine = await _engine(tiny_pipeline, max_pending_seconds=5.0)
        session = await engine.open_session(_portrait(tiny_pipeline, 90))
        session.push_audio(speechlike(4.0))
        with pytest.raises(AudioBufferFull):
            session.push_audio(speechlike(2.0))
        await asyncio.sleep(1.5)  # nobody reads
        lead = len(session.player.queue) + session._inflight
        tokens = session._w.n_tokens
        await engine.stop()
        return lead, tokens

    lead, tokens = run(main())
    window = tiny_pipeline.window
    assert lead <= int(1.5 * window) + window
    assert tokens <= 3 * window


def test_two_sessions_are_batched_and_stay_separate(tiny_pipeline):
    async def main():
        engine = await _engine(tiny_pipeline)
        a = await engine.open_session(_portrait(tiny_pipeline, 30), seed=1)
        b = await engine.open_session(_portrait(tiny_pipeline, 220), seed=1)
        fa, fb = await asyncio.gather(_collect(a, 1.6), _collect(b, 1.6))
        events = _drain_events(a) + _drain_events(b)
        await engine.stop()
        return fa, fb, events

    fa, fb, events = run(main())
    assert max(e.batch for e in events if isinstance(e, WindowTimings)) == 2
    ra = [f.video for f in fa if not f.filler]
    rb = [f.video for f in fb if not f.filler]
    assert all(not np.array_equal(x, y) for x, y in zip(ra, rb))


def test_sessions_audio_is_encoded_together_and_each_keeps_its_own(tiny_pipeline, monkeypatch):
    """Two sessions speaking at once: their new audio goes through the encoder in one call per plan (a
    GPU's cost there is per call), and each session's frames still carry exactly its own speech."""
    from letstalk_rt.stream import engine as engine_module

    sizes = []
    real = engine_module.encode_features
    monkeypatch.setattr(engine_module, "encode_features", lambda toks: sizes.append(len(toks)) or real(toks))
    speech = [speechlike(1.0, seed=21) + 0.05, speechlike(1.0, seed=22) + 0.05]

    async def main():
        engine = await _engine(tiny_pipeline, catch_up_tempo=1.0)  # a busy machine's speed-up would stretch the speech
        sessions = [await engine.open_session(_portrait(tiny_pipeline, v)) for v in (40, 200)]
        pushed = asyncio.gather(*(_push_in_real_time(s, x) for s, x in zip(sessions, speech)))
        # (3 s for 1 s of speech: on a busy machine its end came out after 2 s)
        frames = await asyncio.gather(*(_collect(s, 3.0) for s in sessions))
        await pushed
        await engine.stop()
        return frames

    for frames, pushed in zip(run(main()), speech):
        audio = speech_out(frames, drop_held=True)
        start = np.flatnonzero(audio)[0]
        _assert_played(audio[start:start + len(pushed)], pushed)
    assert max(sizes) == 2, sizes


def test_frames_in_flight_keep_a_playing_session_from_looking_dry(tiny_pipeline):
    """Between a window's end and its delivery, a session's queue holds 1 frame and 4 are in flight: the
    planner must not take it for nearly dry and put idle frames in front of what it is about to play
    (with several sessions that happened every few windows and cost 20-45 % of real time)."""
    async def main():
        engine = await _engine(tiny_pipeline)
        session = await engine.open_session(_portrait(tiny_pipeline, 60))
        await _collect(session, 0.2)
        engine._stopping = True  # stop the worker: the test plays the planner itself, on a state it sets
        engine._wake()
        await asyncio.to_thread(engine._thread.join)
        w, player = session._w, session.player
        w.tokens, w.n_tokens, w.after_speech, w.unflushed = [], 0, False, False
        player.queue.clear()
        player.queue.append(None)  # one frame left to show
        player.start = time.monotonic() - player.tick / 25  # the next tick is due now
        # the planner's estimate of a window's time: its default (50 ms), not what this machine measured (a tiny
        # model's few ms made "1 frame ahead" look like time to spare: the planner waited, in one CI run)
        engine._gen_ms.clear()
        verdicts = []
        for inflight in (4, 0):
            session._inflight = inflight
            verdicts.append((engine._prepare(session, time.monotonic()), w.n_tokens))
        player.queue.clear()
        engine._thread = None
        return verdicts

    (in_flight, tokens_then), (dry, tokens_now) = run(main())
    assert in_flight is None and tokens_then == 0  # 5 frames ahead: nothing to do yet
    assert dry is not None and tokens_now >= 1  # 1 frame ahead: idle frames, a window now


def test_a_failing_session_ends_with_an_error_and_the_others_keep_running(tiny_pipeline):
    async def main():
        engine = await _engine(tiny_pipeline)
        good = await engine.open_session(_portrait(tiny_pipeline, 30))
        bad = await engine.open_session(_portrait(tiny_pipeline, 200))
        bad._w.stream.portrait.latent = torch.zeros(3, 3)  # a corrupted state: its forward pass raises
        events = []

        async def watch():
            async for e in bad.events():
                events.append(e)

        watcher = asyncio.create_task(watch())
        frames = await _collect_made(good, 30)
        await asyncio.wait_for(watcher, 5)
        assert bad.closed and not good.closed
        await engine.stop()
        return frames, events

    frames, events = run(main())
    assert len([f for f in frames if not f.filler]) >= 30
    errors = [e for e in events if isinstance(e, SessionError)]
    assert len(errors) == 1 and "generation failed" in errors[0].message  # one failure, one event
    assert isinstance(events[-1], SessionClosed) and events[-1].reason == "error"


def _one_session_fails(pipe, break_it) -> tuple[list, list, list]:
    """Two sessions speaking at once; `break_it(bad)` breaks one of them. The good one's frames, the bad one's
    events, and the speech the good one was given."""
    speech = speechlike(2.0, seed=31) + 0.05

    async def main():
        engine = await _engine(pipe, catch_up_tempo=1.0)  # a busy machine's speed-up would stretch the speech
        good = await engine.open_session(_portrait(pipe, 30))
        bad = await engine.open_session(_portrait(pipe, 200))
        break_it(bad)
        events = []

        async def watch():
            async for e in bad.events():
                events.append(e)

        watcher = asyncio.create_task(watch())
        async def push_bad():
            with contextlib.suppress(SessionClosedError):  # it closes with its error while speaking
                await _push_in_real_time(bad, speech[::-1].copy())

        pushed = asyncio.gather(_push_in_real_time(good, speech), push_bad())
        frames = await _collect(good, 3.0)
        await pushed
        await asyncio.wait_for(watcher, 5)
        assert bad.closed and not good.closed
        await engine.stop()
        return frames, events

    frames, events = run(main())
    return frames, events, speech


def test_an_audio_failure_in_a_shared_encoder_call_costs_the_other_sessions_nothing(tiny_pipeline):
    """Sessions' new audio is encoded in one call; one session failing to turn its part into tokens ends that
    session (one error event) and the others keep every sample of theirs, in order."""
    def break_it(bad):
        def complete(feats):
            raise RuntimeError("tokens lost")
        bad._w.tokenizer.complete = complete

    frames, events, speech = _one_session_fails(tiny_pipeline, break_it)
    errors = [e for e in events if isinstance(e, SessionError)]
    assert len(errors) == 1 and "audio processing failed" in errors[0].message and "tokens lost" in errors[0].message
    audio = speech_out(frames, drop_held=True)
    start = np.flatnonzero(audio)[0]
    _assert_played(audio[start:start + len(speech)], speech)


def test_an_error_outside_the_model_calls_ends_its_sessions_and_the_worker_keeps_running(tiny_pipeline):
    """An exception in the worker's own bookkeeping for a window (not the model) ends the sessions of that batch
    with an error event; the worker thread lives on and serves the sessions opened after."""
    def break_it(bad):
        def take_audio(n):
            raise RuntimeError("bookkeeping")
        bad._w.take_audio = take_audio

    frames, events, speech = _one_session_fails(tiny_pipeline, break_it)
    errors = [e for e in events if isinstance(e, SessionError)]
    assert len(errors) == 1 and "generation failed (window)" in errors[0].message
    assert len([f for f in frames if not f.filler]) >= 50  # the good one: 3 s, far more than its first batch


def test_latency_quantiles_are_the_sorted_entries_the_stats_always_read():
    """`quantiles` (partial sorts) gives the sorted list's entry at int(q x n), as the stats read them before, for
    every length from 1 (and None for no values)."""
    from letstalk_rt.stream.engine import quantiles

    rng = np.random.default_rng(3)
    assert quantiles([], (0.5,)) is None
    for n in (1, 2, 5, 20, 101, 10000):
        values = list(rng.exponential(0.4, n))
        got = quantiles(collections.deque(values), (0.0, 0.5, 0.95, 0.99, 1.0))
        want = [sorted(values)[min(n - 1, int(q * n))] for q in (0.0, 0.5, 0.95, 0.99, 1.0)]
        assert got == want


def test_a_window_whose_only_session_fails_in_its_bookkeeping_decodes_nothing(tiny_pipeline):
    """The session alone in its window fails in the worker's bookkeeping: the window has nothing left to decode
    (the frame-by-frame decode once read the empty batch's first item, and the session got a second error event).
    One error event; a session opened after it streams."""
    async def main():
        engine = await _engine(tiny_pipeline)
        bad = await engine.open_session(_portrait(tiny_pipeline, 200))

        def take_audio(n):
            raise RuntimeError("bookkeeping")

        bad._w.take_audio = take_audio
        events = []
        async for e in bad.events():
            events.append(e)
        good = await engine.open_session(_portrait(tiny_pipeline, 30))
        frames = await _collect_made(good, 20)
        await engine.stop()
        return events, frames

    events, frames = run(main())
    errors = [e for e in events if isinstance(e, SessionError)]
    assert len(errors) == 1 and "generation failed (window)" in errors[0].message
    assert isinstance(events[-1], SessionClosed) and len([f for f in frames if not f.filler]) >= 20


def test_frames_start_at_the_present_and_a_stalled_reader_skips_ahead(tiny_pipeline):
    """session.frames() reads from the frame due now, like the tracks: a second reader (or one that stalled past
    late_skip_ms) gets paced frames from the present, the missed ones counted as dropped, never a burst of old
    frames."""
    async def main():
        engine = await _engine(tiny_pipeline)
        session = await engine.open_session(_portrait(tiny_pipeline, 60))
        await _collect(session, 0.4)  # starts the clock
        await asyncio.sleep(1.0)
        t0 = time.monotonic()
        second = await _collect(session, 0.4)  # a new reader, 1 s later
        t_second = time.monotonic() - t0
        stalled = []
        async for f in session.frames():
            stalled.append(f)
            if len(stalled) == 3:
                before = session.dropped["consumer"]
                await asyncio.sleep(0.6)  # stall well past late_skip_ms (200)
                t1 = time.monotonic()
            if len(stalled) == 13:
                break
        t_stalled = time.monotonic() - t1
        dropped = session.dropped["consumer"] - before
        await engine.stop()
        return second, t_second, t_stalled, dropped

    second, t_second, t_stalled, dropped = run(main())
    assert len(second) == 10 and t_second > 0.25  # paced (10 frames = 0.4 s), not 25 old frames at once
    assert t_stalled > 0.25  # after the stall, paced again from the present
    assert 10 <= dropped <= 20  # ~15 frames (0.6 s) skipped


def test_an_interrupt_before_the_first_read_shows_the_new_state_not_a_black_frame(tiny_pipeline):
    async def main():
        engine = await _engine(tiny_pipeline)
        session = await engine.open_session(_portrait(tiny_pipeline, 150))
        await session.player.first_frame.wait()  # the first window is there; nobody has read it
        session.interrupt()
        frames = await _collect(session, 0.2)
        await engine.stop()
        return frames

    frames = run(main())
    assert not frames[0].filler and frames[0].video.max() > 0


def test_admission_cap_refuses_at_once(tiny_pipeline):
    async def main():
        engine = await _engine(tiny_pipeline, max_sessions=1)
        s = await engine.open_session(_portrait(tiny_pipeline, 30))
        t0 = time.monotonic()
        with pytest.raises(CapacityError):
            await engine.open_session(_portrait(tiny_pipeline, 40))
        refused_in = time.monotonic() - t0
        await s.close()
        again = await engine.open_session(_portrait(tiny_pipeline, 40))  # the slot is free again
        await engine.stop()
        return refused_in, again

    refused_in, again = run(main())
    assert again.closed  # engine.stop() closed it


def test_a_shorter_live_window_is_used_and_out_of_range_windows_are_refused(tiny_pipeline):
    """EngineConfig.window trades compute for latency: every window after the first has that many frames."""
    from letstalk_rt.errors import LetsTalkError

    assert tiny_pipeline.window == 4
    with pytest.raises(LetsTalkError, match="1..4"):
        StreamEngine(tiny_pipeline, EngineConfig(window=5))

    async def main():
        engine = await _engine(tiny_pipeline, window=3, first_window=1)
        session = await engine.open_session(_portrait(tiny_pipeline, 70))
        session.push_audio(speechlike(1.0))
        session.end_speech()
        frames = await _collect(session, 1.5)
        events = _drain_events(session)
        await engine.stop()
        return frames, events

    frames, events = run(main())
    sizes = [e.frames for e in events if isinstance(e, WindowTimings)]
    assert sizes[0] == 1 and len(sizes) > 5 and set(sizes[1:]) == {3}
    assert len([f for f in frames if f.audio.any() and not f.filler]) == 25  # every frame of the speech, once


def test_before_its_clock_starts_a_session_gets_its_first_window_and_one_full_window_ahead(tiny_pipeline):
    """A session nobody reads yet (a WebRTC peer still connecting) and nobody speaks to gets its short first window
    and then one full window of idle frames, no more: once the clock starts, the first frames play while the next
    window is made (before, the second waited for the clock and had a full window's compute to make in the first's
    80 ms: 3-5 held frames at the start of every WebRTC stream). Reading then starts from the first frame."""
    async def main():
        engine = await _engine(tiny_pipeline, first_window=2)
        session = await engine.open_session(_portrait(tiny_pipeline, 70))
        await asyncio.sleep(1.0)  # far longer than a few windows of the tiny model
        before_reading = session.frames_generated
        frames = await _collect(session, 0.4)
        events = _drain_events(session)
        await engine.stop()
        return before_reading, frames, events

    before_reading, frames, events = run(main())
    assert before_reading == 2 + tiny_pipeline.window
    sizes = [e.frames for e in events if isinstance(e, WindowTimings)]
    assert sizes[:2] == [2, tiny_pipeline.window]
    assert [f.index for f in frames[:6]] == list(range(6))  # from the first frame on, none skipped


def test_latency_history_bounds_what_a_session_keeps(tiny_pipeline):
    """A server's sessions keep the last `latency_history` frames' latencies (memory flat for hours); 0 keeps
    all of them (the benchmark's soak); a negative count is refused."""
    from letstalk_rt.errors import LetsTalkError

    with pytest.raises(LetsTalkError, match="latency_history"):
        StreamEngine(tiny_pipeline, EngineConfig(latency_history=-1))

    async def main(history):
        engine = await _engine(tiny_pipeline, latency_history=history)
        session = await engine.open_session(_portrait(tiny_pipeline, 60))
        session.push_audio(speechlike(1.0) + 0.05)
        session.end_speech()
        await _collect(session, 1.5)
        out = list(session.latencies), session.stats()
        await engine.stop()
        return out

    kept, stats = run(main(5))
    everything, _ = run(main(0))
    assert len(everything) >= 25 and len(kept) == 5  # a second of speech is 25 frames, each with its latency
    assert stats["latency_ms_p50"] == pytest.approx(sorted(kept)[2] * 1000)  # the stats read the kept ones


def test_less_audio_lookahead_steers_the_latency_lower_and_loses_no_speech(tiny_model_dir):
    """A pipeline at audio_lookahead 0 (the tiny model's margin is 2 frames): the engine steers to a latency 80 ms
    lower, and the speech comes out whole and in order, a frame for each 40 ms of it (the tokens' timing:
    test_pipeline's test_less_audio_lookahead_...)."""
    from letstalk_rt.pipeline import LetsTalkPipeline

    speech = speechlike(1.5, seed=4) + 0.05  # never below speech_rms

    async def main(pipe):
        engine = await _engine(pipe, catch_up_tempo=1.0)  # a busy machine's speed-up would stretch the speech
        session = await engine.open_session(_portrait(pipe, 80))
        feeder = asyncio.create_task(_push_in_real_time(session, speech))
        frames = await _collect(session, 6.0)  # the speech, its latency and whatever a busy machine holds
        await feeder
        target = engine.target_latency_s() - engine.window_compute_ms() / 1000  # less the compute each measured
        out = target, speech_out(frames), list(session.latencies)
        await engine.stop()
        return out

    full_target, _, _ = run(main(LetsTalkPipeline.from_pretrained(tiny_model_dir, traced=False)))
    target, audio, lat = run(main(LetsTalkPipeline.from_pretrained(tiny_model_dir, traced=False, audio_lookahead=0)))
    assert full_target - target == pytest.approx(0.080)  # 2 frames
    _assert_said(audio, speech)
    assert len(lat) >= 1.5 * 25 - 1  # a latency for every frame of speech shown (how long: docs/benchmarks.md)


def _catch_up_run(pipe, catch_up: bool):
    """1 s of speech pushed at once (a backlog, as after a stall), then 2 s of silence and 1 s of speech
    pushed in real time: returns the session's latencies, its skipped silence, the frames' audio, the target,
    the frames held (a frame not ready when due: each one makes all that follows 40 ms later)."""
    burst, tail = speechlike(1.0, seed=1) + 0.05, speechlike(1.0, seed=2) + 0.05  # never below speech_rms

    async def main():
        engine = await _engine(pipe, catch_up=catch_up)
        session = await engine.open_session(_portrait(pipe, 90))
        session.push_audio(burst)
        live = np.concatenate([np.zeros(32000, np.float32), tail])

        feeder = asyncio.create_task(_push_in_real_time(session, live))
        frames = await _collect(session, 6.5)  # 4 s of sound, the latency and any held frames
        await feeder
        out = (list(session.latencies), session.silence_skipped_s, speech_out(frames),
               engine.target_latency_s(), session.player.fillers)
        await engine.stop()
        return out

    return (*run(main()), burst, tail)


def test_latency_catches_up_in_pauses_without_cutting_speech(tiny_pipeline):
    """A session that fell behind (here: a 1 s burst) is pulled back to its target latency by skipping
    silence in the next pause; with catch-up off it stays 1 s late. Speech itself is never cut."""
    lat, skipped, audio, target, held, burst, tail = _catch_up_run(tiny_pipeline, catch_up=True)
    late_lat, late_skipped, late_audio, _, _, _, _ = _catch_up_run(tiny_pipeline, catch_up=False)
    assert late_skipped == 0.0
    assert 0.5 <= skipped <= 1.8  # about the backlog, never the whole 2 s pause
    last = np.median(lat[-20:])  # the speech after the pause
    # Back near the target, give or take the lateness a loaded machine adds after the pause: each held
    # frame is 40 ms more (the test machine busy: 0.69 s, target 0.37, in 1 of 4 runs; quiet: 0.37-0.39).
    assert last <= target + 0.25 + held / 25, (last, target, held)
    # Without catch-up the backlog stays: ~1 s plus the first window's start-up (1.03-1.16 s measured,
    # target 0.35-0.37 here; a slower CI machine has a larger target: there 1.03 against ~0.43).
    assert np.median(late_lat[-20:]) >= target + 0.5, (np.median(late_lat[-20:]), target)
    for out in (audio, late_audio):  # both utterances come out whole and in order: only silence differs
        # (a loaded machine may also insert silence at a deadline; speech samples are never exactly 0)
        _assert_said(out, np.concatenate([burst, tail]))


def _slow_stretch_run(pipe, monkeypatch, tempo: float):
    """5 s of continuous speech (no pause to skip) pushed in real time, while for its first 1.5 s every
    window costs 0.25 s more (a slow stretch of the machine): the session's latencies, its stats, the
    frames' audio, the pushed speech, the target and the lateness over it where a speed-up starts."""
    speech = speechlike(5.0, seed=6) + 0.05  # never below speech_rms
    generate = pipe.generate_latents
    slow_until = [math.inf]

    def slow(*a, **k):
        if time.monotonic() < slow_until[0]:
            time.sleep(0.25)
        return generate(*a, **k)

    monkeypatch.setattr(pipe, "generate_latents", slow)

    async def main():
        engine = await _engine(pipe, catch_up_tempo=tempo)
        session = await engine.open_session(_portrait(pipe, 70))

        def slow_from(start: float) -> None:
            slow_until[0] = start + 1.5

        feeder = asyncio.create_task(_push_in_real_time(session, speech, slow_from))
        frames = await _collect(session, 6.5)
        await feeder
        out = (list(session.latencies), session.stats(), speech_out(frames),
               engine.target_latency_s(), engine._catch_up_thresholds_ms()[1] / 1000)
        await engine.stop()
        return out

    try:
        return (*run(main()), speech)
    finally:
        monkeypatch.setattr(pipe, "generate_latents", generate)


def test_a_slow_stretch_in_continuous_speech_is_caught_up_by_playing_it_faster(tiny_pipeline, monkeypatch):
    """No pause to skip: the speech that queued up while the engine ran slow is played faster (pitch kept),
    lips and sound alike, until the latency is back near the target. At tempo 1.0 the lateness stays."""
    share = cpu_share()
    lat, stats, audio, target, start, speech = _slow_stretch_run(tiny_pipeline, monkeypatch, tempo=1.5)
    late_lat, late_stats, late_audio, _, _, _ = _slow_stretch_run(tiny_pipeline, monkeypatch, tempo=1.0)
    skip_if_busy(share, cpu_share())
    assert late_stats["speech_compressed_s"] == 0.0 and late_stats["silence_skipped_s"] == 0.0
    assert np.median(late_lat[-20:]) >= target + 0.5  # the slow stretch's backlog is still there at the end
    # Bounded by the lateness it took back, not all 5 s: each second played at 1.5x takes back 1/3 s, and
    # 1.6-2.6 s were compressed for the ~0.6-0.7 s the slow stretch left (more on a slower machine, whose
    # windows add lateness of their own: 3.5 s was seen in CI, so the bound is the lateness, not a fixed
    # figure). The speed-up stops above the lateness compressed speech can reach (its window's audio
    # arrives 1.5x slower than it plays): stopping lower ran the queue dry, and the idle frames inserted then
    # were gaps of 0.16-0.32 s inside the speech in 4 of 10 runs (docs/benchmarks.md, catch-up section).
    last = np.median(lat[-20:])
    taken_back = stats["speech_compressed_s"] * (1 - 1 / 1.5)
    assert stats["speech_compressed_s"] >= 0.5 and abs(taken_back - (max(lat) - last)) <= 0.25, (stats, lat)
    assert stats["speech_compressed_s"] < 4.5  # not the whole utterance
    assert stats["gap_inserted_s"] == 0, stats
    # Back within a frame of where a speed-up starts (199 ms over the target). It stops at 149 ms; lateness
    # added after that waits for the next pause unless it reaches the start again: 89-119 ms over measured on
    # a 2-core EPYC, 170-202 ms on a 2-core Xeon, where 2 of 3 runs ended over a bound at the stop + 30 ms.
    assert last <= target + start + 0.04, (last, target, start)
    assert np.median(late_lat[-20:]) >= last + 0.4
    # Nothing is cut: the compressed part comes out 1 / 1.5 as long. The speech never pauses, so one
    # stretcher stream carries every speed-up (back at tempo 1.0 in between) and is flushed once, at the
    # end: atempo's edges cost +-30 ms once, not once per speed-up.
    voiced, late_voiced = np.count_nonzero(audio), np.count_nonzero(late_audio)
    assert late_voiced == len(speech) and late_stats["catch_up_runs"] == 0
    expected = len(speech) - stats["speech_compressed_s"] * 16000 * (1 - 1 / 1.5)
    assert stats["catch_up_runs"] >= 1, stats  # (each window of the slow stretch adds lateness: 4-7 seen)
    assert abs(voiced - expected) <= 0.07 * 16000, (voiced, expected, stats)


def test_speech_pushed_in_real_time_on_a_quiet_machine_is_never_sped_up(tiny_pipeline):
    """A session that keeps up sits at its target: the catch-up leaves its speech alone, sample for sample
    (its lateness measure must not saw across the threshold as frames play and tokens come out). It starts
    on 1 s of pushed silence, which the start-up must not leave late either (idle frames wait for the
    audio's lookahead instead of silence padded into the tokenizer)."""
    silence, speech = np.zeros(16000, np.float32), speechlike(3.0, seed=8) + 0.05  # speech: never below speech_rms
    stats, frames = _real_time_session(tiny_pipeline, np.concatenate([silence, speech]), 4.8, portrait=80)
    audio = speech_out(frames)
    assert stats["catch_up_runs"] == 0 and stats["speech_compressed_s"] == 0, stats
    _assert_said(audio, speech)  # the speech: untouched


def test_speech_from_the_first_moment_waits_whole_for_its_lookahead_behind_idle_frames(tiny_pipeline):
    """Speech pushed in real time from the moment the session opens: the first frames (due before the
    speech's encoder lookahead has arrived) are idle frames in front of it, not silence padded after its
    first 20 ms, so the utterance is never split, nothing is counted as a gap, and the session starts at
    its target latency instead of behind it (no catch-up)."""
    speech = speechlike(2.0, seed=9) + 0.05  # never below speech_rms
    # its first frame is usually the 10th (~400 ms in): 3.2 s of frames leave ~0.8 s for a machine busy at its start
    # (2.8 s, once: on Python 3.13 its windows took 118 ms at the warm-up where they take ~100, and the speech's last 2
    # frames came 71st and 72nd)
    stats, frames = _real_time_session(tiny_pipeline, speech, 3.2, portrait=60)
    # held frames (a window late on a busy machine: silent, the speech after them delayed, not lost) are the pacing's,
    # not the scheduler's. In one suite run on Python 3.14 the speech's last 2 frames were silent, no gap counted: most
    # likely 2 held frames (not seen again in 8 runs of this test alone and one of its file; not proven)
    audio = speech_out(frames, drop_held=True)
    assert stats["gap_inserted_s"] == 0 and stats["catch_up_runs"] == 0, stats
    assert not frames[0].speech and not frames[0].pushed  # the first frame came before the speech could be shown ...
    assert all(f.pushed for f in frames if f.speech)  # (each frame of it carries pushed audio)
    first = np.flatnonzero(audio)[0]
    _assert_played(audio[first:first + len(speech)], speech)  # ... then all of it, unsplit


@pytest.mark.parametrize("ahead", [True, False])
def test_speech_pushed_ahead_of_time_keeps_its_pace(tiny_pipeline, ahead):
    """An application that pushes a whole utterance at once (a TTS, `ahead=True`) hears it at its own pace: the
    audio waits for its frames, but that is not lateness to catch up -- nothing is compressed, no pause is
    shortened -- nor latency: each frame's counts from when its audio would have come at real-time pace (its last
    frames would read ~3 s). Pushed as live audio the same utterance is a backlog: its pause is cut to
    `catch_up_keep_ms`."""
    word = speechlike(1.0, seed=7) + 0.05
    speech = np.concatenate([word, np.zeros(16000, np.float32), word])  # a 1 s pause between two words

    async def main():
        engine = await _engine(tiny_pipeline, catch_up_tempo=1.5)
        session = await engine.open_session(_portrait(tiny_pipeline, 60))
        session.push_audio(speech, ahead=ahead)
        session.end_speech()
        frames = await _collect(session, 4.6)
        await engine.stop()
        return session.stats(), speech_out(frames)

    stats, audio = run(main())
    assert stats["speech_compressed_s"] == 0.0
    _assert_said(audio, np.concatenate([word, word]))
    loud = np.flatnonzero(audio)
    pause = loud[len(word)] - loud[len(word) - 1] - 1  # the silence between the two words as played
    if ahead:
        assert pause >= 16000 and stats["silence_skipped_s"] == 0.0
        assert stats["latency_ms_p95"] < 1500
    else:
        assert pause < 12000 and stats["silence_skipped_s"] > 0.2


def test_windows_are_decoded_in_their_own_thread_and_a_decode_failure_ends_only_that_session(tiny_pipeline,
                                                                                            monkeypatch):
    """The worker samples, the decode thread decodes (the two overlap); a failing decode ends its session
    with an error event, and the decode thread lives on for the next session. decode_thread=False decodes
    in the worker."""
    import threading

    seen: dict[str, set] = {"sample": set(), "decode": set()}
    broken = {"on": False}
    sample, decode = tiny_pipeline.generate_latents, tiny_pipeline.decode

    def spy_sample(*a, **k):
        seen["sample"].add(threading.current_thread().name)
        return sample(*a, **k)

    def spy_decode(lat, streams=None):
        seen["decode"].add(threading.current_thread().name)
        if broken["on"]:
            raise RuntimeError("decoder exploded")
        return decode(lat, streams)

    monkeypatch.setattr(tiny_pipeline, "generate_latents", spy_sample)
    monkeypatch.setattr(tiny_pipeline, "decode", spy_decode)

    async def main(decode_thread: bool):
        engine = await _engine(tiny_pipeline, decode_thread=decode_thread)
        s = await engine.open_session(_portrait(tiny_pipeline, 30))
        frames = await _collect_made(s, 20)
        if decode_thread:
            broken["on"] = True
            bad = await engine.open_session(_portrait(tiny_pipeline, 200))
            events = [e async for e in bad.events()]
            assert isinstance(events[-1], SessionClosed) and events[-1].reason == "error"
            assert any(isinstance(e, SessionError) and "decoder exploded" in e.message for e in events)
            broken["on"] = False
            again = await engine.open_session(_portrait(tiny_pipeline, 90))
            assert len([f for f in await _collect_made(again, 10) if not f.filler]) >= 10
        await engine.stop()
        return frames

    frames = run(main(True))
    assert len([f for f in frames if not f.filler]) >= 20
    assert seen == {"sample": {"letstalk-engine"}, "decode": {"letstalk-decode"}}
    seen["sample"], seen["decode"] = set(), set()
    frames = run(main(False))
    assert len([f for f in frames if not f.filler]) >= 20
    assert seen == {"sample": {"letstalk-engine"}, "decode": {"letstalk-engine"}}


def test_at_one_thread_a_cpu_decodes_beside_the_next_windows_sampling_and_frames_stay_in_order(tiny_pipeline,
                                                                                              monkeypatch):
    """decode_thread None on a CPU of 2+ cores: while the engine runs 1 torch thread the decode thread decodes each
    window and the worker samples the next meanwhile; at 2 threads the worker decodes again, after the decode
    thread's last window. Across both switches every frame comes out once and in order."""
    import threading

    seen: list[str] = []
    sizes: dict[str, set] = {"letstalk-decode": set(), "letstalk-engine": set()}
    decode = tiny_pipeline.decode

    def spy(lat, streams=None):
        seen.append(threading.current_thread().name)
        sizes[seen[-1]].add(lat.shape[0])
        return decode(lat, streams)

    monkeypatch.setattr(tiny_pipeline, "decode", spy)

    async def main():
        engine = StreamEngine(tiny_pipeline, EngineConfig(warmup=False, threads=1))
        engine._threads_before = 2  # a 2-core CPU, whatever this one is
        await engine.start()
        s = await engine.open_session(_portrait(tiny_pipeline, 40))
        s.push_audio(speechlike(3.0))
        paced, frames = s.frames(), []
        for threads in (1, 2, 1):  # 2: as a raise of the threads does (the worker sets it before its next window)
            engine.threads = threads
            frames += [await anext(paced) for _ in range(20)]
        await engine.stop()
        return frames

    frames = run(main())
    shown = [f.index for f in frames if not f.filler]
    assert len(shown) >= 45 and shown == list(range(shown[0], shown[0] + len(shown)))
    runs = [name for i, name in enumerate(seen) if i == 0 or seen[i - 1] != name]  # who decoded, in turns
    assert runs == ["letstalk-decode", "letstalk-engine", "letstalk-decode"]
    # the decode thread hands each frame over as soon as it is decoded; the worker decodes a window at once
    assert sizes["letstalk-decode"] == {1} and max(sizes["letstalk-engine"]) == tiny_pipeline.window


def test_frame_by_frame_a_decode_failure_mid_window_ends_only_its_session(tiny_pipeline, monkeypatch):
    """The decode thread decodes a window frame by frame: a failure at a later frame of a batch decodes each
    session on its own from that frame on; the failing one ends with an error, the other gets every frame once, in
    order."""
    decode = tiny_pipeline.decode
    bad = _portrait(tiny_pipeline, 200)
    calls = {"bad": 0}

    def spy(lat, streams=None):
        if streams and any(st.portrait is bad for st in streams):
            calls["bad"] += 1
            if calls["bad"] >= 3:  # from the bad session's third frame on
                raise RuntimeError("decoder exploded")
        return decode(lat, streams)

    monkeypatch.setattr(tiny_pipeline, "decode", spy)

    async def main():
        engine = await _engine(tiny_pipeline, decode_thread=True)
        good = await engine.open_session(_portrait(tiny_pipeline, 30))
        broken = await engine.open_session(bad)
        good.push_audio(speechlike(2.0))
        broken.push_audio(speechlike(2.0))
        frames = await _collect(good, 1.6)
        events = [e async for e in broken.events()]
        await engine.stop()
        return frames, events

    frames, events = run(main())
    assert isinstance(events[-1], SessionClosed) and events[-1].reason == "error"
    assert any(isinstance(e, SessionError) and "decoder exploded" in e.message for e in events)
    shown = [f.index for f in frames if not f.filler]
    assert len(shown) >= 30 and shown == list(range(shown[0], shown[0] + len(shown)))


def test_a_windows_time_counts_its_plan_and_an_overlapped_window_costs_its_longer_stage(tiny_model_dir,
                                                                                        monkeypatch):
    """The lateness the engine adjusts to counts each full window's plan (its audio taken in and encoded: ~11-14 ms of
    a 160 ms window on the 2-core EPYC without AVX-512, where windows just under real time without it never fell
    behind) with its sampling and decoding. A window decoded in the decode thread while the worker sampled the next
    costs the longer of the two stages: stages each under real time lower nothing, however long their sum; a stage
    over it lowers the noise draws as before."""
    from letstalk_rt.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.from_pretrained(tiny_model_dir, traced=False)
    engine = StreamEngine(pipe, EngineConfig(warmup=False))
    plan, noted = engine._plan, []

    def slow_plan():
        jobs = plan()
        if jobs:
            time.sleep(0.2)
        return jobs

    monkeypatch.setattr(engine, "_plan", slow_plan)
    monkeypatch.setattr(engine, "_note_window", lambda ms, **k: noted.append(ms))

    async def main():
        await engine.start()
        s = await engine.open_session(_portrait(pipe, 70))
        s.push_audio(speechlike(2.0))
        await _collect(s, 1.0)
        await engine.stop()

    run(main())
    assert noted and min(noted) >= 200

    pipe.noise_draws = 2
    engine = StreamEngine(pipe, EngineConfig(warmup=False))
    real = engine.window_real_ms
    for k in range(20):  # worker 0.8, decoder 0.7 of real time: 1.5 in a row, but overlapped they keep up
        engine._note_window(0.8 * real, now=k * 0.2, sample_ms=0.6 * real, decode_ms=0.7 * real)
    assert pipe.noise_draws == 2 and engine._behind_ms == 0.0
    for k in range(3):  # the decoder's stage over real time: behind by 2 windows -> 1 draw
        engine._note_window(0.5 * real, now=10 + k * 0.2, sample_ms=0.4 * real, decode_ms=2.1 * real)
    assert pipe.noise_draws == 1 and engine.draws_lowered


async def _speak_after_warmup(pipe, after_warmup, **kw) -> tuple:
    """Start an engine with warm-up on, call `after_warmup()` (it reads what warm-up chose and forgets the warm-up's
    evaluations), speak 0.8 s through one session and stop -> (what it returned, the session's windows)."""
    engine = await _engine(pipe, warmup=True, **kw)
    chosen = after_warmup()
    session = await engine.open_session(_portrait(pipe, 7))
    session.push_audio(speechlike(0.8))
    session.end_speech()
    await _collect(session, 1.0)
    await engine.stop()  # the worker finishes its window first
    return chosen, session._w.stream.windows_done


def test_max_steps_spends_the_machines_headroom_on_sampling_steps(tiny_pipeline, monkeypatch):
    """Warm-up raises the steps per window while a full batch fits the budget, every window then runs
    that many transformer evaluations, and stop() gives the pipeline back its own step count."""
    base = tiny_pipeline.num_steps
    calls = []
    forward = tiny_pipeline.transformer.forward
    monkeypatch.setattr(tiny_pipeline.transformer, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))

    def steps_chosen():
        calls.clear()  # warm-up's evaluations
        return tiny_pipeline.num_steps

    def main(**kw):
        return run(_speak_after_warmup(tiny_pipeline, steps_chosen, max_batch=2, max_steps=base + 2, **kw))

    chosen, windows = main(steps_budget=1e6)  # the tiny model fits anything
    assert chosen == base + 2 and len(calls) == chosen * windows
    assert tiny_pipeline.num_steps == base
    chosen, windows = main(steps_budget=1e-6)  # nothing fits: the model's
    assert chosen == base and len(calls) == base * windows
    with pytest.raises(LetsTalkError, match="max_steps"):
        StreamEngine(tiny_pipeline, EngineConfig(max_steps=51))


def test_warmup_keeps_the_models_noise_draws_only_where_they_fit(tiny_model_dir, monkeypatch):
    """A model that averages 2 noise draws per window keeps them while a full batch fits draws_budget at warm-up,
    every window then running 2 rows per session; where it does not fit, every window samples 1 draw (half the
    rows); stop() gives the pipeline its own draws back."""
    from letstalk_rt.diffusion import guidance_rows
    from letstalk_rt.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.from_pretrained(tiny_model_dir, noise_draws=2, traced=False)  # a trace runs no forward
    per_draw = len(guidance_rows(pipe.portrait_guidance, pipe.audio_guidance))
    rows = []
    forward = pipe.transformer.forward
    monkeypatch.setattr(pipe.transformer, "forward", lambda x, *a, **k: rows.append(x.shape[0]) or forward(x, *a, **k))

    def draws_chosen():
        rows.clear()  # warm-up's evaluations
        return pipe.noise_draws

    def main(**kw):
        chosen, windows = run(_speak_after_warmup(pipe, draws_chosen, max_batch=1, **kw))
        assert len(rows) == windows * pipe.num_steps
        return chosen, set(rows)

    assert main(draws_budget=1e6) == (2, {2 * per_draw})  # the tiny model fits anything
    assert pipe.noise_draws == 2
    assert main(draws_budget=1e-6) == (1, {per_draw})  # nothing fits: one draw
    assert pipe.noise_draws == 2  # the pipeline's own, back after stop()
    with pytest.raises(LetsTalkError, match="draws_budget"):
        StreamEngine(pipe, EngineConfig(draws_budget=0))


@pytest.mark.parametrize("decode_thread", [False, True])
def test_a_warm_up_that_fell_back_to_one_draw_tries_the_models_draws_later(tiny_model_dir, decode_thread):
    """Something busy during warm-up may pass: a warm-up that fell back to 1 draw tries the model's 2 after
    threads_raise_after_s (on made-up window times), as after a live fallback; not with a decode thread, where a
    running engine could not lower them again."""
    from letstalk_rt.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.from_pretrained(tiny_model_dir, noise_draws=2)

    async def main():
        engine = await _engine(pipe, warmup=True, draws_budget=1e-6, threads=1, threads_raise_after_s=60.0,
                               decode_thread=decode_thread)
        try:
            at, chosen = engine._draws_raise_at, pipe.noise_draws
            if at is None:
                return chosen, None, None, None
            real = 1000 * engine.window / pipe.fps
            engine.config = dataclasses.replace(engine.config, draws_budget=0.75)  # the busy spell has passed
            engine._note_window(0.3 * real, now=at - 1.0)
            before = pipe.noise_draws
            engine._note_window(0.3 * real, now=at + 0.1)
            return chosen, at - time.monotonic(), before, pipe.noise_draws
        finally:
            await engine.stop()

    chosen, wait, before, after = run(main())
    assert chosen == 1
    if decode_thread:
        assert wait is None
    else:
        assert 50 < wait <= 60 and (before, after) == (1, 2)
    assert pipe.noise_draws == 2


@pytest.mark.skipif(torch.get_num_threads() < 2 or "OMP_NUM_THREADS" in os.environ,
                    reason="needs 2+ torch threads to choose from")
def test_warmup_gives_the_worker_the_fewest_torch_threads_that_fit(tiny_pipeline, monkeypatch):
    """threads=0: warm-up picks the fewest threads whose window fits threads_budget (the tiny model fits
    in one), the worker samples with that many, and stop() gives the process its count back; with no
    count fitting, the worker samples with the fastest count; threads=N sets N."""
    before = torch.get_num_threads()
    seen = []
    generate = tiny_pipeline.generate_latents
    monkeypatch.setattr(tiny_pipeline, "generate_latents",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or generate(*a, **k))

    async def main(**kw):
        engine = await _engine(tiny_pipeline, **{"warmup": True, **kw})
        seen.clear()  # warm-up's windows
        session = await engine.open_session(_portrait(tiny_pipeline, 5))
        session.push_audio(speechlike(0.4))
        session.end_speech()
        await _collect(session, 0.5)
        chosen = engine.threads
        await engine.stop()
        return chosen, set(seen)

    assert run(main(threads_budget=1e6)) == (1, {1})
    assert torch.get_num_threads() == before
    chosen, seen_threads = run(main(threads_budget=1e-6))
    assert chosen in (1, before) and seen_threads == {chosen}
    assert run(main(threads=1, warmup=False)) == (1, {1})
    assert torch.get_num_threads() == before


@pytest.mark.skipif(torch.get_num_threads() < 2 or "OMP_NUM_THREADS" in os.environ,
                    reason="needs 2+ torch threads to tell 1 from the default")
@pytest.mark.parametrize("mode", ["auto", "given", "untouched"])
def test_on_a_gpu_the_engines_own_threads_run_one_torch_thread(tiny_pipeline, monkeypatch, mode):
    """A GPU device: the worker and decode threads run 1 torch thread by default (their host work is small,
    and the idle OpenMP helpers of more spun on the cores the event loop and tracks need: 8 sessions on an
    H100 lost real time), a given count as given, -1 torch's own; the caller's threads are never changed."""
    before = torch.get_num_threads()
    threads, want = {"auto": (0, 1), "given": (before + 1, before + 1), "untouched": (-1, before)}[mode]
    seen: dict[str, int] = {}
    engine = StreamEngine(tiny_pipeline, EngineConfig(warmup=False, threads=threads))
    monkeypatch.setattr(tiny_pipeline, "device", torch.device("cuda"))  # no window runs: nothing is moved there
    monkeypatch.setattr(engine, "_plan", lambda: seen.setdefault("worker", torch.get_num_threads()) and [])

    async def main():
        await engine.start()
        assert engine._decoder is not None  # a GPU decodes in a thread of its own
        monkeypatch.setattr(engine, "_decode", lambda *a, **k: seen.setdefault("decoder", torch.get_num_threads()))
        await asyncio.to_thread(engine._decode_q.put, (0.0, 0.0, []))
        for _ in range(500):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.02)
        caller = torch.get_num_threads()
        await engine.stop()
        return caller

    assert run(main()) == before and torch.get_num_threads() == before
    assert seen == {"worker": want, "decoder": want}


def test_a_stalled_pusher_is_counted_as_an_audio_gap(tiny_pipeline):
    """Speech that stops arriving mid-utterance: at the deadline the engine inserts silence before the
    queued speech (the avatar keeps moving) and counts it as a gap; the speech itself is kept, in order.

    The latency catch-up is off: where the resumed speech lands on the grid of idle windows already made
    sets how late it is (0 to ~1 window over the target), and past 100 ms it would be played faster."""
    first, rest = speechlike(0.2, seed=4) + 0.05, speechlike(0.4, seed=5) + 0.05

    async def main():
        engine = await _engine(tiny_pipeline, catch_up=False)
        session = await engine.open_session(_portrait(tiny_pipeline, 8))
        reader = asyncio.create_task(_collect(session, 2.5))  # playback runs from the start
        session.push_audio(first)  # its last frames wait for the encoder's lookahead ...
        await asyncio.sleep(0.8)  # ... which arrives late: the avatar keeps moving on silence meanwhile
        session.push_audio(rest)
        session.end_speech()
        frames = await reader
        await engine.stop()
        return session.stats(), speech_out(frames)

    stats, audio = run(main())
    assert stats["gap_inserted_s"] >= 0.2
    _assert_said(audio, np.concatenate([first, rest]))


@pytest.mark.skipif(torch.get_num_threads() < 2 or "OMP_NUM_THREADS" in os.environ,
                    reason="needs 2+ torch threads to choose from")
@pytest.mark.parametrize("every, slow, one_thread_ms, given, lowered",
                         [(1, 2.05, 1.0, 0, True), (2, 1.3, 1.0, 0, False), (1, 2.05, 1e4, 0, False),
                          (1, 2.05, 1.0, 2, False)])
def test_auto_threads_are_lowered_once_windows_fall_two_windows_behind(tiny_pipeline, monkeypatch, every, slow,
                                                                       one_thread_ms, given, lowered):
    """Auto threads (warm-up chose 2 here): when every full window at 2 threads takes over 2x its duration (another
    process took the cores), the 2nd puts them 2 windows behind and the later ones run at 1 thread; when only every
    other window takes 1.3x and its compute (the fast ones pay it back: slow stretches of a quiet machine; at 1.6x the
    eager tiny model's ~40 ms windows left the pairs ~20 ms behind each, and a slow machine reached 2 windows) the
    count stays, and so it
    does when the warm-up's 1-thread window could not keep real time (fewer threads would only be slower), or when
    the count was given (--threads 2)."""
    before = torch.get_num_threads()
    window, fps = tiny_pipeline.window, tiny_pipeline.fps
    seen: list[tuple[int, int]] = []  # (torch threads, frames) of each window the worker sampled
    generate, full_windows = tiny_pipeline.generate_latents, [0]

    def contended(streams, tokens, *a, **k):
        threads, frames = torch.get_num_threads(), len(tokens[0])
        seen.append((threads, frames))
        lat = generate(streams, tokens, *a, **k)
        if frames == window and threads > 1:
            full_windows[0] += 1
            if full_windows[0] % every == 0:
                time.sleep(slow * window / fps)
        return lat

    monkeypatch.setattr(tiny_pipeline, "generate_latents", contended)

    def choose_two(self, window_ms):
        self.threads, self._threads_ms = 2, {1: one_thread_ms, 2: 1.0}
        torch.set_num_threads(2)

    monkeypatch.setattr(StreamEngine, "_choose_threads", choose_two)

    async def main():
        engine = await _engine(tiny_pipeline, warmup=True, threads=given)
        seen.clear()  # warm-up's windows
        full_windows[0] = 0
        session = await engine.open_session(_portrait(tiny_pipeline, 5))
        session.push_audio(speechlike(2.4))
        session.end_speech()
        await _collect(session, 2.4)
        threads, lowered = engine.threads, list(engine.threads_lowered)
        await engine.stop()
        return threads, lowered

    share = cpu_share()
    threads, engine_lowered = run(main())
    skip_if_busy(share, cpu_share())
    full = [t for t, n in seen if n == window]
    assert len(full) >= 6  # (windows late by 2x leave fewer full ones: deadlines insert short ones)
    if lowered:
        assert threads == 1 and [(a, b) for _, a, b in engine_lowered] == [(2, 1)]
        assert full[:2] == [2, 2] and set(full[2:]) == {1}  # 2 x (1.05 windows + compute) behind
    else:
        assert threads == 2 and not engine_lowered and set(full) == {2}
    assert torch.get_num_threads() == before


@pytest.mark.skipif("OMP_NUM_THREADS" in os.environ, reason="the engine leaves the threads alone where it is set")
def test_noise_draws_are_lowered_before_the_threads_once_windows_fall_two_windows_behind(tiny_model_dir,
                                                                                         monkeypatch):
    """A model averaging 2 noise draws whose full windows take over 2x their duration (another process took the
    cores) samples 1 draw from the 3rd full window on, and the auto threads, which could go down too, stay where
    they are (1-draw windows keep real time); stop() gives the pipeline its 2 draws back."""
    from letstalk_rt.pipeline import LetsTalkPipeline

    before = torch.get_num_threads()
    pipe = LetsTalkPipeline.from_pretrained(tiny_model_dir, noise_draws=2)
    window, fps = pipe.window, pipe.fps
    seen: list[tuple[int, int]] = []  # (noise draws, frames) of each window the worker sampled
    generate = pipe.generate_latents

    def contended(streams, tokens, *a, **k):
        seen.append((pipe.noise_draws, len(tokens[0])))
        lat = generate(streams, tokens, *a, **k)
        if len(tokens[0]) == window and pipe.noise_draws > 1:
            time.sleep(2.2 * window / fps)
        return lat

    monkeypatch.setattr(pipe, "generate_latents", contended)

    def choose_two(self, window_ms):  # as the threads test: 2 auto threads, and 1 would keep real time
        self.threads, self._threads_ms = 2, {1: 1.0, 2: 1.0}
        torch.set_num_threads(2)

    monkeypatch.setattr(StreamEngine, "_choose_threads", choose_two)

    async def main():
        engine = await _engine(pipe, warmup=True, draws_budget=1e6)  # warm-up keeps the 2 draws
        seen.clear()  # warm-up's windows
        session = await engine.open_session(_portrait(pipe, 5))
        session.push_audio(speechlike(2.4))
        session.end_speech()
        await _collect(session, 2.4)
        lowered, threads_lowered, threads = list(engine.draws_lowered), list(engine.threads_lowered), engine.threads
        state = session.stats()["engine"]
        events = []
        while not session._events.empty():
            events.append(session._events.get_nowait())
        await engine.stop()
        return lowered, threads_lowered, threads, events, state

    share = cpu_share()
    lowered, threads_lowered, threads, events, state = run(main())
    skip_if_busy(share, cpu_share())
    assert state == {"torch_threads": 2, "steps": pipe.num_steps, "noise_draws": 1, "decode_overlapped": False,
                     "threads_lowered": 0, "threads_raised": 0, "draws_lowered": 1, "draws_raised": 0, "heap_trims": 0}
    full = [d for d, n in seen if n == window]
    assert len(lowered) == 1 and not threads_lowered and threads == 2
    adjusted = [e.to_dict() for e in events if e.type == "engine_adjusted"]  # the application is told, once
    assert len(adjusted) == 1 and adjusted[0]["change"] == "noise_draws"
    assert (adjusted[0]["before"], adjusted[0]["after"]) == (2, 1) and adjusted[0]["behind_ms"] >= 2 * 1000 * window / fps
    assert full[:2] == [2, 2] and len(full) >= 4 and set(full[2:]) == {1}
    assert pipe.noise_draws == 2 and torch.get_num_threads() == before


def test_lowered_threads_go_back_up_a_count_per_wait_and_a_failed_try_doubles_the_wait(tiny_pipeline):
    """threads_raise_after_s, on the worker's window timings (`_note_window`, fed made-up times: no sleeps): the
    warm-up chose 4; windows at 2x real time lower it to 2, then 1; after the wait it goes back to 2, after another
    to 4; slow again within the wait, it is lowered with the wait doubled, and the next try comes that much later."""
    engine = StreamEngine(tiny_pipeline, EngineConfig(warmup=False, threads_raise_after_s=60.0))
    engine.threads, engine._threads_ms, engine._threads_top = 4, {1: 10.0, 2: 10.0, 4: 10.0}, 4
    real = 1000 * engine.window / tiny_pipeline.fps
    announced = []
    engine._announce = lambda change, before, after, behind_ms: announced.append(  # type: ignore[method-assign]
        EngineAdjusted("", change=change, before=before, after=after, behind_ms=behind_ms))

    def windows(start: float, end: float, ms: float) -> None:
        t = start
        while t < end:
            engine._note_window(ms, now=t)
            t += 0.2

    windows(0.0, 1.0, 2.1 * real)  # busy: 2 windows 2 behind -> 2 threads, 2 more -> 1
    assert engine.threads == 1 and [(a, b) for _, a, b in engine.threads_lowered] == [(4, 2), (2, 1)]
    assert [(e.before, e.after) for e in announced] == [(4, 2), (2, 1)]  # each change told to the sessions
    windows(1.0, 130.0, 0.5 * real)  # quiet: a count up per 60 s
    assert [(round(t), a, b) for t, a, b in engine.threads_raised] == [(61, 1, 2), (121, 2, 4)] and engine.threads == 4
    assert [(e.before, e.after, e.behind_ms) for e in announced[2:]] == [(1, 2, 0.0), (2, 4, 0.0)]
    windows(130.0, 130.3, 2.1 * real)  # busy again 9 s after the last try (2 windows): it failed, the wait doubles
    assert engine.threads_lowered[-1][1:] == (4, 2) and engine._raise_wait == 120.0
    windows(130.4, 260.0, 0.5 * real)
    assert [round(t) for t, _, _ in engine.threads_raised[2:]] == [250] and engine.threads == 4
    assert engine._raise_wait == 120.0 and engine._raise_at is None
    windows(1000.0, 1001.0, 2.1 * real)  # a lowering long after the last try: the wait is back to 60 s
    assert engine._raise_wait == 60.0 and engine._raise_at == pytest.approx(engine.threads_lowered[-1][0] + 60.0)


def test_lowered_noise_draws_go_back_up_after_the_threads_and_a_failed_try_doubles_the_wait(tiny_model_dir):
    """On made-up window times (`_note_window`, no sleeps): 2 draws fall behind -> 1 draw; still behind -> fewer
    threads; quiet again, the threads go back up first (after 60 s), then the draws (at their own 60 s, once no
    thread count waits), each change told to the sessions; behind again within the wait -> 1 draw with the wait
    doubled; a try falls due but waits while 1-draw windows say 2 would not fit draws_budget; stop() gives the
    pipeline its 2 draws back and forgets a pending try."""
    from letstalk_rt.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.from_pretrained(tiny_model_dir, noise_draws=2)
    engine = StreamEngine(pipe, EngineConfig(warmup=False, threads_raise_after_s=60.0))
    engine.threads, engine._threads_ms, engine._threads_top = 2, {1: 10.0, 2: 10.0}, 2
    real = 1000 * engine.window / pipe.fps
    announced = []
    engine._announce = lambda change, before, after, behind_ms: announced.append(  # type: ignore[method-assign]
        (change, before, after))

    def windows(start: float, end: float, ms: float) -> None:
        t = start
        while t < end:
            engine._note_window(ms, now=t)
            t += 0.2

    windows(0.0, 1.0, 2.1 * real)  # busy: 2 windows behind -> 1 draw, 2 more -> 1 thread
    assert pipe.noise_draws == 1 and engine.threads == 1
    assert announced == [("noise_draws", 2, 1), ("threads", 2, 1)]
    windows(1.0, 59.0, 0.3 * real)  # quiet, but not for 60 s yet
    assert pipe.noise_draws == 1 and engine.threads == 1
    windows(59.0, 70.0, 0.3 * real)  # the threads' wait (from 0.6 s) ends first, then the draws' (from 0.2 s)
    assert engine.threads == 2 and pipe.noise_draws == 2
    assert [round(t) for t, _, _ in engine.threads_raised] == [61] and [round(t) for t in engine.draws_raised] == [61]
    assert announced[2:] == [("threads", 1, 2), ("noise_draws", 1, 2)]  # threads first: one change per window
    windows(70.0, 70.5, 2.1 * real)  # busy again within the wait: the try failed, the next waits 120 s
    assert pipe.noise_draws == 1 and engine._draws_wait == 120.0
    windows(70.5, 185.0, 0.3 * real)
    assert pipe.noise_draws == 1
    windows(185.0, 200.0, 0.3 * real)
    assert pipe.noise_draws == 2 and round(engine.draws_raised[-1]) == 190
    windows(200.0, 201.0, 2.1 * real)
    assert pipe.noise_draws == 1 and engine._draws_raise_at is not None
    # due (at 440 s), but 1-draw windows at 0.5 of real time say 2 draws would not fit 0.75 of it: no try (it would
    # only add lateness); once they take 0.25 (sampling 0.1 of it), the draws come back
    windows(201.0, 460.0, 0.5 * real)
    assert pipe.noise_draws == 1
    for k in range(10):
        engine._note_window(0.25 * real, now=460.0 + k * 0.2, sample_ms=0.1 * real)
    assert pipe.noise_draws == 2 and 460 < engine.draws_raised[-1] < 462
    run(engine.stop())
    assert pipe.noise_draws == 2 and engine._draws_raise_at is None


@pytest.mark.parametrize("two, one", [(1.2, 0.6), (1.2, 1.5), (0.5, 0.3)])
def test_the_first_windows_try_fewer_threads_where_the_chosen_count_runs_near_real_time(tiny_pipeline, two, one):
    """The warm-up chose 2 threads on a quiet process (1 thread kept real time too). Beside a stream the first 3
    windows at 2 threads take `two` x real time: over 0.75 of it, 1 thread is tried (the application told), kept where
    its first 3 windows are faster (a lowering: 2 threads are tried again after threads_raise_after_s), else 2 come back
    at once with nothing planned. Windows well within real time try nothing, and only the first windows try."""
    engine = StreamEngine(tiny_pipeline, EngineConfig(warmup=False, threads_raise_after_s=60.0))
    real = engine.window_real_ms
    engine.threads, engine._threads_ms, engine._threads_top, engine._try_fewer = 2, {1: 0.9 * real, 2: 0.5 * real}, 2, True
    announced = []
    engine._announce = lambda change, before, after, behind_ms: announced.append(  # type: ignore[method-assign]
        (change, before, after))
    for k in range(3):
        engine._note_window(two * real, now=0.2 * k)
    if two < 0.75:
        assert engine.threads == 2 and not announced and not engine._try_fewer
        return
    assert engine.threads == 1 and announced == [("threads", 2, 1)] and engine._try is not None
    for k in range(3, 6):
        engine._note_window(one * real, now=0.2 * k)
    if one < two:
        assert engine.threads == 1 and engine._raise_at == pytest.approx(0.4 + 60.0)
        assert announced == [("threads", 2, 1)]
    else:
        assert engine.threads == 2 and engine._raise_at is None and engine._try is None
        assert announced == [("threads", 2, 1), ("threads", 1, 2)] and [(a, b) for _, a, b in engine.threads_raised] == [(1, 2)]
    for k in range(6, 12):  # once only: no more tries
        engine._note_window(two * real, now=0.2 * k)
    assert len(announced) == (1 if one < two else 2) and not engine._try_fewer


def test_draws_kept_at_start_or_tried_again_are_judged_on_their_first_windows(tiny_model_dir):
    """The warm-up kept the model's 2 noise draws on a quiet process; through WebRTC the first windows take a little
    over real time (1.2x: the lateness would take 10 windows to reach 2 windows' duration). The median of the first 3
    windows since start says so: 1 draw from the 4th window, the application told why. A try of the draws later is
    judged alike (a failed one doubles the wait); windows that keep real time keep the draws, and from then on only
    the lateness lowers them. Made-up window times (`_note_window`), on a started engine without sessions."""
    from letstalk_rt.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.from_pretrained(tiny_model_dir, noise_draws=2, traced=False)
    announced = []

    async def main():
        engine = await _engine(pipe, threads_raise_after_s=60.0)
        engine._announce = lambda change, before, after, behind_ms: announced.append(  # type: ignore[method-assign]
            (change, before, after, behind_ms))
        real = engine.window_real_ms
        engine._note_window(1.3 * real, now=0.0)
        engine._note_window(1.1 * real, now=0.2)
        assert pipe.noise_draws == 2
        engine._note_window(1.2 * real, now=0.4)  # median 1.2x real: over it, 0.6 of a window behind
        assert pipe.noise_draws == 1 and engine.draws_lowered == [0.4]
        assert announced == [("noise_draws", 2, 1, pytest.approx(0.6 * real))]
        t = 0.6
        while pipe.noise_draws == 1:  # quiet: 1-draw windows say 2 would fit; tried after 60 s
            engine._note_window(0.3 * real, now=t, sample_ms=0.1 * real)
            t += 0.2
        assert engine.draws_raised == [pytest.approx(60.4)]
        for k in range(3):  # the try takes 1.1x real time: back to 1 draw at its 3rd window, the next in 120 s
            engine._note_window(1.1 * real, now=t + 0.2 * k)
        assert pipe.noise_draws == 1 and engine._draws_wait == 120.0 and len(engine.draws_lowered) == 2
        t += 0.6
        while pipe.noise_draws == 1:
            engine._note_window(0.3 * real, now=t, sample_ms=0.1 * real)
            t += 0.2
        assert engine.draws_raised[-1] == pytest.approx(t - 0.2) and t > 180
        for k in range(8):  # 0.9x real time: kept, and single slower windows are paid back
            engine._note_window((0.9 if k % 3 else 1.05) * real, now=t + 0.2 * k)
        assert pipe.noise_draws == 2 and engine._draws_try is None and len(engine.draws_lowered) == 2
        await engine.stop()

    run(main())


@pytest.mark.parametrize("decode_thread", [None, False])
def test_a_lower_thread_count_is_judged_at_the_draws_sampled_now_and_overlapped_at_one_thread(tiny_model_dir,
                                                                                              decode_thread):
    """The warm-up timed each thread count at the model's 2 noise draws: 1 thread took twice real time, 60 % of it
    sampling. Once the engine samples 1 draw, a 1-thread window would take 0.6 of real time sampling and 0.8 decoding:
    over real time one after the other, 0.8 overlapped (the decode thread decodes beside the next window's sampling,
    decode_thread None on a CPU of 2+ cores). So 2-thread windows that fall behind at 1 draw go on at 1 thread where
    the decode can overlap, and stay at 2 where it cannot (no count that would keep real time)."""
    from letstalk_rt.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.from_pretrained(tiny_model_dir, noise_draws=2, traced=False)
    engine = StreamEngine(pipe, EngineConfig(warmup=False, decode_thread=decode_thread))
    engine._threads_before = 2
    real = engine.window_real_ms
    engine.threads, engine._threads_ms, engine._threads_top = 2, {1: 2.0 * real, 2: 0.7 * real}, 2
    engine._sample_share = {1: 0.6, 2: 0.6}
    overlap = decode_thread is None
    assert engine._window_at_ms(1) == pytest.approx((1.2 if overlap else 2.0) * real)
    pipe.noise_draws = 1  # as the warm-up or a live fallback leaves it
    assert engine._window_at_ms(1) == pytest.approx((0.8 if overlap else 1.4) * real)
    for k in range(10):  # 0.3 of real time behind each: 2 windows' worth after 7
        engine._note_window(1.3 * real, now=k * 0.2)
    assert engine.threads == (1 if overlap else 2)


@pytest.mark.parametrize("decode_thread", [None, False])
def test_windows_that_fall_behind_at_two_draws_go_to_the_thread_count_cheapest_at_one(tiny_model_dir, decode_thread):
    """At the model's 2 draws 2 threads' window (0.9 of real time, 0.6 of it sampling) cost less than 1 thread's
    (1.2, 0.8 of it sampling: 0.96 overlapped); at 1 draw 1 thread's costs 0.48 (its sampling), 2 threads' 0.27 + 0.36
    (sampling and decoding, one after the other). Windows that fall behind
    at 2 draws go to 1 draw and, where the decode can overlap, to 1 thread in the same step (through WebRTC on the
    2-core EPYC without AVX-512 the 2-thread windows fell behind again a few seconds later), with a try of 2
    threads planned as after any lowering, and the draws tried after it. Without the decode thread, 2 threads stay."""
    from letstalk_rt.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.from_pretrained(tiny_model_dir, noise_draws=2, traced=False)
    engine = StreamEngine(pipe, EngineConfig(warmup=False, decode_thread=decode_thread, threads_raise_after_s=60.0))
    engine._threads_before = 2
    real = engine.window_real_ms
    engine.threads, engine._threads_ms, engine._threads_top = 2, {1: 1.2 * real, 2: 0.9 * real}, 2
    engine._sample_share = {1: 0.8, 2: 0.6}
    for k in range(10):  # 0.3 of real time behind each: 2 windows' worth after 7
        engine._note_window(1.3 * real, now=k * 0.2)
    overlap = decode_thread is None
    assert pipe.noise_draws == 1 and len(engine.draws_lowered) == 1
    assert engine.threads == (1 if overlap else 2)
    assert [lowered[1:] for lowered in engine.threads_lowered] == ([(2, 1)] if overlap else [])
    if overlap:
        assert engine._raise_at == pytest.approx(engine.draws_lowered[0] + 60.0)


@pytest.mark.parametrize("two, kept", [(0.9, False), (0.4, True)])
def test_a_try_of_more_threads_goes_back_as_soon_as_its_windows_take_longer(tiny_pipeline, two, kept):
    """Lowered to 1 thread, the engine tries 2 after threads_raise_after_s. Its first 3 windows decide: slower than
    the 1-thread windows before (0.9 of real time against 0.6, still within real time, so they would never have
    fallen behind) -> back to 1 at once, the next try after twice the wait; faster (0.4) -> 2 threads stay. A
    change of sessions per window in the try leaves it to the lateness."""
    engine = StreamEngine(tiny_pipeline, EngineConfig(warmup=False, threads_raise_after_s=60.0))
    engine._threads_before = 2
    real = engine.window_real_ms
    engine.threads, engine._threads_ms, engine._threads_top = 2, {1: 0.9 * real, 2: 0.5 * real}, 2
    for k in range(10):  # 2 threads beside something busy: 1.3 of real time, lowered to 1 after 7
        engine._note_window(1.3 * real, now=k * 0.2)
    assert engine.threads == 1 and engine._raise_at == pytest.approx(1.2 + 60.0)
    t = 2.0
    while engine.threads == 1:
        engine._note_window(0.6 * real, now=t)
        t += 0.2
    assert engine.threads_raised[-1][1:] == (1, 2) and 61.2 <= t < 61.8
    for _ in range(3):
        engine._note_window(two * real, now=t)
        t += 0.2
    if kept:
        assert engine.threads == 2 and engine._try is None
        return
    assert engine.threads == 1 and engine.threads_lowered[-1][1:] == (2, 1) and engine._raise_wait == 120.0
    # sessions per window changed during a try: not judged on the windows (no window fell behind either)
    engine._raise_at = t + 0.5
    for _ in range(4):
        engine._note_window(0.6 * real, now=t)
        t += 0.2
    assert engine.threads == 2 and engine._try is not None
    for batch in (1, 2, 2):
        engine._note_window(two * real, now=t, batch=batch)
        t += 0.2
    assert engine.threads == 2 and engine._try is None


def test_the_draws_wait_for_a_try_of_more_threads_to_be_judged(tiny_model_dir):
    """Threads and draws both lowered; the threads are tried again first. While the try's first windows are judged
    the draws stay (raised at once, the try would compare 2-draw windows with the 1-draw ones before it: a 10-minute
    soak tried both within 0.1 s and went back on both); once the try is kept, the draws follow."""
    from letstalk_rt.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.from_pretrained(tiny_model_dir, noise_draws=2, traced=False)
    engine = StreamEngine(pipe, EngineConfig(warmup=False, threads_raise_after_s=60.0))
    engine._threads_before = 2
    real = engine.window_real_ms
    engine.threads, engine._threads_ms, engine._threads_top = 2, {1: 0.9 * real, 2: 0.5 * real}, 2
    pipe.noise_draws, engine._draws_raise_at = 1, 0.0  # lowered before
    engine.threads, engine._raise_at = 1, 10.0  # lowered before, to be tried again at 10 s
    t = 0.0
    while t < 10.0:  # 1-thread windows at 0.3 of real time: 2 draws would fit (0.3 + 0.2 < 0.75)
        engine._note_window(0.3 * real, now=t, sample_ms=0.2 * real)
        t += 0.2
    assert engine.threads == 1 and pipe.noise_draws == 1
    engine._note_window(0.3 * real, now=t, sample_ms=0.2 * real)
    assert engine.threads == 2 and engine._try is not None and pipe.noise_draws == 1
    for _ in range(2):
        t += 0.2
        engine._note_window(0.2 * real, now=t, sample_ms=0.1 * real)
        assert pipe.noise_draws == 1
    t += 0.2
    engine._note_window(0.2 * real, now=t, sample_ms=0.1 * real)  # the third: 2 threads kept
    assert engine._try is None and engine.threads == 2
    t += 0.2
    engine._note_window(0.2 * real, now=t, sample_ms=0.1 * real)
    assert pipe.noise_draws == 2


@pytest.mark.parametrize("one, two, tries_two", [(0.75, 0.9, True), (0.2, 0.1, False), (1.2, 1.5, False)])
def test_a_warm_up_on_a_busy_machine_tries_more_threads_later(tiny_pipeline, one, two, tries_two):
    """When no count fits the warm-up's budget (something else busy while it timed them), the fastest is taken and
    the worker tries 2 after threads_raise_after_s, as after a lowering; not when a count fitted (1 thread at 0.2
    of real time), nor when the fastest did not keep real time (no count to come back to, until the live windows
    show one: the next test)."""
    engine = StreamEngine(tiny_pipeline, EngineConfig(warmup=False, threads_raise_after_s=60.0))
    engine._threads_before = 2
    real = 1000 * engine.window / tiny_pipeline.config.fps
    before = torch.get_num_threads()
    try:
        engine._choose_threads(lambda frames, batch=1: {1: one, 2: two}[torch.get_num_threads()] * real)
    finally:
        torch.set_num_threads(before)
    assert engine.threads == 1  # the fewest that fit, or the fastest
    if not tries_two:
        assert engine._raise_at is None
        return
    assert engine.threads == 1 and engine._threads_top == 2 and engine._raise_at is not None
    start = engine._raise_at - 60.0
    engine._note_window(0.8 * real, now=start + 30.0)
    assert engine.threads == 1
    engine._note_window(0.8 * real, now=start + 60.5)
    assert engine.threads == 2 and engine.threads_raised[-1][1:] == (1, 2)
    for k in range(3):  # still busy: 2-thread windows over real time, back to 1 with the wait doubled
        engine._note_window(2.1 * real, now=start + 61.0 + k * 0.2)
    assert engine.threads == 1 and engine._raise_wait == 120.0


@pytest.mark.parametrize("full, chosen, full_runs", [({1: 3.0, 2: 2.0}, 1, 4), ({1: 1.3, 2: 1.2}, 1, 10),
                                                     ({1: 0.9, 2: 0.5}, 2, 10)])
def test_threads_are_chosen_for_one_session_where_the_cpu_cannot_hold_a_full_batch(tiny_pipeline, full, chosen,
                                                                                   full_runs):
    """`letstalk serve` admits 8 sessions; a 2-core CPU runs 8 sessions' window in over a second at any count. Timed
    only there, 2 threads (faster for 8) were kept for the one session it serves, and no count was left to lower them
    to (none kept real time). Now, where no count keeps max_batch sessions in real time, the counts are timed again
    for 1 session and chosen there (1 thread: 2 threads are not 15 % cheaper), and the live windows can lower to a
    count that keeps real time. A CPU that holds the full batch (0.5 of real time at 2 threads) still chooses for it.
    Full windows far over real time (2x) are timed twice per count only, not again in turns (3 more each): those
    timings are thrown away; just over it (1.2x), a slow burst might have put them there, so they are, and so are
    kept ones that miss the thread budget (0.5x)."""
    engine = StreamEngine(tiny_pipeline, EngineConfig(warmup=False, max_sessions=4, max_batch=4,
                                                      decode_thread=False))
    engine._threads_before = 2
    real = 1000 * engine.window / tiny_pipeline.config.fps
    one = {1: 0.5, 2: 0.45}  # 1 session's window, by thread count (x real time)
    asked = []

    def window_ms(frames: int, batch: int = 4) -> float:
        asked.append(batch)
        return (full if batch == 4 else one)[torch.get_num_threads()] * real

    before = torch.get_num_threads()
    try:
        engine._choose_threads(window_ms)
    finally:
        torch.set_num_threads(before)
    assert engine.threads == chosen
    assert asked.count(4) == full_runs
    if chosen == 1:
        assert set(asked) == {4, 1} and engine._threads_ms == pytest.approx({1: 0.5 * real, 2: 0.45 * real})
        assert [k for k in engine._threads_ms if engine._window_at_ms(k) <= real]  # a count to lower to
    else:
        assert set(asked) == {4}


@pytest.mark.parametrize("decode_thread", [None, False])
def test_the_warm_up_judges_1_thread_with_its_decode_overlapped(tiny_pipeline, decode_thread):
    """Warm-up windows run one stage after the other, but live at 1 thread on a CPU of 2+ cores the decode thread
    decodes each beside the next one's sampling: 1 thread's window (0.8 of real time, 0.6 of it sampling) costs its
    longer stage, 0.48, less than 2 threads' 0.55, so 1 thread is taken, and no try of 2 is planned (2 threads ran
    a window faster alone: not a busy warm-up, the machine's shape). Without the decode thread, 2 threads."""
    engine = StreamEngine(tiny_pipeline, EngineConfig(warmup=False, decode_thread=decode_thread,
                                                      threads_raise_after_s=60.0))
    engine._threads_before = 2
    real = 1000 * engine.window / tiny_pipeline.config.fps

    def window_ms(frames: int, batch: int = 1) -> float:
        engine._sampled = 0.6
        return {1: 0.8, 2: 0.55}[torch.get_num_threads()] * real

    before = torch.get_num_threads()
    try:
        engine._choose_threads(window_ms)
    finally:
        torch.set_num_threads(before)
    assert engine.threads == (1 if decode_thread is None else 2)
    assert engine._window_at_ms(1) == pytest.approx((0.48 if decode_thread is None else 0.8) * real)
    assert engine._raise_at is None


@pytest.mark.parametrize("quiet", [0.6, 0.3])
def test_a_warm_up_too_busy_to_keep_real_time_tries_more_threads_and_draws_once_the_machine_quietens(tiny_model_dir,
                                                                                                     quiet):
    """A warm-up in a spell so busy that no thread count kept real time takes the fastest (1) and, with nothing to
    come back to, plans no try of 2; its 2 noise draws did not fit either. Before, such an engine kept 1 thread and
    1 draw until restarted. Now: once most of the last 10 live 1-thread windows are under 0.75 of real time, their
    time replaces the warm-up's and 2 threads are tried after threads_raise_after_s; then the draws, once they fit. If 2
    threads fall behind again, the engine goes back to 1 (now a count that keeps real time) with the wait doubled.
    Windows still near real time plan nothing; 1-thread windows that fit threads_budget (0.3 of real time: where a
    quiet warm-up stops) keep 1 thread and get the draws back there."""
    from letstalk_rt.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.from_pretrained(tiny_model_dir, noise_draws=2)
    engine = StreamEngine(pipe, EngineConfig(warmup=False, threads_raise_after_s=60.0))
    engine._threads_before = 2
    real = 1000 * engine.window / pipe.config.fps
    before = torch.get_num_threads()
    try:
        engine._choose_threads(lambda frames, batch=1: {1: 1.2, 2: 1.5}[torch.get_num_threads()] * real)
    finally:
        torch.set_num_threads(before)
    assert engine.threads == 1 and engine._raise_at is None  # nothing to come back to: no try planned
    pipe.noise_draws, engine._draws_raise_at = 1, 0.0  # as the warm-up leaves it: 2 draws did not fit
    announced = []
    engine._announce = lambda change, before, after, behind_ms: announced.append(  # type: ignore[method-assign]
        (change, before, after))

    def windows(start: float, end: float, ms: float, sample: float) -> None:
        t = start
        while t < end:
            engine._note_window(ms * real, now=t, sample_ms=sample * real)
            t += 0.2

    windows(0.0, 100.0, 0.95, 0.5)  # still busy: windows near real time plan nothing
    assert engine._raise_at is None and engine.threads == 1 and pipe.noise_draws == 1 and not announced
    if quiet < engine.config.threads_budget:
        windows(100.0, 200.0, quiet, 0.2)
        assert engine.threads == 1 and engine._raise_at is None and announced == [("noise_draws", 1, 2)]
        return
    windows(100.0, 102.0, 0.6, 0.4)  # quiet: 1-thread windows at 0.6 of real time (2 draws would take 1.0)
    assert engine._raise_at is not None and 100.0 < engine._raise_at - 60.0 < 102.0  # once most of the last 10 are
    assert engine._threads_ms[1] == pytest.approx(0.6 * real) and engine._threads_top == 2
    windows(102.0, 165.0, 0.6, 0.4)
    assert engine.threads == 2 and pipe.noise_draws == 1 and announced == [("threads", 1, 2)]
    windows(165.0, 170.0, 0.35, 0.25)  # 2 threads: 2 draws would take 0.6, within draws_budget (0.7)
    assert pipe.noise_draws == 2 and announced[1:] == [("noise_draws", 1, 2)]
    windows(170.0, 171.0, 2.1, 1.0)  # busy again: the draws first, then back to 1 thread, which keeps real time
    assert pipe.noise_draws == 1 and engine.threads == 1 and announced[2:] == [("noise_draws", 2, 1), ("threads", 2, 1)]
    assert engine._raise_wait == 120.0 and engine._raise_at is not None  # the try at 161 s failed within the wait


def test_stretched_speech_keeps_the_arrival_of_the_audio_it_holds(tiny_pipeline):
    """The catch-up's tempo stretcher gives audio out ~30 ms after it went in: each piece is tagged with the arrival
    of the newest push it holds (a frame's latency counts from its own audio; tagged with the push that let it
    out, latency read 20-60 ms low, 36 on average, during every catch-up), and what a flush lets out with the last
    push's. (The bounds on the mean lag are atempo's buffering, ~30 ms of output.)"""
    from letstalk_rt.media import TempoStretcher
    from letstalk_rt.stream.engine import _WorkerState

    w = _WorkerState(None, tiny_pipeline.audio_tokenizer())
    w.stretch = TempoStretcher(1.25, 16000)
    pcm, chunk = speechlike(1.0, seed=2), 320  # 20 ms pushes, arriving 20 ms apart
    lags = []
    for i in range(len(pcm) // chunk):
        before = len(w.timeline)
        w.feed_stretched(pcm[i * chunk:(i + 1) * chunk], arrival=i * 0.02)
        lags += [i * 0.02 - entry[1] for entry in list(w.timeline)[before:]]
    tags = [entry[1] for entry in w.timeline]
    assert tags == sorted(tags) and min(lags) >= 0
    assert 0.015 <= float(np.mean(lags)) <= 0.06, np.mean(lags)  # the stretcher's hold, in pushes' time
    w.unstretch(arrival=5.0)  # a pause: the rest comes out, it is the last push's audio
    assert w.timeline[-1][1] == pytest.approx((len(pcm) // chunk - 1) * 0.02) and len(w.timeline[-1][0]) > 0
    assert w.stretch is None and not w.stretched


def test_the_engine_freezes_what_the_process_holds_at_start_so_full_collections_skip_it(tiny_pipeline):
    """EngineConfig.freeze_gc: a full collection walked the ~200 k objects of the imports and the model (~180 ms with
    the GIL held, a stall of every stream); from the engine's start it walks only what came after."""
    import gc

    def walked(obj) -> bool:  # gc.get_objects(): what the collector's generations hold (not the frozen)
        return any(o is obj for o in gc.get_objects())

    before = [object()]  # a container: the collector tracks it
    gc.unfreeze()
    assert walked(before)

    async def main():
        engine = await _engine(tiny_pipeline, freeze_gc=False)
        assert walked(before) and gc.get_freeze_count() == 0
        await engine.stop()
        engine = await _engine(tiny_pipeline)
        after = [object()]
        assert not walked(before) and gc.get_freeze_count() > 10_000  # the imports (torch) and the model
        assert walked(after)  # what comes later is collected as always
        await engine.stop()

    try:
        run(main())
    finally:
        gc.unfreeze()


def test_warm_up_traces_the_windows_of_one_and_two_sessions_and_then_stops_tracing(tiny_model_dir):
    """On a CPU: batches of 1 and 2 sessions (of max_batch 3), full and first windows, at 1 noise draw and the
    model's, are traced at warm-up (Traced); live, tracing is off (a new signature runs eagerly instead of holding
    windows up)."""
    from letstalk_rt.diffusion import guidance_rows
    from letstalk_rt.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.from_pretrained(tiny_model_dir, noise_draws=2)

    async def main():
        engine = await _engine(pipe, warmup=True, max_batch=3, max_sessions=3, first_window=2, threads=1)
        assert not pipe._transformer_fn.capture and not pipe._decode_fn.capture  # live
        await engine.stop()
        assert pipe._transformer_fn.capture  # the pipeline on its own again traces what it meets

    run(main())
    guided = len(guidance_rows(pipe.portrait_guidance, pipe.audio_guidance))  # transformer rows per noise draw
    x_shapes = {key[4][0][:2] for key in pipe._transformer_fn.traces}  # x: (rows, frames, ...)
    assert x_shapes == {(b * d * guided, t) for b in (1, 2) for d in (1, 2) for t in (pipe.window, 2)}
    assert {key[4][0][0] for key in pipe._decode_fn.traces} >= {b * t for b in (1, 2) for t in (pipe.window, 2)}
    assert pipe._transformer_fn.failed is None and pipe._decode_fn.failed is None


_FAULTS = """
import resource, sys
import torch
from letstalk_rt.stream.engine import keep_heap
kept = keep_heap() if sys.argv[1] == "keep" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):  # a 40 MB block, freed and allocated again (above glibc's adaptive 32 MB mmap limit)
    a = torch.ones(10 * 2**20)
    del a
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_keep_heap_reuses_freed_blocks_instead_of_faulting_them_in_again():
    def run(mode: str, **env) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout.split()
        return out[0], int(out[1])

    _, default_faults = run("default")
    kept, kept_faults = run("keep")
    if kept != "True":
        pytest.skip("not glibc")
    pages = 40 * 2**20 // 4096
    assert default_faults > 5 * pages  # every allocation mapped and faulted in anew
    assert kept_faults < 3 * pages  # faulted in once or twice (where the heap places it), then reused
    assert run("keep", MALLOC_TRIM_THRESHOLD_="1")[0] == "False"  # the user's own malloc settings win


_HOLES = """
import os
from letstalk_rt.stream.engine import keep_heap, trim_heap
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
keep_heap()
blocks = [bytearray(100_000) for _ in range(2000)]  # 200 MB in the heap (under keep_heap's mmap threshold)
kept = blocks[::50]  # a block kept every 5 MB: the freed ones are holes, not the heap's free top
del blocks
before = rss_mb()
trimmed = trim_heap()
print(trimmed, before - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc is Linux-only")
def test_trim_heap_hands_the_freed_holes_keep_heap_holds_back_to_the_kernel():
    """What a stream frees between live blocks stays resident under keep_heap (no threshold trims a hole): the
    engine's `trim_heap` (every EngineConfig.trim_heap_every_s) gives it back."""
    out = subprocess.run([sys.executable, "-c", _HOLES], capture_output=True, text=True, check=True).stdout.split()
    if out[0] != "True":
        pytest.skip("not glibc")
    assert float(out[1]) > 150  # of the ~196 MB freed in holes


def test_a_running_engine_trims_the_heap_at_its_interval_off_the_loop_until_it_stops(tiny_pipeline, monkeypatch):
    from letstalk_rt.stream import engine as engine_module

    trims = []
    monkeypatch.setattr(engine_module, "trim_heap", lambda: trims.append(threading.current_thread().name) or True)

    async def run() -> tuple[int, int, dict]:
        engine = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False, trim_heap_every_s=0.05)).start()
        await asyncio.sleep(0.4)
        state = engine.running_state()
        await engine.stop()
        stopped = len(trims)
        await asyncio.sleep(0.2)
        off = await StreamEngine(tiny_pipeline, EngineConfig(warmup=False, trim_heap_every_s=0)).start()
        await asyncio.sleep(0.2)
        await off.stop()
        return stopped, len(trims), state

    stopped, after, state = asyncio.run(run())
    if engine_module._glibc("malloc_trim") is None:
        assert stopped == 0  # nothing to trim with
        return
    assert 3 <= stopped <= 9 and after == stopped  # every 50 ms while running; none once stopped, none when off
    assert state["heap_trims"] >= 2
    assert threading.main_thread().name not in trims  # off the event loop's thread


_TEAMS = """
import asyncio, concurrent.futures, os
import torch
from letstalk_rt.stream.engine import release_openmp_threads, run_off_loop
torch.set_num_threads(2)
tasks = lambda: len(os.listdir("/proc/self/task"))
parallel = lambda: torch.relu(torch.randn(4_000_000))  # one parallel region: the calling thread starts a team
base = tasks()
parallel()
team = tasks()
released = release_openmp_threads()
after = tasks()

async def main():
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(1))  # one thread to count
    await asyncio.to_thread(lambda: None)  # the executor's thread exists before counting
    before = tasks()
    await run_off_loop(parallel)
    return before, tasks()

print(base, team, released, after, *asyncio.run(main()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_threads_other_than_the_worker_let_their_openmp_team_go():
    """A second thread's idle OpenMP team made the worker's windows ~1.7x slower on 2 cores (GNU OpenMP stops
    spinning once teams outnumber the CPUs): the loop's thread and run_off_loop's executor release theirs."""
    out = subprocess.run([sys.executable, "-c", _TEAMS], capture_output=True, text=True, check=True).stdout.split()
    base, team, released, after, off_before, off_after = out
    if released != "True":
        pytest.skip("no GNU OpenMP runtime in this torch")
    assert int(team) > int(base)  # the op started a team
    assert int(after) == int(base)  # and releasing ended it
    assert int(off_after) == int(off_before)  # the executor's thread kept no team after run_off_loop


@pytest.mark.skipif(not sys.platform.startswith("linux") or torch.get_num_threads() < 2, reason="reads /proc/self/task")
def test_a_started_engine_leaves_no_openmp_team_on_the_loop_or_its_executor(tiny_pipeline):
    """start() ends the team of the thread that starts it (here one made just before, as loading a model makes),
    and the warm-up and a portrait run in the executor without leaving one: releasing again ends nothing."""
    import concurrent.futures

    from letstalk_rt.stream.engine import _gnu_openmp, release_openmp_threads

    if not _gnu_openmp():
        pytest.skip("no GNU OpenMP runtime in this torch")
    tasks = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731

    async def main():
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
        torch.relu(torch.randn(4_000_000))  # this thread's team
        engine = await _engine(tiny_pipeline, warmup=True, threads=2)
        engine._plan = lambda: []  # no window: the worker's own team, started or let go between counts, would move them
        await engine.open_session(tiny_pipeline.prepare_portrait(np.full((40, 40, 3), 90, np.uint8), detect=False))
        await engine.open_session(np.full((40, 40, 3), 120, np.uint8), detect_face=False)  # prepared off the loop
        counts = [tasks()]
        release_openmp_threads()
        counts.append(tasks())
        await asyncio.to_thread(release_openmp_threads)
        counts.append(tasks())
        await engine.stop()
        return counts

    before = torch.get_num_threads()
    try:
        started, loop_released, executor_released = run(main())
    finally:
        torch.set_num_threads(before)
    assert started == loop_released == executor_released


def test_a_compiled_engine_runs_its_full_windows_compiled_the_rest_eagerly_with_the_same_frames(tiny_model_dir):
    """EngineConfig.compile: warm-up compiles a full window of one session (torch.compile, static shapes);
    the short first window, never compiled, runs eagerly instead of stalling the stream for a compile; the
    compiled model makes the frames the eager one makes; a later engine reuses it at the same threads."""
    from letstalk_rt.pipeline import LetsTalkPipeline

    eager, fast = LetsTalkPipeline.from_pretrained(tiny_model_dir), LetsTalkPipeline.from_pretrained(tiny_model_dir)

    async def main():
        engine = await StreamEngine(fast, EngineConfig(compile=True, max_sessions=1, max_batch=1)).start()
        session = await engine.open_session(_portrait(fast, 30))
        session.push_audio(speechlike(1.0, seed=3))
        session.end_speech()
        frames = await _collect(session, 1.5)
        await engine.stop()
        again = await StreamEngine(fast, EngineConfig(compile=True, max_sessions=1, max_batch=1)).start()
        await again.stop()  # a second engine on the compiled model keeps the threads its kernels were made for
        return frames, session.stats(), again.threads

    frames, stats, threads = asyncio.run(asyncio.wait_for(main(), timeout=900))  # cold compile: ~1 min on 2 cores
    if "OMP_NUM_THREADS" not in os.environ:
        assert threads == fast.compiled_threads is not None
    assert len(frames) >= 35 and stats["frames_generated"] >= 35, stats
    assert fast.compiled
    c, n = fast.config.transformer.latent_channels, fast.config.transformer.latent_size
    assert fast._transformer_fn.shapes == {(1, fast.window, c, n, n)}  # not the 2-frame first window
    assert fast._decode_fn.shapes == {(fast.window, c, n, n)}
    out = []
    for p in (eager, fast):  # the same window from each: same seed, portrait and speech
        stream = p.new_stream(_portrait(p, 30), seed=5)
        tokens = p.audio_tokens(speechlike(0.5, seed=3))[:p.window]
        out.append([p.generate_windows([stream], [tokens])[0] for _ in range(3)])  # the memory bank carries on
    assert np.abs(np.stack(out[0]).astype(int) - np.stack(out[1]).astype(int)).max() <= 1


def test_compile_without_a_cxx_compiler_says_how_to_get_one(tiny_model_dir, monkeypatch):
    import shutil

    from letstalk_rt.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(InputError, match="apt-get install g\\+\\+"):
        pipe.compile()
    assert not pipe.compiled
    with pytest.raises(LetsTalkError, match="warm-up"):
        StreamEngine(pipe, EngineConfig(compile=True, warmup=False))


def test_warm_up_captures_a_graph_for_every_batch_size_it_can_run(tiny_pipeline, monkeypatch):
    """On a GPU the warm-up runs every graph bucket below max_batch and max_batch itself, for both window
    lengths, and the audio encoder for every bucket up to the blocks a window plus one frame per session make: no
    batch met live waits for a capture, and none is made live. (The captures themselves are checked on a GPU in
    test_pipeline.)"""
    engine = StreamEngine(tiny_pipeline, EngineConfig(max_batch=10, window=4, first_window=2))
    from letstalk_rt.pipeline import DECODE_CHUNK, GRAPH_BUCKETS

    batches, blocks, decoded, capture = [], [], [], []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    enc = tiny_pipeline.audio_encoder
    monkeypatch.setattr(enc, "_encode_windows", lambda w: blocks.append((w.shape[0], torch.is_grad_enabled())))
    monkeypatch.setattr(tiny_pipeline, "decode", lambda lat, streams=None: decoded.append(lat.shape[0]))
    monkeypatch.setattr(tiny_pipeline, "capture_graphs", capture.append)
    engine._capture_graphs(lambda t, b: batches.append((t, b)))
    assert batches == [(t, b) for t in (2, 4) for b in (1, 2, 4, 8, 10)]
    # without autograd: CudaGraphed runs a call with grad on eagerly, and these were never captured (an H100 run
    # met every encoder batch size live for the first time)
    # the encoder: a plan carries a window's blocks per session and one more when the next window's first frame
    # is in (an H200 run met 23 blocks for 8 sessions' 2-frame windows, which 2 per session did not cover)
    assert enc.block_frames == 1  # the tiny preset's log-mel encoder: a block per frame, so 4 + 1 per session
    assert blocks == [(n, False) for n in (1, 2, 4, 8, 12, 16, 24, 32, 48, 50)]
    captured = {next(x for x in GRAPH_BUCKETS if x >= n) for n, _ in blocks}  # the buckets those pad to
    for b in range(1, 11):  # b sessions' plan: every size up to its most blocks pads to a captured bucket
        for n in range(1, 5 * b + 1):
            assert next(x for x in GRAPH_BUCKETS if x >= n) in captured
    # the decoder's chunks: a batch's last one can be any size, e.g. 3 sessions' 4-frame windows are 12 frames
    assert decoded == [1, 2, 4, 8, 12, 16]
    for t in (2, 4):
        for b in range(1, 11):
            for chunk in torch.zeros(t * b).split(DECODE_CHUNK):
                assert next(x for x in GRAPH_BUCKETS if x >= len(chunk)) in decoded
    assert capture == [False]  # live, a size met for the first time runs eagerly: no capture beside the decode thread


@pytest.mark.parametrize("decode_thread", [False, True])
def test_warm_up_captures_the_transformer_buckets_of_every_noise_draw_count_it_can_run(tiny_pipeline, monkeypatch,
                                                                                      decode_thread):
    """At 2 noise draws a session is 2 transformer rows: every bucket that 1..max_batch sessions' rows pad to is
    captured, and, where a running engine can fall back to 1 draw (no decode thread), every bucket at 1 draw too
    (1 session's single row pads to the bucket of 1, which no 2-draw batch reaches)."""
    from letstalk_rt.diffusion import guidance_rows
    from letstalk_rt.pipeline import GRAPH_BUCKETS
    from letstalk_rt.stream.engine import graph_sessions

    monkeypatch.setattr(tiny_pipeline, "noise_draws", 2)
    engine = StreamEngine(tiny_pipeline, EngineConfig(max_batch=10, window=4, first_window=4,
                                                      decode_thread=decode_thread))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(tiny_pipeline.audio_encoder, "_encode_windows", lambda w: None)
    monkeypatch.setattr(tiny_pipeline, "decode", lambda lat, streams=None: None)
    monkeypatch.setattr(tiny_pipeline, "capture_graphs", lambda on: None)
    seen = []  # (noise draws, sessions) of each window the warm-up ran
    engine._capture_graphs(lambda t, b: seen.append((tiny_pipeline.noise_draws, b)))
    assert tiny_pipeline.noise_draws == 2  # given back
    bucket = lambda rows: next(x for x in GRAPH_BUCKETS if x >= rows)  # noqa: E731
    assert len(guidance_rows(tiny_pipeline.portrait_guidance, tiny_pipeline.audio_guidance)) == 1  # a row per draw
    assert {d for d, _ in seen} == ({2} if decode_thread else {1, 2})
    for draws in {d for d, _ in seen}:
        captured = {bucket(b * draws) for d, b in seen if d == draws}
        assert {bucket(n * draws) for n in range(1, 11)} == captured
    assert graph_sessions(10, 2) == [1, 2, 4, 6, 8, 10] and graph_sessions(10, 1) == [1, 2, 4, 8, 10]


def test_a_burst_of_pieces_after_a_stalled_event_loop_does_not_move_the_pace(tiny_pipeline):
    """The paced arrival (what the catch-up measures lateness from) of a live source: pieces that a stalled
    event loop delivers in one burst arrive when they arrive and leave the pace alone, so the next piece on
    time is on time; after a pause longer than pace_restart_ms, audio pushed at once keeps its own pace."""
    async def main():
        engine = await _engine(tiny_pipeline)
        session = await engine.open_session(_portrait(tiny_pipeline, 60))
        await engine.stop()
        return session

    session = run(main())
    pace = session._pace
    assert pace(10.0, 320) == 10.0  # the first piece starts the pace: due every 20 ms from here
    burst = [pace(10.142, 320) for _ in range(7)]  # 140 ms late: the loop was stalled, now they come at once
    assert burst == [10.142] * 7  # (all were due before 10.142: none is ahead of time)
    assert pace(10.162, 320) == 10.162  # on time again: not 120 ms "ahead" for the rest of the session
    assert pace(10.179, 320) == pytest.approx(10.18)  # a piece a little early keeps its pace
    # a pause in pushing, then a whole utterance at once (a TTS): its pieces are paced from the first
    t = 12.0
    assert [pace(t, 640) for _ in range(3)] == [t, pytest.approx(t + 0.04), pytest.approx(t + 0.08)]


def test_a_stall_of_the_event_loop_at_the_start_does_not_leave_the_session_late(tiny_pipeline):
    """A live source behind a stalled event loop: its pieces of the stall come in one burst, then in real
    time again. The session still settles at its target latency in continuous speech (no pause to take
    back lateness in): the burst is not taken for audio pushed ahead of time (which would put the target
    that much later for good: 0.3 s here)."""
    speech = speechlike(4.0, seed=11) + 0.05  # never below speech_rms: no pause

    async def feed(session):
        start = time.monotonic()
        for i, pos in enumerate(range(0, len(speech), 320)):
            await asyncio.sleep(max(0.0, start + i * 0.02 - time.monotonic()))
            session.push_audio(speech[pos:pos + 320])
            if i == 2:
                time.sleep(0.3)  # the event loop stalls: the next 15 pieces come at once after it
        session.end_speech()

    async def main():
        engine = await _engine(tiny_pipeline, warmup=True)
        session = await engine.open_session(_portrait(tiny_pipeline, 70))
        feeder = asyncio.create_task(feed(session))
        await _collect(session, 4.4)  # consumes the frames as a player would
        await feeder
        out = list(session.latencies), session.stats(), engine.target_latency_s()
        await engine.stop()
        return out

    lat, stats, target = run(main())
    last = np.median(lat[-25:])
    # Near the target: 0.04-0.09 s over it measured (lateness under catch_up_speech_ms waits for a pause),
    # plus 40 ms per frame held on a busy machine; before the fix 0.29 s over (the stall, for good).
    assert last <= target + 0.15 + 0.04 * stats["fillers"], (last, target, stats)


def test_idle_frames_put_in_front_are_taken_back_whole_and_the_audio_after_them_is_untouched(tiny_pipeline):
    """drop_idle takes back idle frames not generated yet (a session that turned out later than planned):
    their tokens and their silent audio go together, the frames after them are unchanged."""
    async def main():
        engine = await _engine(tiny_pipeline)
        session = await engine.open_session(_portrait(tiny_pipeline, 60))
        await engine.stop()
        return engine, session

    engine, session = run(main())
    w, spf = session._w, session.samples_per_frame
    speech = speechlike(0.4, seed=12) + 0.05
    w.feed(speech, 1.0, True)
    engine._encode_audio([session])
    speech_tokens = torch.cat(w.tokens).clone()
    w.prepend_idle(engine._idle_tokens(4))
    assert w.idle_ahead == 4
    n = w.n_tokens
    w.drop_idle(3)
    assert (w.n_tokens, w.idle_ahead) == (n - 3, 1)
    tokens = w.peek_tokens(w.n_tokens)
    torch.testing.assert_close(tokens[0], engine._idle_tokens(1)[0])  # one idle frame left in front ...
    torch.testing.assert_close(tokens[1:1 + len(speech_tokens)], speech_tokens)  # ... then the speech's tokens
    audio, speech_flag, arrival, inserted, captions, through = w.take_audio(spf)
    assert inserted and not speech_flag and arrival is None and not audio.any() and captions == [] and through == 0
    out = np.concatenate([w.take_audio(spf)[0] for _ in range(len(speech) // spf)])
    np.testing.assert_array_equal(out, speech[:len(out)])
    w.drop_tokens(2)
    assert w.idle_ahead == 0


def test_a_file_pushed_faster_than_real_time_waits_for_room_instead_of_failing(tiny_pipeline, tmp_path, wav_file):
    """FileSource(realtime=False) on a file longer than the engine's max_pending_seconds: run() keeps the queue at
    that bound and delivers every sample (it raised AudioBufferFull part-way through)."""
    from letstalk_rt.stream import FileSource

    source = FileSource(wav_file(3.0), realtime=False)

    async def main():
        engine = await _engine(tiny_pipeline, max_pending_seconds=1.0)
        session = await engine.open_session(_portrait(tiny_pipeline, 70))
        reader = asyncio.create_task(_collect(session, 4.0))
        await source.run(session)
        frames = await reader
        await engine.stop()
        return frames

    frames = run(main())
    audio = speech_out(frames, drop_held=True)
    start, first = np.flatnonzero(audio)[0], np.flatnonzero(source.audio)[0]
    pushed = source.audio[first:]
    np.testing.assert_allclose(audio[start:start + len(pushed)], pushed, atol=1e-6)


def test_audio_waiting_for_room_is_dropped_by_an_interrupt_and_by_close(tiny_pipeline):
    """push_audio_when_room waits while the queue is full; an interrupt drops the speech it belongs to (it must not
    be pushed into the new state once the interrupt made room), and a close ends the wait."""
    async def main():
        engine = await _engine(tiny_pipeline, max_pending_seconds=5.0)
        session = await engine.open_session(_portrait(tiny_pipeline, 90))
        assert await session.push_audio_when_room(speechlike(5.0))
        waiting = asyncio.create_task(session.push_audio_when_room(speechlike(2.0), poll_s=0.01))
        await asyncio.sleep(0.3)  # nobody reads: the engine stays a few windows ahead, the queue full
        still_waiting = not waiting.done()
        session.interrupt()
        interrupted = await asyncio.wait_for(waiting, 1.0)
        pending_after = session._pending_samples
        pushed = await session.push_audio_when_room(speechlike(1.0))  # room now: in at once
        full = await session.push_audio_when_room(speechlike(3.5))  # 4.5 s of 5
        more = asyncio.create_task(session.push_audio_when_room(speechlike(4.0), poll_s=0.01))
        await asyncio.sleep(0.1)
        await session.close()
        closed = await asyncio.wait_for(more, 1.0)
        await engine.stop()
        return still_waiting, interrupted, pending_after, pushed, full, closed

    still_waiting, interrupted, pending_after, pushed, full, closed = run(main())
    assert still_waiting and interrupted is False and pending_after == 0
    assert pushed and full and closed is False


def test_waiting_for_the_audio_to_be_shown(tiny_pipeline):
    """wait_audio_shown: True once the speech pushed has played to its end (as long as it takes to play, not sooner),
    at once after an interrupt dropped it, False at a timeout and when the session closes with speech unplayed."""
    async def main():
        engine = await _engine(tiny_pipeline, catch_up=False)
        session = await engine.open_session(_portrait(tiny_pipeline, 60))
        reader = asyncio.create_task(_collect(session, 30.0))
        assert await session.wait_audio_shown(timeout=0)  # nothing pushed
        session.push_audio(speechlike(1.0))
        session.end_speech()
        start = time.monotonic()
        shown = await session.wait_audio_shown(timeout=20)
        took = time.monotonic() - start
        session.push_audio(speechlike(3.0))
        timed_out = await session.wait_audio_shown(timeout=0.3)
        session.interrupt()
        start = time.monotonic()
        dropped = await session.wait_audio_shown(timeout=5)
        at_once = time.monotonic() - start
        session.push_audio(speechlike(3.0))
        waiting = asyncio.create_task(session.wait_audio_shown())
        await asyncio.sleep(0.2)
        await session.close()
        closed = await asyncio.wait_for(waiting, 3)
        reader.cancel()
        await engine.stop()
        return shown, took, timed_out, dropped, at_once, closed

    shown, took, timed_out, dropped, at_once, closed = run(main())
    assert shown and took >= 0.95  # a second of speech plays for a second
    assert timed_out is False and dropped and at_once < 0.1 and closed is False


def test_opening_a_session_touches_no_device_tensor_on_the_event_loop(tiny_pipeline, monkeypatch):
    """A session's stream (its copy of the portrait latent) is made off the event loop: on a GPU that copy waits
    for the window the worker is running, and every session's paced frames would wait with the loop."""
    import threading

    threads = []
    real = tiny_pipeline.new_stream
    monkeypatch.setattr(tiny_pipeline, "new_stream",
                        lambda *a, **kw: (threads.append(threading.current_thread()), real(*a, **kw))[1])

    async def main():
        engine = await _engine(tiny_pipeline)
        session = await engine.open_session(_portrait(tiny_pipeline, 40))  # a Portrait already: no preparation
        frames = await _collect(session, 0.2)
        await engine.stop()
        return frames

    frames = run(main())
    assert threads and threading.main_thread() not in threads and len(frames) == 5


async def _stopped_player(pipe, seed: int):
    """A session's player whose clock ran 0.2 s, its engine stopped and nothing queued: every tick now is held."""
    engine = await _engine(pipe)
    session = await engine.open_session(_portrait(pipe, seed))
    await _collect(session, 0.2)
    await engine.stop()
    session.player.queue.clear()
    return session.player


def test_held_frames_are_counted_by_the_minute_of_playback_they_fell_in(tiny_pipeline):
    """A tick whose frame is not ready shows the last one again (held); the player counts them by the minute of
    playback they fell in (the bench's held_frames_by_minute), so a soak shows when they came."""

    async def main():
        player = await _stopped_player(tiny_pipeline, 90)
        before, start = player.fillers, player.tick
        player._materialise(60 * 25 + 9)  # through the 10th tick of the second minute
        return player, before, start

    player, before, start = run(main())
    assert player.fillers - before == 60 * 25 + 10 - start
    assert player.fillers_by_minute[1] == 10 and sum(player.fillers_by_minute.values()) == player.fillers


def test_a_held_tick_in_speech_fades_the_sound_out_and_back_in_instead_of_cutting_it(tiny_pipeline):
    """A tick whose frame is late holds the picture and delays the speech; its audio starts where the speech stopped
    and fades to silence in 5 ms (cut dead, a loud sample then zeros, it clicks), and the held tick after it is
    silent. The speech that follows restarts from that silence with its first 5 ms faded in (it would jump from 0 to
    whatever sample it had: a second click); from there on it is untouched."""

    async def main():
        player = await _stopped_player(tiny_pipeline, 91)
        speech = (speechlike(0.12, seed=5) / 2 + 0.3).astype(np.float32)  # 3 frames, loud at every sample
        before, after, later = (dataclasses.replace(player.last, audio=speech[i * 640:(i + 1) * 640], speech=True,
                                                    filler=False) for i in range(3))
        player.queue.append(before)
        player._materialise(player.tick + 2)  # the speech's frame, then two held ticks
        player.queue.extend([after, later])
        player._materialise(player.tick + 1)  # the speech goes on, then on again
        shown = [player.shown[t] for t in range(player.tick - 5, player.tick)]
        return speech, [f.audio for f in shown], [f.faded_in for f in shown], unfaded_audio(shown[3]), player.fillers

    speech, (said, held, held_again, resumed, went_on), faded, unfaded, fillers = run(main())
    assert fillers == 2 and np.array_equal(said, speech[:640]) and faded == [False, False, False, True, False]
    assert abs(held[0] - speech[639]) < 0.02  # no step where the speech stopped (a cut jumps by >= 0.15)
    assert np.abs(np.diff(held)).max() < 0.05 and not held[80:].any()  # smooth, and silent after 5 ms
    assert not held_again.any()
    assert abs(resumed[0]) < 0.01 and np.abs(np.diff(resumed[:81])).max() < 0.05  # no step where it restarts
    assert np.array_equal(resumed[80:], speech[720:1280]) and np.array_equal(went_on, speech[1280:])  # untouched
    np.testing.assert_allclose(unfaded, speech[640:1280], rtol=1e-6)  # what a reader leaving held ticks out gets


class _RecordedPaste:
    """A session's FullFrame that keeps each face crop it pastes, by the frame it made."""

    def __init__(self, paste):
        self.paste, self.crops = paste, {}

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        out = self.paste(crop)
        self.crops[id(out)] = (out, crop.copy())  # the frame is kept too, so its id is not reused
        return out

    def __getattr__(self, name):
        return getattr(self.paste, name)


def test_full_frame_sessions_stream_the_whole_photo_with_the_face_pasted_in(tiny_pipeline):
    """A session opened with full_frame gets frames of the whole photo (fit to the size asked for) in which only
    the face crop's square changed: each is a generated face crop, of the size a face-crop session of the same
    portrait streams, pasted back. (Not the same crops frame for frame: under load, when idle frames go in front
    of speech depends on timing, so two sessions fed the same speech differ.)"""
    rng = np.random.default_rng(5)
    photo = np.array(__import__("PIL.Image").Image.fromarray(rng.integers(0, 255, (7, 10, 3), dtype=np.uint8))
                     .resize((100, 70)))  # 100 x 70, no face: the centre square (15, 0, 70) is animated

    async def main():
        engine = await _engine(tiny_pipeline)
        try:
            whole = await engine.open_session(photo, detect_face=False, full_frame=64)
            whole.paste = _RecordedPaste(whole.paste)
            crop = await engine.open_session(photo, detect_face=False)
            speech = speechlike(1.2)
            feeders = [asyncio.ensure_future(_push_in_real_time(s, speech)) for s in (whole, crop)]
            got = await asyncio.gather(_collect(whole, 1.2), _collect(crop, 1.2))
            await asyncio.gather(*feeders)
            assert crop.player.history == 100  # 4 s of small frames kept
            large = await engine.open_session(np.full((1000, 1000, 3), 99, np.uint8), detect_face=False, full_frame=1000)
            assert large.frame_size == (1000, 1000) and large.player.history == 10  # 16 MB; twice late_skip_ms
            await large.close()
            return whole, got
        finally:
            await engine.stop()

    whole, (big, small) = run(main())
    assert whole.frame_size == (64, 44) and {f.video.shape for f in big} == {(44, 64, 3)}
    canvas = whole.paste.canvas
    outside = np.stack([f.video for f in big])[:, :, 55:]  # right of the square (15 + 70 px) x 0.64
    assert np.array_equal(outside, np.broadcast_to(canvas[:, 55:], outside.shape))
    crops = [whole.paste.crops[id(b.video)][1] for b in big if not b.filler]
    assert len(crops) > 5 and {c.shape for c in crops} == {f.video.shape for f in small}  # the rest held (load)
    assert len({c.tobytes() for c in crops}) > 3  # it moved
    paste = tiny_pipeline.full_frame(tiny_pipeline.prepare_portrait(photo, detect=False), 64)  # fed as the session's was
    for b in big:
        if not b.filler:
            assert np.array_equal(b.video, paste(whole.paste.crops[id(b.video)][1]))
