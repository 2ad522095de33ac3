"""Find the face in a portrait photo and cut the square crop the model animates.

Detection uses scikit-image's LBP frontal-face cascade (`skimage.feature.Cascade` with
`skimage.data.lbp_frontal_face_cascade_filename()`, a 24x24-pixel detection window). It runs on a
grayscale copy whose longest side is at most 320 px (~0.15 s on one core for any photo size). That pass
sees faces down to ~64 px wide in photos up to ~850 px; when it finds nothing in a larger photo, a second
pass at 0.4x scale (longest side at most 1024 px, ~1 s) maps a 64 px face onto ~26 px, just above the
cascade's window. So the common case stays fast, and faces >= ~64 px wide are found in photos up to
~2560 px on the long side (larger photos need proportionally larger faces).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from .errors import InputError, NoFaceError

FAST_SIDE = 320  # longest side of the first detection pass (px)
FINE_SIDE = 1024  # longest side of the fallback pass for small faces in large photos (px)
FINE_SCALE = 0.4  # fallback pass scale: a 64 px face becomes ~26 px, just above the 24 px window
WINDOW = 24  # the cascade's detection window (px): the smallest face it can see at a given scale


@lru_cache(maxsize=1)
def _cascade() -> Any:
    from skimage import data
    from skimage.feature import Cascade

    return Cascade(data.lbp_frontal_face_cascade_filename())


def _check_image(image: np.ndarray, name: str | None) -> None:
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise InputError(f"{name or 'image'}: expected an image array (H, W) or (H, W, 3), "
                         f"got {getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")


def _gray(image: np.ndarray) -> Any:
    """uint8 array of any channel count -> Pillow 'L' image."""
    from PIL import Image

    img = image if image.dtype == np.uint8 else np.clip(image, 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(img)).convert("L")


def _detect(gray: Any, side: int) -> tuple[float, float, float, float] | None:
    """Largest detection on `gray` downscaled to longest side `side`, in original pixels."""
    from PIL import Image

    w, h = gray.size
    scale = min(1.0, side / max(w, h))
    small = gray.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR) if scale < 1 else gray
    arr = np.asarray(small, dtype=np.float32) / 255.0  # (h', w') in [0, 1]
    if min(arr.shape) < WINDOW:
        return None
    found = _cascade().detect_multi_scale(arr, scale_factor=1.2, step_ratio=1, min_size=(WINDOW, WINDOW),
                                          max_size=(min(arr.shape), min(arr.shape)))
    if not found:
        return None
    best = max(found, key=lambda d: d["width"] * d["height"])
    sx, sy = w / arr.shape[1], h / arr.shape[0]  # exact back-mapping despite rounding of the small size
    return best["c"] * sx, best["r"] * sy, best["width"] * sx, best["height"] * sy


def detect_face(image: np.ndarray, name: str | None = None) -> tuple[int, int, int, int]:
    """(x, y, w, h) in pixels of the largest frontal face in an (H, W, 3) uint8 image.

    `name` (e.g. the file path) only appears in the NoFaceError message.
    """
    _check_image(image, name)
    gray = _gray(image)
    box = _detect(gray, FAST_SIDE)
    fine_side = min(FINE_SIDE, int(max(gray.size) * FINE_SCALE))
    if box is None and fine_side > FAST_SIDE:
        box = _detect(gray, fine_side)
    if box is None:
        where = f"'{name}'" if name else "the image"
        raise NoFaceError(f"no frontal face found in {where}; use a well-lit, front-facing photo "
                          f"where the face is at least ~64 px wide")
    x, y, w, h = (round(v) for v in box)
    return x, y, w, h


def face_square(image: np.ndarray, margin: float = 0.6, name: str | None = None) -> tuple[int, int, int]:
    """(x0, y0, side) in pixels of the square `crop_portrait` cuts: centred on the largest face, side = face
    side * (1 + 2 * margin). It may reach past the photo's border. Raises NoFaceError when no face is found."""
    x, y, w, h = detect_face(image, name)
    side = max(2, round(max(w, h) * (1 + 2 * margin)))
    return round(x + w / 2 - side / 2), round(y + h / 2 - side / 2), side


def centre_square(image: np.ndarray) -> tuple[int, int, int]:
    """(x0, y0, side) of the largest square centred in the photo (the crop without face detection)."""
    h, w = image.shape[:2]
    side = min(h, w)
    return (w - side) // 2, (h - side) // 2, side


def rgb_uint8(image: np.ndarray, name: str | None = None) -> np.ndarray:
    """Any (H, W), (H, W, 1|3|4) image array -> (H, W, 3) uint8 RGB (the input itself when it already is)."""
    _check_image(image, name)
    if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return image
    if image.ndim == 2 or image.shape[2] == 1:
        return np.asarray(_gray(image).convert("RGB"))
    return np.clip(image[:, :, :3], 0, 255).astype(np.uint8)


def cut_square(image: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    """The square `box` (x0, y0, side) of an (H, W, 3) uint8 image resized to (size, size, 3) uint8 (Lanczos).

    Where the square reaches past the photo's border the border pixels are replicated."""
    from PIL import Image

    x0, y0, side = box
    H, W = image.shape[:2]
    pads = ((max(0, -y0), max(0, y0 + side - H)), (max(0, -x0), max(0, x0 + side - W)), (0, 0))
    crop = image[max(0, y0):y0 + side, max(0, x0):x0 + side]  # (<=side, <=side, 3)
    if any(p for pair in pads for p in pair):
        crop = np.pad(crop, pads, mode="edge")  # (side, side, 3)
    out = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.LANCZOS)
    return np.array(out, dtype=np.uint8)  # (size, size, 3), writable


def crop_portrait(image: np.ndarray, size: int, margin: float = 0.6, name: str | None = None) -> np.ndarray:
    """Square crop centred on the face (`face_square`), resized to (size, size, 3) uint8.

    Where the square reaches past the photo's border the border pixels are replicated, so the face
    stays centred. Raises NoFaceError when no face is found.
    """
    image = rgb_uint8(image, name)
    return cut_square(image, face_square(image, margin, name), size)
