"""Audio encoders: 16 kHz speech -> per-video-frame features, offline and incrementally, identically.

    AudioEncoder.forward: (B, S) float32 at 16 kHz -> (B, F, L, D)     F = ceil(S / 640)
    AudioEncoder.stream(): an AudioStream; push(pcm) -> (n, L, D) for the frames that became final,
                           flush() -> the rest. Concatenated, they equal forward() on the whole signal.
    AudioProjector:        (B, F, L, D) -> (B, F', M, token_dim), each frame seeing frames i-m..i+m

Video frame i owns samples [640 i, 640 (i + 1)); the signal is zero before sample 0 and after its end.

How streaming equals offline by construction: every encoder works on *blocks* of `block_frames` video
frames, and block n's features are a function of one fixed window of samples only,

    [n * block_len - left_samples,  (n + 1) * block_len + right_samples)      block_len = block_frames * 640

`forward()` zero-pads the signal on both sides, cuts all the windows at once and encodes them;
`AudioStream` buffers samples until a window is complete and encodes it; `flush()` appends the same
zeros `forward()` pads with. Nothing depends on where the audio was cut into chunks, and the stream
keeps only the samples of windows not yet encoded (at most `window_samples` plus the latest chunk).

  * MelAudioEncoder: block = 1 frame. The window holds the STFT frames of `mel_context` mel frames
    before the video frame, its own 640 / hop_length, and `mel_lookahead` after; a small transformer
    runs over those mel frames and each of its L layers gives one hidden state (pooled over the frame's
    own mel frames). STFT frames are uncentred with a fixed left padding of (n_fft - hop) / 2, so mel
    frame j is centred on its 10 ms hop. With the defaults (n_fft 400, hop 160, context 8, lookahead 4)
    the window is 1400 + 640 + 760 samples: lookahead_samples = 760 = 47.5 ms (presets tiny and cpu-128).
  * Wav2Vec2AudioEncoder: wav2vec2 attends over its whole input, so it runs on fixed chunks of
    `wav2vec2_chunk_seconds` (a whole number of video frames) with `wav2vec2_context_seconds` of left
    context and the conv front end's spill-over (80 samples for wav2vec2-base) on the right. Features of
    a chunk are final only once the whole chunk is in: lookahead_samples is the worst case, the chunk's
    first frame: chunk - 640 + 80 samples = 1.965 s at the 2 s default, 5 ms at the live presets' one
    frame (wav2vec2 then runs once per frame on 1.045 s of audio: streams share the call, see
    `pipeline.encode_together`). The 50 Hz hidden states are averaged in pairs to 25 fps.

Sections: mel front end, the encoder interface and its stream, mel encoder, wav2vec2 encoder, projector,
factory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor, nn

from ..config import AudioConfig
from ..errors import ModelError
from .letstalk import softmax_attention

# --------------------------------------------------------------------------------------------------
# Mel front end
# --------------------------------------------------------------------------------------------------


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    mel = f / f_sp
    log_part = min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log_part, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    log_part = min_log_hz * np.exp(logstep * (m - min_log_mel))
    return np.where(m >= min_log_mel, log_part, f_sp * m)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> Tensor:
    """(n_fft // 2 + 1, n_mels) triangular filters on the Slaney mel scale, Slaney area-normalised
    (librosa.filters.mel's defaults), computed in float64 and returned as float32."""
    fmax = sample_rate / 2 if fmax is None else fmax
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)  # (K,) FFT bin centres in Hz
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))  # (n_mels + 2,)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    up = (freqs[None] - lo) / (mid - lo)  # (n_mels, K)
    down = (hi - freqs[None]) / (hi - mid)  # (n_mels, K)
    weights = np.maximum(0.0, np.minimum(up, down)) * (2.0 / (hi - lo))  # (n_mels, K)
    return torch.from_numpy(weights.T.astype(np.float32))  # (K, n_mels)


