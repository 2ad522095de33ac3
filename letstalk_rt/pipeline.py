"""Window-by-window generation with the memory bank, shared by offline files and live streams.

The pieces, in the order data flows:

    portrait image --face crop--> DC-AE encode --> Portrait.latent (C, h, w)
    16 kHz PCM --AudioTokenizer (incremental encoder + per-frame window projector)--> tokens (T, M, Dt)
    tokens + Portrait + StreamState.memory --generate_windows (few-step sampler)--> latents --> RGB frames

`generate_windows` takes several streams at once and runs them as one batch: the offline path calls it
with one stream, the streaming engine with every session that has a window ready. Each stream draws its
noise from its own seeded generator, so a stream's frames do not depend on who it was batched with.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .checkpoint import Components, build_components, load_model, weights_digest
from .config import ModelConfig, check_box, check_noise_draws
from .diffusion import EulerSampler, Guidance, from_portrait
from .errors import InputError
from .framing import DETAIL_WIDTH, FRAMING, FULL_FRAME_SIDE, MAX_PHOTO_SIDE, DetailGate, FullFrame, framed
from .media import float_pcm_problem
from .memory import MemoryBank, box_cells

log = logging.getLogger(__name__)


@dataclass
class Portrait:
    """A prepared portrait: the face crop at the model's resolution and its latent."""

    image: np.ndarray  # (S, S, 3) uint8, the crop the model animates
    latent: Tensor  # (C, h, w) on the pipeline's device, fp32
    # The photo it was cut from, scaled to at most framing.MAX_PHOTO_SIDE, and the crop's square in it
    # (x0, y0, side): what full frames (`LetsTalkPipeline.full_frame`) paste each animated crop back into.
    photo: np.ndarray | None = None  # (H, W, 3) uint8
    box: tuple[int, int, int] | None = None
    # For detail transfer (SamplingConfig.detail_transfer), made on first use by LetsTalkPipeline.decode:
    detail: Tensor | None = None  # (3, S, S) the crop less its autoencoder reconstruction, in [-1, 1] units
    recon_blur: Tensor | None = None  # (3, S, S) the reconstruction, blurred as the gate blurs each frame


@dataclass
class StreamState:
    """Everything one stream (an offline run or a live session) carries between windows."""

    portrait: Portrait
    memory: MemoryBank
    generator: torch.Generator  # CPU generator: the stream's noise, reproducible on any device
    windows_done: int = 0
    non_finite_windows: int = 0  # windows that came out NaN or infinite, shown as the portrait (_without_non_finite)
    detail_moved: Tensor | None = None  # (1, H, W) recent movement away from the portrait (transfer_detail)
    # noise draw -> (C, h, w) its last frame's starting noise, the next one's start (noise_hold); replaced, never
    # changed in place, so a caller can save it and put it back
    held_noise: dict[int, Tensor] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # room for the caller's bookkeeping


class SpeechLevel:
    """Scales live speech into the loudness range the model was trained on (AudioConfig.level_min/max).

    The level is the RMS of the voiced 20 ms blocks (above `floor`, -50 dBFS, over a microphone's usual
    noise: at -54 dBFS a test clip's background noise seeded the level and was raised as speech; and above
    a third of the level so far, so pauses and breath do not pull it down), rising fast (a speech onset)
    and falling slowly; it counts once `settle` voiced blocks (100 ms) were seen. The gain brings it to
    the nearest edge of the range and is 1 inside it, so speech at the trained loudness is encoded
    untouched. It only ever sees audio on its way to the encoder: what is played back keeps its level."""

    def __init__(self, low: float, high: float, max_gain: float = 16.0, floor: float = 0.003,
                 block: int = 320, attack: float = 0.3, release: float = 0.05, settle: int = 5) -> None:
        self.low, self.high, self.max_gain, self.floor = low, high, max_gain, floor
        self.block, self.attack, self.release, self.settle = block, attack, release, settle
        self.level: float | None = None  # None until the first voiced block
        self.voiced_blocks = 0

    @property
    def settled(self) -> bool:
        """True once `settle` voiced blocks were seen: from then on the level counts."""
        return self.level is not None and self.voiced_blocks >= self.settle

    @property
    def gain(self) -> float:
        if not self.settled:
            return 1.0
        if self.low > 0 and self.level < self.low:
            return min(self.max_gain, self.low / self.level)
        if self.high > 0 and self.level > self.high:
            return self.high / self.level
        return 1.0

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        """The same samples, each block scaled by the gain of the level before it (clipped to [-1, 1])."""
        if not len(pcm) or (self.low <= 0 and self.high <= 0):
            return pcm
        out = np.empty_like(pcm)
        for i in range(0, len(pcm), self.block):
            x = pcm[i:i + self.block]
            out[i:i + len(x)] = x * self.gain
            self.observe(x)
        return np.clip(out, -1.0, 1.0, out=out)

    def observe(self, x: np.ndarray) -> None:
        """Update the level with one block of samples."""
        self.update(float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))))

    def update(self, rms: float) -> None:
        """Update the level with one block's RMS."""
        if rms > self.floor and (self.level is None or rms > self.level / 3):
            self.voiced_blocks += 1
            if self.level is None:
                self.level = rms
            else:
                a = self.attack if rms > self.level else self.release
                self.level = math.sqrt((1 - a) * self.level ** 2 + a * rms ** 2)


LEVEL_MIN_PERCENTILE = 80  # a trained model's AudioConfig.level_min: this percentile of its clips' speech levels


def speech_level(pcm: np.ndarray, block: int = 320) -> float | None:
    """A whole signal's speech level as `SpeechLevel` tracks it live: the median of its running level over the
    blocks after it settled; None when it never settles on speech (silence, noise under the floor)."""
    tracker = SpeechLevel(0.0, 0.0, block=block)
    pcm = np.asarray(pcm, dtype=np.float64)
    padded = np.pad(pcm, (0, -len(pcm) % block))
    power = np.square(padded).reshape(-1, block).sum(1)  # (blocks,), one numpy pass, not one call per block
    counts = np.minimum(block, len(pcm) - block * np.arange(len(power)))  # the last block may be short
    levels = []
    for rms in np.sqrt(power / counts).tolist():
        tracker.update(rms)
        if tracker.settled:
            levels.append(tracker.level)
    return float(np.median(levels)) if levels else None


def corpus_level_min(signals: Iterable[np.ndarray], block: int = 320) -> float | None:
    """The `AudioConfig.level_min` for a model trained on these 16 kHz clips: the LEVEL_MIN_PERCENTILE-th
    percentile of their speech levels, the corpus's loud end (None when no clip has speech). Quieter live
    speech is raised to it: on the synth corpus (0.197) that beat lower levels and raising nothing
    (docs/eval.md, "Input loudness")."""
    levels = [v for v in (speech_level(x, block) for x in signals) if v is not None]
    return float(np.percentile(levels, LEVEL_MIN_PERCENTILE)) if levels else None


