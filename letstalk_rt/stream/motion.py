"""A session's motion, carried to another session: the avatar goes on from where it was.

A session's memory bank holds the latents of the frames it showed last; the next window is generated from them, so
the face goes on from the frame on screen. A new session starts from the portrait instead: where one session takes
over from another (a move off a server that stops, or off a hung device), that is a jump on screen, the head and the
mouth back where the portrait has them. `Session.motion()` gives those latents with what they belong to (the model's
weights, the portrait's crop); `Session.continue_from()` starts another session's memory from them, as an interrupt
starts it from its own frame on screen. On the bundled model the first frame after a move comes out at 33.7 dB PSNR
against the last one before it on average, as against 28.8 dB when started from the portrait (scripts/motion_jump.py;
docs/server.md, "Moving to a new session"). Bytes for the wire: safetensors, one float32 tensor and the digests as its
metadata.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError

FORMAT = "letstalk-motion/1"
MAX_BYTES = 1 << 20  # a motion's bytes at most (the bundled model's are 8 KiB)
MAX_FRAMES = 64
MAX_ABS = 1e4  # latents are a few units; far beyond this is not a latent


def portrait_digest(image: np.ndarray) -> str:
    """16 hex digits over a portrait's crop (what the model animates): the same photo gives the same on any server."""
    return hashlib.sha256(f"{image.shape}".encode() + np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class Motion:
    """The latents of the frames a session showed last, oldest first, and what they belong to."""

    latents: Tensor  # (K, C, h, w) float32 on the CPU
    model: str  # LetsTalkPipeline.model_digest of the session's model
    portrait: str  # portrait_digest of the session's portrait crop

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        return save({"latents": self.latents.float().contiguous()},
                    metadata={"format": FORMAT, "model": self.model, "portrait": self.portrait})

    @classmethod
    def from_bytes(cls, data: bytes) -> "Motion":
        """A motion read back from to_bytes(); InputError saying what is wrong with anything else."""
        from safetensors.torch import load

        if not data or len(data) > MAX_BYTES:
            raise InputError(f"a motion is 1 byte to {MAX_BYTES} bytes, got {len(data)}: send what GET "
                             ".../motion of the session it comes from answered")
        try:  # safetensors: an 8-byte little-endian header length, then the header's JSON (with __metadata__)
            size = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8:8 + size])["__metadata__"]
            tensors = load(data)
        except Exception as e:  # noqa: BLE001 - any malformation: the format's own errors are not the user's
            raise InputError(f"not a motion ({type(e).__name__}): send the bytes GET .../motion of the session it "
                             "comes from answered, unchanged") from None
        form = meta.get("format") if isinstance(meta, dict) else None
        if form != FORMAT:
            raise InputError(f"not a motion this version reads (format {form!r}, expected {FORMAT!r})")
        latents = tensors.get("latents")
        if set(tensors) != {"latents"} or latents.dtype != torch.float32 or latents.dim() != 4 \
                or not 1 <= len(latents) <= MAX_FRAMES:
            raise InputError(f"not a motion: it holds {sorted(tensors)}, expected one float32 (frames, C, h, w) "
                             f"tensor 'latents' of 1..{MAX_FRAMES} frames")
        if not bool(torch.isfinite(latents).all()) or float(latents.abs().max()) > MAX_ABS:
            raise InputError("not a motion: its latents are not finite numbers of a latent's size")
        model, portrait = meta.get("model"), meta.get("portrait")
        if not (isinstance(model, str) and isinstance(portrait, str)):
            raise InputError("not a motion: it does not say which model and portrait it is of")
        return cls(latents, model, portrait)
