"""letstalk_rt.train.prepare: any-rate talking-head videos -> 25 fps face crops + 16 kHz audio shards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import speechlike, write_mkv_dropping_audio
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


def test_long_videos_are_split_across_shards(videos, tmp_path, monkeypatch):
    summary = prepare.prepare_videos(videos, tmp_path, size=32, shard_frames=20, progress=False)
    assert summary.prepared == 1 and summary.frames == 50 and summary.shards == 3
    index = json.loads((tmp_path / "index.json").read_text())
    assert [s["num_frames"] for s in index["shards"]] == [20, 20, 10]
    starts = [seg["start_frame"] for s in index["shards"] for seg in s["segments"]]
    assert starts == [0, 20, 40]
    _, audio, _, _ = prepare.load_shard(tmp_path / "shard_0002.safetensors")
    assert audio.shape == (10 * 640,)
    # Stopped (Ctrl-C, a `kill`) while a video is read: said so, and no index left describing other shards
    from letstalk_rt.errors import Stopped

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_prepare_one", interrupted)
    with pytest.raises(Stopped, match=r"stopped after 0 of 3 videos: .* has no index.json, so nothing reads its "
                                      "shards; the same command starts over"):
        prepare.prepare_videos(videos, tmp_path, size=32, shard_frames=20, progress=False)
    assert not (tmp_path / "index.json").exists()
    # ... or while the last shard is written, every video read: the same
    monkeypatch.undo()
    flush, flushes = prepare._ShardWriter.flush, []

    def last_flush_interrupted(writer):  # shards 1 and 2 are written as the video fills them, the 3rd at the end
        flushes.append(1)
        if len(flushes) == 3:
            raise KeyboardInterrupt
        flush(writer)

    monkeypatch.setattr(prepare._ShardWriter, "flush", last_flush_interrupted)
    with pytest.raises(Stopped, match=r"stopped after 3 of 3 videos: .* has no index.json"):
        prepare.prepare_videos(videos, tmp_path, size=32, shard_frames=20, progress=False)
    assert not (tmp_path / "index.json").exists()


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


# ------------------------------------------------------------------------------------------------
# Phone videos stored sideways, audio timelines with gaps, silent tracks, skip reasons, re-runs
# ------------------------------------------------------------------------------------------------

# QuickTime track matrices (a, b, c, d, tx, ty) that show the stored picture turned clockwise by 90, 180
# or 270 degrees, as FFmpeg's mov muxer writes for the "rotate" tag (phones write 90 for portrait video):
# a stored point (x, y) is shown at (a x + c y + tx, b x + d y + ty).
_CLOCKWISE = {90: lambda w, h: (0, 1, -1, 0, h, 0), 180: lambda w, h: (-1, 0, 0, -1, w, h),
              270: lambda w, h: (0, -1, 1, 0, 0, w)}


def _show_turned(path: Path, clockwise: int) -> None:
    """Patch the video track's tkhd matrix of an mp4 so players show its frames turned `clockwise` degrees
    (the display matrix a phone writes), independently of the PyAV API that reads it back."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    while at >= 0:
        version = data[at + 4]
        matrix = at + 8 + (20 if version == 0 else 32) + 16  # type, version/flags, times/ids, reserved/layer/volume
        width, height = struct.unpack(">II", data[matrix + 36:matrix + 44])
        if width:  # the video track (the audio track's tkhd has no size)
            a, b, c, d, tx, ty = _CLOCKWISE[clockwise](width >> 16, height >> 16)
            data[matrix:matrix + 36] = struct.pack(">9i", a << 16, b << 16, 0, c << 16, d << 16, 0,
                                                   tx << 16, ty << 16, 1 << 30)
            path.write_bytes(bytes(data))
            return
        at = data.find(b"tkhd", at + 4)
    raise AssertionError(f"no video tkhd in {path}")