class AudioTokenizer:
    """Incremental audio -> per-frame audio tokens; equals offline `pipeline.audio_tokens(...)` for speech
    at the loudness the model was trained on (other speech is first scaled into it: `SpeechLevel`).

    Frame i's tokens need features of frames i-margin..i+margin, so tokens lag the features by
    `margin` frames, and features lag the audio by the encoder's `lookahead_samples`. Total lookahead:
    `lookahead_samples + margin * samples_per_frame` (see `AudioTokenizer.lookahead_ms`).

    With `lookahead` F < margin (default: the pipeline's `audio_lookahead`), frame i's tokens are made once the
    features of i+F are in, the features of i+F+1..i+margin standing in as copies of i+F's (as at the end of the
    audio): F frames of lookahead instead of margin, each frame's tokens 40 ms sooner per frame left out, from less
    of what follows it.
    """

    def __init__(self, pipeline: "LetsTalkPipeline", lookahead: int | None = None) -> None:
        self.pipeline = pipeline
        self.margin = pipeline.config.audio.margin
        lookahead = pipeline.audio_lookahead if lookahead is None else lookahead
        self.copied = self.margin - lookahead  # right-context rows copied from the newest feature
        self.stream = pipeline.audio_encoder.stream()
        self.buffer: Tensor | None = None  # (n, L, D) features not yet fully used, left-padded at the start
        self.frames_out = 0  # tokens out, counting those defer() owes
        cfg = pipeline.config.audio
        self.level = SpeechLevel(cfg.level_min, cfg.level_max, block=cfg.sample_rate // 50)  # 20 ms blocks
        self._windows: list[Tensor] = []  # encoder windows defer() cut and complete() has not had features for
        self.owed = 0  # tokens defer() counted and complete() has not made yet

    @property
    def lookahead_ms(self) -> float:
        cfg = self.pipeline.config.audio
        frames = self.margin - self.copied
        return 1000.0 * (self.pipeline.audio_encoder.lookahead_samples + frames * cfg.samples_per_frame) / cfg.sample_rate

    @property
    def pending_frames(self) -> float:
        """Frames of audio pushed but not yet counted as tokens (the lookahead plus a part-frame; fractional)."""
        spf = self.pipeline.config.audio.samples_per_frame
        return self.stream.samples_received / spf - self.frames_out

    def _take(self, feats: Tensor, final: bool) -> Tensor:
        """Append new features (n, L, D) and project every frame whose window is complete (its newest `copied`
        rows copies of the newest feature)."""
        m, k = self.margin, self.copied
        if feats.shape[0]:
            if self.buffer is None:
                self.buffer = feats[:1].expand(m, -1, -1)  # (m, L, D) edge-replicate the start
            self.buffer = torch.cat([self.buffer, feats], dim=0)  # (n', L, D)
        if self.buffer is None:
            return self._empty()
        pad = m if final else k  # the end of the audio: every frame left, its missing context copied
        if self.buffer.shape[0] + pad <= 2 * m:
            return self._empty()
        rows = torch.cat([self.buffer, self.buffer[-1:].expand(pad, -1, -1)]) if pad else self.buffer  # (n'+pad,...)
        tokens = self.pipeline.project_audio(rows, pad_left=False, pad_right=False)  # (n'+pad-2m, M, Dt)
        keep = 2 * m - k  # the context of the next frame: its m rows before, and the m - k after it that are in
        self.buffer = None if final else self.buffer[-keep:] if keep else self.buffer[:0]
        return tokens

    def _empty(self) -> Tensor:
        cfg = self.pipeline.config.audio
        return torch.zeros((0, cfg.num_tokens, cfg.token_dim), device=self.pipeline.device)

    # push() in two halves, so that many streams' audio is encoded in one call (`encode_together`): defer()
    # takes the samples and counts the tokens they complete, complete() turns the windows' features into them.

    def defer(self, pcm: np.ndarray) -> int:
        """Take 16 kHz mono float32 samples; keep the encoder windows they complete (`windows`) and return how
        many tokens those make (known from the sample count alone; counted in frames_out at once)."""
        pcm = self.level(np.asarray(pcm, dtype=np.float32))
        windows = self.stream.cut(pcm)  # (n, W)
        if not windows.shape[0]:
            return 0
        self._windows.append(windows)
        # what _take will do once these features come, by count: project every buffered row past 2m
        m = self.margin
        kept = sum(w.shape[0] for w in self._windows) * self.stream.encoder.block_frames
        rows = (m if self.buffer is None else self.buffer.shape[0]) + kept
        n = max(0, rows + self.copied - 2 * m) - self.owed
        self.owed += n
        self.frames_out += n
        return n

    @property
    def windows(self) -> Tensor:
        """The encoder windows (N, window_samples) defer() kept, oldest first, on the CPU."""
        if not self._windows:
            return torch.zeros((0, self.stream.encoder.window_samples))
        if len(self._windows) > 1:
            self._windows = [torch.cat(self._windows)]
        return self._windows[0]

    def complete(self, feats: Tensor) -> Tensor:
        """The encoder's features of `windows` (N * block_frames, L, D) -> the tokens defer() owed (n, M, Dt).
        All or nothing: if it raises, the tokenizer is as before, its windows still owed."""
        buffer = self.buffer
        try:
            tokens = self._take(feats.to(self.pipeline.device), final=False)
            if tokens.shape[0] != self.owed:
                raise RuntimeError(f"AudioTokenizer.complete: {tokens.shape[0]} tokens made, {self.owed} owed")
        except Exception:
            self.buffer = buffer  # _take only ever replaces it
            raise
        self._windows, self.owed = [], 0
        return tokens

    @torch.no_grad()
    def push(self, pcm: np.ndarray) -> Tensor:
        """16 kHz mono float32 samples in; tokens (n, M, Dt) for the frames that became final out."""
        self.defer(pcm)
        return encode_together([self])[0]

    @torch.no_grad()
    def flush(self) -> Tensor:
        """End of audio: tokens for the remaining frames (total = ceil(samples / samples_per_frame))."""
        head = encode_together([self])[0]  # (owed, M, Dt)
        tail = self._take(self.stream.flush().to(self.pipeline.device), final=True)  # (n, M, Dt)
        self.frames_out += tail.shape[0]
        return torch.cat([head, tail])


@torch.no_grad()
def encode_features(tokenizers: list[AudioTokenizer]) -> list[Tensor]:
    """The encoder's features of every tokenizer's kept windows, in one call: many sessions' new audio as one
    batch (a GPU runs a small batch in about the time of one window: the cost is the encoder's kernel
    launches). Changes no tokenizer: `AudioTokenizer.complete` turns each one's part into its tokens."""
    if not tokenizers:
        return []
    enc = tokenizers[0].pipeline.audio_encoder
    windows = [t.windows for t in tokenizers]  # [(N_i, W)]
    feats = enc._encode_windows(torch.cat(windows))  # (sum N_i * bf, L, D)
    return list(feats.split([w.shape[0] * enc.block_frames for w in windows]))


@torch.no_grad()
def encode_together(tokenizers: list[AudioTokenizer]) -> list[Tensor]:
    """Every tokenizer's owed tokens, their audio encoded in one call (`encode_features`)."""
    return [t.complete(f) for t, f in zip(tokenizers, encode_features(tokenizers))]


class ShapeCompiled:
    """A module or function run through torch.compile for the input shapes (of its first argument) it met
    while `warming`, and eagerly for every other shape."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=False)  # static shapes: dynamic ones were barely faster
        self.shapes: set[tuple[int, ...]] = set()
        self.warming = False
        self.threads: int | None = None  # torch threads at the first compile: the generated CPU kernels keep them

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        key = tuple(x.shape)
        if key in self.shapes or self.warming:
            if self.threads is None:
                self.threads = torch.get_num_threads()
            out = self.compiled(x, *args, **kwargs)
            self.shapes.add(key)
            return out
        return self.fn(x, *args, **kwargs)


# Frames decoded per decoder call. The B preset's decoder holds ~100 MB of activations per 256 px frame:
# 64 sessions' 4-frame windows decoded at once ran an H100 out of memory at warm-up (docs/benchmarks.md).
DECODE_CHUNK = 16
GRAPH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)  # batch sizes CUDA graphs are captured for


class CudaGraphed:
    """`fn` (inference on a CUDA device) replayed from CUDA graphs: one graph per input signature, captured
    the first time it is met, then every call is a copy of the inputs into the graph's own buffers, one
    replay and a copy of the output.

    A few milliseconds of arithmetic per window are spread over hundreds of small kernels; launched one by
    one from Python they kept an H100 99.5 % idle (a 2-frame window's transformer step took 24 ms for
    0.1 TFLOP, docs/benchmarks.md), and the launches hold the GIL the event loop needs. A replay launches
    them all at once.

    A batch is padded up to the next of `buckets` (copies of its last row; rows never mix: every model here
    is per-sample at inference), so a handful of graphs serve every batch size: each tensor argument whose
    first dimension is the batch's (that of the first argument) is padded, and the output's first
    dimension is cut back. A larger batch, grad mode, a CPU tensor, or a capture that failed (logged once)
    run `fn` eagerly. Each wrapper keeps its graphs' memory in one pool; one thread at a time may call it.

    With `capture` off, a signature met for the first time runs eagerly instead of being captured: the
    engine captures every size it can run at warm-up, then turns capture off, because a capture while
    another thread launches work can fail (an H100 run captured a decoder bucket in the decode thread while
    the worker captured an audio-encoder bucket: both failed, and both parts ran eagerly from then on).
    """

    def __init__(self, fn: Callable[..., Tensor], buckets: tuple[int, ...] = GRAPH_BUCKETS) -> None:
        self.fn = fn
        self.buckets = buckets
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list, Tensor]] = {}
        self.pool = None  # a graph memory pool shared by this wrapper's graphs (made at the first capture)
        self.failed: str | None = None  # why capturing failed: everything runs eagerly from then on
        self.capture = True  # off: a signature not captured yet runs eagerly (see the class's doc)
        self.uncaptured: set[tuple] = set()  # signatures met with capture off (logged once each)

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        n = x.shape[0] if x.dim() else 0
        size = next((b for b in self.buckets if b >= n), None)
        values = [x, *args, *kwargs.values()]
        if (self.failed or size is None or not n or not x.is_cuda or torch.is_grad_enabled()
                or any(v is not None and not isinstance(v, (Tensor, bool, int, float, str)) for v in values)):
            return self.fn(x, *args, **kwargs)
        # on the inputs' device: streams, capture and replay are the current device's, and an engine's threads on
        # cuda:1 (EnginePool) start with cuda:0 current
        with torch.cuda.device(x.device):
            return self._graphed(x, args, kwargs, values, n, size)

    def _graphed(self, x: Tensor, args: tuple, kwargs: dict, values: list, n: int, size: int) -> Tensor:
        padded = [pad_batch(v, n, size) if isinstance(v, Tensor) else v for v in values]
        key = (tuple(kwargs), len(args), torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
               *((tuple(v.shape), v.dtype, v.device) if isinstance(v, Tensor) else v for v in padded))
        if key not in self.graphs and not self.capture:
            if key not in self.uncaptured:
                self.uncaptured.add(key)
                log.warning("%s met a batch of %d (padded to %d) that was not captured at warm-up; it runs eagerly",
                            getattr(self.fn, "__qualname__", self.fn), n, size)
            return self.fn(x, *args, **kwargs)
        if key not in self.graphs:
            static = self._warm(padded, list(kwargs), len(args))  # an error of the inputs' own is raised here
            try:
                self.graphs[key] = self._record(static, list(kwargs), len(args))
            except Exception as e:  # an op that cannot be captured: run eagerly (correct, just slower)
                self.failed = f"{type(e).__name__}: {e}"
                log.warning("CUDA graph capture of %s failed (%s); running it eagerly",
                            getattr(self.fn, "__qualname__", self.fn), self.failed)
                torch.cuda.synchronize()
                return self.fn(x, *args, **kwargs)
        graph, static, out = self.graphs[key]
        for dst, src in zip(static, padded):
            if isinstance(dst, Tensor):
                dst.copy_(src)
        graph.replay()
        return out[:n].clone()

    def _call(self, values: list, names: list[str], n_args: int) -> Tensor:
        kw = dict(zip(names, values[1 + n_args:]))
        return self.fn(values[0], *values[1:1 + n_args], **kw)

    def _warm(self, values: list, names: list[str], n_args: int) -> list:
        """The graph's input buffers, after two eager runs on a side stream (lazy initialisations, cuBLAS
        handles, cuDNN's choices: none of it may happen inside a capture)."""
        static = [v.clone() if isinstance(v, Tensor) else v for v in values]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._call(static, names, n_args)
        torch.cuda.current_stream().wait_stream(side)
        return static

    def _record(self, static: list, names: list[str], n_args: int) -> tuple[torch.cuda.CUDAGraph, list, Tensor]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the engine's decode thread may launch work while the worker captures a new shape
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._call(static, names, n_args)
        return graph, static, out


class Traced:
    """`fn` (inference on a CPU) run from TorchScript traces (torch.jit.trace): one per call signature (the
    arguments given, their shapes and dtypes), traced the first time it is met while `capture` is on, eagerly
    otherwise, and eagerly in grad mode or with an argument that is neither a tensor nor None.

    Eager, every one of the ~2000 ops of a window is dispatched from Python, and the worker takes the GIL back
    between any two: while the event loop works (WebRTC's packets, the tracks' pacing), each wait lasts until the
    loop lets it go. On the 2-core EPYC without AVX-512 a transformer call took 320 ms instead of 209 beside a Python
    thread busy 40 % of the time; traced, 168 and 167, and 107 instead of 120 with 2 torch threads on a quiet
    machine: a trace runs its graph in C++ without the GIL (docs/benchmarks.md). The trace records the ops
    the call ran: the models here branch in Python only on shapes, configuration and which arguments are None,
    all of which the signature holds. A transformer trace holds ~30-45 MB of the default model's (not the weights:
    they are shared; what it is was not found, docs/benchmarks.md), an audio-encoder trace ~1 MB, and a traced
    call's activations peak higher than an eager one's. The engine traces the windows of 1-2 sessions at warm-up,
    then turns capture off (a trace takes about as long as ~6 calls: live it would hold every session's window up).

    Traces run without the graph executor's optimisation (`torch.jit.optimized_execution(False)`, a per-thread
    setting): with it, a trace's second call profiled and optimised the graph, 290-450 ms where the calls before
    and after took ~60 (a window of the default model; the warm-up called some signatures only once, so the stall
    came live), and the optimised graph ran no faster."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn = fn
        self.traces: dict[tuple, Callable[..., Tensor]] = {}
        self.failed: str | None = None  # why tracing failed: everything runs eagerly from then on
        self.capture = True  # off: a signature not traced yet runs eagerly

    def __call__(self, *args, **kwargs) -> Tensor:
        values = [*args, *kwargs.values()]
        if (self.failed or torch.is_grad_enabled()
                or any(v is not None and not isinstance(v, Tensor) for v in values)):
            return self.fn(*args, **kwargs)
        names = [k for k, v in kwargs.items() if v is not None]
        tensors = (*args, *(kwargs[k] for k in names))
        key = (len(args), tuple(names), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
               *((tuple(v.shape), v.dtype, v.device) for v in tensors))
        traced = self.traces.get(key)
        if traced is None:
            if not self.capture:
                return self.fn(*args, **kwargs)
            traced = self._trace(tensors, len(args), names)
            if traced is None:
                return self.fn(*args, **kwargs)
            self.traces[key] = traced
        with torch.jit.optimized_execution(False):
            return traced(*tensors)

    def _trace(self, tensors: tuple, n_args: int, names: list[str]) -> Callable[..., Tensor] | None:
        import warnings

        def call(*ts: Tensor) -> Tensor:
            return self.fn(*ts[:n_args], **dict(zip(names, ts[n_args:])))

        try:
            with warnings.catch_warnings(), torch.jit.optimized_execution(False):
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks: the signature holds them
                return torch.jit.trace(call, tensors, check_trace=False)
        except Exception as e:  # an op the tracer cannot record: run eagerly (correct, just slower)
            self.failed = f"{type(e).__name__}: {e}"
            log.warning("tracing %s failed (%s); running it eagerly", getattr(self.fn, "__qualname__", self.fn),
                        self.failed)
            return None


def pad_batch(v: Tensor, n: int, size: int) -> Tensor:
    """v with its first dimension n padded to `size` with copies of its last row; any other tensor as it is."""
    if v.dim() == 0 or v.shape[0] != n or size == n or n == 0:
        return v
    return torch.cat([v, v[-1:].expand(size - n, *v.shape[1:])])


class LetsTalkPipeline:
    """The loaded model plus the sampling settings; stateless across streams (state is in StreamState)."""

    def __init__(
        self,
        components: Components,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        num_steps: int | None = None,
        portrait_guidance: float | None = None,
        audio_guidance: float | None = None,
        memory_noise: float | None = None,
        use_memory: bool = True,
        memory_anchor: bool | None = None,
        window: int | None = None,
        detail_transfer: float | None = None,
        start_time: float | None = None,
        noise_hold: float | None = None,
        audio_guidance_box: tuple[float, float, float, float] | str | None = None,
        noise_draws: int | None = None,
        audio_lookahead: int | None = None,
        cuda_graphs: bool = True,
        traced: bool = True,
    ) -> None:
        self.components = components
        self.config: ModelConfig = components.config
        self.device = torch.device(device)
        self.dtype = dtype  # compute dtype of the transformer and decoder (bf16 autocast on GPU)
        s = self.config.sampling
        self.num_steps = num_steps if num_steps is not None else s.num_steps
        self.portrait_guidance = s.portrait_guidance if portrait_guidance is None else portrait_guidance
        self.audio_guidance = s.audio_guidance if audio_guidance is None else audio_guidance
        if not (self.audio_guidance >= 0 and self.portrait_guidance >= 0):  # NaN fails too
            raise InputError(f"guidance scales must be >= 0 (1 = off), got audio {self.audio_guidance}, "
                             f"portrait {self.portrait_guidance}")
        tc = self.config.transformer
        # x, y, w, h of the face crop audio guidance acts on (SamplingConfig.audio_guidance_box; "all": everywhere)
        box = s.audio_guidance_box if audio_guidance_box is None else audio_guidance_box
        self.audio_guidance_box = None if box == "all" else check_box(box, "audio guidance box")
        # (h, w) its latent cells, None: everywhere
        self._audio_region = None if self.audio_guidance_box is None else \
            box_cells(tc.latent_size, tc.latent_size, self.audio_guidance_box).to(self.device)
        self.noise_hold = s.noise_hold if noise_hold is None else noise_hold
        if not 0 <= self.noise_hold <= 1:
            raise InputError(f"noise hold {self.noise_hold:g}: give the correlation of consecutive frames' noise "
                             "outside the mouth in 0..1 (0 = fresh noise every frame)")
        # (h, w): 1 where a frame's starting noise is always fresh (the mouth), 0 where it follows noise_hold
        self._fresh_cells = torch.zeros(tc.latent_size, tc.latent_size) if s.noise_hold_box is None else \
            box_cells(tc.latent_size, tc.latent_size, s.noise_hold_box)
        self.noise_draws = check_noise_draws(s.noise_draws if noise_draws is None else noise_draws, "noise draws")
        margin = self.config.audio.margin
        # Frames of audio after a frame whose features its tokens wait for (AudioTokenizer); the projector was trained
        # on all `margin` of them, and each one less is 40 ms less latency live. `audio_lookahead` given: offline and
        # live; else the model's for each (SamplingConfig.audio_lookahead, live_audio_lookahead; docs/eval.md)
        self.audio_lookahead = self.live_audio_lookahead = audio_lookahead
        if audio_lookahead is None:
            self.audio_lookahead = margin if s.audio_lookahead is None else s.audio_lookahead
            self.live_audio_lookahead = self.audio_lookahead if s.live_audio_lookahead is None \
                else s.live_audio_lookahead
        for frames in (self.audio_lookahead, self.live_audio_lookahead):
            if isinstance(frames, bool) or not isinstance(frames, int) or not 0 <= frames <= margin:
                raise InputError(f"audio lookahead {frames}: choose 0..{margin} frames (this model's tokens read "
                                 f"{margin} frames of audio on each side of a frame)")
        self.memory_noise = s.memory_noise if memory_noise is None else memory_noise
        # False is an ablation (`letstalk eval`'s memory-off run): the memory bank is never filled, so every
        # window is generated like a stream's first one, with all memory slots masked.
        self.use_memory = use_memory
        self.memory_anchor = s.memory_anchor if memory_anchor is None else memory_anchor
        self.detail_transfer = s.detail_transfer if detail_transfer is None else detail_transfer
        if not self.detail_transfer >= 0:  # NaN fails too
            raise InputError(f"detail transfer {self.detail_transfer}: give the gate's width in grey levels, > 0, "
                             "or 0 to turn it off")
        if start_time is not None and not 0 < start_time <= 1:
            raise InputError(f"start time {start_time}: choose a flow time in (0, 1]; 1 samples from pure noise, "
                             "lower starts from the portrait noised to it")
        self._start_time = start_time  # None: the model's, for its own step count (set_num_steps sets start_time)
        self.sampler = EulerSampler(shift=s.shift)
        self.set_num_steps(self.num_steps)  # raises on a bad step count before any work
        self.window = window or s.stream_window or self.max_window  # frames per window by default
        if not 1 <= self.window <= self.max_window:
            raise InputError(f"window {self.window}: this model generates 1..{self.max_window} frames per window")
        for module in components.modules().values():
            module.to(self.device).eval().requires_grad_(False)
        self.autoencoder = components.autoencoder
        self.audio_encoder = components.audio_encoder
        self.audio_projector = components.audio_projector
        self.transformer = components.transformer
        # On a GPU the transformer, the decoder and the audio encoder run from CUDA graphs (CudaGraphed);
        # `cuda_graphs=False` launches their kernels one by one (eager), as on a CPU.
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        # On a CPU they run from TorchScript traces (Traced: no GIL inside a call); `traced=False`: eager.
        self.traced = traced and self.device.type == "cpu"
        self._transformer_fn: Callable[..., Tensor]  # sampling calls this (see compile, uncompile)
        self._decode_fn: Callable[[Tensor], Tensor]
        self.uncompile()

    # ---------------------------------------------------------------------------------- construction

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, **kwargs) -> "LetsTalkPipeline":
        """Load a model directory (the bundled default when `path` is None)."""
        return cls(load_model(path), **kwargs)

    @classmethod
    def from_config(cls, config: ModelConfig, seed: int = 0, **kwargs) -> "LetsTalkPipeline":
        """Random weights, for benchmarks and tests only: say so explicitly by calling this."""
        return cls(build_components(config, seed=seed), **kwargs)

    @functools.cached_property
    def model_digest(self) -> str:
        """16 hex digits over the autoencoder's and the transformer's weights: what a latent means. A session's motion
        is carried only to a session of a model with the same (stream.motion; the first read hashes the weights)."""
        parts = f"{weights_digest(self.autoencoder)}{weights_digest(self.transformer)}"
        return hashlib.sha256(parts.encode()).hexdigest()[:16]

    @property
    def max_window(self) -> int:
        """The most frames one window can have: the transformer's num_frames."""
        return self.config.transformer.num_frames

    @property
    def fps(self) -> int:
        return self.config.fps

    @property
    def samples_per_frame(self) -> int:
        return self.config.audio.samples_per_frame

    @property
    def compiled(self) -> bool:
        return isinstance(self._transformer_fn, ShapeCompiled)

    def compile(self) -> None:
        """Run the transformer and the decoder through torch.compile (static shapes) for the input shapes
        warmed up inside `compiling()`, eagerly for any other (a new shape never stalls a live stream for a
        compile, which takes minutes on a small CPU). Compiled code is cached on disk by torch, so a later
        start compiles much faster. Needs a C++ compiler on a CPU (Triton on CUDA)."""
        import shutil

        if self.compiled:
            return
        if self.device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise InputError("compiling the model needs a C++ compiler on the PATH (Debian / Ubuntu: "
                             "apt-get install g++); or run without --compile")
        self._transformer_fn = ShapeCompiled(self.transformer)
        self._decode_fn = ShapeCompiled(self.autoencoder.decode)

    @property
    def compiled_threads(self) -> int | None:
        """The torch threads the compiled model's CPU kernels were generated for (None: nothing compiled yet)."""
        return self._transformer_fn.threads if isinstance(self._transformer_fn, ShapeCompiled) else None

    def uncompile(self) -> None:
        """Back from a compile (one that failed) to CUDA graphs or traces where the pipeline has them, else eager."""
        self._transformer_fn, self._decode_fn = self.transformer, self.autoencoder.decode
        self.audio_encoder.encode_fn = None
        if self.cuda_graphs:
            self._transformer_fn = CudaGraphed(self.transformer)
            self._decode_fn = CudaGraphed(self.autoencoder.decode)
            self.audio_encoder.encode_fn = CudaGraphed(self.audio_encoder.encode_blocks)
        elif self.traced:
            self._transformer_fn = Traced(self.transformer)
            self._decode_fn = Traced(self.autoencoder.decode)
            self.audio_encoder.encode_fn = Traced(self.audio_encoder.encode_blocks)

    def _graphed(self) -> dict[str, "CudaGraphed | Traced"]:
        fns = {"transformer": self._transformer_fn, "decoder": self._decode_fn,
               "audio encoder": self.audio_encoder.encode_fn}
        return {k: f for k, f in fns.items() if isinstance(f, (CudaGraphed, Traced))}

    def capture_graphs(self, on: bool) -> None:
        """Whether a batch size met for the first time is captured in a CUDA graph or traced (on; the default)
        or runs eagerly (off: what the engine does live, after capturing every size it can run at warm-up)."""
        for f in self._graphed().values():
            f.capture = on

    def graph_failures(self) -> dict[str, str]:
        """What could not be captured in CUDA graphs (and runs eagerly), by part; {} when all could."""
        return {k: f.failed for k, f in self._graphed().items() if f.failed}

    @contextmanager
    def compiling(self) -> Iterator[None]:
        """Inside: every input shape the compiled transformer and decoder meet is compiled and kept."""
        fns = [f for f in (self._transformer_fn, self._decode_fn) if isinstance(f, ShapeCompiled)]
        for f in fns:
            f.warming = True
        try:
            yield
        finally:
            for f in fns:
                f.warming = False

    def _autocast(self):
        enabled = self.dtype != torch.float32
        # No cast cache: a CUDA graph captured with one would replay casts into memory the cache freed when
        # the region ended (and each weight is cast once per region here anyway).
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=enabled, cache_enabled=False)

    # ---------------------------------------------------------------------------------- conditions

    @torch.no_grad()
    def prepare_portrait(self, image: np.ndarray, detect: bool = True, name: str = "portrait") -> Portrait:
        """Crop the face (detect=True) or centre-crop a square, resize, and encode it. `image`: uint8 (H, W, 3) RGB;
        also (H, W) or (H, W, 1) grey, (H, W, 4) RGBA (on white, as `load_image` reads a file), or a PIL image."""
        from PIL import Image

        from .face import centre_square, cut_square, face_square
        from .media import upright_image
        from .models.autoencoder import encode_frames

        if isinstance(image, Image.Image):
            image = upright_image(image)
        image = np.asarray(image)
        if image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 4))):
            image = upright_image(Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image))
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            tip = ("; channels first? give image.transpose(1, 2, 0)" if image.ndim == 3 and image.shape[0] in (1, 3, 4)
                   else "; floats in 0..1? give (image * 255).round().astype(np.uint8)" if image.dtype.kind == "f"
                   else "")
            raise InputError(f"{name}: expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}{tip}")
        box = face_square(image, name=name) if detect else centre_square(image)
        crop = cut_square(image, box, self.config.image_size)
        latent = encode_frames(self.autoencoder, crop[None]).to(self.device, torch.float32)[0]  # (C, h, w)
        h, w = image.shape[:2]
        scale = min(1.0, MAX_PHOTO_SIDE / max(h, w))
        photo = image.copy() if scale == 1 else \
            np.array(Image.fromarray(image).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS))
        box = tuple(round(v * scale) for v in box)
        return Portrait(image=crop, latent=latent, photo=photo, box=box)  # type: ignore[arg-type]

    def portrait_on_device(self, portrait: Portrait) -> Portrait:
        """A copy of a portrait another pipeline prepared (another device), its tensors on this one's device."""
        return replace(portrait, latent=portrait.latent.to(self.device, torch.float32),
                       detail=None if portrait.detail is None else portrait.detail.to(self.device),
                       recon_blur=None if portrait.recon_blur is None else portrait.recon_blur.to(self.device))

    def full_frame(self, portrait: Portrait, max_side: int = FULL_FRAME_SIDE, framing: float = FRAMING) -> FullFrame:
        """One stream's paster of `portrait`'s animated crops back into its photo, frames at most `max_side` px, with
        the photo's detail back where the face keeps still (gated as the model's detail transfer is). The frames show
        at most `framing` sides of the face's square around it on their shorter side (`framing.framed`; 0: the whole
        photo)."""
        if portrait.photo is None or portrait.box is None:
            raise InputError("this portrait was prepared without its photo; prepare it from the photo for full frames")
        sampling = self.config.sampling
        gate = DetailGate(width=sampling.detail_transfer or DETAIL_WIDTH,
                          sigma=sampling.detail_blur * self.config.image_size,
                          decay=0.5 ** (1 / (sampling.detail_half_life_s * self.fps)))
        photo, box = framed(portrait.photo, portrait.box, framing)
        return FullFrame(photo, box, max_side, crop=portrait.image, gate=gate)

    def new_stream(self, portrait: Portrait, seed: int = 0) -> StreamState:
        return StreamState(
            portrait=portrait,
            memory=MemoryBank(self.config.transformer.num_memory, anchor=portrait.latent.float().cpu()
                              if self.memory_anchor and self.use_memory else None,
                              anchor_hide=self.config.sampling.anchor_mouth_box),
            generator=torch.Generator().manual_seed(seed),
        )

    def audio_tokenizer(self, live: bool = False) -> AudioTokenizer:
        """An incremental tokenizer at the pipeline's audio lookahead; `live`: the live engine's."""
        return AudioTokenizer(self, self.live_audio_lookahead if live else self.audio_lookahead)

    @torch.no_grad()
    def project_audio(self, feats: Tensor, pad_left: bool = True, pad_right: bool = True) -> Tensor:
        """Per-frame features (F, L, D) -> tokens (F', M, Dt) (see AudioProjector)."""
        return self.audio_projector(feats[None].to(self.device), pad_left=pad_left, pad_right=pad_right)[0]

    def set_num_steps(self, num_steps: int) -> None:
        """Sampling steps per window from the next window on (checked first: a bad count changes nothing).

        The start time is the one given, else the model's `sampling.start_time` when sampling with the model's
        own step count (it is tuned for that count), else 1: on the bundled model starting from the portrait
        helps its 1 step and costs lip sync at 2 and 4 (docs/eval.md)."""
        s = self.config.sampling
        start = self._start_time if self._start_time is not None else (
            s.start_time if num_steps == s.num_steps else 1.0)
        self.sampler.set_timesteps(num_steps, start)
        self.num_steps, self.start_time = num_steps, start

    @torch.no_grad()
    def audio_tokens(self, wav: np.ndarray) -> Tensor:
        """Offline: a whole 16 kHz mono signal -> tokens (F, M, Dt), F = ceil(len / samples_per_frame)."""
        x = torch.as_tensor(np.asarray(wav, dtype=np.float32), device=self.device)[None]  # (1, S)
        feats = self.audio_encoder(x)[0]  # (F, L, D)
        return self.project_audio(feats)

    def silence_tokens(self, n: int) -> Tensor:
        """Tokens of n frames of silence (for idle streams and padding the last window)."""
        tok = self.audio_tokenizer()
        head = tok.push(np.zeros(n * self.samples_per_frame, dtype=np.float32))  # (n', M, Dt)
        return torch.cat([head, tok.flush()])  # (n, M, Dt)

    # ---------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_latents(self, streams: list[StreamState], tokens: list[Tensor]) -> Tensor:
        """One window for each stream, batched: tokens[i] is (T, M, Dt) -> clean latents (B, T, C, h, w).

        Updates each stream's memory bank. All streams of a batch generate the same number of frames
        T, 1 <= T <= window (short windows let a live stream show its first frame, or the frame after
        an interrupt, sooner). With noise_draws K > 1 each stream is sampled K times in the same batch, from
        K starting noises, and its window is their mean.
        """
        if len(streams) != len(tokens) or not streams:
            raise ValueError("generate_latents needs one token tensor per stream, and at least one stream")
        tcfg = self.config.transformer
        T = tokens[0].shape[0]
        shape = (tcfg.latent_channels, tcfg.latent_size, tcfg.latent_size)
        if not 1 <= T <= self.max_window or any(tok.shape[0] != T for tok in tokens):
            raise ValueError(f"every stream of a batch needs tokens for the same 1..{self.max_window} frames, "
                             f"got {[tok.shape[0] for tok in tokens]}")
        dev, K = self.device, self.noise_draws
        noise, memory, mask = [], [], []
        for s in streams:
            noise += [self._start_noise(s, T, shape, d) for d in range(K)]  # K x (T, C, h, w)
            m, k = s.memory.condition(shape, self.memory_noise, s.generator, torch.device("cpu"), torch.float32)
            memory.append(m)
            mask.append(k)

        def each_draw(z: list[Tensor]) -> Tensor:  # B x (...) -> (B K, ...): a stream's draws side by side
            stacked = torch.stack(z).to(dev)
            return stacked if K == 1 else stacked.repeat_interleave(K, dim=0)

        x = torch.stack(noise).to(dev)  # (B K, T, C, h, w)
        mem = each_draw(memory)  # (B K, K_mem, C, h, w)
        msk = each_draw(mask)  # (B K, K_mem, h, w)
        por = each_draw([s.portrait.latent for s in streams])  # (B K, C, h, w)
        if self.start_time < 1:  # start from the portrait noised to start_time (SDEdit), not from pure noise
            x = from_portrait(por, x, self.start_time)  # (B K, T, C, h, w)
        aud = each_draw(tokens)  # (B K, T, M, Dt)
        guide = Guidance(self.portrait_guidance, self.audio_guidance, self._audio_region, portrait=por, audio=aud,
                         memory=mem, memory_mask=msk)  # conditions stacked once per window, for every guidance row
        for t in self.sampler.timesteps:
            tt = torch.full((x.shape[0],), float(t), device=dev)  # (B K,)
            with self._autocast():
                v = guide.velocity(self._transformer_fn, x, tt)  # (B K, T, C, h, w)
            x = self.sampler.step(v, t, x)  # (B K, T, C, h, w)
        if K > 1:
            x = x.unflatten(0, (len(streams), K)).mean(1)  # (B, T, C, h, w)
        kept = x.float().cpu() if self.use_memory else None  # (B, T, C, h, w): one copy for the batch
        if kept is not None and not bool(torch.isfinite(kept).all()):
            x = self._without_non_finite(x, kept, streams)
        for i, s in enumerate(streams):
            if kept is not None:
                s.memory.update(kept[i])
            s.windows_done += 1
        return x

    def _without_non_finite(self, x: Tensor, kept: Tensor, streams: list[StreamState]) -> Tensor:
        """A window that came out NaN or infinite for some streams (a half-precision overflow, a broken checkpoint):
        those streams show their portrait for it and remember that instead. Their memory bank would otherwise carry
        the NaN into every later window, and the session would stay black for good. `kept` is repaired in place."""
        x = x.clone()
        for i in (~torch.isfinite(kept)).flatten(1).any(1).nonzero().flatten().tolist():
            streams[i].non_finite_windows += 1
            log.warning("a window came out NaN or infinite (%d so far for this stream); its portrait is shown instead",
                        streams[i].non_finite_windows)
            still = streams[i].portrait.latent.float().cpu().expand_as(kept[i])  # (T, C, h, w)
            kept[i] = still
            x[i] = still.to(x.device, x.dtype)
        return x

    def _start_noise(self, stream: StreamState, T: int, shape: tuple[int, int, int], draw: int = 0) -> Tensor:
        """The noise one window of `stream` starts from (its noise draw `draw`): (T, C, h, w), fresh from its
        generator, or outside `noise_hold_box` changing slowly from frame to frame (SamplingConfig.noise_hold),
        each draw its own slowly changing field. The generator's draws are the same either way, so a setting is
        compared with another on the same noise."""
        fresh = torch.randn((T, *shape), generator=stream.generator)
        hold = self.noise_hold
        if hold <= 0:
            return fresh
        frames, prev = [], stream.held_noise.get(draw)
        for f in fresh:  # each frame's noise is the last one's times `hold` plus fresh noise (unit variance kept)
            prev = f if prev is None else hold * prev + math.sqrt(1 - hold * hold) * f  # a stream's first: as drawn
            frames.append(prev)
        stream.held_noise = {**stream.held_noise, draw: prev}
        slow = torch.stack(frames)  # (T, C, h, w): frames k apart correlated by hold ** k
        keep = self._fresh_cells  # (h, w): 1 on the mouth's cells, which stay fresh
        return keep * fresh + (1 - keep) * slow

    @torch.no_grad()
    def decode(self, latents: Tensor, streams: list[StreamState] | None = None) -> np.ndarray:
        """Latents (N, C, h, w) -> uint8 RGB frames (N, H, W, 3).

        With the B `streams` they belong to (N = B * T, stream by stream, each stream's T frames in order) and
        detail transfer on, each frame gets back the fine detail of its stream's portrait that the autoencoder
        loses, wherever that part of the picture has kept still (see `transfer_detail`)."""
        from .models.autoencoder import decode_frames, frames_to_uint8

        with self._autocast():  # in chunks: a big batch's full-resolution activations would need tens of GB
            x = torch.cat([decode_frames(self.autoencoder, part, self._decode_fn)
                           for part in latents.split(DECODE_CHUNK)])  # (N, 3, H, W) in [-1, 1]
        if self.detail_transfer > 0 and streams is not None:
            if not streams or x.shape[0] % len(streams):
                raise ValueError(f"decode got {x.shape[0]} latents for {len(streams)} streams; give each the same count")
            sampling = self.config.sampling
            sigma = sampling.detail_blur * x.shape[-1]
            decay = 0.5 ** (1 / (sampling.detail_half_life_s * self.fps))
            out = []
            for s, frames in zip(streams, x.chunk(len(streams))):  # (T, 3, H, W) each
                self._prepare_detail(s.portrait, sigma)
                y, s.detail_moved = transfer_detail(frames, s.portrait.detail, s.portrait.recon_blur,  # type: ignore[arg-type]
                                                    s.detail_moved, self.detail_transfer / 127.5, sigma, decay)
                out.append(y)
            x = torch.cat(out)
        return frames_to_uint8(x)

    @torch.no_grad()
    def _prepare_detail(self, portrait: Portrait, sigma: float) -> None:
        """Fill the portrait's detail and blurred reconstruction (once: a stream's portrait does not change)."""
        from .models.autoencoder import decode_frames, frames_from_uint8

        if portrait.detail is not None:
            return
        with self._autocast():
            recon = decode_frames(self.autoencoder, portrait.latent[None].to(self.device))  # (1, 3, H, W)
        image = frames_from_uint8(portrait.image[None], recon.device)  # (1, 3, H, W) in [-1, 1]
        if image.shape != recon.shape:
            raise InputError(f"portrait image {tuple(portrait.image.shape)} does not match the model's "
                             f"{recon.shape[-1]} px frames")
        portrait.detail = image[0] - recon[0]
        portrait.recon_blur = gaussian_blur(recon, sigma)[0]

    def generate_windows(self, streams: list[StreamState], tokens: list[Tensor]) -> list[np.ndarray]:
        """One window per stream, batched; returns (T, H, W, 3) uint8 frames per stream."""
        lat = self.generate_latents(streams, tokens)  # (B, T, C, h, w)
        frames = self.decode(lat.flatten(0, 1), streams)  # (B*T, H, W, 3)
        return list(frames.reshape(len(streams), lat.shape[1], *frames.shape[1:]))

    def generate(
        self, portrait: Portrait, audio: np.ndarray, seed: int = 0,
        on_window: Callable[[int, int], None] | None = None,
    ) -> Iterator[np.ndarray]:
        """Offline: yield exactly ceil(len(audio) / 640) frames (H, W, 3) uint8 for 16 kHz mono audio (float in -1..1,
        or int16; NaN, infinite or int16-scaled floats raise InputError before the first frame).

        Audio is consumed a window at a time through the same incremental tokenizer the live engine
        uses, so memory stays flat for any length. `on_window(done, total)` reports progress.
        """
        audio = np.asarray(audio)
        if audio.ndim != 1:
            raise InputError(f"audio must be 16 kHz mono samples shaped (n,), got {audio.shape} (load_audio reads a "
                             "file so)")
        if problem := float_pcm_problem(audio):  # a NaN would black out every frame after it (the memory carries it)
            raise InputError(problem)
        audio = audio.astype(np.float32) / 32768.0 if audio.dtype == np.int16 else audio.astype(np.float32)
        spf, T = self.samples_per_frame, self.window
        n_frames = max(1, math.ceil(len(audio) / spf))
        total_windows = math.ceil(n_frames / T)
        stream = self.new_stream(portrait, seed)
        tokenizer = self.audio_tokenizer()
        pending: list[Tensor] = []  # token rows not yet generated
        n_pending = 0
        emitted = 0
        chunk = T * spf
        pos = 0
        finished = False
        while emitted < n_frames:
            if n_pending < T and not finished:
                if pos < len(audio):
                    new = tokenizer.push(audio[pos:pos + chunk])
                    pos += chunk
                else:
                    new = tokenizer.flush()
                    finished = True
                if new.shape[0]:
                    pending.append(new)
                    n_pending += new.shape[0]
                continue
            window = torch.cat(pending)  # (n_pending, M, Dt)
            if window.shape[0] < T:  # the last, short window: pad with silence, drop the extra frames
                window = torch.cat([window, self.silence_tokens(T - window.shape[0]).to(window)])
            frames = self.generate_windows([stream], [window[:T]])[0]  # (T, H, W, 3)
            rest = window[T:]
            pending, n_pending = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)
            if on_window is not None:
                on_window(stream.windows_done, total_windows)
            for frame in frames[: n_frames - emitted]:
                emitted += 1
                yield frame
        if emitted == 0:
            raise InputError("audio too short to make a single frame")


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of images (N, C, H, W), edges reflected.

    Each pass is a product with an (n, n) matrix that holds the kernel and the reflection (`blur_matrix`):
    the same sums as a reflect-padded depthwise conv, about twice as fast on a CPU (a 128 px frame at 1 torch
    thread: 0.89 -> 0.39 ms, where oneDNN's depthwise conv with a 1x21 kernel was slow; docs/benchmarks.md)."""
    r = max(1, min(math.ceil(3 * sigma), x.shape[-1] - 1, x.shape[-2] - 1))
    along_w = blur_matrix(x.shape[-1], sigma, r, x.device, x.dtype)  # (W, W)
    along_h = blur_matrix(x.shape[-2], sigma, r, x.device, x.dtype)  # (H, H)
    return along_h.t() @ (x @ along_w)  # (N, C, H, W)


@functools.lru_cache(maxsize=16)
def blur_matrix(n: int, sigma: float, r: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(n, n) M with `signal @ M` = a Gaussian of `sigma` (radius r < n) along a length-n signal whose edges are
    reflected (F.pad's "reflect": ... x2 x1 | x0 x1 x2 ...). Cached: not an inference tensor, whatever mode the
    first call ran in, so a later call with autograd on can use it."""
    with torch.inference_mode(False):
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
        k = k / k.sum()  # (2r+1,)
        src = (torch.arange(n)[:, None] + torch.arange(-r, r + 1)[None]).abs()  # (n, 2r+1): output i's input taps
        src = torch.where(src > n - 1, 2 * (n - 1) - src, src)  # reflected at the far edge
        m = torch.zeros(n, n, dtype=torch.float64)  # row: input position, column: output position
        m.index_put_((src.flatten(), torch.arange(n).repeat_interleave(2 * r + 1)), k.repeat(n), accumulate=True)
        return m.to(device, dtype)


def transfer_detail(frames: Tensor, detail: Tensor, recon_blur: Tensor, moved: Tensor | None, width: float,
                    sigma: float, decay: float) -> tuple[Tensor, Tensor]:
    """Add a portrait's lost detail (3, H, W) to consecutive frames (T, 3, H, W) of its stream, all in [-1, 1].

    Per pixel, d = channel-mean |blurred frame - blurred reconstruction| says how far the picture has moved
    away from the portrait; `moved` (1, H, W) keeps the largest recent d, fading by `decay` per frame, and
    the detail is weighted by exp(-(moved / width)^2). So a region the stream animates (the mouth while
    talking, blinking eyes, a turned head) keeps its generated look for a while, instead of having the
    portrait's detail switched on and off with every small movement, and nothing of the portrait is pasted
    over motion. Returns the frames and the updated `moved` (None: the stream's first frame)."""
    d = (gaussian_blur(frames, sigma) - recon_blur).abs().mean(1, keepdim=True)  # (T, 1, H, W)
    held = []
    for t in range(d.shape[0]):
        moved = d[t] if moved is None else torch.maximum(moved * decay, d[t])  # (1, H, W)
        held.append(moved)
    weight = torch.exp(-(torch.stack(held) / width) ** 2)  # (T, 1, H, W)
    return frames + weight * detail, moved  # type: ignore[return-value]


@dataclass
class GenerationResult:
    path: Path
    frames: int
    seconds: float  # duration of the audio written


def generate_video(
    portrait: str | Path | np.ndarray,
    audio: str | Path | np.ndarray,
    out: str | Path,
    model: str | Path | None = None,
    pipeline: LetsTalkPipeline | None = None,
    num_steps: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    detect_face: bool = True,
    progress: bool = True,
    name: str | None = None,
    full_frame: int = 0,
    framing: float = FRAMING,
) -> GenerationResult:
    """Animate `portrait` (an image file, or (H, W, 3) uint8 RGB) with `audio` (a file PyAV reads, or 16 kHz mono
    float32 samples) and write an H.264 + AAC mp4 to `out` (atomically). `name`: the portrait in messages.
    `full_frame` N > 0: the whole photo talks, its longest side at most N px (`framing.FullFrame`), showing at most
    `framing` sides of the face's square around it on its shorter side (0: the whole photo however small the face);
    0: the face crop at the model's size.

    Every input is checked before the model runs; on any error nothing is left at `out`.
    """
    from .media import VideoWriter, load_audio, load_image

    wav = audio if isinstance(audio, np.ndarray) else load_audio(audio)  # InputError: unreadable / empty
    if not len(wav):
        raise InputError("the audio is empty; give speech to animate")
    image = portrait if isinstance(portrait, np.ndarray) else load_image(portrait)  # InputError: not an image
    if name is None:
        name = "the portrait" if isinstance(portrait, np.ndarray) else str(portrait)
    if pipeline is None:
        pipeline = LetsTalkPipeline.from_pretrained(model, device=device, num_steps=num_steps)
    prepared = pipeline.prepare_portrait(image, detect=detect_face, name=name)  # NoFaceError
    paste = pipeline.full_frame(prepared, full_frame, framing) if full_frame else None  # InputError: out of range
    spf = pipeline.samples_per_frame
    n_frames = max(1, math.ceil(len(wav) / spf))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_frames, unit="frame", desc="generating", dynamic_ncols=True)
    size = pipeline.config.image_size if paste is None else paste.size
    with VideoWriter(out, size, fps=pipeline.fps) as writer:  # OutputError at open
        for i, frame in enumerate(pipeline.generate(prepared, wav, seed=seed)):
            writer.write_frame(frame if paste is None else paste(frame))
            writer.write_audio(wav[i * spf:(i + 1) * spf])
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return GenerationResult(path=Path(out), frames=n_frames, seconds=len(wav) / pipeline.config.audio.sample_rate)
