"""`letstalk bench`: what the engine sustains on this machine, measured the way users feel it.

    letstalk bench                                   # default model, 1 session, 20 s, CPU
    letstalk bench --preset letstalk-b --device cuda --sessions 1,4,8,12 --seconds 30
    letstalk bench --soak 1800                       # A/V offset after 30 minutes of streaming
    letstalk bench --json out.json                   # machine-readable, for docs/benchmarks.md
    letstalk bench --seconds 30 --repeat 3           # each session count 3 times: median, min, max
    letstalk bench --seconds 120 --neighbours 2      # with 2 CPU-bound processes busy 30 s of every 60

For each session count N: N sessions are fed real-time speech (the bundled clip, looped) in 20 ms
chunks, and each session's video and audio tracks are read by a consumer at their own pace, exactly
as aiortc's senders read them. Reported: generated frames/s, real-time factor (ticks that showed a generated frame / ticks needed),
time to first frame, speech-to-screen latency p50/p95/p99, A/V offset at the track output, dropped and
held frames, audio gaps (silence inserted before pushed speech that missed its deadline), peak memory
(RSS and CUDA). Then one window's cost broken down: audio encoding, each
sampling step, decoding, so the slowest part is visible.

Every run also records how late the process's event loop woke at worst in each minute and its garbage collector's
pauses (`LoopWatch`): a stall of every stream shows there with its cause.

`--neighbours N` reproduces a shared machine's noisy neighbours: N CPU-bound processes run beside the
engine for the whole benchmark, each busy BUSY seconds of every PERIOD (`--neighbour-duty 30/60`, busy
first), so that figures for a contended machine can be re-run rather than waited for.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import gc
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .diffusion import guidance_rows
from .errors import LetsTalkError, Stopped
from .media import write_text_atomic
from .pipeline import LetsTalkPipeline

STEADY_AFTER_S = 5.0  # latency_ms_p95_after_start leaves out each session's first seconds of playback
RSS_EVERY_S = 60.0  # rss_mb_by_minute: the resident memory sampled this often
LAG_EVERY_S = 0.01  # LoopWatch: its task asks to wake this often


@dataclass
class RunResult:
    sessions: int
    seconds: float
    fps_generated: float  # all sessions together
    realtime_factor: float  # ticks that showed a generated frame / ticks the clock needed (1 - held / ticks)
    first_frame_ms_max: float | None  # None: a session showed no frame at all within the run
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    latency_ms_p99: float | None
    av_offset_ms_max: float | None  # |audio release - video release| of each frame's own picture and speech, at the
    # tracks (None with --webrtc: aiortc's senders read the tracks; `webrtc` has the offset as they sent, and where
    # the peer receives)
    held_frames: int  # frames shown as held (generation late)
    gap_seconds: float  # silence inserted before pushed audio that missed its deadline (heard as a gap)
    dropped_frames: int  # frames skipped (interrupt / consumer)
    peak_rss_mb: float
    peak_cuda_mb: float | None
    steps: int  # sampling steps per window the engine ran (more than the model's with --max-steps)
    threads: int  # torch intra-op threads of the engine's worker at the start (EngineConfig.threads)
    noise_draws: int = 1  # samples averaged per window at the start (1 where the model's did not fit: draws_budget)
    silence_skipped_seconds: float = 0.0  # the latency catch-up: pauses shortened ...
    speech_compressed_seconds: float = 0.0  # ... and speech played faster (seconds of input) while behind
    catch_up_runs: int = 0  # ... in this many speed-ups
    idle_dropped_frames: int = 0  # ... and idle frames put in front of speech taken back (the start ran late)
    latency_ms_p50_by_session: list[float] = field(default_factory=list)  # each session's own p50: a spread
    # here is where each session settled; a p95 far above every session's p50 is stretches, not sessions ...
    latency_ms_p95_after_start: float | None = None  # ... such as the start: the p95 from STEADY_AFTER_S on
    # what the latency was steered to (StreamEngine.target_latency_s) and the window compute in it (start of a
    # batch window -> frames delivered, the engine's running average at the run's end): p50 sits near the first
    target_latency_ms: float | None = None
    window_compute_ms: float | None = None
    # the A/V offset's distribution, when its maximum happened (seconds into the run) and the largest offset of
    # each minute: a drift grows minute by minute, a stall of the event loop is one spike
    av_offset_ms_p50: float | None = None
    av_offset_ms_p99: float | None = None
    av_offset_max_at_s: float | None = None
    av_offset_ms_by_minute: list[float] = field(default_factory=list)
    # the worker's threads at the end, and the seconds into the run it lowered them (windows fell behind real time:
    # another process wants the cores; EngineConfig.threads_lower_after)
    threads_end: int | None = None
    threads_lowered_at_s: list[float] = field(default_factory=list)
    threads_raised_at_s: list[float] = field(default_factory=list)  # ... and went back up (threads_raise_after_s)
    draws_lowered_at_s: list[float] = field(default_factory=list)  # ... and the noise draws went down to 1 (before
    # the threads: EngineConfig.threads_lower_after)
    draws_raised_at_s: list[float] = field(default_factory=list)  # ... and back to the model's (threads_raise_after_s)
    # what an hours-long soak must show flat: each minute's latency p95 (frames shown in that minute of playback) and
    # the process's resident memory at the end of each minute (and of the run); a leak or a slow creep grows here
    latency_ms_p95_by_minute: list[float] = field(default_factory=list)
    rss_mb_by_minute: list[float] = field(default_factory=list)
    held_frames_by_minute: list[int] = field(default_factory=list)  # held frames by minute of playback: a start's
    # burst, a try of more threads, a slow spell of the machine each show where they fell
    # --webrtc: each session's figures at its receiving peer (bench_webrtc.summary): frame pacing, lip-to-sound offset,
    # speech to sound, lip sync of what arrived; the engine's own figures above are the same as without
    webrtc: list[dict] = field(default_factory=list)
    # --record: every session recorded as it streamed (Session.record); what the files hold, per minute of a session
    recorded_mb_per_minute: float | None = None
    recordings_failed: list[str] = field(default_factory=list)
    # the process's event loop and garbage collector (LoopWatch): each minute's largest lateness of the loop and
    # longest collection, each full collection's [seconds into the run, ms], and the objects the engine froze at
    # start (EngineConfig.freeze_gc; 0: none); with --webrtc the server, the engine and the peers share the loop
    # (with --peer-process, the peers have their own)
    loop_lag_ms_by_minute: list[float] = field(default_factory=list)
    gc_pause_ms_by_minute: list[float] = field(default_factory=list)
    gc_full_collections: list[list[float]] = field(default_factory=list)
    gc_frozen_objects: int = 0
    realtime: bool = field(init=False)

    def __post_init__(self) -> None:  # speech is fed throughout: a run that showed none of it is not real time
        ok_latency = self.latency_ms_p95 is not None and self.latency_ms_p95 < 1000
        self.realtime = self.realtime_factor >= 0.99 and ok_latency and self.first_frame_ms_max is not None


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_now_mb() -> float | None:
    """This process's resident memory now (Linux's /proc; None elsewhere: only the peak is known there)."""
    from .stream.engine import resident_memory_bytes

    return None if (now := resident_memory_bytes()) is None else now / 2**20


async def _sample_rss(out: list[float]) -> None:
    """Append the resident memory every RSS_EVERY_S until cancelled."""
    while True:
        await asyncio.sleep(RSS_EVERY_S)
        rss = _rss_now_mb()
        if rss is not None:
            out.append(round(rss, 1))


class LoopWatch:
    """How late this process's event loop gets round to things and how long the garbage collector held it, minute by
    minute, while open (`async with LoopWatch() as watch`): a task asks to wake every LAG_EVERY_S and notes how much
    later it woke; gc.callbacks time every collection, in whichever thread it ran (it holds the GIL for all of them).
    Kept per minute, so an hours-long soak stays flat."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.lag_ms: dict[int, float] = {}  # minute -> the loop's largest lateness in it
        self.gc_ms: dict[int, float] = {}  # minute -> the longest collection in it
        self.full: list[list[float]] = []  # [seconds into the run, ms] of each full (generation 2) collection
        self._gc_started = 0.0
        self._task: asyncio.Task | None = None

    def _note(self, into: dict[int, float], at: float, ms: float) -> None:
        minute = int((at - self.t0) // 60)
        into[minute] = max(into.get(minute, 0.0), ms)

    def _collection(self, phase: str, info: dict) -> None:
        now = time.monotonic()
        if phase == "start":
            self._gc_started = now
            return
        ms = (now - self._gc_started) * 1000
        self._note(self.gc_ms, now, ms)
        if info["generation"] == 2:
            self.full.append([round(now - self.t0, 1), round(ms, 1)])

    async def _watch(self) -> None:
        while True:
            due = time.monotonic() + LAG_EVERY_S
            await asyncio.sleep(LAG_EVERY_S)
            now = time.monotonic()
            self._note(self.lag_ms, now, (now - due) * 1000)

    async def __aenter__(self) -> "LoopWatch":
        gc.callbacks.append(self._collection)
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc) -> None:
        gc.callbacks.remove(self._collection)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def figures(self) -> dict:
        """RunResult's loop and collector fields (minutes without a collection: 0)."""
        minutes = range(max([*self.lag_ms, *self.gc_ms], default=-1) + 1)
        return {"loop_lag_ms_by_minute": [round(self.lag_ms.get(m, 0.0), 1) for m in minutes],
                "gc_pause_ms_by_minute": [round(self.gc_ms.get(m, 0.0), 1) for m in minutes],
                "gc_full_collections": list(self.full), "gc_frozen_objects": gc.get_freeze_count()}


