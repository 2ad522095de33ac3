"""The whole photo talking: each animated face crop pasted back into the portrait photo it was cut from.

The model animates a small square crop around the face (128 px for the bundled model). A user who gives a
photo expects that photo to talk, hair, shoulders and background included, at a size a video call shows.
`FullFrame` keeps the photo, scaled to fit `max_side`, and pastes each generated crop back where it was cut,
resized to the crop's size there and faded into the photo over a band along the crop's edges (`feather`),
so the generated picture and the still photo meet without a seam. Edges of the crop that lie outside the
photo (a face near the border, where the crop replicated the border pixels) are not faded: the crop reaches
the photo's edge there.

Resized up, the model's crop is softer than the photo around it. So, given the portrait's crop and a gate
(`DetailGate`), each pasted crop gets back the photo's own detail at the frame's resolution (the photo less
the portrait's crop resized up) wherever the picture has kept still, gated as `pipeline.transfer_detail` gates
the portrait's detail at the model's resolution: a region that moved (the mouth while talking, blinking eyes)
keeps its generated look for a while, so the detail does not switch on and off with every small movement.

A face small in a large photo (a full-body shot, a group, a wide scene) would be a small face in a large frame, so
full frames show at most `framing` sides of the animated square around the face on their shorter side (`framed`: a
cut of the photo's own shape, centred on the face across, the face's centre 40 % of the way down): head and
shoulders. A photo smaller than that, as most portraits are, is shown whole; `framing` 0 always shows it whole.

Cost per frame: one resize of the crop, the gate at the model's resolution and one blend over the crop's area;
the rest of the photo is copied as it is (docs/benchmarks.md, "Full frames").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError

MAX_PHOTO_SIDE = 1280  # a portrait keeps its photo scaled to at most this side (the largest full frame)
FULL_FRAME_SIDE = 512  # default longest side of full frames (even): a video call's size, cheap to encode
DETAIL_WIDTH = 12.0  # grey levels: the gate's width for a model without detail transfer (the bundled model's own)
FRAMING = 3.0  # full frames' shorter side shows at most this many sides of the face's square: head and shoulders
FRAMING_RANGE = (2.0, 20.0)  # a `framing` other than 0 (the whole photo) lies in this range
FACE_HEIGHT = 0.4  # a framed cut holds the face's centre this far down (of its height), where a portrait's is


@dataclass(frozen=True)
class DetailGate:
    """How the photo's detail is gated per pixel, as `pipeline.transfer_detail` gates the portrait's: frames and the
    portrait's crop are compared blurred by `sigma` (px at the model's resolution); the largest recent
    difference (channel mean, grey levels), fading by `decay` per frame, weighs the detail exp(-(d / width)^2)."""

    width: float
    sigma: float
    decay: float


def even_size(width: float, height: float, max_side: int) -> tuple[int, int]:
    """(width, height) scaled to fit `max_side` (never enlarged), each rounded down to an even number >= 2."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def check_framing(value: object, name: str = "framing") -> float:
    """`value` (a number, or its text) as a `framing`: 0 or within FRAMING_RANGE, else InputError saying so (of
    `name`, as the caller's user knows it)."""
    lo, hi = FRAMING_RANGE
    try:
        number = math.nan if isinstance(value, bool) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not (number == 0 or lo <= number <= hi):
        raise InputError(f"{name} must be 0 (the whole photo) or {lo:g}..{hi:g} (sides of the face's square on the "
                         f"frames' shorter side), got {str(value)[:40]!r}")
    return number


