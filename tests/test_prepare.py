"""letstalk_rt.train.prepare: any-rate talking-head videos -> 25 fps face crops + 16 kHz audio shards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import speechlike
from PIL import Image
from skimage import data

from letstalk_rt.face import detect_face
from letstalk_rt.media import VideoWriter
from letstalk_rt.train import prepare
from letstalk_rt.train.synth import PHOTO_LANDMARKS


def _write_video(path: Path, frames: list[np.ndarray], fps: int, audio: np.ndarray | None) -> None:
    size = (frames[0].shape[1], frames[0].shape[0])
    with VideoWriter(path, size, fps=fps, audio=audio is not None) as w:
        for i, frame in enumerate(frames):
            w.write_frame(frame)
            if audio is not None:  # each frame's share of the audio, cut by cumulative sample counts
                w.write_audio(audio[round(i * 16000 / fps):round((i + 1) * 16000 / fps)])


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """talk.mp4: the astronaut drifting sideways, 30 fps, 2.0 s, with speech; a faceless clip; a broken file."""
    root = tmp_path_factory.mktemp("videos")
    photo = np.asarray(Image.fromarray(data.astronaut()).resize((320, 320)))  # face ~62 px wide
    canvas = np.full((240, 320, 3), 90, np.uint8)
    frames = []
    for i in range(60):  # 2.0 s at 30 fps; the face moves 10 px to the right over the clip
        frame = canvas.copy()
        dx = i // 6
        frame[:, 10 + dx:10 + dx + 300] = photo[0:240, 10:310]
        frames.append(frame)
    _write_video(root / "talk.mp4", frames, 30, speechlike(2.0))
    rng = np.random.default_rng(0)
    noise = [np.clip(rng.normal(128, 40, (120, 160, 3)), 0, 255).astype(np.uint8) for _ in range(25)]
    (root / "sub").mkdir()
    _write_video(root / "sub" / "noface.mp4", noise, 25, speechlike(1.0))
    (root / "broken.mkv").write_bytes(b"\x1a\x45\xdf\xa3 not really a video" * 10)
    (root / "notes.txt").write_text("not a video, ignored")
    return root


def test_frames_are_resampled_to_25fps_by_timestamp(videos):
    frames = list(prepare.frames_at_25fps(videos / "talk.mp4"))
    assert len(frames) == 50  # 2.0 s at 25 fps from 60 frames at 30 fps


@pytest.fixture(scope="module")
def prepared(videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    args = parser.parse_args(["--videos", str(videos), "--out", str(out), "--size", "64", "--detect-every", "5",
                              "--quiet"])
    return out, args


def test_prepare_writes_crops_audio_and_skips_bad_videos(prepared, capsys):
    out, args = prepared
    prepare.main(args)
    captured = capsys.readouterr()
    index = json.loads((out / "index.json").read_text())
    status = {v["video"]: v for v in index["videos"]}
    assert set(status) == {"talk.mp4", "sub/noface.mp4", "broken.mkv"}
    assert status["talk.mp4"]["status"] == "ok" and status["talk.mp4"]["num_frames"] == 50
    assert status["sub/noface.mp4"]["status"] == "skipped" and "face" in status["sub/noface.mp4"]["reason"]
    assert status["broken.mkv"]["status"] == "skipped"
    assert index["summary"]["prepared"] == 1 and index["summary"]["skipped"] == {"no face": 1, "unreadable": 1}
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warnings) == 2 and any("sub/noface.mp4" in w for w in warnings)
    assert "prepared 1 of 3 videos" in captured.out and "skipped 2" in captured.out

    assert [s["file"] for s in index["shards"]] == ["shard_0000.safetensors"]
    frames, audio, boxes, segments = prepare.load_shard(out / "shard_0000.safetensors")
    assert frames.shape == (50, 64, 64, 3) and frames.dtype == np.uint8
    assert audio.shape == (50 * 640,) and audio.dtype == np.float32
    assert boxes.shape == (50, 3)
    assert segments == [{"video": "talk.mp4", "start_frame": 0, "num_frames": 50, "offset": 0}]
    # The speech survived: loud where speechlike() is loud, aligned to the frames.
    assert np.corrcoef(audio, speechlike(2.0))[0, 1] > 0.95  # same samples, same place (AAC round trip)
    # The crop follows the face (it moved right) and keeps it centred and about the inference size.
    assert boxes[-1, 0] > boxes[0, 0] + 4
    # Every crop's mouth is where the framing (index.json's margin) puts it (the mouth-weighted training losses use it): the astronaut's
    # lips (placed by hand in synth.PHOTO_LANDMARKS, on the photo at 512 px; here at 320 px, moved by dx).
    mx, my, mw, mh = prepare.crop_mouth_box(index["margin"])
    assert 0.15 < mw < 0.35 and 0.1 < mh < 0.25  # the mouth, not the lower face
    lips = PHOTO_LANDMARKS["astronaut"]
    for i in range(50):
        dx = (i * 30 // 25) // 6  # the 30 fps source frame shown at output frame i
        x0, y0, side = boxes[i]
        for px in (lips["mouth"][0] - lips["mouth_width"] / 2, lips["mouth"][0] + lips["mouth_width"] / 2):
            u, v = (px * 0.625 + dx - x0) / side, (lips["mouth"][1] * 0.625 - y0) / side
            assert mx < u < mx + mw and my < v < my + mh, (i, u, v)  # both lip corners inside
    for i in (0, 49):
        x, y, w, h = detect_face(np.asarray(Image.fromarray(frames[i]).resize((128, 128))))
        assert abs(x + w / 2 - 64) < 16 and abs(y + h / 2 - 64) < 20
        assert 0.3 < w / 128 < 0.6


def test_long_videos_are_split_across_shards(videos, tmp_path):
    summary = prepare.prepare_videos(videos, tmp_path, size=32, shard_frames=20, progress=False)
    assert summary.prepared == 1 and summary.frames == 50 and summary.shards == 3
    index = json.loads((tmp_path / "index.json").read_text())
    assert [s["num_frames"] for s in index["shards"]] == [20, 20, 10]
    starts = [seg["start_frame"] for s in index["shards"] for seg in s["segments"]]
    assert starts == [0, 20, 40]
    _, audio, _, _ = prepare.load_shard(tmp_path / "shard_0002.safetensors")
    assert audio.shape == (10 * 640,)


def test_empty_folder_is_a_clear_error(tmp_path):
    from letstalk_rt.errors import InputError

    with pytest.raises(InputError, match="no videos"):
        prepare.prepare_videos(tmp_path, tmp_path / "out", progress=False)


def test_cache_latents_encodes_every_shard(videos, tmp_path, tiny_model_dir):
    from letstalk_rt.errors import InputError

    prepare.prepare_videos(videos, tmp_path, size=32, shard_frames=30, progress=False)
    paths = prepare.cache_latents(tmp_path, tiny_model_dir, batch_size=16, progress=False)
    assert [p.name for p in paths] == ["latents_0000.safetensors", "latents_0001.safetensors"]
    from safetensors.numpy import load_file

    latents = load_file(str(paths[1]))["latents"]
    assert latents.shape == (20, 4, 8, 8) and latents.dtype == np.float16 and np.isfinite(latents).all()
    prepare.prepare_videos(videos, tmp_path / "big", size=64, progress=False)
    with pytest.raises(InputError, match="--size 32"):
        prepare.cache_latents(tmp_path / "big", tiny_model_dir, progress=False)


def test_eval_prepares_a_folder_of_videos_and_scores_them(videos, tmp_path, tiny_model_dir, capsys):
    """`letstalk eval --data VIDEOS`: the videos are prepared into the report folder at the model's size (the
    bad ones skipped with a warning) and scored as real videos."""
    from letstalk_rt.cli import main

    out = tmp_path / "report"
    code = main(["eval", "--data", str(videos), "--model", str(tiny_model_dir), "--long-seconds", "0",
                 "--window", "2", "--device", "cpu", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "prepared 1 of 3 videos" in captured.err and "skipping 'broken.mkv'" in captured.err
    index = json.loads((out / "prepared" / "index.json").read_text())
    assert index["size"] == 32 and index["summary"]["prepared"] == 1
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "prepared" and report["clips"] == ["shard_0000_000000"]
    assert report["models"][0]["clips"][0]["identity"] == "talk.mp4"
    assert report["models"][0]["clips"][0]["frames"] == 50
