"""`letstalk train`: the autoencoder, the diffusion transformer, and its few-step distillation.

Three stages, each its own run, each starting from a model directory and ending in one:

    letstalk new-model --preset cpu-128 --out runs/init
    letstalk train --stage autoencoder --data data/synth --init runs/init --run runs/ae --out models/ae \\
        --steps 20000 --batch 16 --lr 2e-4
    letstalk train --stage transformer --data data/synth --init models/ae --run runs/dit --out models/dit \\
        --steps 100000 --batch 32 --lr 1e-4
    letstalk train --stage distill --data data/synth --init models/dit --run runs/distill --out models/cpu-128 \\
        --steps 10000 --batch 32 --lr 2e-5

    # many GPUs (DDP; the same flags; --batch is the GLOBAL batch, split over the ranks):
    torchrun --standalone --nproc_per_node 8 -m letstalk_rt.train.trainer --stage transformer \\
        --data data/synth --init models/ae --run runs/dit --out models/dit --steps 100000 --batch 256

1. **autoencoder**: DCAutoencoder on random frames, L1 + MSE reconstruction, pixels inside the clip's
   mouth box (synth clips' own; prepared shards' fixed by their framing) weighted `1 + --mouth-weight`.
   At export `scaling_factor` is set so the encoded latents of a few fixed batches have std 1.
2. **transformer**: autoencoder frozen; mel audio encoder + AudioProjector + LetsTalkTransformer trained
   together on the flow-matching loss. A sample is a window of T frames of one clip, the K frames before
   it as memory (slots before the clip's start masked, as MemoryBank.condition does at a stream start),
   another frame of the clip as the portrait; memory and portrait get the paper's pixel-noise
   augmentation (in latent space when the latent cache is used, see data.LatentCache), the memory is
   forward-diffused to t ~ U(0, train_memory_noise_max) and ~25 % of its positions masked
   (memory.regularize_memory), and conditions are dropped with drop_portrait_prob / drop_audio_prob.
   Audio tokens come from the clip's 16 kHz audio exactly as `LetsTalkPipeline.audio_tokens` makes them
   at inference (data.audio_window: same lookahead, same +-margin window, same edge padding).
3. **distill**: the student (initialised from the trained model) learns to do in one network evaluation
   per step what the frozen teacher does with its config's guidance scales (audio guidance 2 = two
   evaluations per step). `--distill-target trajectory` (reflow): the teacher integrates `--teacher-steps`
   guided Euler steps from noise z under the real conditions to x0_T; the student regresses the straight
   path's velocity z - x0_T at x_t = (1 - t) x0_T + t z. `--distill-target velocity` (guidance
   distillation, one teacher call per step): the student regresses the teacher's guided velocity at the
   training x_t. t is half the time one of the student's `--student-steps` sampling times, otherwise
   uniform; conditions are never dropped. The output config samples in `--student-steps` steps with both
   guidance scales 1.
4. **decoder** (optional, any time after 1): a new decoder for the frozen encoder's latent space, e.g. a
   narrower one for CPUs (`--decoder-channels 8,16,32,64,128`; without it the current decoder is
   fine-tuned). The encoder, its scaling factor, the audio modules and the transformer are copied
   unchanged, so a transformer trained on those latents works with the new decoder as it is. Same loss
   and batches as the autoencoder stage; the encoder is frozen.

Every stage: AdamW, linear warm-up then cosine (to 10 %) or constant LR, gradient clipping, an EMA of the
trained weights (what is exported), bf16 autocast on CUDA (fp32 on the CPU), checkpoints every
`--ckpt-every` steps in RUN/checkpoints/step_XXXXXXX/ (a model directory of the EMA weights plus
trainer_state.pt; written to a temporary folder and renamed; the last `--keep` kept), `--resume` from the
latest one, bitwise exactly on the CPU: the samples of step s are a pure function of (seed, s) (see
data.py). RUN/log.jsonl gets one line per `--log-every` steps; TensorBoard events too if it is installed.
Under torchrun (WORLD_SIZE set) the step's global batch is the same list of samples for any world size,
each rank taking its contiguous slice; gradients are averaged by DistributedDataParallel, or with `--fsdp`
the parameters, gradients and optimizer state are sharded by FSDP2 (`shard_fsdp`: one unit per transformer
block; checkpoints gather full tensors); only rank 0 writes files. Ctrl-C or SIGTERM (`kill`, a cluster
preempting the job; torchrun passes it to every rank) stops the run after the step under way with a checkpoint
of it (`StopRequest`), so `--resume` loses nothing; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..checkpoint import Components, _has_weights, load_model, save_model, weights_digest, write_dir_atomic
from ..diffusion import EulerSampler, FlowMatching, Guidance, from_portrait
from ..errors import InputError, LetsTalkError, ModelError, Stopped
from ..memory import anchor_cell_mask, box_cells, regularize_memory
from ..models.autoencoder import DCAutoencoder
from ..pipeline import corpus_level_min
from .options import STAGES, SYNC_EXPERTS, TrainConfig, add_arguments, config_from_args  # noqa: F401 (re-exported)
from .data import (AudioFeatureCache, ClipDataset, LatentCache, audio_window, open_dataset, plan_frames,
                   plan_windows, sample_generator, window_frame_indices)
from .sync import (CROP, CRITIC_LR_SCALE, AudioSyncExpert, MouthCritic, MouthExpert, clip_log_mels, clip_mean_latents,
                   decoded_l1, mel_windows, mouth_direction_sums, mouth_origins,
                   mouth_pattern_loss, mouth_square)

SAMPLE_SEED_OFFSET = 7919  # SampleDecoderStage draws which windows it samples from seed + this (its own stream)
MIN_LR_RATIO = 0.1  # the cosine schedule ends at this fraction of --lr


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Distributed setup
# --------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def setup_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; init the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and world > 1:
        device = f"cuda:{local}"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LetsTalkError(f"--device {device}: no CUDA device is available here; use --device cpu")
        torch.cuda.set_device(torch.device(device))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, local, torch.device(device))


# --------------------------------------------------------------------------------------------------
# Objectives: the trained networks behind one forward (what DDP wraps)
# --------------------------------------------------------------------------------------------------


class AutoencoderObjective(nn.Module):
    """The DCAutoencoder's unclamped reconstruction of [-1, 1] images."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, images: Tensor) -> Tensor:
        recon, _ = self.autoencoder(images)  # (B, 3, H, W)
        return recon


def encodes_per_frame(audio_encoder: nn.Module) -> bool:
    """True for an encoder whose frames depend on their own audio window only (mel): it trains with the
    rest, on the fly. A chunked one (wav2vec2, frozen) is read from data.AudioFeatureCache instead."""
    return getattr(audio_encoder, "block_frames", 1) == 1


class FlowObjective(nn.Module):
    """Audio encoder + projector + transformer: audio windows and noisy latents in, velocity out.

    `audio_encoder=None` for a frozen chunked encoder (wav2vec2): the batch then carries its cached
    features instead of samples, and the encoder is neither run nor trained nor checkpointed."""

    def __init__(self, audio_encoder: nn.Module | None, audio_projector: nn.Module, transformer: nn.Module) -> None:
        super().__init__()
        if audio_encoder is not None and not encodes_per_frame(audio_encoder):
            raise ModelError("a chunked audio encoder (wav2vec2) cannot encode a training window on its own; "
                             "pass audio_encoder=None and its cached features (data.AudioFeatureCache)")
        self.audio_encoder = audio_encoder
        self.audio_projector = audio_projector
        self.transformer = transformer

    def audio_tokens(self, audio: Tensor, feat_index: Tensor) -> Tensor:
        """audio (B, W) samples from data.audio_window -- or, without an encoder, the cached features
        (B, T + 2m, L, D) of the same frames -- and feat_index (B, T + 2m) -> tokens (B, T, M, Dt), equal
        to `LetsTalkPipeline.audio_tokens(whole clip)[start:start + T]`."""
        b = audio.shape[0]
        enc = self.audio_encoder
        if enc is None:
            feats = audio  # (B, T + 2m, L, D)
        else:
            windows = audio.unfold(1, enc.window_samples, enc.block_samples)  # (B, T + 2m, Wn)
            feats = enc._encode_windows(windows.flatten(0, 1))  # (B * (T + 2m), L, D)
            feats = rearrange(feats, "(b f) l d -> b f l d", b=b)  # (B, T + 2m, L, D)
        feats = feats[torch.arange(b, device=feats.device)[:, None], feat_index]  # (B, T + 2m, L, D) edge-padded
        return self.audio_projector(feats, pad_left=False, pad_right=False)  # (B, T, M, Dt)

    def forward(self, audio: Tensor, feat_index: Tensor, x_t: Tensor, t: Tensor, portrait: Tensor, memory: Tensor,
                memory_mask: Tensor, drop_portrait: Tensor, drop_audio: Tensor) -> Tensor:
        tokens = self.audio_tokens(audio, feat_index)  # (B, T, M, Dt)
        return self.transformer(x_t, t, portrait, tokens, memory=memory, memory_mask=memory_mask,
                                drop_portrait=drop_portrait, drop_audio=drop_audio)  # (B, T, C, h, w)


