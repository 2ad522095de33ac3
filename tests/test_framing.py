"""Full frames: the animated face crop pasted back into the portrait photo (letstalk_rt.framing)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from letstalk_rt.errors import InputError
from letstalk_rt.face import cut_square
from letstalk_rt.framing import FACE_HEIGHT, MAX_PHOTO_SIDE, DetailGate, FullFrame, even_size, framed


def _photo(h: int = 300, w: int = 400, seed: int = 0) -> np.ndarray:
    """A smooth photo (a gradient with low-frequency blobs) whose crops resize back almost exactly."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def test_sizes_are_even_fit_the_limit_and_never_enlarge():
    assert even_size(401, 300, 512) == (400, 300)  # not enlarged; the odd width rounded down
    assert even_size(1000, 500, 512) == (512, 256)
    assert even_size(3, 3000, 720) == (2, 720)
    paste = FullFrame(_photo(w=401), (150, 60, 120), max_side=200)
    assert paste.size == (200, 148) and paste.canvas.shape == (148, 200, 3)


def test_the_photos_own_crop_pasted_back_gives_the_photo_back():
    photo = _photo()
    box = (150, 60, 120)
    paste = FullFrame(photo, box, max_side=400)
    out = paste(cut_square(photo, box, 64))  # the model's 64 px crop, unchanged by any model
    assert out.shape == (300, 400, 3) and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - paste.canvas.astype(int))
    assert diff.max() <= 6 and diff.mean() < 0.5


def test_a_new_face_fills_the_box_and_fades_into_the_untouched_photo():
    photo = _photo()
    x0, y0, side = 150, 60, 120
    paste = FullFrame(photo, (x0, y0, side), max_side=400, feather=0.2)
    out = paste(np.full((64, 64, 3), (255, 0, 0), np.uint8)).astype(int)
    canvas = paste.canvas.astype(int)
    outside = np.ones(out.shape[:2], bool)
    outside[y0:y0 + side, x0:x0 + side] = False
    assert np.array_equal(out[outside], canvas[outside])  # not one pixel outside the box changed
    core = slice(y0 + 25, y0 + side - 25), slice(x0 + 25, x0 + side - 25)  # inside the 24 px band
    assert np.array_equal(out[core], np.broadcast_to([255, 0, 0], out[core].shape))
    # across the band, the new face's share rises smoothly from the box's edge inward
    row = y0 + side // 2
    share = [(out[row, x, 0] - canvas[row, x, 0]) / max(1, 255 - canvas[row, x, 0]) for x in range(x0, x0 + 25)]
    assert share[0] < 0.01 and share[-1] > 0.99 and all(b >= a - 1e-6 for a, b in zip(share, share[1:]))


def test_a_box_past_the_photos_border_is_not_faded_there():
    photo = _photo()
    paste = FullFrame(photo, (-40, -30, 120), max_side=400)  # a face at the top-left corner
    out = paste(np.full((64, 64, 3), 255, np.uint8))
    assert (out[0, :60] == 255).all() and (out[:60, 0] == 255).all()  # the face reaches the photo's edges
    assert np.array_equal(out[:, 100:], paste.canvas[:, 100:])
    assert out[5, 79].mean() < 255  # faded toward the photo on its inner edges


def test_the_photos_detail_comes_back_where_the_face_kept_still():
    """With the portrait's crop and a gate, a still face is the photo itself at the frame's resolution (sharper than
    the crop resized up); where the face moved it stays the generated crop resized, for a while after it stops."""
    rng = np.random.default_rng(1)
    photo = np.clip(_photo(seed=2).astype(int) + rng.integers(-40, 40, (300, 400, 3)), 0, 255).astype(np.uint8)  # fine grain
    box, S = (100, 40, 200), 50
    crop = cut_square(photo, box, S)
    gate = DetailGate(width=12.0, sigma=1.5, decay=0.5 ** (1 / 5))  # a 5-frame half-life
    paste = FullFrame(photo, box, max_side=400, crop=crop, gate=gate)
    plain = FullFrame(photo, box, max_side=400)
    core = slice(40 + 35, 240 - 35), slice(100 + 35, 300 - 35)  # inside the fading band
    still = paste(crop).astype(int)
    assert np.abs(still[core] - photo[core].astype(int)).max() <= 1  # the photo's grain back, exactly
    assert np.abs(plain(crop)[core].astype(int) - photo[core].astype(int)).mean() > 10  # resized up it is lost
    talking = crop.copy()
    talking[30:42, 15:35] = 0  # an open mouth: the lower middle of the crop turns dark
    mouth = slice(40 + 30 * 4 + 6, 40 + 42 * 4 - 6), slice(100 + 15 * 4 + 6, 100 + 35 * 4 - 6)  # in the frame: x4
    out = paste(talking).astype(int)
    assert np.abs(out[mouth] - plain(talking)[mouth].astype(int)).max() <= 1  # the generated mouth, no photo grain on it
    assert np.abs(out[75:100, 135:265] - photo[75:100, 135:265].astype(int)).max() <= 1  # the eyes' rows kept still
    closed = [paste(crop).astype(int) for _ in range(30)]  # the mouth closes and stays closed
    err = [np.abs(c[mouth] - photo[mouth].astype(int)).mean() for c in closed]
    assert err[0] > 5 and err[-1] < 1 and all(b <= a + 1e-9 for a, b in zip(err, err[1:]))  # the grain returns slowly


