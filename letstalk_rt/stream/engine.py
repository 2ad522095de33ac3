"""The real-time engine: live audio in, paced and synchronized avatar frames out, many sessions per device.

Threads and ownership:

- the asyncio event loop owns every `Session`'s public API, its `Player` (the output clock and queue)
  and its events; it never runs the model;
- one worker thread per engine (= per device) owns the model: it moves each session's pushed PCM into
  that session's incremental audio tokenizer, decides which sessions need a window now, batches them
  into one forward pass (`LetsTalkPipeline.generate_latents`), decodes, and hands the frames back to the
  loop with `call_soon_threadsafe`;
- other torch work (warm-up, preparing a portrait) runs in executor threads through `run_off_loop`, which
  then lets the thread's OpenMP team go: on a CPU the worker's team must be the only one, or its helpers
  stop spinning between parallel regions (`release_openmp_threads`); on a GPU the engine's threads run one
  torch thread, so no team is left spinning on the cores the event loop needs (`_GPU_HOST_THREADS`).

Scheduling. A session needs a window when (a) it has audio tokens for a whole window, or (b) its
playback would run dry before a window could be generated (its deadline): then the engine inserts
silence, so the avatar keeps moving and never freezes. A session starts no window once
`lead_windows` windows of frames are generated and not yet shown, which bounds every queue (at most
that lead plus the window being made). The first window of a session, and the first after
an interrupt, is short (`first_window` frames) so the first frame shows quickly (not an unpaced session's: a
render's windows all have the live ones' length, so they can ride in their batches).

Latency. A window waits for its audio plus the encoder's lookahead, so the least latency that never
runs dry is about a window of frames + lookahead + one window's compute + safety
(`StreamEngine.target_latency_s`; the last frame of it is the frame grid's phase against the audio).
Anything that delays playback beyond that (the start-up, a late window, silence inserted at a
deadline) would otherwise stay for the rest of the session; idle frames put in front of speech and not
generated yet are taken back first, and the catch-up skips silent pushed audio inside pauses while the
session is behind (`EngineConfig.catch_up`), so it returns to the target. A slow
stretch of the machine in continuous speech leaves no pause to skip: then the speech itself is played
faster (`catch_up_tempo`, pitch kept) until the session is back near its target. How late a session
runs is counted exactly (`_behind_s`: the player's clock, then every queued frame of audio), so the
catch-up does not chase the saw-tooth that frames playing and tokens arriving in steps would draw; one
stretcher stream lasts until the next pause and goes back to tempo 1.0 in between, so a slow stretch
that adds lateness window after window is caught up without a break in the sound.

Sync. Each generated frame carries exactly the 640 samples it was conditioned on (`AVFrame`), and the
player releases frame i at `start + i / fps` on one absolute clock for both tracks, so the audio the
user hears is the audio the lips were made from, delayed to match them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import itertools
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..aio import wait_state
from ..diffusion import guidance_rows
from ..errors import InputError, LetsTalkError, OutputError
from ..framing import FRAMING, FullFrame
from ..broadcaster import LiveEncoding, LiveOutput
from ..media import TempoStretcher, check_live_url, float_pcm_problem, live_bitrate_kbps, redact_url
from ..pipeline import (DECODE_CHUNK, GRAPH_BUCKETS, AudioTokenizer, LetsTalkPipeline, Portrait, StreamState,
                        encode_features)
from ..tts import Speech
from .events import (
    AudioPlayed, AVFrame, Caption, EngineAdjusted, Event, FramesDropped, Interrupted, PlaybackPosition, SessionClosed, SessionError,
    SpeechStarted, SpeechStopped, WindowTimings,
)
from .motion import Motion, portrait_digest
from .recorder import Broadcast, BroadcastEncode, Recording

log = logging.getLogger(__name__)

_RAISE_WAIT_MAX_S = 1800.0  # EngineConfig.threads_raise_after_s doubles up to this
_NEAR_REAL_TIME = 0.7  # an eager CPU window over this fraction of its real-time duration: warm-up suggests --compile
_QUIET_AGAIN = 0.75  # a thread count whose warm-up window did not keep real time (a busy start) and whose last
_QUIET_WINDOWS = 10  # live windows' median is under this fraction of it: the machine has quietened (_quietened)
# Where no thread count fits threads_budget, more threads are taken only where their window costs under this fraction
# of fewer threads' (`_pick_threads`): a team on every core waits at each barrier for the member whatever else the
# process runs (the event loop, WebRTC, the decode thread) took its core from, so near a tie the fewer hold real time
# better (the 2-core EPYC without AVX-512 timed 1 and 2 threads at 1 draw within a few % of each other; through
# WebRTC the 2-thread windows then took ~200 ms, the 1-thread ones ~100).
_MORE_THREADS_GAIN = 0.85
# A warm-up timing whose every thread count's window costs over this many times what the caller throws it away over
# is not timed again in turns (`_time_thread_counts`): a slow burst on one count cannot bring the best under it
_CLEARLY_OVER = 1.5
_TRIAL_WINDOWS = 3  # a try of more threads (_raise_threads) or of the model's noise draws (at start, _raise_draws) is
# judged on its first this-many windows (_judge_try, _lower_draws)
# Torch threads of the engine's own threads on a GPU device (EngineConfig.threads = 0). Their host-side work is
# small tensors (audio windows, the memory bank, copies), and with one thread per core (16 on the lent H100's host)
# each such op woke an OpenMP team whose idle helpers then spun (GNU OpenMP spins while its teams do not outnumber
# the cores) and took the cores the event loop and the tracks need: 8 sessions fell to 0.955-0.988 of real time
# with 46-180 held frames; at 1 thread 1.000 and none (docs/benchmarks.md, twenty-eighth session).
_GPU_HOST_THREADS = 1


SHOWN_BYTES = 16 * 2**20  # a session keeps at most this much of the frames it showed last (Player.history)


MAX_BROADCASTS = 4  # live streams one session sends at once (each an encoder process: 7.5-9.5 % of a core at 128 px)
MAX_SAYING = 16  # say() calls a session holds not yet queued in full (each up to tts.MAX_TEXT characters)


class CapacityError(LetsTalkError):
    """The engine already runs its maximum number of sessions; retry later."""


class SessionClosedError(LetsTalkError):
    """The session was closed (by the application, an error, or the engine stopping)."""


class AudioBufferFull(LetsTalkError):
    """More audio was pushed than the session may queue ahead of playback."""


@dataclass
class EngineConfig:
    max_sessions: int = 8  # admission cap for this device (set it from `letstalk bench`)
    max_batch: int = 8  # sessions per forward pass
    hung_after_s: float = 120.0  # a window running this long is taken for a hung device (`StreamEngine.hung`)
    window: int = 0  # frames per window, 1..the model's num_frames (0: the pipeline's, i.e. the model's
    # sampling.stream_window unless the pipeline was built with another). Fewer frames cut the
    # speech-to-screen latency (a window waits for all its audio) but cost more compute per frame.
    first_window: int = 2  # frames of a paced session's first window and of the first after an interrupt
    lead_windows: float = 1.5  # generate at most this many windows ahead of playback
    safety_ms: float = 30.0  # start a deadline window this long before the estimated need
    max_pending_seconds: float = 30.0  # pushed audio not yet generated; more raises AudioBufferFull
    pace_restart_ms: float = 500.0  # audio pushed this much later than real-time pace from the previous pushes
    # starts a new pace (the pusher paused); a push later by less (a stalled event loop delivering a live
    # source's pieces in a burst) does not move the pace. See Session._pace.
    speech_rms: float = 0.01  # frame audio RMS above which it counts as speech (for events, the catch-up),
    # after the gain that raises quiet speech for the audio encoder (AudioConfig.level_min)
    speech_hangover_ms: float = 300.0  # silence needed before `speech_stopped`
    event_queue_size: int = 256  # per session; when full, the oldest event is dropped
    latency_history: int = 10000  # frames whose latency each session keeps for stats() (400 s); 0: all (a
    # benchmark's soak: 30 minutes are 45000 frames, 0.4 MB a session)
    late_skip_ms: float = 200.0  # a reader this far behind the clock skips ahead (frames dropped)
    # Latency catch-up. Start-up, underruns (held frames) and deadline silence each push playback later,
    # and nothing pulls it back: a session would keep its worst moment's latency for hours. So while a
    # session runs behind its target, silent pushed audio (RMS < speech_rms) is skipped before it is
    # encoded -- pauses get shorter, speech is never cut, lips and sound stay matched (both skip it).
    catch_up: bool = True
    catch_up_keep_ms: float = 200.0  # the first this-many ms of every pause are never skipped
    # Speech is not skipped, but while a session's speech runs more than `catch_up_speech_ms` behind its
    # target because the engine fell behind real time (a slow stretch of the machine, not audio pushed
    # ahead of time: that keeps its pace), it is played `catch_up_tempo` times faster (pitch kept: FFmpeg's
    # atempo, as WebRTC's jitter buffer accelerates speech), lips and sound alike, until it is back within
    # half that. Compressed speech cannot get that close at every tempo and window: the speed-up then stops
    # a little above as close as it can get, and starts that much higher too (_catch_up_thresholds_ms); the
    # next pause takes back the rest. Each second of speech needs 1 / tempo seconds of frames. 1.0: off.
    catch_up_tempo: float = 1.25
    catch_up_speech_ms: float = 100.0  # 200 left contended runs 100-200 ms late for good (docs/benchmarks.md)
    target_latency_ms: float = 0.0  # 0: auto = (window - 1) frames + encoder lookahead + window compute
    # + safety_ms + 1 frame, the least that never runs dry
    warmup: bool = True  # run the largest batch once at start: refuse to start if it cannot run
    max_steps: int = 0  # quality headroom: at warm-up, raise the sampling steps per window step by step up
    # to this many while a window of max_batch sessions still takes <= steps_budget of its real-time
    # duration (more steps: better lips from a distilled model, docs/eval.md); 0: the model's steps, fixed
    steps_budget: float = 0.5
    draws_budget: float = 0.7  # a model that averages several noise draws per window (sampling.noise_draws, a
    # network row each) keeps them while a window of max_batch sessions takes <= this fraction of its real-time
    # duration at warm-up, else samples one draw (half the transformer's work, a little more flicker): the 2-core
    # EPYC with AVX-512 runs the bundled model's 2 draws at ~0.65, slower CPUs fall back to 1; 0.75 until the
    # forty-fourth session, where the EPYC without AVX-512 kept them at 0.73-0.74 and ran late (docs/benchmarks.md)
    threads: int = 0  # torch intra-op threads on a CPU device. 0: auto, at warm-up: the fewest (1, 2, 4 ...)
    # whose window of max_batch sessions takes <= threads_budget of its real-time duration, else the cheapest (more
    # threads only where clearly cheaper: _MORE_THREADS_GAIN), a window's cost at 1 thread being its longer stage
    # where the decode overlaps (decode_thread), chosen again at 1 draw if the draws do not fit; lowered later if
    # windows fall behind real time (threads_lower_after), tried again later and kept only if their first windows
    # are faster; left alone where OMP_NUM_THREADS is set.
    # -1: never touch them. On a GPU device: the engine's own threads' count (worker, decoder, warm-up), 0: 1
    # (_GPU_HOST_THREADS) unless OMP_NUM_THREADS is set. On a quiet 2-core EPYC 2 threads' live window took 49-79 ms and 1
    # thread's ~100-107 (p95 360-420 against ~500 ms); beside 2 busy processes 1 thread held 0.97-0.99 of real
    # time where 2 fell to 0.57-0.86 (a parallel region waits for its slowest thread). The budget was 0.55 while
    # a second OpenMP team slowed 2 threads down (release_openmp_threads), and 1 thread then fitted there about
    # half the time; at 0.35 it is kept where it is fast (docs/benchmarks.md, twenty-seventh session).
    threads_budget: float = 0.35
    threads_lower_after: float = 2.0  # auto threads (threads = 0, not compiled, not on a GPU): once the worker's full
    # windows have fallen this many windows' duration behind real time (each window adds what it took over its
    # duration; faster ones pay it back), it goes on with the next count down whose warm-up window kept real time
    # (2 -> 1 on 2 cores), until threads_raise_after_s (a restart keeps the count). A process that starts later
    # and wants the cores makes multi-threaded windows slower than real time on average (2 threads beside 2 busy
    # processes: 0.57-0.80 of real time, where 1 thread held 0.97-0.99; docs/benchmarks.md). 0: never.
    threads_raise_after_s: float = 60.0  # lowered threads go up a count after this long, and on (the process that
    # took the cores may have ended); a raise that is lowered again within the wait doubles it (up to 30 minutes),
    # so a lasting neighbour costs a probe of a few windows' lateness ever more rarely. Noise draws lowered (at
    # warm-up or live) go back to the model's the same way, once no thread count waits to and the last windows say
    # they would fit draws_budget. A warm-up so busy that no count kept real time tries the next count up once the
    # live windows say the machine has quietened (_QUIET_AGAIN). 0: never raised again.
    keep_heap: bool = True  # at start, make glibc keep freed memory for reuse (`keep_heap`): a window's
    # activations are reallocated every window, and returned to the kernel they are faulted in again
    trim_heap_every_s: float = 60.0  # while running, hand the freed memory glibc holds back to the kernel this often
    # (`trim_heap`, in a thread off the event loop; 4-20 ms there on the 2-core CPU). Through WebRTC it held 20-30 MB
    # freed at any time and more each minute: trimmed each minute, a 10-minute stream's process was 35-45 MB smaller
    # and grew 0.8 MB a minute instead of 1.0, half of that the bench's own records (docs/benchmarks.md). What a
    # window reuses is faulted in again once a minute. 0: never.
    decode_thread: bool | None = None  # decode each window in a second thread while the worker samples the
    # next, so the two stages overlap. None: on a GPU always (the decode's launches and copies overlap the next
    # window's); on a CPU of 2+ cores while the engine runs 1 torch thread (chosen, lowered or given), each stage on
    # a core of its own. On 2 cores the stages fight over the cores when torch uses both per op (measured no better,
    # often worse, than decoding in the worker), but at 1 thread each has no OpenMP barrier to wait at: through
    # WebRTC on the 2-core EPYC without AVX-512, 0.98 of real time instead of 0.92 (docs/benchmarks.md).
    # True: always; False: never (the worker decodes).
    freeze_gc: bool = True  # at start, after warm-up: collect once and move everything the process holds into the
    # garbage collector's permanent generation (`freeze_collector`), so its full collections never walk the imports
    # and the model again (~180 ms with the GIL held, every ~19 minutes of streaming on the 2-core CPU)
    compile: bool = False  # torch.compile the transformer and the decoder at warm-up, for a full window of 1
    # and of max_batch sessions (other shapes, e.g. the short first window, run eagerly): about half the
    # compute per window on a 2-core CPU, after a compile of ~2-4 minutes per shape there the first time
    # (torch caches it on disk: later starts are faster). Needs a C++ compiler (CPU) and warmup on.


def keep_heap(mmap_threshold_mb: int = 64, trim_threshold_mb: int = 256) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc serves blocks over 128 KiB (raised adaptively, up to 32 MiB) with fresh mmaps and
    trims the heap's free top, so the MB-sized tensors a window allocates and frees come back as new pages
    that the kernel zeroes and faults in one by one, window after window. With larger blocks kept in the
    heap they are reused: on the 2-core CPU a 30 s benchmark of the default model took 135-145 k instead of
    0.37-1.5 M page faults and 2.8 instead of 3.5-7.6 s of kernel time (docs/benchmarks.md). The price is that
    up to `trim_threshold_mb` of freed memory stays mapped to the process. Process-wide, once; a no-op
    (False) where the C library is not glibc. Environment variables `MALLOC_MMAP_THRESHOLD_` /
    `MALLOC_TRIM_THRESHOLD_`, where set, win.
    """
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold_mb << 20) and mallopt(M_TRIM_THRESHOLD, trim_threshold_mb << 20))


def trim_heap() -> bool:
    """Hand the memory glibc's malloc holds freed (in every arena: `keep_heap` keeps it for reuse, and holes between
    live blocks it never gives back) to the kernel: malloc_trim(0). -> whether any went back; False where the C
    library is not glibc. It releases the GIL; the malloc calls of other threads may wait for an arena it walks.
    Through WebRTC on the 2-core CPU, once a minute, it handed 20-30 MB back each time (docs/benchmarks.md)."""
    trim = _glibc("malloc_trim")
    return bool(trim(0)) if trim is not None else False


def resident_memory_bytes() -> int | None:
    """This process's resident memory now (Linux's /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@functools.lru_cache(maxsize=None)
def _glibc(name: str):
    """glibc's function `name` (ctypes), or None where the C library has none (macOS, Windows, musl)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


_TRACED_SESSIONS = 2  # on a CPU, batches of up to this many sessions run from traces (StreamEngine._trace)


