"""letstalk_rt.face: LBP cascade detection on real photos, portrait crops, clean NoFaceError."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from letstalk_rt.errors import InputError, NoFaceError
from letstalk_rt.face import crop_portrait, detect_face
from letstalk_rt.media import load_image

FIXTURES = Path(__file__).parent / "fixtures"
ASSETS = Path(__file__).parents[1] / "letstalk_rt" / "assets"


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()  # (512, 512, 3) uint8: a real portrait photograph


def _centre(box):
    x, y, w, h = box
    return x + w / 2, y + h / 2


def test_detects_the_astronaut_face_quickly(astronaut):
    detect_face(astronaut)  # loads the cascade once
    start = time.perf_counter()
    box = detect_face(astronaut)
    took = time.perf_counter() - start
    _, _, w, h = box
    assert all(isinstance(v, int) for v in box)
    cx, cy = _centre(box)
    assert 200 < cx < 260 and 90 < cy < 150  # between the eyes, above the mouth
    assert 70 < w < 140 and 70 < h < 140
    assert took < 1.5  # ~0.2 s on one core; generous for a shared CI machine


def test_detection_scales_with_the_photo(astronaut):
    big = np.asarray(Image.fromarray(astronaut).resize((1024, 1024), Image.BILINEAR))
    cx, cy = _centre(detect_face(big))
    ref = _centre(detect_face(astronaut))
    assert abs(cx - 2 * ref[0]) < 30 and abs(cy - 2 * ref[1]) < 30


def test_small_face_in_a_large_photo(astronaut):
    """A ~70 px face in a 1600x1200 photo is below the fast pass's reach; the fine pass finds it."""
    small = Image.fromarray(astronaut).resize((358, 358), Image.LANCZOS)
    canvas = Image.new("RGB", (1600, 1200), (128, 128, 128))
    canvas.paste(small, (600, 300))
    cx, cy = _centre(detect_face(np.asarray(canvas)))
    assert abs(cx - (600 + 230 * 0.7)) < 25 and abs(cy - (300 + 115 * 0.7)) < 25


def test_grayscale_input(astronaut):
    gray = np.asarray(Image.fromarray(astronaut).convert("L"))
    assert abs(_centre(detect_face(gray))[0] - _centre(detect_face(astronaut))[0]) < 10


@pytest.mark.parametrize("kind", ["blank", "noise", "fixture"])
def test_no_face_raises_one_clear_line(kind):
    if kind == "blank":
        image = np.full((300, 400, 3), 200, np.uint8)
    elif kind == "noise":
        image = np.random.default_rng(0).integers(0, 256, (256, 256, 3)).astype(np.uint8)
    else:
        image = load_image(FIXTURES / "no_face.png")
    with pytest.raises(NoFaceError) as info:
        detect_face(image, name="me.jpg")
    assert isinstance(info.value, InputError)
    assert str(info.value).startswith("no frontal face found in 'me.jpg'") and "\n" not in str(info.value)
    with pytest.raises(NoFaceError, match="the image"):
        crop_portrait(image, 64)


def test_crop_portrait_centres_the_face(astronaut):
    crop = crop_portrait(astronaut, 256)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    cx, cy = _centre(detect_face(crop))
    assert abs(cx - 128) < 20 and abs(cy - 128) < 20  # the face is in the middle of the crop
    w = detect_face(crop)[2]
    assert 0.3 < w / 256 < 0.6  # margin 0.6: face side / crop side = 1 / 2.2 ~ 0.45


def test_crop_portrait_margin(astronaut):
    tight = crop_portrait(astronaut, 128, margin=0.3)
    wide = crop_portrait(astronaut, 128, margin=1.0)
    assert tight.shape == wide.shape == (128, 128, 3)
    assert not np.array_equal(tight, wide)


def test_crop_portrait_pads_at_the_border(astronaut):
    """A face near the top-left corner: the square reaches outside the photo and is edge-padded."""
    shifted = np.ascontiguousarray(astronaut[40:, 150:])  # face now ~20 px from the top
    crop = crop_portrait(shifted, 128)
    assert crop.shape == (128, 128, 3)
    top_rows = crop[:5].astype(int)
    assert np.abs(top_rows - top_rows[:1]).max() < 40  # replicated edge: the first rows look alike


def test_bundled_portrait_has_a_face():
    image = load_image(ASSETS / "portrait.png")
    x, y, w, h = detect_face(image)
    assert w >= 64
    cx, cy = _centre((x, y, w, h))
    assert 0.3 * image.shape[1] < cx < 0.7 * image.shape[1] and cy < 0.6 * image.shape[0]
    assert crop_portrait(image, 256).shape == (256, 256, 3)
