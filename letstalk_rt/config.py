"""Typed configurations and the named presets of every component.

One dataclass per component, a reason on every field. `ModelConfig` bundles the three networks and
the sampling defaults; it is what `config.json` in a model directory holds. Presets live in registry
dicts whose keys are the CLI's choices (`letstalk ... --preset KEY`).

Time conventions used everywhere: video runs at `fps` (25), audio at `sample_rate` (16 kHz), so one
video frame owns exactly `sample_rate // fps` = 640 audio samples.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InputError, LetsTalkError, ModelError

Fusion = Literal["direct", "symbiotic", "siamese"]
FUSIONS: tuple[str, ...] = ("direct", "symbiotic", "siamese")


# --------------------------------------------------------------------------------------------------
# Autoencoder
# --------------------------------------------------------------------------------------------------


@dataclass
class AutoencoderConfig:
    image_size: int = 256  # square frame side in pixels the autoencoder is trained for
    in_channels: int = 3  # RGB
    latent_channels: int = 32  # DC-AE f32c32: 32 channels per latent pixel
    # Output channels of each stage; len-1 stages halve the resolution (6 entries -> 32x, as DC-AE f32).
    block_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    layers_per_block: int = 2  # residual blocks per stage (encoder and decoder alike)
    scaling_factor: float = 1.0  # latents are multiplied by this after encode so their std is ~1
    # The decoder's stage widths when they differ from the encoder's (as many entries, finest first): a
    # narrower decoder for the same latent space, trained by `letstalk train --stage decoder`. None: block_channels.
    # Left out of repr(): caches of what the autoencoder computes are keyed by repr(config) + weights
    # (train.data.module_fingerprint), and the keys of models without it must stay what they were.
    decoder_channels: tuple[int, ...] | None = field(default=None, repr=False)
    # A pretrained DC-AE in diffusers format (a folder with config.json + weights, e.g. mit-han-lab's f32c32) used
    # as this model's autoencoder: loaded from there, frozen, not stored with the model (as audio.wav2vec2_path).
    # "": the project's own DCAutoencoder, stored in autoencoder.safetensors. Not in repr(), like decoder_channels.
    diffusers_path: str = field(default="", repr=False)

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        return self.decoder_channels or self.block_channels

    @property
    def downsample(self) -> int:
        """Spatial compression factor: pixels per latent pixel along one side."""
        return 2 ** (len(self.block_channels) - 1)

    @property
    def latent_size(self) -> int:
        """Latent side length for `image_size` frames."""
        return self.image_size // self.downsample


# --------------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------------


@dataclass
class AudioConfig:
    encoder: Literal["mel", "wav2vec2"] = "mel"  # mel: learned, no pretrained weights; wav2vec2: local HF dir
    sample_rate: int = 16000  # every audio path resamples to this before encoding
    fps: int = 25  # video frame rate the features are aligned to
    # mel front end
    n_mels: int = 80  # mel bands of the log-mel front end
    n_fft: int = 400  # 25 ms analysis window at 16 kHz
    hop_length: int = 160  # 10 ms hop: 4 mel frames per video frame
    mel_context: int = 8  # mel frames of left context each video frame's encoder sees (causal side)
    mel_lookahead: int = 4  # mel frames past the frame's own 4 it may look at (fixed, documented lookahead)
    # learned / pretrained feature encoder
    feature_layers: int = 12  # hidden states stacked per frame (wav2vec2-base has 12)
    feature_dim: int = 768  # width of each hidden state
    wav2vec2_path: str | None = None  # local directory with a transformers Wav2Vec2 checkpoint
    # digest of that checkpoint's weights, recorded by `new-model --wav2vec2`: a different checkpoint of the same
    # size at the path (base instead of base-960h, a fine-tune) is refused, not silently encoded with ("": unchecked)
    wav2vec2_digest: str = field(default="", repr=False)
    # wav2vec2 runs on fixed chunks (plus left context) so streaming equals offline; a frame's features are
    # final only when its whole chunk is in, so the chunk is the encoder's latency: 2 s here (offline-like
    # features), one frame (0.04 s, lookahead 5 ms) in the live letstalk-* presets
    wav2vec2_chunk_seconds: float = 2.0
    wav2vec2_context_seconds: float = 1.0  # left context prepended to each wav2vec2 chunk
    # per-frame projection
    margin: int = 2  # each frame sees features of frames i-margin..i+margin (paper: +-2)
    num_tokens: int = 32  # audio tokens per frame after the projection MLP (paper: 32)
    token_dim: int = 768  # width of each audio token (paper: 768)
    # Live input level (`pipeline.SpeechLevel`): speech whose running level (RMS of its voiced 20 ms blocks)
    # is below level_min or above level_max is scaled to it before it is encoded. The model only knows the
    # loudness it was trained on (by SpeechLevel's measure the synth corpus's clips sit at 0.07 / 0.14 / 0.26,
    # 5th / 50th / 95th percentile); 26 dB quieter speech halved the default's lip sync and louder speech
    # helped it a little, and of 0.05 / 0.1 / 0.2 tried, 0.2 scored best (docs/eval.md). 0: no scaling.
    # The transformer and distill stages write their corpus's own loud end here (`pipeline.corpus_level_min`:
    # the 80th percentile of the clips' speech levels; 0.197 on the synth corpus) unless it is 0.
    level_min: float = 0.2
    level_max: float = 0.0

    @property
    def samples_per_frame(self) -> int:
        """Audio samples owned by one video frame (640 at 16 kHz / 25 fps)."""
        return self.sample_rate // self.fps


# --------------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------------


@dataclass
class TransformerConfig:
    latent_channels: int = 32  # must equal the autoencoder's latent_channels
    latent_size: int = 8  # latent side (image_size / downsample)
    patch_size: int = 1  # latent pixels per token side (paper: 1 -> 64 tokens at 8x8)
    hidden_size: int = 768  # model width
    depth: int = 12  # transformer blocks
    num_heads: int = 12  # heads of the softmax (temporal, cross) attentions
    linear_head_dim: int = 32  # head dim of the spatial ReLU linear attention (Sana: 32)
    mlp_ratio: float = 2.5  # Mix-FFN hidden = mlp_ratio * hidden_size (Sana uses 2.5)
    num_frames: int = 16  # generated frames per window (paper: 16)
    num_memory: int = 2  # memory-bank frames prepended for temporal attention (paper: K=2)
    audio_token_dim: int = 768  # width of the audio tokens fed to the model (AudioConfig.token_dim)
    num_audio_tokens: int = 32  # audio tokens per frame (AudioConfig.num_tokens)
    portrait_fusion: Fusion = "symbiotic"  # paper's choice for the portrait
    audio_fusion: Fusion = "direct"  # paper's choice for the audio
    siamese_depth: int | None = None  # blocks of a siamese branch; None = same as depth

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_size // self.patch_size) ** 2


PRESETS_TRANSFORMER: dict[str, dict[str, Any]] = {
    # The published sizes (DESIGN.md section 1).
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
    # Small sizes that run in real time on a CPU.
    "cpu": dict(depth=6, hidden_size=128, num_heads=4),  # ~3.9 GFLOP per 8-frame window and step
    "tiny": dict(depth=2, hidden_size=64, num_heads=2),
}


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def check_box(box: Any, name: str, error: type[LetsTalkError] = InputError) -> tuple[float, float, float, float] | None:
    """A box x, y, w, h of the face crop (fractions, inside it, w and h > 0) as a tuple; None stays None.
    Anything else raises `error` naming `name`."""
    if box is None:
        return None
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        raise error(f"{name} {box!r}: give x, y, w, h as fractions of the face crop, e.g. 0.3,0.48,0.4,0.4") from None
    if not (0 <= x < 1 and 0 <= y < 1 and w > 0 and h > 0 and x + w <= 1 + 1e-6 and y + h <= 1 + 1e-6):
        raise error(f"{name} {x:g},{y:g},{w:g},{h:g}: x, y, w, h must be fractions of the face crop with the box "
                    "inside it (x + w <= 1, y + h <= 1) and w, h > 0")
    return x, y, w, h


MAX_NOISE_DRAWS = 8  # SamplingConfig.noise_draws: more costs a row each for ever less (the noise's share falls as 1/n)


def check_noise_draws(draws: int, name: str, error: type[LetsTalkError] = InputError) -> int:
    """A count of noise draws averaged per window (SamplingConfig.noise_draws), 1..MAX_NOISE_DRAWS, or `error`
    naming it as `name` (the flag or config field)."""
    if not 1 <= draws <= MAX_NOISE_DRAWS:
        raise error(f"{name} {draws}: choose 1..{MAX_NOISE_DRAWS} samples per window, each a network row per step")
    return draws


@dataclass
class SamplingConfig:
    num_steps: int = 2  # network evaluations per window (1..50); few-step is the product's point
    stream_window: int = 0  # frames per generated window, live and offline (1..transformer.num_frames;
    # 0: num_frames). A window waits for all its audio, so fewer frames cut the speech-to-screen latency,
    # at more compute per frame (the engine's EngineConfig.window and eval's --window override it)
    shift: float = 1.0  # timestep shift t' = s t / (1 + (s-1) t); >1 spends more steps at high noise
    start_time: float = 1.0  # flow time sampling starts at, 0 < start_time <= 1: a window's latents start as
    # the portrait latent noised to it, (1 - start_time) portrait + start_time noise (SDEdit), instead of pure
    # noise (1). Below 1 the noise decides less of the face and of the mouth: on the bundled 1-step model
    # 0.6 raised both lip sync and identity; lower starts open the mouth less (docs/eval.md, "Starting from
    # the portrait"). Tuned for num_steps: sampling with another step count starts from pure noise unless a
    # start time is given explicitly
    portrait_guidance: float = 1.0  # CFG scale of the portrait condition (1 = no guidance pass)
    audio_guidance: float = 1.0  # CFG scale of the audio condition (1 = no guidance pass)
    audio_guidance_box: tuple[float, float, float, float] | None = None  # x, y, w, h of the face crop
    # (fractions): audio guidance acts on these latent cells only (the mouth), the rest of the face gets the
    # plain conditional velocity; None: the whole frame
    noise_hold: float = 0.0  # inference: outside `noise_hold_box`, how much of each frame's starting noise is the
    # previous frame's: noise_t = hold * noise_(t-1) + sqrt(1 - hold^2) * fresh (unit variance; frames k apart
    # correlated by hold ** k, 1 = one field for the whole stream). Fresh noise in every frame makes a 1-step
    # model redraw the face's fine texture every frame (flicker); slowly changing noise keeps it, while the
    # mouth's cells keep fresh noise to move with. On the default's 42 test clips 0.7 cut flicker 4.14x -> 3.35x
    # the real frames' for 0.02 dB of identity (docs/eval.md, "Held noise outside the mouth").
    # 0: fresh everywhere (the default's; `--noise-hold` on generate, demo, bench, serve and eval)
    noise_hold_box: tuple[float, float, float, float] | None = (0.3, 0.48, 0.4, 0.4)  # x, y, w, h of the face
    # crop (fractions) whose latent cells always get fresh noise: the mouth of the corpus's and `prepare_portrait`'s
    # framing; None: every cell follows noise_hold
    noise_draws: int = 1  # inference: a window's clean latents are the mean of this many samples, each from its own
    # starting noise (one batched network row per draw and step). A 1-step model commits to its noise; the mean of
    # two draws keeps less of it: on the bundled model's 42 test clips 2 draws raised lip sync 0.796 -> 0.803 and cut
    # flicker by a quarter (docs/eval.md, "Two noise draws averaged"). 1: one sample
    audio_lookahead: int | None = None  # inference: frames of audio after a frame whose features its tokens wait
    # for (0..audio.margin; None: audio.margin, all the context the projector was trained on). Each frame less is
    # 40 ms less speech-to-screen latency live; the missing features are copies of the newest one in, as at the end
    # of the audio (pipeline.AudioTokenizer; docs/eval.md, "Less audio lookahead")
    live_audio_lookahead: int | None = None  # the same for the live engine only (None: audio_lookahead), where
    # each frame is 40 ms of latency: the bundled model's 1 (-0.002 of lip sync, 40 ms sooner); offline 2
    memory_noise: float = 0.02  # flow time the memory latents are forward-diffused to at inference
    memory_anchor: bool = True  # inference: memory slot 0 holds the portrait latent for the whole stream
    # (the others carry the last frames; at the start every slot does). Temporal attention copies from
    # memory far more readily than spatial linear attention copies from the portrait tokens, so this keeps
    # identity over hours and makes the first window look like the portrait (docs/eval.md).
    anchor_mouth_box: tuple[float, float, float, float] | None = None  # x, y, w, h of the face crop
    # (fractions) masked out of the anchor so the mouth is not copied from the portrait, e.g.
    # (0.35, 0.55, 0.3, 0.2) for the synth corpus's mouths; None masks nothing (docs/eval.md: on the
    # default model masking cost more identity than it gained lip sync)
    detail_transfer: float = 0.0  # inference: add back the portrait's fine detail that the autoencoder loses
    # (portrait minus its reconstruction) wherever a frame still looks like the portrait, i.e. their blurred
    # difference is small: this is the gate's width in grey levels (0..255); 0 = off. It sharpens skin, hair and
    # background; the gate keeps it off where the frame has moved away from the portrait (an open mouth, a
    # blink, a turned head) so nothing of the portrait is pasted over motion (docs/eval.md)
    detail_blur: float = 0.025  # the gate compares frames blurred by a Gaussian of this sigma (fraction of the side)
    detail_half_life_s: float = 2.5  # how long a region that moved stays without the detail (half-life)
    train_anchor_prob: float = 0.75  # training: fraction of samples whose memory is anchored as at
    # inference (slot 0 and the slots before the clip's start hold the portrait); the rest see the
    # plain bank (empty slots masked), which the memory-off ablation uses
    # training-time memory-bank regularisation (paper: first 5% of the schedule, ~25% masked)
    train_memory_noise_max: float = 0.05  # memory noised to t ~ U(0, this) in training
    train_memory_mask_ratio: float = 0.25  # fraction of memory latent positions masked in training
    train_pixel_noise: float = 0.02  # std of pixel noise on memory frames and the reference image
    drop_portrait_prob: float = 0.05  # condition dropout for classifier-free guidance
    drop_audio_prob: float = 0.1  # condition dropout for classifier-free guidance


# --------------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    trained: bool = False  # False for random or untrained weights; the CLI warns when it loads one
    description: str = ""  # one line on what the weights are (data, steps, hardware)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ModelError with the fix when two components disagree."""
        ae, au, tr = self.autoencoder, self.audio, self.transformer
        if ae.image_size % ae.downsample:
            raise ModelError(
                f"image_size {ae.image_size} is not a multiple of the autoencoder's {ae.downsample}x downsampling"
            )
        checks = [
            (tr.latent_channels, ae.latent_channels, "transformer.latent_channels", "autoencoder.latent_channels"),
            (tr.latent_size, ae.latent_size, "transformer.latent_size", "autoencoder image_size/downsample"),
            (tr.audio_token_dim, au.token_dim, "transformer.audio_token_dim", "audio.token_dim"),
            (tr.num_audio_tokens, au.num_tokens, "transformer.num_audio_tokens", "audio.num_tokens"),
        ]
        for a, b, na, nb in checks:
            if a != b:
                raise ModelError(f"config mismatch: {na}={a} but {nb}={b}; set them equal")
        if tr.latent_size % tr.patch_size:
            raise ModelError(f"latent_size {tr.latent_size} is not divisible by patch_size {tr.patch_size}")
        if tr.hidden_size % tr.num_heads or tr.hidden_size % tr.linear_head_dim:
            raise ModelError(
                f"hidden_size {tr.hidden_size} must be divisible by num_heads {tr.num_heads} "
                f"and linear_head_dim {tr.linear_head_dim}"
            )
        for name in ("portrait_fusion", "audio_fusion"):
            if getattr(tr, name) not in FUSIONS:
                raise ModelError(f"transformer.{name}={getattr(tr, name)!r}; choose one of {FUSIONS}")
        if au.encoder not in ("mel", "wav2vec2"):
            raise ModelError(f"audio.encoder={au.encoder!r}; choose 'mel' or 'wav2vec2'")
        if not 0 <= self.sampling.stream_window <= tr.num_frames:
            raise ModelError(f"sampling.stream_window={self.sampling.stream_window}: choose 1..{tr.num_frames} "
                             "(transformer.num_frames) or 0 for num_frames")
        sa = self.sampling
        if sa.detail_transfer < 0 or sa.detail_blur <= 0 or sa.detail_half_life_s <= 0:
            raise ModelError(f"sampling.detail_transfer={sa.detail_transfer} must be >= 0 (0 = off), and "
                             f"detail_blur={sa.detail_blur} and detail_half_life_s={sa.detail_half_life_s} > 0")
        if not 0 < sa.start_time <= 1:
            raise ModelError(f"sampling.start_time={sa.start_time}: choose a flow time in (0, 1] (1 = pure noise)")
        if not 0 <= sa.noise_hold <= 1:
            raise ModelError(f"sampling.noise_hold={sa.noise_hold}: give the correlation of consecutive frames' "
                             "noise in 0..1 (0 = fresh noise every frame)")
        check_noise_draws(sa.noise_draws, "sampling.noise_draws", ModelError)
        for name in ("audio_lookahead", "live_audio_lookahead"):
            frames = getattr(sa, name)
            if frames is not None and (not isinstance(frames, int) or isinstance(frames, bool)
                                       or not 0 <= frames <= au.margin):
                raise ModelError(f"sampling.{name}={frames}: choose 0..{au.margin} (audio.margin) or null")
        if au.sample_rate != 16000 or au.fps != 25:  # media, the tracks and the encoders decode and pace at these
            raise ModelError(f"audio.sample_rate {au.sample_rate} / fps {au.fps}: this version runs 16000 Hz audio "
                             "and 25 fps video only")
        if not 1 <= sa.num_steps <= 50 or not sa.shift > 0:
            raise ModelError(f"sampling.num_steps={sa.num_steps} / shift={sa.shift}: choose 1..50 steps and a "
                             "shift > 0")
        for name in ("audio_guidance_box", "noise_hold_box", "anchor_mouth_box"):
            check_box(getattr(sa, name), f"sampling.{name}", ModelError)

    @property
    def fps(self) -> int:
        return self.audio.fps

    @property
    def image_size(self) -> int:
        return self.autoencoder.image_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a dict (config.json); unknown keys are an error that names them."""
        sub = {"autoencoder": AutoencoderConfig, "audio": AudioConfig,
               "transformer": TransformerConfig, "sampling": SamplingConfig}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in sub:
                known = {f.name for f in dataclasses.fields(sub[key])}
                unknown = set(value) - known
                if unknown:
                    raise ModelError(f"config.json: unknown {key} keys {sorted(unknown)}")
                value = dict(value)
                for k, v in value.items():
                    if isinstance(v, list):
                        value[k] = tuple(v)
                _check_types(key, sub[key], value)
                kwargs[key] = sub[key](**value)
            elif key in ("trained", "description"):
                kwargs[key] = value
            else:
                raise ModelError(f"config.json: unknown key {key!r}")
        return cls(**kwargs)


def _check_types(section: str, cls: type, values: dict[str, Any]) -> None:
    """config.json values of the kind each field's default has (a number where a number goes, ...): a wrong one
    fails at load, naming it, not deep inside a generation. Fields whose default is None are free."""
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        default = f.default if f.default is not dataclasses.MISSING else \
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        value = values[f.name]
        if default is None or value is None and "None" in str(f.type):
            continue
        kind = (int, float) if isinstance(default, float) else type(default)
        if not isinstance(value, kind) or isinstance(value, bool) and not isinstance(default, bool):
            raise ModelError(f"config.json: {section}.{f.name} is {value!r}; it takes a "
                             f"{type(default).__name__} like {default!r}")


def _model(
    image_size: int,
    block_channels: tuple[int, ...],
    latent_channels: int,
    transformer: str,
    num_frames: int,
    audio: dict[str, Any],
    layers_per_block: int = 2,
    **sampling: Any,
) -> ModelConfig:
    ae = AutoencoderConfig(image_size=image_size, latent_channels=latent_channels,
                           block_channels=block_channels, layers_per_block=layers_per_block)
    au = AudioConfig(**audio)
    tr = TransformerConfig(latent_channels=latent_channels, latent_size=ae.latent_size, num_frames=num_frames,
                           audio_token_dim=au.token_dim, num_audio_tokens=au.num_tokens,
                           **PRESETS_TRANSFORMER[transformer])
    return ModelConfig(autoencoder=ae, audio=au, transformer=tr, sampling=SamplingConfig(**sampling))


def model_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a preset name; the error lists the valid names."""
    if name not in PRESETS_MODEL:
        raise ModelError(f"unknown preset {name!r}; choose one of {sorted(PRESETS_MODEL)}")
    return PRESETS_MODEL[name]()