class Marks:
    """Pairs of numbers a run notes as it goes (a media time and its arrival, a level and when ...), kept in one flat
    array of doubles: 16 bytes a pair and no Python object for the collector to walk. A list of (float, float)
    tuples costs ~110 bytes a pair: a `--webrtc` soak's ~350 pairs a second were 1.4 MB a minute of the bench's own
    growth and the objects its full collections walked (docs/benchmarks.md). `np.asarray(marks)`: (n, 2) float64,
    as of a list of pairs."""

    def __init__(self) -> None:
        self._flat = array.array("d")

    def append(self, pair: tuple[float, float]) -> None:
        self._flat.extend(pair)

    def extend_columns(self, first: np.ndarray, second: np.ndarray) -> None:
        """Many pairs at once: first[i], second[i]."""
        self._flat.frombytes(np.stack([first, second], -1).astype(np.float64).tobytes())

    def __len__(self) -> int:
        return len(self._flat) // 2

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.frombuffer(self._flat, np.float64).reshape(-1, 2).copy()  # a copy: the array may grow on
        return out if dtype is None else out.astype(dtype)


def pairs(values) -> tuple[np.ndarray, np.ndarray]:
    """`Marks` or a sequence of pairs -> its two columns (float arrays)."""
    a = np.asarray(values, np.float64).reshape(-1, 2)
    return a[:, 0], a[:, 1]