# --------------------------------------------------------------------------------------------------
# Stages: what a batch is, the loss, and the exported model
# --------------------------------------------------------------------------------------------------


Batch = dict[str, Any]


def extra_loss_weights(cfg: TrainConfig) -> dict[str, float]:
    """The loss terms beyond the stage's own (flow, or reconstruction) that are on, by their log name; all but
    "adv" are transformer/distill only."""
    weights = {"sync": cfg.sync_weight, "pixel": cfg.pixel_mouth_weight, "frame": cfg.pixel_frame_weight,
               "adv": cfg.adv_mouth_weight, "direction": cfg.mouth_direction_weight,
               "pattern": cfg.mouth_pattern_weight}
    return {k: w for k, w in weights.items() if w}


def logged_terms(cfg: TrainConfig) -> list[str]:
    """What `Stage.last_terms` holds each step: the extra loss terms, and the critic's own loss when one trains."""
    return list(extra_loss_weights(cfg)) + (["critic"] if cfg.adv_mouth_weight else [])


class Stage:
    """One training stage. `make_batch` runs on the CPU (possibly in a worker thread) and must be a pure
    function of (step, indices); `finish` moves it to the device; `loss` runs the wrapped module."""

    name = ""
    min_frames = 1  # clips shorter than this are not sampled
    last_terms: dict[str, Tensor] = {}  # the last step's extra loss terms (extra_loss_weights), unweighted, for the log

    def __init__(self, cfg: TrainConfig, comps: Components, dataset: ClipDataset, dist: Dist) -> None:
        self.cfg, self.comps, self.dataset, self.dist = cfg, comps, dataset, dist
        self.module = self.objective(comps)
        self.export_base: Components | None = None  # unsharded copy to export from (FSDP shards self.comps)
        # per clip, the (row, col) latent cell of its mouth square, for the terms that read the mouth
        flags = [f for f, w in (("--sync-weight", cfg.sync_weight), ("--pixel-mouth-weight", cfg.pixel_mouth_weight),
                                ("--adv-mouth-weight", cfg.adv_mouth_weight),
                                ("--mouth-direction-weight", cfg.mouth_direction_weight),
                                ("--mouth-pattern-weight", cfg.mouth_pattern_weight)) if w]
        self.mouth_origins: list[Tensor] | None = (
            mouth_origins(self.dataset, comps.config.transformer.latent_size, flags[0]) if flags else None)
        self.critic: MouthCritic | None = None  # --adv-mouth-weight: trained beside the network (after_step)
        if cfg.adv_mouth_weight:
            with torch.random.fork_rng(devices=[]):  # its initial weights from the seed, the global RNG untouched
                torch.manual_seed(cfg.seed)
                self.critic = MouthCritic().to(dist.device)
            self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=CRITIC_LR_SCALE * cfg.lr, betas=(0.5, 0.999))
            self._mouths: tuple[Tensor, Tensor] | None = None  # the last step's (truth, output) mouth squares

    def objective(self, comps: Components) -> nn.Module:
        raise NotImplementedError

    def make_batch(self, step: int, indices: range) -> Batch:
        raise NotImplementedError

    def finish(self, batch: Batch) -> Batch:
        dev = self.dist.device
        return {k: v.to(dev, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        raise NotImplementedError

    def weighted_mean(self, num: Tensor, den: Tensor) -> Tensor:
        """num / den over the step's whole batch, every rank's part of it: each rank holds (num, den) of its own
        samples, and DDP (or FSDP) averages the ranks' gradients, so a rank's share is world x num / the
        ranks' summed den. A ratio per rank instead would weigh a rank whose clips' mouth boxes are larger (more
        weight) like one with smaller ones, and 2 processes would not train as 1 does."""
        if not self.dist.enabled:
            return num / den.clamp_min(1e-12)
        total = den.detach().clone()
        torch.distributed.all_reduce(total)
        return num * self.dist.world / total.clamp_min(1e-12)

    def adversarial(self, real: Tensor, fake: Tensor) -> Tensor:
        """The network's adversarial term on its mouth squares `fake` (N, 3, S, S), with gradients to the network
        only; (real, fake) are kept for the critic's own step in `after_step`."""
        assert self.critic is not None
        self.critic.requires_grad_(False)
        self._mouths = (real.detach(), fake.detach())
        return -self.critic(fake).mean()

    def after_step(self) -> None:
        """One step of the critic (hinge loss) on the mouths the network just drew and their truths. Under
        DDP its gradients are averaged over the ranks, as the network's are, so every rank's copy stays equal."""
        if self.critic is None or self._mouths is None:
            return
        real, fake = self._mouths
        self._mouths = None
        self.critic.requires_grad_(True)
        loss = self.critic.loss(real, fake)
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.dist.enabled:
            for p in self.critic.parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.dist.world
        self.critic_opt.step()
        self.last_terms["critic"] = loss.detach()

    @property
    def _cell_px(self) -> int:
        """Pixels per latent cell."""
        return self.dataset.image_size // self.comps.config.transformer.latent_size

    def pixel_loss(self, recon: Tensor, x: Tensor, w: Tensor, origins: Tensor | None) -> Tensor:
        """The frame stages' loss: `reconstruction_sums` of decoded frames `recon` against real frames `x`
        (N, 3, S, S) with pixel weights w (N, 1, S, S), plus --adv-mouth-weight x the critic's verdict on the
        mouth squares at `origins` (N, 2) latent cells, the real frames' against the decoded ones'."""
        loss = self.weighted_mean(*reconstruction_sums(recon, x, w))
        if self.critic is None:
            return loss
        assert origins is not None
        px, size = origins * self._cell_px, CROP * self._cell_px  # (N, 2) pixels
        adv = self.adversarial(mouth_square(x, px, size), mouth_square(recon, px, size))
        self.last_terms = {"adv": adv.detach()}
        return loss + self.cfg.adv_mouth_weight * adv

    def extra_state(self) -> dict[str, Any]:
        if self.critic is None:
            return {}
        return {"critic": {k: v.detach().cpu() for k, v in self.critic.state_dict().items()},
                "critic_optimizer": self.critic_opt.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.critic is None:
            if "critic" in state:  # recipe_changes stops this first; kept for checkpoints without a config
                raise InputError("--resume: this run was trained with --adv-mouth-weight (its critic is in the "
                                 "checkpoint); resume it the same way")
            return
        if "critic" not in state:
            raise InputError("--resume: this run was trained without --adv-mouth-weight; resume it the same way")
        self.critic.load_state_dict(state["critic"])
        self.critic_opt.load_state_dict(state["critic_optimizer"])

    def export(self, ema_state: dict[str, Tensor]) -> Components:
        """A copy of the components with the EMA weights loaded (config adjusted by the stage)."""
        comps = copy.deepcopy(self.export_base or self.comps)
        self.objective(comps).load_state_dict(ema_state)
        return comps


def pixel_weight(box: tuple[int, int, int, int] | None, size: int, mouth_weight: float) -> Tensor:
    """(1, S, S) loss weight of one frame: 1 + mouth_weight inside the clip's mouth box (pixels), else 1."""
    w = torch.ones((1, size, size))  # (1, S, S)
    if box is not None:
        bx, by, bw, bh = box
        w[:, max(by, 0):by + bh, max(bx, 0):bx + bw] += mouth_weight
    return w


def reconstruction_sums(recon: Tensor, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """The frame stages' reconstruction loss, mean(w * (|recon - x| + (recon - x)^2)) / mean(w), as (weighted
    sum, sum of weights) (`Stage.weighted_mean` divides): frames (N, 3, S, S) in [-1, 1], w (N, 1, S, S)."""
    err = recon - x
    return ((err.abs() + err.square()) * w).sum(), w.expand_as(err).sum()


class AutoencoderStage(Stage):
    name = "autoencoder"

    def objective(self, comps: Components) -> nn.Module:
        return AutoencoderObjective(comps.autoencoder)

    def _images(self, plans) -> tuple[Tensor, Tensor]:
        ds, s = self.dataset, self.dataset.image_size
        frames = np.stack([ds.clips[p.clip].frames[p.frame] for p in plans])  # (B, S, S, 3) uint8
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, S, S) in [-1, 1]
        weight = torch.stack([pixel_weight(ds.clips[p.clip].mouth_box, s, self.cfg.mouth_weight) for p in plans])
        return x, weight  # (B, 3, S, S), (B, 1, S, S)

    def make_batch(self, step: int, indices: range) -> Batch:
        plans = plan_frames(self.dataset, self.cfg.seed, step, indices)
        images, weight = self._images(plans)
        batch = {"images": images, "weight": weight}
        if self.mouth_origins is not None:  # the mouth squares the critic compares (latent cells)
            batch["mouth_origin"] = torch.stack([self.mouth_origins[p.clip] for p in plans])  # (B, 2)
        return batch

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, w = batch["images"], batch["weight"]  # (B, 3, S, S), (B, 1, S, S)
        recon = model(x).float()  # (B, 3, S, S)
        return self.pixel_loss(recon, x, w, batch.get("mouth_origin"))

    @torch.no_grad()
    def export(self, ema_state: dict[str, Tensor]) -> Components:
        """...and scaling_factor so that the latents of 4 fixed batches (64+ frames) have std 1."""
        comps = super().export(ema_state)
        ae = comps.autoencoder.to(self.dist.device).eval()
        n = max(16, self.cfg.batch)
        stds = []
        for k in range(4):
            x, _ = self._images(plan_frames(self.dataset, self.cfg.seed, 2**31 + k, range(n)))
            stds.append(ae.encode(x.to(self.dist.device)).float().std())
        comps.config.autoencoder.scaling_factor = float(comps.config.autoencoder.scaling_factor
                                                        / torch.stack(stds).mean().clamp_min(1e-6))
        return comps


def with_decoder(comps: Components, channels: tuple[int, ...] | None, seed: int = 0) -> Components:
    """comps with a decoder of these widths initialised from `seed` (the encoder's weights kept); as is for
    None or the widths it has."""
    ae_cfg = comps.config.autoencoder
    if channels is None or tuple(channels) == ae_cfg.decoder_widths:
        return comps
    if not isinstance(comps.autoencoder, DCAutoencoder):
        raise InputError("--decoder-channels: this model's autoencoder is a loaded diffusers DC-AE; a new decoder "
                         "can be trained for the project's own autoencoder only (omit the flag to fine-tune)")
    ae_cfg = dataclasses.replace(ae_cfg, decoder_channels=tuple(channels))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = DCAutoencoder(ae_cfg)  # checks the widths (ModelError names the rule)
    ae.encoder.load_state_dict(comps.autoencoder.encoder.state_dict())
    comps.autoencoder = ae.to(next(comps.autoencoder.parameters()).device)
    comps.config.autoencoder = ae_cfg
    return comps


class DecoderStage(AutoencoderStage):
    """A new (or fine-tuned) decoder for the frozen latent space; everything else exported unchanged."""

    name = "decoder"

    def __init__(self, cfg: TrainConfig, comps: Components, dataset: ClipDataset, dist: Dist) -> None:
        super().__init__(cfg, with_decoder(comps, cfg.decoder_channels, cfg.seed), dataset, dist)

    def objective(self, comps: Components) -> nn.Module:
        comps.autoencoder.encoder.requires_grad_(False)  # no gradient reaches it: the latents stay as they are
        return AutoencoderObjective(comps.autoencoder)

    def export(self, ema_state: dict[str, Tensor]) -> Components:
        """Stage.export: the latents' scale is the encoder's and stays as it is."""
        if self.export_base is not None:  # FSDP: the unsharded copy was read from --init (the old decoder)
            self.export_base = with_decoder(self.export_base, self.cfg.decoder_channels, self.cfg.seed)
        return Stage.export(self, ema_state)


class TransformerStage(Stage):
    name = "transformer"

    def __init__(self, cfg: TrainConfig, comps: Components, dataset: ClipDataset, dist: Dist) -> None:
        tc = comps.config.transformer
        if not 0 <= cfg.window <= tc.num_frames:
            raise InputError(f"--window {cfg.window}: this model's windows have 1..{tc.num_frames} frames (0: all)")
        self.T, self.K, self.margin = cfg.window or tc.num_frames, tc.num_memory, comps.config.audio.margin
        self.min_frames = self.T
        super().__init__(cfg, comps, dataset.with_min_frames(self.T), dist)
        self.flow = FlowMatching(shift=comps.config.sampling.shift)
        self.ae = comps.autoencoder.to(dist.device).eval().requires_grad_(False)
        self.level_min: float | None = None  # the corpus's loud end, measured at the first export
        self.cache: LatentCache | None = None
        if cfg.latent_cache:
            pixel_noise = comps.config.sampling.train_pixel_noise
            if dist.main:
                LatentCache.build(self.dataset, self.ae, pixel_noise, dist.device, progress=cfg.progress)
            dist.barrier()
            self.cache = LatentCache(LatentCache.path_for(self.dataset, self.ae), self.dataset, pixel_noise)
        self.features: AudioFeatureCache | None = None  # a chunked encoder's frozen features
        if not encodes_per_frame(comps.audio_encoder):
            comps.audio_encoder.requires_grad_(False)
            if dist.main:
                AudioFeatureCache.build(self.dataset, comps.audio_encoder, dist.device, progress=cfg.progress)
            dist.barrier()
            self.features = AudioFeatureCache(AudioFeatureCache.path_for(self.dataset, comps.audio_encoder),
                                              self.dataset)
        self.expert: MouthExpert | AudioSyncExpert | None = None  # the frozen lip-sync judge of --sync-weight
        self.sync_mels: list[Tensor] | None = None  # the audio expert's log-mel per clip
        if cfg.sync_weight:
            if self.cache is None:
                raise InputError("--sync-weight reads the latent cache; drop --no-latent-cache")
            assert self.mouth_origins is not None
            decoder = self.ae.decode if cfg.sync_decoded else None
            if cfg.sync_expert == "states":
                self.clip_means = MouthExpert.clip_means(self.dataset, self.cache)  # (C, h, w) per clip
                self.expert = MouthExpert.fit(self.dataset, self.cache, self.clip_means, self.mouth_origins, cfg.seed,
                                              decoder, dist.device).to(dist.device)
            else:
                self.clip_means = clip_mean_latents(self.dataset, self.cache)
                self.sync_mels = clip_log_mels(self.dataset)
                self.expert = AudioSyncExpert.fit(self.dataset, self.cache, self.clip_means, self.mouth_origins,
                                                  self.sync_mels, cfg.seed, decoder, dist.device).to(dist.device)
            if dist.main:
                print(self.expert.describe(), file=sys.stderr)

    def objective(self, comps: Components) -> nn.Module:
        enc = comps.audio_encoder
        return FlowObjective(enc if encodes_per_frame(enc) else None, comps.audio_projector, comps.transformer)

    def export(self, ema_state: dict[str, Tensor]) -> Components:
        """...streaming the window length it was trained on when --window was given, and raising quiet live
        speech to the loud end of the loudness it was trained on (audio.level_min from `corpus_level_min`,
        unless the config turned raising off with level_min 0)."""
        comps = super().export(ema_state)
        if self.cfg.window:
            comps.config.sampling.stream_window = self.cfg.window
        if self.cfg.portrait_start < 1:
            comps.config.sampling.start_time = self.cfg.portrait_start
        audio = comps.config.audio
        if audio.level_min > 0:
            if self.level_min is None:
                self.level_min = corpus_level_min(c.audio for c in self.dataset.clips if c.recoloured_from is None)
            if self.level_min is not None:
                audio.level_min = round(self.level_min, 4)
        return comps

    def latent_weight(self, box: tuple[int, int, int, int] | None) -> Tensor:
        """(1, 1, h, w) loss weight: 1 + mouth_weight on the latent cells the mouth box touches, else 1.

        The mouth is a few latent cells of an 8x8 map: unweighted, its share of the loss is too small for
        the audio to be learned early, while the rest of the face is a near-copy of the portrait."""
        h = self.comps.config.transformer.latent_size
        w = torch.ones((1, 1, h, h))  # (1, 1, h, w)
        if box is not None and self.cfg.mouth_weight:
            f = self.dataset.image_size / h  # pixels per latent cell
            bx, by, bw, bh = box
            x0, y0 = max(int(bx // f), 0), max(int(by // f), 0)
            x1, y1 = min(int(math.ceil((bx + bw) / f)), h), min(int(math.ceil((by + bh) / f)), h)
            w[..., y0:y1, x0:x1] += self.cfg.mouth_weight
        return w

    def sample_t(self, g: torch.Generator) -> Tensor:
        return self.flow.sample_t(1, generator=g)  # (1,)

    def make_batch(self, step: int, indices: range) -> Batch:
        """Per sample, from its own generator, in a fixed order: augmentation noise (memory + portrait),
        noise z, time t, the two drop flags; finish() then regularises the memory with the same generator."""
        cfg, sc = self.cfg, self.comps.config.sampling
        enc = self.comps.audio_encoder
        out: dict[str, list] = {k: [] for k in ("latents", "frames", "pix", "avail", "audio", "feat_index",
                                                "z", "t", "drop_p", "drop_a", "anchored", "gen", "weight",
                                                "sync_target", "mouth_ref", "mouth_origin")}
        tc = self.comps.config.transformer
        shape = (tc.latent_channels, tc.latent_size, tc.latent_size)
        for i, plan in zip(indices, plan_windows(self.dataset, cfg.seed, step, indices, self.T)):
            g = sample_generator(cfg.seed, step, i)
            clip = self.dataset.clips[plan.clip]
            idx, avail = window_frame_indices(plan, self.T, self.K)  # (K + T,), (K,)
            idx = np.append(idx, plan.ref)  # (K + T + 1,): memory, window, portrait
            noisy = torch.zeros(len(idx), dtype=torch.bool)  # (K + T + 1,) slots that get pixel noise
            noisy[:self.K] = True
            noisy[-1] = True
            if self.cache is not None:
                lat = self.cache.get(plan.clip, idx)  # (K + T + 1, C, h, w)
                lat = lat + noisy[:, None, None, None] * self.cache.noise_std * torch.randn(lat.shape, generator=g)
                out["latents"].append(lat)
            else:
                frames = torch.from_numpy(np.asarray(clip.frames[idx]))  # (K + T + 1, S, S, 3) uint8
                out["frames"].append(frames)
                out["pix"].append(noisy[:, None, None, None] * sc.train_pixel_noise
                                  * torch.randn((len(idx), 3, *frames.shape[1:3]), generator=g))  # (K+T+1, 3, S, S)
            seg, fidx = audio_window(clip.audio, plan.start, self.T, self.margin, enc.left_samples,
                                     enc.right_samples, enc.samples_per_frame)
            if self.features is not None:  # the same frames' cached features, edge-replicated already
                first = plan.start - self.margin
                out["audio"].append(self.features.get(plan.clip, first + fidx))  # (T + 2m, L, D)
                fidx = np.arange(len(fidx))
            else:
                out["audio"].append(torch.from_numpy(seg))  # (W,)
            out["feat_index"].append(torch.from_numpy(fidx))  # (T + 2m,)
            out["avail"].append(torch.from_numpy(avail))  # (K,)
            out["z"].append(torch.randn((self.T, *shape), generator=g))  # (T, C, h, w)
            out["t"].append(self.sample_t(g))  # (1,)
            drop = torch.rand(2, generator=g)  # (2,)
            out["drop_p"].append(drop[0] < sc.drop_portrait_prob)
            out["drop_a"].append(drop[1] < sc.drop_audio_prob)
            anchored = sc.memory_anchor and bool(torch.rand(1, generator=g) < sc.train_anchor_prob)
            out["anchored"].append(torch.tensor(anchored))
            out["gen"].append(g)
            out["weight"].append(self.latent_weight(clip.mouth_box))
            if self.mouth_origins is not None:
                out["mouth_origin"].append(self.mouth_origins[plan.clip])  # (2,)
            if self.expert is not None:  # what the window's truth tells the expert: mouth states, or speech
                frames = np.arange(plan.start, plan.start + self.T)  # (T,)
                if self.sync_mels is not None:
                    out["sync_target"].append(mel_windows(self.sync_mels[plan.clip], frames))  # (T, W, SYNC_MELS)
                else:
                    assert clip.mouth is not None  # MouthExpert.clip_means checked every clip
                    out["sync_target"].append(torch.from_numpy(clip.mouth[frames]))  # (T, 3)
                out["mouth_ref"].append(self.clip_means[plan.clip])  # (C, h, w)
        batch: Batch = {k: torch.stack(v) for k, v in out.items() if v and k != "gen" and k != "t"}
        batch["t"] = torch.cat(out["t"])  # (B,)
        batch["gen"] = out["gen"]
        return batch

    @torch.no_grad()
    def finish(self, batch: Batch) -> Batch:
        sc, K = self.comps.config.sampling, self.K
        batch = super().finish(batch)
        if "frames" in batch:  # live encoding: pixel noise on memory and portrait, then the frozen AE
            f = batch.pop("frames")  # (B, K + T + 1, S, S, 3) uint8
            x = rearrange(f, "b n h w c -> (b n) c h w").float() / 127.5 - 1.0  # (B*(K+T+1), 3, S, S)
            x = x + rearrange(batch.pop("pix"), "b n c h w -> (b n) c h w")  # (B*(K+T+1), 3, S, S)
            with self._autocast():
                lat = self.ae.encode(x).float()  # (B*(K+T+1), C, h, w)
            batch["latents"] = rearrange(lat, "(b n) c h w -> b n c h w", b=f.shape[0])  # (B, K+T+1, C, h, w)
        lat = batch.pop("latents")  # (B, K + T + 1, C, h, w)
        memory, batch["x0"], batch["portrait"] = lat[:, :K], lat[:, K:-1], lat[:, -1]
        avail = batch.pop("avail").to(lat.device)  # (B, K)
        anchored = batch.pop("anchored").to(lat.device)  # (B,)
        anchor_slots = torch.zeros_like(avail, dtype=torch.bool)  # (B, K)
        if K:  # as MemoryBank does at inference: slot 0 (when K >= 2) and empty slots hold the portrait
            anchor_slots = ~avail.bool()
            if K >= 2:
                anchor_slots[:, 0] = True
            anchor_slots &= anchored[:, None].bool()
            memory = torch.where(anchor_slots[:, :, None, None, None], batch["portrait"][:, None], memory)
            avail = torch.where(anchor_slots, torch.ones_like(avail), avail)
        mems, masks = [], []
        for j, g in enumerate(batch.pop("gen")):  # per-sample generators: independent of the batching
            m, keep = regularize_memory(memory[j:j + 1].cpu(), sc.train_memory_noise_max,
                                        sc.train_memory_mask_ratio, generator=g)  # (1, K, C, h, w), (1, K, h, w)
            mems.append(m)
            masks.append(keep)
        mask = torch.cat(masks).to(lat.device) * avail[:, :, None, None]  # (B, K, h, w)
        hidden = anchor_cell_mask(*lat.shape[-2:], sc.anchor_mouth_box).to(lat.device)  # (h, w)
        mask = torch.where(anchor_slots[:, :, None, None], mask * hidden, mask)  # the anchor's hidden cells
        batch["memory"] = torch.cat(mems).to(lat.device) * mask[:, :, None]  # (B, K, C, h, w)
        batch["memory_mask"] = mask
        return batch

    def _autocast(self):
        dev = self.dist.device
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def conditions(self, batch: Batch) -> tuple[Tensor, ...]:
        return (batch["portrait"], batch["memory"], batch["memory_mask"], batch["drop_p"], batch["drop_a"])

    def targets(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The clean latents the path starts from and the noise it ends at: (x0, z), (B, T, C, h, w)."""
        return batch["x0"], batch["z"]

    @torch.no_grad()
    def guide(self, objective: FlowObjective, batch: Batch, guidance: tuple[float, float]) -> Guidance:
        """Classifier-free guidance at (portrait, audio) scales `guidance` over the batch's conditions."""
        with self._autocast():
            tokens = objective.audio_tokens(batch["audio"], batch["feat_index"])  # (B, T, M, Dt)
        box = self.comps.config.sampling.audio_guidance_box  # audio guidance on the mouth only, as inference
        region = None if box is None else box_cells(*batch["portrait"].shape[-2:], box).to(tokens.device)
        return Guidance(*guidance, region, portrait=batch["portrait"], audio=tokens, memory=batch["memory"],
                        memory_mask=batch["memory_mask"])

    @torch.no_grad()
    def sample(self, objective: FlowObjective, batch: Batch, guidance: tuple[float, float], sampler: EulerSampler,
               start: float) -> Tensor:
        """Clean latents (B, T, C, h, w) of the batch's windows from `objective` (frozen) as inference samples
        them: guided Euler steps of `sampler` from the batch's noise z, or from the portrait noised to `start`
        with it (start < 1), with the batch's audio, portrait and memory."""
        guide = self.guide(objective, batch, guidance)
        z, t = batch["z"], batch["t"]  # (B, T, C, h, w), (B,)
        x = z if start == 1 else from_portrait(batch["portrait"], z, start)  # (B, T, C, h, w)
        for s in sampler.timesteps:
            with self._autocast():
                v = guide.velocity(objective.transformer, x, torch.full_like(t, float(s)))  # (B, T, C, h, w)
            x = sampler.step(v, s, x)
        return x

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x0, z = self.targets(batch)  # (B, T, C, h, w) each
        t = batch["t"]  # (B,)
        if self.cfg.portrait_start < 1:  # x_t = (1 - T) portrait + T z: the z' with (1 - T) x0 + T z' = x_t
            T = self.cfg.portrait_start
            t = torch.full_like(t, T)
            z = z + (1 - T) / T * (batch["portrait"][:, None] - x0)  # (B, T, C, h, w)
        x_t = self.flow.add_noise(x0, z, t)  # (B, T, C, h, w)
        with self._autocast():
            v = model(batch["audio"], batch["feat_index"], x_t, t, *self.conditions(batch))  # (B, T, C, h, w)
        # weight (B, 1, 1, h, w): the mouth counts more
        loss = self.weighted_mean(*self.flow.weighted_sums(v, x0, z, batch["weight"]))
        weights = extra_loss_weights(self.cfg)
        if not weights:
            return loss
        x0_hat = x_t - t.reshape(-1, 1, 1, 1, 1) * v.float()  # (B, T, C, h, w): for 1 step at t = 1, the output
        n = x0_hat.shape[1]
        # (B T, C, h, w) each; the terms compare with the ground truth (the distill stage's x0 is the teacher's)
        estimate, truth = x0_hat.flatten(0, 1), batch["x0"].flatten(0, 1)
        origins = batch["mouth_origin"][:, None].expand(-1, n, -1).flatten(0, 1) if "mouth_origin" in batch else None
        terms = {}
        if self.expert is not None:
            ref = batch["mouth_ref"][:, None].expand(-1, n, -1, -1, -1).flatten(0, 1)  # (B T, C, h, w)
            terms["sync"] = self.expert.loss(estimate, ref, origins, batch["sync_target"].flatten(0, 1))
        if weights.keys() & {"pixel", "adv", "direction", "pattern"}:  # these compare the mouth as decoded
            with torch.no_grad():
                real = self.ae.decode(mouth_square(truth, origins).float())  # (B T, 3, S, S)
            fake = self.ae.decode(mouth_square(estimate, origins).float())  # (B T, 3, S, S)
            if "pixel" in weights:
                terms["pixel"] = (fake - real).abs().mean()
            if self.critic is not None:
                terms["adv"] = self.adversarial(real, fake)
            if "pattern" in weights:
                terms["pattern"] = mouth_pattern_loss(fake, real)
            if "direction" in weights:
                with torch.no_grad():  # the portrait's own mouth square: what both changes are measured from
                    ref = self.ae.decode(mouth_square(batch["portrait"], batch["mouth_origin"]).float())  # (B, 3, S, S)
                terms["direction"] = self.weighted_mean(*mouth_direction_sums(fake.unflatten(0, (-1, n)),
                                                                               real.unflatten(0, (-1, n)), ref))
        if "frame" in weights:
            terms["frame"] = decoded_l1(self.ae.decode, estimate, truth)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return loss + sum(weights[k] * v for k, v in terms.items())


class DecoderObjective(nn.Module):
    """The DCAutoencoder's decoder alone: latents (scaled, as the transformer makes them) in, unclamped
    [-1, 1] frames out. Holds the whole autoencoder, so its state matches AutoencoderObjective's."""

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, latents: Tensor) -> Tensor:
        ae = self.autoencoder
        return ae.decoder(latents / ae.config.scaling_factor)  # (N, 3, H, W)


def batch_rows(batch: Batch, rows: Tensor) -> Batch:
    """The windows `rows` (b,) of a batch: every tensor with the batch's leading dimension indexed, the rest as is."""
    n = len(batch["x0"])
    return {k: v[rows.to(v.device)] if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in batch.items()}


class SampleDecoderStage(TransformerStage):
    """`--stage decoder --decode-samples P`: the decoder fine-tuned on what the frozen model generates.

    A share P of the training windows is sampled by the model itself exactly as inference samples it (its
    config's steps, start time and guidance, from the window's audio, portrait and memory: one network
    evaluation per window for a distilled model); the rest keep the truth's latents, so the decoder still
    decodes clean latents (the portrait's, for detail transfer). Either way the decoded frames are pulled
    toward the REAL frames (L1 + L2, the mouth box weighted by --mouth-weight, as the autoencoder stage).
    The decoder thus learns what the generated latents mean -- e.g. a mouth the transformer draws darker
    where the real one shows teeth -- without any change to the latents the memory bank carries.
    Everything but the decoder is exported unchanged."""

    name = "decoder"

    def __init__(self, cfg: TrainConfig, comps: Components, dataset: ClipDataset, dist: Dist) -> None:
        comps = with_decoder(comps, cfg.decoder_channels, cfg.seed)
        if not isinstance(comps.autoencoder, DCAutoencoder):
            raise InputError("--decode-samples: this model's autoencoder is a loaded diffusers DC-AE; only the "
                             "project's own autoencoder's decoder can be fine-tuned on samples")
        super().__init__(cfg, comps, dataset, dist)
        enc = comps.audio_encoder
        self.student = FlowObjective(enc if encodes_per_frame(enc) else None, comps.audio_projector,
                                     comps.transformer).to(dist.device).eval().requires_grad_(False)
        comps.autoencoder.decoder.requires_grad_(True).train()  # TransformerStage froze the whole autoencoder
        sc = comps.config.sampling
        self.guidance = (sc.portrait_guidance, sc.audio_guidance)
        self.sampler = EulerSampler(shift=sc.shift)
        self.sampler.set_timesteps(sc.num_steps, sc.start_time)

    def objective(self, comps: Components) -> nn.Module:
        comps.autoencoder.encoder.requires_grad_(False)
        return DecoderObjective(comps.autoencoder)

    def make_batch(self, step: int, indices: range) -> Batch:
        """TransformerStage's window batch plus the window's real frames, their loss weight and, per window,
        whether it is decoded from the model's sample (a draw of its own, so the rest of the batch is the
        transformer stage's)."""
        batch = super().make_batch(step, indices)
        ds, s = self.dataset, self.dataset.image_size
        frames, weights, sampled = [], [], []
        for i, plan in zip(indices, plan_windows(ds, self.cfg.seed, step, indices, self.T)):
            clip = ds.clips[plan.clip]
            frames.append(torch.from_numpy(np.array(clip.frames[plan.start:plan.start + self.T])))  # (T, S, S, 3) copied
            weights.append(pixel_weight(clip.mouth_box, s, self.cfg.mouth_weight))
            g = sample_generator(self.cfg.seed + SAMPLE_SEED_OFFSET, step, i)
            sampled.append(bool(torch.rand(1, generator=g) < self.cfg.decode_samples))
        batch["frames_gt"] = torch.stack(frames)  # (B, T, S, S, 3) uint8
        batch["pixel_weight"] = torch.stack(weights)  # (B, 1, S, S)
        batch["sampled"] = torch.tensor(sampled)  # (B,)
        return batch

    @torch.no_grad()
    def finish(self, batch: Batch) -> Batch:
        batch = super().finish(batch)
        batch["drop_p"] = torch.zeros_like(batch["drop_p"])  # sampled as inference samples: full conditions
        batch["drop_a"] = torch.zeros_like(batch["drop_a"])
        return batch

    def _samples(self, batch: Batch) -> Tensor:
        """The frozen model's clean latents for the batch's windows (B, T, C, h, w), as inference makes them."""
        sc = self.comps.config.sampling
        return self.sample(self.student, batch, self.guidance, self.sampler, sc.start_time)

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        lat = batch["x0"]  # (B, T, C, h, w)
        rows = batch["sampled"].nonzero().squeeze(1)  # (b,) the windows decoded from the model's own samples
        if len(rows):  # only those are sampled: a share P < 1 costs P of a full batch's sampling
            lat = lat.index_copy(0, rows.to(lat.device), self._samples(batch_rows(batch, rows)))
        with self._autocast():
            recon = model(lat.flatten(0, 1)).float()  # (B T, 3, S, S)
        x = rearrange(batch["frames_gt"], "b t h w c -> (b t) c h w").float() / 127.5 - 1.0  # (B T, 3, S, S)
        w = batch["pixel_weight"].repeat_interleave(lat.shape[1], dim=0)  # (B T, 1, S, S)
        origins = batch.get("mouth_origin")  # (B, 2) latent cells, when a mouth term needs them
        return self.pixel_loss(recon, x, w, None if origins is None else origins.repeat_interleave(lat.shape[1], dim=0))

    def export(self, ema_state: dict[str, Tensor]) -> Components:
        """Stage.export: only the decoder changed (no stream or sampling settings are written)."""
        if self.export_base is not None:
            self.export_base = with_decoder(self.export_base, self.cfg.decoder_channels, self.cfg.seed)
        return Stage.export(self, ema_state)


class DistillStage(TransformerStage):
    """Few-step and guidance distillation: the student learns, in ONE network evaluation per step, what the
    frozen teacher does with its config's guidance scales (2-3 evaluations per step).

    target "trajectory" (reflow): the teacher integrates `teacher_steps` guided Euler steps from z to x0_T;
    the student regresses the straight path's velocity z - x0_T. target "velocity" (guidance distillation):
    the student regresses the teacher's guided velocity at the training x_t itself, one batched teacher call
    per step (cheap; the step count stays what the teacher needed).
    """

    name = "distill"

    def __init__(self, cfg: TrainConfig, comps: Components, dataset: ClipDataset, dist: Dist) -> None:
        super().__init__(cfg, comps, dataset, dist)
        sc = comps.config.sampling
        self.guidance = (sc.portrait_guidance, sc.audio_guidance)  # the teacher's; the student's become 1
        self.teacher = copy.deepcopy(self.module).to(dist.device).eval().requires_grad_(False)
        self.teacher_sampler = EulerSampler(shift=sc.shift)
        self.teacher_sampler.set_timesteps(cfg.teacher_steps, cfg.teacher_start)
        student = EulerSampler(shift=sc.shift)
        student.set_timesteps(cfg.student_steps)
        assert student.timesteps is not None
        self.student_times = student.timesteps.clone()  # (S,)

    def sample_t(self, g: torch.Generator) -> Tensor:
        """Half the time one of the student's own sampling times, otherwise uniform in (0, 1)."""
        u = torch.rand(2, generator=g)  # (2,)
        if u[0] < 0.5:
            return self.student_times[int(u[1] * len(self.student_times))].reshape(1)
        return u[1:].clamp(1e-3, 1.0)  # (1,)

    @torch.no_grad()
    def finish(self, batch: Batch) -> Batch:
        batch = super().finish(batch)
        batch["drop_p"] = torch.zeros_like(batch["drop_p"])  # the student learns the guided, full-condition
        batch["drop_a"] = torch.zeros_like(batch["drop_a"])  # output (the flags were drawn: same random stream)
        return batch

    @torch.no_grad()
    def targets(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(x0', z') whose straight path has the teacher's velocity: for "trajectory", where the teacher's
        guided Euler steps from z land, and z; for "velocity", the pair through the training x_t whose
        velocity z' - x0' is the teacher's guided velocity there."""
        x0, z, t = batch["x0"], batch["z"], batch["t"]  # (B, T, C, h, w) x2, (B,)
        if self.cfg.distill_target == "velocity":
            x_t = self.flow.add_noise(x0, z, t)  # (B, T, C, h, w)
            with self._autocast():
                v = self.guide(self.teacher, batch, self.guidance).velocity(self.teacher.transformer, x_t, t)
            tt = t.reshape(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1, 1)
            return x_t - tt * v, x_t + (1 - tt) * v
        return self.sample(self.teacher, batch, self.guidance, self.teacher_sampler, self.cfg.teacher_start), z

    def export(self, ema_state: dict[str, Tensor]) -> Components:
        comps = super().export(ema_state)
        sc = comps.config.sampling
        sc.num_steps = self.cfg.student_steps
        sc.portrait_guidance = sc.audio_guidance = 1.0  # baked in: one evaluation per step
        sc.audio_guidance_box = None
        return comps


STAGE_CLASSES: dict[str, type[Stage]] = {"autoencoder": AutoencoderStage, "decoder": DecoderStage,
                                         "transformer": TransformerStage,
                                         "distill": DistillStage}


# --------------------------------------------------------------------------------------------------
# Optimiser, schedule, EMA, checkpoints
# --------------------------------------------------------------------------------------------------


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of --lr at step s: linear warm-up over `warmup` steps, then cosine to MIN_LR_RATIO or constant."""

    def f(s: int) -> float:
        if s < cfg.warmup:
            return (s + 1) / cfg.warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class EMA:
    """Exponential moving average of a module's state: float parameters averaged, the rest copied."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.trained = {n for n, p in module.named_parameters() if p.requires_grad}
        self.state = {k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
                      for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if k in self.trained:
                self.state[k].lerp_(v.detach().float(), 1 - d)
            else:
                self.state[k].copy_(v)

    def full_state(self) -> dict[str, Tensor]:
        """Unsharded copies (under FSDP the entries are sharded DTensors: gathered, on every rank)."""
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in self.state.items()}

    @torch.no_grad()
    def load_full(self, state: dict[str, Tensor]) -> None:
        """Restore from unsharded tensors (a checkpoint), sharding them like the current state."""
        for k, v in self.state.items():
            full = state[k].to(v.to_local().device if isinstance(v, DTensor) else v.device)
            if isinstance(v, DTensor):
                full = distribute_tensor(full.to(v.dtype), v.device_mesh, v.placements)
            v.copy_(full)


FSDP_TORCH = (2, 10)  # the oldest torch whose FSDP2 run matched one process (tests/test_train.py; README, "Dependencies")


class StopRequest:
    """Ctrl-C or SIGTERM while the steps run asks the loop to stop after the step under way, with a checkpoint of it,
    instead of losing every step since the last one (a cluster preempting a job sends SIGTERM, then kills it seconds
    later). torchrun runs its workers in sessions of their own and passes the signal it got on to each (then kills
    them 30 s later); the ranks agree on the step (`requested` is a collective: call it every step on every rank).
    A repeated SIGTERM is ignored (a `kill` sent twice; `timeout` signals the program and its process group), a
    second Ctrl-C stops at once (the checkpoints written so far stay). Installed from the main thread only; a Ctrl-C
    the program was started ignoring (a background job) stays ignored."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) not in (signal.SIG_IGN, None):
                    self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: now
        if self.signal is None:
            self.signal = signum
            print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint (Ctrl-C again to "
                  "stop at once)", file=sys.stderr)

    def requested(self, dist: Dist) -> bool:
        if not dist.enabled:
            return self.signal is not None
        flag = torch.tensor(float(self.signal is not None), device=dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag)


def torch_version() -> tuple[int, int]:
    return tuple(int(x) for x in torch.__version__.split(".")[:2])


def shard_fsdp(module: nn.Module, dist: Dist) -> None:
    """FSDP2 (`fully_shard`): each transformer block (the backbone's and any siamese branch's) is one unit,
    the rest of the module the root unit; parameters become DTensors sharded over the ranks, gathered
    for each unit's forward and backward and reduce-scattered after. For models (L/XL) whose replicated
    parameters, gradients and AdamW state do not fit one GPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # Every stage's loss reads the module's output out of place (FlowMatching.weighted_sums, the AE's error), which is
    # what FSDP2's warning about view outputs asks for; silence it instead of printing it every step.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(dist.device.type, (dist.world,))
    for name, m in module.named_modules():
        if name.endswith("blocks") and isinstance(m, nn.ModuleList):
            for block in m:
                fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# TrainConfig fields a resumed run may change: how long it runs, where it writes and reads, how it is
# watched. Every other field is the recipe; a resume that changes one would continue different training.
# (--no-latent-cache may not change: with and without the cache a batch draws different noise from its samples'
# generators, so the run would go on on other noise. --init's path may change, its content not: init_fingerprint.)
RESUME_MAY_CHANGE = frozenset({"data", "init", "run", "out", "steps", "ckpt_every", "keep", "log_every", "device",
                               "resume", "stop_after", "workers", "progress"})


def recipe_changes(saved: dict[str, Any] | None, cfg: TrainConfig) -> list[str]:
    """The recipe flags `cfg` sets otherwise than the checkpointed run's `saved` config, as
    '--flag SAVED (now NOW)'. A field the checkpoint lacks (written before that flag existed) counts as its
    default, which is what that run trained with."""
    if not saved:
        return []

    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, (tuple, list)) else (str(v) if isinstance(v, Path) else v)

    def text(v: Any) -> str:
        if v is None:
            return "unset"
        return ",".join(str(x) for x in v) if isinstance(v, list) else ("on" if v is True else "off" if v is False else f"{v}")

    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUME_MAY_CHANGE or f.default is dataclasses.MISSING:
            continue
        was, now = norm(saved.get(f.name, f.default)), norm(getattr(cfg, f.name))
        if was != now:
            out.append(f"--{f.name.replace('_', '-')} {text(was)} (now {text(now)})")
    return out


def checkpoint_dirs(run: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "trainer_state.pt").is_file())


ABANDONED_CHECKPOINT = re.compile(r"\.step_\d+\.(?:partial|old)-(\d+)")  # checkpoint.write_dir_atomic's, by its PID


def remove_abandoned_checkpoints(run: Path) -> list[str]:
    """Delete the checkpoint folders a killed run left half-written (`write_dir_atomic`'s `.step_N.partial-PID`, and
    `.old-PID`), unless their PID is another process still running: a model's full weights and optimizer state each,
    which a resume never reads. Returns their names."""
    root = run / "checkpoints"
    gone: list[str] = []
    if not root.is_dir():
        return gone
    for path in sorted(root.iterdir()):
        found = ABANDONED_CHECKPOINT.fullmatch(path.name)
        if found is None or not path.is_dir():
            continue
        pid = int(found.group(1))
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # alive (a second trainer writing here?): left alone
            except PermissionError:
                continue  # alive, another user's
            except (ProcessLookupError, OverflowError, OSError):
                pass
        shutil.rmtree(path, ignore_errors=True)
        gone.append(path.name)
    return gone


def _load_latest_state(ckpts: list[Path]) -> dict:
    """The newest checkpoint's trainer state that loads; one that does not (cut short by a power loss or a full
    disk) is reported and the one before it is used."""
    for ckpt in reversed(ckpts):
        try:
            return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        except Exception as e:
            print(f"--resume: checkpoint '{ckpt}' cannot be read ({type(e).__name__}: {e}); trying the one before",
                  file=sys.stderr)
    raise InputError(f"--resume: no checkpoint of '{ckpts[-1].parent.parent}' can be read; start a new --run")





# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _check(cfg: TrainConfig, dist: Dist) -> None:
    if cfg.stage not in STAGES:
        raise InputError(f"--stage {cfg.stage!r}: choose one of {', '.join(STAGES)}")
    for name in ("steps", "batch", "ckpt_every", "log_every", "keep"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.recolour_copies < 0:
        raise InputError(f"--recolour-copies must be 0 or more, got {cfg.recolour_copies}")
    denoiser_only = (("--sync-weight", cfg.sync_weight), ("--pixel-mouth-weight", cfg.pixel_mouth_weight),
                     ("--pixel-frame-weight", cfg.pixel_frame_weight),
                     ("--mouth-direction-weight", cfg.mouth_direction_weight),
                     ("--mouth-pattern-weight", cfg.mouth_pattern_weight))
    for flag, w in (*denoiser_only, ("--adv-mouth-weight", cfg.adv_mouth_weight)):
        if w < 0 or not math.isfinite(w):
            raise InputError(f"{flag} must be a number >= 0, got {w}")
    for flag, w in denoiser_only:
        if w and cfg.stage not in ("transformer", "distill"):
            raise InputError(f"{flag} applies to the transformer and distill stages, not {cfg.stage}")
    if cfg.sync_decoded and not cfg.sync_weight:
        raise InputError("--sync-decoded chooses what the lip-sync expert reads; give --sync-weight too")
    if cfg.sync_expert not in SYNC_EXPERTS:
        raise InputError(f"--sync-expert {cfg.sync_expert!r}: choose one of {', '.join(SYNC_EXPERTS)}")
    if cfg.sync_expert != "states" and not cfg.sync_weight:
        raise InputError("--sync-expert chooses the lip-sync expert; give --sync-weight too")
    if not 0 < cfg.portrait_start <= 1:
        raise InputError(f"--portrait-start {cfg.portrait_start:g}: choose a flow time in (0, 1], 1 = off")
    if cfg.portrait_start < 1 and cfg.stage not in ("transformer", "distill"):
        raise InputError(f"--portrait-start applies to the transformer and distill stages, not {cfg.stage}")
    if not 0 < cfg.teacher_start <= 1:
        raise InputError(f"--teacher-start {cfg.teacher_start:g}: choose a flow time in (0, 1], 1 = off")
    if cfg.teacher_start < 1 and (cfg.stage != "distill" or cfg.distill_target != "trajectory"):
        raise InputError("--teacher-start applies to the distill stage with --distill-target trajectory")
    if not 0 <= cfg.decode_samples <= 1:
        raise InputError(f"--decode-samples {cfg.decode_samples:g}: choose a share of the windows in [0, 1]")
    if cfg.decode_samples and cfg.stage != "decoder":
        raise InputError(f"--decode-samples applies to the decoder stage, not {cfg.stage}")
    if cfg.batch % dist.world:
        raise InputError(f"--batch {cfg.batch} (global) must be divisible by the {dist.world} ranks")
    if cfg.fsdp and torch_version() < FSDP_TORCH:
        raise InputError(f"--fsdp needs torch >= {'.'.join(map(str, FSDP_TORCH))} (this is {torch.__version__}): "
                         "FSDP2 before it reports and clips another gradient norm than one process would (2.7-2.9) "
                         "or fails on the CPU (2.6); install a newer torch, or train without --fsdp (DDP)")
    if cfg.lr <= 0 or not 0 <= cfg.ema < 1 or cfg.warmup < 0 or cfg.grad_clip < 0:
        raise InputError("--lr must be > 0, --ema in [0, 1), --warmup and --grad-clip >= 0")
    for flag, value, ok in (("--seed", cfg.seed, cfg.seed >= 0), ("--weight-decay", cfg.weight_decay,
                            cfg.weight_decay >= 0), ("--mouth-weight", cfg.mouth_weight, cfg.mouth_weight >= 0),
                            ("--stop-after", cfg.stop_after, cfg.stop_after is None or cfg.stop_after >= 1)):
        if not ok:
            raise InputError(f"{flag} {value}: give {'1 or more' if flag == '--stop-after' else 'a number >= 0'}")
    if cfg.schedule not in ("cosine", "constant"):
        raise InputError(f"--schedule {cfg.schedule!r}: choose cosine or constant")
    if not 1 <= cfg.student_steps <= 4 or not 1 <= cfg.teacher_steps <= 50:
        raise InputError("--student-steps must be 1..4 and --teacher-steps 1..50")
    if cfg.distill_target not in ("trajectory", "velocity"):
        raise InputError(f"--distill-target {cfg.distill_target!r}: choose trajectory or velocity")
    ckpts = checkpoint_dirs(cfg.run)
    if ckpts and not cfg.resume:
        raise InputError(f"--run '{cfg.run}' already has checkpoints (latest {ckpts[-1].name}); pass --resume "
                         "to continue it, or choose a new --run")
    if not (cfg.init / "config.json").is_file():
        raise ModelError(f"--init '{cfg.init}' is not a model directory (no config.json); make one with "
                         "`letstalk new-model --preset cpu-128 --out DIR` or pass a previous stage's --out")


def _hardware(dist: Dist) -> str:
    if dist.device.type == "cuda":
        return f"{dist.world}x {torch.cuda.get_device_name(dist.device)}"
    return f"{dist.world}x CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def train(cfg: TrainConfig) -> Path | None:
    """Run (or resume) one stage; returns the final model directory (None when stopped early)."""
    dist = setup_distributed(cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_fingerprint(comps: Components) -> str:
    """A digest of a model's config and every weight: what a resumed run must start from again (the frozen
    parts -- the autoencoder, a distill teacher, the sample decoder's model -- and the settings come from --init,
    not from the checkpoint)."""
    parts = [comps.config.to_json()] + [f"{name}:{weights_digest(module)}" for name, module in sorted(
        comps.modules().items()) if _has_weights(comps.config, name) or not _pinned(comps.config, name)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _pinned(config, name: str) -> bool:
    """A part loaded from its own folder whose digest the config already records (wav2vec2 with
    audio.wav2vec2_digest): the config pins it, so its ~95M weights need not be hashed again."""
    return name == "audio_encoder" and bool(config.audio.wav2vec2_digest)


def _train(cfg: TrainConfig, dist: Dist) -> Path | None:
    _check(cfg, dist)
    comps = load_model(cfg.init)
    if comps.config.autoencoder.diffusers_path and cfg.stage in ("autoencoder", "decoder"):
        raise InputError(f"--stage {cfg.stage}: --init's autoencoder is the pretrained DC-AE at "
                         f"'{comps.config.autoencoder.diffusers_path}', which stays frozen; train the transformer "
                         "and distill stages on its latents")
    fingerprint = init_fingerprint(comps)
    for m in comps.modules().values():
        m.requires_grad_(True).train()
    if dist.main:
        dataset = open_dataset(cfg.data, comps.config.image_size, cfg.split, progress=cfg.progress)
    dist.barrier()
    if not dist.main:
        dataset = open_dataset(cfg.data, comps.config.image_size, cfg.split, build_cache=False, progress=False)
    if cfg.balance_skin_tone:
        dataset = dataset.balance_skin_tone()
    if cfg.recolour_copies:
        dataset = dataset.with_recoloured_copies(cfg.recolour_copies)
    stage_class = SampleDecoderStage if cfg.stage == "decoder" and cfg.decode_samples else STAGE_CLASSES[cfg.stage]
    stage = stage_class(cfg, comps, dataset, dist)
    module = stage.module.to(dist.device)
    if cfg.stage in ("autoencoder", "decoder"):
        for name in ("audio_encoder", "audio_projector", "transformer"):
            getattr(comps, name).requires_grad_(False)

    # state: optimizer, schedule, EMA; restored from the latest checkpoint with --resume. Checkpoints hold
    # full (unsharded) tensors, so the module is restored before FSDP shards it, and the optimizer and
    # the EMA are made after (their state then lives sharded, like the parameters).
    state = None
    ckpts = checkpoint_dirs(cfg.run)
    if dist.main and (gone := remove_abandoned_checkpoints(cfg.run)):
        print(f"deleted {len(gone)} checkpoint folder(s) a killed run left half-written: {', '.join(gone)}",
              file=sys.stderr)
    if cfg.resume and ckpts:
        state = _load_latest_state(ckpts)
        if state["stage"] != cfg.stage:
            raise InputError(f"--resume: '{cfg.run}' is a {state['stage']} run, not {cfg.stage}")
        if state.get("fsdp", False) != cfg.fsdp:
            raise InputError(f"--resume: '{cfg.run}' was trained {'with' if state.get('fsdp') else 'without'} "
                             "--fsdp; resume it the same way")
        if state.get("init_fingerprint", fingerprint) != fingerprint:
            raise InputError(f"--resume: --init '{cfg.init}' is not the model the run in '{cfg.run}' started from (its "
                             "weights or config changed since): the frozen parts and settings come from it. Resume "
                             "with the same --init, or start a new --run")
        changed = recipe_changes(state.get("config"), cfg)
        if changed:
            raise InputError(f"--resume: '{cfg.run}' was trained with other settings: {'; '.join(changed)}. Resume "
                             "it with the flags it was started with (only --steps, --ckpt-every, --keep, --log-every, "
                             "--workers, --device, --out and the paths may change), or start a new --run")
        try:
            module.load_state_dict(state["module"])
        except RuntimeError as e:
            raise InputError(f"--resume: the checkpoint in '{cfg.run}' does not fit the model built from --init "
                             f"'{cfg.init}' and these flags (pass the same --init and --decoder-channels as the run "
                             f"that wrote it): {str(e).splitlines()[0]}") from None
    if cfg.fsdp:
        if dist.main:  # checkpoints and the final model are exported from an unsharded copy on the CPU (read
            stage.export_base = load_model(cfg.init)  # again: copying the device modules would need GPU memory)
        shard_fsdp(module, dist)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    ema = EMA(module, cfg.ema)
    start = 0
    if state is not None:
        if cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(module, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ema.load_full(state["ema"])
        _set_rng_state(state["rng"])
        stage.load_extra_state(state.get("extra", {}))
        start = int(state["step"])
    logged = state.get("log_interval") if state is not None else None  # the log row's sums so far, if mid-row
    if cfg.resume and not ckpts and dist.main:
        print(f"--resume: '{cfg.run}' has no checkpoint yet; starting from step 0", file=sys.stderr)
    if dist.enabled and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        model: nn.Module = DistributedDataParallel(
            module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    else:
        model = module  # FSDP: sharded in place

    log_file = cfg.run / "log.jsonl"
    writer = None
    if dist.main:
        cfg.run.mkdir(parents=True, exist_ok=True)
        _trim_log(log_file, start)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events the interrupted one wrote after its checkpoint (as the log)
            writer = SummaryWriter(str(cfg.run / "tensorboard"), purge_step=start + 1 if start else None)
        except ImportError:
            pass
        print(f"training {cfg.stage} on {dataset.describe()}: steps {start}..{cfg.steps}, global batch {cfg.batch}, "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M trained parameters, {_hardware(dist)}", file=sys.stderr)

    per_rank = cfg.batch // dist.world
    lo = dist.rank * per_rank

    def make(step: int) -> Batch:
        return stage.make_batch(step, range(lo, lo + per_rank))

    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    pool = ThreadPoolExecutor(max_workers=cfg.workers) if cfg.workers > 0 else None
    ahead = max(1, cfg.workers)
    futures = {s: pool.submit(make, s) for s in range(start, min(end, start + ahead))} if pool else {}
    bar = None
    if dist.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=cfg.stage, unit="step", dynamic_ncols=True)
    loss_sum = torch.zeros((), device=dist.device)
    terms = logged_terms(cfg)
    term_sums = torch.zeros(len(terms), device=dist.device)  # the extra loss terms, unweighted (logged)
    norm_sum, n_logged, t_log, t_start = 0.0, 0, time.perf_counter(), time.perf_counter()
    n_timed = 0  # steps of this invocation in the row (speed), n_logged may include some from before a resume
    if logged:  # resumed in the middle of a log row: it goes on where it was (the recipe, so the terms, is the same)
        loss_sum.fill_(logged["loss"])
        term_sums.copy_(torch.tensor(logged["term_sums"], dtype=term_sums.dtype))
        norm_sum, n_logged = logged["norm"], logged["n"]
    step = start
    stop = StopRequest()
    try:
        stop.install()
        for step in range(start, end):
            if pool is not None:
                batch = futures.pop(step).result()
                if step + ahead < end:
                    futures[step + ahead] = pool.submit(make, step + ahead)
            else:
                batch = make(step)
            batch = stage.finish(batch)
            loss = stage.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            optimizer.step()
            scheduler.step()
            stage.after_step()
            ema.update(module, step)
            loss_sum += loss.detach().float()
            for i, k in enumerate(terms):
                term_sums[i] += stage.last_terms[k].float()
            norm_sum += float(norm)
            n_logged += 1
            n_timed += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                if dist.enabled:
                    torch.distributed.all_reduce(loss_sum)
                    loss_sum /= dist.world
                    torch.distributed.all_reduce(term_sums)
                    term_sums /= dist.world
                now = time.perf_counter()
                row = {"step": done, "loss": float(loss_sum) / n_logged, "lr": scheduler.get_last_lr()[0],
                       "grad_norm": norm_sum / n_logged, "samples_per_s": n_timed * cfg.batch / (now - t_log),
                       "steps_per_s": n_timed / (now - t_log), "seconds": now - t_start}
                row.update({k: float(term_sums[i]) / n_logged for i, k in enumerate(terms)})
                if dist.main:
                    with open(log_file, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if writer is not None:
                        for k in ("loss", "lr", "grad_norm", "samples_per_s"):
                            writer.add_scalar(f"{cfg.stage}/{k}", row[k], done)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
                loss_sum.zero_()
                term_sums.zero_()
                norm_sum, n_logged, n_timed, t_log = 0.0, 0, 0, time.perf_counter()
            if bar is not None:
                bar.update(1)
            stopping = done < end and stop.requested(dist)
            if stopping:
                end = done
            if done % cfg.ckpt_every == 0 or done == end:
                interval = None
                if n_logged:  # mid-row: its sums go into the checkpoint, so a resumed run logs the same row
                    if dist.enabled:  # every rank then holds the ranks' mean (the next row's mean stays exact)
                        torch.distributed.all_reduce(loss_sum)
                        loss_sum /= dist.world
                        torch.distributed.all_reduce(term_sums)
                        term_sums /= dist.world
                    interval = {"loss": float(loss_sum), "term_sums": term_sums.tolist(), "norm": norm_sum,
                                "n": n_logged, "terms": list(terms)}
                _save_checkpoint(cfg, dist, stage, module, optimizer, scheduler, ema, done, dataset,
                                 extra_state={"init_fingerprint": fingerprint, "log_interval": interval})
            if stopping:
                raise Stopped(f"stopped at step {done} of {cfg.steps}: checkpoint "
                              f"{cfg.run / 'checkpoints' / f'step_{done:07d}'} written; the same command with "
                              "--resume goes on from it" if dist.main else "")
    finally:
        stop.restore()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()

    final = end if end > start else start
    if final < cfg.steps or cfg.out is None:
        return None
    ema_state = ema.full_state()  # under FSDP a collective: every rank gathers
    if dist.main:
        comps_out = stage.export(ema_state)
        comps_out.config.trained = True
        comps_out.config.description = _description(cfg, comps.config.description if comps.config.trained else "",
                                                    dataset, dist)
        write_dir_atomic(cfg.out, lambda tmp: save_model(comps_out, tmp))
        print(f"wrote {cfg.stage} model to {cfg.out}", file=sys.stderr)
    dist.barrier()
    return cfg.out


def _description(cfg: TrainConfig, previous: str, dataset: ClipDataset, dist: Dist) -> str:
    date = datetime.date.today().isoformat()
    line = (f"{cfg.stage}: {cfg.steps} steps x batch {cfg.batch} on {dataset.describe()}, {_hardware(dist)}, {date}"
            + (f", samples in {cfg.student_steps} steps" if cfg.stage == "distill" else "")
            + (f", {cfg.decode_samples:.0%} of the windows decoded from the model's own samples" if cfg.decode_samples
               else ""))
    return f"{previous}; then {line}" if previous else line


def _trim_log(log_file: Path, step: int) -> None:
    """Keep the log lines up to `step` (a resumed run rewrites what the interrupted one logged after it)."""
    if not log_file.is_file():
        return
    lines = []
    for ln in log_file.read_text().splitlines():
        try:
            row = json.loads(ln)
        except json.JSONDecodeError:  # a line torn by the kill that interrupted the run
            continue
        if row["step"] <= step:
            lines.append(ln)
    from ..media import write_text_atomic

    write_text_atomic(log_file, "".join(ln + "\n" for ln in lines), "free disk space or make the run folder writable")


def _save_checkpoint(cfg: TrainConfig, dist: Dist, stage: Stage, module: nn.Module, optimizer, scheduler,
                     ema: EMA, step: int, dataset: ClipDataset, extra_state: dict | None = None) -> None:
    if cfg.fsdp:  # full tensors from the shards: collectives, so every rank takes part
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        module_state = get_model_state_dict(module, options=opts)
        optimizer_state = get_optimizer_state_dict(module, optimizer, options=opts)
    else:
        module_state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        optimizer_state = optimizer.state_dict()
    ema_state = ema.full_state()
    if dist.main:
        comps = stage.export(ema_state)
        comps.config.description = f"checkpoint: {cfg.stage} step {step} of {cfg.steps} on {dataset.describe()}"
        state = {"stage": cfg.stage, "step": step, "world_size": dist.world, "fsdp": cfg.fsdp,
                 "module": module_state, "ema": {k: v.cpu() for k, v in ema_state.items()},
                 "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                 "extra": stage.extra_state(), **(extra_state or {}),
                 "config": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}}

        def write(tmp: Path) -> None:
            save_model(comps, tmp)
            torch.save(state, tmp / "trainer_state.pt")

        root = cfg.run / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        write_dir_atomic(root / f"step_{step:07d}", write)  # flushed before the rename: a power cut leaves the last
        for old in checkpoint_dirs(cfg.run)[:-cfg.keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


# --------------------------------------------------------------------------------------------------
# Command line (`letstalk train ...` and `torchrun ... -m letstalk_rt.train.trainer ...`)
# --------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> None:
    """`letstalk train` (cli.py catches LetsTalkError)."""
    train(config_from_args(args))


def leave_if_distributed(code: int) -> int:
    """A rank under torchrun (WORLD_SIZE > 1) whose run is over leaves at once with `code`, without the interpreter's
    teardown: gloo's threads may still hold finished work with tensors in it then, and freeing those while Python
    finalises aborts the rank ("terminate called without an active exception", SIGABRT), so that torchrun fails a run
    that had finished and written everything (1 run in ~15 on 2 CPU ranks; the process group is destroyed by then).
    One process: `code`, for the caller to exit with."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _entry(argv: list[str] | None = None) -> int:
    """`python -m letstalk_rt.train.trainer` / `torchrun -m letstalk_rt.train.trainer`."""
    parser = argparse.ArgumentParser(prog="letstalk train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        main(args)
    except LetsTalkError as e:
        print(f"letstalk: error: {e}", file=sys.stderr)
        return leave_if_distributed(2)
    except Stopped as e:
        if str(e):
            print(f"letstalk: {e}", file=sys.stderr)
        return leave_if_distributed(130)
    return leave_if_distributed(0)


if __name__ == "__main__":
    sys.exit(_entry())
