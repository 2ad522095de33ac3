"""letstalk_rt.train.trainer / data: every stage on the tiny preset, exact resume, DDP, audio alignment."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from letstalk_rt.checkpoint import build_components, load_model, save_model
from letstalk_rt.cli import main as cli_main
from letstalk_rt.config import model_preset
from letstalk_rt.errors import InputError, LetsTalkError, ModelError, Stopped
from letstalk_rt.memory import box_cells
from letstalk_rt.pipeline import LetsTalkPipeline, corpus_level_min
from letstalk_rt.train.data import audio_window, open_dataset, plan_windows
from letstalk_rt.train.trainer import (FSDP_TORCH, DecoderStage, Dist, DistillStage, FlowObjective, SampleDecoderStage,
                                      TrainConfig, TransformerStage, batch_rows, torch_version, train, with_decoder)

SIZE, SPF = 32, 640


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on the shared 2-core machine two threads on these tiny shapes spin against
    other jobs and run ~5x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _talking_face(frames: int, size: int, seed: int, opening: bool = False):
    """A drifting ellipse face whose mouth opens with the audio's per-frame energy.

    Returns frames (N, S, S, 3) uint8, audio (N * 640,) float32, mouth box (x, y, w, h), and with
    opening=True the mouth's opening per frame (N,) in [0, 1]."""
    rng = np.random.default_rng(seed)
    amp = np.clip(np.sin(np.arange(frames) * rng.uniform(0.4, 0.9) + rng.uniform(0, 6)), 0, None)  # (N,)
    t = np.arange(frames * SPF) / 16000
    audio = (0.5 * np.repeat(amp, SPF) * np.sin(2 * np.pi * rng.uniform(150, 300) * t)).astype(np.float32)
    bg, skin = rng.integers(0, 256, 3), rng.integers(90, 256, 3)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((frames, size, size, 3), np.uint8)
    for i in range(frames):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = bg
        cx, cy = size / 2 + 2 * np.sin(0.3 * i + seed), size / 2
        img[((xx - cx) / (0.35 * size)) ** 2 + ((yy - cy) / (0.42 * size)) ** 2 <= 1] = skin
        mh = 0.02 * size + 0.1 * size * amp[i]
        img[((xx - cx) / (0.15 * size)) ** 2 + ((yy - cy - 0.18 * size) / mh) ** 2 <= 1] = (40, 10, 10)
        out[i] = img
    box = (int(size / 2 - 0.2 * size), int(size / 2 + 0.05 * size), int(0.4 * size), int(0.28 * size))
    return (out, audio, box, amp.astype(np.float32)) if opening else (out, audio, box)


def make_shards(root: Path, size: int = SIZE, clips: int = 4, frames: int = 24) -> Path:
    """A prepared-shards directory (index.json + shard_0000.safetensors) written with the shard writer."""
    from letstalk_rt.train.prepare import _ShardWriter

    root.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(root, 10_000, size)
    for c in range(clips):
        f, a, _ = _talking_face(frames, size, seed=c)
        writer.add(f"clip{c}.mp4", 0, f, a, np.zeros((frames, 3), np.float32))
    writer.flush()
    (root / "index.json").write_text(json.dumps({"format": "letstalk-prepared", "size": size, "shards": writer.shards}))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