def by_minute(values: np.ndarray, at_s: np.ndarray, reduce) -> list[float]:
    """`reduce` of the values that fell in each minute (at_s: seconds), minute by minute, rounded."""
    minutes = (at_s // 60).astype(int)
    return [round(float(reduce(values[minutes == m])), 1) for m in np.unique(minutes)]


async def _consume(session, seconds: float, offsets: Marks) -> None:
    """Read both tracks like aiortc's senders; for every generated frame, record how far apart the video track
    released its picture and the audio track the first 20 ms of its own speech (ms), with when (seconds since
    the session's clock started).

    Keyed by content (the frame each track was served for a tick, `AVFrame.index`), not by the tracks' own
    timestamps: a track that served another frame's audio, or a clock that drifted, both show up. Held frames
    (fillers) are left out: they have no speech of their own."""
    video, audio = session.video_track(), session.audio_track()
    first: dict[str, dict[int, float]] = {"video": {}, "audio": {}}  # frame index -> when it first left, unpaired

    def left(kind: str, index: int | None, now: float) -> None:
        other = first["audio" if kind == "video" else "video"]
        if index is None or index in first[kind]:
            return
        if index in other:  # both sides seen: one offset, and nothing kept (a 30-minute soak stays flat)
            t = other.pop(index)
            offsets.append((abs(now - t) * 1000, min(now, t) - session.player.start))  # started: a frame left
        else:
            first[kind][index] = now

    async def read_video():
        while True:
            await video.recv()
            left("video", video.last_index, time.monotonic())

    async def read_audio():
        while True:
            f = await audio.recv()
            if int(f.pts // 320) % 2 == 0:  # a frame's first 20 ms packet
                left("audio", audio.last_index, time.monotonic())

    tasks = [asyncio.create_task(read_video()), asyncio.create_task(read_audio())]
    try:
        await asyncio.sleep(seconds)
    finally:
        for t in tasks:
            t.cancel()
        video.stop()
        audio.stop()


def _percentile_ms(values: list[float], q: float) -> float | None:
    """The q-quantile of sorted seconds, in ms (nearest rank, as Session.stats reads its own), or None."""
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1) if values else None


def offset_summary(offsets: Marks) -> dict:
    """(ms, seconds) pairs -> the RunResult's A/V offset fields."""
    if not len(offsets):
        return {"av_offset_ms_max": None}
    ms, at = pairs(offsets)
    return {
        "av_offset_ms_max": round(float(ms.max()), 1),
        "av_offset_ms_p50": round(float(np.percentile(ms, 50)), 1),
        "av_offset_ms_p99": round(float(np.percentile(ms, 99)), 1),
        "av_offset_max_at_s": round(float(at[ms.argmax()]), 1),
        "av_offset_ms_by_minute": by_minute(ms, at, np.max),
    }


async def _feed(session, audio: np.ndarray, seconds: float) -> None:
    """Real-time speech with pauses: 20 ms chunks on an absolute schedule, looping the clip."""
    chunk = 320
    start = time.monotonic()
    total = int(seconds * 16000)
    for i, pos in enumerate(range(0, total, chunk)):
        delay = start + i * chunk / 16000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if session.closed:
            return
        j = pos % len(audio)
        session.push_audio(audio[j:j + chunk])


async def run_sessions(pipe: LetsTalkPipeline, n: int, seconds: float, audio: np.ndarray, portrait,
                       live: dict | None = None, seed: int = 0, webrtc: bool = False,
                       peer_process: bool = False, full_frame: int = 0, record: bool = False, loss: float = 0.0
                       ) -> RunResult:
    """n sessions for `seconds` (noise seeds seed, seed + 1, ...); `live`: EngineConfig fields (window, max_steps,
    catch_up_tempo ...). `webrtc`: each session through the server and a real WebRTC peer instead (bench_webrtc; the
    server's default avatar, its own seeds); `peer_process`: those peers in a process of their own. `full_frame`: the
    sessions' frames the whole photo, fit to this many px (0: the face crop). `record`: each session recorded to an
    MP4 as it streams (in-process sessions only), the files deleted after. `loss`: with `webrtc`, the fraction of RTP
    packets every receiver loses (bench_webrtc.lossy_receivers)."""
    from .stream import EngineConfig, StreamEngine

    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    # every frame's latency, not a server's last 10000 (400 s): soaks run 30 minutes
    config = EngineConfig(max_sessions=n, max_batch=n, latency_history=0, **(live or {}))
    engine = await StreamEngine(pipe, config).start()
    steps, draws = pipe.num_steps, pipe.noise_draws  # what warm-up chose
    threads = engine.threads or torch.get_num_threads()
    offsets = Marks()
    received: list[dict] = []
    rss: list[float] = []
    sampler = asyncio.create_task(_sample_rss(rss))
    t0 = time.monotonic()
    try:
        async with LoopWatch() as watch:
            if webrtc:
                from .bench_webrtc import stream

                sessions, received = await stream(engine, n, seconds, audio, peer_process, full_frame, loss)
            else:
                sessions = [await engine.open_session(portrait, seed=seed + i, full_frame=full_frame) for i in range(n)]
                if record:
                    folder = tempfile.TemporaryDirectory(prefix="letstalk-bench-")
                    for i, s in enumerate(sessions):
                        s.record(Path(folder.name) / f"{i}.mp4")
                await asyncio.gather(*[_feed(s, audio, seconds) for s in sessions],
                                     *[_consume(s, seconds, offsets) for s in sessions])
                if record:
                    recorded, failed = await _stop_recordings(sessions)
                    folder.cleanup()
    finally:
        sampler.cancel()
    took = time.monotonic() - t0
    if (end := _rss_now_mb()) is not None:
        rss.append(round(end, 1))
    stats = [s.stats() for s in sessions]
    lat = sorted(x for s in sessions for x in s.latencies)
    pct = lambda q: _percentile_ms(lat, q)  # noqa: E731
    steady = [x for s in sessions for x, t in zip(s.latencies, s.latency_ticks) if t >= STEADY_AFTER_S * pipe.fps]
    shown_at = np.array([t / pipe.fps for s in sessions for t in s.latency_ticks])  # playback seconds, by frame
    p95_by_minute = by_minute(np.array([x * 1000 for s in sessions for x in s.latencies]), shown_at,
                              lambda v: np.percentile(v, 95))  # [] for a run that showed no frame
    generated = sum(st["frames_generated"] for st in stats)
    # frames the clock asked for: from each session's first frame on (the wait for it is first_frame), and
    # the whole run for a session that never showed one (its first window outlasted the run)
    needed = sum(s.player.tick if s.player.start is not None else round(took * pipe.fps) for s in sessions) or 1
    first = [st["first_frame_s"] for st in stats]
    held = sum(st["fillers"] for st in stats)
    held_by_minute = sum((s.player.fillers_by_minute for s in sessions), collections.Counter())
    # the real-time factor: of the ticks the clock asked for, those that showed a generated frame on time (not
    # frames generated: up to 1.5 windows queued and a window in flight at the end were never shown, +2 % in 20 s)
    shown = sum(s.player.tick - st["fillers"] for s, st in zip(sessions, stats) if s.player.start is not None)
    dropped = sum(v for st in stats for k, v in st["dropped"].items() if k != "late")
    target_ms, compute_ms = engine.target_latency_s() * 1000, engine.window_compute_ms()
    threads_end = engine.threads or torch.get_num_threads()
    lowered = [round(at - t0, 1) for at, _, _ in engine.threads_lowered]
    draws_lowered = [round(at - t0, 1) for at in engine.draws_lowered]
    draws_raised = [round(at - t0, 1) for at in engine.draws_raised]
    raised = [round(at - t0, 1) for at, _, _ in engine.threads_raised]
    await engine.stop()
    cuda = torch.cuda.max_memory_allocated(pipe.device) / 2**20 if pipe.device.type == "cuda" else None
    return RunResult(
        sessions=n, seconds=round(took, 1), fps_generated=round(generated / took, 1),
        realtime_factor=round(shown / needed, 3),
        first_frame_ms_max=None if None in first else round(max(first) * 1000, 1),
        latency_ms_p50=pct(0.5), latency_ms_p95=pct(0.95), latency_ms_p99=pct(0.99),
        held_frames=held,
        gap_seconds=round(sum(st["gap_inserted_s"] for st in stats), 3), dropped_frames=dropped,
        peak_rss_mb=round(_rss_mb(), 1), peak_cuda_mb=None if cuda is None else round(cuda, 1), steps=steps,
        threads=threads, noise_draws=draws,
        silence_skipped_seconds=round(sum(st["silence_skipped_s"] for st in stats), 2),
        speech_compressed_seconds=round(sum(st["speech_compressed_s"] for st in stats), 2),
        catch_up_runs=sum(st["catch_up_runs"] for st in stats),
        idle_dropped_frames=sum(st["idle_dropped"] for st in stats),
        latency_ms_p50_by_session=[round(st["latency_ms_p50"], 1) for st in stats if st["latency_ms_p50"] is not None],
        latency_ms_p95_after_start=_percentile_ms(sorted(steady), 0.95),
        target_latency_ms=round(target_ms, 1), window_compute_ms=round(compute_ms, 1), **offset_summary(offsets),
        threads_end=threads_end, threads_lowered_at_s=lowered, threads_raised_at_s=raised,
        draws_lowered_at_s=draws_lowered, draws_raised_at_s=draws_raised,
        latency_ms_p95_by_minute=p95_by_minute, rss_mb_by_minute=rss,
        held_frames_by_minute=[held_by_minute[m] for m in range(max(held_by_minute, default=-1) + 1)],
        webrtc=received, **watch.figures(),
        **({"recorded_mb_per_minute": recorded, "recordings_failed": failed} if record else {}),
    )


async def _stop_recordings(sessions) -> tuple[float | None, list[str]]:
    """Save every session's recording: (MB per minute of recording, the errors of those not saved)."""
    size, seconds, failed = 0, 0.0, []
    for s in sessions:
        recording = s.recording or s.last_recording
        try:
            size += (await s.stop_recording()).stat().st_size
            seconds += recording.seconds
        except LetsTalkError as e:
            failed.append(str(e))
    return (round(size / 2**20 / (seconds / 60), 2) if seconds else None), failed


def recording_ms(size: tuple[int, int], fps: int = 25, sample_rate: int = 16000, frames: int = 100) -> float:
    """Milliseconds to encode one tick of a recording (`Session.record`: H.264 veryfast + AAC) of frames `size`
    (width, height), on the calling thread: frames of noise, a little different each (harder to encode than a talking
    face: an upper bound)."""
    from .media import VideoWriter

    width, height = size
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height, width, 3)).astype(np.int16)
    pictures = [np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8) for _ in range(8)]
    sound = rng.normal(0, 0.1, sample_rate // fps).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="letstalk-bench-") as folder:
        writer = VideoWriter(Path(folder) / "cost.mp4", (width, height), fps, sample_rate, crf=23, preset="veryfast")
        start = time.perf_counter()
        for i in range(frames):
            writer.write_frame(pictures[i % len(pictures)])
            writer.write_audio(sound)
        writer.close()
        return round((time.perf_counter() - start) / frames * 1000, 2)


def full_frame_ms(pipe: LetsTalkPipeline, portrait, side: int, frames: int = 50) -> float:
    """Milliseconds to paste one frame of `portrait` back into its photo fit to `side` (`LetsTalkPipeline.full_frame`,
    the photo's detail gated in), on the calling thread: the portrait's crop with noise, so the gate has work to do."""
    paste = pipe.full_frame(portrait, side)
    rng = np.random.default_rng(0)
    crops = [np.clip(portrait.image + rng.normal(0, 8, portrait.image.shape), 0, 255).astype(np.uint8) for _ in range(8)]
    paste(crops[0])
    start = time.perf_counter()
    for i in range(frames):
        paste(crops[i % len(crops)])
    return round((time.perf_counter() - start) / frames * 1000, 2)


def window_breakdown(pipe: LetsTalkPipeline, batch: int = 1, repeats: int = 5, window: int = 0) -> dict:
    """Milliseconds of one window (batch sessions, `window` frames, 0: the model's) split into audio encode,
    each step, decode."""
    from .pipeline import Portrait

    cfg = pipe.config
    T = window or pipe.window
    sync = (lambda: torch.cuda.synchronize(pipe.device)) if pipe.device.type == "cuda" else (lambda: None)
    wav = np.random.default_rng(0).standard_normal(T * cfg.audio.samples_per_frame).astype(np.float32) * 0.1
    latent = torch.zeros(cfg.transformer.latent_channels, cfg.autoencoder.latent_size, cfg.autoencoder.latent_size,
                         device=pipe.device)
    portrait = Portrait(image=np.zeros((cfg.image_size,) * 2 + (3,), np.uint8), latent=latent)
    tokens = pipe.audio_tokens(wav)[:T]
    streams = [pipe.new_stream(portrait, seed=i) for i in range(batch)]
    results: dict[str, list[float]] = {"audio_encode": [], "decode": []}
    for rep in range(repeats + 1):
        sync()
        t = time.perf_counter()
        tok = pipe.audio_tokenizer(live=True)
        tok.push(wav)
        tok.flush()
        sync()
        results["audio_encode"].append((time.perf_counter() - t) * 1000)
        marks: list[float] = []
        orig = pipe.sampler.step

        def marked(*a, **k):  # each sampling step ends in the sampler's update (the network stays untouched:
            sync()  # patching its forward would make a compiled model compile again)
            marks.append(time.perf_counter())
            return orig(*a, **k)

        pipe.sampler.step = marked  # type: ignore[method-assign]
        try:
            marks.append(time.perf_counter())
            lat = pipe.generate_latents(streams, [tokens] * batch)
        finally:
            del pipe.sampler.step
        step_times = [(b - a) * 1000 for a, b in itertools.pairwise(marks)]
        for i, ms in enumerate(step_times):
            results.setdefault(f"step_{i + 1}", []).append(ms)
        sync()
        t = time.perf_counter()
        pipe.decode(lat.flatten(0, 1), streams)  # with the detail transfer
        sync()
        results["decode"].append((time.perf_counter() - t) * 1000)
    out = {k: round(float(np.median(v[1:])), 2) for k, v in results.items()}  # first run is warm-up
    out["total"] = round(sum(out.values()), 2)
    out["frames"] = T * batch
    out["budget_ms"] = round(1000 * T / cfg.fps, 1)  # real time allows this much per window
    out["threads"] = torch.get_num_threads() if pipe.device.type == "cpu" else None
    if pipe.device.type == "cuda":
        out["cuda_graphs"] = pipe.cuda_graphs  # and what could not be captured (runs eagerly): {} = nothing
        out["graph_failures"] = pipe.graph_failures()
    return out


def transformer_flops(pipe: LetsTalkPipeline, batch: int = 1, window: int = 0) -> float:
    """Arithmetic of one transformer evaluation for a window (multiply-adds x 2), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = pipe.config
    T, tc = window or pipe.window, cfg.transformer
    dev = pipe.device
    x = torch.zeros(batch, T, tc.latent_channels, tc.latent_size, tc.latent_size, device=dev)
    args = (x, torch.ones(batch, device=dev), torch.zeros(batch, tc.latent_channels, tc.latent_size, tc.latent_size,
                                                             device=dev),
            torch.zeros(batch, T, tc.num_audio_tokens, tc.audio_token_dim, device=dev))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        pipe.transformer(*args)
    return float(counter.get_total_flops())


ARITHMETIC_KEYS = ("transformer_gflops_per_step", "transformer_tflops", "matmul_peak_tflops", "fraction_of_peak")


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """What this device reaches on one large square matrix product in `dtype` (TFLOP/s): the practical peak
    that a window's arithmetic is compared with (8192 on a GPU, 1024 on a CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    sync()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e12


def arithmetic_rate(pipe: LetsTalkPipeline, step_ms: float, window: int = 0) -> dict:
    """One sampling step's transformer arithmetic (every guidance row of every noise draw: one batched call) against
    the time the step took, and against this device's matrix-product peak in the model's dtype (issue 4's
    'fraction of the GPU's peak that one window's arithmetic reaches')."""
    rows = len(guidance_rows(pipe.portrait_guidance, pipe.audio_guidance)) * pipe.noise_draws
    flops = transformer_flops(pipe, window=window) * rows
    achieved = flops / (step_ms / 1000) / 1e12
    peak = matmul_peak_tflops(pipe.device, pipe.dtype)
    return {"transformer_gflops_per_step": round(flops / 1e9, 2), "transformer_tflops": round(achieved, 3),
            "matmul_peak_tflops": round(peak, 2), "fraction_of_peak": round(achieved / peak, 4)}


_SPIN = """
import os, sys, time
busy, period, parent = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
t0 = time.monotonic()
while os.getppid() == parent:  # the bench was killed (SIGKILL, OOM): stop, do not spin on for good
    phase = (time.monotonic() - t0) % period
    if phase < busy:
        end = time.monotonic() + 0.01
        while time.monotonic() < end:
            pass
    else:
        time.sleep(min(0.1, period - phase))
"""


def check_neighbours(n: int, busy: float, period: float) -> None:
    """LetsTalkError unless `--neighbours n --neighbour-duty busy/period` can run."""
    if n < 0 or not 0 < busy <= period:
        raise LetsTalkError(f"--neighbours {n} --neighbour-duty {busy:g}/{period:g}: give a count >= 0 and "
                            "0 < BUSY <= PERIOD seconds")


@contextlib.contextmanager
def busy_neighbours(n: int, busy: float = 30.0, period: float = 60.0):
    """n CPU-bound processes beside this one, each busy `busy` seconds of every `period`, busy first: a
    shared machine's noisy neighbours, reproducibly. They are killed when the block ends."""
    check_neighbours(n, busy, period)
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):  # inside the try: a failed start kills the ones already running
            procs.append(subprocess.Popen([sys.executable, "-c", _SPIN, str(busy), str(period), str(os.getpid())]))
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def machine() -> dict:
    info = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    try:
        import os

        info["cores"] = os.cpu_count()
    except Exception:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