def test_bad_photos_boxes_and_sizes_are_refused():
    photo = _photo()
    with pytest.raises(InputError, match="outside"):
        FullFrame(photo, (500, 10, 50))
    with pytest.raises(InputError, match="longest side"):
        FullFrame(photo, (10, 10, 50), max_side=8)
    with pytest.raises(InputError, match="longest side"):
        FullFrame(photo, (10, 10, 50), max_side=MAX_PHOTO_SIDE + 2)
    with pytest.raises(InputError, match="RGB uint8"):
        FullFrame(photo.astype(np.float32), (10, 10, 50))
    with pytest.raises(ValueError, match="together"):  # a gate without the crop it compares frames with
        FullFrame(photo, (10, 10, 50), gate=DetailGate(width=12.0, sigma=1.5, decay=0.9))


def test_a_prepared_portrait_keeps_its_photo_scaled_and_its_box(tiny_pipeline, astronaut_png):
    from letstalk_rt.media import load_image

    image = load_image(astronaut_png)  # 512 x 512, the face near the top centre
    portrait = tiny_pipeline.prepare_portrait(image)
    x0, y0, side = portrait.box
    assert portrait.photo.shape == image.shape and 100 < x0 + side / 2 < 330 and side > 100
    assert np.abs(cut_square(portrait.photo, portrait.box, 32).astype(int) - portrait.image.astype(int)).max() <= 1
    big = np.array(Image.fromarray(image).resize((2560, 2560), Image.BICUBIC))
    large = tiny_pipeline.prepare_portrait(big)
    assert large.photo.shape == (MAX_PHOTO_SIDE, MAX_PHOTO_SIDE, 3)  # kept at most 1280 px: 2.5x less than given
    # the same face, found in the larger photo, in the kept photo's pixels
    assert np.abs(np.array(large.box) - np.array(portrait.box) * 2.5).max() < 0.1 * side * 2.5, large.box
    frame = tiny_pipeline.full_frame(large, 256)(portrait.image)
    assert frame.shape == (256, 256, 3)
    centre = tiny_pipeline.prepare_portrait(image[:, :400], detect=False)  # no detection: the centre square
    assert centre.box == (0, 56, 400)
    with pytest.raises(InputError, match="without its photo"):
        tiny_pipeline.full_frame(type(portrait)(image=portrait.image, latent=portrait.latent))


def test_a_small_face_in_a_large_photo_is_framed_head_and_shoulders():
    """`framed`: a photo whose shorter side is more than K sides of the face's square is cut, in its own shape, to K
    sides on the shorter side, centred on the face across with its centre 40 % down, the face's square moved with it;
    near an edge the cut stays inside the photo; a portrait the face fills, or K = 0, keeps the whole photo."""
    photo = _photo(1080, 1920)
    cut, box = framed(photo, (900, 300, 120))
    assert cut.shape == (360, 640, 3) and np.shares_memory(cut, photo)  # 3 x 120 on the shorter side, 16:9 kept
    x, y, side = box
    assert side == 120 and abs(x + 60 - 320) <= 1 and abs(y + 60 - FACE_HEIGHT * 360) <= 1
    assert np.array_equal(cut[y:y + side, x:x + side], photo[300:420, 900:1020])  # the same face, moved
    corner, (x, y, _) = framed(photo, (1850, 1000, 120), 2.0)  # the cut stops at the photo's corner
    assert corner.shape == (240, 427, 3) and np.array_equal(corner, photo[-240:, -427:])
    assert (x, y) == (1850 - (1920 - 427), 1000 - (1080 - 240))
    assert framed(photo, (800, 200, 400))[0] is photo  # 3 x 400 >= 1080: the whole photo
    assert framed(photo, (900, 300, 120), 0)[0] is photo
    for bad in (1.0, 25.0, -3.0):
        with pytest.raises(InputError, match="framing must be 0"):
            framed(photo, (900, 300, 120), bad)


def test_full_frames_of_a_small_face_in_a_wide_scene_show_it_head_and_shoulders(tiny_pipeline, astronaut_png):
    """pipeline.full_frame: the astronaut, small in a wide scene, is framed by default (her square a third of the
    frames' height), and shown in the whole scene with framing 0; the frames hold the scene's own pixels."""
    from letstalk_rt.media import load_image

    face = np.asarray(Image.fromarray(load_image(astronaut_png)).resize((400, 400), Image.LANCZOS))
    scene = np.full((1152, 2048, 3), 90, np.uint8)
    scene[:, :, 2] = np.linspace(0, 255, 2048, dtype=np.uint8)  # a gradient: where the cut lies shows
    scene[250:650, 1200:1600] = face  # her square ~160 px of the scene's 1152
    portrait = tiny_pipeline.prepare_portrait(scene)
    framed_frames = tiny_pipeline.full_frame(portrait, 512)
    whole = tiny_pipeline.full_frame(portrait, 512, framing=0)
    assert whole.size == (512, 288) and framed_frames.size[0] == 512 and abs(framed_frames.size[1] - 288) <= 2
    fx, fy, fw, fh = framed_frames.face_box
    wx, wy, ww, wh = whole.face_box
    assert abs(fh - 288 / 3) <= 2 and abs(fw / ww - 1280 / (3 * portrait.box[2] * 16 / 9)) < 0.05, (fw, ww)
    assert abs(fx + fw / 2 - 256) <= 2  # centred across
    top = framed_frames.canvas[0, :, 2].astype(int), whole.canvas[0, :, 2].astype(int)  # the scene, above her
    centre = (portrait.box[0] + portrait.box[2] / 2) / portrait.photo.shape[1] * 255  # the gradient above her face
    assert np.ptp(top[0]) < 0.5 * np.ptp(top[1]) and abs(top[0].mean() - centre) < 8, (top[0].mean(), centre)
