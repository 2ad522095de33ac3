"""The noise-regularised memory bank (LetsTalk TMM version).

Each window is generated with the last K clean latents of the previous window prepended for temporal
attention. Trusting those frames blindly lets errors accumulate over minutes, so they are corrupted on
purpose:

- training: memory frames (already pixel-noised before encoding by the data code) are forward-diffused
  to a small random flow time t ~ U(0, noise_max) (the first ~5% of the schedule) and ~25% of their
  latent positions are masked (`regularize_memory`);
- inference: the carried latents are forward-diffused to one small fixed time (`MemoryBank.condition`),
  which matches what the model saw in training and damps drift.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .diffusion import FlowMatching


def regularize_memory(
    memory: Tensor, noise_max: float, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Training-time corruption of memory latents (B, K, C, h, w) -> (noised memory, mask (B, K, h, w))."""
    b, k, _, h, w = memory.shape
    t = torch.rand(b, generator=generator, device=memory.device) * noise_max  # (B,)
    noise = torch.randn(memory.shape, generator=generator, device=memory.device, dtype=memory.dtype)  # (B, K, C, h, w)
    noised = FlowMatching.add_noise(memory, noise, t)  # (B, K, C, h, w)
    keep = torch.rand((b, k, h, w), generator=generator, device=memory.device) >= mask_ratio  # (B, K, h, w)
    return noised, keep.to(memory.dtype)


class MemoryBank:
    """The K memory latents one stream carries from window to window."""

    def __init__(self, num_memory: int) -> None:
        self.num_memory = num_memory
        self.latents: Tensor | None = None  # (K', C, h, w) with K' <= K: the last clean latents

    def reset(self) -> None:
        """Forget the past (a new take); the next window is generated without memory."""
        self.latents = None

    def update(self, clean: Tensor) -> None:
        """Remember the last K frames of a finished window (T, C, h, w)."""
        if self.num_memory == 0:
            return
        joined = clean if self.latents is None else torch.cat([self.latents, clean], dim=0)  # (K'+T, C, h, w)
        self.latents = joined[-self.num_memory:].detach().clone()  # (K', C, h, w)

    def condition(
        self, shape: tuple[int, int, int], noise_level: float, generator: torch.Generator | None,
        device: torch.device, dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor]:
        """Memory and mask for the next window: (K, C, h, w) latents forward-diffused to `noise_level`,
        and a (K, h, w) mask that is 0 for slots with no frame yet (the start of a stream)."""
        c, h, w = shape
        k = self.num_memory
        memory = torch.zeros((k, c, h, w), device=device, dtype=dtype)  # (K, C, h, w)
        mask = torch.zeros((k, h, w), device=device, dtype=dtype)  # (K, h, w)
        if self.latents is not None:
            n = self.latents.shape[0]
            memory[k - n:] = self.latents.to(device=device, dtype=dtype)
            mask[k - n:] = 1.0
        if noise_level > 0:
            noise = torch.randn(memory.shape, generator=generator, device=generator.device if generator else device,
                                dtype=dtype).to(device)  # (K, C, h, w)
            memory = FlowMatching.add_noise(memory, noise, torch.full((k,), noise_level, device=device))
        return memory * mask[:, None], mask