SPREAD_FIELDS = ("realtime_factor", "first_frame_ms_max", "latency_ms_p50", "latency_ms_p95", "held_frames",
                 "gap_seconds")


def spread(results: list[RunResult]) -> dict:
    """Median, min and max of the figures that vary from run to run (a shared VM's speed does)."""
    out: dict = {"sessions": results[0].sessions, "repeats": len(results),
                 "realtime_all": all(r.realtime for r in results)}
    for name in SPREAD_FIELDS:
        values = [getattr(r, name) for r in results if getattr(r, name) is not None]
        if values:
            out[name] = {"median": round(float(np.median(values)), 3), "min": min(values), "max": max(values)}
    return out


def run_bench(pipe: LetsTalkPipeline, session_counts: list[int], seconds: float, audio: np.ndarray, portrait,
              json_path: Path | None = None, breakdown: bool = True, repeat: int = 1, live: dict | None = None,
              neighbours: tuple[int, float, float] = (0, 30.0, 60.0), seed: int = 0, webrtc: bool = False,
              peer_process: bool = False, full_frame: int = 0, record: bool = False, loss: float = 0.0) -> dict:
    """`live`: EngineConfig fields for every run (window, max_steps, catch_up_tempo ...). `neighbours`:
    (count, busy s, period s) of CPU-bound processes beside the engine for every run (busy_neighbours). `webrtc`:
    every session through the server and a real WebRTC peer (bench_webrtc); `peer_process`: the peers in a process of
    their own, not sharing the server's event loop (implies `webrtc`). `full_frame`: every session's frames the whole
    photo, fit to this many px (0: the face crop). `record`: every session recorded as it streams (not with webrtc).
    `loss`: with `webrtc`, the fraction of RTP packets every receiver loses, at random (a lossy link)."""
    webrtc = webrtc or peer_process
    with busy_neighbours(*neighbours):
        return _run_bench(pipe, session_counts, seconds, audio, portrait, json_path, breakdown, repeat,
                          live or {}, neighbours, seed, webrtc, peer_process, full_frame, record, loss)


