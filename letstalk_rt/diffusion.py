"""Flow matching (rectified flow): the training objective, the few-step sampler and guidance.

The network knows nothing of the schedule (DiT's `diffusion/`, diffusers' schedulers). Conventions:

    x_t = (1 - t) * x0 + t * noise,   t in [0, 1],  t = 1 is pure noise
    v   = noise - x0                   (the network's target: the velocity dx_t/dt)
    x0  = x_t - t * v

The sampler walks t from 1 (or a chosen start below it, from a clean guess noised to it) to 0 with Euler
steps; the caller (offline pipeline or streaming engine)
owns the loop:

    sampler.set_timesteps(2)
    for t in sampler.timesteps:
        v = model(x, t, ...)
        x = sampler.step(v, t, x)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

MAX_STEPS = 50


def _expand(t: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against `like`."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Timestep shift t' = s t / (1 + (s - 1) t) (SD3); s > 1 spends more of the steps at high noise."""
    return shift * t / (1 + (shift - 1) * t)


# --------------------------------------------------------------------------------------------------
# Training objective
# --------------------------------------------------------------------------------------------------


class FlowMatching:
    """The rectified-flow training objective: sample t, build x_t, regress the velocity."""

    def __init__(self, shift: float = 1.0, logit_normal: bool = True) -> None:
        self.shift = shift  # same meaning as the sampler's shift: train where sampling spends its steps
        self.logit_normal = logit_normal  # SD3's logit-normal t density (mid-noise weighted); else uniform

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> Tensor:
        """Training times, (B,) in (0, 1)."""
        if self.logit_normal:
            t = torch.sigmoid(torch.randn(batch, generator=generator, device=device))  # (B,)
        else:
            t = torch.rand(batch, generator=generator, device=device)  # (B,)
        return shift_time(t, self.shift)

    @staticmethod
    def add_noise(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t for clean x0, noise of the same shape and per-row times t (B,)."""
        tt = _expand(t, x0)  # (B, 1, ...)
        return (1 - tt) * x0 + tt * noise

    @staticmethod
    def target(x0: Tensor, noise: Tensor) -> Tensor:
        """The velocity the network regresses."""
        return noise - x0

    def loss(self, model_output: Tensor, x0: Tensor, noise: Tensor, weight: Tensor | None = None) -> Tensor:
        """Mean squared velocity error (fp32); `weight` (broadcastable to x0, e.g. (B, 1, 1, h, w)) makes it a
        weighted mean."""
        if weight is None:
            return torch.mean((model_output.float() - self.target(x0, noise).float()) ** 2)
        num, den = self.weighted_sums(model_output, x0, noise, weight)
        return num / den

    def weighted_sums(self, model_output: Tensor, x0: Tensor, noise: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """`loss`'s weighted mean as (sum of weight x squared error, sum of weight): ranks that each hold part of a
        batch add both up before dividing (their weights differ when their clips' mouth boxes do)."""
        err = (model_output.float() - self.target(x0, noise).float()) ** 2
        w = weight.float().expand_as(err)
        return (err * w).sum(), w.sum()


# --------------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------------


def from_portrait(portrait: Tensor, noise: Tensor, t: float) -> Tensor:
    """Where sampling from flow time t < 1 starts (SDEdit): the portrait latent (B, C, h, w) noised to t for
    every frame of noise (B, T, C, h, w), (1 - t) portrait + t noise."""
    return (1 - t) * portrait[:, None] + t * noise


class EulerSampler:
    """Euler integration of the flow ODE from t = 1 to t = 0 in `num_steps` network evaluations."""

    def __init__(self, shift: float = 1.0) -> None:
        self.shift = shift
        self.timesteps: Tensor | None = None  # (num_steps,) the times the network is evaluated at
        self.sigmas: Tensor | None = None  # (num_steps + 1,) the same plus the final 0

    def set_timesteps(self, num_steps: int, start: float = 1.0) -> None:
        """`num_steps` steps from t = `start` (1: pure noise; below 1 the caller starts from a clean guess
        noised to `start`, SDEdit) to 0: the shifted grid, scaled to begin at `start`."""
        if not isinstance(num_steps, int) or not 1 <= num_steps <= MAX_STEPS:
            raise ValueError(f"num_steps must be an integer from 1 to {MAX_STEPS}, got {num_steps!r}")
        if not 0 < start <= 1:
            raise ValueError(f"start must be a flow time in (0, 1], got {start!r}")
        grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)  # (S+1,)
        self.sigmas = (start * shift_time(grid, self.shift)).float()  # (S+1,)
        self.timesteps = self.sigmas[:-1]  # (S,)

    @property
    def num_steps(self) -> int:
        return 0 if self.timesteps is None else len(self.timesteps)

    def _index(self, t: float | Tensor) -> int:
        if self.sigmas is None:
            raise RuntimeError("call sampler.set_timesteps(num_steps) before sampler.step()")
        value = float(t)
        diffs = (self.sigmas[:-1] - value).abs()
        i = int(diffs.argmin())
        if float(diffs[i]) > 1e-6:
            raise ValueError(f"t={value} is not one of sampler.timesteps {self.sigmas[:-1].tolist()}")
        return i

    def step(self, model_output: Tensor, t: float | Tensor, sample: Tensor) -> Tensor:
        """One Euler step from time t to the next time on the grid."""
        i = self._index(t)
        assert self.sigmas is not None
        dt = float(self.sigmas[i + 1] - self.sigmas[i])  # negative
        return sample + dt * model_output.to(sample.dtype)

    @staticmethod
    def predict_x0(model_output: Tensor, t: float | Tensor, sample: Tensor) -> Tensor:
        """The clean estimate implied by a velocity at time t."""
        return sample - float(t) * model_output.to(sample.dtype)


# --------------------------------------------------------------------------------------------------
# Classifier-free guidance with separate portrait and audio scales
# --------------------------------------------------------------------------------------------------


def guidance_rows(portrait_scale: float, audio_scale: float) -> list[tuple[bool, bool]]:
    """The (drop_portrait, drop_audio) condition rows a guided step needs, full condition first.

    Scales of 1 need no extra pass: (1, 1) -> one row, so unguided sampling costs one evaluation.
    """
    rows = [(False, False)]
    if audio_scale != 1.0:
        rows.append((False, True))  # portrait only
    if portrait_scale != 1.0:
        rows.append((True, True))  # no condition
    return rows


def combine_guidance(outputs: list[Tensor], portrait_scale: float, audio_scale: float,
                     audio_region: Tensor | None = None) -> Tensor:
    """Combine the outputs for `guidance_rows(...)` (same order) into one guided velocity.

    v = v_none + s_p (v_portrait - v_none) + s_a (v_full - v_portrait)   (InstructPix2Pix-style)
    with v_none = v_portrait when s_p = 1 and v_portrait = v_full when s_a = 1. With `audio_region` (a mask
    broadcast over the outputs' last dimensions, e.g. (h, w) latent cells) the audio scale is s_a inside it
    and 1 outside: audio guidance only where the audio acts (the mouth), no guidance on the rest of the face.
    """
    expected = len(guidance_rows(portrait_scale, audio_scale))
    if len(outputs) != expected:
        raise ValueError(f"expected {expected} guidance outputs for these scales, got {len(outputs)}")
    full = outputs[0]
    k = 1
    portrait = full
    if audio_scale != 1.0:
        portrait = outputs[k]
        k += 1
    none = portrait
    if portrait_scale != 1.0:
        none = outputs[k]
        k += 1
    scale = audio_scale if audio_region is None else 1 + (audio_scale - 1) * audio_region
    return none + portrait_scale * (portrait - none) + scale * (full - portrait)


class Guidance:
    """Classifier-free guidance for one batch of B samples: the `guidance_rows` rows stacked along the
    batch, their drop flags and the conditions repeated R times, built ONCE (per window); `velocity` is then
    one batched model call per sampling step.

    `model(x, t, **conditions, drop_portrait=(R*B,), drop_audio=(R*B,))` must accept the stacked rows; the
    result is `combine_guidance` of them, in fp32. With both scales 1 it is one plain evaluation.
    """

    def __init__(self, portrait_scale: float, audio_scale: float, audio_region: Tensor | None = None,
                 **conditions: Tensor) -> None:
        if not conditions:
            raise ValueError("Guidance needs the batch's conditions")
        self.portrait_scale, self.audio_scale = portrait_scale, audio_scale
        self.audio_region = audio_region  # (h, w) cells the audio scale acts on (combine_guidance); None: all
        rows = guidance_rows(portrait_scale, audio_scale)
        self.R = len(rows)
        first = next(iter(conditions.values()))
        B, dev = first.shape[0], first.device
        self.drop_portrait = torch.tensor([r[0] for r in rows for _ in range(B)], device=dev)  # (R*B,)
        self.drop_audio = torch.tensor([r[1] for r in rows for _ in range(B)], device=dev)  # (R*B,)
        self.conditions = {k: self._rep(c) for k, c in conditions.items()}  # each (R*B, ...)

    def _rep(self, z: Tensor) -> Tensor:  # (B, ...) -> (R*B, ...)
        return z if self.R == 1 else z.repeat(self.R, *([1] * (z.dim() - 1)))

    def velocity(self, model: Callable[..., Tensor], x: Tensor, t: Tensor) -> Tensor:
        """The guided velocity (B, ...) for x (B, ...) at times t (B,)."""
        v = model(self._rep(x), self._rep(t), **self.conditions, drop_portrait=self.drop_portrait,
                  drop_audio=self.drop_audio)  # (R*B, ...)
        return combine_guidance(list(v.float().chunk(self.R)), self.portrait_scale, self.audio_scale,
                                self.audio_region)  # (B, ...)
