"""The deep-compression autoencoder (DC-AE, arXiv 2410.10733) that maps frames to the latent space.

    encode: (B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f) * scaling_factor      f = 2 ** (stages - 1)
    decode: (B, C, h, w) (scaled)    -> (B, 3, h*f, w*f) in [-1, 1], clamped

The network is a plain conv encoder/decoder; what makes it keep quality at 32x compression is that
every change of resolution or width has a parameter-free *residual shortcut* beside the learned conv:

  * downsampling stage: pixel_unshuffle (space -> channels, 4x the channels at half the side), then
    average groups of adjacent channels down to the stage's width; added to the stride-2 conv output;
  * upsampling stage: repeat every channel (channels -> more channels), then pixel_shuffle (channels ->
    space); added to the conv-then-pixel_shuffle output;
  * bottleneck: the encoder's output conv is added to a channel average of its input down to
    `latent_channels`, the decoder's input conv to a channel repeat of the latent.

So the convs only learn residuals on top of a fixed, lossless-as-possible reshuffle of the pixels, which
is what makes high compression trainable. Everything here is convolution at fixed stride, so the
autoencoder works on any H, W divisible by f and each frame is processed independently (batch = frames).
The decoder may be narrower than the encoder (`AutoencoderConfig.decoder_channels`): decoding runs every
window of a live stream, encoding only once per portrait, so a CPU deployment trains a cheaper decoder
for the same latents (`letstalk train --stage decoder`).

Also here: `DiffusersDCAE` / `load_diffusers_dcae`, which wrap public DC-AE weights a user has on disk in
diffusers format behind the same encode/decode contract, and the uint8 <-> [-1, 1] frame helpers the
pipeline uses.

Sections: norms and blocks, shortcut stages, encoder and decoder, the model, diffusers loader, frame helpers.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import AutoencoderConfig
from ..errors import InputError, ModelError

if TYPE_CHECKING:  # diffusers is an optional extra; only the loader imports it
    from diffusers import AutoencoderDC


# --------------------------------------------------------------------------------------------------
# Norms and blocks
# --------------------------------------------------------------------------------------------------


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channel axis of a (B, C, H, W) map, per pixel (DC-AE's `rms_norm`).

    Per-pixel statistics keep every frame, and every pixel, independent of the others in the batch: a
    streamed frame decodes identically whatever else shares its batch. Computed in fp32 (bf16 squares
    lose too much) by `F.rms_norm` on the NHWC view, where channels are contiguous: on the model's
    channels-last maps that permute is free, and the norm runs ~5x faster on the CPU than a mean over
    dim 1 of the NCHW view.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, C, H, W)

    def forward_nhwc(self, x: Tensor) -> Tensor:
        """The same over the channels-last axis of (B, H, W, C)."""
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)  # (B, H, W, C)
        return y.to(x.dtype)


class ResBlock(nn.Module):
    """x + norm(conv1x1(silu(conv3x3(x)))): a residual conv block at constant width and size.

    DC-AE's ResBlock has two 3x3 convs; the second one is pointwise here, which costs 10 instead of
    18 C^2 multiply-adds per pixel -- about 65 -> 55 ms decoding 8 frames of the cpu-128 preset on 2
    cores -- while the first conv and the resampling convs still see the 3x3 neighbourhood.
    The norm closes the residual branch, so zeroing its weight (in `initialize_weights`) makes the block
    start as the identity.

    The pointwise conv keeps its conv weight (checkpoints keep names and shapes) but runs as a linear over the
    channels-last view, where the norm then reads its output: a 1x1 conv of a batch under 16 at 1 torch thread
    goes to torch's im2col path, which copies the channels-last map first (docs/benchmarks.md, forty-fourth
    session).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = ChannelRMSNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.conv1(x)).permute(0, 2, 3, 1)  # (B, H, W, C), a view of the channels-last map
        h = self.norm.forward_nhwc(F.linear(h, self.conv2.weight.flatten(1)))  # (B, H, W, C)
        return x + h.permute(0, 3, 1, 2)  # (B, C, H, W)


# --------------------------------------------------------------------------------------------------
# Shortcut stages: space-to-channel down, channel-to-space up
# --------------------------------------------------------------------------------------------------


def space_to_channel(x: Tensor, out_channels: int) -> Tensor:
    """(B, C, H, W) -> (B, out, H/2, W/2): pixel_unshuffle to 4C channels, then mean of adjacent groups.

    pixel_unshuffle orders channels as (c, dy, dx), so a group of 4 is a 2x2 average pool of one input
    channel, and a group of 2 averages a horizontal pixel pair; larger groups also mix channels.
    """
    y = F.pixel_unshuffle(x, 2)  # (B, 4C, H/2, W/2)
    return rearrange(y, "b (c g) h w -> b c g h w", c=out_channels).mean(dim=2)  # (B, out, H/2, W/2)