class LogMel(nn.Module):
    """Sample windows -> log-mel frames: uncentred STFT (periodic Hann), power, mel, log10.

    Uncentred means STFT frame j of a window covers exactly its samples [j hop, j hop + n_fft): the
    caller places windows so frames land where it wants them. Scaling as Whisper's front end without its
    per-utterance max clamp (not incremental): log10(max(mel, 1e-10)), then (x + 4) / 4.
    """

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int) -> None:
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        # Derived from the config, so not stored in checkpoints (persistent=False).
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)  # (n_fft,)
        self.register_buffer("filters", mel_filterbank(sample_rate, n_fft, n_mels), persistent=False)  # (K, n_mels)

    def forward(self, x: Tensor) -> Tensor:
        spec = torch.stft(x.float(), self.n_fft, self.hop_length, window=self.window, center=False,
                          return_complex=True)  # (N, K, J)
        power = spec.real.square() + spec.imag.square()  # (N, K, J)
        mel = torch.einsum("nkj,km->njm", power, self.filters)  # (N, J, n_mels)
        return (torch.log10(mel.clamp_min(1e-10)) + 4.0) / 4.0  # (N, J, n_mels)


# --------------------------------------------------------------------------------------------------
# The encoder interface and its stream
# --------------------------------------------------------------------------------------------------