def make_synth(root: Path, clips: int = 2, frames: int = 12, tones: list[float | None] | None = None) -> Path:
    """Synth-format clips (mp4 + json with the per-frame mouth state + manifest), 48 px so the cache must
    resize to 32; `tones`: each clip's recorded skin tone (None: a photograph's clip, none recorded)."""
    from letstalk_rt.media import VideoWriter

    root.mkdir(parents=True, exist_ok=True)
    names = []
    for c in range(clips):
        name = f"clip_{c:05d}"
        video, audio, box, opening = _talking_face(frames, 48, seed=10 + c, opening=True)
        with VideoWriter(root / f"{name}.mp4", 48, preset="ultrafast") as w:
            for i, fr in enumerate(video):
                w.write_frame(fr)
                w.write_audio(audio[i * SPF:(i + 1) * SPF])
        per_frame = {"opening": opening.tolist(), "width": [0.5] * frames, "rounding": [0.0] * frames}
        tone = tones[c] if tones else None
        identity = {"id": f"face-{c}", "kind": "photo"} if tone is None else \
            {"id": f"face-{c}", "kind": "procedural", "params": {"skin_tone": tone}}
        (root / f"{name}.json").write_text(json.dumps({"clip": name, "split": "train", "size": 48,
                                                       "num_frames": frames, "mouth_box": list(box),
                                                       "frames": per_frame, "identity": identity}))
        names.append(name)
    (root / "manifest.json").write_text(json.dumps({"format": "letstalk-synth", "size": 48,
                                                    "splits": {"train": names, "validation": [], "test": []}}))
    return root


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    return make_synth(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def synth_sync(tmp_path_factory) -> Path:
    """Enough synth-format clips for the mouth expert (one held out)."""
    return make_synth(tmp_path_factory.mktemp("synth_sync"), clips=6, frames=24)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    comps = build_components(model_preset("tiny"), seed=0)
    return save_model(comps, tmp_path_factory.mktemp("init") / "tiny")


def _cfg(stage: str, data: Path, init: Path, run: Path, **kw) -> TrainConfig:
    base = dict(steps=3, batch=4, lr=1e-3, warmup=2, ckpt_every=100, log_every=1, progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(stage=stage, data=data, init=init, run=run, **base)


def _generates(model_dir: Path, frames: np.ndarray, audio: np.ndarray) -> np.ndarray:
    pipe = LetsTalkPipeline.from_pretrained(model_dir)
    portrait = pipe.prepare_portrait(frames[0], detect=False)
    out = np.stack(list(pipe.generate(portrait, audio[:6 * SPF])))
    assert out.shape == (6, SIZE, SIZE, 3) and out.dtype == np.uint8
    return out


# --------------------------------------------------------------------------------------------------


def test_audio_tokens_match_inference(init_dir, shards):
    """Tokens the trainer builds for frames [s, s + T) == pipeline.audio_tokens(whole clip)[s:s + T]."""
    pipe = LetsTalkPipeline.from_pretrained(init_dir)
    obj = FlowObjective(pipe.audio_encoder, pipe.audio_projector, pipe.transformer)
    enc, T, m = pipe.audio_encoder, pipe.window, pipe.config.audio.margin
    _, audio, _ = _talking_face(24, SIZE, seed=3)
    full = pipe.audio_tokens(audio)  # (24, M, Dt)
    assert full.shape[0] == 24
    starts = [0, 1, 2, 7, 24 - T - 1, 24 - T]
    segs, idxs = zip(*(audio_window(audio, s, T, m, enc.left_samples, enc.right_samples) for s in starts))
    with torch.no_grad():
        tokens = obj.audio_tokens(torch.from_numpy(np.stack(segs)), torch.from_numpy(np.stack(idxs)))  # (B, T, M, Dt)
    for i, s in enumerate(starts):
        torch.testing.assert_close(tokens[i], full[s:s + T], rtol=1e-5, atol=1e-5)


def _w2v_init(root: Path, w2v_dir: Path) -> Path:
    """The tiny preset with a (tiny, randomly initialised) wav2vec2 audio encoder in 0.4 s chunks."""
    config = model_preset("tiny")
    config.audio = dataclasses.replace(config.audio, encoder="wav2vec2", wav2vec2_path=str(w2v_dir),
                                       feature_layers=2, feature_dim=32, wav2vec2_chunk_seconds=0.4,
                                       wav2vec2_context_seconds=0.2)
    return save_model(build_components(config, seed=0), root / "w2v-init")


def test_wav2vec2_tokens_come_from_cached_features_as_inference_makes_them(tmp_path, w2v_dir, shards):
    """A chunked encoder cannot encode a window alone: the trainer reads each clip's features, encoded
    once whole, and its tokens equal pipeline.audio_tokens(whole clip)[s:s + T] (fp16 cache)."""
    init = _w2v_init(tmp_path, w2v_dir)
    pipe = LetsTalkPipeline.from_pretrained(init)
    comps = load_model(init)
    cfg = _cfg("transformer", shards, init, tmp_path / "run")
    stage = TransformerStage(cfg, comps, open_dataset(shards, SIZE, progress=False), Dist())
    assert stage.module.audio_encoder is None  # neither run, trained nor checkpointed
    assert not any(p.requires_grad for p in comps.audio_encoder.parameters())
    indices = range(64)
    batch = stage.make_batch(5, indices)
    plans = plan_windows(stage.dataset, cfg.seed, 5, indices, stage.T)
    with torch.no_grad():
        tokens = stage.module.audio_tokens(batch["audio"], batch["feat_index"])  # (64, T, M, Dt)
    chunk = comps.audio_encoder.block_frames  # 10 frames
    for i, plan in enumerate(plans):
        full = pipe.audio_tokens(np.array(stage.dataset.clips[plan.clip].audio))  # (24, M, Dt)
        torch.testing.assert_close(tokens[i], full[plan.start:plan.start + stage.T], rtol=2e-2, atol=2e-2)
    starts = {p.start for p in plans}
    assert 0 in starts and any(s % chunk > chunk - stage.T for s in starts)  # stream start; across a chunk edge
    assert not torch.allclose(tokens[0], tokens[1])


def test_wav2vec2_models_train_with_the_encoder_frozen(tmp_path, w2v_dir, shards):
    from letstalk_rt.train.trainer import checkpoint_dirs

    init = _w2v_init(tmp_path, w2v_dir)
    dit = train(_cfg("transformer", shards, init, tmp_path / "r_dit", out=tmp_path / "dit", recolour_copies=1))
    assert not (dit / "audio_encoder.safetensors").exists()  # wav2vec2 stays where config.json points
    assert json.loads((dit / "config.json").read_text())["audio"]["wav2vec2_path"] == str(w2v_dir)
    (features,) = (shards / ".letstalk_cache").glob("audio-*")
    clips = open_dataset(shards, SIZE, progress=False).clips
    assert sorted(f.stem for f in features.glob("*.safetensors")) == sorted(c.name for c in clips)  # copies share
    state = torch.load(checkpoint_dirs(tmp_path / "r_dit")[-1] / "trainer_state.pt", weights_only=False)
    assert state["module"] and not any(k.startswith("audio_encoder.") for k in state["module"])
    before, after = (load_file(str(d / "audio_projector.safetensors")) for d in (init, dit))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the projector trained
    frames, audio, _ = _talking_face(24, SIZE, seed=0)
    _generates(dit, frames, audio)
    final = train(_cfg("distill", shards, dit, tmp_path / "r_dis", out=tmp_path / "final", steps=2,
                       teacher_steps=2, student_steps=1))
    _generates(final, frames, audio)


def test_window_plans_are_pure_and_cover_stream_start(shards):
    ds = open_dataset(shards, SIZE, progress=False)
    a = plan_windows(ds, 0, 5, range(64), 4)
    assert a == plan_windows(ds, 0, 5, range(64), 4)
    assert a[10:20] == plan_windows(ds, 0, 5, range(10, 20), 4)  # a rank's slice is the same samples
    assert any(p.start == 0 for p in a) and all(0 <= p.start <= 20 for p in a)
    assert all(not p.start <= p.ref < p.start + 4 for p in a)


def test_balance_skin_tone_gives_every_band_an_equal_share_of_the_samples(tmp_path, init_dir, shards):
    """Three light faces, one medium, one very dark and a photograph: unbalanced, each clip is a sixth of the
    windows; balanced, each band (light, medium, dark, photographs) a quarter, so the dark face is drawn 1.5x
    as often and each light one half as often. The plans stay pure functions of (seed, step, index)."""
    data = make_synth(tmp_path / "synth", clips=6, frames=12, tones=[0.05, 0.1, 0.15, 0.5, 0.95, None])
    ds = open_dataset(data, SIZE, progress=False)
    assert [c.skin_tone for c in ds.clips] == [0.05, 0.1, 0.15, 0.5, 0.95, None]
    balanced = ds.balance_skin_tone()

    def shares(d) -> np.ndarray:
        clips = [p.clip for p in plan_windows(d, 0, 1, range(6000), 4)]
        return np.bincount(clips, minlength=6) / len(clips)

    assert shares(ds) == pytest.approx([1 / 6] * 6, abs=0.02)
    light, medium, dark, photo = shares(balanced)[:3].sum(), *shares(balanced)[3:]
    assert (light, medium, dark, photo) == pytest.approx([0.25] * 4, abs=0.02)
    assert plan_windows(balanced, 0, 1, range(50), 4) == plan_windows(balanced, 0, 1, range(50), 4)
    assert "balanced by skin tone" in balanced.describe() and "balanced" not in ds.describe()
    out = train(_cfg("transformer", data, init_dir, tmp_path / "r", out=tmp_path / "m", steps=2, warmup=1,
                     balance_skin_tone=True))
    assert "balanced by skin tone" in load_model(out).config.description  # the model says how it was trained
    with pytest.raises(InputError, match="--balance-skin-tone needs clips with a recorded skin tone"):
        train(_cfg("transformer", shards, init_dir, tmp_path / "r2", balance_skin_tone=True))


def test_recolour_transforms_colour_and_keeps_grey():
    from letstalk_rt.train.data import Recolour

    frames = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(Recolour((1.0, 1.0, 1.0), 1.0)(frames), frames)
    grey = np.full((1, 2, 2, 3), 100, np.uint8)
    assert np.array_equal(Recolour((1.0, 1.0, 1.0), 1.7)(grey), grey)  # saturation moves colours, not greys
    skin = np.array([[[106, 61, 41]]], np.uint8)  # a dark training face; more saturated, less green: redder
    out = Recolour((1.0, 0.85, 0.95), 1.4)(skin)[0, 0].astype(int)
    assert out[1] / out[0] < 0.5 and abs(out[0] - 106) < 20
    draws = [Recolour.draw(np.random.default_rng(i)) for i in range(200)]
    sat = np.array([d.saturation for d in draws])
    assert sat.min() < 0.75 and sat.max() > 1.35 and 0.9 < np.median(sat) < 1.1


def test_recoloured_copies_train_as_their_own_clips(tmp_path, init_dir):
    """Each clip is followed by its copies, which recolour the same memory-mapped frames whole (portrait included),
    share the audio, mouth and weight, and get their own name and key; the transformer stage caches a latent per
    copy, different from its source's, and the model's description says what it was trained on."""
    from safetensors.numpy import load_file as load_np

    from letstalk_rt.train.data import RecolouredFrames

    data = make_synth(tmp_path / "synth", clips=2, frames=12, tones=[0.3, 0.9])
    ds = open_dataset(data, SIZE, progress=False).balance_skin_tone()
    rc = ds.with_recoloured_copies(2)
    assert [c.name for c in rc.clips] == ["clip_00000", "clip_00000.rc1", "clip_00000.rc2",
                                          "clip_00001", "clip_00001.rc1", "clip_00001.rc2"]
    src, copy = rc.clips[3], rc.clips[4]
    assert isinstance(copy.frames, RecolouredFrames) and copy.frames.source is src.frames
    assert np.array_equal(copy.frames[2:5], copy.frames.recolour(np.asarray(src.frames[2:5])))
    assert not np.array_equal(copy.frames[2:5], src.frames[2:5]) and np.asarray(copy.frames).shape == src.frames.shape
    assert copy.audio is src.audio and copy.weight == src.weight and copy.skin_tone == src.skin_tone
    assert len({c.key for c in rc.clips}) == 6 and copy.recoloured_from is src
    again = ds.with_recoloured_copies(2)  # deterministic: the same draw for the same clip name and copy
    assert [c.frames.recolour for c in again.clips[1::3]] == [c.frames.recolour for c in rc.clips[1::3]]
    assert "4 of them recoloured copies" in rc.describe()

    out = train(_cfg("transformer", data, init_dir, tmp_path / "r", out=tmp_path / "m", steps=2, warmup=1,
                     recolour_copies=1))
    latents = next((data / ".letstalk_cache").glob("latents-32-*"))
    assert sorted(f.stem for f in latents.glob("*.safetensors")) == sorted(
        ["clip_00000", "clip_00000.rc1", "clip_00001", "clip_00001.rc1"])
    a, b = (load_np(str(latents / f"clip_00001{s}.safetensors"))["latents"] for s in ("", ".rc1"))
    assert a.shape == b.shape and not np.allclose(a, b)
    assert "2 of them recoloured copies" in load_model(out).config.description
    with pytest.raises(InputError, match="--recolour-copies must be 0 or more"):
        train(_cfg("transformer", data, init_dir, tmp_path / "r2", recolour_copies=-1))


def test_stages_write_loadable_models(tmp_path, init_dir, shards, synth_dir):
    frames, audio, _ = _talking_face(24, SIZE, seed=0)
    ae = train(_cfg("autoencoder", synth_dir, init_dir, tmp_path / "r_ae", out=tmp_path / "ae"))
    assert (synth_dir / ".letstalk_cache" / "frames-32" / "clip_00000.safetensors").is_file()
    cfg = json.loads((ae / "config.json").read_text())
    assert cfg["trained"] and "autoencoder" in cfg["description"]
    assert cfg["autoencoder"]["scaling_factor"] != 1.0
    _generates(ae, frames, audio)

    dit = train(_cfg("transformer", shards, ae, tmp_path / "r_dit", out=tmp_path / "dit"))
    assert torch.equal(load_file(str(dit / "autoencoder.safetensors"))["encoder.conv_in.weight"],
                       load_file(str(ae / "autoencoder.safetensors"))["encoder.conv_in.weight"])
    assert len(list((shards / ".letstalk_cache").glob("latents-32-*"))) >= 1
    _generates(dit, frames, audio)
    level = corpus_level_min(c.audio for c in open_dataset(shards, SIZE, progress=False).clips)
    assert level is not None  # quiet live speech is raised to the loud end of what this model was trained on
    assert json.loads((dit / "config.json").read_text())["audio"]["level_min"] == round(level, 4) != 0.2

    final = train(_cfg("distill", shards, dit, tmp_path / "r_dis", out=tmp_path / "final", steps=2,
                       teacher_steps=4, student_steps=1, window=2))
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["sampling"]["num_steps"] == 1 and cfg["sampling"]["stream_window"] == 2
    assert "autoencoder" in cfg["description"] and "distill" in cfg["description"]
    _generates(final, frames, audio)
    log = [json.loads(x) for x in (tmp_path / "r_dis" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    assert set(log[0]) >= {"step", "loss", "lr", "grad_norm", "samples_per_s", "seconds"}


def test_transformer_without_latent_cache_runs(tmp_path, init_dir, shards):
    out = train(_cfg("transformer", shards, init_dir, tmp_path / "run", out=tmp_path / "m", steps=2,
                     latent_cache=False))
    assert (out / "transformer.safetensors").is_file()


def test_transformer_loss_goes_down(tmp_path, init_dir, shards):
    cfg = _cfg("transformer", shards, init_dir, tmp_path / "run", out=tmp_path / "m", steps=40, batch=8,
               lr=2e-3, warmup=5, ema=0.5, schedule="constant")

    def fixed_loss(model_dir: Path) -> float:
        comps = load_model(model_dir)
        stage = TransformerStage(cfg, comps, open_dataset(shards, SIZE, progress=False), Dist())
        batch = stage.finish(stage.make_batch(10**6, range(16)))  # a fixed batch no training step sees
        with torch.no_grad():
            return float(stage.loss(stage.module, batch))

    before = fixed_loss(init_dir)
    after = fixed_loss(train(cfg))
    print(f"fixed-batch loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before, (before, after)


def test_decoder_stage_trains_a_narrower_decoder_for_the_same_latent_space(tmp_path, init_dir, shards):
    narrow = (4, 8, 16)  # the tiny preset's autoencoder is (8, 16, 16)
    cfg = _cfg("decoder", shards, init_dir, tmp_path / "run", out=tmp_path / "m", steps=40, batch=8, lr=3e-3,
               warmup=5, ema=0.5, schedule="constant", decoder_channels=narrow)
    out = train(cfg)

    def fixed_loss(comps) -> float:
        stage = DecoderStage(cfg, comps, open_dataset(shards, SIZE, progress=False), Dist())
        batch = stage.finish(stage.make_batch(10**6, range(16)))  # frames no training step saw
        with torch.no_grad():
            return float(stage.loss(stage.module, batch))

    fresh = [with_decoder(load_model(init_dir), narrow, seed=0).autoencoder.decoder.state_dict() for _ in range(2)]
    assert all(torch.equal(fresh[0][k], fresh[1][k]) for k in fresh[0])  # the new decoder's init follows --seed
    before = fixed_loss(with_decoder(load_model(init_dir), narrow))  # the freshly initialised narrow decoder
    after = fixed_loss(load_model(out))
    print(f"fixed-batch reconstruction loss {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before, (before, after)

    old, new = json.loads((init_dir / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert new["autoencoder"]["decoder_channels"] == list(narrow)
    assert new["autoencoder"]["scaling_factor"] == old["autoencoder"]["scaling_factor"]  # the latents are the same
    assert {k: v for k, v in new.items() if k not in ("autoencoder", "trained", "description")} == \
        {k: v for k, v in old.items() if k not in ("autoencoder", "trained", "description")}
    for name in ("transformer", "audio_projector", "audio_encoder"):
        a, b = load_file(str(init_dir / f"{name}.safetensors")), load_file(str(out / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = load_file(str(init_dir / "autoencoder.safetensors")), load_file(str(out / "autoencoder.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("encoder."))
    assert sum(v.numel() for k, v in b.items() if k.startswith("decoder.")) < \
        sum(v.numel() for k, v in a.items() if k.startswith("decoder."))
    frames, audio, _ = _talking_face(24, SIZE, seed=0)
    _generates(out, frames, audio)  # the pipeline streams with the new decoder

    with pytest.raises(InputError, match="decoder-channels"):  # resuming with other widths: told what to pass
        train(dataclasses.replace(cfg, steps=45, resume=True, decoder_channels=(8, 8, 16)))


def test_decoder_stage_on_samples_learns_the_models_own_latents(tmp_path, init_dir, shards):
    """--decode-samples 1: every window's latents are the frozen model's own one-step samples (its config's
    sampling from the portrait start), decoded toward the real frames. The decoder's error on samples of
    windows no step saw falls; the samples are what the model generates for the window (not the truth's
    latents); nothing but the decoder changes; bad values fail before any step."""
    comps = load_model(init_dir)
    comps.config.sampling.num_steps, comps.config.sampling.start_time = 1, 0.6  # as the shipped default samples
    init = save_model(comps, tmp_path / "init")
    cfg = _cfg("decoder", shards, init, tmp_path / "run", out=tmp_path / "m", steps=80, batch=8, lr=3e-3, warmup=5,
               ema=0.5, schedule="constant", window=2, decode_samples=1.0)
    out = train(cfg)

    def fixed(model_dir: Path, share: float = 1.0) -> tuple[float, dict]:
        c = dataclasses.replace(cfg, decode_samples=share)
        stage = SampleDecoderStage(c, load_model(model_dir), open_dataset(shards, SIZE, progress=False), Dist())
        batch = stage.finish(stage.make_batch(10**6, range(8)))  # windows no training step saw
        with torch.no_grad():
            return float(stage.loss(stage.module, batch)), {"stage": stage, "batch": batch}

    before, ctx = fixed(init)
    after, _ = fixed(out)
    print(f"fixed-batch loss on the model's samples {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before, (before, after)
    stage, batch = ctx["stage"], ctx["batch"]
    assert bool(batch["sampled"].all())
    samples = stage._samples(batch)  # (B, T, C, h, w)
    assert samples.shape == batch["x0"].shape and not torch.allclose(samples, batch["x0"], atol=1e-3)
    assert torch.equal(samples, stage._samples(batch))  # a function of the batch (its noise), as inference is
    assert not bool(fixed(init, share=0.0)[1]["batch"]["sampled"].any())  # share 0: the truth's latents only
    # a share below 1 samples only its windows, each exactly as the whole batch sampled would have
    part = fixed(init, share=0.5)[1]
    rows = part["batch"]["sampled"]
    assert 0 < int(rows.sum()) < len(rows), rows
    calls = []
    part["stage"]._samples = lambda b: (calls.append(len(b["x0"])), samples[rows])[1]
    recon, decode = [], part["stage"].module.forward
    part["stage"].module.forward = lambda lat: (recon.append(lat), decode(lat))[1]
    part["stage"].loss(part["stage"].module, part["batch"])
    assert calls == [int(rows.sum())]
    mixed = recon[0].unflatten(0, (len(rows), -1))  # (B, T, C, h, w)
    assert torch.equal(mixed[rows], samples[rows]) and torch.equal(mixed[~rows], batch["x0"][~rows])
    sub = batch_rows(batch, rows.nonzero().squeeze(1))
    assert torch.allclose(stage._samples(sub), samples[rows], atol=1e-5)

    old, new = json.loads((init / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert {k: v for k, v in new.items() if k not in ("trained", "description")} == \
        {k: v for k, v in old.items() if k not in ("trained", "description")}  # sampling and windows unchanged
    for name in ("transformer", "audio_projector", "audio_encoder"):
        a, b = load_file(str(init / f"{name}.safetensors")), load_file(str(out / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = load_file(str(init / "autoencoder.safetensors")), load_file(str(out / "autoencoder.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("encoder."))
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    assert "decoded from the model's own samples" in new["description"]
    frames, audio, _ = _talking_face(24, SIZE, seed=0)
    _generates(out, frames, audio)

    for bad, stage_name, match in ((1.5, "decoder", "share of the windows"), (0.5, "transformer", "decoder stage")):
        with pytest.raises(InputError, match=match):
            train(_cfg(stage_name, shards, init, tmp_path / f"bad{bad}", decode_samples=bad))


def test_anchored_memory_is_trained_as_inference_uses_it(tmp_path, init_dir, shards):
    """With train_anchor_prob 1, memory slot 0 holds the sample's portrait (only the small forward
    diffusion apart) and is visible except where the regularisation masks it; with 0, it never does."""
    comps = load_model(init_dir)
    sc = comps.config.sampling
    sc.train_memory_noise_max = 1e-4
    data = open_dataset(shards, SIZE, progress=False)
    cfg = _cfg("transformer", shards, init_dir, tmp_path / "run")
    gap = {}
    for prob in (1.0, 0.0):
        sc.train_anchor_prob = prob
        stage = TransformerStage(cfg, comps, data, Dist())
        b = stage.finish(stage.make_batch(7, range(8)))
        seen = b["memory_mask"][:, 0] > 0  # (B, h, w)
        diff = (b["memory"][:, 0] - b["portrait"]).abs().amax(dim=1)  # (B, h, w)
        if prob:
            assert 0.5 < seen.float().mean() < 0.95  # ~25 % masked, as the paper's regularisation
        gap[prob] = float(diff[seen].mean()) if seen.any() else float("inf")
    assert gap[1.0] < 0.02 and gap[0.0] > 5 * gap[1.0], gap  # the portrait itself vs real past frames


def test_guidance_distillation_targets_the_teachers_guided_velocity(tmp_path, init_dir, shards):
    """--distill-target velocity: the target pair lies on the training x_t and its velocity is the
    teacher's guided one, so a student equal to the teacher has zero loss only when the teacher is
    unguided; trajectory targets run the teacher's guided steps. Conditions are never dropped."""
    comps = load_model(init_dir)
    torch.manual_seed(0)
    with torch.no_grad():  # random weights that depend on the audio, so guidance changes the output
        for p in comps.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = open_dataset(shards, SIZE, progress=False)
    losses = {}
    for scale in (1.0, 3.0):
        comps.config.sampling.audio_guidance = scale
        cfg = _cfg("distill", shards, init_dir, tmp_path / "run", distill_target="velocity", teacher_steps=2)
        stage = DistillStage(cfg, comps, data, Dist())
        b = stage.finish(stage.make_batch(3, range(4)))
        assert not b["drop_p"].any() and not b["drop_a"].any()
        x0p, zp = stage.targets(b)
        x_t = stage.flow.add_noise(b["x0"], b["z"], b["t"])
        torch.testing.assert_close(stage.flow.add_noise(x0p, zp, b["t"]), x_t, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            losses[scale] = float(stage.loss(stage.module, b))
        if scale != 1.0:
            assert stage.export(stage.module.state_dict()).config.sampling.audio_guidance == 1.0
            stage.cfg.distill_target = "trajectory"
            x0_traj, z = stage.targets(b)
            assert torch.equal(z, b["z"]) and x0_traj.shape == b["x0"].shape
    assert losses[1.0] < 1e-8 < losses[3.0], losses
    # sampling.audio_guidance_box: the teacher guides the mouth's cells only, as inference does; baked in
    targets = {}
    for scale, box in ((1.0, None), (3.0, None), (3.0, (0.25, 0.5, 0.5, 0.5))):
        comps.config.sampling.audio_guidance, comps.config.sampling.audio_guidance_box = scale, box
        cfg = _cfg("distill", shards, init_dir, tmp_path / "run", distill_target="velocity", teacher_steps=2)
        stage = DistillStage(cfg, comps, data, Dist())
        targets[scale, box] = stage.targets(stage.finish(stage.make_batch(3, range(4))))[0]  # x0' (B, T, C, h, w)
    exported = stage.export(stage.module.state_dict()).config.sampling
    assert exported.audio_guidance == 1.0 and exported.audio_guidance_box is None
    h = targets[1.0, None].shape[-1]
    inside = box_cells(h, h, box) > 0  # (h, w)
    plain, guided, boxed = targets[1.0, None], targets[3.0, None], targets[3.0, box]
    torch.testing.assert_close(boxed[..., ~inside], plain[..., ~inside], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(boxed[..., inside], guided[..., inside], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(guided[..., inside], plain[..., inside], atol=1e-3)


def test_portrait_start_trains_the_step_a_portrait_started_model_samples(tmp_path, init_dir, shards):
    """--portrait-start T: the network sees x_t = (1 - T) portrait + T z at t = T and is scored on reaching the
    clean target from there, the one step a model with sampling.start_time T takes; its export samples so."""
    comps = load_model(init_dir)
    data = open_dataset(shards, SIZE, progress=False)
    stage = TransformerStage(_cfg("transformer", shards, init_dir, tmp_path / "run", portrait_start=0.4), comps,
                             data, Dist())
    b = stage.finish(stage.make_batch(2, range(4)))
    seen = {}

    def spy(audio, feat_index, x_t, t, *conditions):  # the network's inputs; its velocity: the exact one
        seen["x_t"], seen["t"] = x_t, t
        return (x_t - b["x0"]) / 0.4

    assert float(stage.loss(spy, b)) < 1e-10  # the exact velocity from the portrait start scores zero
    torch.testing.assert_close(seen["x_t"], 0.6 * b["portrait"][:, None] + 0.4 * b["z"], rtol=0, atol=1e-5)
    assert torch.all(seen["t"] == 0.4)
    assert stage.export(stage.module.state_dict()).config.sampling.start_time == 0.4
    with pytest.raises(InputError, match="--portrait-start"):
        train(_cfg("autoencoder", shards, init_dir, tmp_path / "ae", portrait_start=0.5))


def test_teacher_start_runs_the_teacher_from_the_portrait_noised_with_the_students_noise(tmp_path, init_dir,
                                                                                         shards):
    """--teacher-start T: the reflow teacher's Euler steps begin at x = (1 - T) portrait + T z, on the grid
    scaled to start at T; with --portrait-start T the student then learns to take that whole path in one step
    from the very point the teacher started at."""
    comps = load_model(init_dir)
    comps.config.sampling.audio_guidance = 1.0
    data = open_dataset(shards, SIZE, progress=False)
    cfg = _cfg("distill", shards, init_dir, tmp_path / "run", teacher_steps=2, teacher_start=0.5,
               portrait_start=0.5, student_steps=1)
    stage = DistillStage(cfg, comps, data, Dist())
    b = stage.finish(stage.make_batch(4, range(3)))
    calls = []

    def spy(x, t, **conditions):  # the teacher's transformer: records where it is asked, moves toward 0
        calls.append((x.clone(), t.clone()))
        return x / t.reshape(-1, 1, 1, 1, 1)

    stage.teacher = types.SimpleNamespace(audio_tokens=stage.teacher.audio_tokens, transformer=spy)
    x0_teacher, z = stage.targets(b)
    start = 0.5 * b["portrait"][:, None] + 0.5 * b["z"]  # (B, T, C, h, w)
    torch.testing.assert_close(calls[0][0], start, rtol=0, atol=1e-6)
    assert [float(t[0]) for _, t in calls] == pytest.approx([0.5, 0.25])
    torch.testing.assert_close(x0_teacher, torch.zeros_like(start), rtol=0, atol=1e-5)  # v = x / t lands on 0
    seen = {}

    def student(audio, feat_index, x_t, t, *conditions):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    stage.loss(student, b)
    torch.testing.assert_close(seen["x_t"], start, rtol=0, atol=1e-5)  # the student starts where the teacher did
    assert torch.all(seen["t"] == 0.5)
    with pytest.raises(InputError, match="--teacher-start"):
        train(_cfg("distill", shards, init_dir, tmp_path / "v", teacher_start=0.5, distill_target="velocity"))


def _unseen_term(stage: TransformerStage, term: str) -> float:
    """An extra loss term ("sync", "pixel") of `stage`'s model on a fixed batch no training step sees."""
    batch = stage.finish(stage.make_batch(10**6, range(16)))
    with torch.no_grad():
        stage.loss(stage.module, batch)
    return float(stage.last_terms[term])


@pytest.mark.parametrize("decoded", [False, True], ids=["latent", "decoded"])
def test_sync_loss_teaches_the_mouth_the_expert_reads_from_ground_truth(tmp_path, init_dir, synth_sync, decoded):
    """The mouth expert (fitted on ground truth only: its latent cells, or with --sync-decoded its mouth
    decoded to pixels) reads the opening on held-out clips, and a transformer trained with --sync-weight
    moves its clean estimate's mouth toward the truth further than the same run without it."""
    data = synth_sync
    base = dict(steps=30, batch=8, lr=2e-3, warmup=3, ema=0.5, schedule="constant")
    with_sync = _cfg("transformer", data, init_dir, tmp_path / "r1", out=tmp_path / "m1", sync_weight=1.0,
                     sync_decoded=decoded, **base)
    out_sync = train(with_sync)
    out_plain = train(_cfg("transformer", data, init_dir, tmp_path / "r0", out=tmp_path / "m0", **base))
    log = [json.loads(x) for x in (tmp_path / "r1" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["sync"]) for r in log)

    # the expert as each run fitted it (on the ground truth: the same for all), reading each model's estimate
    stage = TransformerStage(with_sync, load_model(init_dir), open_dataset(data, SIZE, progress=False), Dist())
    assert stage.expert is not None and stage.expert.held_out_r[0] > 0.8, stage.expert.describe()
    assert (stage.expert.decoder is not None) == decoded and ("decoded" in stage.expert.describe()) == decoded
    assert stage.expert.taught.tolist() == [1.0, 0.0, 0.0]  # width and rounding never change here: not taught

    def expert_error(model_dir: Path) -> float:
        stage.module.load_state_dict(stage.objective(load_model(model_dir)).state_dict())
        return _unseen_term(stage, "sync")

    before, plain, synced = expert_error(init_dir), expert_error(out_plain), expert_error(out_sync)
    print(f"expert error on a fixed batch: init {before:.3f}, trained without sync {plain:.3f}, with {synced:.3f}")
    assert synced < 0.8 * plain, (before, plain, synced)

    if decoded:
        return
    with pytest.raises(InputError, match="give --sync-weight too"):
        train(_cfg("transformer", data, init_dir, tmp_path / "r2", sync_decoded=True))
    with pytest.raises(InputError, match="only a synthetic corpus"):  # prepared shards have no mouth state
        train(_cfg("transformer", make_shards(tmp_path / "shards"), init_dir, tmp_path / "r2", sync_weight=1.0))
    with pytest.raises(InputError, match="give --sync-weight too"):
        train(_cfg("transformer", data, init_dir, tmp_path / "r2", sync_expert="audio"))
    with pytest.raises(InputError, match="--sync-expert 'lips'"):
        train(_cfg("transformer", data, init_dir, tmp_path / "r2", sync_weight=1.0, sync_expert="lips"))
    with pytest.raises(InputError, match="--sync-weight must be"):
        train(_cfg("transformer", data, init_dir, tmp_path / "r2", sync_weight=-1.0))
    with pytest.raises(InputError, match="transformer and distill stages"):
        train(_cfg("autoencoder", data, init_dir, tmp_path / "r2", sync_weight=1.0))


def test_sync_mel_windows_centre_each_frame_on_its_own_speech():
    """Frame f's window holds the log-mel of speech frames f - 2 .. f + 2, 4 mel frames each: a burst in frame 7
    lands in the middle 4 of frame 7's window and 8 mel frames to the left in frame 9's; before the clip, silence."""
    from letstalk_rt.train.data import Clip, ClipDataset
    from letstalk_rt.train.sync import SYNC_CONTEXT, clip_log_mels, mel_windows

    audio = np.zeros(20 * SPF, np.float32)
    audio[7 * SPF:8 * SPF] = 0.3 * np.random.default_rng(0).standard_normal(SPF)  # a burst of noise
    clip = Clip("c", np.zeros((20, 8, 8, 3), np.uint8), audio)
    (mels,) = clip_log_mels(ClipDataset(Path("."), "prepared", None, 8, [clip]))
    energy = mel_windows(mels, np.array([7, 9, 0])).mean(-1)  # (3, 20)
    loud = energy > energy.min() + 1.0
    assert SYNC_CONTEXT == 2 and loud.shape == (3, 20)
    assert loud[0, 8:12].all() and not loud[0, :7].any() and not loud[0, 13:].any()
    assert loud[1, :4].all() and not loud[1, 5:].any()
    assert not loud[2].any()
    both = torch.cat([torch.zeros(5, mels.shape[1]), mels])  # clips end to end: each frame read from its own start
    assert torch.equal(mel_windows(both, np.array([7, 9]), np.array([5, 5])), mel_windows(mels, np.array([7, 9])))


def test_audio_sync_expert_teaches_lip_sync_on_video_shards_without_mouth_labels(tmp_path, init_dir, monkeypatch):
    """Prepared shards have no per-frame mouth state; --sync-expert audio fits the SyncNet-style expert on their
    ground truth (mouth vs speech): it finds the held-out clip's offset, and a transformer trained with it
    scores better by it on a fixed batch than the same run without it."""
    from letstalk_rt.train.sync import AudioSyncExpert

    monkeypatch.setattr("letstalk_rt.train.sync.SYNC_FIT_STEPS", 600)  # (fitted twice: here 8 clips, not 600)
    data = make_shards(tmp_path / "shards", clips=8, frames=48)
    base = dict(steps=30, batch=8, lr=2e-3, warmup=3, ema=0.5, schedule="constant")
    with_sync = _cfg("transformer", data, init_dir, tmp_path / "r1", out=tmp_path / "m1", sync_weight=1.0,
                     sync_expert="audio", **base)
    out_sync = train(with_sync)
    out_plain = train(_cfg("transformer", data, init_dir, tmp_path / "r0", out=tmp_path / "m0", **base))
    log = [json.loads(x) for x in (tmp_path / "r1" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["sync"]) for r in log)
    stage = TransformerStage(with_sync, load_model(init_dir), open_dataset(data, SIZE, progress=False), Dist())
    expert = stage.expert
    assert isinstance(expert, AudioSyncExpert) and expert.offset_accuracy == 1.0 and expert.pair_accuracy > 0.6
    assert "best offset 0 in 100% of clips" in expert.describe()

    def sync_term(model_dir: Path) -> float:
        stage.module.load_state_dict(stage.objective(load_model(model_dir)).state_dict())
        return _unseen_term(stage, "sync")

    before, plain, synced = sync_term(init_dir), sync_term(out_plain), sync_term(out_sync)
    print(f"audio expert's loss on a fixed batch: init {before:.3f}, trained without sync {plain:.3f}, with {synced:.3f}")
    assert synced < 0.8 * plain, (before, plain, synced)


def test_the_mouth_direction_loss_charges_a_backwards_mouth_whatever_its_contrast():
    """mouth_direction_loss: 0 for a mouth changing like the truth (at any size of change), 2 for one changing
    the opposite way, the same for a low-contrast mouth as for a high-contrast one (where an L1 charges the
    low-contrast one ~10x less); a window whose real mouth stays still counts in proportion to its change."""
    from letstalk_rt.train.sync import DIRECTION_FLOOR, mouth_direction_loss

    g = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 3, 6, 6, generator=g) * 2 - 1  # (B, 3, S, S)
    change = torch.randn(2, 4, 3, 6, 6, generator=g) * 0.2  # (B, T, 3, S, S)
    real = ref[:, None] + change
    assert mouth_direction_loss(ref[:, None] + 0.5 * change, real, ref) < 1e-5  # same way, half as far
    assert abs(mouth_direction_loss(ref[:, None] - change, real, ref) - 2) < 1e-5  # backwards
    dim = 0.1  # a dark face: the same motion at a tenth of the contrast
    dark_real, dark_back = ref[:, None] + dim * change, ref[:, None] - dim * change
    assert abs(mouth_direction_loss(dark_back, dark_real, ref) - 2) < 1e-5
    assert (dark_back - dark_real).abs().mean() < 0.11 * (ref[:, None] - change - real).abs().mean()
    still = real.clone()
    still[1] = ref[1] + change[1] * (0.25 * DIRECTION_FLOOR / change[1].pow(2).mean().sqrt())  # RMS floor / 4
    back = 2 * ref[:, None] - still  # both windows backwards
    loss = mouth_direction_loss(back, still, ref)
    assert abs(loss - 2) < 1e-4  # each window is wholly backwards: weighting cannot change the mean
    fake = still.clone()
    fake[1] = back[1]  # only the nearly still window is backwards
    assert abs(mouth_direction_loss(fake, still, ref) - 2 * 0.25 / 1.25) < 1e-4


def test_the_mouth_pattern_loss_is_blind_to_skin_tone_and_not_to_a_backwards_mouth():
    """mouth_pattern_loss: a mouth at a fifth of the contrast on a darker skin has nearly the pattern of the
    same mouth on a light one, and the same mouth with its bright and dark parts swapped costs ~25x more,
    about the same on either skin."""
    from letstalk_rt.train.sync import mouth_pattern_loss

    g = torch.Generator().manual_seed(1)
    light = torch.rand(4, 3, 12, 12, generator=g) * 1.6 - 0.8  # (N, 3, S, S) in [-1, 1]
    dark = (light + 1) * 0.2 - 0.9  # the same picture, darker and at a fifth of the contrast
    assert mouth_pattern_loss(dark, light) < 0.06  # seen 0.053 (the epsilon's share of a low contrast)
    def swapped(x):  # bright and dark parts swapped about the picture's mean brightness
        return 2 * x.mean(dim=(1, 2, 3), keepdim=True) - x

    swapped_light, swapped_dark = swapped(light), swapped(dark)
    assert mouth_pattern_loss(swapped_light, light) > 1.5
    assert mouth_pattern_loss(swapped_dark, dark) > 0.9 * mouth_pattern_loss(swapped_light, light)
    assert (swapped_dark - dark).abs().mean() < 0.25 * (swapped_light - light).abs().mean()  # where an L1 is not


def test_the_mouth_direction_term_is_trained_and_logged(tmp_path, init_dir, synth_sync):
    """--mouth-direction-weight, --mouth-pattern-weight: every step logs the terms (finite, in [0, 2]) beside the flow loss, the
    decoder stays frozen, and a stage that has no denoiser refuses the flag before any step."""
    base = dict(steps=4, batch=4, lr=1e-3, warmup=1, schedule="constant")
    out = train(_cfg("transformer", synth_sync, init_dir, tmp_path / "r", out=tmp_path / "m",
                     mouth_direction_weight=1.0, mouth_pattern_weight=1.0, **base))
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert log and all(0 <= r["direction"] <= 2 and 0 < r["pattern"] < 10 for r in log)
    ae_before = load_model(init_dir).autoencoder.state_dict()
    assert all(torch.equal(v, ae_before[k]) for k, v in load_model(out).autoencoder.state_dict().items())
    for flag in ("mouth_direction_weight", "mouth_pattern_weight"):
        with pytest.raises(InputError, match="transformer and distill stages"):
            train(_cfg("decoder", synth_sync, init_dir, tmp_path / "r2", **{flag: 1.0}))


@pytest.mark.parametrize("flag", ["pixel_mouth_weight", "pixel_frame_weight"], ids=["mouth", "frame"])
def test_pixel_losses_bring_the_decoded_output_toward_the_truth(tmp_path, init_dir, synth_sync, flag):
    """--pixel-mouth-weight / --pixel-frame-weight: the L1 between the decoded clean estimate and the
    decoded ground truth (the mouth square / whole frames) is logged, and on a fixed batch no step saw it
    ends lower than after the same run without it; the decoder stays frozen. Bad inputs fail before any
    step."""
    data, term = synth_sync, {"pixel_mouth_weight": "pixel", "pixel_frame_weight": "frame"}[flag]
    weight = {"pixel_mouth_weight": 5.0, "pixel_frame_weight": 20.0}[flag]
    base = dict(steps=30, batch=8, lr=2e-3, warmup=3, ema=0.5, schedule="constant")
    with_pixel = _cfg("transformer", data, init_dir, tmp_path / "r1", out=tmp_path / "m1", **{flag: weight}, **base)
    out_pixel = train(with_pixel)
    out_plain = train(_cfg("transformer", data, init_dir, tmp_path / "r0", out=tmp_path / "m0", **base))
    log = [json.loads(x) for x in (tmp_path / "r1" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r[term]) and "sync" not in r for r in log)
    ae_before = load_model(init_dir).autoencoder.state_dict()
    for k, v in load_model(out_pixel).autoencoder.state_dict().items():
        assert torch.equal(v, ae_before[k]), k  # gradients pass through the decoder; it is not trained

    def pixel_error(model_dir: Path) -> float:
        stage = TransformerStage(with_pixel, load_model(model_dir), open_dataset(data, SIZE, progress=False), Dist())
        assert stage.expert is None
        return _unseen_term(stage, term)

    before, plain, pixel = pixel_error(init_dir), pixel_error(out_plain), pixel_error(out_pixel)
    print(f"decoded {term} L1 on a fixed batch: init {before:.4f}, trained without {plain:.4f}, with {pixel:.4f}")
    assert pixel < 0.88 * plain, (before, plain, pixel)  # seen: 0.84x (mouth), 0.85x (frame)

    cli = "--" + flag.replace("_", "-")
    with pytest.raises(InputError, match=f"{cli} must be"):
        train(_cfg("transformer", data, init_dir, tmp_path / "r2", **{flag: float("nan")}))
    with pytest.raises(InputError, match="transformer and distill stages"):
        train(_cfg("decoder", data, init_dir, tmp_path / "r2", **{flag: 1.0}))


def test_adversarial_mouth_critic_trains_beside_the_network(tmp_path, init_dir, synth_sync):
    """--adv-mouth-weight: a critic learns, beside the network, to tell the ground truth's decoded mouth from
    the network's; its hinge loss and the network's adversarial term are logged; the network's term reaches
    the network and not the critic (which learns only from its own loss); the decoder stays frozen."""
    cfg = _cfg("transformer", synth_sync, init_dir, tmp_path / "r", out=tmp_path / "m", steps=40, batch=8,
               lr=2e-3, warmup=3, ema=0.5, schedule="constant", adv_mouth_weight=0.5)
    out = train(cfg)
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["adv"]) and np.isfinite(r["critic"]) for r in log)
    assert log[0]["critic"] > 1.5 and log[-1]["critic"] < 1.2, [r["critic"] for r in log]  # 2 = chance
    ae_before = load_model(init_dir).autoencoder.state_dict()
    for k, v in load_model(out).autoencoder.state_dict().items():
        assert torch.equal(v, ae_before[k]), k

    state = torch.load(tmp_path / "r" / "checkpoints" / "step_0000040" / "trainer_state.pt", weights_only=False)
    stage = TransformerStage(cfg, load_model(out), open_dataset(synth_sync, SIZE, progress=False), Dist())
    stage.load_extra_state(state["extra"])
    batch = stage.finish(stage.make_batch(10**6, range(8)))  # windows no step saw
    loss = stage.loss(stage.module, batch)
    real, fake = stage._mouths
    with torch.no_grad():
        assert float(stage.critic(real).mean()) > float(stage.critic(fake).mean()) + 0.5
    stage.module.zero_grad()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.module.transformer.parameters())
    assert all(p.grad is None for p in stage.critic.parameters())
    # the decoder stage: the critic compares the real frames' mouths with the reconstruction's
    dec = _cfg("decoder", synth_sync, init_dir, tmp_path / "d", out=tmp_path / "dm", steps=40, batch=8, lr=2e-3,
               warmup=3, ema=0.5, schedule="constant", adv_mouth_weight=0.5)
    out = train(dec)
    log = [json.loads(x) for x in (tmp_path / "d" / "log.jsonl").read_text().splitlines()]
    assert log[0]["critic"] > 1.5 and log[-1]["critic"] < 1.2 and all(np.isfinite(r["adv"]) for r in log)
    enc_before = load_model(init_dir).autoencoder.encoder.state_dict()
    for k, v in load_model(out).autoencoder.encoder.state_dict().items():
        assert torch.equal(v, enc_before[k]), k  # the latents stay as they are
    # ... and on the model's own samples (--decode-samples): the critic sees the sampled windows' decoded mouths
    out = train(dataclasses.replace(dec, run=tmp_path / "s", out=tmp_path / "sm", decode_samples=1.0))
    log = [json.loads(x) for x in (tmp_path / "s" / "log.jsonl").read_text().splitlines()]
    assert log[0]["critic"] > 1.5 and log[-1]["critic"] < 1.2 and all(np.isfinite(r["adv"]) for r in log)
    with pytest.raises(InputError, match="--adv-mouth-weight must be"):
        train(_cfg("transformer", synth_sync, init_dir, tmp_path / "r2", adv_mouth_weight=-1.0))


def test_prepared_shards_train_the_mouth_losses_on_the_box_their_framing_fixes(tmp_path, init_dir):
    """Real-video shards have no per-clip mouth box: every crop is framed the same around the detected face,
    so the mouth's place comes from that framing (the margin in index.json), and
    the mouth-weighted, decoded-mouth and adversarial terms train on it. The lip-sync loss needs per-frame
    mouth states, which only the synthetic corpus has."""
    from letstalk_rt.train.data import prepared_mouth_box
    from letstalk_rt.train.prepare import crop_mouth_box

    data = make_shards(tmp_path / "shards")  # an index.json without a margin: the default, 0.6
    box = prepared_mouth_box({}, SIZE)
    x, y, w, h = (round(v * SIZE) for v in crop_mouth_box(0.6))
    assert box == (x, y, w, h) and y > SIZE / 2 and x + w / 2 == pytest.approx(SIZE / 2, abs=1)  # low, centred
    assert all(c.mouth_box == box for c in open_dataset(data, SIZE, progress=False).clips)
    out = train(_cfg("transformer", data, init_dir, tmp_path / "r", out=tmp_path / "m", steps=3, warmup=1,
                     pixel_mouth_weight=1.0, adv_mouth_weight=0.5))
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert load_model(out) and all(np.isfinite(r["adv"]) and np.isfinite(r["critic"]) for r in log)
    index = json.loads((data / "index.json").read_text())
    (data / "index.json").write_text(json.dumps(dict(index, margin=0.3)))  # a tighter framing: a bigger mouth
    tight = open_dataset(data, SIZE, progress=False).clips[0].mouth_box
    assert tight == prepared_mouth_box({"margin": 0.3}, SIZE) and tight[2] > w and tight[3] > h


@pytest.mark.parametrize("extra", ["plain", "sync", "adv"], ids=["plain", "sync-loss", "adversarial"])
def test_exact_resume(tmp_path, init_dir, shards, synth_sync, extra, monkeypatch):
    kw = dict(steps=6, ema=0.9, ckpt_every=2, keep=2, log_every=4)  # stopped at 3: in the middle of a log row
    if extra == "sync":  # the mouth expert is fitted again on resume: it must come out the same
        shards, kw = synth_sync, dict(kw, sync_weight=0.5)
        monkeypatch.setattr("letstalk_rt.train.sync.FIT_STEPS", 300)  # (its 6 fits: a tenth of the default each)
    if extra == "adv":  # the critic and its optimizer come back from the checkpoint
        shards, kw = synth_sync, dict(kw, adv_mouth_weight=0.5)
    a = train(_cfg("transformer", shards, init_dir, tmp_path / "a", out=tmp_path / "out_a", **kw))
    if extra == "plain":  # stopped by a SIGTERM (`kill`, a preempted job) during step 3: the step ends, checkpointed
        from letstalk_rt.train.trainer import EMA

        update = EMA.update

        def signalled(self, module, step):
            update(self, module, step)
            if step == 2:
                signal.raise_signal(signal.SIGTERM)
                signal.raise_signal(signal.SIGTERM)  # repeated (torchrun passing it on): still that one checkpoint

        monkeypatch.setattr(EMA, "update", signalled)
        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises(Stopped, match=r"stopped at step 3 of 6: checkpoint .*step_0000003 written; .*--resume"):
            train(_cfg("transformer", shards, init_dir, tmp_path / "b", out=tmp_path / "out_b", **kw))
        monkeypatch.setattr(EMA, "update", update)
        assert signal.getsignal(signal.SIGTERM) is before  # the program's own handling back
    else:
        assert train(_cfg("transformer", shards, init_dir, tmp_path / "b", out=tmp_path / "out_b",
                          stop_after=3, **kw)) is None
    assert not (tmp_path / "out_b").exists()
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    with pytest.raises(InputError, match="--resume"):
        train(_cfg("transformer", shards, init_dir, tmp_path / "b", **kw))
    changed = dict(kw, seed=1, adv_mouth_weight=0.0)  # another recipe is not resumed: told what differs
    with pytest.raises(InputError, match=r"--seed 0 \(now 1\)") as err:
        train(_cfg("transformer", shards, init_dir, tmp_path / "b", resume=True, **changed))
    assert ("--adv-mouth-weight 0.5 (now 0.0)" in str(err.value)) == (extra == "adv")
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_0000002", "step_0000003"]
    other = tmp_path / "other_init"  # --init's weights changed since the run started: refused, not mixed in
    shutil.copytree(init_dir, other)
    ae = load_file(str(other / "autoencoder.safetensors"))
    save_file({k: v + 0.01 if k == next(iter(ae)) else v for k, v in ae.items()}, str(other / "autoencoder.safetensors"))
    with pytest.raises(InputError, match="not the model the run"):
        train(_cfg("transformer", shards, other, tmp_path / "b", resume=True, **kw))
    if extra == "plain":  # the latest checkpoint unreadable (a power cut mid-write): resumed from the one before
        (tmp_path / "b" / "checkpoints" / "step_0000003" / "trainer_state.pt").write_bytes(b"torn")
        with open(tmp_path / "b" / "log.jsonl", "a") as f:
            f.write('{"step": 3, "lo')  # and a log line torn by the kill
        for name in (".step_0000004.partial-999999999", f".step_0000004.partial-{os.getpid()}"):  # killed mid-write
            (tmp_path / "b" / "checkpoints" / name).mkdir()
            (tmp_path / "b" / "checkpoints" / name / "transformer.safetensors").write_bytes(b"half")
    b = train(_cfg("transformer", shards, init_dir, tmp_path / "b", out=tmp_path / "out_b", resume=True, **kw))
    # the killed runs' half-written checkpoints deleted (the PID of neither is another live process)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_0000004", "step_0000006"]
    for name in ("transformer", "audio_encoder", "audio_projector", "autoencoder"):
        wa, wb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    sa = torch.load(tmp_path / "a" / "checkpoints" / "step_0000006" / "trainer_state.pt", weights_only=False)
    sb = torch.load(tmp_path / "b" / "checkpoints" / "step_0000006" / "trainer_state.pt", weights_only=False)
    assert all(torch.equal(sa["module"][k], sb["module"][k]) for k in sa["module"])
    if extra == "adv":
        assert sa["extra"]["critic"].keys() == sb["extra"]["critic"].keys()
        assert all(torch.equal(sa["extra"]["critic"][k], sb["extra"]["critic"][k]) for k in sa["extra"]["critic"])
    la = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [4, 6]  # the same rows, the one across the resume too
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in la] == [(r["step"], r["loss"], r["grad_norm"]) for r in lb]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_ddp_two_ranks_match_one_process(tmp_path, init_dir):
    """2 gloo ranks reach one process's losses and gradients, on clips whose mouth boxes differ in size (the
    weighted losses' weight sums then differ between the ranks: each is divided by the whole batch's)."""
    data = make_synth(tmp_path / "synth", clips=6, frames=24)
    boxes = ([4, 24, 40, 20], [20, 30, 6, 6], [10, 26, 28, 14], [22, 32, 4, 4], [0, 16, 48, 30], [16, 28, 14, 10])
    for c, box in enumerate(boxes):  # 48 px frames; step 1's halves hold 288 and 528 of latent weight
        meta = json.loads((data / f"clip_{c:05d}.json").read_text())
        (data / f"clip_{c:05d}.json").write_text(json.dumps({**meta, "mouth_box": box}))
    args = ["--stage", "transformer", "--data", str(data), "--init", str(init_dir), "--steps", "3",
            "--batch", "4", "--lr", "1e-3", "--warmup", "1", "--log-every", "1", "--device", "cpu", "--quiet",
            "--mouth-weight", "8"]
    train(_cfg("transformer", data, init_dir, tmp_path / "one", steps=3, warmup=1, mouth_weight=8.0))  # + caches
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "letstalk_rt.train.trainer",
                           *args, "--run-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)
    np.testing.assert_allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rtol=1e-3)


def test_fsdp_on_a_torch_older_than_its_floor_is_refused_before_anything_runs(tmp_path, init_dir, shards,
                                                                             monkeypatch):
    """FSDP2 before torch 2.10 clips with another gradient norm than one process (2.7-2.9) or fails on the CPU (2.6):
    --fsdp there is refused in one line that names both ways out, and no run is started."""
    from letstalk_rt.train import trainer

    monkeypatch.setattr(trainer, "torch_version", lambda: (2, 9))
    with pytest.raises(InputError, match=r"--fsdp needs torch >= 2\.10 .*without --fsdp \(DDP\)"):
        train(_cfg("transformer", shards, init_dir, tmp_path / "old", fsdp=True))
    assert not (tmp_path / "old").exists()


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
@pytest.mark.skipif(torch_version() < FSDP_TORCH, reason=f"--fsdp needs torch >= {FSDP_TORCH}")
def test_fsdp_two_ranks_match_one_process_and_resume_exactly(tmp_path, init_dir, shards):
    """FSDP (parameters, gradients and AdamW state sharded over 2 gloo ranks) reaches the losses of one
    process; its checkpoints hold full tensors, and an interrupted FSDP run resumes to the same weights."""
    args = ["--stage", "transformer", "--data", str(shards), "--init", str(init_dir), "--steps", "3",
            "--batch", "4", "--lr", "1e-3", "--warmup", "1", "--log-every", "1", "--device", "cpu", "--quiet"]
    train(_cfg("transformer", shards, init_dir, tmp_path / "one", steps=3, warmup=1))  # also builds the caches
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))

    def torchrun(run: str, *extra: str) -> None:
        proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "letstalk_rt.train.trainer",
                               *args, "--fsdp", "--run-dir", str(tmp_path / run), *extra],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]

    torchrun("fsdp", "--out", str(tmp_path / "m_fsdp"))
    one = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "fsdp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in two] == [1, 2, 3]
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)
    np.testing.assert_allclose([r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rtol=1e-3)
    state = torch.load(tmp_path / "fsdp" / "checkpoints" / "step_0000003" / "trainer_state.pt", weights_only=False)
    ref = load_model(init_dir).transformer.state_dict()
    assert state["fsdp"] and all(state["module"][f"transformer.{k}"].shape == v.shape for k, v in ref.items())

    torchrun("cut", "--stop-after", "2")
    torchrun("cut", "--resume", "--out", str(tmp_path / "m_cut"))
    for name in ("transformer", "audio_projector"):
        wa, wb = (load_file(str(tmp_path / m / f"{name}.safetensors")) for m in ("m_fsdp", "m_cut"))
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(InputError, match="--fsdp"):  # a sharded run is resumed sharded
        train(_cfg("transformer", shards, init_dir, tmp_path / "cut", steps=4, resume=True))


def test_bad_inputs(tmp_path, init_dir, shards, capsys):
    with pytest.raises(InputError, match="does not exist"):
        train(_cfg("transformer", tmp_path / "nope", init_dir, tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither a synthetic corpus"):
        train(_cfg("transformer", tmp_path / "empty", init_dir, tmp_path / "run"))
    with pytest.raises(ModelError, match="not a model directory"):
        train(_cfg("transformer", shards, tmp_path / "empty", tmp_path / "run"))
    with pytest.raises(InputError, match="--split"):
        train(_cfg("autoencoder", _manifest_only(tmp_path), init_dir, tmp_path / "run", split="dev"))
    with pytest.raises(InputError, match="frames a training window needs"):
        short = make_shards(tmp_path / "short", clips=1, frames=3)
        train(_cfg("transformer", short, init_dir, tmp_path / "run"))
    with pytest.raises(ModelError, match="as many stages"):  # the latent grid must stay the same
        train(_cfg("decoder", shards, init_dir, tmp_path / "run", decoder_channels=(8, 16)))
    with pytest.raises(ModelError, match="to divide 4"):
        train(_cfg("decoder", shards, init_dir, tmp_path / "run", decoder_channels=(4, 32, 16)))
    for bad in (dict(seed=-1), dict(weight_decay=-0.1), dict(mouth_weight=-2.0), dict(stop_after=0)):
        with pytest.raises(InputError, match=f"--{next(iter(bad)).replace('_', '-')}"):
            train(_cfg("transformer", shards, init_dir, tmp_path / "run", **bad))
    # the CLI prints one line and exits 2
    code = cli_main(["train", "--stage", "autoencoder", "--data", str(tmp_path / "empty"), "--init", str(init_dir),
                     "--run", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("letstalk: error: --data")
    assert issubclass(InputError, LetsTalkError)


def _manifest_only(tmp_path: Path) -> Path:
    root = tmp_path / "manifest_only"
    root.mkdir(exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"splits": {"train": ["clip_00000"]}}))
    return root


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