# Full-model presets: the published 256x256 f32c32 sizes, a CPU real-time size, and a test size. Live, the first two
# wait for 1 frame of audio after a window, not the margin's 2: 40 ms less latency, for -0.002 of lip sync on the
# bundled cpu-128 model (docs/eval.md, "Less audio lookahead"; not measured on the others).
PRESETS_MODEL: dict[str, Any] = {
    **{
        f"letstalk-{size.lower()}": (lambda size=size: _model(
            256, (128, 256, 512, 512, 1024, 1024), 32, size, 16,
            dict(encoder="wav2vec2", num_tokens=32, token_dim=768, wav2vec2_chunk_seconds=0.04), num_steps=2,
            live_audio_lookahead=1))
        for size in ("S", "B", "L", "XL")
    },
    # 128x128 frames, f16c16 autoencoder -> 8x8x16 latents, 8-frame windows: real time on 2 CPU cores.
    # The two full-resolution stages are narrow (8, 16): decoding is the largest cost of a CPU window, and
    # (16, 32, 64, ...) spent 7.2 GFLOP per 8 frames there against 4.6 GFLOP now (docs/benchmarks.md).
    "cpu-128": lambda: _model(128, (8, 16, 64, 128, 128), 16, "cpu", 8,
                              dict(encoder="mel", n_mels=64, feature_layers=4, feature_dim=128,
                                   num_tokens=8, token_dim=128), layers_per_block=1, num_steps=2,
                              live_audio_lookahead=1),
    # 32x32 frames, f4c4 -> 8x8x4 latents: for tests, runs in milliseconds.
    "tiny": lambda: _model(32, (8, 16, 16), 4, "tiny", 4,
                           dict(encoder="mel", n_mels=16, feature_layers=2, feature_dim=16,
                                num_tokens=4, token_dim=32), layers_per_block=1, num_steps=2),
}
