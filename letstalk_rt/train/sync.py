"""A frozen mouth-state expert in latent space, for the lip-sync loss (`letstalk train --sync-weight W`).

The flow loss learns the mouth last and least: it is a few latent cells of an 8x8 map, the rest of the face
is a near-copy of the portrait and the memory, and the network can lower most of its loss without listening
to the audio. Wav2Lip's answer is an *expert*: a lip-sync judge trained on real frames only, frozen, whose
verdict on the generated frames is added to the generator's loss. Here the synthetic corpus has the mouth's
ground truth per frame (`opening`, `width`, `rounding`, data.MOUTH_STATES), so the expert is a small MLP
from the latent cells around the mouth (minus the clip's mean latent) to that state, fitted on ground-truth
latents of the training clips at the start of the run (~10 s on a CPU; seeded, so resume is exact), its
accuracy measured on held-out training clips. Only the states it reads at r >= TEACH_MIN_R are taught.

In training the expert reads the network's clean estimate x0_hat = x_t - t v (for a 1-step student at
t = 1 that *is* the shipped output) and the squared error against the window's ground-truth mouth state,
in units of its std, is added to the loss with weight `--sync-weight`.

With `--sync-decoded` the expert reads the mouth as it will be shown instead: the same square decoded by
the frozen decoder and average-pooled (POOL), minus the decoded square of the clip's mean latent. (Both
read "open" mostly from the lips: neither objects to the default's dark-skinned mouths drawn darker where
the real ones show teeth; docs/eval.md.)

Prepared real-video shards have no per-frame mouth state. For them (or any corpus) `--sync-expert audio` makes
`AudioSyncExpert` the judge instead (opt-in: it has not yet helped a trained model, docs/training.md):
SyncNet's idea (Chung & Zisserman 2016, as Wav2Lip uses it) on the same mouth features. Two small towers
embed a frame's mouth and the log-mel of the 0.2 s of speech around it; their cosine, scaled, is the logit of
"this mouth goes with this speech", fitted on ground truth only: each frame against its own audio, against its
own clip's audio 3-8 frames away, and against another clip's. Its loss on the network's clean estimate is
-log sigmoid(logit) with the window's own audio. Measured on the held-out clips as SyncNet is: over offsets
-8..+8 frames, how often a clip's best-scoring offset is 0.

Neither is the evaluation's probe (eval.MouthProbe reads decoded pixels of the test split with its own
features); all are fitted on ground truth only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..eval import pearson
from .data import MOUTH_STATES, SAMPLES_PER_FRAME, ClipDataset, LatentCache

CROP = 3  # latent cells per side of the square the expert reads, centred on the mouth box
HELD_OUT = 0.15  # fraction of the training clips (the last ones) held out to report the expert's accuracy
MAX_FIT_FRAMES = 60_000  # frames the expert is fitted on at most (evenly subsampled)
FIT_STEPS, FIT_BATCH, FIT_LR = 3000, 512, 1e-3  # AdamW on the standardised features (~10 s on a 2-core CPU)
HIDDEN = 256
POOL = 4  # the decoded expert reads the mouth square average-pooled by this (48 -> 12 px at 128 px frames)
MAX_FIT_DECODED = 20_000  # frames the decoded expert is fitted on at most (each one decoded once)
CRITIC_LR_SCALE = 4.0  # the adversarial critic's learning rate, in units of the run's (two time-scale updates)
DIRECTION_FLOOR = 0.02  # mouth_direction_loss: a window's real RMS change (in [-1, 1]) from which it counts fully
PATTERN_EPS = 0.005  # mouth_pattern_loss: added to each crop's grey standard deviation (in [-1, 1] units)
TEACH_MIN_R = 0.9  # a state the expert reads less well than this on held-out clips is not taught (its error is noise)
SYNC_CONTEXT = 2  # AudioSyncExpert: video frames of speech on each side of the judged frame (5 frames, 0.2 s)
SYNC_MELS, SYNC_N_FFT, SYNC_HOP = 40, 400, 160  # its log-mel: 25 ms windows every 10 ms, 4 per video frame
SYNC_DIM = 128  # its embeddings
SYNC_SHIFT = (3, 8)  # frames between a frame and the shifted audio of its own clip that is a negative
SYNC_OFFSETS = 8  # held-out offset search: -8..+8 frames
SYNC_FIT_STEPS, SYNC_FIT_BATCH = 1500, 256  # its fit (~30 s on the 2-core CPU for the 600-clip corpus)
SYNC_MIN_ACCURACY = 0.5  # share of held-out clips whose best offset must be 0 for the expert to be used


def crop_origin(box: tuple[int, int, int, int] | None, image_size: int, latent_size: int) -> tuple[int, int]:
    """(row, col) of the CROP x CROP latent square centred on the mouth box (clamped inside the map)."""
    if box is None:
        raise InputError("a clip has no mouth box: the sync loss needs a synthetic corpus (`letstalk data synth`)")
    f = image_size / latent_size  # pixels per latent cell
    bx, by, bw, bh = box
    cy, cx = int((by + bh / 2) // f), int((bx + bw / 2) // f)
    hi = max(latent_size - CROP, 0)
    return min(max(cy - CROP // 2, 0), hi), min(max(cx - CROP // 2, 0), hi)


def mouth_square(latents: Tensor, origins: Tensor, size: int = CROP) -> Tensor:
    """latents (N, C, h, w) and origins (N, 2) long -> (N, C, size, size), the square around the mouth
    (differentiable; CROP latent cells, or in pixels of decoded frames, CROP x the downsampling)."""
    n = latents.shape[0]
    ar = torch.arange(size, device=latents.device)  # (size,)
    rows = origins[:, 0:1].to(latents.device) + ar  # (N, size)
    cols = origins[:, 1:2].to(latents.device) + ar  # (N, size)
    batch = torch.arange(n, device=latents.device)[:, None, None]  # (N, 1, 1)
    cells = latents.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, size, size, C)
    return cells.permute(0, 3, 1, 2)


def mouth_cells(latents: Tensor, origins: Tensor) -> Tensor:
    """latents (N, C, h, w) and origins (N, 2) long -> (N, C * CROP * CROP) features (differentiable)."""
    return mouth_square(latents, origins).permute(0, 2, 3, 1).reshape(latents.shape[0], -1)  # (N, CROP CROP C)


def mouth_origins(dataset: ClipDataset, latent_size: int, flag: str) -> list[Tensor]:
    """Per clip, the (row, col) origin (2,) of its CROP x CROP mouth square. InputError naming `flag` when a
    clip has no mouth box (synth corpora record one per clip, prepared shards one for every crop)."""
    missing = [c.name for c in dataset.clips if c.mouth_box is None]
    if missing:
        raise InputError(f"{flag} needs each clip's mouth box; '{missing[0]}' of {dataset.root} has none. Make the "
                         f"data with `letstalk data synth` or `letstalk data prepare`, or train with {flag} 0")
    return [torch.tensor(crop_origin(c.mouth_box, dataset.image_size, latent_size)) for c in dataset.clips]


def expert_features(latents: Tensor, reference: Tensor, origins: Tensor, decoder: Callable[[Tensor], Tensor] | None = None
                    ) -> Tensor:
    """What a MouthExpert reads: latents and reference (N, C, h, w) (the clip's mean latent), origins (N, 2)
    -> (N, F). Without `decoder`, the mouth cells of latents - reference; with it (the frozen autoencoder's
    decode), the decoded mouth squares, average-pooled by POOL, of latents minus that of the reference
    (differentiable in `latents` either way)."""
    if decoder is None:
        return mouth_cells(latents.float() - reference.float(), origins)

    def look(z: Tensor) -> Tensor:
        return F.avg_pool2d(decoder(mouth_square(z.float(), origins)).float(), POOL).flatten(1)  # (N, 3 s s)

    with torch.no_grad():
        base = look(reference)
    return look(latents) - base


def decoded_l1(decoder: nn.Module, estimate: Tensor, truth: Tensor) -> Tensor:
    """Mean absolute difference, in pixels in [-1, 1], between latents `estimate` and `truth` (N, C, h, w)
    decoded by the frozen `decoder` (the autoencoder's decode; gradients reach `estimate` only): the
    output compared as it will look, not cell by cell in latent space (`--pixel-frame-weight`; on mouth
    squares, `--pixel-mouth-weight`: decoding a CROP x CROP square alone costs ~1/7 of an 8x8 frame, and
    both sides see the same border effects)."""
    with torch.no_grad():
        target = decoder(truth.float())  # (N, 3, H, W)
    return (decoder(estimate.float()) - target).abs().mean()


def mouth_direction_loss(fake: Tensor, real: Tensor, ref: Tensor, floor: float = DIRECTION_FLOOR) -> Tensor:
    """1 - cosine between how the generated mouth and the real one change from the portrait's, per window.

    fake, real (B, T, 3, S, S): decoded mouth squares of the network's clean estimate and of the ground
    truth; ref (B, 3, S, S): the portrait's. Each window's change (its T frames minus the portrait) is one
    vector; the cosine ignores its size, so a low-contrast (dark-skinned) mouth that moves the wrong way --
    darker where the real one shows teeth -- costs as much as a light one (up to 2), where an L1 charges it
    little. A window whose real mouth hardly moves (RMS change under `floor`, in [-1, 1] units) has no
    direction to follow and counts in proportion. `letstalk eval`'s "mouth direction" measures this on
    generated video (docs/eval.md)."""
    num, den = mouth_direction_sums(fake, real, ref, floor)
    return num / den.clamp_min(1e-6)


def mouth_direction_sums(fake: Tensor, real: Tensor, ref: Tensor, floor: float = DIRECTION_FLOOR) -> tuple[Tensor, Tensor]:
    """`mouth_direction_loss` as (weighted sum, sum of weights), for ranks that each hold part of a batch."""
    a = (fake - ref[:, None]).flatten(1)  # (B, T*3*S*S)
    b = (real - ref[:, None]).flatten(1)  # (B, T*3*S*S)
    cos = F.cosine_similarity(a, b, dim=1, eps=1e-8)  # (B,)
    w = (b.pow(2).mean(dim=1).sqrt() / floor).clamp(max=1.0).detach()  # (B,)
    return ((1 - cos) * w).sum(), w.sum()


def mouth_pattern_loss(fake: Tensor, real: Tensor, eps: float = PATTERN_EPS) -> Tensor:
    """L1 between the decoded mouth squares made grey and standardised per frame: fake, real (N, 3, S, S).

    Standardising each crop (as `letstalk eval`'s probe features do) takes skin tone and contrast out: the
    pattern of a dark-skinned mouth -- where its teeth and lips are brighter or darker than the rest of the
    crop -- weighs as much as a light-skinned one's, and a mouth drawn darker where the real one shows teeth
    costs the full difference of the patterns. `eps` (in [-1, 1] units) keeps a flat crop from dividing by
    nothing."""
    def pattern(x: Tensor) -> Tensor:
        g = x.float().mean(dim=1).flatten(1)  # (N, S*S) grey
        return (g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True) + eps)

    return (pattern(fake) - pattern(real)).abs().mean()


def clip_mean_latents(dataset: ClipDataset, cache: LatentCache) -> list[Tensor]:
    """Every clip's mean latent (C, h, w): what the experts read a frame's mouth against (identity taken out)."""
    return [cache.get(i, np.arange(c.num_frames)).mean(0) for i, c in enumerate(dataset.clips)]


def held_out_cut(dataset: ClipDataset, flag: str) -> int:
    """How many of the clips (the first ones) an expert is fitted on; the rest measure it (a clip and its
    recoloured copies on the same side). InputError when there are too few to hold one out."""
    cut = min(len(dataset.clips) - 1, max(1, int(round(len(dataset.clips) * (1 - HELD_OUT)))))
    while 0 < cut < len(dataset.clips) and dataset.clips[cut].recoloured_from is not None:
        cut += 1  # a clip's recoloured copies stay on its side
    if not 1 <= cut < len(dataset.clips):
        distinct = sum(c.recoloured_from is None for c in dataset.clips)
        raise InputError(f"{flag}: {dataset.root} has {distinct} training clip(s) (recoloured copies not counted); "
                         "the lip-sync expert needs at least 2 (one held out to measure it)")
    return cut


def ground_truth_features(cache: LatentCache, means: list[Tensor], origins: list[Tensor], frames: list[np.ndarray],
                          decoder: Callable[[Tensor], Tensor] | None, device: torch.device | str) -> list[Tensor]:
    """Per clip, `expert_features` (n, F) of its cached ground-truth latents at `frames` (n,), on the CPU."""
    out = []
    for i, idx in enumerate(frames):
        lat = cache.get(i, idx).to(device)  # (n, C, h, w)
        with torch.no_grad():
            out.append(expert_features(lat, means[i].to(device).expand_as(lat),
                                       origins[i].to(device).expand(len(idx), 2), decoder).cpu())  # (n, F)
    return out


def _new_expert(cls: type, x: Tensor, decoder: Callable[[Tensor], Tensor] | None, seed: int) -> nn.Module:
    """An expert with its initial weights drawn from `seed` and its input standardised over features x (N, F)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        expert = cls(x.shape[1], decoder)
    expert.mean.copy_(x.mean(0))
    expert.scale.copy_(x.std(0).clamp_min(1e-6))
    return expert


class MouthExpert(nn.Module):
    """MLP from the mouth cells of (latent - the clip's mean latent) to (opening, width, rounding).

    Subtracting the clip's mean latent takes the identity out: on the synth corpus at 128 px a linear read-out
    of the raw cells reaches r = 0.70 for the opening on held-out clips, of the mean-subtracted ones 0.90,
    and this MLP 0.95 (docs/training.md). Training-only: at inference there is no clip mean and no expert."""

    def __init__(self, features: int, decoder: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.decoder = decoder  # the frozen autoencoder's decode: read decoded mouths (`--sync-decoded`)
        self.net = nn.Sequential(nn.Linear(features, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                                 nn.Linear(HIDDEN, len(MOUTH_STATES)))
        for name in ("mean", "scale", "target_mean", "target_std"):
            self.register_buffer(name, torch.zeros(features if "target" not in name else len(MOUTH_STATES)))
        self.register_buffer("taught", torch.ones(len(MOUTH_STATES)))  # 1 for the states the loss uses
        self.held_out_r: tuple[float, ...] = ()  # correlation per state on the held-out training clips

    def forward(self, latents: Tensor, reference: Tensor, origins: Tensor) -> Tensor:
        """latents and reference (N, C, h, w) (the clip's mean latent), origins (N, 2) -> (N, 3) mouth state."""
        return self._read(expert_features(latents, reference, origins, self.decoder))

    def _read(self, cells: Tensor) -> Tensor:
        """mouth_cells features (N, F) -> (N, 3) mouth state."""
        return self.net((cells - self.mean) / self.scale) * self.target_std + self.target_mean

    def loss(self, latents: Tensor, reference: Tensor, origins: Tensor, truth: Tensor) -> Tensor:
        """Mean squared error against truth (N, 3) over the taught states, each in units of its ground-truth std."""
        err = ((self(latents, reference, origins) - truth.float()) / self.target_std) ** 2  # (N, 3)
        return (err * self.taught).sum(1).mean() / self.taught.sum()

    def describe(self) -> str:
        rs = ", ".join(f"{k} {r:.3f}{'' if t else ' (not taught)'}"
                       for k, r, t in zip(MOUTH_STATES, self.held_out_r, self.taught.tolist()))
        what = "decoded ground-truth mouths" if self.decoder is not None else "ground-truth latents"
        return f"mouth expert on {what} (held-out clips): r {rs}"

    @staticmethod
    def clip_means(dataset: ClipDataset, cache: LatentCache) -> list[Tensor]:
        """`clip_mean_latents`, with an InputError for a clip without per-frame mouth state (not a synth corpus)."""
        missing = [c.name for c in dataset.clips if c.mouth is None]
        if missing:
            raise InputError(f"--sync-expert states needs each clip's per-frame mouth state, which only a synthetic "
                             f"corpus has (`letstalk data synth`); '{missing[0]}' of {dataset.root} has none. On "
                             "prepared video shards use --sync-expert audio (docs/training.md: it has not yet helped a "
                             "trained model) or --sync-weight 0")
        return clip_mean_latents(dataset, cache)

    @classmethod
    def fit(cls, dataset: ClipDataset, cache: LatentCache, means: list[Tensor], origins: list[Tensor],
            seed: int = 0, decoder: Callable[[Tensor], Tensor] | None = None,
            device: torch.device | str = "cpu") -> "MouthExpert":
        """Fit on the ground-truth latents of the first 1 - HELD_OUT of the clips (at most MAX_FIT_FRAMES
        frames; MAX_FIT_DECODED with `decoder`, run on `device`), read against `clip_means` at `mouth_origins`,
        and report the correlation on the rest; deterministic for a seed. Returned frozen, in eval mode."""
        cut = held_out_cut(dataset, "--sync-weight")
        stride = max(1, math.ceil(dataset.num_frames / (MAX_FIT_FRAMES if decoder is None else MAX_FIT_DECODED)))
        where = [np.arange(0, clip.num_frames, stride) for clip in dataset.clips]
        feats = ground_truth_features(cache, means, origins, where, decoder, device)  # (n, F) per clip
        assert all(c.mouth is not None for c in dataset.clips)  # clip_means() checked every clip
        truths = [torch.from_numpy(c.mouth[w]) for c, w in zip(dataset.clips, where)]  # (n, 3) per clip
        x, y = torch.cat(feats[:cut]), torch.cat(truths[:cut])  # (N, F), (N, 3)
        g = torch.Generator().manual_seed(seed)
        expert = _new_expert(cls, x, decoder, seed)
        expert.target_mean.copy_(y.mean(0))
        expert.target_std.copy_(y.std(0).clamp_min(1e-3))
        opt = torch.optim.AdamW(expert.net.parameters(), lr=FIT_LR, weight_decay=1e-2)
        for _ in range(FIT_STEPS):
            # a corpus of fewer frames than a batch: all of them each step (a batch drawn from them would repeat them)
            idx = torch.arange(len(x)) if len(x) <= FIT_BATCH else torch.randint(len(x), (FIT_BATCH,), generator=g)
            loss = (((expert._read(x[idx]) - y[idx]) / expert.target_std) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        expert.eval().requires_grad_(False)
        with torch.no_grad():
            pred = expert._read(torch.cat(feats[cut:])).numpy()  # (M, 3)
        truth = torch.cat(truths[cut:]).numpy()
        expert.held_out_r = tuple(pearson(pred[:, k], truth[:, k]) for k in range(truth.shape[1]))
        taught = [r >= TEACH_MIN_R for r in expert.held_out_r]
        if not any(taught):
            raise InputError(f"--sync-weight: the mouth expert reads the mouth of held-out clips at r "
                             f"{max(expert.held_out_r):.2f} at best (it needs {TEACH_MIN_R}): too few or too "
                             "uniform clips to teach lip sync from; train with --sync-weight 0")
        expert.taught.copy_(torch.tensor(taught, dtype=torch.float32))
        return expert


def clip_log_mels(dataset: ClipDataset) -> list[Tensor]:
    """Per clip, the log-mel frames (4 N + 8 SYNC_CONTEXT + 1, SYNC_MELS) of its audio zero-padded by
    SYNC_CONTEXT frames on each side, so `mel_windows` can cut every frame's 0.2 s. Recoloured copies share
    their source's (same audio)."""
    from ..models.audio import LogMel

    logmel = LogMel(16000, SYNC_N_FFT, SYNC_HOP, SYNC_MELS)
    left = SYNC_CONTEXT * SAMPLES_PER_FRAME + (SYNC_N_FFT - SYNC_HOP) // 2  # mel frame 4 SYNC_CONTEXT + k: hop k
    right = SYNC_CONTEXT * SAMPLES_PER_FRAME + SYNC_N_FFT
    done: dict[int, Tensor] = {}
    out = []
    for c in dataset.clips:
        if id(c.audio) not in done:
            audio = np.zeros(c.num_frames * SAMPLES_PER_FRAME, np.float32)  # exactly the clip's frames' samples
            audio[:min(len(c.audio), len(audio))] = c.audio[:len(audio)]
            audio = np.pad(audio, (left, right))
            with torch.no_grad():
                done[id(c.audio)] = logmel(torch.from_numpy(audio)[None])[0]  # (J, SYNC_MELS)
        out.append(done[id(c.audio)])
    return out


def mel_windows(mels: Tensor, frames: np.ndarray | Tensor, start: np.ndarray | int = 0) -> Tensor:
    """A clip's `clip_log_mels` and frame indices (n,) -> (n, W, SYNC_MELS), W = 4 (2 SYNC_CONTEXT + 1): the
    log-mel of speech frames f - SYNC_CONTEXT .. f + SYNC_CONTEXT (silence outside the clip). `start` (n,): the
    row where each frame's clip begins, for many clips' log-mels concatenated."""
    per = SAMPLES_PER_FRAME // SYNC_HOP
    first = torch.as_tensor(np.asarray(start) + per * np.asarray(frames), dtype=torch.long)  # (n,)
    return mels[first[:, None] + torch.arange(per * (2 * SYNC_CONTEXT + 1))]  # (n, W, SYNC_MELS)


class AudioSyncExpert(nn.Module):
    """SyncNet-style judge: does this frame's mouth go with the speech around it? For corpora without per-frame
    mouth states (`letstalk train --sync-expert audio`; the module docstring).

    The mouth tower reads the same features as MouthExpert (latent cells, or decoded squares, minus the clip's
    mean); the audio tower the log-mel of 2 SYNC_CONTEXT + 1 frames of speech. Both end in unit vectors; the
    logit is exp(log_scale) cos + bias. Training-only, like MouthExpert."""

    def __init__(self, features: int, decoder: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.decoder = decoder
        width = SAMPLES_PER_FRAME // SYNC_HOP * (2 * SYNC_CONTEXT + 1) * SYNC_MELS
        self.mouth = nn.Sequential(nn.Linear(features, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                                   nn.Linear(HIDDEN, SYNC_DIM))
        self.speech = nn.Sequential(nn.Linear(width, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
                                    nn.Linear(HIDDEN, SYNC_DIM))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(0.0))
        for name, n in (("mean", features), ("scale", features), ("mel_mean", SYNC_MELS), ("mel_std", SYNC_MELS)):
            self.register_buffer(name, torch.zeros(n))
        self.offset_accuracy = float("nan")  # share of held-out clips whose best offset is 0
        self.pair_accuracy = float("nan")  # share of held-out frames whose own audio beats audio 5 frames away

    def _logit(self, cells: Tensor, mel: Tensor) -> Tensor:
        """features (N, F) and mel windows (N, W, SYNC_MELS) -> (N,) logits."""
        m = F.normalize(self.mouth((cells - self.mean) / self.scale), dim=-1)  # (N, SYNC_DIM)
        a = F.normalize(self.speech(((mel.float() - self.mel_mean) / self.mel_std).flatten(1)), dim=-1)  # (N, D)
        return self.log_scale.exp() * (m * a).sum(-1) + self.bias

    def forward(self, latents: Tensor, reference: Tensor, origins: Tensor, mel: Tensor) -> Tensor:
        """latents and reference (N, C, h, w), origins (N, 2), mel windows (N, W, SYNC_MELS) -> (N,) logits."""
        return self._logit(expert_features(latents, reference, origins, self.decoder), mel)

    def loss(self, latents: Tensor, reference: Tensor, origins: Tensor, mel: Tensor) -> Tensor:
        """-log P(in sync) of the mouths with their own speech, averaged (the generator's lip-sync loss)."""
        return F.softplus(-self(latents, reference, origins, mel)).mean()

    def describe(self) -> str:
        what = "decoded ground-truth mouths" if self.decoder is not None else "ground-truth latents"
        return (f"audio sync expert on {what} (held-out clips): best offset 0 in {self.offset_accuracy:.0%} of "
                f"clips, own speech beats speech 5 frames away in "
                f"{self.pair_accuracy:.0%} of frames")

    @classmethod
    def fit(cls, dataset: ClipDataset, cache: LatentCache, means: list[Tensor], origins: list[Tensor],
            mels: list[Tensor], seed: int = 0, decoder: Callable[[Tensor], Tensor] | None = None,
            device: torch.device | str = "cpu") -> "AudioSyncExpert":
        """Fit on the ground truth of the first 1 - HELD_OUT of the clips (MAX_FIT_FRAMES frames at most; with
        `decoder`, MAX_FIT_DECODED): half the pairs a frame with its own speech, a quarter with its clip's
        speech SYNC_SHIFT frames away, a quarter with another clip's. Measured on every frame of the rest;
        deterministic for a seed; returned frozen. InputError when it cannot find the offset of most held-out
        clips."""
        cut = held_out_cut(dataset, "--sync-weight (the audio sync expert)")
        stride = max(1, math.ceil(sum(c.num_frames for c in dataset.clips[:cut])
                                  / (MAX_FIT_FRAMES if decoder is None else MAX_FIT_DECODED)))
        where = [np.arange(i % stride if i < cut else 0, clip.num_frames, stride if i < cut else 1)
                 for i, clip in enumerate(dataset.clips)]  # fitted clips strided, held-out ones whole
        feats = ground_truth_features(cache, means, origins, where, decoder, device)  # (n, F) per clip
        x = torch.cat(feats[:cut])  # (N, F)
        clip_of = np.concatenate([np.full(len(w), i) for i, w in enumerate(where[:cut])])  # (N,)
        frame_of = np.concatenate(where[:cut])  # (N,)
        # every distinct soundtrack once (recoloured copies share their source's), end to end
        tracks, starts_of, at = [], {}, 0
        for m in mels[:cut]:
            if id(m) not in starts_of:
                starts_of[id(m)], at = at, at + len(m)
                tracks.append(m)
        flat = torch.cat(tracks)  # (sum J, SYNC_MELS)
        starts = np.array([starts_of[id(m)] for m in mels[:cut]])  # (cut,) where each clip's speech begins in
        # `flat`; clips with the same start share their soundtrack
        rng = np.random.default_rng(seed)
        expert = _new_expert(cls, x, decoder, seed)
        expert.mel_mean.copy_(flat.mean(0))
        expert.mel_std.copy_(flat.std(0).clamp_min(1e-3))
        opt = torch.optim.AdamW([p for p in expert.parameters() if p.requires_grad], lr=FIT_LR, weight_decay=1e-2)
        lengths = np.array([c.num_frames for c in dataset.clips[:cut]])
        n = SYNC_FIT_BATCH
        for _ in range(SYNC_FIT_STEPS):
            idx = rng.integers(len(x), size=n)  # (B,)
            kind = rng.integers(4, size=n)  # 0, 1: own speech; 2: shifted; 3: another clip's
            clips, frames = clip_of[idx].copy(), frame_of[idx].copy()
            shift = rng.integers(SYNC_SHIFT[0], SYNC_SHIFT[1] + 1, size=n) * rng.choice([-1, 1], n)
            moved = np.where((frames + shift >= 0) & (frames + shift < lengths[clips]), frames + shift, frames - shift)
            frames = np.where(kind == 2, np.clip(moved, 0, lengths[clips] - 1), frames)
            other = (clips + rng.integers(1, max(cut, 2), size=n)) % cut
            clips = np.where(kind == 3, other, clips)
            frames = np.where(kind == 3, rng.integers(0, lengths[clips]), frames)
            mel = mel_windows(flat, frames, starts[clips])  # (B, W, SYNC_MELS)
            same = (frames == frame_of[idx]) & (starts[clips] == starts[clip_of[idx]])  # the very speech of the frame
            label = torch.from_numpy((kind < 2) | same).float()
            loss = F.binary_cross_entropy_with_logits(expert._logit(x[idx], mel), label)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        expert.eval().requires_grad_(False)
        expert._measure(feats[cut:], mels[cut:])
        if math.isnan(expert.offset_accuracy):
            raise InputError(f"--sync-weight (the audio sync expert): no held-out clip has the "
                             f"{2 * SYNC_OFFSETS + 2} frames it is measured on; use longer clips")
        if expert.offset_accuracy < SYNC_MIN_ACCURACY:
            raise InputError(f"--sync-weight (the audio sync expert): it finds the right offset of "
                             f"{expert.offset_accuracy:.0%} of the held-out clips (it needs {SYNC_MIN_ACCURACY:.0%}): "
                             "too few or too uniform clips to teach lip sync from; train with --sync-weight 0")
        return expert

    @torch.no_grad()
    def _measure(self, feats: list[Tensor], mels: list[Tensor]) -> None:
        """offset_accuracy and pair_accuracy over held-out clips (features (n, F) of all their frames): each
        offset -SYNC_OFFSETS..+SYNC_OFFSETS is scored on the same frames, those with speech at every offset."""
        hits, pairs, wins = [], 0, 0
        for x, mel in zip(feats, mels):
            frames = np.arange(SYNC_OFFSETS, len(x) - SYNC_OFFSETS)  # (m,)
            if len(frames) < 2:
                continue
            scores = [float(self._logit(x[frames], mel_windows(mel, frames + d)).mean())
                      for d in range(-SYNC_OFFSETS, SYNC_OFFSETS + 1)]
            hits.append(int(np.argmax(scores)) == SYNC_OFFSETS)
            own = self._logit(x[frames], mel_windows(mel, frames))  # (m,)
            for d in (-5, 5):
                wins += int((own > self._logit(x[frames], mel_windows(mel, frames + d))).sum())
                pairs += len(frames)
        self.offset_accuracy = float(np.mean(hits)) if hits else float("nan")
        self.pair_accuracy = wins / pairs if pairs else float("nan")


class MouthCritic(nn.Module):
    """A patch discriminator on mouth squares, for the adversarial mouth loss (`letstalk train
    --adv-mouth-weight W`; docs/training.md).

    The regressions (reconstruction L1/L2, the decoded L1 terms, the expert above) reward the average of
    what the input leaves open to doubt: a soft blur where the truth has white teeth in a dark mouth, which
    on dark skin hardly shows. A critic that learns to tell the true mouth from the network's rewards a mouth
    that looks like one. Real and fake are the CROP x CROP-cell square around the mouth: frames against
    their reconstruction (autoencoder / decoder stages), or the truth's latents against the clean estimate,
    both through the frozen decoder (transformer / distill). It trains beside the network with the hinge
    loss (its own Adam at CRITIC_LR_SCALE x the run's rate; checkpointed, so resume is exact); the network
    adds W x -critic(its mouth). No spectral normalisation: the two sides can differ by a few pixels, and
    a 1-Lipschitz critic could not score them a margin apart (with it, its loss stayed at chance, 2.0,
    through 60 steps of the default's fine-tune).
    Input (N, 3, S, S) in [-1, 1] (S = 48 px at 128 px frames); output (N,), the mean of its patch scores
    after three stride-2 convolutions.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = (3, width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(chans[-1], 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images.float()).mean(dim=(1, 2, 3))  # (N,)

    def loss(self, real: Tensor, fake: Tensor) -> Tensor:
        """The critic's hinge loss on (N, 3, S, S) squares (fake detached by the caller)."""
        return torch.relu(1 - self(real)).mean() + torch.relu(1 + self(fake)).mean()