def add_repeated(h: Tensor, x: Tensor) -> Tensor:
    """h + repeat_interleave(x, C_h / C_x, dim=1) for h (B, C_h, h, w), x (B, C_x, h, w), without
    materialising the repeat: a broadcast add on the NHWC views, which also keeps the channels-last
    layout of the convs (a repeat_interleave copy is NCHW, and adding mixed layouts is 5x slower)."""
    r = h.shape[1] // x.shape[1]
    hv = rearrange(h.permute(0, 2, 3, 1), "b h w (c r) -> b h w c r", r=r)  # (B, h, w, C_x, r)
    y = hv + rearrange(x.permute(0, 2, 3, 1), "b h w c -> b h w c 1")  # (B, h, w, C_x, r)
    return rearrange(y, "b h w c r -> b h w (c r)").permute(0, 3, 1, 2)  # (B, C_h, h, w)


def channel_average(x: Tensor, out_channels: int) -> Tensor:
    """(B, C, h, w) -> (B, out, h, w): mean over groups of C/out adjacent channels (encoder bottleneck)."""
    return rearrange(x, "b (c g) h w -> b c g h w", c=out_channels).mean(dim=2)  # (B, out, h, w)


class DownShortcut(nn.Module):
    """Halve the side: stride-2 conv3x3 (in -> out) + space_to_channel(x) shortcut."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + space_to_channel(x, self.out_channels)  # (B, out, H/2, W/2)


class UpShortcut(nn.Module):
    """Double the side: conv3x3 (in -> 4*out) then pixel_shuffle, + the channel-to-space shortcut
    pixel_shuffle(repeat_interleave(x, 4*out/in, dim=1)).

    pixel_shuffle is a fixed permutation, so shuffle(conv(x)) + shuffle(repeat(x)) is computed as
    shuffle(conv(x) + repeat(x)): the same numbers with one shuffle instead of two.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4 * out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = add_repeated(self.conv(x), x)  # (B, 4*out, h, w) = conv(x) + repeat(x)
        return F.pixel_shuffle(h, 2)  # (B, out, 2h, 2w)