@pytest.mark.parametrize("clockwise", [90, 180, 270])
def test_rotated_videos_are_read_upright(tmp_path, clockwise):
    """A phone stores portrait video sideways with a display matrix; both decoders must show it upright."""
    import av

    from letstalk_rt.media import read_frames

    upright = np.full((48, 64, 3), 60, np.uint8)  # landscape, with a bright top-left and a grey bottom-right
    upright[:12, :16] = 250
    upright[-12:, -20:] = 150
    stored = np.ascontiguousarray(np.rot90(upright, clockwise // 90))  # turned counter-clockwise: shown clockwise
    path = tmp_path / "phone.mp4"
    _write_video(path, [stored] * 5, 25, None)
    _show_turned(path, clockwise)
    with av.open(str(path)) as c:  # PyAV's sign: the angle the matrix turns the picture counter-clockwise
        assert next(c.decode(c.streams.video[0])).rotation % 360 == -clockwise % 360
    for frames in (list(prepare.frames_at_25fps(path)), list(read_frames(path))):
        assert len(frames) == 5
        for f in frames:
            assert f.shape == upright.shape
            assert np.abs(f.astype(int) - upright).mean() < 4


def test_a_sideways_phone_video_is_prepared_upright(tmp_path):
    """The astronaut talking, stored sideways with a rotate=90 matrix: prepared 'ok' with the face in every crop."""
    photo = np.asarray(Image.fromarray(data.astronaut()).resize((320, 320)))
    frame = np.full((240, 320, 3), 90, np.uint8)
    frame[:, 10:310] = photo[0:240, 10:310]
    videos = tmp_path / "videos"
    videos.mkdir()
    path = videos / "portrait.mp4"
    _write_video(path, [np.ascontiguousarray(np.rot90(frame))] * 30, 30, speechlike(1.0))
    _show_turned(path, 90)
    out = tmp_path / "out"
    summary = prepare.prepare_videos(videos, out, size=64, progress=False)
    index = json.loads((out / "index.json").read_text())
    assert summary.prepared == 1, index["videos"]
    frames, _, boxes, _ = prepare.load_shard(out / "shard_0000.safetensors")
    assert len(frames) == 25
    for i in (0, 24):
        x, y, w, h = detect_face(np.asarray(Image.fromarray(frames[i]).resize((128, 128))))
        assert abs(x + w / 2 - 64) < 16 and abs(y + h / 2 - 64) < 20 and 0.3 < w / 128 < 0.6
    assert boxes[0, 2] < 240  # crop boxes in the upright frame's pixels (the face is ~62 px wide)


def _write_gappy_mkv(path: Path, seconds: float, gap: tuple[float, float], click: float) -> None:
    """An mkv with a tone whose packets between gap[0] and gap[1] s are missing (the timeline jumps over them) and
    a click at `click` s of the video's timeline."""
    t = np.arange(int(seconds * 16000)) / 16000
    pcm = (0.05 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    pcm[int(click * 16000):int(click * 16000) + 64] = 0.9
    write_mkv_dropping_audio(path, [np.full((32, 32, 3), 90, np.uint8)] * int(seconds * 25), pcm, gap)


def test_audio_is_placed_by_timestamp_across_a_gap(tmp_path):
    """0.5 s of audio packets missing: the click at 2.0 s still lands on frame 50 (glued end to end: frame 37)."""
    path = tmp_path / "webcam.mkv"
    _write_gappy_mkv(path, 3.0, gap=(1.0, 1.5), click=2.0)
    audio = prepare.load_track_audio(path, 75)
    assert audio.shape == (75 * 640,)
    assert int(np.argmax(np.abs(audio))) // 640 == 50
    assert np.abs(audio[int(1.05 * 16000):int(1.45 * 16000)]).max() == 0  # the gap is silence
    assert np.abs(audio[int(0.5 * 16000):int(0.9 * 16000)]).max() > 0.04  # the tone before it is kept


def test_silent_audio_is_skipped_and_quiet_speech_kept(tmp_path):
    frames = [np.full((32, 32, 3), 90, np.uint8)] * 25
    silent, quiet = tmp_path / "silent.mp4", tmp_path / "quiet.mp4"
    _write_video(silent, frames, 25, np.zeros(16000, np.float32))
    speech = speechlike(1.0)
    speech *= 10 ** (-50 / 20) / np.sqrt(np.mean(speech ** 2))  # speech at -50 dBFS RMS: very quiet, but speech
    _write_video(quiet, frames, 25, speech)
    with pytest.raises(prepare.SkipVideo, match="silent audio") as e:
        prepare.load_track_audio(silent, 25)
    assert e.value.kind == "silent audio"
    kept = prepare.load_track_audio(quiet, 25)
    assert np.corrcoef(kept, speech)[0, 1] > 0.9


def test_skip_reasons_are_counted_by_kind_not_by_the_file_name(tmp_path):
    """Broken files named like a reason ('face', 'audio', 'short') are counted as unreadable: the kind travels
    with the exception instead of being read out of a message that can hold the file's path."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("face_cam.mp4", "audio_x.mov", "short_take.mkv"):
        (videos / name).write_bytes(b"\x1a\x45\xdf\xa3 not really a video" * 10)
    summary = prepare.prepare_videos(videos, tmp_path / "out", size=32, progress=False)
    assert summary.skipped == {"unreadable": 3}
    reasons = {v["video"]: v["reason"] for v in json.loads((tmp_path / "out" / "index.json").read_text())["videos"]}
    assert str(videos) not in reasons["face_cam.mp4"]  # the warning line names the file; the reason does not repeat it


def test_a_rerun_clears_the_previous_shards_and_caches_first(videos, tmp_path, monkeypatch):
    """Clip names (shard_0000_000000) come back with new content, so the trainer's caches of the old shards and
    cache_latents's files go, and the old index.json goes before any shard is written: a run stopped part-way
    leaves no index describing shards it did not write."""
    out = tmp_path / "out"
    prepare.prepare_videos(videos, out, size=32, progress=False)
    (out / ".letstalk_cache" / "latents-32-0123456789abcdef").mkdir(parents=True)
    (out / ".letstalk_cache" / "latents-32-0123456789abcdef" / "shard_0000_000000.safetensors").write_bytes(b"old")
    (out / "latents_0000.safetensors").write_bytes(b"old")
    (out / ".shard_0001.safetensors.partial-999-0").write_bytes(b"half")  # a shard a killed run was writing

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "_prepare_one", stopped)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_videos(videos, out, size=32, margin=0.3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == []
