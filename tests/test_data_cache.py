"""letstalk_rt.train.data caches: every entry follows its clip's content, not only its name (tiny data, CPU).

Clip names outlive their content: `letstalk data prepare` re-run on other videos writes a new
shard_0000_000000, `letstalk data synth` re-run with another seed a new clip_00000. The frame, latent and
audio-feature caches must notice and rebuild, or training pairs the old clip's frames with the new audio.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from letstalk_rt.errors import InputError
from letstalk_rt.train.data import AudioFeatureCache, LatentCache, _resize, open_dataset

SIZE, SPF = 32, 640


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these shapes are tiny and the machine is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ae() -> torch.nn.Module:
    from letstalk_rt.checkpoint import build_components
    from letstalk_rt.config import model_preset

    return build_components(model_preset("tiny"), seed=0).autoencoder.eval()


class _Energy(torch.nn.Module):
    """A stand-in chunked audio encoder: each frame's mean energy, (1, F, 1, 1) for (1, F * 640) samples."""

    config = "energy-per-frame"

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return wav.reshape(1, -1, SPF).pow(2).mean(-1)[..., None, None]


def _clip(seed: int, frames: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Random-looking frames (N, S, S, 3) uint8 and a tone (N * 640,) float32, different for every seed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, size // 4, size // 4, 3))
    video = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2).repeat(frames, axis=0)
    video = np.clip(video + rng.integers(-20, 20, video.shape), 0, 255).astype(np.uint8)
    t = np.arange(frames * SPF) / 16000
    audio = (rng.uniform(0.1, 0.5) * np.sin(2 * np.pi * rng.uniform(150, 400) * t)).astype(np.float32)
    return video, audio


def _write_shards(root: Path, seeds: list[int], frames: int = 12, size: int = 48) -> Path:
    """index.json + shard_0000.safetensors through the shard writer, one segment per seed: what a run of
    `letstalk data prepare` leaves (re-written in place by the next run, same names)."""
    from letstalk_rt.train.prepare import _ShardWriter

    root.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(root, 10_000, size)
    for i, seed in enumerate(seeds):
        video, audio = _clip(seed, frames, size)
        writer.add(f"talk{i}.mp4", 0, video, audio, np.zeros((frames, 3), np.float32))
    writer.flush()
    (root / "index.json").write_text(json.dumps({"format": "letstalk-prepared", "size": size, "shards": writer.shards}))
    return root


def _write_synth(root: Path, clips: dict[str, tuple[int, int]], manifest: dict | None = None,
                 metas: dict[str, dict] | None = None) -> Path:
    """Synth-format clips {name: (seed, frames)} (48 px mp4 + json) and, unless there is one, a manifest with
    every clip in train."""
    from letstalk_rt.media import VideoWriter

    root.mkdir(parents=True, exist_ok=True)
    for name, (seed, frames) in clips.items():
        video, audio = _clip(seed, frames, 48)
        with VideoWriter(root / f"{name}.mp4", 48, preset="ultrafast") as w:
            for i, frame in enumerate(video):
                w.write_frame(frame)
                w.write_audio(audio[i * SPF:(i + 1) * SPF])
        meta = {"clip": name, "split": "train", "size": 48, "num_frames": frames}
        meta.update((metas or {}).get(name, {}))
        (root / f"{name}.json").write_text(json.dumps(meta))
    if manifest is not None or not (root / "manifest.json").exists():  # a re-write of some clips keeps it
        (root / "manifest.json").write_text(json.dumps(manifest or {
            "format": "letstalk-synth", "size": 48, "splits": {"train": sorted(clips), "validation": [], "test": []}}))
    return root


def _latents_of(ae: torch.nn.Module, frames: np.ndarray) -> torch.Tensor:
    from letstalk_rt.models.autoencoder import encode_frames

    with torch.no_grad():
        return encode_frames(ae, np.array(frames))


def test_reprepared_shards_get_fresh_frame_and_latent_caches(tmp_path, ae):
    """The second run's shard has the first's name, segments and byte size: only its content differs."""
    root = _write_shards(tmp_path / "real", seeds=[0, 1])
    ds = open_dataset(root, SIZE, progress=False)
    LatentCache.build(ds, ae, 0.02, torch.device("cpu"), progress=False)
    size_before = (root / "shard_0000.safetensors").stat().st_size

    _write_shards(root, seeds=[2, 3])  # re-prepared in place (other videos, same lengths)
    assert (root / "shard_0000.safetensors").stat().st_size == size_before
    ds = open_dataset(root, SIZE, progress=False)
    fresh, _ = _clip(2, 12, 48)
    assert np.array_equal(ds.clips[0].frames, _resize(fresh, SIZE))  # the resized frame cache was rebuilt
    with pytest.raises(InputError, match="made from other data"):  # opening without a build refuses stale rows
        LatentCache(LatentCache.path_for(ds, ae), ds)
    cache = LatentCache.build(ds, ae, 0.02, torch.device("cpu"), progress=False)
    for i, clip in enumerate(ds.clips):
        got = cache.get(i, np.arange(clip.num_frames))
        assert torch.allclose(got, _latents_of(ae, clip.frames), atol=2e-2), i  # fp16 rows of the new frames