# --------------------------------------------------------------------------------------------------
# Encoder and decoder
# --------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """conv_in; then per stage i: layers_per_block ResBlocks at block_channels[i] and a DownShortcut to
    block_channels[i+1] (not in the last stage); out: conv3x3 to latent channels + channel-average
    shortcut."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch = config.block_channels
        self.latent_channels = config.latent_channels
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.stages = nn.ModuleList()
        for i, c in enumerate(ch):
            blocks: list[nn.Module] = [ResBlock(c) for _ in range(config.layers_per_block)]
            if i < len(ch) - 1:
                blocks.append(DownShortcut(c, ch[i + 1]))
            self.stages.append(nn.Sequential(*blocks))
        self.conv_out = nn.Conv2d(ch[-1], config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # (B, 3, H, W), NHWC in memory (see DCAutoencoder)
        h = self.conv_in(x)  # (B, C0, H, W)
        for stage in self.stages:
            h = stage(h)  # (B, C_i+1, H_i/2, W_i/2) ... (B, C_last, H/f, W/f)
        z = self.conv_out(h) + channel_average(h, self.latent_channels)  # (B, C, H/f, W/f)
        return z.contiguous()  # (B, C, H/f, W/f), NCHW in memory again


class Decoder(nn.Module):
    """conv_in from the latent + channel-repeat shortcut; then per stage i, coarsest first: an
    UpShortcut from ch[i+1] (not in the coarsest stage) and layers_per_block ResBlocks at ch[i]; out:
    RMSNorm, SiLU, conv3x3 to RGB. ch = config.decoder_widths (block_channels unless the decoder was
    made narrower than the encoder)."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch = config.decoder_widths
        self.conv_in = nn.Conv2d(config.latent_channels, ch[-1], 3, padding=1)
        stages = []
        for i in reversed(range(len(ch))):
            blocks: list[nn.Module] = []
            if i < len(ch) - 1:
                blocks.append(UpShortcut(ch[i + 1], ch[i]))
            blocks += [ResBlock(ch[i]) for _ in range(config.layers_per_block)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)  # coarsest first, in execution order
        self.norm_out = ChannelRMSNorm(ch[0])
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], config.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        z = z.contiguous(memory_format=torch.channels_last)  # (B, C, h, w), NHWC in memory (see DCAutoencoder)
        h = add_repeated(self.conv_in(z), z)  # (B, C_last, h, w) = conv_in(z) + repeat(z)
        for stage in self.stages:
            h = stage(h)  # (B, C_i, 2h_i, 2w_i) ... (B, C0, H, W)
        return self.conv_out(self.act(self.norm_out(h))).contiguous()  # (B, 3, H, W)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def check_config(config: AutoencoderConfig) -> None:
    """Raise ModelError with the fix when the widths do not allow the parameter-free shortcuts."""
    if len(config.block_channels) < 1 or config.layers_per_block < 0:
        raise ModelError(f"autoencoder needs at least one stage and layers_per_block >= 0, got {config}")
    if config.decoder_channels is not None and len(config.decoder_channels) != len(config.block_channels):
        raise ModelError(f"autoencoder decoder_channels {config.decoder_channels} must have as many stages as "
                         f"block_channels {config.block_channels} (the same latent grid)")
    for name, ch in (("block_channels", config.block_channels), ("decoder_channels", config.decoder_widths)):
        for a, b in itertools.pairwise(ch):
            if (4 * a) % b:
                raise ModelError(f"autoencoder {name} {ch}: a {a}->{b} stage needs {b} to divide 4*{a} (the "
                                 "space-to-channel and channel-to-space shortcuts); make each width equal to, "
                                 "twice or four times the previous one")
        if ch[-1] % config.latent_channels:
            raise ModelError(f"autoencoder latent_channels {config.latent_channels} must divide the last width "
                             f"of {name} {ch} (bottleneck shortcut)")


class DCAutoencoder(nn.Module):
    """DC-AE with residual space-to-channel shortcuts; see the module docstring for the contract.

    Inside, the maps are kept channels-last (NHWC in memory, NCHW in shape): oneDNN's convs on the
    narrow full-resolution maps run up to 3x faster on it and the per-pixel norm reads contiguous
    channels; encode and decode hand back ordinary contiguous tensors. The conv weights are channels-last
    too: torch's im2col conv path (the small maps, at 1 torch thread) otherwise copied every weight to that
    layout at every call (with the ResBlocks' pointwise conv, ~0.9 ms of a 128 px frame's ~13 ms traced decode
    at 1 thread; docs/benchmarks.md). Checkpoints are saved contiguous and load into these weights unchanged.
    Frames are independent: a frame's output does not depend on what else is in the batch.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        check_config(config)
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.initialize_weights()
        self.to(memory_format=torch.channels_last)  # the conv weights (see the class docstring)

    def initialize_weights(self) -> None:
        """All initialisation in one place.

        Convs: PyTorch's default (Kaiming-uniform, a=sqrt(5)); biases zero. ResBlock output norms: zero,
        so every ResBlock starts as the identity and the untrained network is the shortcut path plus the
        resampling convs -- a reasonable downsample/upsample from the first step.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, ChannelRMSNorm):
                nn.init.ones_(m.weight)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.norm.weight)

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f)."""
        return self.encoder(images) * self.config.scaling_factor  # (B, C, h, w)

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) clamped to [-1, 1]."""
        return self.decoder(latents / self.config.scaling_factor).clamp(-1.0, 1.0)  # (B, 3, H, W)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Training: (reconstruction, scaled latents). The reconstruction is *not* clamped, so a
        reconstruction loss still has gradients where the decoder overshoots [-1, 1]."""
        latents = self.encode(images)  # (B, C, h, w)
        recon = self.decoder(latents / self.config.scaling_factor)  # (B, 3, H, W)
        return recon, latents


# --------------------------------------------------------------------------------------------------
# Diffusers loader (optional extra): public DC-AE weights from a local directory
# --------------------------------------------------------------------------------------------------


class DiffusersDCAE(nn.Module):
    """A `diffusers.AutoencoderDC` behind DCAutoencoder's encode/decode contract.

    `config` is an AutoencoderConfig describing it: the encoder's widths, and as layers_per_block the
    largest of the encoder's per-stage layer counts (diffusers allows a different count per stage).
    `image_size` is the frame size the caller will use -- diffusers' config does not record one.
    """

    def __init__(self, model: AutoencoderDC, image_size: int = 256) -> None:
        super().__init__()
        self.model = model
        dc = model.config
        channels = tuple(int(c) for c in dc.encoder_block_out_channels)
        layers = dc.encoder_layers_per_block
        self.config = AutoencoderConfig(
            image_size=image_size,
            in_channels=int(dc.in_channels),
            latent_channels=int(dc.latent_channels),
            block_channels=channels,
            layers_per_block=int(max(layers)) if isinstance(layers, (list, tuple)) else int(layers),
            scaling_factor=float(dc.scaling_factor),
        )
        if image_size % self.config.downsample:
            raise ModelError(f"image_size {image_size} is not a multiple of this DC-AE's "
                             f"{self.config.downsample}x downsampling")

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f)."""
        z = self.model.encode(images, return_dict=False)[0]  # (B, C, h, w)
        return z * self.config.scaling_factor  # (B, C, h, w)

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, H, W) clamped to [-1, 1]."""
        x = self.model.decode(latents / self.config.scaling_factor, return_dict=False)[0]  # (B, 3, H, W)
        return x.clamp(-1.0, 1.0)  # (B, 3, H, W)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        latents = self.encode(images)  # (B, C, h, w)
        recon = self.model.decode(latents / self.config.scaling_factor, return_dict=False)[0]  # (B, 3, H, W)
        return recon, latents


