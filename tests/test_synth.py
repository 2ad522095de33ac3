"""letstalk_rt.train.synth: a seeded synthetic talking-head corpus with speech-timed mouths (tiny sizes)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng is not installed (apt-get install espeak-ng); the corpus speaks with it")

from letstalk_rt.errors import Stopped
from letstalk_rt.train import synth


def _still(spec: synth.ClipSpec) -> synth.ClipSpec:
    """The same clip without head motion or blinks, so only the mouth moves."""
    return dataclasses.replace(spec, motion_scale=0.0, blinks=False)


@pytest.fixture(scope="module")
def specs() -> list[synth.ClipSpec]:
    return synth.make_clip_specs(6, seconds_range=(1.5, 2.5), size=64, seed=0, real_photo_fraction=0.0)


@pytest.fixture(scope="module")
def rendered(specs):
    """Clips 0-2 (train, validation, test; procedural faces) rendered with a still head."""
    return [synth.render_clip(_still(s)) for s in specs[:3]]


def _lagged_corr(a: np.ndarray, b: np.ndarray, lag: int) -> float:
    """Correlation of a[t + lag] with b[t]."""
    x, y = (a[lag:], b[:len(b) - lag]) if lag >= 0 else (a[:lag], b[-lag:])
    return float(np.corrcoef(x, y)[0, 1])


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------


def test_specs_are_a_function_of_seed_and_index():
    a = synth.make_clip_specs(8, (3, 8), 128, seed=0)
    b = synth.make_clip_specs(8, (3, 8), 128, seed=0)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.digest() for s in a] == [s.digest() for s in b]
    longer = synth.make_clip_specs(20, (3, 8), 128, seed=0)  # growing a corpus keeps its clips
    assert [s.to_dict() for s in longer[:8]] == [s.to_dict() for s in a]
    other = synth.make_clip_specs(8, (3, 8), 128, seed=1)
    assert [s.to_dict() for s in other] != [s.to_dict() for s in a]
    assert {s.voice["name"] for s in other} != {s.voice["name"] for s in a}


def test_same_seed_same_frames_audio_and_metadata(specs, rendered):
    frames, audio, meta = synth.render_clip(_still(specs[0]))
    frames0, audio0, meta0 = rendered[0]
    assert np.array_equal(frames, frames0)
    assert np.array_equal(audio, audio0)
    assert meta == meta0
    other = synth.make_clip_specs(1, (1.5, 2.5), 64, seed=1, real_photo_fraction=0.0)[0]
    frames1, _, meta1 = synth.render_clip(_still(other))
    assert meta1["text"] != meta0["text"] and meta1["identity"]["params"] != meta0["identity"]["params"]
    n = min(len(frames1), len(frames0))
    assert np.abs(frames1[:n].astype(int) - frames0[:n]).mean() > 10


# ------------------------------------------------------------------------------------------------
# Timing of the mouth parameters
# ------------------------------------------------------------------------------------------------


def test_frame_count_and_per_frame_parameters(specs, rendered):
    for spec, (frames, audio, meta) in zip(specs, rendered):
        n = -(-len(audio) // 640)
        assert len(audio) == spec.num_samples == round(spec.seconds * 16000)
        assert frames.shape == (n, 64, 64, 3) and frames.dtype == np.uint8
        assert audio.dtype == np.float32 and np.abs(audio).max() <= 1.0
        assert meta["num_frames"] == n and meta["fps"] == 25 and meta["sample_rate"] == 16000
        for key in ("speech", "opening", "width", "rounding", "blink", "head_pose"):
            assert len(meta["frames"][key]) == n, key
        assert meta["text"] and meta["phrases"] and meta["voice"]["name"] == spec.voice["name"]


def test_opening_is_zero_in_silence_and_open_in_speech(rendered):
    for frames, audio, meta in rendered:
        opening = np.array(meta["frames"]["opening"])
        rms = synth.frame_rms(audio, len(frames))
        t0, t1 = np.arange(len(frames)) * 0.04, np.arange(1, len(frames) + 1) * 0.04
        silent = np.ones(len(frames), bool)  # frames entirely in the pauses (noise floor only)
        for p in meta["phrases"]:
            silent &= (t1 <= p["start"]) | (t0 >= p["end"])
        loud = rms > 0.3 * rms.max()
        assert silent.sum() >= 3 and loud.sum() >= 3
        assert np.all(opening[silent] == 0)
        assert np.all(opening[loud] > 0.2)
        assert np.all(np.array(meta["frames"]["speech"])[silent] == 0)


def test_opening_is_aligned_with_the_audio_envelope(rendered):
    for frames, audio, meta in rendered:
        opening = np.array(meta["frames"]["opening"])
        rms = synth.frame_rms(audio, len(frames))
        corr = {lag: _lagged_corr(opening, rms, lag) for lag in range(-4, 5)}
        assert max(corr, key=corr.get) == 0, corr
        assert corr[0] > 0.7


def test_vowels_shape_the_mouth():
    """Words full of "ee" give a wider, less rounded mouth than words full of "oo"."""
    spec = synth.make_clip_specs(1, (4, 4), 64, seed=0)[0]
    spec = dataclasses.replace(spec, voice=dict(spec.voice, name="en-us", rate=110, word_gap=0),
                               phrases=["see me, we three see thee", "who do you woo, two boots"],
                               pauses=[0.2, 0.3, 0.2])
    audio, phrases = synth.synthesize_speech(spec)
    assert len(phrases) == 2
    params = synth.mouth_parameters(audio, spec.num_frames, phrases)
    t = np.arange(spec.num_frames) / 25
    ee = params["speech"] & (t < phrases[0]["end"])
    oo = params["speech"] & (t > phrases[1]["start"])
    assert params["width"][ee].mean() > params["width"][oo].mean() + 0.1
    assert params["rounding"][oo].mean() > params["rounding"][ee].mean() + 0.05


# ------------------------------------------------------------------------------------------------
# The rendered face follows the parameters
# ------------------------------------------------------------------------------------------------


def _open_closed_diffs(frames: np.ndarray, meta: dict) -> tuple[float, float]:
    opening = np.array(meta["frames"]["opening"])
    i_open, i_closed = int(opening.argmax()), int(np.flatnonzero(opening == 0)[0])
    diff = np.abs(frames[i_open].astype(np.float64) - frames[i_closed])
    x, y, w, h = meta["mouth_box"]
    fx, fy, fw, fh = meta["face_box"]
    face = np.zeros(frames.shape[1:3], bool)
    face[max(0, fy):fy + 2 * fh, max(0, fx - fw // 4):fx + fw + fw // 4] = True  # face, chin and jaw below
    return float(diff[y:y + h, x:x + w].mean()), float(diff[~face].mean())


def test_mouth_region_changes_with_opening_and_nothing_else_does(rendered):
    for frames, audio, meta in rendered:
        inside, outside = _open_closed_diffs(frames, meta)
        assert inside > 15, inside
        assert outside < 1.0, outside


def test_head_motion_and_blinks_move_the_face(specs, rendered):
    frames, _, meta = synth.render_clip(specs[0])  # with motion and blinks
    pose = np.array(meta["frames"]["head_pose"])
    assert np.ptp(pose[:, 0]) > 0.05 and np.abs(pose[:, 2]).max() < 4.0
    assert np.abs(np.diff(pose[:, 0])).max() < 0.05 * 64  # smooth: under 3 px per frame
    still = rendered[0][0]
    assert np.abs(frames.astype(int) - still).mean() > 0.5


def test_blinks_come_every_two_to_six_seconds():
    blink = synth.blink_track(25 * 60, np.random.default_rng(0))
    starts = np.flatnonzero((blink[1:] > 0) & (blink[:-1] == 0)) / 25
    gaps = np.diff(starts)
    assert 8 <= len(starts) <= 32
    assert gaps.min() >= 2.0 and gaps.max() <= 6.3
    assert blink.max() > 0.85


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------


def test_splits_have_disjoint_identities_and_voices():
    specs = synth.make_clip_specs(400, (3, 8), 128, seed=0, real_photo_fraction=0.3)
    by = {s: [c for c in specs if c.split == s] for s in synth.SPLITS}
    assert all(by.values()) and len(by["train"]) > 300
    ids = {s: {c.identity["id"] for c in cs} for s, cs in by.items()}
    voices = {s: {c.voice["name"] for c in cs} for s, cs in by.items()}
    timbres = {s: {c.voice["variant"] for c in cs} for s, cs in by.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not ids[a] & ids[b]
        assert not voices[a] & voices[b]
        assert not timbres[a] & timbres[b]
    photos = [c for c in specs if c.identity["kind"] == "photo"]
    assert photos and all(c.split == "train" for c in photos)
    assert 0.2 < len(photos) / len(by["train"]) < 0.4
    assert len({c.voice["language"] for c in specs}) >= 20  # many languages
    assert len(ids["train"]) > 100  # many faces


# ------------------------------------------------------------------------------------------------
# A real photo
# ------------------------------------------------------------------------------------------------


def test_real_photo_clip_keeps_the_face_and_moves_the_mouth():
    from letstalk_rt.face import detect_face

    spec = synth.make_clip_specs(1, (1.2, 1.6), 128, seed=0, real_photo_fraction=1.0)[0]
    assert spec.identity["kind"] == "photo" and spec.identity["photo"] == "astronaut"
    frames, _, meta = synth.render_clip(_still(spec))
    opening = np.array(meta["frames"]["opening"])
    i_open = int(opening.argmax())
    assert opening[i_open] > 0.5
    fx, fy, fw, fh = meta["face_box"]
    for i in (0, i_open, len(frames) - 1):
        x, y, w, h = detect_face(frames[i])
        assert abs(x + w / 2 - (fx + fw / 2)) < 0.25 * fw and abs(y + h / 2 - (fy + fh / 2)) < 0.25 * fh
    inside, outside = _open_closed_diffs(frames, meta)
    assert inside > 15 and outside < 1.0, (inside, outside)


# ------------------------------------------------------------------------------------------------
# A tiny corpus on disk
# ------------------------------------------------------------------------------------------------


def test_tiny_corpus_files_manifest_and_resume(tmp_path, monkeypatch):
    from letstalk_rt.media import probe

    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "corpus"), "--clips", "3", "--seconds", "1", "2",
                              "--size", "64", "--seed", "0", "--quiet"])
    synth.main(args)
    out = tmp_path / "corpus"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_clips"] == 3 and manifest["fps"] == 25 and manifest["size"] == 64
    assert sorted(c for names in manifest["splits"].values() for c in names) == ["clip_00000", "clip_00001", "clip_00002"]
    assert all(manifest["splits"][s] for s in synth.SPLITS)
    mtimes = {}
    for clip in manifest["clips"]:
        meta = json.loads((out / clip["meta"]).read_text())
        info = probe(out / clip["video"])
        assert info.video_frames == meta["num_frames"] == -(-meta["num_samples"] // 640)
        assert (info.width, info.height, info.fps) == (64, 64, 25.0)
        assert abs(info.audio_seconds - meta["num_samples"] / 16000) <= 0.04
        assert 1.0 <= meta["seconds"] <= 2.0
        mtimes[clip["video"]] = (out / clip["video"]).stat().st_mtime_ns
    assert not list(out.glob(".*partial*"))
    # Resume: complete clips are kept, a missing one is made again, what a killed run was writing is deleted.
    (out / "clip_00001.json").unlink()
    killed = out / ".clip_00001.json.partial-999-0"
    killed.write_text("{")
    os.utime(killed, (time.time() - 120, time.time() - 120))
    synth.synthesize_corpus(out, 3, (1, 2), 64, seed=0, progress=False)
    assert not list(out.glob(".*partial*"))
    assert (out / "clip_00000.mp4").stat().st_mtime_ns == mtimes["clip_00000.mp4"]
    assert (out / "clip_00001.json").exists()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # Stopped (Ctrl-C, a `kill`) while a clip is made: the finished clips kept and said so, no manifest claiming a
    # whole corpus, and the same command goes on from them.
    for name in ("manifest.json", "clip_00002.json", "clip_00002.mp4"):
        (out / name).unlink()

    def interrupted(spec, out_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(synth, "write_clip", interrupted)
    with pytest.raises(Stopped, match=r"stopped with 2 of 3 clips written to .*corpus' \(no manifest.json yet\); "
                                      "the same command goes on"):
        synth.main(args)
    assert not (out / "manifest.json").exists()
    monkeypatch.undo()
    synth.main(args)
    assert json.loads((out / "manifest.json").read_text()) == manifest


# ------------------------------------------------------------------------------------------------
# Voices that exist, corpora re-made in place
# ------------------------------------------------------------------------------------------------


def test_voice_variants_espeak_lacks_are_left_out(monkeypatch, capsys):
    """espeak-ng speaks an unknown LANG+VARIANT with the default voice without a word: a split would hear the
    default timbre another split owns. Missing variants are dropped from the pool with a warning."""
    installed = synth._installed_variants()
    assert {"m1", "f1", "klatt", "Annie", "grandma"} <= installed  # the parser reads `espeak-ng --voices=variant`
    monkeypatch.setattr(synth, "_installed_variants", lambda: installed - {"m1", "klatt2"})
    monkeypatch.setattr(synth, "_warned", set())
    pool = synth.voice_pool()
    assert {var for _, var in pool} == set(synth.VARIANTS) - {"m1", "klatt2"}
    assert "lacks voice variants ['m1', 'klatt2']" in capsys.readouterr().err
    specs = synth.make_clip_specs(200, (3, 8), 64, seed=0)
    assert not {s.voice["variant"] for s in specs} & {"m1", "klatt2"}
    monkeypatch.setattr(synth, "_installed_variants", lambda: frozenset({"m1"}))  # "" and m1: fewer than the splits
    with pytest.raises(synth.InputError, match="voice variants"):
        synth.voice_pool()


def test_a_stopped_run_with_another_seed_is_refused_by_the_reader(tmp_path):
    """A seed-0 corpus, then a seed-1 run into the same folder stopped after re-rendering clip 0: the old
    manifest no longer describes clip 0 (other face, other voice partition); training on it is refused."""
    from letstalk_rt.errors import InputError
    from letstalk_rt.train.data import open_dataset

    out = tmp_path / "corpus"
    synth.synthesize_corpus(out, 1, (1, 1), 64, seed=0, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["clips"][0]["spec_digest"] == json.loads((out / "clip_00000.json").read_text())["spec_digest"]
    assert len(open_dataset(out, 32, "train", progress=False).clips) == 1
    synth.write_clip(synth.make_clip_specs(1, (1, 1), 64, seed=1)[0], out)  # ... and the run stopped here
    with pytest.raises(InputError, match="empty folder"):
        open_dataset(out, 32, "train", progress=False)


def test_only_some_splits_are_written_as_the_whole_corpus_would_hold_them(tmp_path):
    """`--only test --only train:1` of 12 planned clips: every test clip and the first train clip, each the same
    spec (digest) the whole corpus plans, no other clip rendered, and a manifest of just those that the eval's
    corpus reader opens; an unknown split or one with no clip planned is a clear error."""
    from letstalk_rt.errors import InputError
    from letstalk_rt.eval import Corpus

    plan = synth.make_clip_specs(12, (1, 1), 64, seed=3)
    want = [s for s in plan if s.split == "test"] + [s for s in plan if s.split == "train"][:1]
    out = tmp_path / "aside"
    synth.synthesize_corpus(out, 12, (1, 1), 64, seed=3, progress=False, only={"test": None, "train": 1})
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(c["name"] for c in manifest["clips"]) == sorted(s.name for s in want)
    assert {c["name"]: c["spec_digest"] for c in manifest["clips"]} == {s.name: s.digest() for s in want}
    assert sorted(p.stem for p in out.glob("*.mp4")) == sorted(s.name for s in want)
    assert manifest["splits"]["validation"] == [] and len(manifest["splits"]["train"]) == 1
    assert Corpus(out).names("test") == [s.name for s in plan if s.split == "test"]
    with pytest.raises(InputError, match="the splits are"):
        synth.synthesize_corpus(out, 12, (1, 1), 64, seed=3, progress=False, only={"tests": None})
    with pytest.raises(InputError, match="plan more with --clips"):
        synth.synthesize_corpus(tmp_path / "none", 1, (1, 1), 64, seed=3, progress=False, only={"test": None})
    # a whole corpus in the folder is not shrunk to the selection (its training runs read that manifest)
    whole = tmp_path / "whole"
    synth.synthesize_corpus(whole, 3, (1, 1), 64, seed=3, progress=False)
    before = (whole / "manifest.json").read_text()
    with pytest.raises(InputError, match="would drop 2 of them"):
        synth.synthesize_corpus(whole, 3, (1, 1), 64, seed=3, progress=False, only={"test": None})
    assert (whole / "manifest.json").read_text() == before
    synth.synthesize_corpus(out, 12, (1, 1), 64, seed=3, progress=False, only={"test": None, "train": 1})  # the same again