class AudioEncoder(nn.Module):
    """Base class: block windowing, offline forward and the incremental stream, shared by every encoder.

    A subclass sets `block_frames`, `left_samples`, `right_samples` in __init__ and implements
    `encode_blocks`, which must compute each block from its own window only (no cross-window state).
    """

    config: AudioConfig
    block_frames: int  # video frames encoded together (and emitted together by a stream)
    left_samples: int  # samples before a block's first frame its window includes
    right_samples: int  # samples after a block's last frame its window includes
    max_blocks_per_call: int = 64  # blocks encoded per batch in forward()/push(): bounds peak memory

    def __init__(self, config: AudioConfig) -> None:
        super().__init__()
        self.config = config
        self.samples_per_frame = config.samples_per_frame

    # -- window geometry

    @property
    def block_samples(self) -> int:
        return self.block_frames * self.samples_per_frame

    @property
    def window_samples(self) -> int:
        """Samples one block's features are computed from."""
        return self.left_samples + self.block_samples + self.right_samples

    @property
    def lookahead_samples(self) -> int:
        """Samples past the end of frame i needed before frame i is final; the worst case over a block
        (its first frame), which is the exact value when block_frames == 1."""
        return (self.block_frames - 1) * self.samples_per_frame + self.right_samples

    @property
    def lookahead_ms(self) -> float:
        return 1000.0 * self.lookahead_samples / self.config.sample_rate

    def num_frames(self, num_samples: int) -> int:
        """Video frames of a signal of `num_samples` samples: ceil(S / 640), the last one zero-padded."""
        return -(-num_samples // self.samples_per_frame)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    # -- the work

    # What _encode_windows calls for encode_blocks: a pipeline on a GPU sets a CUDA-graphed version of it
    # (pipeline.CudaGraphed), on a CPU a traced one (pipeline.Traced); None: encode_blocks itself.
    encode_fn: Callable[[Tensor], Tensor] | None = None

    def encode_blocks(self, windows: Tensor) -> Tensor:
        """(N, window_samples) -> (N, block_frames, L, D)."""
        raise NotImplementedError

    def _encode_windows(self, windows: Tensor) -> Tensor:
        """(N, window_samples) -> (N * block_frames, L, D), in batches of `max_blocks_per_call`."""
        cfg = self.config
        windows = windows.to(self.device)  # (N, W)
        encode = self.encode_fn or self.encode_blocks
        out = [encode(windows[s:s + self.max_blocks_per_call])  # (n, bf, L, D)
               for s in range(0, windows.shape[0], self.max_blocks_per_call)]
        if not out:
            return windows.new_zeros((0, cfg.feature_layers, cfg.feature_dim))  # (0, L, D)
        return torch.cat(out).flatten(0, 1)  # (N * bf, L, D)

    def forward(self, wav: Tensor) -> Tensor:
        """(B, S) float 16 kHz mono -> (B, F, L, D), F = ceil(S / 640)."""
        if wav.ndim != 2:
            raise ValueError(f"AudioEncoder expects a (batch, samples) tensor, got shape {tuple(wav.shape)}")
        B, S = wav.shape
        n_frames = self.num_frames(S)
        n_blocks = -(-n_frames // self.block_frames)
        if n_blocks == 0:
            return wav.new_zeros((B, 0, self.config.feature_layers, self.config.feature_dim), dtype=torch.float32)
        right = n_blocks * self.block_samples + self.right_samples - S
        padded = F.pad(wav.float(), (self.left_samples, right))  # (B, left + n_blocks*block + right)
        windows = padded.unfold(1, self.window_samples, self.block_samples)  # (B, n_blocks, W) view
        feats = self._encode_windows(windows.flatten(0, 1))  # (B*n_blocks*bf, L, D)
        feats = rearrange(feats, "(b f) l d -> b f l d", b=B)  # (B, n_blocks*bf, L, D)
        return feats[:, :n_frames]  # (B, F, L, D)

    def stream(self) -> AudioStream:
        """A fresh incremental encoder state for one audio stream."""
        return AudioStream(self)


class AudioStream:
    """Incremental encoding of one signal; push() and flush() together equal AudioEncoder.forward().

    Samples are kept as a list of numpy chunks and joined only when a window completes, so pushing one
    sample at a time costs O(1) per push. After encoding, samples no window needs any more are dropped:
    `buffered_samples` never exceeds `window_samples` plus the last chunk pushed.
    """

    def __init__(self, encoder: AudioEncoder) -> None:
        self.encoder = encoder
        self.frames_emitted = 0
        self.samples_received = 0
        # Samples from the next block's window start on; the window of block 0 starts with zeros.
        self._chunks: list[np.ndarray] = [np.zeros(encoder.left_samples, dtype=np.float32)]
        self._buffered = encoder.left_samples
        self._finished = False

    @property
    def buffered_samples(self) -> int:
        """Samples held now (bounded: at most window_samples + the last chunk pushed)."""
        return self._buffered

    @staticmethod
    def _as_samples(pcm) -> np.ndarray:
        if isinstance(pcm, Tensor):
            pcm = pcm.detach().to("cpu", torch.float32).numpy()
        x = np.asarray(pcm, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"AudioStream.push expects 1-D mono samples, got shape {x.shape}")
        return x

    def _empty(self) -> Tensor:
        cfg = self.encoder.config
        return torch.zeros((0, cfg.feature_layers, cfg.feature_dim), device=self.encoder.device)  # (0, L, D)

    def _cut(self, n_blocks: int) -> Tensor:
        """The next `n_blocks` complete windows (n_blocks, W) on the CPU; drops the samples they alone needed."""
        enc = self.encoder
        buf = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]  # (n,)
        used = n_blocks * enc.block_samples
        span = used - enc.block_samples + enc.window_samples
        windows = torch.from_numpy(buf[:span]).unfold(0, enc.window_samples, enc.block_samples)  # (n_blocks, W)
        rest = buf[used:].copy()  # a copy, so the old buffer's memory goes with the windows
        self._chunks, self._buffered = [rest], len(rest)
        return windows

    def cut(self, pcm) -> Tensor:
        """push() without the encoding: append the samples and return the windows (n, W) they complete,
        whose `encoder._encode_windows` is what push() returns. Lets many streams' windows be encoded in
        one call (`pipeline.encode_together`)."""
        if self._finished:
            raise RuntimeError("AudioStream.push after flush(): start a new stream with encoder.stream()")
        x = self._as_samples(pcm)
        if len(x):
            self._chunks.append(x)
            self._buffered += len(x)
            self.samples_received += len(x)
        enc = self.encoder
        if self._buffered < enc.window_samples:
            return torch.zeros((0, enc.window_samples))  # (0, W)
        n_blocks = (self._buffered - enc.window_samples) // enc.block_samples + 1
        self.frames_emitted += n_blocks * enc.block_frames
        return self._cut(n_blocks)

    @torch.no_grad()
    def push(self, pcm) -> Tensor:
        """Append 16 kHz mono float samples (any length, even 0); returns (n, L, D) newly final frames."""
        windows = self.cut(pcm)
        return self.encoder._encode_windows(windows) if windows.shape[0] else self._empty()

    @torch.no_grad()
    def flush(self) -> Tensor:
        """End of audio: zero-pad as forward() does and return the remaining frames (n, L, D).
        The stream is finished afterwards (push raises; flush again returns nothing)."""
        if self._finished:
            return self._empty()
        self._finished = True
        enc = self.encoder
        left = enc.num_frames(self.samples_received) - self.frames_emitted  # frames still owed
        if left <= 0:
            self._chunks, self._buffered = [], 0
            return self._empty()
        n_blocks = -(-left // enc.block_frames)
        need = (n_blocks - 1) * enc.block_samples + enc.window_samples
        self._chunks.append(np.zeros(max(0, need - self._buffered), dtype=np.float32))
        feats = self.encoder._encode_windows(self._cut(n_blocks))[:left]  # (left, L, D)
        self._chunks, self._buffered = [], 0
        self.frames_emitted += left
        return feats


# --------------------------------------------------------------------------------------------------
# Mel encoder (learned, no pretrained weights)
# --------------------------------------------------------------------------------------------------


class _EncoderLayer(nn.Module):
    """Pre-norm transformer layer over the mel frames of one video frame's window."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv(self.norm1(x))  # (N, W, 3D)
        q, k, v = rearrange(qkv, "n w (three h e) -> three n h w e", three=3, h=self.num_heads)  # (N, h, W, e)
        a = softmax_attention(q, k, v)  # (N, h, W, e)
        x = x + self.proj(rearrange(a, "n h w e -> n w (h e)"))  # (N, W, D)
        return x + self.mlp(self.norm2(x))  # (N, W, D)


class MelAudioEncoder(AudioEncoder):
    """Log-mel front end + a small transformer per video frame; its L layers give the L features.

    Each video frame is one block whose window spans `mel_context` mel frames before the frame, the
    frame's own `640 / hop_length` and `mel_lookahead` after (16 mel frames with the defaults). The
    transformer attends within that window; layer l's output, averaged over the frame's own mel frames,
    is feature l -- the same "stack of hidden states" shape wav2vec2 gives, so the projector and the
    transformer do not care which encoder made the features.
    """

    max_blocks_per_call = 512

    def __init__(self, config: AudioConfig) -> None:
        super().__init__(config)
        spf, hop, n_fft = config.samples_per_frame, config.hop_length, config.n_fft
        if spf % hop or n_fft < hop:
            raise ModelError(f"audio.hop_length={hop} must divide the {spf} samples of a video frame and be "
                             f"at most audio.n_fft={n_fft} (defaults: hop_length 160, n_fft 400)")
        if config.mel_context < 0 or config.mel_lookahead < 0:
            raise ModelError("audio.mel_context and audio.mel_lookahead must be >= 0")
        self.mels_per_frame = spf // hop  # 4
        self.stft_left = (n_fft - hop) // 2  # STFT frame j covers [j hop - 120, j hop + 280): centred on its hop
        self.block_frames = 1
        self.left_samples = config.mel_context * hop + self.stft_left  # 1400 with the defaults
        self.right_samples = (config.mel_lookahead - 1) * hop + n_fft - self.stft_left  # 760 with the defaults
        self.num_mel_frames = config.mel_context + self.mels_per_frame + config.mel_lookahead  # 16

        D = config.feature_dim
        heads = max(1, D // 64) if D % max(1, D // 64) == 0 else 1  # head dim ~64
        self.log_mel = LogMel(config.sample_rate, n_fft, hop, config.n_mels)
        self.in_proj = nn.Linear(config.n_mels, D)
        self.pos_embed = nn.Parameter(torch.zeros(self.num_mel_frames, D))  # (W, D) learned positions
        self.layers = nn.ModuleList([_EncoderLayer(D, heads) for _ in range(config.feature_layers)])
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero biases, unit LayerNorms, N(0, 0.02) positions."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_embed, std=0.02)

    def encode_blocks(self, windows: Tensor) -> Tensor:
        mel = self.log_mel(windows)  # (N, W, n_mels)
        x = self.in_proj(mel) + self.pos_embed  # (N, W, D)
        own = slice(self.config.mel_context, self.config.mel_context + self.mels_per_frame)
        states = []
        for layer in self.layers:
            x = layer(x)  # (N, W, D)
            states.append(x[:, own].mean(dim=1))  # (N, D)
        return torch.stack(states, dim=1)[:, None]  # (N, 1, L, D)


# --------------------------------------------------------------------------------------------------
# wav2vec2 encoder (pretrained, frozen, from a local transformers checkpoint)
# --------------------------------------------------------------------------------------------------

_W2V_EXPECTED = ("a local directory holding a transformers Wav2Vec2 checkpoint "
                 "(config.json with model_type 'wav2vec2' and model.safetensors or pytorch_model.bin, "
                 "e.g. facebook/wav2vec2-base-960h saved with save_pretrained)")


def _conv_out_len(n: int, kernels: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Output length of wav2vec2's unpadded conv feature extractor for n input samples."""
    for k, s in zip(kernels, strides):
        n = (n - k) // s + 1 if n >= k else 0
    return n


def load_wav2vec2(path: str | Path | None):
    """Wav2Vec2Model from a local directory; ModelError with the path and what is expected otherwise."""
    if path is None:
        raise ModelError(f"audio.encoder='wav2vec2' needs audio.wav2vec2_path: {_W2V_EXPECTED}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelError(f"wav2vec2 path {str(p)!r} does not exist or is not a directory; expected {_W2V_EXPECTED}")
    try:
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise ModelError(f"wav2vec2 path {str(p)!r} has no readable config.json ({e.__class__.__name__}); "
                         f"expected {_W2V_EXPECTED}") from None
    if model_type != "wav2vec2":
        raise ModelError(f"wav2vec2 path {str(p)!r} holds a {model_type!r} model; expected {_W2V_EXPECTED}")
    from transformers import Wav2Vec2Model

    try:
        # no dtype keyword (transformers < 4.56 calls it torch_dtype): the weights are made fp32 below
        model, info = Wav2Vec2Model.from_pretrained(str(p), local_files_only=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 -- OSError, ValueError, SafetensorError...: all mean "broken checkpoint"
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ModelError(f"cannot load a wav2vec2 checkpoint from {str(p)!r} ({e.__class__.__name__}: {reason}); "
                         f"expected {_W2V_EXPECTED}") from None
    # transformers fills weights a checkpoint lacks with random values and only logs it: features from a
    # half-random encoder must not pass for the real thing (masked_spec_embed is used in pre-training only)
    missing = [k for k in info.get("missing_keys", []) if k != "masked_spec_embed"]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise ModelError(f"wav2vec2 checkpoint {str(p)!r} lacks weights the model needs ({len(missing)} missing, e.g. "
                         f"{sorted(missing)[:3]}; {len(mismatched)} of another shape); expected {_W2V_EXPECTED}")
    return model.float()


def _wants_normalize(path: Path) -> bool:
    """Whether the checkpoint's feature extractor zero-mean/unit-variance normalises its input
    (preprocessor_config.json `do_normalize`; absent -> True, Wav2Vec2FeatureExtractor's default and
    what wav2vec2-base-960h uses)."""
    try:
        return bool(json.loads((path / "preprocessor_config.json").read_text()).get("do_normalize", True))
    except (OSError, ValueError):
        return True


class Wav2Vec2AudioEncoder(AudioEncoder):
    """All hidden states of a frozen wav2vec2 (hidden_states[1:], one per layer) at 25 fps.

    Blocks are chunks of `wav2vec2_chunk_seconds` rounded to whole video frames; each window adds
    `wav2vec2_context_seconds` (whole frames) of left context -- zeros before the start -- and on the right
    the samples the conv front end's receptive field spills past its stride (80 for wav2vec2-base), so the
    chunk gets exactly chunk / stride hidden frames. With 320x downsampling, each video frame averages the
    pair of 50 Hz frames starting on it. When the checkpoint's feature extractor normalises its input,
    each window is normalised to zero mean, unit variance (eps 1e-7, as Wav2Vec2FeatureExtractor).
    """

    def __init__(self, config: AudioConfig) -> None:
        super().__init__(config)
        from ..checkpoint import weights_digest

        model = load_wav2vec2(config.wav2vec2_path)
        if config.wav2vec2_digest and config.wav2vec2_digest != (digest := weights_digest(model)):
            raise ModelError(f"the wav2vec2 checkpoint at {config.wav2vec2_path!r} is not the one this model was made "
                             f"with (weights digest {digest}, the model's config records {config.wav2vec2_digest}): "
                             "point audio.wav2vec2_path at that checkpoint")
        mc = model.config
        if (mc.num_hidden_layers, mc.hidden_size) != (config.feature_layers, config.feature_dim):
            raise ModelError(
                f"the wav2vec2 model at {config.wav2vec2_path!r} has {mc.num_hidden_layers} layers of width "
                f"{mc.hidden_size}, but audio.feature_layers={config.feature_layers}, audio.feature_dim="
                f"{config.feature_dim}; set audio.feature_layers={mc.num_hidden_layers} and "
                f"audio.feature_dim={mc.hidden_size}")
        spf = config.samples_per_frame
        kernels, strides = tuple(mc.conv_kernel), tuple(mc.conv_stride)
        self.stride = math.prod(strides)  # input samples per hidden frame (320: 50 Hz)
        if spf % self.stride:
            raise ModelError(f"the wav2vec2 model downsamples by {self.stride}, which does not divide the "
                             f"{spf} samples of a video frame; use a checkpoint with 320x downsampling")
        self.hidden_per_frame = spf // self.stride  # 2
        self.block_frames = max(1, round(config.wav2vec2_chunk_seconds * config.fps))  # 50
        self.left_samples = max(0, round(config.wav2vec2_context_seconds * config.fps)) * spf  # 16000
        n = self.left_samples + self.block_samples
        self.right_samples = next(r for r in range(sum(kernels) * self.stride + 1)
                                  if _conv_out_len(n + r, kernels, strides) >= n // self.stride)  # 80
        # ~24 s of audio per wav2vec2 call (8 windows of 3 s at a 2 s chunk, 23 of 1.045 s at one frame)
        self.max_blocks_per_call = max(1, round(24 * config.sample_rate / self.window_samples))
        self.normalize = _wants_normalize(Path(config.wav2vec2_path).expanduser())
        self.model = model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> Wav2Vec2AudioEncoder:
        """The wav2vec2 stays in eval mode (no dropout, no layer drop, no time masking) whatever `mode`."""
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def encode_blocks(self, windows: Tensor) -> Tensor:
        x = windows.float()  # (N, W)
        if self.normalize:
            x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-7)  # (N, W)
        hidden = self.model(x, output_hidden_states=True).hidden_states[1:]  # L x (N, T, D)
        h = torch.stack(hidden, dim=2)  # (N, T, L, D)
        t0 = self.left_samples // self.stride
        h = h[:, t0:t0 + self.block_frames * self.hidden_per_frame]  # (N, bf*r, L, D)
        return reduce(h, "n (f r) l d -> n f l d", "mean", r=self.hidden_per_frame)  # (N, bf, L, D)


# --------------------------------------------------------------------------------------------------
# Per-frame window projector
# --------------------------------------------------------------------------------------------------


class AudioProjector(nn.Module):
    """Features of frames i-m..i+m ((2m+1) x L x D) -> MLP -> num_tokens tokens of width token_dim.

    The MLP follows the AudioProjModel of Hallo / V-Express (two hidden layers, then a LayerNorm on the
    tokens); its hidden width is min(512, token_dim) -- Hallo uses 512 at token_dim 768.
    """

    def __init__(self, config: AudioConfig) -> None:
        super().__init__()
        self.config = config
        self.margin = config.margin
        in_dim = (2 * config.margin + 1) * config.feature_layers * config.feature_dim
        hidden = min(512, config.token_dim)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, config.num_tokens * config.token_dim),
        )
        self.norm = nn.LayerNorm(config.token_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform linears with zero biases; unit LayerNorm."""
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, feats: Tensor, pad_left: bool = True, pad_right: bool = True) -> Tensor:
        """(B, F, L, D) -> (B, F', M, token_dim). A padded side edge-replicates `margin` frames; an
        unpadded side loses `margin` frames (the caller holds that context itself)."""
        m, cfg = self.margin, self.config
        parts = [feats]  # (B, F, L, D)
        if m and feats.shape[1]:
            if pad_left:
                parts.insert(0, feats[:, :1].expand(-1, m, -1, -1))  # (B, m, L, D)
            if pad_right:
                parts.append(feats[:, -1:].expand(-1, m, -1, -1))  # (B, m, L, D)
        x = torch.cat(parts, dim=1)  # (B, F + pads, L, D)
        n_out = x.shape[1] - 2 * m
        if n_out <= 0:
            return x.new_zeros((x.shape[0], 0, cfg.num_tokens, cfg.token_dim))  # (B, 0, M, Dt)
        win = x.unfold(1, 2 * m + 1, 1)  # (B, F', L, D, 2m+1)
        win = rearrange(win, "b f l d w -> b f (w l d)")  # (B, F', (2m+1) L D)
        tokens = self.mlp(win)  # (B, F', M Dt)
        tokens = rearrange(tokens, "b f (m c) -> b f m c", m=cfg.num_tokens)  # (B, F', M, Dt)
        return self.norm(tokens)  # (B, F', M, Dt)


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------


def build_audio_encoder(config: AudioConfig) -> AudioEncoder:
    """The encoder `config.encoder` names: 'mel' (random init) or 'wav2vec2' (loaded, frozen)."""
    if config.encoder == "mel":
        return MelAudioEncoder(config)
    if config.encoder == "wav2vec2":
        return Wav2Vec2AudioEncoder(config)
    raise ModelError(f"audio.encoder={config.encoder!r}; choose 'mel' or 'wav2vec2'")