def load_diffusers_dcae(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    image_size: int = 256,
) -> DiffusersDCAE:
    """Load a diffusers-format DC-AE directory (config.json + weights) from disk, never the network."""
    try:
        from diffusers import AutoencoderDC
    except ImportError:
        raise ModelError("loading DC-AE weights in diffusers format needs diffusers: "
                         "pip install 'letstalk-rt[diffusers]'") from None
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"DC-AE directory '{path}' does not exist; pass a local diffusers AutoencoderDC "
                         "directory (config.json + diffusion_pytorch_model.safetensors)")
    try:
        # low_cpu_mem_usage needs accelerate; without it diffusers would warn and fall back anyway
        low_mem = importlib.util.find_spec("accelerate") is not None
        model, info = AutoencoderDC.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=low_mem,
                                                    output_loading_info=True)
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError, safetensors errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"'{path}' is not a loadable diffusers AutoencoderDC directory: {reason}") from None
    # diffusers initialises weights the files lack at random and only logs it (a decoder without weights
    # decodes NaN): refuse, naming what is missing
    missing, mismatched = list(info.get("missing_keys", [])), list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ModelError(f"'{path}' lacks weights the AutoencoderDC needs ({len(missing)} missing, e.g. "
                         f"{sorted(missing)[:3]}; {len(mismatched)} of another shape): a damaged or different checkpoint")
    model = model.to(device=device, dtype=dtype).eval()
    return DiffusersDCAE(model, image_size=image_size)


# --------------------------------------------------------------------------------------------------
# Frame helpers: uint8 RGB <-> [-1, 1] tensors
# --------------------------------------------------------------------------------------------------


def _param(ae: nn.Module) -> Tensor:
    return next(ae.parameters())


@torch.no_grad()
def encode_frames(ae: nn.Module, frames_uint8: np.ndarray) -> Tensor:
    """RGB uint8 frames (N, H, W, 3) -> scaled latents (N, C, H/f, W/f), fp32 on the autoencoder's device."""
    frames = np.asarray(frames_uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"expected RGB uint8 frames (N, H, W, 3), got {frames.dtype} {frames.shape}")
    f = ae.config.downsample
    if frames.shape[1] % f or frames.shape[2] % f:
        raise InputError(f"frame size {frames.shape[1]}x{frames.shape[2]} is not a multiple of the "
                         f"autoencoder's {f}x downsampling; resize to {ae.config.image_size}x{ae.config.image_size}")
    p = _param(ae)
    return ae.encode(frames_from_uint8(frames, p.device).to(p.dtype)).float()  # (N, C, h, w)


@torch.no_grad()
def decode_frames(ae: nn.Module, latents: Tensor, decode: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Scaled latents (N, C, h, w) -> RGB frames (N, 3, H, W) in [-1, 1], fp32 on the autoencoder's device
    (`decode`: ae.decode, or a compiled version of it)."""
    if latents.dim() != 4:
        raise ValueError(f"decoding takes latents (N, C, h, w), got shape {tuple(latents.shape)}; "
                         "flatten batch and time first")
    p = _param(ae)
    return (decode or ae.decode)(latents.to(p.device, p.dtype)).float()


def frames_from_uint8(frames: np.ndarray, device: torch.device | str = "cpu") -> Tensor:
    """RGB uint8 frames (N, H, W, 3) -> fp32 (N, 3, H, W) in [-1, 1] on `device`."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device)  # (N, H, W, 3) uint8
    return rearrange(x, "n h w c -> n c h w").float() / 127.5 - 1.0


def frames_to_uint8(x: Tensor) -> np.ndarray:
    """RGB frames (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3) on the CPU."""
    x = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (N, 3, H, W)
    return rearrange(x, "n c h w -> n h w c").cpu().numpy()  # (N, H, W, 3)


def decode_to_uint8(ae: nn.Module, latents: Tensor) -> np.ndarray:
    """Scaled latents (N, C, h, w) -> RGB uint8 frames (N, H, W, 3) on the CPU."""
    return frames_to_uint8(decode_frames(ae, latents))