def freeze_collector() -> int:
    """Collect cyclic garbage once, then move every object this process holds into the garbage collector's permanent
    generation (gc.freeze): its full collections walk only what is created later. -> the objects frozen.

    Importing torch, transformers, aiortc and the server leaves ~200 k objects the collector tracks (~340 k with the
    model loaded), and a full collection walks all of them: 180-220 ms on the 2-core CPU, holding the GIL, so the
    event loop (the tracks' pacing, every peer's packets) and the worker stand still. One comes whenever the objects
    that survived into the oldest generation since the last reach a quarter of it: every ~19 minutes of streaming,
    the 90-minute WebRTC soak's five stalls of 160-250 ms (docs/benchmarks.md). Frozen, a full collection walks only
    what was made later (0.01 ms instead of 183 on the same heap). The price: a frozen object that later becomes part
    of a reference cycle no one holds is never freed (one that just loses its last reference is, as always);
    gc.unfreeze() gives them back. Process-wide: the engine does it at start (EngineConfig.freeze_gc)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@functools.lru_cache(maxsize=1)
def _gnu_openmp() -> tuple[ctypes.CDLL, ...]:
    """The GNU OpenMP runtimes loaded in this process (torch's Linux wheels bundle one), which can free a
    thread's team; none elsewhere (macOS, Windows, LLVM or Intel OpenMP: there a hard pause ends the whole
    runtime, every thread's team at once)."""
    try:
        maps = Path("/proc/self/maps").read_bytes().decode(errors="surrogateescape")
    except OSError:
        return ()
    libs = []
    for path in sorted(set(re.findall(r"(/\S*/libgomp[^/\s]*\.so[^/\s]*)", maps))):
        try:  # only a library already loaded (RTLD_NOLOAD): never a second copy of the runtime
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            lib.omp_pause_resource_all.argtypes, lib.omp_pause_resource_all.restype = [ctypes.c_int], ctypes.c_int
        except (OSError, AttributeError):  # gone, or older than OpenMP 5 (GCC 9)
            continue
        if not hasattr(lib, "__kmpc_fork_call"):  # LLVM's runtime under GNU's name: its pause ends every team
            libs.append(lib)
    return tuple(libs)


def release_openmp_threads() -> bool:
    """Let go of the OpenMP worker threads that the calling thread's multi-threaded torch ops started.

    Each thread that runs a parallel region keeps a team of its own, idle until that thread ends. GNU OpenMP
    counts every team's threads, and once they outnumber the CPUs it stops letting idle workers spin
    between parallel regions: they sleep, and each region waits for them to wake. A window is thousands of
    small regions, so on a 2-core CPU one more team (the thread that loaded the model, or one that prepared a
    portrait) made the worker's sampling 45 -> 75-85 ms a window (docs/benchmarks.md, twenty-seventh session).
    So the engine runs torch on other threads through `run_off_loop`, which releases the team after, and
    releases the starting thread's at `StreamEngine.start`. The next multi-threaded op starts a team again.
    False where this cannot be done (no GNU OpenMP runtime; see `_gnu_openmp`)."""
    libs = _gnu_openmp()
    return bool(libs) and all(lib.omp_pause_resource_all(2) == 0 for lib in libs)  # 2: omp_pause_hard


async def run_off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """`await asyncio.to_thread(fn, *args)` for torch work beside a running engine: the executor's thread lets
    its OpenMP team go when done (`release_openmp_threads`), so the engine's worker keeps the cores' only one."""
    def call() -> Any:
        try:
            return fn(*args)
        finally:
            release_openmp_threads()

    return await asyncio.to_thread(call)


def graph_sessions(most: int, rows: int) -> list[int]:
    """Session counts whose windows fill every CUDA graph bucket that up to `most` sessions of `rows` transformer
    rows each (a row per noise draw and guidance row) can reach: 3 sessions at 2 rows are 6, padded to the bucket
    of 8 that 4 sessions capture; 6 sessions fill the bucket of 12."""
    return sorted({max(1, b // rows) for b in GRAPH_BUCKETS if b < most * rows} | {most})


def quantiles(values: Iterable[float], qs: Sequence[float]) -> list[float] | None:
    """The `qs` quantiles of `values` as the sorted list's entry at int(q x n) (none past the last), by partial sorts
    (O(n)): None where there are none. `Session.stats()` and the server's metrics read the sessions' kept latencies
    with it; sorting them in Python cost the event loop 1.5 ms per 10000 on the 2-core CPU, and the server's watchdog
    asked for them every second (a benchmark keeping every frame's: 11 ms after 30 minutes, 38 after 90)."""
    a = np.fromiter(values, np.float64)
    if not len(a):
        return None
    ks = [min(len(a) - 1, int(q * len(a))) for q in qs]
    part = np.partition(a, ks)
    return [float(part[k]) for k in ks]


def _post(s: "Session", fn: Callable[..., Any], *args: Any) -> None:
    """Run fn(*args) on the session's event loop (from a worker thread); nothing if that loop has closed (the
    application exited without closing its sessions): a worker thread must outlive any one loop."""
    try:
        s.loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # "Event loop is closed"
        log.debug("session %s: its event loop is closed", s.id)


# --------------------------------------------------------------------------------------------------
# Player: the output clock of one session (event loop side)
# --------------------------------------------------------------------------------------------------


UNPACED_BACKOFF_S = 5.0  # unpaced sessions get no window of their own this long after a paced one held a frame
# ... nor while the paced sessions' windows took more than this share of the worker's last LOAD_SPAN_S: on a CPU half
# as much, where each window's decoding, the streams' video encoders and the event loop share the worker's cores
UNPACED_LOAD = {"cuda": 0.5, "cpu": 0.25}
UNPACED_MAX_WAIT_S = 2.0  # ... yet one that waited this long for room goes anyway: a render beside live sessions
# that leave none (a device past what it holds) goes slowly, never not at all (`StreamEngine._pick`)
LOAD_SPAN_S = 2.0
FILLER_FADE = 80  # samples (5 ms at 16 kHz) a held tick's audio takes to fade out what was playing, and the
# speech after it to fade back in (`restart_ramp`)


def restart_ramp(n: int) -> np.ndarray:
    """(n,) float32 gains rising to (not reaching) 1: the first n samples of the speech after a held tick, which
    restarts from silence. Never 0, so what the speech was is known from what played (`unfaded_audio`)."""
    return np.arange(1, n + 1, dtype=np.float32) / np.float32(n + 1)


def _faded_in(frame: AVFrame) -> AVFrame:
    """`frame`, the first after a held tick, with its first `FILLER_FADE` samples faded in from silence."""
    n = min(FILLER_FADE, len(frame.audio))
    if not frame.audio[:n].any():
        return frame
    audio = frame.audio.copy()
    audio[:n] *= restart_ramp(n)
    return dataclasses.replace(frame, audio=audio, faded_in=True)


def unfaded_audio(frame: AVFrame) -> np.ndarray:
    """`frame`'s audio as it was given to the session, for a reader that leaves held ticks out (their silence, and so
    the fade back in from it, is not in what it plays): the first after a held tick has its fade-in undone, to a float
    rounding."""
    if not frame.faded_in:
        return frame.audio
    n = min(FILLER_FADE, len(frame.audio))
    audio = frame.audio.copy()
    audio[:n] /= restart_ramp(n)
    return audio


class Player:
    """Releases frame i at `start + i / fps`; both tracks and `Session.frames()` read from it.

    The clock starts at the first read once a frame exists. A tick whose frame is not ready shows a
    filler (the last frame held; its audio the sound before it faded out in 5 ms, then silence), so the output never
    stalls; later frames shift by one, the first of them with its first 5 ms faded in (the speech restarts from the
    held tick's silence: without it, it would jump to whatever sample it had, a click).

    Unpaced (`Session.unpace`, a video made for a file): no clock. Frame i is released as soon as it is generated,
    never a filler; the engine makes such a session's windows whenever the paced sessions leave it the time.
    """

    def __init__(self, session: "Session", fps: int, samples_per_frame: int, keep_latents: int,
                 history: int = 100) -> None:
        self.session = session
        self.fps = fps
        self.history = history  # shown ticks kept (readers ask at most `late_skip_ms` behind the clock)
        self.samples_per_frame = samples_per_frame
        self.queue: collections.deque[AVFrame] = collections.deque()  # generated, not yet shown
        self.start: float | None = None  # monotonic time of tick 0
        self.tick = 0  # next tick to materialise
        self.shown: collections.OrderedDict[int, AVFrame] = collections.OrderedDict()  # recent ticks
        self.recent_latents: collections.deque = collections.deque(maxlen=max(keep_latents, 1))
        self.first_frame = asyncio.Event()
        self.last: AVFrame | None = None
        # speech / position bookkeeping
        self._speaking = False
        self._silent_ticks = 0
        self.speech_frames = 0
        self.pieces_shown = 0  # the pushed audio shown up to this piece (AVFrame.pieces)
        self.fillers = 0
        self.fillers_by_minute: collections.Counter[int] = collections.Counter()  # by minute of playback
        self.paced = True  # False: frames released as they come (Session.unpace)
        self._arrived = asyncio.Event()  # unpaced: a frame was delivered (or the session closed)

    # -- clock

    def clock_tick(self, now: float | None = None) -> int:
        """The tick due now (0 before the clock starts; unpaced, the next one to show)."""
        if not self.paced:
            return self.tick
        if self.start is None:
            return 0
        now = time.monotonic() if now is None else now
        return max(0, int((now - self.start) * self.fps))

    def due(self, tick: int) -> float:
        """When `tick` is shown; unpaced, now: it is shown as soon as it is made."""
        assert self.start is not None
        return self.start + tick / self.fps if self.paced else time.monotonic()

    async def wait_start(self) -> None:
        """Start the clock at the first read once a frame exists (both tracks share it)."""
        if self.start is None:
            await self.first_frame.wait()
            if self.start is None:
                self.start = time.monotonic()
                self.session._started_at = time.time()

    async def get(self, tick: int, at: float | None = None) -> AVFrame:
        """The frame for `tick`, released no earlier than its time (or than `at`, a later clock time)."""
        await self.wait_start()
        if not self.paced:
            while len(self.queue) <= tick - self.tick and not self.session.closed:
                self._arrived.clear()
                await self._arrived.wait()
            if self.session.closed:
                return self._filler()
        else:
            delay = max(self.due(tick), at or 0.0) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        self._materialise(tick)
        frame = self.shown.get(tick)
        if frame is None:  # older than the kept history: the frame on screen, silent (its speech played already)
            frame = self._filler()
        return frame

    def _materialise(self, tick: int) -> None:
        while self.tick <= tick:
            if self.queue:
                frame = self.queue.popleft()
                self.recent_latents.append(frame.latent)
                if self.last is not None and self.last.filler:
                    frame = _faded_in(frame)
            else:
                frame = self._filler()
                self.fillers += 1
                self.fillers_by_minute[self.tick // (60 * self.fps)] += 1
                self.session.engine.held_at = time.monotonic()  # unpaced sessions back off (_time_for_unpaced)
                if self.last is not None:
                    self.session._count_drop(1, "late")
            self.shown[self.tick] = frame
            if len(self.shown) > self.history:
                self.shown.popitem(last=False)
            self._observe(self.tick, frame)
            self.last = frame
            self.tick += 1
        self.session.engine._wake()

    def _filler(self) -> AVFrame:
        silent = np.zeros(self.samples_per_frame, np.float32)
        if self.last is None:  # nothing generated yet: not reachable after first_frame, kept for safety
            width, height = self.session.frame_size
            return AVFrame(index=-1, video=np.zeros((height, width, 3), np.uint8), audio=silent, speech=False,
                           filler=True)
        # its audio: the sound before it, mirrored, fading out over 5 ms instead of stopping dead, which clicks (the
        # speech itself is untouched: it comes whole after the held tick)
        n = min(FILLER_FADE, len(self.last.audio))
        silent[:n] = self.last.audio[:-n - 1:-1] * np.linspace(1.0, 0.0, n, endpoint=False, dtype=np.float32)
        return AVFrame(index=self.last.index, video=self.last.video, audio=silent, speech=False, filler=True)

    def _observe(self, tick: int, frame: AVFrame) -> None:
        s = self.session
        now = time.monotonic()
        if s.recording is not None:
            s.recording.add(frame)
        if s.broadcast_encodes:
            for encode in tuple(s.broadcast_encodes.values()):  # (encoded once for all the broadcasts at a bitrate)
                encode.add(frame)
        if frame.pieces > self.pieces_shown:
            self.pieces_shown = frame.pieces
            if frame.pieces >= s._pieces:  # (on the loop, as push_audio: read without the lock)
                s._emit(AudioPlayed(s.id, frame=tick, pieces=frame.pieces))
                s._shown_moved.set()
        for text in frame.captions:
            s._emit(Caption(s.id, text=text, frame=tick))
        if frame.speech:
            self.speech_frames += 1
            self._silent_ticks = 0
            if frame.audio_time is not None and self.paced:  # unpaced, a frame is shown as soon as it is made
                s.latencies.append(now - frame.audio_time)
                s.latency_ticks.append(tick)
            if not self._speaking:
                self._speaking = True
                s._emit(SpeechStarted(s.id, frame=tick))
        elif self._speaking:
            self._silent_ticks += 1
            if self._silent_ticks * 1000 / self.fps >= s.engine.config.speech_hangover_ms:
                self._speaking = False
                s._emit(SpeechStopped(s.id, frame=tick))
        if tick % self.fps == 0 and tick:
            s._emit(PlaybackPosition(s.id, frame=tick, seconds=tick / self.fps,
                                     speech_seconds=self.speech_frames / self.fps))

    def deliver(self, frames: list[AVFrame]) -> None:
        self.queue.extend(frames)
        if frames:
            self.first_frame.set()
            self._arrived.set()

    def clear(self) -> int:
        n = len(self.queue)
        self.queue.clear()
        return n


# --------------------------------------------------------------------------------------------------
# Session: one avatar stream (public API on the event loop)
# --------------------------------------------------------------------------------------------------


class Session:
    """A live avatar: push audio, read paced frames (or attach WebRTC tracks), interrupt, close."""

    def __init__(self, engine: "StreamEngine", portrait: Portrait, seed: int, session_id: str | None,
                 stream: StreamState, paste: FullFrame | None = None) -> None:
        self.engine = engine
        self.pipeline: LetsTalkPipeline = engine.pipeline
        self.paste = paste  # full frames: pastes each decoded crop back into the photo (in the decoding thread)
        self.id = session_id or uuid.uuid4().hex[:16]
        self.loop = asyncio.get_running_loop()
        cfg = self.pipeline.config
        self.sample_rate = cfg.audio.sample_rate
        self.samples_per_frame = cfg.audio.samples_per_frame
        # Shown ticks kept: 4 s, at most SHOWN_BYTES of frames (full frames are large), never fewer than twice what a
        # reader may lag before it skips ahead (`late_skip_ms`)
        width, height = self.frame_size
        history = max(math.ceil(2 * engine.config.late_skip_ms / 1000 * cfg.fps),
                      min(4 * cfg.fps, SHOWN_BYTES // (width * height * 3)))
        self.player = Player(self, cfg.fps, self.samples_per_frame, cfg.transformer.num_memory, history)
        self.video_encoders: dict[str, Any] = {}  # codec -> tracks.SharedVideoEncoder (its peers' one encode a tick)
        self.audio_encoder: Any = None  # tracks.SharedAudioEncoder, made with the first shared audio track
        self.closed = False
        self.close_reason = ""
        self.error: str | None = None  # what ended it when the engine did (close_reason "error"), as its error event says
        self._failing: asyncio.Task | None = None  # close() after an error (held: the loop keeps only weak references)
        # EngineConfig.catch_up for this session: False, pushed audio is never shortened or sped up to win back latency
        # the engine lost, so a recording of it holds the speech exactly as pushed (later where windows were late)
        self.catch_up = engine.config.catch_up
        self.opened_at = time.monotonic()
        self._started_at: float | None = None
        self.first_frame_s: float | None = None  # open -> first frame generated
        keep = engine.config.latency_history or None
        self.latencies: collections.deque[float] = collections.deque(maxlen=keep)  # speech arrival -> shown
        self.latency_ticks: collections.deque[int] = collections.deque(maxlen=keep)  # the tick of each
        self.dropped = collections.Counter()
        self.silence_skipped_s = 0.0  # pushed silence skipped by the latency catch-up
        self.idle_dropped = 0  # idle frames put in front of pushed audio, then taken back because it ran late
        self.speech_compressed_s = 0.0  # pushed audio the catch-up played faster (seconds before compression)
        self.catch_up_runs = 0  # speed-ups of the speech catch-up (within an utterance they share one atempo stream)
        self.gap_inserted_s = 0.0  # silence the engine inserted at deadlines that ended up between two frames of
        # pushed speech (no pushed pause between): a gap the user hears, because the speech came too late
        self._events: asyncio.Queue[Event] = asyncio.Queue(maxsize=engine.config.event_queue_size)
        self._resampler = None
        # shared with the worker thread (guarded by _lock)
        self._lock = threading.Lock()
        # (samples, arrival, speech, paced arrival, ahead, caption, piece): the paced arrival is when the piece would
        # have arrived had the audio been pushed at real-time pace from its first piece on (audio pushed ahead of time
        # keeps its pace; only lateness the engine causes is caught up with faster speech); ahead, caption:
        # push_audio's (the caption on the first piece of its push only); piece: its number (1, 2, ... of the pieces
        # pushed; 0: silence the session adds itself), which the frame that plays its end carries (AVFrame.pieces)
        self._pcm_in: collections.deque[tuple[np.ndarray, float, bool, float, bool, str | None, int]] = \
            collections.deque()
        self._pieces = 0  # pieces of pushed audio queued so far (_lock)
        self._pieces_dropped = 0  # of them, the ones up to this number dropped by an interrupt (_lock)
        self._paced_until = 0.0
        self._pending_samples = 0
        self._epoch = 0
        self._shown_moved = asyncio.Event()  # audio_played, an interrupt or the close: wait_audio_shown looks again
        self._reset: list | None = None  # latents to roll the memory back to, set by interrupt()
        self._inflight = 0  # frames generated by the worker whose delivery the loop has not run yet (_lock)
        self._saying: list[asyncio.Task] = []  # say() calls not yet queued in full, in order
        self.recording: Recording | None = None  # record(): the one running
        self.last_recording: Recording | None = None  # the last one that ended (stats)
        self.broadcasts: dict[str, Broadcast] = {}  # broadcast(): the live streams running, by their id
        self.broadcast_encodes: dict[int, BroadcastEncode] = {}  # their encodes, by bitrate (one feeds many)
        self.ended_broadcasts: collections.deque[Broadcast] = collections.deque(maxlen=MAX_BROADCASTS)  # (stats)
        self._broadcast_ids = itertools.count(1)
        self._last_late_event = 0.0
        self._late_reported = 0
        # worker-thread state
        self._w = _WorkerState(stream, self.pipeline.audio_tokenizer(live=True))  # stream: made off the loop (open_session)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the session's video frames."""
        if self.paste is not None:
            return self.paste.size
        size = self.pipeline.config.image_size
        return size, size

    @property
    def face_box(self) -> tuple[int, int, int, int]:
        """(x, y, width, height) of the animated face square in the session's frames (in full frames it may reach past
        their edges; in face crops it is the whole frame)."""
        if self.paste is not None:
            return self.paste.face_box
        size = self.pipeline.config.image_size
        return 0, 0, size, size

    # -- audio in

    def push_audio(self, pcm: np.ndarray, sample_rate: int | None = None, ahead: bool = False,
                   caption: str | None = None) -> None:
        """Queue speech: int16 or float32 samples, (n,) mono or (n, channels), at `sample_rate` (default 16 kHz).
        Floats lie in -1..1: NaN or infinite samples, or int16 values held as floats, raise InputError (queued nothing).

        `ahead`: the audio is made faster than real time (a TTS) and pushed before it is due. It then plays at its
        own pace: its pauses are kept whole, and a frame's latency counts from when its audio would have come at
        real-time pace. Live audio (the default) that queues up behind earlier audio is late, and is caught up by
        shortening its pauses (EngineConfig.catch_up).

        `caption`: the text this audio says; a `Caption` event carries it when the audio's first frame is shown
        (never, if an interrupt drops it first)."""
        self._check_open()
        pcm = np.asarray(pcm)
        if pcm.dtype not in (np.int16, np.float32, np.float64) or pcm.ndim not in (1, 2):
            raise InputError(f"audio must be int16 or float32 samples shaped (n,) or (n, channels), "
                             f"got {pcm.dtype} {pcm.shape}")
        if problem := float_pcm_problem(pcm):  # checked here too: the path below skips the resampler's check
            raise InputError(problem)
        rate = self.sample_rate if sample_rate is None else sample_rate  # 0 is a wrong rate, not "the default"
        if rate == self.sample_rate and pcm.ndim == 1:
            mono = pcm.astype(np.float32) / 32768.0 if pcm.dtype == np.int16 else pcm.astype(np.float32)
        else:
            if self._resampler is None:
                from ..media import PcmResampler

                self._resampler = PcmResampler()
            mono = self._resampler.push(pcm, rate)
        if not len(mono):
            return
        with self._lock:
            if self._pending_samples + len(mono) > self.engine.config.max_pending_seconds * self.sample_rate:
                raise AudioBufferFull(
                    f"session {self.id}: more than {self.engine.config.max_pending_seconds:.0f} s of audio queued "
                    "ahead of playback; push audio at about real-time pace or call interrupt()")
            # Queue in pieces of one frame's audio at most, so the worker tokenizes only what it needs.
            now, step = time.monotonic(), self.samples_per_frame
            for i in range(0, len(mono), step):
                piece = mono[i:i + step]
                self._pieces += 1
                self._pcm_in.append((piece, now, True, self._pace(now, len(piece)), ahead, caption if i == 0 else None,
                                     self._pieces))
            self._pending_samples += len(mono)
        self.engine._wake()

    async def push_audio_when_room(self, pcm: np.ndarray, sample_rate: int | None = None, caption: str | None = None,
                                   poll_s: float = 0.05, ahead: bool = True) -> bool:
        """push_audio(ahead=True) for audio made faster than real time (a TTS, a file read at once), waiting while the
        queue holds `max_pending_seconds` already (playback frees 1 s a second) instead of raising AudioBufferFull.
        False: not queued, because the session closed or was interrupted while this waited (the interrupt dropped the
        speech this belongs to). (`ahead` False: live audio that had to wait behind such audio.)"""
        epoch = self._epoch
        while not self.closed and self._epoch == epoch:
            try:
                self.push_audio(pcm, sample_rate, ahead=ahead, caption=caption)
                return True
            except AudioBufferFull:
                await asyncio.sleep(poll_s)
        return False

    def end_speech(self) -> None:
        """Mark the end of an utterance: its last frames are rendered now instead of waiting for more audio."""
        self._check_open()
        lookahead = self._w.tokenizer.lookahead_ms / 1000
        silence = np.zeros(int(math.ceil(lookahead * self.sample_rate)) + self.samples_per_frame, np.float32)
        if self._resampler is not None:  # the utterance's last ~1 ms, held in the resampler's filter, goes first
            silence = np.concatenate([self._resampler.flush(), silence])
        with self._lock:
            now = time.monotonic()
            self._pcm_in.append((silence, now, False, self._pace(now, len(silence)), False, None, 0))
            self._pending_samples += len(silence)
        self.engine._wake()

    def record(self, path: str | Path, crf: int = 23, preset: str = "veryfast", max_behind_s: float = 10.0,
               save_on_close: bool = True) -> Recording:
        """Record what this session shows from now on (every tick of its clock: generated and held frames with the
        audio that plays with them) to an MP4 at `path` (H.264 at `crf` and x264 `preset`, AAC), encoded in a
        thread of its own. The file appears at `path` only when the recording ends well: `stop_recording()` or
        `close()` (`save_on_close` False: `stop_recording()` only; a close before it discards the recording, for a
        video that is only worth having whole). OutputError at once if `path` cannot be written; a failure later (a
        full disk, an encoder `max_behind_s` behind, or 128 MB of frames behind for large ones) ends it with a
        `recording_stopped` event carrying the error, the stream going on. The session's clock runs while it records,
        watched or not (a paced session's: an unpaced one records at the pace its reader takes its frames)."""
        self._check_open()
        if self.recording is not None:
            raise InputError(f"session {self.id} is already recording to '{self.recording.path}'; stop_recording() "
                             "first")
        self.recording = Recording(self, path, crf=crf, preset=preset, max_behind_s=max_behind_s,
                                   save_on_close=save_on_close)
        return self.recording

    async def stop_recording(self) -> Path:
        """End the recording and save it (the encoder's tail and the MP4's index, off the loop): its path, or
        OutputError saying why it was not saved."""
        recording = self.recording or self.last_recording
        if recording is None:
            raise InputError(f"session {self.id} is not recording; start with record(path)")
        return await recording.stop()

    async def broadcast(self, url: str, bitrate_kbps: int = 0, max_behind_s: float = 5.0, timeout_s: float = 10.0,
                        reconnect_s: float = 60.0, captions: bool = True) -> Broadcast:
        """Stream what this session shows, live, to a streaming server: `rtmp://` or `rtmps://` with the stream key
        (YouTube Live, Twitch, OBS, nginx-rtmp), `srt://`, `udp://` or `tcp://` (MPEG-TS). H.264 at `bitrate_kbps`
        (0: ~0.1 bit a pixel, at least 300 kb/s), a keyframe every 2 s, AAC at 48 kHz, encoded by a process of its own
        (once for all this session's destinations at that bitrate) and sent by another (one per destination:
        `broadcaster`; nothing here waits on the network). Connects first (up to `timeout_s`): InputError for
        a URL that is not one of those, OutputError when the server cannot be reached. The session's clock runs while
        it lasts, watched or not. A connection that drops later (the server gone, or the stream `max_behind_s` behind a
        server that stopped reading) is made again with back-off for up to `reconnect_s` (`broadcast_reconnecting`,
        `broadcast_resumed` events); then it ends with a `broadcast_stopped` event, the session streaming on. The
        captions of what is said (`say`, `push_audio(caption=)`) go inside the video as CEA-608 (`cc608`) unless
        `captions` is False.

        Each call adds a destination (YouTube and Twitch at once: up to MAX_BROADCASTS, each its own connection,
        captions and reconnections, one encode between them; one that fails leaves the others streaming): the
        returned Broadcast's `id` names it to `stop_broadcast` and in its events. InputError for a URL (stream key
        included) already being streamed to."""
        self._check_open()
        self._check_paced()
        check_live_url(url)
        self._check_broadcast_room(url)
        bitrate_kbps = live_bitrate_kbps(self.frame_size, self.pipeline.fps, bitrate_kbps)
        encode = self.broadcast_encodes.get(bitrate_kbps)
        if encode is None or not encode.running:
            encoding = await asyncio.to_thread(LiveEncoding, self.frame_size, self.pipeline.fps, self.sample_rate,
                                               bitrate_kbps)
            encode = self.broadcast_encodes.get(bitrate_kbps)  # (another call's, made meanwhile)
            if encode is None or not encode.running:
                encode = self.broadcast_encodes[bitrate_kbps] = BroadcastEncode(self, encoding, max_behind_s)
            else:
                encoding.abort()
        encode.pending += 1
        writer = None
        try:
            template = await encode.wait_template(timeout_s)
            writer = await asyncio.to_thread(LiveOutput, url, template)
            await asyncio.to_thread(writer.connect, timeout_s)
            self._check_open()  # closed while it connected
            self._check_broadcast_room(url)  # ... or another call took its place
            if not encode.running:  # ... or the encode failed meanwhile
                raise OutputError(f"cannot stream to '{writer.name}': {encode.error or 'its encoder stopped'}")
        except BaseException:  # its caller gone (a cancelled request), no server, or no room: no process left behind
            if writer is not None:
                writer.abort()  # (a kill: it does not wait)
            encode.leave(None)
            raise
        broadcast = Broadcast(self, writer, encode, f"b{next(self._broadcast_ids)}", max_behind_s=max_behind_s,
                              reconnect_s=reconnect_s, timeout_s=timeout_s, captions=captions)
        self.broadcasts[broadcast.id] = broadcast
        return broadcast

    def _check_broadcast_room(self, url: str) -> None:
        if any(b.target == url for b in self.broadcasts.values()):
            raise InputError(f"session {self.id} is already streaming to '{redact_url(url)}'")
        if len(self.broadcasts) >= MAX_BROADCASTS:
            raise InputError(f"session {self.id} is already streaming to {MAX_BROADCASTS} destinations (the most one "
                             "session sends to); stop_broadcast() one first")

    async def stop_broadcast(self, broadcast_id: str | None = None) -> None:
        """End the live stream `broadcast_id` (Broadcast.id), or every one running (none: the last that ended); its
        end goes out to the server. OutputError if one had failed, saying why; InputError for an id never started."""
        if broadcast_id is not None:
            found = [b for b in (*self.broadcasts.values(), *self.ended_broadcasts) if b.id == broadcast_id]
            if not found:
                raise InputError(f"session {self.id} has no live stream {broadcast_id[:40]!r}")
            stopping = found[:1]
        else:
            stopping = list(self.broadcasts.values()) or list(self.ended_broadcasts)[-1:]
            if not stopping:
                raise InputError(f"session {self.id} is not streaming; start with broadcast(url)")
        results = await asyncio.gather(*(b.stop() for b in stopping), return_exceptions=True)
        for result in results:  # every one ended; then the first failure is said
            if isinstance(result, BaseException):
                raise result

    def say(self, text: str, speech: Speech | str | None = None) -> asyncio.Task:
        """Speak `text` with espeak-ng (`letstalk_rt.tts`; `speech`: voice, rate, pitch, or a voice alone such as
        "fr"), after any text said before.

        The text and voice are checked now (InputError); the returned task synthesises a sentence at a time while the
        avatar speaks the ones before, ends the utterance (`end_speech`), and returns the seconds of speech it queued.
        `interrupt()` and `close()` cancel every say() not yet queued in full. A synthesis that fails ends its task
        with the error (logged if nobody awaits it); the next say() goes on."""
        from .sources import TextSource

        self._check_open()
        if len(self._saying) >= MAX_SAYING:
            raise InputError(f"session {self.id}: {MAX_SAYING} say() calls are already waiting to be spoken; wait for "
                             "them, or interrupt()")
        source = TextSource(text, speech, self.sample_rate)
        task = self.loop.create_task(self._say(source, self._saying[-1] if self._saying else None),
                                     name=f"session-{self.id}-say")
        self._saying.append(task)
        task.add_done_callback(self._said)
        return task

    async def _say(self, source, previous: asyncio.Task | None) -> float:
        if previous is not None:
            await asyncio.wait([previous])  # spoken, failed or cancelled: this one follows it
        await source.run(self)
        return source.seconds

    def _said(self, task: asyncio.Task) -> None:
        self._saying.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("session %s: say() failed: %s", self.id, task.exception())

    def _cancel_saying(self) -> None:
        for task in self._saying:
            task.cancel()

    def interrupt(self) -> None:
        """Drop queued speech (and any say() not yet queued) and unshown frames; the avatar continues from the frame
        on screen."""
        self._check_open()
        self._cancel_saying()
        dropped = self._restart([z for z in self.player.recent_latents if z is not None])
        self._emit(Interrupted(self.id, dropped_frames=dropped))

    def _restart(self, latents: list[torch.Tensor]) -> int:
        """Queued speech and unshown frames dropped, the memory started again from `latents` at the next window;
        the frames dropped."""
        with self._lock:
            self._pcm_in.clear()
            self._pending_samples = 0
            self._pieces_dropped = self._pieces
            self._paced_until = 0.0
            self._epoch += 1
            self._reset = latents
            self._resampler = None  # its few buffered samples are speech from before the interrupt
        dropped = self.player.clear()
        if self.player.start is None:  # nothing shown yet: readers wait for the first window of the new state
            self.player.first_frame.clear()
        if dropped:
            self._count_drop(dropped, "interrupt")
        self._shown_moved.set()
        self.engine._wake()
        return dropped

    def motion(self) -> Motion:
        """The latents of the frames shown last, to go on from in another session (`continue_from`: a move's new
        session); LetsTalkError before the first frame is shown (nothing moved yet: a new session starts the same)."""
        self._check_open()
        latents = [z for z in self.player.recent_latents if z is not None]
        if not latents:
            raise LetsTalkError(f"session {self.id} has shown no frame yet: its motion is the portrait's, where any "
                                "new session starts")
        return Motion(torch.stack(latents).float().cpu(), self.pipeline.model_digest,
                      portrait_digest(self._w.stream.portrait.image))

    def continue_from(self, motion: Motion) -> None:
        """Go on from another session's `motion()` (of this model and portrait): the next window is generated from its
        frames, as an interrupt goes on from the frame on screen, so a session taking over from another does not
        start again from the portrait (a jump on screen). Frames made and not shown are dropped; between utterances
        only (LetsTalkError while pushed speech is not all shown: interrupt() first), InputError for another model's
        or portrait's motion or a latent of another shape."""
        self._check_open()
        if motion.model != self.pipeline.model_digest:
            raise InputError(f"this motion is of another model ({motion.model}; this session's: "
                             f"{self.pipeline.model_digest}): carry motion between servers running the same model")
        if motion.portrait != portrait_digest(self._w.stream.portrait.image):
            raise InputError("this motion is of another portrait: carry it to a session of the same photo or avatar")
        shape = tuple(self._w.stream.portrait.latent.shape)
        if tuple(motion.latents.shape[1:]) != shape:
            raise InputError(f"this motion's latents are {tuple(motion.latents.shape[1:])}, this model's {shape}")
        if not self.audio_shown:
            raise LetsTalkError(f"session {self.id} has speech not yet shown: go on from another motion between "
                                "utterances, or interrupt() first")
        self._restart(list(motion.latents[-self.player.recent_latents.maxlen:].unbind(0)))

    def _pace(self, now: float, samples: int) -> float:
        """The paced arrival of the next `samples` pushed at `now` (under _lock): when they would have
        arrived had this run of pushes come at real-time pace from its first piece on, or now if later.

        A late push leaves the pace where it was unless it is more than `pace_restart_ms` late (the pusher
        paused: a new run starts now). Restarting the pace at every late push would take the pieces of a
        live source that a stalled event loop delivers in one burst for audio pushed ahead of time: the
        pace would then run ahead of real time by the stall for the rest of the session, the catch-up
        would count every later piece that much too early, and the latency would settle that much above
        its target (a 120 ms stall at a session's start on a 2-core CPU cost 120 ms for good)."""
        if now - self._paced_until > self.engine.config.pace_restart_ms / 1000:
            self._paced_until = now
        paced = max(now, self._paced_until)
        self._paced_until += samples / self.sample_rate
        return paced

    # -- frames and events out

    async def frames(self) -> AsyncIterator[AVFrame]:
        """Paced frames, one per 1/fps, from the frame due now (the same clock the tracks use; the first read
        starts it). A reader that falls more than `late_skip_ms` behind skips to the present, as the tracks
        do: the frames it missed are counted as dropped ("consumer"), never played back in a burst."""
        player, tick = self.player, None
        limit = self.engine.config.late_skip_ms / 1000 * player.fps
        while not self.closed:
            now = player.clock_tick()
            if tick is None:
                tick = now
            elif now - tick > limit:
                self._count_drop(now - tick, "consumer")
                tick = now
            frame = await player.get(tick)
            if self.closed:
                return
            yield frame
            tick += 1

    def unpace(self) -> None:
        """Release frames as fast as the engine makes them, not on a real-time clock: a video made for a file (a
        server's render). `frames()` then yields each frame as soon as it is generated, never a held one, and the
        engine makes this session's windows in the time its paced sessions leave it (`_time_for_unpaced`), batched
        with theirs only where that is free, so it goes faster than real time where the device has room, and a window
        each UNPACED_MAX_WAIT_S (in their batch or alone: `_pick`) where it has none. Call it before the first read.
        Such a session has no WebRTC tracks and no latency figures, and speech pushed into it is kept whole (no
        catch-up)."""
        self._check_open()
        if self.player.start is not None:
            raise LetsTalkError(f"session {self.id}: its clock started at its first read; unpace() before it")
        self.player.paced = False
        self.catch_up = False

    def _check_paced(self) -> None:
        if not self.player.paced:
            raise LetsTalkError(f"session {self.id} is unpaced (its frames come as fast as they are made, for a file): "
                                "it has no real-time tracks")

    def video_track(self, shared: bool = False):
        """The session's video, paced frames; `shared`: a `tracks.SharedVideoTrack` for an aiortc sender, which (once
        bound to its sender and codec) sends frames encoded once for every peer of the session (the server's)."""
        from .tracks import AvatarVideoTrack, SharedVideoTrack

        self._check_paced()
        return SharedVideoTrack(self) if shared else AvatarVideoTrack(self)

    def shared_video_encoder(self, mime: str):
        """The session's one `tracks.SharedVideoEncoder` of video codec `mime` ("video/VP8"); None for a codec it has
        none for."""
        from ..rtc import BITSTREAM_ENCODERS
        from .tracks import SharedVideoEncoder

        key = mime.lower()
        if key not in BITSTREAM_ENCODERS:
            return None
        if key not in self.video_encoders:
            self.video_encoders[key] = SharedVideoEncoder(self, mime)
        return self.video_encoders[key]

    def audio_track(self, shared: bool = False, video=None):
        """The session's audio, 16 kHz mono packets of 20 ms (`shared`: Opus packets encoded once for every track of
        the session that is shared, `tracks.SharedAudioTrack`, starting with the first frame of `video`, the same
        peer's shared video track: the server's WebRTC senders get these)."""
        from .tracks import AvatarAudioTrack, SharedAudioTrack

        self._check_paced()
        return SharedAudioTrack(self, video) if shared else AvatarAudioTrack(self)

    def shared_audio_encoder(self):
        """The session's one `tracks.SharedAudioEncoder` (its peers' sound encoded once)."""
        from .tracks import SharedAudioEncoder

        if self.audio_encoder is None:
            self.audio_encoder = SharedAudioEncoder()
        return self.audio_encoder

    async def events(self) -> AsyncIterator[Event]:
        """Events until the session closes (the last one is SessionClosed)."""
        while True:
            ev = await self._events.get()
            yield ev
            if isinstance(ev, SessionClosed):
                return

    @property
    def frames_generated(self) -> int:
        return self._w.frames_generated

    @property
    def audio_pieces(self) -> int:
        """How many pieces (a frame's audio at most) of pushed audio have been queued so far: read after a
        push_audio, the mark that an `audio_played` event whose `pieces` reaches it says was shown."""
        return self._pieces

    @property
    def queued_seconds(self) -> float:
        """Seconds of pushed audio the engine has not taken yet (what `max_pending_seconds` bounds)."""
        return self._pending_samples / self.sample_rate

    @property
    def audio_shown(self) -> bool:
        """Every piece of audio pushed so far has been shown (played by a frame a reader took from the session's clock),
        or dropped by an interrupt: after `end_speech()`, the utterance has been seen and heard to its end. (Where the
        latency catch-up plays speech faster, the tempo stretcher's last ~30 ms may still be to come.)"""
        with self._lock:
            return max(self.player.pieces_shown, self._pieces_dropped) >= self._pieces

    async def wait_audio_shown(self, timeout: float | None = None) -> bool:
        """Wait until `audio_shown` (True), `timeout` seconds pass or the session closes (False). Its frames must be
        taken (its tracks, `frames()`, a recording) for its clock, and so its playback, to run."""
        return await wait_state(lambda: self.audio_shown, lambda: self.closed, self._shown_moved, timeout)

    def stats(self) -> dict:
        p50, p95, p99 = [x * 1000 for x in q] if (q := quantiles(self.latencies, (0.5, 0.95, 0.99))) else [None] * 3
        return {
            "session": self.id,
            "frames_generated": self.frames_generated,
            "windows": self._w.stream.windows_done,
            "non_finite_windows": self._w.stream.non_finite_windows,
            "ticks": self.player.tick,
            "fillers": self.player.fillers,
            "dropped": dict(self.dropped),
            "silence_skipped_s": round(self.silence_skipped_s, 3),
            "idle_dropped": self.idle_dropped,
            "speech_compressed_s": round(self.speech_compressed_s, 3),
            "catch_up_runs": self.catch_up_runs,
            "gap_inserted_s": round(self.gap_inserted_s, 3),
            "audio_queued_s": round(self.queued_seconds, 3),
            "input_gain": round(self._w.tokenizer.level.gain, 2),
            "first_frame_s": self.first_frame_s,
            "latency_ms_p50": p50,
            "latency_ms_p95": p95,
            "latency_ms_p99": p99,
            "engine": self.engine.running_state(),
            **({"recording": r.describe()} if (r := self.recording or self.last_recording) is not None else {}),
            **({"broadcasts": [b.describe() for b in (*self.ended_broadcasts, *self.broadcasts.values())]}
               if self.broadcasts or self.ended_broadcasts else {}),
        }

    async def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._cancel_saying()
        with self._lock:
            self._pcm_in.clear()
            self._pending_samples = 0
        self.player.clear()
        self.player.first_frame.set()  # release readers waiting for a first frame
        self.player._arrived.set()  # ... and an unpaced one's next
        self._shown_moved.set()  # ... and wait_audio_shown
        self.engine._remove(self)
        if self.recording is not None:  # saved with what was shown up to now (its recording_stopped comes first)
            if not self.recording.save_on_close:
                await self.recording.abort(f"the session closed ({reason}) before its recording was stopped")
            else:
                with contextlib.suppress(OutputError):
                    await self.recording.stop()
        if self.broadcasts:
            await asyncio.gather(*(b.stop() for b in tuple(self.broadcasts.values())), return_exceptions=True)
        self._emit(SessionClosed(self.id, reason=reason), force=True)

    async def __aenter__(self) -> "Session":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- internals (event loop)

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosedError(f"session {self.id} is closed ({self.close_reason})")

    def _emit(self, event: Event, force: bool = False) -> None:
        if self._events.full():
            try:
                self._events.get_nowait()  # drop the oldest: a slow subscriber must not grow memory
            except asyncio.QueueEmpty:
                pass
        self._events.put_nowait(event)

    def _count_drop(self, n: int, reason: str) -> None:
        self.dropped[reason] += n
        now = time.monotonic()
        if reason == "late":  # at most one event a second, carrying the count since the last one
            if now - self._last_late_event < 1.0:
                return
            self._last_late_event = now
            n = self.dropped["late"] - self._late_reported
            self._late_reported = self.dropped["late"]
        self._emit(FramesDropped(self.id, count=n, reason=reason))  # type: ignore[arg-type]

    def _deliver(self, epoch: int, frames: list[AVFrame], timings: WindowTimings | None) -> None:
        """Frames of a window in order (all of them, or a part: `timings` with its last part only)."""
        with self._lock:  # the worker thread adds to it
            self._inflight -= len(frames)
        if self.closed:
            return
        if epoch != self._epoch:  # generated before an interrupt: never shown
            self._count_drop(len(frames), "interrupt")
            return
        if self.first_frame_s is None:
            self.first_frame_s = time.monotonic() - self.opened_at
        self.player.deliver(frames)
        if timings is not None:
            self._emit(timings)

    def _fail(self, message: str) -> None:
        if self.closed:
            return
        self.error = message
        self._emit(SessionError(self.id, message=message))
        if self._failing is None:
            self._failing = self.loop.create_task(self.close(reason="error"), name=f"session-{self.id}-failing")


class _WorkerState:
    """The part of a session only the worker thread touches."""

    def __init__(self, stream, tokenizer: AudioTokenizer) -> None:
        self.stream = stream
        self.tokenizer = tokenizer
        self.tokens: list[torch.Tensor] = []  # (n, M, Dt) chunks not yet generated
        self.n_tokens = 0
        self.idle_ahead = 0  # of them, idle frames put in front (prepend_idle) and not generated yet
        # [samples, arrival, speech, captions, piece] fed to the tokenizer (arrival None: idle frames put in front,
        # see prepend_idle; captions: of the audio that starts with these samples; piece: the pushed audio taken up to
        # this piece when they were fed, played through once their last sample is)
        self.timeline: collections.deque[list] = collections.deque()
        self.captions: list[str] = []  # captions pushed, waiting for the next audio fed
        self.piece = 0  # the last piece of pushed audio taken from the session's queue (Session._pcm_in)
        self.fresh = True  # next window is a short one (session start / after interrupt)
        self.frames_generated = 0
        self.encode_ms = 0.0
        self.silent_run_s = 0.0  # seconds of silent pushed audio in a row (latency catch-up)
        self.stretch: TempoStretcher | None = None  # latency catch-up: speech played faster while behind
        self.stretched: collections.deque[list] = collections.deque()  # [arrival, output samples still to come out]
        # of each push into the stretcher (its output is tagged with the arrival of the newest push it holds) ...
        self.stretch_tag: float | None = None  # ... and the last tag given (a flush's, if the estimate ran short)
        self.compressing = False
        self.after_speech = False  # the last frame generated from pushed audio carried speech ...
        self.inserted_run = 0  # ... and this many frames the engine inserted (idle, padding) followed it
        self.last_push = self.last_paced = 0.0  # arrival and paced arrival (monotonic s) of the last chunk fed
        self.unflushed = False  # pushed audio was fed since the tokenizer's last padding flush (see _prepare)
        self.ended = False  # the last audio fed was end_speech()'s: no more is coming for now (unpaced sessions)
        self.waiting_since: float | None = None  # monotonic: an unpaced session wants a window and got none since
        self.failed = False  # the session failed in this thread; its error event and close are on their way

    def feed(self, pcm: np.ndarray, arrival: float, speech: bool) -> None:
        """Tokenize pushed audio and keep it for the frames it conditions."""
        self.unstretch(arrival)
        self._feed(pcm, arrival, speech)

    def pad(self, pcm: np.ndarray, arrival: float) -> None:
        """Tokenize silence the engine inserts after the pushed audio (it flushes the tokenizer's lookahead)."""
        self.unstretch(arrival)
        self._feed(pcm, None, False)

    def feed_stretched(self, pcm: np.ndarray, arrival: float) -> None:
        """Speech through the tempo stretcher. What comes out is ~30 ms behind what went in, so it is tagged with the
        arrival of the newest push it holds, not of this one: a frame's latency counts from its own audio."""
        assert self.stretch is not None
        self.stretched.append([arrival, len(pcm) / self.stretch.tempo])
        out = self.stretch.push(pcm)
        tag = arrival
        need = float(len(out))
        while need > 0 and self.stretched:
            entry = self.stretched[0]
            tag, take = entry[0], min(need, entry[1])
            entry[1] -= take
            need -= take
            if entry[1] < 0.5:  # (sample counts at a tempo are fractions)
                self.stretched.popleft()
        if len(out):
            self.stretch_tag = tag
        self._feed(out, tag, True)

    def unstretch(self, arrival: float) -> None:
        """End a catch-up run (at a pause, an interrupt or end of speech): what the stretcher still holds
        goes before the next unstretched audio."""
        if self.stretch is not None:
            tag = self.stretched[-1][0] if self.stretched else self.stretch_tag
            self._feed(self.stretch.flush(), arrival if tag is None else tag, True)
            self.stretch, self.compressing = None, False
            self.stretched.clear()
            self.stretch_tag = None

    def heard_rms(self, pcm: np.ndarray) -> float:
        """RMS of audio as the encoder hears it: quiet speech is raised for it (pipeline.SpeechLevel)."""
        return float(np.sqrt(np.mean(np.square(pcm)))) * self.tokenizer.level.gain

    @property
    def queued_frames(self) -> float:
        """Frames of fed audio not generated yet: tokens, audio inside the tokenizer and the stretcher."""
        spf = self.tokenizer.pipeline.config.audio.samples_per_frame
        held = self.stretch.pending_samples / spf if self.stretch is not None else 0.0
        return self.n_tokens + self.tokenizer.pending_frames + held

    def _feed(self, pcm: np.ndarray, arrival: float, speech: bool) -> None:
        """Queue audio for the tokenizer: its tokens count at once, and are made when the engine encodes
        every session's new audio together (complete), before any window uses them."""
        if not len(pcm):
            return
        self.n_tokens += self.tokenizer.defer(pcm)
        self.timeline.append([pcm, arrival, speech, self.captions, self.piece])
        self.captions = []

    def complete(self, tokens: torch.Tensor) -> None:
        """The tokens the tokenizer owed (they follow everything queued, idle frames put in front included)."""
        if tokens.shape[0]:
            self.tokens.append(tokens)

    def prepend_idle(self, tokens: torch.Tensor) -> None:
        """Put idle frames (their tokens (k, M, Dt), silent audio) in front of everything queued: they play
        next, and the queued audio, the tokenizer's and the stretcher's follow unchanged and unsplit."""
        spf = self.tokenizer.pipeline.config.audio.samples_per_frame
        self.tokens.insert(0, tokens)
        self.n_tokens += tokens.shape[0]
        self.idle_ahead += tokens.shape[0]
        self.timeline.appendleft([np.zeros(tokens.shape[0] * spf, np.float32), None, False, [], 0])  # None: idle

    def drop_idle(self, n: int) -> None:
        """Take back n of the idle frames put in front (n <= idle_ahead): what follows plays n frames sooner."""
        spf = self.tokenizer.pipeline.config.audio.samples_per_frame
        self.tokens = [torch.cat(self.tokens)[n:]]
        self.n_tokens -= n
        self.idle_ahead -= n
        need = n * spf
        while need:  # the idle frames lead the timeline
            chunk = self.timeline[0]
            assert chunk[1] is None and not chunk[2], "drop_idle: the timeline does not start with idle frames"
            if len(chunk[0]) <= need:
                need -= len(chunk[0])
                self.timeline.popleft()
            else:
                chunk[0] = chunk[0][need:]
                need = 0

    def peek_tokens(self, n: int) -> torch.Tensor:
        """The next n tokens, left in place until drop_tokens (a failed batch is retried per session)."""
        assert not self.tokenizer.owed, "peek_tokens before the engine encoded the session's audio"
        allt = torch.cat(self.tokens)  # (n_tokens, M, Dt)
        self.tokens = [allt]
        return allt[:n]

    def drop_tokens(self, n: int) -> None:
        rest = torch.cat(self.tokens)[n:]
        self.tokens = [rest] if rest.shape[0] else []
        self.n_tokens = rest.shape[0]
        self.idle_ahead = max(0, self.idle_ahead - n)

    def take_audio(self, n: int) -> tuple[np.ndarray, bool, float | None, bool, list[str], int]:
        """The next n samples of the timeline, whether any were speech, the last speech arrival, whether
        the engine inserted them all (idle frames, padding) rather than any coming from pushed audio, the
        captions of the audio that starts in them, and the pushed audio they play through (its last piece; 0: none
        ends in them)."""
        out, speech, arrival, need, pushed, captions, through = [], False, None, n, False, [], 0
        while need and self.timeline:
            chunk = self.timeline[0]
            take = chunk[0][:need]
            out.append(take)
            if chunk[3]:
                captions += chunk[3]
                chunk[3] = []
            pushed = pushed or chunk[1] is not None
            if chunk[2]:
                speech = True
                arrival = chunk[1]
            if len(take) == len(chunk[0]):
                through = max(through, chunk[4])
                self.timeline.popleft()
            else:
                chunk[0] = chunk[0][need:]
            need -= len(take)
        audio = np.concatenate(out) if out else np.zeros(0, np.float32)
        if len(audio) < n:
            audio = np.pad(audio, (0, n - len(audio)))
        return audio, speech, arrival, not pushed, captions, through

    def gap_frames(self, inserted: bool, speech: bool) -> int:
        """Per generated frame, in order: how many inserted frames turned out to be a gap in the speech
        (they sat between two frames of pushed speech, with no pushed pause between)."""
        if inserted:
            self.inserted_run += self.after_speech
            return 0
        n = self.inserted_run if speech and self.after_speech else 0
        self.after_speech, self.inserted_run = speech, 0
        return n


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


class StreamEngine:
    """One model on one device shared by many sessions; windows of concurrent sessions run batched."""

    def __init__(self, pipeline: LetsTalkPipeline, config: EngineConfig | None = None) -> None:
        self.pipeline = pipeline
        self.config = config or EngineConfig()
        if not 0 <= self.config.window <= pipeline.max_window:
            raise LetsTalkError(f"EngineConfig.window={self.config.window}: this model generates 1..{pipeline.max_window} "
                                "frames per window (0 uses the model's)")
        if not self.config.draws_budget > 0:
            raise LetsTalkError(f"EngineConfig.draws_budget={self.config.draws_budget}: give a fraction of real time "
                                "above 0")
        if not 0 <= self.config.max_steps <= 50 or self.config.steps_budget <= 0:
            raise LetsTalkError(f"EngineConfig.max_steps={self.config.max_steps} must be 0 (off) .. 50 and "
                                f"steps_budget={self.config.steps_budget} above 0")
        if self.config.threads < -1 or self.config.threads_budget <= 0:
            raise LetsTalkError(f"EngineConfig.threads={self.config.threads} must be -1 (untouched), 0 (auto) or a count, "
                                f"and threads_budget={self.config.threads_budget} above 0")
        if not 1.0 <= self.config.catch_up_tempo <= 2.0:
            raise LetsTalkError(f"catch_up_tempo (--catch-up-tempo) {self.config.catch_up_tempo}: choose 1.0 (off) .. 2.0")
        if not self.config.threads_lower_after >= 0:
            raise LetsTalkError(f"threads_lower_after {self.config.threads_lower_after}: choose 0 (never) or more windows")
        if not self.config.threads_raise_after_s >= 0:
            raise LetsTalkError(f"threads_raise_after_s {self.config.threads_raise_after_s}: choose 0 (never) or more "
                                "seconds")
        if not (math.isfinite(self.config.trim_heap_every_s) and self.config.trim_heap_every_s >= 0):
            raise LetsTalkError(f"trim_heap_every_s (--trim-heap-every) {self.config.trim_heap_every_s}: choose 0 "
                                "(never) or more seconds")
        if not 0 <= self.config.safety_ms <= 200:
            raise LetsTalkError(f"safety_ms (--safety-ms) {self.config.safety_ms}: choose 0 .. 200 ms")
        if self.config.latency_history < 0:
            raise LetsTalkError(f"EngineConfig.latency_history={self.config.latency_history}: choose 0 (all) or a "
                                "frame count")
        if self.config.compile and not self.config.warmup:
            raise LetsTalkError("EngineConfig.compile (--compile) compiles at warm-up: leave warmup on (no --no-warmup)")
        self.window = self.config.window or pipeline.window  # frames per window
        self.window_real_ms = 1000 * self.window / pipeline.config.fps  # how long a full window lasts when played
        self.base_steps = pipeline.num_steps  # restored at stop(); warm-up may choose more (max_steps)
        self.base_draws = pipeline.noise_draws  # restored at stop(); warm-up may choose 1 (draws_budget)
        self.threads: int | None = None  # torch threads the engine set (EngineConfig.threads); None: untouched
        self._threads_before = torch.get_num_threads()  # restored at stop()
        self._lookahead_s = pipeline.audio_tokenizer(live=True).lookahead_ms / 1000  # the audio encoder's delay
        self.sessions: dict[str, Session] = {}
        self._reserved = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._gen_ms: dict[int, float] = {}  # EMA of window start -> frames delivered, by window length
        self._behind_ms = 0.0  # how far the worker's full windows have fallen behind real time (_note_window)
        self.threads_lowered: list[tuple[float, int, int]] = []  # (time.monotonic(), from, to) each time
        self.draws_lowered: list[float] = []  # time.monotonic() when windows fell behind at the model's noise draws
        self.draws_raised: list[float] = []  # ... and when the engine tried the model's draws again
        self._draws_raise_at: float | None = None  # when lowered draws are tried again (monotonic)
        self._draws_wait = self.config.threads_raise_after_s  # doubled by a raise lowered again within it
        self._draws_ms: float | None = None  # what a full window at the model's draws would take now (_note_window)
        self._draws_try: list[float] | None = None  # the first windows at the model's draws since start or a raise
        self.threads_raised: list[tuple[float, int, int]] = []  # ... and each time they went back up
        self._threads_top: int | None = None  # raised no higher: the warm-up's choice (the next count up if none fitted)
        self._raise_at: float | None = None  # when lowered threads go back up (monotonic)
        self._raise_wait = self.config.threads_raise_after_s  # doubled by a raise lowered again within it
        self._threads_ms: dict[int, float] = {}  # the warm-up's window by thread count (auto; _choose_threads)
        self._warm_batch = self.config.max_batch  # the sessions per window the warm-up judged threads and draws for
        self._sample_share: dict[int, float] = {}  # ... the sampling's share of it, at the model's noise draws
        self._sampled = 1.0  # the sampling's share of the warm-up's last window
        self._live: tuple[int, collections.deque] | None = None  # (threads, last full windows' ms) at a count the
        # warm-up timed over real time (_quietened)
        self._recent_ms: collections.deque[float] = collections.deque(maxlen=_QUIET_WINDOWS)  # at the count, draws
        self._recent_batch = 0  # and sessions per window now
        self._try: tuple[int, float, int, list[float]] | None = None  # a try of more or fewer threads (_judge_try):
        # the count before, its recent windows' median, the sessions per window, the tried count's windows so far
        self._try_fewer = False  # the first windows at 1 draw since start may try fewer threads (_try_fewer_threads)
        self._idle: torch.Tensor | None = None  # tokens of a window of silence (_idle_tokens)
        self.windows_run = 0
        self._failed_at = self._decoded_at = -math.inf  # monotonic: a window's last failure, its last whole decode
        self.held_at = -math.inf  # monotonic: the last frame a paced session held (its window came late)
        self._paced_ms: collections.deque[tuple[float, float]] = collections.deque()  # (monotonic, worker ms) of the
        # windows with a paced session in the last LOAD_SPAN_S (worker thread)
        self._decode_q: queue.Queue | None = None  # worker -> decode thread, one window in hand at most
        self._decoder: threading.Thread | None = None
        self._working_since: list[float | None] = [None, None]  # monotonic: the worker's window, the decode thread's
        # window, since when each has been running (None: idle): a hung device or driver shows as one that never ends
        self._trimmer: asyncio.Task | None = None  # trim_heap every EngineConfig.trim_heap_every_s
        self.heap_trims = 0

    @property
    def busy_s(self) -> float:
        """How long the window the engine is on has been running (its sampling or its decoding, whichever began
        first), 0 while it waits for work. A window takes well under a second; one that runs for minutes is a hung
        device or driver (a CUDA hang, a deadlock), which no exception reports: the server's /health/live says so."""
        since = [t for t in self._working_since if t is not None]
        return max(0.0, time.monotonic() - min(since)) if since else 0.0

    # -- lifecycle

    async def start(self) -> "StreamEngine":
        if self._thread is not None:
            return self
        if self.config.keep_heap:
            keep_heap()
        if self.pipeline.device.type == "cpu":
            if self.config.threads > 0:
                torch.set_num_threads(self.config.threads)
                self.threads = self.config.threads
        elif self.config.threads > 0 or (self.config.threads == 0 and "OMP_NUM_THREADS" not in os.environ):
            # set in the engine's own threads only (worker, decoder, warm-up), not in the caller's; torch keeps one
            # process-wide default too, which threads that start torch work later take up (the last count set)
            self.threads = self.config.threads or _GPU_HOST_THREADS
        release_openmp_threads()  # this thread's team (it loaded the model?) would slow the worker's
        await run_off_loop(lambda: self.pipeline.model_digest)  # (hashes the weights once: not on the loop later)
        if self.config.warmup:
            await run_off_loop(self._warmup_restoring_threads)
        if self.config.freeze_gc:
            freeze_collector()
        self._stopping = False
        # the warm-up kept the draws on a quiet process; the first windows beside what streaming adds (WebRTC's
        # encoders, the event loop) say whether they keep real time (_lower_draws)
        self._draws_try = [] if self.pipeline.noise_draws > 1 else None
        self._try_fewer = self._adjusts_threads()
        if self._decodes_in_thread() or self._may_overlap_decode():
            self._decode_q = queue.Queue(maxsize=1)
            self._decoder = threading.Thread(target=self._decode_loop, name="letstalk-decode", daemon=True)
            self._decoder.start()
        self._thread = threading.Thread(target=self._run, name="letstalk-engine", daemon=True)
        self._thread.start()
        if self.config.trim_heap_every_s > 0 and _glibc("malloc_trim") is not None:
            self._trimmer = asyncio.create_task(self._trim_heap_every(self.config.trim_heap_every_s))
        return self

    async def _trim_heap_every(self, seconds: float) -> None:
        """`trim_heap` every `seconds` until stop(), in a thread of the loop's executor."""
        while True:
            await asyncio.sleep(seconds)
            await asyncio.to_thread(trim_heap)
            self.heap_trims += 1

    def _decodes_in_thread(self) -> bool:
        """Every window decoded in the decode thread: EngineConfig.decode_thread, whose default (None) is that on a
        GPU. The engine's live adjustments (threads, noise draws) are off then: a window's two stages overlap."""
        d = self.config.decode_thread
        return self.pipeline.device.type == "cuda" if d is None else d

    def _may_overlap_decode(self) -> bool:
        """EngineConfig.decode_thread None on a CPU of 2+ cores: windows go to the decode thread while the engine
        runs 1 torch thread (`_overlaps_at`)."""
        return self.config.decode_thread is None and self.pipeline.device.type == "cpu" and self._threads_before >= 2

    def _overlaps_at(self, threads: int) -> bool:
        """Whether windows sampled at `threads` torch threads are decoded in the decode thread while the worker
        samples the next."""
        return self._decodes_in_thread() or (threads == 1 and self._may_overlap_decode())

    def _overlaps_decode(self) -> bool:
        """Whether the worker hands the window it sampled now to the decode thread."""
        threads = self.threads if self.threads is not None else torch.get_num_threads()
        return self._decode_q is not None and self._overlaps_at(threads)

    async def stop(self) -> None:
        if self._trimmer is not None:
            self._trimmer.cancel()
            self._trimmer = None
        for s in list(self.sessions.values()):
            await s.close(reason="engine stopped")
        self._stopping = True
        self._wake()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None
        if self._decoder is not None:
            assert self._decode_q is not None
            await asyncio.to_thread(self._decode_q.put, None)  # after the worker's last window
            await asyncio.to_thread(self._decoder.join, 10)
            self._decoder = None
        self.pipeline.set_num_steps(self.base_steps)
        self.pipeline.noise_draws, self._draws_raise_at, self._draws_ms = self.base_draws, None, None  # warm-up chooses
        self._draws_try = None
        self.pipeline.capture_graphs(True)  # the pipeline used on its own captures each size as it meets it
        if self.threads is not None:
            torch.set_num_threads(self._threads_before)

    async def __aenter__(self) -> "StreamEngine":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _warmup_restoring_threads(self) -> None:
        """`_warmup` in an executor thread, which the application's own work reuses: its torch threads as before."""
        before = torch.get_num_threads()
        try:
            self._warmup()
        finally:
            torch.set_num_threads(before)

    def _warmup(self) -> None:
        """Run the largest batch once: a device that cannot hold it fails here, with the fix."""
        p = self.pipeline
        cfg = p.config
        size = cfg.image_size
        portrait = Portrait(image=np.zeros((size, size, 3), np.uint8),
                            latent=torch.zeros(cfg.transformer.latent_channels, cfg.autoencoder.latent_size,
                                               cfg.autoencoder.latent_size, device=p.device))
        tokens = p.silence_tokens(self.window)

        def window_ms(t: int, batch: int | None = None) -> float:  # default: the sessions the warm-up judges for
            streams = [p.new_stream(portrait) for _ in range(batch or self._warm_batch)]
            try:
                start = time.perf_counter()
                lat = p.generate_latents(streams, [tokens[:t]] * len(streams))
                if p.device.type == "cuda":
                    torch.cuda.synchronize(p.device)
                sampled = time.perf_counter()
                p.decode(lat.flatten(0, 1), streams)
                if p.device.type == "cuda":
                    torch.cuda.synchronize(p.device)
                end = time.perf_counter()
                self._sampled = (sampled - start) / max(end - start, 1e-9)
                return (end - start) * 1000
            except torch.cuda.OutOfMemoryError:  # type: ignore[attr-defined]
                raise LetsTalkError(f"warm-up with {self.config.max_batch} sessions per batch ran out of GPU memory; "
                                    "lower max_batch / max_sessions") from None

        self._warm_batch = self.config.max_batch  # _choose_threads: 1, where the CPU cannot hold a full batch
        if self.threads is not None:  # a count given (or kept from before a stop()): this thread's is its own
            torch.set_num_threads(self.threads)
        p.set_num_steps(self.base_steps)
        p.capture_graphs(True)  # until every size the engine can run is captured (_capture_graphs, _trace)
        if p.traced and not self.config.compile:  # first: the timings below are of the traced model
            self._trace(window_ms)
        chose_threads = False
        if self.threads is None and self.config.threads == 0 and p.device.type == "cpu" \
                and "OMP_NUM_THREADS" not in os.environ:
            if p.compiled_threads:  # compiled before (an earlier engine): its kernels were made for this many
                self.threads = p.compiled_threads
                torch.set_num_threads(self.threads)
            else:
                self._choose_threads(window_ms)
                chose_threads = True
        if self.config.compile:
            self._compile(window_ms)
        real_ms = self.window_real_ms
        p.noise_draws = self.base_draws
        if p.noise_draws > 1:  # a network row per draw: where they do not fit, one draw (the first run warms caches)
            took = min(window_ms(self.window) for _ in range(2))
            took = self._window_cost_ms(took * self._sampled, took * (1 - self._sampled), torch.get_num_threads())
            if took > self.config.draws_budget * real_ms:
                p.noise_draws = 1
                if chose_threads and self._raise_at is None:  # (a try planned: the warm-up was busy; it stays)
                    self._pick_threads()  # the auto threads, again at 1 draw
                # something busy at start may pass: tried again as after a live fallback (_raise_draws), the wait
                # doubling while they do not fit (a CPU too slow for them pays a few windows of lateness ever more
                # rarely); not where they could not be lowered live again
                live = not self._decodes_in_thread() and self.config.threads_lower_after > 0  # can lower them again
                wait = self.config.threads_raise_after_s if live else 0.0
                self._draws_raise_at, self._draws_wait = (time.monotonic() + wait if wait > 0 else None), wait
                log.warning("engine: a window of %d sessions at %d noise draws took %.0f ms of the %.0f ms it lasts; "
                            "sampling 1 draw per window (half the transformer's work, a little more flicker)%s",
                            self._warm_batch, self.base_draws, took, real_ms,
                            f"; trying {self.base_draws} again in {wait:.0f} s" if wait > 0 else "")
        budget = self.config.steps_budget * real_ms
        for steps in range(self.base_steps + 1, self.config.max_steps + 1):  # max_steps: more while they fit
            p.set_num_steps(steps)
            if min(window_ms(self.window) for _ in range(2)) > budget:  # the first run of a shape warms caches
                p.set_num_steps(steps - 1)
                break
        if p.cuda_graphs:  # before the timing below: a first call of a shape includes its capture
            self._capture_graphs(window_ms)
        for t in sorted({self.window, min(self.config.first_window, self.window)}):  # at the steps chosen
            self._gen_ms[t] = window_ms(t)
            if t == self.window:  # what it costs real time as it runs (at 1 thread: its decode overlapped)
                cost_ms = self._window_cost_ms(self._gen_ms[t] * self._sampled, self._gen_ms[t] * (1 - self._sampled),
                                               torch.get_num_threads())
        log.info("engine: %d sampling steps x %d noise draws per %d-frame window (%.0f ms for %d sessions, %d torch "
                 "threads)", p.num_steps, p.noise_draws, self.window, self._gen_ms[self.window], self._warm_batch,
                 torch.get_num_threads())
        if p.device.type == "cpu" and not p.compiled and cost_ms > _NEAR_REAL_TIME * real_ms:
            log.warning("engine: a window takes %.0f ms of the %.0f ms it lasts on this CPU, too close to real time "
                        "to hold it when anything else runs; --compile (EngineConfig.compile) makes it about half "
                        "as costly after a compile of a few minutes", cost_ms, real_ms)

    @torch.no_grad()  # CudaGraphed runs eagerly with grad on: the audio encoder's buckets were never captured
    def _capture_graphs(self, window_ms) -> None:
        """On a GPU: capture the CUDA graphs of every batch size the engine can run now (a capture met live
        would hold that batch up for its warm-up runs), and say what runs eagerly because it cannot be."""
        p = self.pipeline
        start = time.perf_counter()

        def up_to(most: int) -> list[int]:  # every graph bucket below `most`, and `most` itself
            return [b for b in GRAPH_BUCKETS if b < most] + [most]

        # every transformer bucket up to max_batch sessions', at the draws chosen and, where a running engine may
        # change them (_lower_draws, _raise_draws: not where every window is decoded in its own thread), at the
        # model's draws and at 1
        most = self.config.max_batch
        guided = len(guidance_rows(p.portrait_guidance, p.audio_guidance))
        draw_counts = {p.noise_draws} if self._decodes_in_thread() else {self.base_draws, 1}
        self._run_windows(window_ms, draw_counts, lambda draws: graph_sessions(most, draws * guided))
        # The decoder runs in chunks of DECODE_CHUNK frames, and a batch's last chunk can be any size below it
        # (3 sessions' 4-frame windows: 12 frames, which no size above decodes): capture each bucket there.
        lat = p.config.transformer.latent_channels, p.config.autoencoder.latent_size, p.config.autoencoder.latent_size
        for n in up_to(min(DECODE_CHUNK, self.window * self.config.max_batch)):
            p.decode(torch.zeros(n, *lat, device=p.device))
        enc = p.audio_encoder
        for n in up_to(self._plan_blocks(self.config.max_batch)):
            enc._encode_windows(torch.zeros(n, enc.window_samples))
        torch.cuda.synchronize(p.device)
        p.capture_graphs(False)  # live, a size not captured above runs eagerly (CudaGraphed's doc says why)
        log.info("engine: CUDA graphs for up to %d sessions captured in %.1f s", self.config.max_batch,
                 time.perf_counter() - start)
        for part, why in p.graph_failures().items():
            log.warning("engine: the %s runs without CUDA graphs (%s): slower, not wrong", part, why)

    def _plan_blocks(self, sessions: int) -> int:
        """The most audio encoder blocks a plan of `sessions` encodes in the normal run of things: what they
        completed since the last, a window's worth each, and one more when the next window's first frame is already
        in (an H200 run met 23 blocks for 8 sessions' 2-frame windows). More (a plan after a stall) runs eagerly."""
        enc = self.pipeline.audio_encoder
        return min((-(-self.window // enc.block_frames) + 1) * sessions, enc.max_blocks_per_call)

    def _run_windows(self, window_ms, draw_counts: set[int], sessions: Callable[[int], Iterable[int]]) -> None:
        """A full and a first window of each session count in `sessions(draws)` at each of `draw_counts` noise draws
        (warm-up's capture and tracing); the pipeline's own draws back after."""
        p = self.pipeline
        base = p.noise_draws
        try:
            for draws in sorted(draw_counts):
                p.noise_draws = draws
                for t in sorted({self.window, min(self.config.first_window, self.window)}):
                    for batch in sessions(draws):
                        window_ms(t, batch)
        finally:
            p.noise_draws = base

    @torch.no_grad()
    def _trace(self, window_ms) -> None:
        """On a CPU (LetsTalkPipeline.traced): trace the transformer and the decoder for the windows of 1 ..
        _TRACED_SESSIONS sessions (full and first windows, at the model's noise draws and at 1: a running engine may
        change them) and the audio encoder for their plans, then turn tracing off: live, a call met for the first
        time runs eagerly (`Traced`). Each transformer signature holds ~30-45 MB of the default model's (not its
        weights, which are shared; 216 MB for all of them against 17 MB eager, docs/benchmarks.md) and a traced call's
        activations peak higher than eager ones, and a CPU runs few sessions in real time: larger batches run
        eagerly."""
        p = self.pipeline
        start = time.perf_counter()
        most = min(self.config.max_batch, _TRACED_SESSIONS)
        # before warm-up chooses the draws: it may choose either (and a running engine may change them)
        self._run_windows(window_ms, {self.base_draws, 1}, lambda draws: range(1, most + 1))
        enc = p.audio_encoder  # every block count a plan meets (a trace is of one shape; each holds ~1 MB)
        for n in range(1, self._plan_blocks(most) + 1):
            enc._encode_windows(torch.zeros(n, enc.window_samples))
        if self._decodes_in_thread() or self._may_overlap_decode():  # the decode thread decodes frame by frame
            c, h = p.config.transformer.latent_channels, p.config.autoencoder.latent_size
            for n in range(1, most + 1):
                p.decode(torch.zeros(n, c, h, h, device=p.device))
        p.capture_graphs(False)
        log.info("engine: the model traced for up to %d sessions in %.1f s", most, time.perf_counter() - start)
        for part, why in p.graph_failures().items():
            log.warning("engine: the %s runs eagerly (%s): slower, not wrong", part, why)

    def _compile(self, window_ms) -> None:
        """EngineConfig.compile: compile a full window of one session and of max_batch (at the threads chosen);
        if torch cannot compile here, say why and run eagerly."""
        p = self.pipeline
        p.compile()
        start = time.perf_counter()
        log.warning("engine: compiling the model for full windows of %s session(s); this takes minutes on a "
                    "small CPU the first time (torch caches it on disk)", sorted({1, self.config.max_batch}))
        try:
            with p.compiling():
                for batch in sorted({1, self.config.max_batch}):
                    window_ms(self.window, batch)
        except LetsTalkError:
            raise
        except Exception as e:  # an inductor / compiler failure: the eager model still works
            log.warning("engine: compiling failed (%s: %s); running the model %s", type(e).__name__, e,
                        "traced" if p.traced else "eagerly")
            p.uncompile()
            if p.traced:
                self._trace(window_ms)
            return
        log.info("engine: compiled in %.0f s", time.perf_counter() - start)

    def _choose_threads(self, window_ms) -> None:
        """EngineConfig.threads = 0 on a CPU: the fewest threads whose window fits threads_budget; if none
        fits (a slow or crowded machine), the count whose window was fastest, measured in turns. A count's window
        is what it costs there (`_window_at_ms`): at 1 thread on a CPU of 2+ cores, where the decode thread decodes
        it beside the next window's sampling, its longer stage. On the 2-core EPYC without AVX-512 that is 1 thread
        (~75 ms against 2 threads' ~85, one stage after the other): through WebRTC 2 threads then fell behind at
        every start (the event loop wants part of a core, and a 2-thread team waits at each barrier for the
        thread it lost) and held 0.96-0.98 of real time, 1 thread 0.99 (docs/benchmarks.md, thirty-ninth session).

        The counts are timed for windows of max_batch sessions, and timed again for 1 session where no count keeps
        max_batch sessions in real time: the CPU then serves fewer, and what its threads should be is what one
        session's window costs. `letstalk serve` admits 8 sessions by default, whose windows the 2-core EPYC runs in
        1.1-1.8 s; timed there, no count kept real time, so the live windows had no count to lower the threads to,
        and 2 threads (~35 % faster for 8 sessions) were kept for the one session the CPU serves: through WebRTC
        3-6 % of its ticks held, where 1 thread held 0.2 % (docs/benchmarks.md, forty-ninth session)."""
        full = self.config.max_batch
        self._time_thread_counts(window_ms, full, thrown_away_over=self.window_real_ms if full > 1 else None)
        if full > 1 and min(map(self._window_at_ms, self._threads_ms)) > self.window_real_ms:
            log.warning("engine: this CPU keeps fewer sessions in real time than the %d it admits (a window of %d "
                        "takes %s ms by thread count, of the %.0f ms it lasts): more sessions than it holds all fall "
                        "behind together; admit fewer (--max-sessions; `letstalk bench --sessions 1,2,4` measures "
                        "it). Threads and noise draws are chosen for 1 session", full, full,
                        {k: round(v) for k, v in self._threads_ms.items()},
                        self.window_real_ms)
            self._warm_batch = 1  # and the warm-up's draws, steps and first compute estimate with them
            self._time_thread_counts(window_ms, 1)
        self._pick_threads(plan=True)

    def _time_thread_counts(self, window_ms, batch: int, thrown_away_over: float | None = None) -> None:
        """Time 1, 2, 4 ... threads up to the process's count (`_threads_ms`) for windows of `batch` sessions, until
        one fits threads_budget; where none does, all of them again in turns, unless `thrown_away_over` (ms) is given
        and every count's window costs over _CLEARLY_OVER times it: the caller throws such timings away (a full
        batch the CPU cannot hold: `_choose_threads` times 1 session instead). The turns of 8 sessions' windows were
        ~9 s of the 2-core EPYC's 29-s server start (docs/benchmarks.md, fiftieth session)."""
        most = self._threads_before
        budget = self.config.threads_budget * self.window_real_ms
        took: dict[int, float] = {}
        self._threads_ms = took  # _window_at_ms reads each count's time as it is measured
        for n in [*itertools.takewhile(lambda k: k < most, (2 ** i for i in itertools.count())), most]:
            torch.set_num_threads(n)
            took[n] = min(window_ms(self.window, batch) for _ in range(2))  # the first run of a shape warms caches
            self._sample_share[n] = self._sampled  # steady from run to run
            if self._window_at_ms(n) <= budget:
                break
        clearly_over = thrown_away_over is not None \
            and min(map(self._window_at_ms, took)) > _CLEARLY_OVER * thrown_away_over
        if self._window_at_ms(n) > budget and len(took) > 1 and not clearly_over:
            # None fits. Such a machine's speed moves from second to second: time the counts again in turns, so
            # that a slow burst cannot fall on one count alone (one picked 1 thread in a burst and then ran at
            # 0.92 of real time, where 2 threads held it: docs/benchmarks.md, the thirteenth session).
            turns: dict[int, list[float]] = {k: [] for k in took}
            for _ in range(3):
                for k in turns:
                    torch.set_num_threads(k)
                    turns[k].append(window_ms(self.window, batch))
                    self._sample_share[k] = self._sampled
            took.update({k: float(np.median(v)) for k, v in turns.items()})

    def _pick_threads(self, plan: bool = False) -> None:
        """Of the counts the warm-up timed (`_choose_threads`), the fewest whose window fits threads_budget at the
        noise draws sampled now, else the one whose window costs least; `plan`: and plan a try of more threads
        where the timings look like a busy machine. Called again after the warm-up lowers the draws: the 2-core
        EPYC without AVX-512 timed 2 threads faster at 2 draws (126 ms a window against 133 at 1 thread) and slower
        at the 1 draw it then sampled (~78 against ~67)."""
        took = self._threads_ms
        budget = self.config.threads_budget * self.window_real_ms
        cost = {k: self._window_at_ms(k) for k in took}
        fit = [k for k in sorted(cost) if cost[k] <= budget]
        cheapest = min(cost)
        for k in sorted(cost):  # none fits: more threads only where clearly cheaper (_MORE_THREADS_GAIN)
            cheapest = k if cost[k] < _MORE_THREADS_GAIN * cost[cheapest] else cheapest
        self.threads = fit[0] if fit else cheapest
        self._threads_top = self.threads
        up = min((k for k in took if k > self.threads), default=None)
        if plan and not fit and cost[self.threads] <= self.window_real_ms and up is not None \
                and took[up] >= took[self.threads]:
            # None fitted, and more threads did not even run a window faster one stage after the other: most
            # likely something else was busy while this timed them (a machine started beside a busy one), and the
            # fastest says little about a quiet minute. So the worker tries the next count up after
            # threads_raise_after_s, as after a lowering, and can come back to this count (it kept real time) if
            # the windows fall behind. One count: more would be kept on a quiet machine wherever they keep real
            # time, where the warm-up would have taken the fewest that fit. (Over real time: once the live windows
            # show the machine has quietened, _quietened.) Where more threads were faster alone but the overlapped
            # decode made fewer cost less, that is the machine's shape, which a quiet minute does not change.
            self._plan_more_threads(cost[self.threads], time.monotonic())
        torch.set_num_threads(self.threads)
        log.info("engine: %d torch threads (window %s ms by thread count, %s as they would run at %d noise draws; "
                 "budget %.0f ms)", self.threads, {k: round(v) for k, v in took.items()},
                 {k: round(v) for k, v in cost.items()}, self.pipeline.noise_draws, budget)

    # -- sessions

    async def open_session(self, portrait: np.ndarray | Portrait, seed: int = 0, detect_face: bool = True,
                           session_id: str | None = None, full_frame: int = 0, framing: float = FRAMING) -> Session:
        """Admit (or refuse at once with CapacityError), prepare the portrait, start generating.

        `full_frame` N > 0: the session's frames are the whole portrait photo, its longest side at most N px, with
        each animated face pasted back in (`framing.FullFrame`, 2-3 ms a frame in the decoding thread), showing at most
        `framing` sides of the face's square around it on their shorter side (0: the whole photo); 0: the face crop at
        the model's size."""
        if self._thread is None:
            raise LetsTalkError("call `await engine.start()` before opening sessions")
        if self.free_slots() <= 0:
            raise CapacityError(f"this engine already runs {self.config.max_sessions} sessions; retry later")
        self._reserved += 1  # hold the slot through the (slow) portrait preparation
        release_openmp_threads()  # the loop's thread may have prepared this portrait itself since start()
        try:
            if not isinstance(portrait, Portrait):
                portrait = await run_off_loop(self.pipeline.prepare_portrait, portrait, detect_face)
            elif portrait.latent.device != self.pipeline.device:  # prepared by another engine (EnginePool)
                portrait = await run_off_loop(self.pipeline.portrait_on_device, portrait)
            # Off the loop too: on a GPU the stream's copy of the portrait latent waits for the window the worker is
            # running, and the loop would stall that long, every other session's paced frames with it.
            stream = await run_off_loop(self.pipeline.new_stream, portrait, seed)
            paste = (await run_off_loop(self.pipeline.full_frame, portrait, full_frame, framing)
                     if full_frame else None)
            if self._thread is None or self._stopping:  # stop() ran while the portrait was being prepared
                raise LetsTalkError("the engine stopped while the session was opening")
            session = Session(self, portrait, seed, session_id, stream, paste)
            if session.id in self.sessions:
                raise InputError(f"session id {session.id!r} is already in use")
        finally:
            self._reserved -= 1
        with self._cond:
            self.sessions[session.id] = session
            self._cond.notify()
        return session

    def free_slots(self) -> int:
        """Sessions this engine may still open: its cap less those open and those being opened."""
        return self.config.max_sessions - len(self.sessions) - self._reserved

    def _remove(self, session: Session) -> None:
        with self._cond:
            self.sessions.pop(session.id, None)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- worker thread

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping:
            # each thread's OpenMP team size is its own: the engine's count, here too (and again once lowered)
            if self.threads is not None and torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)
            planned = time.perf_counter()
            self._working_since[0] = time.monotonic()  # planning works on the device too (audio encoding, memory)
            try:
                jobs = self._plan()
            except Exception:  # never let the worker die: planning errors are per session below
                log.exception("engine planning failed")
                jobs = []
            if not jobs:
                self._working_since[0] = None
                with self._cond:
                    if not self._stopping:
                        self._cond.wait(timeout=0.01)
                continue
            try:
                self._execute(jobs, plan_ms=(time.perf_counter() - planned) * 1000)
            except Exception as e:  # a last resort (each session's own steps fail it alone): end the batch's
                for s, _, _ in jobs:
                    self._fail_session(s, "window", e)
            finally:
                self._working_since[0] = None

    def _plan(self) -> list[tuple[Session, int, int]]:
        """Ingest audio of every session and pick one batch: [(session, frames, epoch)].

        The batch is the sessions whose playback runs dry soonest; a session outside an utterance that would
        run dry while this batch is being made joins it (it could not start its own window before the batch
        ends anyway), so sessions opened moments apart, or falling out of step, share forward passes again
        at their next pause instead of each waiting for the other's."""
        now = time.monotonic()
        ready: list[tuple[float, Session, int, int]] = []
        waiting: list[Session] = []
        sessions = [s for s in list(self.sessions.values()) if not (s.closed or s._w.failed)]
        for s in sessions:
            item = self._try_prepare(s, now)
            if item is None:
                waiting.append(s)
            elif item:
                ready.append(item)
        paced_ready = [r for r in ready if r[1].player.paced]  # an unpaced session (always due) pulls none in early
        if paced_ready and waiting:
            lead = min(paced_ready, key=lambda r: r[0])  # the batch's frames: the earliest deadline's
            horizon = self._gen_ms.get(lead[2], 50.0) / 1000
            ready += [item for s in waiting if (item := self._try_prepare(s, now, horizon))]
        failed = self._encode_audio([s for s in sessions if s._w.tokenizer.owed])  # every session taken into a plan
        ready = [r for r in ready if r[1] not in failed]
        # earliest deadline first, the paced sessions before the unpaced (always due: they take the time left over)
        ready.sort(key=lambda r: (not r[1].player.paced, r[0]))
        jobs = self._pick(ready, sessions, now) if ready else []
        wanting = {id(r[1]) for r in ready} - {id(job[0]) for job in jobs}
        for s in sessions:  # since when each unpaced session has wanted a window and got none (see _pick)
            if s.player.paced or id(s) not in wanting:
                s._w.waiting_since = None
            elif s._w.waiting_since is None:
                s._w.waiting_since = now
        return jobs

    def _pick(self, ready: list[tuple[float, Session, int, int]], sessions: list[Session],
              now: float) -> list[tuple[Session, int, int]]:
        """The batch from the ready sessions (sorted: the paced by deadline, then the unpaced). The sessions with the
        first one's window length; the unpaced in it only where they ride free (`_free_rows`), or alone where the paced
        leave room (`_time_for_unpaced`). Once one has waited UNPACED_MAX_WAIT_S for either it goes anyway, in the
        paced batch where its window is as long and the batch has a row left (a row costs a GPU little), else alone:
        on a device past what it holds, where the paced sessions never leave room, a render goes a window each
        UNPACED_MAX_WAIT_S (the live sessions, late already, wait that long more for it) instead of never finishing."""
        frames = ready[0][2]
        same = [(s, n, epoch) for _, s, n, epoch in ready if n == frames]
        paced = [job for job in same if job[0].player.paced][: self.config.max_batch]
        unpaced = [job for job in same if not job[0].player.paced]
        starved = sorted((r for r in ready if not r[1].player.paced and r[1]._w.waiting_since is not None
                          and now - r[1]._w.waiting_since >= UNPACED_MAX_WAIT_S), key=lambda r: r[1]._w.waiting_since)
        room = self.config.max_batch - len(paced)
        if starved and paced and starved[0][2] == frames and room:
            waited = {id(r[1]) for r in starved}
            riders = [job for job in unpaced if id(job[0]) in waited]
            free = max(0, self._free_rows(len(paced)) - len(riders))  # padded rows left for others, if any
            riders += [job for job in unpaced if id(job[0]) not in waited][:free]
            return paced + riders[:room]
        if starved:
            return [(s, n, epoch) for _, s, n, epoch in starved if n == starved[0][2]][: self.config.max_batch]
        if not paced:  # only unpaced sessions want a window now
            return same[: self.config.max_batch] if self._time_for_unpaced(sessions, frames, now) else []
        return paced + unpaced[: min(self._free_rows(len(paced)), room)]

    def _paced_load(self, now: float) -> float:
        """The share of the worker's last LOAD_SPAN_S its windows with a paced session took (worker thread)."""
        while self._paced_ms and now - self._paced_ms[0][0] > LOAD_SPAN_S:
            self._paced_ms.popleft()
        return sum(ms for _, ms in self._paced_ms) / (LOAD_SPAN_S * 1000)

    def _free_rows(self, batch: int) -> int:
        """Unpaced sessions a batch of `batch` paced ones takes along at no cost: where CUDA graphs pad a batch up to
        its bucket, the rows the padding fills anyway. None on a CPU, where each session costs its share of the
        window (2 take about twice as long as 1): an unpaced session there runs only between the paced windows."""
        p = self.pipeline
        if not p.cuda_graphs:
            return 0
        draws = p.noise_draws  # the transformer's batch is sessions x draws
        size = next((b for b in GRAPH_BUCKETS if b >= batch * draws), None)
        return 0 if size is None else size // draws - batch

    def _time_for_unpaced(self, sessions: list[Session], frames: int, now: float) -> bool:
        """Whether a window of unpaced sessions alone fits before any paced session must start its next one: each
        paced session's playback runs dry later than this window and that one would take (else the unpaced wait,
        and join the paced sessions' next batch). Nor while the paced sessions' windows take more than UNPACED_LOAD
        of the worker's time (on a CPU half a GPU's share), nor for UNPACED_BACKOFF_S after a paced session held a
        frame: the work an unpaced window brings beside the worker's (its decoding, its recording's encoder) competes
        for the same cores, and on a device near what it holds that alone makes the live windows late (through WebRTC
        on the 2-core CPU, where one live session's windows take 0.4-0.55 of the worker's time, a render beside it took
        the live one's p95 to 2 s; docs/benchmarks.md)."""
        if now - self.held_at < UNPACED_BACKOFF_S or \
                self._paced_load(now) > UNPACED_LOAD.get(self.pipeline.device.type, 0.25):
            return False
        cost = 2 * self._gen_ms.get(frames, 50.0) / 1000 + self.config.safety_ms / 1000
        for s in sessions:
            player = s.player
            if player.paced and player.start is not None:
                dry_at = player.due(player.tick + len(player.queue) + s._inflight)
                if dry_at - now < cost:
                    return False
        return True

    def _try_prepare(self, s: Session, now: float, horizon: float = 0.0) -> tuple[float, Session, int, int] | None | bool:
        """_prepare; a session that raises ends with an error event (False), and the others go on."""
        try:
            return self._prepare(s, now, horizon)
        except Exception as e:  # a broken session must not stop the others
            self._fail_session(s, "audio processing", e)
            return False

    def _prepare(self, s: Session, now: float, horizon: float = 0.0) -> tuple[float, Session, int, int] | None:
        """Ingest the session's queued audio; its window job (deadline, session, frames, epoch) if it needs one
        now, or (not in an utterance) would run dry within `horizon` seconds; else None."""
        w = s._w
        with s._lock:
            latents, s._reset = s._reset, None
            epoch = s._epoch
        # (not under the lock: the memory update syncs with the device, and the event loop takes that lock, so a
        # device that stopped answering there would stop the whole server, not just this engine)
        if latents is not None:  # interrupt: start over from what is on screen
            fresh = self.pipeline.audio_tokenizer(live=True)
            fresh.level = w.tokenizer.level  # the speaker's loudness outlives an interrupt; set before the
            w.tokenizer = fresh  # swap, so stats() on the event loop never reads a fresh tokenizer's gain 1
            w.tokens, w.n_tokens, w.timeline, w.idle_ahead = [], 0, collections.deque(), 0
            w.captions = []
            w.unflushed = w.after_speech = False
            w.inserted_run = 0
            w.silent_run_s = 0.0
            w.stretch, w.compressing = None, False
            w.stretched.clear()
            w.stretch_tag = None
            w.stream.memory.reset()
            if latents:
                w.stream.memory.update(torch.stack([z.cpu() for z in latents]))
            w.fresh = True
        window = self.window
        t0 = time.perf_counter()
        # Tokenize queued audio, but hold no more than two windows of tokens: the rest waits, bounded, in _pcm_in.
        while w.n_tokens < 2 * window:
            with s._lock:
                if not s._pcm_in:
                    break
                pcm, arrival, speech, paced, ahead, caption, piece = s._pcm_in.popleft()
                s._pending_samples -= len(pcm)
            w.piece = max(w.piece, piece)  # a piece skipped below is played through by the next audio fed
            w.ended = not speech
            if caption is not None:  # goes with the next audio fed, whatever the catch-up does with this piece
                w.captions.append(caption)
            voiced = speech and len(pcm) > 0 and w.heard_rms(pcm) > self.config.speech_rms
            w.last_push, w.last_paced = arrival, paced
            came = paced if ahead else arrival  # audio pushed ahead of time counts as come at its pace
            if speech and s.catch_up and self._skip_silence(s, pcm, came, now, voiced):
                s.silence_skipped_s += len(pcm) / s.sample_rate
                continue
            w.unflushed = w.unflushed or len(pcm) > 0
            if speech:
                self._catch_up(s, pcm, paced, now)
            # A catch-up run keeps one stretcher open through its speech, back at tempo 1.0 once caught
            # up, and ends it (flush) at the next pause: no seams or speed wobble inside an utterance.
            if speech and w.stretch is not None and (w.compressing or voiced):
                w.feed_stretched(pcm, came)
                if w.compressing:
                    s.speech_compressed_s += len(pcm) / s.sample_rate
            else:
                w.feed(pcm, came, speech)
        player = s.player
        if w.idle_ahead and player.start is not None and player.paced and w.queued_frames > w.idle_ahead:
            # Idle frames were put in front of pushed audio so that it plays at the target latency; if the
            # session has since fallen later than planned (the clock started late, a window was late), the
            # ones not generated yet are taken back, whole frames only, so the audio is never early.
            late = self._behind_s(s, w.last_paced, now)
            n = min(w.idle_ahead, int(late * self.pipeline.config.fps + 1e-6))
            if n > 0:
                w.drop_idle(n)
                s.idle_dropped += n
        # a short first window shows the first frame sooner; an unpaced session (a render) wants no first frame soon,
        # and a window of the live ones' length can ride in their batches (`_pick`)
        want = min(self.config.first_window, window) if w.fresh and player.paced else window
        ahead = len(player.queue) + s._inflight  # generated, not yet shown
        lead_cap = int(self.config.lead_windows * window)
        if ahead >= lead_cap or (player.start is None and w.frames_generated > 0 and ahead >= want):
            w.encode_ms += (time.perf_counter() - t0) * 1000
            return None
        # When does playback run dry? (now for a session with no frame yet.) Frames in flight count: they are
        # made and reach the queue within moments, so a plan that runs between a window's end and its delivery
        # must not take the queue for nearly empty and put idle frames in front of the speech.
        if player.start is None:
            # No frame shown yet: the first (short) window now, and the next as if the clock had started when the
            # first frame came, so that it is there when the first frames have played. Before, the next waited
            # for the clock (unless its speech was in): through WebRTC, where the peer's audio comes only once
            # connected, every stream then held 3-5 frames in its first 0.5 s while a full window was made in the
            # first one's 80 ms. No more before the clock starts (`ahead >= want` above).
            if w.frames_generated == 0 or (w.fresh and not ahead):
                dry_at = now
            elif s.first_frame_s is None:  # the first window is still in flight
                dry_at = math.inf
            else:
                dry_at = s.opened_at + s.first_frame_s + ahead / self.pipeline.fps
        else:
            dry_at = player.due(player.tick + ahead)
        if w.n_tokens < want and not player.paced and not w.ended:
            # Unpaced: frames only from the speech pushed, however long it takes to come (the video waits, no clock
            # runs); idle frames (the rest after it) once end_speech() says no more is coming.
            w.encode_ms += (time.perf_counter() - t0) * 1000
            return None
        if w.n_tokens < want:
            gen_s = self._gen_ms.get(want, 50.0) / 1000
            # Joining a batch early (horizon) fills the window with idle frames now: not in the middle of an
            # utterance, whose next frames may still arrive in time (the idle frames would be a gap in it);
            # a session nobody is pushing audio to joins up to a window early (two such sessions out of step
            # by more than a window's compute would never share a pass otherwise).
            if w.after_speech or not horizon:
                join = 0.0
            elif w.unflushed:
                join = horizon
            else:
                join = horizon + want / self.pipeline.fps
            if dry_at - now > gen_s + self.config.safety_ms / 1000 + join:
                w.encode_ms += (time.perf_counter() - t0) * 1000
                return None  # speech may still arrive in time
            fps = self.pipeline.fps
            if w.unflushed and (now - w.last_push > self._lookahead_s + 1 / fps or not player.paced):
                # Audio stopped arriving (pushed all at once, or a stalled pusher) while the tokenizer still
                # holds its last frames, waiting for a lookahead that is not coming: pad silence after it
                # so they come out.
                silence = np.zeros(s.samples_per_frame, np.float32)
                for _ in range(10 * window):
                    if w.n_tokens >= want:
                        break
                    w.pad(silence, now)
                w.unflushed = False
            else:
                # Nothing pushed is waiting, or audio is arriving and the frames it completes are due any
                # moment: keep the avatar alive with idle frames in front of everything queued. Silence fed
                # to the tokenizer instead would delay all later audio by the encoder's lookahead, and
                # split an utterance that is starting (at a session's start, after a pause) at its live
                # edge. (Inserted frames that end up inside an utterance count as a gap: gap_frames.)
                k = want - w.n_tokens
                # Enough idle frames that what was pushed last plays at the target latency, not sooner: else
                # each of the next windows would reach its deadline before its audio. Not before the clock
                # starts: when it will start (the first window's compute, on a busy machine much more than its
                # estimate) is not known yet, and the next window's deadline, on the running clock, adds them.
                # This window is due at dry_at and ready at about now + gen_s: held frames fill the difference,
                # and each delays what follows by a frame, so fewer idle frames are needed.
                if not w.after_speech and player.start is not None and player.paced:
                    held = max(0.0, now + gen_s - dry_at)
                    early = -self._behind_s(s, w.last_paced, now) - held if w.unflushed else 0.0
                    k = min(max(k, math.ceil(early * fps - 1e-6)), 2 * window)
                w.prepend_idle(self._idle_tokens(k))
        w.encode_ms += (time.perf_counter() - t0) * 1000
        return (dry_at, s, want, epoch)

    def _encode_audio(self, sessions: list[Session]) -> set[Session]:
        """Encode the audio every session took since the last plan in one encoder call (on a GPU its cost is
        per call, not per session); returns the sessions whose audio failed (they end with an error)."""
        if not sessions:
            return set()
        t0 = time.perf_counter()
        try:
            feats = encode_features([s._w.tokenizer for s in sessions])  # changes no session
        except Exception as e:
            if len(sessions) > 1:  # find the culprit: encode each alone, the healthy ones continue
                return set().union(*(self._encode_audio([s]) for s in sessions))
            self._fail_session(sessions[0], "audio processing", e)
            return {sessions[0]}
        share = (time.perf_counter() - t0) * 1000 / len(sessions)
        failed = set()
        for s, f in zip(sessions, feats):  # each session's tokens on its own: one failing loses no other's
            try:
                s._w.complete(s._w.tokenizer.complete(f))
            except Exception as e:
                self._fail_session(s, "audio processing", e)
                failed.add(s)
            s._w.encode_ms += share
        return failed

    def _idle_tokens(self, n: int) -> torch.Tensor:
        """Audio tokens of n frames of silence (n <= 2 windows), made once."""
        if self._idle is None:
            self._idle = self.pipeline.silence_tokens(2 * self.window)  # (2 window, M, Dt)
        return self._idle[:n]

    def running_state(self) -> dict:
        """How the engine runs now, as it adjusts to the machine: torch threads (None: torch's own), sampling steps
        and noise draws per window, whether a window is decoded beside the next one's sampling, how often it
        lowered and raised its threads and draws, and how often it handed freed memory back (`trim_heap`)."""
        return {
            "torch_threads": self.threads,
            "steps": self.pipeline.num_steps,
            "noise_draws": self.pipeline.noise_draws,
            "decode_overlapped": self._overlaps_decode(),
            "threads_lowered": len(self.threads_lowered),
            "threads_raised": len(self.threads_raised),
            "draws_lowered": len(self.draws_lowered),
            "draws_raised": len(self.draws_raised),
            "heap_trims": self.heap_trims,
        }

    def window_compute_ms(self) -> float:
        """A full window's compute, start -> frames delivered (running average; the warm-up's until one ran)."""
        return self._gen_ms.get(self.window, 50.0)

    def target_latency_s(self) -> float:
        """Speech-to-screen latency the catch-up steers to (EngineConfig.target_latency_ms; 0 = auto)."""
        if self.config.target_latency_ms > 0:
            return self.config.target_latency_ms / 1000
        # All frames of a steady stream have the same latency (audio and frames both advance 1 / fps), and
        # a window's first frame is the binding one: it waits for the rest of its window's audio
        # ((window - 1) frames), the encoder's lookahead, the window's compute and safety margin, and then
        # for its tick (up to one frame: the frame grid's phase against the audio's is set at the start).
        fps = self.pipeline.config.fps
        gen = self.window_compute_ms() / 1000
        return self.window / fps + self._lookahead_s + gen + self.config.safety_ms / 1000

    def _skip_silence(self, s: Session, pcm: np.ndarray, arrival: float, now: float, voiced: bool) -> bool:
        """Skip this pushed chunk? Only inside a pause (after `catch_up_keep_ms` of it, so gaps between
        syllables and short pauses are kept whole) and only while it would reach the screen later than
        the target plus one frame."""
        w = s._w
        if not len(pcm) or voiced:
            w.silent_run_s = 0.0
            return False
        w.silent_run_s += len(pcm) / s.sample_rate
        if s.player.start is None or w.silent_run_s * 1000 <= self.config.catch_up_keep_ms:
            return False
        return self._behind_s(s, arrival, now, len(pcm)) > 1 / self.pipeline.config.fps

    def _catch_up(self, s: Session, pcm: np.ndarray, paced: float, now: float) -> None:
        """Set the speech catch-up for this pushed chunk (`w.compressing`): on from when its paced arrival
        would reach the screen more than `catch_up_speech_ms` after the target (lateness the engine caused)
        until it is back within half that. The first speed-up opens a stretcher that stays open, at tempo
        1.0 in between, until the next pause; each speed-up counts as one catch-up run."""
        cfg, w = self.config, s._w
        if not s.catch_up or cfg.catch_up_tempo <= 1.0 or s.player.start is None:
            return
        behind_ms = self._behind_s(s, paced, now, len(pcm)) * 1000
        off_ms, on_ms = self._catch_up_thresholds_ms()
        on = behind_ms > (off_ms if w.compressing else on_ms)
        if on and not w.compressing:
            s.catch_up_runs += 1
        if on and w.stretch is None:
            w.stretch = TempoStretcher(cfg.catch_up_tempo, s.sample_rate)
        elif w.stretch is not None and on != w.compressing:
            w.stretch.set_tempo(cfg.catch_up_tempo if on else 1.0)
        w.compressing = on

    def _catch_up_thresholds_ms(self) -> tuple[float, float]:
        """Lateness (ms over the target) below which a speed-up stops, and above which one starts.

        Compressed speech cannot be shown as early as speech at its own pace: a window's audio and the
        encoder's lookahead arrive `tempo` times slower than they play, so a window is complete that much
        later. Compressing below that floor runs the queue dry, and the idle frames the engine then inserts
        are gaps in the speech and new lateness (docs/benchmarks.md, "The latency catch-up"). So a speed-up
        stops a quarter of `catch_up_speech_ms` above the floor (the rest waits for the next pause, where
        silence is skipped) and starts half of it above where it stops."""
        cfg, fps = self.config, self.pipeline.config.fps
        floor_ms = ((self.window - 1) / fps + self._lookahead_s) * (cfg.catch_up_tempo - 1) * 1000
        off_ms = max(cfg.catch_up_speech_ms / 2, floor_ms + cfg.catch_up_speech_ms / 4)
        return off_ms, max(cfg.catch_up_speech_ms, off_ms + cfg.catch_up_speech_ms / 2)

    def _behind_s(self, s: Session, arrival: float, now: float, samples: int = 0) -> float:
        """How much later than the target the audio pushed at `arrival` (`samples` long, fed now) will be
        shown: the latency its frame will have (`Session.latencies`) less the target.

        Counted exactly, so the figure does not saw up and down as frames play and tokens come out in
        steps: the generated frames play on the player's clock, then one frame per queued frame of audio
        (tokens, the tokenizer's lookahead, what the tempo stretcher holds) up to the frame that holds
        the end of this audio."""
        w, player = s._w, s.player
        fps = self.pipeline.config.fps
        if player.start is None:
            played_at = now + len(player.queue) / fps
        else:
            played_at = max(now, player.due(player.tick + len(player.queue)))
        frame = math.ceil(s._inflight + w.queued_frames + samples / s.samples_per_frame - 1e-6) - 1
        return played_at + max(frame, 0) / fps - arrival - self.target_latency_s()

    def _execute(self, jobs: list[tuple[Session, int, int]], plan_ms: float = 0.0) -> None:
        """Sample one batch of windows (this thread), then decode and deliver it (here, or in the decode thread while
        this one plans and samples the next: `_overlaps_decode`). `plan_ms`: the plan's time (audio in and
        encoded), which with the sampling is the worker's share of the window."""
        frames = jobs[0][1]
        t0 = time.perf_counter()
        streams = [s._w.stream for s, _, _ in jobs]
        saved = [(st.generator.get_state(), st.held_noise) for st in streams]
        try:
            gen_ms, latents = self._sample([s for s, _, _ in jobs], frames)
        except Exception as e:
            if len(jobs) == 1:
                return self._fail_session(jobs[0][0], "sampling", e)
            log.warning("a batch of %d windows failed (%s: %s); running each alone", len(jobs), type(e).__name__, e)
            for st, (state, held) in zip(streams, saved):  # each retry draws the noise the batch drew
                st.generator.set_state(state)
                st.held_noise = held
            for job in jobs:  # find the culprit: run each alone, the healthy ones continue
                self._execute([job])
            return
        self.windows_run += 1
        if any(s.player.paced for s, _, _ in jobs):
            self._paced_ms.append((time.monotonic(), plan_ms + (time.perf_counter() - t0) * 1000))
            self._paced_load(self._paced_ms[-1][0])  # drops what is older than LOAD_SPAN_S
        batch = []
        for b, (s, n, epoch) in enumerate(jobs):
            w = s._w
            meta = []
            try:
                for i in range(n):
                    audio, speech, arrival, inserted, captions, through = w.take_audio(s.samples_per_frame)
                    speech = speech and w.heard_rms(audio) > self.config.speech_rms
                    s.gap_inserted_s += w.gap_frames(inserted, speech) / self.pipeline.fps
                    meta.append((w.frames_generated + i, audio, speech, arrival if speech else None, tuple(captions),
                                 through, not inserted))
            except Exception as e:  # this session's bookkeeping: it alone ends, the batch's others go on
                self._fail_session(s, "window", e)
                continue
            w.frames_generated += n
            w.fresh = False
            timings = WindowTimings(s.id, window=w.stream.windows_done, frames=n, batch=len(jobs),
                                    encode_ms=w.encode_ms, generate_ms=gen_ms,
                                    lead_frames=len(s.player.queue) + s._inflight + n)
            w.encode_ms = 0.0
            with s._lock:  # the event loop subtracts in _deliver
                s._inflight += n  # until _deliver: the planner counts them as generated
            batch.append((s, epoch, latents[b], meta, timings))  # latents (T, C, h, w) on the device
        if not batch:  # every session of it ended above
            return
        worker_ms = plan_ms + (time.perf_counter() - t0) * 1000
        if self._overlaps_decode():
            assert self._decode_q is not None
            self._decode_q.put((t0, worker_ms, batch))  # blocks while the decoder still holds the previous window
        else:
            if self._decode_q is not None:  # overlapped until now (1 thread, raised since): its windows first
                self._decode_q.join()
            self._decode(t0, worker_ms, batch)

    @property
    def failing(self) -> bool:
        """The last window this engine ran failed in the model (a device that fails every window: a lost GPU), or
        it is hung; EnginePool opens new sessions elsewhere while it is."""
        return self._failed_at > self._decoded_at or self.hung

    @property
    def hung(self) -> bool:
        """Its window has run `EngineConfig.hung_after_s` (`busy_s`): a device or driver that stopped answering."""
        return self.busy_s > self.config.hung_after_s

    @staticmethod
    def _fail_session(s: Session, stage: str, e: BaseException) -> None:
        """End one session with an error event (from a worker thread); the others keep running. The worker
        plans nothing more for it, so one failure is one error event, not one per plan until it closes."""
        s._w.failed = True
        if stage != "audio processing":
            s.engine._failed_at = time.monotonic()
        log.error("%s failed for session %s", stage, s.id, exc_info=e)
        what = "audio processing failed" if stage == "audio processing" else f"generation failed ({stage})"
        _post(s, s._fail, f"{what}: {type(e).__name__}: {e}")

    def _decode_loop(self) -> None:
        torch.set_grad_enabled(False)
        assert self._decode_q is not None
        while True:
            item = self._decode_q.get()
            try:
                if item is None:
                    return
                if self.threads is not None and torch.get_num_threads() != self.threads:
                    torch.set_num_threads(self.threads)
                self._working_since[1] = time.monotonic()
                self._decode(*item, overlapped=True)
            except Exception:  # never let the decoder die: the sessions' errors were sent in _decode
                log.exception("engine decode stage failed")
            finally:
                self._working_since[1] = None
                self._decode_q.task_done()  # the worker's join() before it decodes a window itself

    def _decode(self, t0: float, worker_ms: float, batch: list, retry: bool = False, overlapped: bool = False) -> None:
        """Decode a sampled batch and hand each session its frames (a failing session alone gets the error;
        `retry`: one session of a batch that failed, timed from the batch's start, so not a window's time).
        `worker_ms`: the worker's share of the window (plan and sampling); `overlapped`: this is the decode thread,
        and the worker sampled the next window meanwhile.

        Overlapped on a CPU, frame by frame: each frame of every session in the batch is decoded and handed over
        before the next, since a window's frames are due one frame's time apart and a frame decodes in less
        (~15-20 ms of the 2-core EPYC's 1 thread): its first frame then waits for its own decoding, not the
        window's (~50 ms sooner there), and the target latency with it (`_gen_ms`: the window's compute as its
        frames need it, the latest of each frame's ready time less its place in the window)."""
        p = self.pipeline
        t1 = time.perf_counter()
        frames = len(batch[0][3])
        step = 1 if overlapped and p.device.type == "cpu" else frames
        need_ms, done = 0.0, 0
        while done < frames:
            part = [(s, epoch, z[done:done + step], meta[done:done + step], timings)
                    for s, epoch, z, meta, timings in batch]
            try:
                self._decode_part(part, t1 if done + step >= frames else None)
            except Exception as e:
                if len(batch) == 1:
                    return self._fail_session(batch[0][0], "decoding", e)
                log.warning("decoding a batch of %d windows failed (%s: %s); decoding each alone", len(batch),
                            type(e).__name__, e)
                for s, epoch, z, meta, timings in batch:  # find the culprit, as in _execute; from this frame on
                    self._decode(t0, worker_ms, [(s, epoch, z[done:], meta[done:], timings)], retry=True)
                return
            done += step
            need_ms = max(need_ms, (time.perf_counter() - t0) * 1000 - (done - step) * 1000 / p.fps)
        dec_ms = (time.perf_counter() - t1) * 1000
        self._decoded_at = time.monotonic()
        if frames not in self._gen_ms or any(s.player.paced for s, *_ in batch):
            # the live sessions' window cost (their target latency): not an unpaced one's alone (a render's window of
            # one session on a GPU is cheaper than the live batch it would have the latency planned by)
            self._gen_ms[frames] = 0.8 * self._gen_ms.get(frames, need_ms) + 0.2 * need_ms
        if frames == self.window and not retry:
            self._note_window(worker_ms if overlapped else worker_ms + dec_ms, sample_ms=batch[0][4].generate_ms,
                              decode_ms=dec_ms if overlapped else None, batch=len(batch))

    def _decode_part(self, batch: list, final: float | None) -> None:
        """Decode the frames of each session in `batch` ((session, epoch, latents, frames' meta, timings) each) and
        hand them over, with the window's timings where this is its last part (`final`: when its decoding
        started). If it raises, the sessions' detail transfer is as before."""
        p = self.pipeline
        streams = [s._w.stream for s, _, _, _, _ in batch]
        moved = [st.detail_moved for st in streams]
        try:
            lat = torch.cat([z for _, _, z, _, _ in batch])  # (B*n, C, h, w) on the device
            video = p.decode(lat, streams)  # (B*n, H, W, 3) uint8
            lat = lat.float().cpu()  # each frame keeps its latent (an interrupt restarts the memory from it)
        except Exception:
            for st, m in zip(streams, moved):  # the detail transfer's state as before the batch
                st.detail_moved = m
            raise
        dec_ms = None if final is None else (time.perf_counter() - final) * 1000
        k = 0
        for s, epoch, _, meta, timings in batch:
            out = []
            for index, audio, speech, audio_time, captions, through, pushed in meta:
                out.append(AVFrame(index=index, video=video[k] if s.paste is None else s.paste(video[k]), audio=audio,
                                   speech=speech, latent=lat[k], audio_time=audio_time, captions=captions,
                                   pieces=through, pushed=pushed))
                k += 1
            _post(s, s._deliver, epoch, out, None if dec_ms is None else dataclasses.replace(timings, decode_ms=dec_ms))

    def _note_window(self, ms: float, now: float | None = None, sample_ms: float | None = None,
                     decode_ms: float | None = None, batch: int = 1) -> None:
        """Lower the auto-chosen torch threads to the next count down whose warm-up window kept real time (the worker
        sets it before its next window) once full windows have fallen `threads_lower_after` windows' duration
        behind real time: each adds what it took over its duration, and a faster one pays it back. Slow stretches
        of a quiet machine are paid back (a 30-minute soak on the 2-core EPYC had 3 windows in a row over real time,
        the third 186 ms of 160, among ~60 ms ones); a busy neighbour makes 2-thread windows slower than real time on
        average. Only for auto threads (the warm-up timed the counts), not compiled (its kernels keep their count),
        not where every window is decoded in a thread of its own (a GPU). While the pipeline averages several noise
        draws the lateness goes to `_lower_draws` instead (and a raise of the threads that fell due waits for it).
        `ms`: the worker's time for the window (its plan, with the audio encoding, and the sampling) and, unless
        `decode_ms` is given, the decoding; `decode_ms`: the decode thread decoded it while the worker went on, so
        the window costs the longer of the two stages. `sample_ms`: the window's sampling, which grows with the
        noise draws (`_raise_draws` waits until they would fit). `batch`: the sessions it generated."""
        now = time.monotonic() if now is None else now
        worker_ms, decode_ms = ms, decode_ms or 0.0
        ms = max(worker_ms, decode_ms)  # overlapped, the longer stage; else decode_ms is 0
        if self.pipeline.noise_draws > 1:
            self._lower_draws(ms, now)  # first: one draw halves the transformer's work, fewer threads slow it
            return
        if self._draws_raise_at is not None:
            # what a window at the model's draws would take now (its sampling times the draws; batched it is a little
            # less), averaged over a few windows: a try where they cannot fit would only cost lateness, and at 1
            # draw on a busy CPU there is little room to pay it back (docs/benchmarks.md)
            would = max(worker_ms + (self.base_draws - 1) * (worker_ms if sample_ms is None else sample_ms), decode_ms)
            self._draws_ms = would if self._draws_ms is None else 0.7 * self._draws_ms + 0.3 * would
            if (now >= self._draws_raise_at and self._raise_at is None and self._try is None
                    and self._draws_ms <= self.config.draws_budget * self.window_real_ms):
                self._raise_draws(now)  # the threads are back where the warm-up put them (and kept): the draws next
                return
        if not self._adjusts_threads():
            return
        if self._judge_try(ms, now, batch):
            return
        if batch != self._recent_batch:
            self._recent_ms.clear()
            self._recent_batch = batch
        self._recent_ms.append(ms)
        if self._raise_at is not None and now >= self._raise_at:
            self._raise_threads(now)
            return
        if self._try_fewer and len(self._recent_ms) >= _TRIAL_WINDOWS:
            self._try_fewer_threads(now)
            return
        real_ms = self.window_real_ms
        if self.threads in self._threads_ms and self._window_at_ms(self.threads, self.base_draws) > real_ms:
            self._quietened(ms, now)  # the warm-up timed this count over real time
        lower = [k for k in self._threads_ms if k < self.threads and self._window_at_ms(k) <= real_ms]
        if not lower:  # none (1 thread, or a machine too slow at fewer): more overruns are not the threads'
            return
        if self._fell_behind(ms):
            self._lower_threads(max(lower), self._behind_ms, now)

    def _adjusts_threads(self) -> bool:
        """Whether the live windows move the torch threads: auto threads (the warm-up timed the counts), not
        compiled (its kernels keep their count), not where every window is decoded in a thread of its own (a GPU),
        lowering on."""
        return (bool(self._threads_ms) and self.threads in self._threads_ms and not self.pipeline.compiled
                and not self._decodes_in_thread() and self.config.threads_lower_after > 0)

    def _judge_try(self, ms: float, now: float, batch: int) -> bool:
        """While more threads are tried (`_raise_threads`): once the first _TRIAL_WINDOWS windows at the tried count
        are in, go back to the count before where their median took longer than that count's last windows did (True),
        with the wait before the next try doubled, instead of waiting for them to fall `threads_lower_after` windows
        behind: through WebRTC on the 2-core EPYC without AVX-512 each try of 2 threads took ~200 ms windows against
        1 thread's ~100, and 10-45 frames were held at each until the lateness built up. A try of fewer threads
        (`_try_fewer_threads`) is judged alike: slower, back up to the count before, no try of it planned."""
        if self._try is None:
            return False
        before, before_ms, before_batch, tried = self._try
        if batch != before_batch:  # sessions came or went: the windows compare no more (the lateness decides)
            self._try = None
            return False
        tried.append(ms)
        if len(tried) < _TRIAL_WINDOWS:
            return False
        self._try = None
        if float(np.median(tried)) <= before_ms:
            return False
        why = f"took {np.median(tried):.0f} ms against {before_ms:.0f} at {before}"
        if before < self.threads:
            self._lower_threads(before, self._behind_ms, now, why)
            return True
        # a try of fewer (_try_fewer_threads): back to the count before, with no try of it to plan
        self._raise_at = None
        log.info("engine: windows at %d torch threads %s: back to %d", self._switch_threads(before, now), why, before)
        return True

    def _try_fewer_threads(self, now: float) -> None:
        """Once, at the first _TRIAL_WINDOWS windows at 1 noise draw since start: where their median took over
        _QUIET_AGAIN of real time and a count below the warm-up's choice kept real time there, try that count, judged
        on its own first windows against these (`_judge_try`). The warm-up timed the counts on a quiet process;
        beside a stream's encoders and event loop a team of threads waits at each barrier for the thread that lost
        its core: through WebRTC on the 2-core EPYC without AVX-512, 2-thread windows the warm-up timed at ~76 ms took
        ~200, where 1 thread took ~100, and the engine lowered them only once 2 windows behind, 20-30 s in (12-31 held
        frames). Kept, it is a lowering (a try of the count above follows after threads_raise_after_s); slower, the
        count before comes back at once."""
        self._try_fewer = False
        real_ms, recent = self.window_real_ms, float(np.median(self._recent_ms))
        lower = [k for k in self._threads_ms if k < (self.threads or 0) and self._window_at_ms(k) <= real_ms]
        if not lower or recent <= _QUIET_AGAIN * real_ms or self._try is not None or self._raise_at is not None:
            return  # none to try, or the windows are far enough from real time that nothing is to be won
        before = self.threads
        self._lower_threads(max(lower), self._behind_ms, now, f"took {recent:.0f} ms beside the stream, trying fewer")
        self._try = (before, recent, self._recent_batch, [])

    def _lower_threads(self, to: int, behind_ms: float, now: float, why: str = "") -> None:
        """Go on at `to` torch threads from the next window, and plan the try of more (`_raise_threads`); `why`:
        what the windows did (default: how far they fell behind)."""
        self._try = None
        before = self._switch_threads(to, now, behind_ms)
        last = self.threads_raised[-1][0] if self.threads_raised else None
        self._raise_wait, self._raise_at = self._next_try(last, self._raise_wait, now)
        why = why or f"fell {behind_ms:.0f} ms behind real time (is another process busy on these cores?)"
        log.warning("engine: windows at %d torch threads %s: going on with %d%s", before, why, to,
                    f", {before} again in {self._raise_wait:.0f} s" if self._raise_at is not None else "")

    def _window_at_ms(self, threads: int, draws: int | None = None) -> float:
        """What a full window would take at `threads` now, from the warm-up's time at that count: its sampling
        scaled to the noise draws sampled now (`draws`: at that many; the warm-up timed the model's), and where the
        decode thread decodes beside the next window's sampling at that count (1 thread, `_overlaps_at`), the longer
        of the two stages. On the 2-core EPYC without AVX-512 a 1-thread window of 2 draws took over real time at
        warm-up, so a 2-thread engine that fell behind at 1 draw through WebRTC (~200 ms windows) had no count to go
        to, where 1 thread, overlapped, held 0.98 of real time."""
        took = self._threads_ms[threads]
        share = self._sample_share.get(threads)
        if share is None:  # timed live (_quietened): at the draws and in the way it runs now
            return took
        draws = self.pipeline.noise_draws if draws is None else draws
        return self._window_cost_ms(took * share * draws / self.base_draws, took * (1 - share), threads)

    def _window_cost_ms(self, sample_ms: float, decode_ms: float, threads: int) -> float:
        """What a window of these two stages costs the engine's real time at `threads`: the longer one where the
        decode thread decodes it beside the next window's sampling (`_overlaps_at`), else both."""
        return max(sample_ms, decode_ms) if self._overlaps_at(threads) else sample_ms + decode_ms

    def _quietened(self, ms: float, now: float) -> None:
        """The warm-up timed the count running now over real time: it started in a busy spell, and no more threads
        were ever to be tried (nothing to come back to if they fell behind), nor the model's noise draws (the last
        windows at 1 thread would not fit them). Once the median of the last _QUIET_WINDOWS live windows at this
        count is under _QUIET_AGAIN of real time, the spell has passed: it replaces the warm-up's time (this count is
        one to come back to) and, unless it fits threads_budget (where a quiet warm-up would have stopped), the next
        count up is tried after threads_raise_after_s, as after a lowering. The draws follow once they fit."""
        assert self.threads is not None and self._threads_top is not None
        if self._live is None or self._live[0] != self.threads:
            self._live = self.threads, collections.deque(maxlen=_QUIET_WINDOWS)
        self._live[1].append(ms)
        live = float(np.median(self._live[1]))
        if len(self._live[1]) < _QUIET_WINDOWS or live > _QUIET_AGAIN * self.window_real_ms:
            return
        warmup_ms, self._threads_ms[self.threads], self._live = self._threads_ms[self.threads], live, None
        self._sample_share.pop(self.threads, None)  # the live time is what it takes as it runs now
        up = self._plan_more_threads(live, now)
        log.info("engine: windows at %d torch threads take %.0f ms now (%.0f at warm-up)%s", self.threads, live,
                 warmup_ms, f": trying {up} in {self.config.threads_raise_after_s:.0f} s" if up else "")

    def _plan_more_threads(self, ms: float, now: float) -> int | None:
        """Where a window at the count running now (`ms`) misses threads_budget but keeps real time, and a larger
        count was timed: try the next one up after threads_raise_after_s (raised to, no higher), unless a raise is
        already planned or raises are off. The count planned, or None."""
        assert self.threads is not None and self._threads_top is not None
        up = min((k for k in self._threads_ms if k > self.threads), default=None)
        if (up is None or not self.config.threads_budget * self.window_real_ms < ms <= self.window_real_ms
                or self.config.threads_raise_after_s <= 0 or self._raise_at is not None):
            return None
        self._threads_top = max(self._threads_top, up)
        self._raise_at = now + self.config.threads_raise_after_s
        return up

    def _fell_behind(self, ms: float) -> bool:
        """Add a full window's time over its real-time duration to how far the windows have fallen behind (a faster
        one pays it back); True once that is `threads_lower_after` windows' duration."""
        real_ms = self.window_real_ms
        self._behind_ms = max(0.0, self._behind_ms + ms - real_ms)
        return self._behind_ms >= self.config.threads_lower_after * real_ms

    def _next_try(self, last_try: float | None, wait: float, now: float) -> tuple[float, float | None]:
        """After lowering threads or draws at `now`: the wait before trying more again, doubled (up to 30 minutes)
        when the last try (`last_try`) came within the current `wait` (it failed), else threads_raise_after_s; and
        when that is (None: never, threads_raise_after_s 0)."""
        base = self.config.threads_raise_after_s
        wait = min(2 * wait, _RAISE_WAIT_MAX_S) if last_try is not None and now - last_try < wait else base
        return wait, (now + wait if base > 0 else None)

    def _lower_draws(self, ms: float, now: float) -> None:
        """A model averaging several noise draws per window (sampling.noise_draws) samples 1 from the next window on
        once full windows have fallen `threads_lower_after` windows' duration behind real time, counted as for the
        threads, or at once where the median of the first _TRIAL_WINDOWS windows since start (the warm-up kept the
        draws on a quiet process) or since `_raise_draws` took over real time: waiting for the lateness to build up
        held 12-14 frames at the start of a WebRTC stream on the 2-core EPYC without AVX-512, where 2-draw windows
        took a little over real time beside the encoders. Until `_raise_draws` tries the draws again (or stop() gives
        them back); the threads are lowered only after that, or with it where a lower count's window costs less at 1
        draw. Not where every window is decoded in a thread of its own (a GPU)."""
        if self._decodes_in_thread() or self.config.threads_lower_after <= 0:
            return
        why = ""
        if self._draws_try is not None:
            self._draws_try.append(ms)
            if len(self._draws_try) >= _TRIAL_WINDOWS:
                took, self._draws_try = float(np.median(self._draws_try)), None
                if took > self.window_real_ms:
                    why = f"took {took:.0f} ms a window, over its {self.window_real_ms:.0f} ms of real time"
        if not self._fell_behind(ms) and not why:
            return
        before, behind_ms = self.pipeline.noise_draws, self._behind_ms
        self.pipeline.noise_draws, self._behind_ms, self._draws_ms, self._draws_try = 1, 0.0, None, None
        self._recent_ms.clear()  # windows at other draws
        self.draws_lowered.append(now)
        last = self.draws_raised[-1] if self.draws_raised else None
        self._draws_wait, self._draws_raise_at = self._next_try(last, self._draws_wait, now)
        self._announce("noise_draws", before, 1, behind_ms)
        log.warning("engine: windows at %d noise draws %s (is another process busy on these cores?): sampling 1 draw "
                    "per window%s", before, why or f"fell {behind_ms:.0f} ms behind real time",
                    f", {before} again once they fit, in {self._draws_wait:.0f} s at the earliest"
                    if self._draws_raise_at is not None else "")
        if self._adjusts_threads():
            # at 1 draw fewer threads may cost less, their decode overlapped: both at once, one fall behind (2 -> 1
            # thread on the 2-core EPYC without AVX-512, ~60 ms a window against ~76; through WebRTC the 2-thread
            # windows at 1 draw fell behind a second time a few seconds later)
            cost = {k: self._window_at_ms(k) for k in self._threads_ms if k <= self.threads}
            cheapest = min(cost, key=cost.get)
            if cost[cheapest] < cost[self.threads]:
                self._lower_threads(cheapest, behind_ms, now, why and f"{why} at {before} draws")

    def _raise_draws(self, now: float) -> None:
        """Draws lowered by `_lower_draws` (or by the warm-up) go back to the model's once `threads_raise_after_s` has
        passed (doubled after each try that fell behind again within it, as for the threads), no lowered thread count
        waits to go back up first, and the last windows' times say a window at the model's draws would fit
        `draws_budget` again: the process that took the cores has ended. Its first windows are judged as the start's
        (`_lower_draws`)."""
        self._draws_raise_at, self._behind_ms, self._draws_try = None, 0.0, []  # judged on its first windows
        self.pipeline.noise_draws = self.base_draws
        self._recent_ms.clear()  # windows at other draws
        self.draws_raised.append(now)
        self._announce("noise_draws", 1, self.base_draws, 0.0)
        log.info("engine: trying %d noise draws per window again", self.base_draws)

    def _announce(self, change: str, before: int, after: int, behind_ms: float) -> None:
        """Tell every open session's subscribers (worker thread: posted to each session's loop)."""
        for s in list(self.sessions.values()):
            if not s.closed:
                _post(s, s._emit, EngineAdjusted(s.id, change=change, before=before, after=after,  # type: ignore[arg-type]
                                                 behind_ms=round(behind_ms, 1)))

    def _raise_threads(self, now: float) -> None:
        """Lowered threads (`_note_window`) go back up one count once `threads_raise_after_s` has passed (and on,
        a count per wait, up to the warm-up's choice, or one count past it if none fitted its budget): the
        process that took the cores may have ended. If it has not, the windows fall behind again within a few,
        and the count is lowered with a doubled wait (that try's lateness is taken back by the catch-up). A raise
        that fell due while the engine was stopped is tried at the first window after a restart."""
        top = self._threads_top  # set with _threads_ms by _choose_threads
        assert top is not None and self.threads is not None
        up = min((k for k in self._threads_ms if self.threads < k <= top), default=None)
        self._raise_at = None
        if up is None:
            return
        recent = list(self._recent_ms)  # judged against these once a few windows at `up` are in (_judge_try)
        self._try = (self.threads, float(np.median(recent)), self._recent_batch, []) \
            if len(recent) >= _TRIAL_WINDOWS else None
        if up < top:  # lowered more than once (4 -> 2 -> 1): the next count up after another wait
            self._raise_at = now + self._raise_wait
        log.info("engine: trying %d torch threads (from %d)", up, self._switch_threads(up, now))

    def _switch_threads(self, to: int, now: float, behind_ms: float = 0.0) -> int:
        """Go on at `to` torch threads from the next window (the worker sets them): the lateness and the recent
        windows start again, and the change is recorded (`threads_lowered` / `threads_raised`) and announced with
        how far the windows had fallen behind. Returns the count before."""
        assert self.threads is not None
        before, self.threads, self._behind_ms = self.threads, to, 0.0
        self._recent_ms.clear()
        (self.threads_lowered if to < before else self.threads_raised).append((now, before, to))
        self._announce("threads", before, to, behind_ms)
        return before

    def _sample(self, sessions: list[Session], frames: int) -> tuple[float, torch.Tensor]:
        """One window's latents for each session: (milliseconds, (B, T, C, h, w) on the device)."""
        p = self.pipeline
        tokens = [s._w.peek_tokens(frames) for s in sessions]
        t0 = time.perf_counter()
        lat = p.generate_latents([s._w.stream for s in sessions], tokens)  # (B, T, C, h, w)
        if p.device.type == "cuda":
            torch.cuda.synchronize(p.device)
        gen_ms = (time.perf_counter() - t0) * 1000
        for s in sessions:
            s._w.drop_tokens(frames)
        return gen_ms, lat
