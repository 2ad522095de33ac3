"""The noise-regularised memory bank (LetsTalk TMM version).

Each window is generated with the last K clean latents of the previous window prepended for temporal
attention. Trusting those frames blindly lets errors accumulate over minutes, so they are corrupted on
purpose:

- training: memory frames (already pixel-noised before encoding by the data code) are forward-diffused
  to a small random flow time t ~ U(0, noise_max) (the first ~5% of the schedule) and ~25% of their
  latent positions are masked (`regularize_memory`);
- inference: the carried latents are forward-diffused to one small fixed time (`MemoryBank.condition`),
  which matches what the model saw in training and damps drift.

An anchored bank (`anchor=` the portrait latent, `SamplingConfig.memory_anchor`) keeps the portrait in
slot 0 and carries the last K-1 frames in the others; a stream starts with the portrait in every slot.
Its mouth cells (`anchor_hide`) are masked, as training masks memory positions, so the portrait gives
identity but not the mouth shape: that comes from the audio and the last frames.
Without it the first window has no memory at all (every slot masked) and later windows copy only
generated frames, so errors compound; with it, identity is re-read from the portrait every window.
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


def box_cells(h: int, w: int, box: tuple[float, float, float, float]) -> Tensor:
    """(h, w): 1 on the latent cells of `box` (x, y, w, h as fractions of the face crop; at least one cell
    each way), else 0."""
    x0, y0, bw, bh = box
    mask = torch.zeros(h, w)
    c0, c1 = int(x0 * w), max(int(x0 * w) + 1, int(round((x0 + bw) * w)))
    r0, r1 = int(y0 * h), max(int(y0 * h) + 1, int(round((y0 + bh) * h)))
    mask[r0:r1, c0:c1] = 1.0
    return mask


def anchor_cell_mask(h: int, w: int, hide: tuple[float, float, float, float] | None) -> Tensor:
    """(h, w) mask of an anchor slot: 0 on the latent cells of `hide` (x, y, w, h as fractions), else 1."""
    return torch.ones(h, w) if hide is None else 1 - box_cells(h, w, hide)


class MemoryBank:
    """The K memory latents one stream carries from window to window."""

    def __init__(self, num_memory: int, anchor: Tensor | None = None,
                 anchor_hide: tuple[float, float, float, float] | None = None) -> None:
        self.num_memory = num_memory
        self.anchor = None if anchor is None else anchor.detach().clone()  # (C, h, w) or None
        # (h, w): 0 on the latent cells of anchor_hide (x, y, w, h fractions of the face crop)
        self.anchor_mask = None if self.anchor is None else anchor_cell_mask(*self.anchor.shape[-2:], anchor_hide)
        # slots for carried frames: all K, or K-1 when slot 0 is the anchor (a 1-slot bank carries frames)
        self.num_carried = num_memory - 1 if self.anchor is not None and num_memory >= 2 else num_memory
        self.latents: Tensor | None = None  # (K', C, h, w) with K' <= num_carried: the last clean latents

    def reset(self) -> None:
        """Forget the past (a new take); the next window sees only the anchor, or no memory without one."""
        self.latents = None

    def update(self, clean: Tensor) -> None:
        """Remember the last frames of a finished window (T, C, h, w)."""
        if self.num_carried == 0:
            return
        joined = clean if self.latents is None else torch.cat([self.latents, clean], dim=0)  # (K'+T, C, h, w)
        self.latents = joined[-self.num_carried:].detach().clone()  # (K', C, h, w)

    def condition(
        self, shape: tuple[int, int, int], noise_level: float, generator: torch.Generator | None,
        device: torch.device, dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor]:
        """Memory and mask for the next window: (K, C, h, w) latents forward-diffused to `noise_level`,
        and a (K, h, w) mask that is 0 for slots with no frame yet (the start of a stream without an anchor)."""
        c, h, w = shape
        k = self.num_memory
        memory = torch.zeros((k, c, h, w), device=device, dtype=dtype)  # (K, C, h, w)
        mask = torch.zeros((k, h, w), device=device, dtype=dtype)  # (K, h, w)
        if self.anchor is not None and k:
            memory[:] = self.anchor.to(device=device, dtype=dtype)  # slots no frame fills yet, and slot 0
            mask[:] = self.anchor_mask.to(device=device, dtype=dtype)  # the anchor's mouth stays hidden
        if self.latents is not None:
            n = self.latents.shape[0]
            memory[k - n:] = self.latents.to(device=device, dtype=dtype)
            mask[k - n:] = 1.0
        if noise_level > 0:
            noise = torch.randn(memory.shape, generator=generator, device=generator.device if generator else device,
                                dtype=dtype).to(device)  # (K, C, h, w)
            memory = FlowMatching.add_noise(memory, noise, torch.full((k,), noise_level, device=device))
        return memory * mask[:, None], mask