def _run_bench(pipe, session_counts, seconds, audio, portrait, json_path, breakdown, repeat, live, neighbours,
               seed, webrtc, peer_process, full_frame, record, loss=0.0) -> dict:
    window = live.get("window", 0)
    report: dict = {"machine": machine(), "model": pipe.config.description or "untrained",
                    "device": str(pipe.device), "dtype": str(pipe.dtype).replace("torch.", ""),
                    "steps": pipe.num_steps, "noise_draws": pipe.noise_draws, "window": window or pipe.window,
                    "audio_lookahead": pipe.live_audio_lookahead,
                    "live": live,
                    "neighbours": dict(zip(("count", "busy_s", "period_s"), neighbours)), "webrtc": webrtc,
                    "peer_process": peer_process, "full_frame": full_frame, "record": record, "loss": loss,
                    "runs": [], "spread": [],
                    "complete": False}  # True once every run asked for is in

    def window_cost() -> None:
        report["window_ms"] = window_breakdown(pipe, window=window)
        if full_frame:
            report["window_ms"]["full_frame_per_frame"] = full_frame_ms(pipe, portrait, full_frame)
        if record:
            size = pipe.full_frame(portrait, full_frame).size if full_frame else (pipe.config.image_size,) * 2
            report["window_ms"]["record_per_frame"] = recording_ms(size, pipe.fps, pipe.config.audio.sample_rate)
        print("one window (ms):", json.dumps(report["window_ms"]))
        report.update(arithmetic_rate(pipe, report["window_ms"]["step_1"], window=window))
        print("one step's arithmetic:", json.dumps({k: report[k] for k in ARITHMETIC_KEYS}))

    def save() -> None:  # after every run: a run cut short (a timeout, no memory for more) keeps the ones before
        if json_path is not None:
            write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")

    if breakdown and not live.get("compile"):
        window_cost()
    try:
        for n in session_counts:
            results = []
            for _ in range(repeat):
                try:
                    result = asyncio.run(run_sessions(pipe, n, seconds, audio, portrait, live=live, seed=seed,
                                                      webrtc=webrtc, peer_process=peer_process, full_frame=full_frame,
                                                      record=record, loss=loss))
                except LetsTalkError as e:  # e.g. the GPU cannot hold this many sessions' batch
                    report["error"] = {"sessions": n, "message": str(e)}
                    save()
                    raise
                results.append(result)
                report["runs"].append(asdict(result))
                print(json.dumps(asdict(result)))
                save()  # every run: a repeat cut short (a timeout) keeps the ones before it
            if breakdown and "window_ms" not in report:  # --compile: the engine compiled one session's full window
                before = torch.get_num_threads()  # (at the torch threads it chose: the compiled kernels keep them)
                torch.set_num_threads(results[-1].threads)
                try:
                    window_cost()
                finally:
                    torch.set_num_threads(before)
            if repeat > 1:
                report["spread"].append(spread(results))
                print("spread:", json.dumps(report["spread"][-1]))
            save()
    except KeyboardInterrupt:  # Ctrl-C or a `kill`: the runs finished so far are in --json already
        if json_path is None or not report["runs"]:
            raise
        runs = len(report["runs"])
        raise Stopped(f"stopped during a run: --json {json_path} holds the {runs} run{'s' * (runs > 1)} finished "
                      'before it ("complete": false)') from None
    report["complete"] = True
    save()
    return report