def framed(photo: np.ndarray, box: tuple[int, int, int], framing: float = FRAMING
           ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """What full frames show of `photo` (H, W, 3), and the face's square `box` (x0, y0, side) in it: the whole photo
    when its shorter side is at most `framing` sides of the square (or `framing` is 0); else a cut of the photo's
    own shape whose shorter side is `framing` sides of the square, centred on it across and holding its centre
    `FACE_HEIGHT` of the way down (moved inside the photo where the face is near an edge)."""
    check_framing(framing)
    H, W = photo.shape[:2]
    x0, y0, side = box
    scale = framing * side / min(W, H)
    if not framing or scale >= 1:
        return photo, box
    w, h = max(1, round(W * scale)), max(1, round(H * scale))
    x = min(max(round(x0 + side / 2 - w / 2), 0), W - w)
    y = min(max(round(y0 + side / 2 - FACE_HEIGHT * h), 0), H - h)
    return photo[y:y + h, x:x + w], (x0 - x, y0 - y, side)


def _ramp(n: int, band: float, fade_start: bool, fade_end: bool) -> np.ndarray:
    """(n,) weights along one side of the crop: 1 inside, falling smoothly to 0 over `band` pixels toward
    each end that fades (smoothstep, so the blend has no visible edge of its own)."""
    pos = np.arange(n, dtype=np.float32) + 0.5
    w = np.ones(n, np.float32)
    if band > 0:
        for fade, dist in ((fade_start, pos), (fade_end, n - pos)):
            if fade:
                t = np.clip(dist / band, 0.0, 1.0)
                w *= t * t * (3 - 2 * t)
    return w


class FullFrame:
    """Paste (S, S, 3) uint8 crops back into `photo` (H, W, 3) uint8 at `box` (x0, y0, side, in the photo's
    pixels; it may reach past the border), giving frames of the whole photo scaled to fit `max_side`."""

    def __init__(self, photo: np.ndarray, box: tuple[int, int, int], max_side: int = FULL_FRAME_SIDE,
                 feather: float = 0.15, crop: np.ndarray | None = None, gate: DetailGate | None = None) -> None:
        """`crop` (S, S, 3) uint8, the portrait's crop the model animates, and `gate`: give each pasted crop the
        photo's detail back where it kept still (both needed; without them, the crops are pasted as they are).
        With them a FullFrame is one stream's: it remembers where that stream's frames moved."""
        from PIL import Image

        if photo.ndim != 3 or photo.shape[2] != 3 or photo.dtype != np.uint8:
            raise InputError(f"full frame: expected an RGB uint8 photo (H, W, 3), got {photo.dtype} {photo.shape}")
        if not 16 <= max_side <= MAX_PHOTO_SIDE:
            raise InputError(f"full frame: the longest side must be 16..{MAX_PHOTO_SIDE} px, got {max_side}")
        if not 0 <= feather <= 0.5:
            raise InputError(f"full frame: feather must be 0..0.5 of the crop's side, got {feather}")
        H, W = photo.shape[:2]
        self.width, self.height = even_size(W, H, max_side)
        sx, sy = self.width / W, self.height / H
        self.canvas = np.array(Image.fromarray(photo).resize((self.width, self.height), Image.LANCZOS))  # (h, w, 3)
        x0, y0, side = box
        # the crop's square in the canvas, on whole pixels: [bx0, bx0 + bw) x [by0, by0 + bh)
        bx0, by0 = round(x0 * sx), round(y0 * sy)
        self.crop_size = (max(1, round((x0 + side) * sx) - bx0), max(1, round((y0 + side) * sy) - by0))  # (bw, bh)
        bw, bh = self.crop_size
        self.face_box = (bx0, by0, bw, bh)  # (x, y, width, height) of the animated square in the frames
        # the part of that square inside the canvas, in canvas and in crop coordinates
        cx0, cy0 = max(0, bx0), max(0, by0)
        cx1, cy1 = min(self.width, bx0 + bw), min(self.height, by0 + bh)
        if cx1 <= cx0 or cy1 <= cy0:
            raise InputError(f"full frame: the face box {box} lies outside the {W}x{H} photo")
        self.region = (slice(cy0, cy1), slice(cx0, cx1))
        self.inner = (slice(cy0 - by0, cy1 - by0), slice(cx0 - bx0, cx1 - bx0))
        # fade only where the crop's edge lies inside the photo: where it reaches past, the crop meets the border
        mx = _ramp(bw, feather * bw, bx0 > 0, bx0 + bw < self.width)
        my = _ramp(bh, feather * bh, by0 > 0, by0 + bh < self.height)
        mask = (my[:, None] * mx[None, :])[self.inner][..., None]  # (rh, rw, 1)
        self.mask = mask
        self.background = self.canvas[self.region].astype(np.float32) * (1 - mask)  # (rh, rw, 3): the photo's share
        if (crop is None) != (gate is None):
            raise ValueError("full frame: give the portrait's crop and the gate together, or neither")
        self.gate = gate
        self.moved: np.ndarray | None = None  # (S / k, S / k) the largest recent difference from the portrait
        if crop is not None:
            lo = np.asarray(Image.fromarray(crop).resize(self.crop_size, Image.BICUBIC))[self.inner]
            self.detail = self.canvas[self.region].astype(np.float32) - lo  # (rh, rw, 3): what the crop lacks here
            self.crop_blur = self._blur(crop)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames, both even."""
        return self.width, self.height

    def _blur(self, image: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 -> (S / k, S / k, 3) float32 blurred by about the gate's sigma: reduced k = sigma times
        (box averages, std ~0.3 k) then blurred by 1 px (std ~k at full size): 0.2 ms where a 3.2 px Gaussian at
        full size took 1.1 ms, and the gate is as coarse as the blur anyway."""
        from PIL import Image, ImageFilter

        assert self.gate is not None
        small = Image.fromarray(image).reduce(max(1, round(self.gate.sigma)))
        return np.asarray(small.filter(ImageFilter.GaussianBlur(1.0)), np.float32)

    def _detail_weight(self, frame: np.ndarray) -> np.ndarray:
        """(rh, rw, 1) float32: how much of the photo's detail this frame of the stream gets, per pixel."""
        from PIL import Image

        assert self.gate is not None
        d = np.abs(self._blur(frame) - self.crop_blur).mean(-1)  # (S / k, S / k)
        self.moved = d if self.moved is None else np.maximum(self.moved * self.gate.decay, d)
        weight = np.exp(-np.square(self.moved / self.gate.width)).astype(np.float32)
        return np.asarray(Image.fromarray(weight, mode="F").resize(self.crop_size, Image.BILINEAR))[self.inner][..., None]

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 crop -> (height, width, 3) uint8 frame of the whole photo with the crop pasted in."""
        from PIL import Image

        up = np.asarray(Image.fromarray(frame).resize(self.crop_size, Image.BICUBIC))[self.inner].astype(np.float32)
        if self.gate is not None:  # (rh, rw, 3), may leave 0..255 until the clip below
            up = up + self._detail_weight(frame) * self.detail
        out = self.canvas.copy()
        out[self.region] = np.clip(self.background + up * self.mask + 0.5, 0, 255).astype(np.uint8)
        return out