def test_resynthesised_clip_gets_fresh_latents_and_audio_features(tmp_path, ae):
    """clip_00000 re-made longer with other content (a synth run with another seed): the latents and features
    follow it; before, the old 12 rows stayed and a window past them raised IndexError in training."""
    root = _write_synth(tmp_path / "synth", {"clip_00000": (0, 12), "clip_00001": (1, 12)})
    ds = open_dataset(root, SIZE, progress=False)
    LatentCache.build(ds, ae, 0.02, torch.device("cpu"), progress=False)
    AudioFeatureCache.build(ds, _Energy(), torch.device("cpu"), progress=False)

    _write_synth(root, {"clip_00000": (5, 20)})  # the same name, 20 frames of another clip
    ds = open_dataset(root, SIZE, progress=False)
    assert ds.clips[0].num_frames == 20
    latents = LatentCache.build(ds, ae, 0.02, torch.device("cpu"), progress=False)
    features = AudioFeatureCache.build(ds, _Energy(), torch.device("cpu"), progress=False)
    rows = np.arange(20)
    assert torch.allclose(latents.get(0, rows), _latents_of(ae, ds.clips[0].frames), atol=2e-2)
    energy = _Energy()(torch.from_numpy(np.array(ds.clips[0].audio))[None])[0]  # (20, 1, 1)
    assert torch.allclose(features.get(0, rows), energy, rtol=1e-2, atol=1e-5)
    assert torch.allclose(features.get(1, np.arange(12)),
                          _Energy()(torch.from_numpy(np.array(ds.clips[1].audio))[None])[0], rtol=1e-2, atol=1e-5)


def test_a_synth_clip_keyed_by_its_spec_digest_survives_a_copy(tmp_path, ae):
    """With a spec digest the key is the digest (and the mp4's size): a copied corpus (new mtimes) keeps its
    caches, a clip re-rendered from another spec (new digest) gets new ones."""
    import os

    root = _write_synth(tmp_path / "synth", {"clip_00000": (0, 12)}, metas={"clip_00000": {"spec_digest": "aaaa"}})
    ds = open_dataset(root, SIZE, progress=False)
    LatentCache.build(ds, ae, 0.02, torch.device("cpu"), progress=False)
    files = sorted((root / ".letstalk_cache").rglob("*.safetensors"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    for f in root.iterdir():
        if f.is_file():
            os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # as after a copy
    ds = open_dataset(root, SIZE, progress=False)
    LatentCache.build(ds, ae, 0.02, torch.device("cpu"), progress=False)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # nothing rebuilt
    meta = json.loads((root / "clip_00000.json").read_text())
    (root / "clip_00000.json").write_text(json.dumps(dict(meta, spec_digest="bbbb")))
    assert open_dataset(root, SIZE, progress=False).clips[0].key != ds.clips[0].key


def test_latent_noise_std_follows_train_pixel_noise(tmp_path, ae):
    """meta.json's noise_std is measured for one train_pixel_noise; another one measures it again (the latents,
    which do not depend on it, are kept)."""
    root = _write_shards(tmp_path / "real", seeds=[0], size=SIZE)
    ds = open_dataset(root, SIZE, progress=False)
    small = LatentCache.build(ds, ae, 0.02, torch.device("cpu"), progress=False)
    latent_file = next(small.directory.glob("*.safetensors"))
    stamp = latent_file.stat().st_mtime_ns
    large = LatentCache.build(ds, ae, 0.2, torch.device("cpu"), progress=False)
    assert large.noise_std > 5 * small.noise_std
    assert json.loads((large.directory / "meta.json").read_text())["pixel_noise"] == 0.2
    assert latent_file.stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="train_pixel_noise"):
        LatentCache(large.directory, ds, pixel_noise=0.02)


@pytest.mark.parametrize("meta, manifest_extra, why", [
    ({"split": "validation"}, {}, "its split is 'validation'"),
    ({"spec": {"seed": 1}}, {"seed": 0}, "seed 1"),
    ({"spec_digest": "new"}, {"clips": [{"name": "clip_00000", "spec_digest": "old"}]}, "spec digest"),
])
def test_synth_reader_refuses_clips_of_another_run(tmp_path, meta, manifest_extra, why):
    """A synth run with other settings stopped part-way leaves the old manifest beside re-rendered clips: reading
    its split lists would mix identities and voices across splits."""
    manifest = {"format": "letstalk-synth", "size": 48,
                "splits": {"train": ["clip_00000"], "validation": [], "test": []}, **manifest_extra}
    root = _write_synth(tmp_path / "synth", {"clip_00000": (0, 8)}, manifest=manifest, metas={"clip_00000": meta})
    with pytest.raises(InputError, match="empty folder") as e:
        open_dataset(root, SIZE, progress=False)
    assert why in str(e.value) and "clip_00000.json" in str(e.value)
