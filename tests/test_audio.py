"""Audio encoders and projector: frame counts, streaming == offline, bounded memory, honest lookahead."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from letstalk_rt.config import AudioConfig, model_preset
from letstalk_rt.errors import ModelError
from letstalk_rt.models.audio import (
    AudioProjector,
    MelAudioEncoder,
    Wav2Vec2AudioEncoder,
    build_audio_encoder,
)

SPF = 640


def speech_like(n: int, seed: int = 0) -> np.ndarray:
    """Seeded test signal: a gliding tone, noise bursts and a stretch of exact silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    x = 0.3 * np.sin(2 * np.pi * (150 + 400 * t) * t) + 0.05 * rng.standard_normal(n)
    x *= 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)  # syllable-rate envelope
    x[n // 3: n // 3 + 2000] = 0.0
    return x.astype(np.float32)


def stream_all(encoder, x: np.ndarray, sizes) -> torch.Tensor:
    """Push x in chunks of the given sizes (cycled), then flush; concatenated features (F, L, D)."""
    stream = encoder.stream()
    outs, pos, k = [], 0, 0
    while pos < len(x):
        n = sizes[k % len(sizes)]
        outs.append(stream.push(x[pos:pos + n]))
        pos, k = pos + n, k + 1
        assert stream.frames_emitted == sum(o.shape[0] for o in outs)
    outs.append(stream.flush())
    return torch.cat(outs)


@pytest.fixture(scope="module")
def tiny_audio() -> AudioConfig:
    return model_preset("tiny").audio


@pytest.fixture(scope="module")
def mel(tiny_audio) -> MelAudioEncoder:
    torch.manual_seed(0)
    enc = build_audio_encoder(tiny_audio).eval()
    assert isinstance(enc, MelAudioEncoder)
    return enc


# --------------------------------------------------------------------------------------------------
# Mel encoder
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 639, 640, 641, 1280, 5000, 16000])
def test_frame_count(mel, tiny_audio, n):
    x = torch.from_numpy(speech_like(max(n, 1))[:n])
    feats = mel(x[None].expand(2, -1))  # (2, F, L, D)
    F = -(-n // SPF)
    assert feats.shape == (2, F, tiny_audio.feature_layers, tiny_audio.feature_dim)
    assert mel.num_frames(n) == F
    s = mel.stream()
    got = torch.cat([s.push(x.numpy()), s.flush()])
    assert got.shape[0] == F == s.frames_emitted


def test_lookahead_ms_of_presets():
    assert MelAudioEncoder(model_preset("tiny").audio).lookahead_samples == 760  # 47.5 ms
    assert MelAudioEncoder(model_preset("cpu-128").audio).lookahead_ms == pytest.approx(47.5)


@pytest.mark.parametrize("sizes,n", [
    ([1], 3 * SPF + 200),
    ([17], 20 * SPF + 123),
    ([640], 20 * SPF + 123),
    ([10000], 40 * SPF + 5),
    ([0, 3, 700, 1, 2500, 640, 9999, 64], 40 * SPF + 5),
    ("random", 40 * SPF + 321),
])
def test_mel_stream_equals_offline(mel, sizes, n):
    x = speech_like(n, seed=1)
    if sizes == "random":
        sizes = [int(v) for v in np.random.default_rng(2).integers(0, 3000, size=64)]
    offline = mel(torch.from_numpy(x)[None])[0]  # (F, L, D)
    streamed = stream_all(mel, x, sizes)
    assert streamed.shape == offline.shape
    torch.testing.assert_close(streamed, offline, atol=1e-5, rtol=1e-5)


def test_mel_stream_accepts_tensors_and_finishes(mel):
    x = speech_like(5 * SPF)
    s = mel.stream()
    a = s.push(torch.from_numpy(x))  # a tensor chunk is fine
    b = s.flush()
    torch.testing.assert_close(torch.cat([a, b]), mel(torch.from_numpy(x)[None])[0], atol=1e-5, rtol=1e-5)
    assert s.flush().shape[0] == 0
    with pytest.raises(RuntimeError, match="new stream"):
        s.push(x)
    with pytest.raises(ValueError):
        mel.stream().push(np.zeros((2, 10), np.float32))


def test_mel_stream_memory_is_bounded(mel):
    chunk = 1000
    x = speech_like(16000, seed=3)
    s = mel.stream()
    peak, frames = 0, 0
    for k in range(60 * 16):  # 60 s of audio
        frames += s.push(x[(k * chunk) % 15000:(k * chunk) % 15000 + chunk]).shape[0]
        peak = max(peak, s.buffered_samples)
    assert peak <= mel.window_samples + chunk  # 2800 + 1000, after 960000 samples
    assert frames == s.frames_emitted >= (60 * 16000 - mel.lookahead_samples) // SPF


def test_mel_lookahead_is_honest(mel):
    i = 10
    x = speech_like(30 * SPF, seed=4)
    base = mel(torch.from_numpy(x)[None])[0]  # (F, L, D)
    end = SPF * (i + 1) + mel.lookahead_samples  # first sample frame i may not depend on

    later = x.copy()
    later[end:] = np.random.default_rng(5).standard_normal(len(x) - end).astype(np.float32)
    torch.testing.assert_close(mel(torch.from_numpy(later)[None])[0, :i + 1], base[:i + 1], atol=0, rtol=0)

    last = x.copy()
    last[end - 80: end - 60] += 0.5  # the end of the lookahead does matter (Hann tapers the last samples)
    assert not torch.allclose(mel(torch.from_numpy(last)[None])[0, i], base[i])

    inside = x.copy()
    inside[SPF * i + 300] += 0.5  # a sample of frame i itself
    assert not torch.allclose(mel(torch.from_numpy(inside)[None])[0, i], base[i])

    s = mel.stream()  # and the stream emits frame i exactly when that many samples are in
    assert s.push(x[:end - 1]).shape[0] == i
    assert s.push(x[end - 1:end]).shape[0] == 1


def test_mel_weights_roundtrip(mel, tiny_audio):
    state = mel.state_dict()
    assert not any("log_mel" in k for k in state)  # filterbank and window are derived, not stored
    other = MelAudioEncoder(tiny_audio).eval()
    other.load_state_dict(state)
    x = torch.from_numpy(speech_like(4000))[None]
    torch.testing.assert_close(other(x), mel(x))


def test_mel_bad_hop_is_model_error(tiny_audio):
    with pytest.raises(ModelError, match="hop_length"):
        MelAudioEncoder(dataclasses.replace(tiny_audio, hop_length=300))


# --------------------------------------------------------------------------------------------------
# Projector
# --------------------------------------------------------------------------------------------------


def test_projector_shapes_and_padding(tiny_audio):
    torch.manual_seed(0)
    proj = AudioProjector(tiny_audio).eval()
    m, L, D = tiny_audio.margin, tiny_audio.feature_layers, tiny_audio.feature_dim
    M, Dt = tiny_audio.num_tokens, tiny_audio.token_dim
    feats = torch.randn(2, 9, L, D, generator=torch.Generator().manual_seed(0))
    assert proj(feats).shape == (2, 9, M, Dt)
    assert proj(feats, pad_left=False).shape == (2, 9 - m, M, Dt)
    assert proj(feats, pad_right=False).shape == (2, 9 - m, M, Dt)
    assert proj(feats, pad_left=False, pad_right=False).shape == (2, 9 - 2 * m, M, Dt)
    assert proj(feats[:, :2 * m], pad_left=False, pad_right=False).shape == (2, 0, M, Dt)
    assert proj(feats[:, :0]).shape == (2, 0, M, Dt)
    assert proj(feats[:, :1]).shape == (2, 1, M, Dt)

    manual = torch.cat([feats[:, :1].repeat(1, m, 1, 1), feats, feats[:, -1:].repeat(1, m, 1, 1)], dim=1)
    torch.testing.assert_close(proj(feats), proj(manual, pad_left=False, pad_right=False))
    left_only = torch.cat([feats[:, :1].repeat(1, m, 1, 1), feats], dim=1)
    torch.testing.assert_close(proj(feats, pad_right=False), proj(left_only, pad_left=False, pad_right=False))


# --------------------------------------------------------------------------------------------------
# wav2vec2 (a tiny randomly initialised checkpoint saved to disk)
# --------------------------------------------------------------------------------------------------


def w2v_config(path, **kw) -> AudioConfig:
    base = {"encoder": "wav2vec2", "wav2vec2_path": None if path is None else str(path), "feature_layers": 2,
            "feature_dim": 32, "wav2vec2_chunk_seconds": 0.4, "wav2vec2_context_seconds": 0.2}
    return AudioConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def w2v(w2v_dir) -> Wav2Vec2AudioEncoder:
    enc = build_audio_encoder(w2v_config(w2v_dir))
    assert isinstance(enc, Wav2Vec2AudioEncoder)
    return enc


def test_wav2vec2_shape_and_frozen(w2v):
    assert (w2v.block_frames, w2v.left_samples, w2v.right_samples) == (10, 3200, 80)
    assert w2v.lookahead_samples == 9 * SPF + 80
    x = torch.from_numpy(speech_like(7 * SPF + 100))
    feats = w2v(torch.stack([x, -x]))
    assert feats.shape == (2, 8, 2, 32)
    assert not any(p.requires_grad for p in w2v.parameters())
    w2v.train()
    assert not w2v.model.training
    w2v.eval()


def test_wav2vec2_stream_equals_offline(w2v):
    x = speech_like(3 * 16000 + 777, seed=6)
    offline = w2v(torch.from_numpy(x)[None])[0]  # (F, 2, 32)
    assert offline.shape[0] == -(-len(x) // SPF)
    for sizes in ([320], [4999], [int(v) for v in np.random.default_rng(7).integers(0, 9000, size=32)]):
        torch.testing.assert_close(stream_all(w2v, x, sizes), offline, atol=1e-5, rtol=1e-5)


def test_wav2vec2_in_one_frame_chunks_streams_with_80_samples_of_lookahead(w2v_dir):
    """The letstalk-* presets' live setting: wav2vec2 once per video frame (with its left context), so a
    frame is final 80 samples (the conv front end's spill-over) after it ends, and still equals offline."""
    enc = build_audio_encoder(w2v_config(w2v_dir, wav2vec2_chunk_seconds=0.04))
    assert (enc.block_frames, enc.lookahead_samples) == (1, 80)
    assert enc.max_blocks_per_call > 8  # ~24 s of audio per call, as with longer chunks
    x = speech_like(2 * 16000 + 321, seed=9)
    offline = enc(torch.from_numpy(x)[None])[0]
    torch.testing.assert_close(stream_all(enc, x, [320]), offline, atol=1e-5, rtol=1e-5)
    assert model_preset("letstalk-b").audio.wav2vec2_chunk_seconds == 0.04


def test_wav2vec2_lookahead_is_honest(w2v):
    i = 12  # second frame of the second chunk
    x = speech_like(40 * SPF, seed=8)
    base = w2v(torch.from_numpy(x)[None])[0]
    end = SPF * (i + 1) + w2v.lookahead_samples
    later = x.copy()
    later[end:] = 0.0
    torch.testing.assert_close(w2v(torch.from_numpy(later)[None])[0, :i + 1], base[:i + 1], atol=1e-6, rtol=1e-6)
    inside = x.copy()
    inside[SPF * i: SPF * (i + 1)] = 0.0
    assert not torch.allclose(w2v(torch.from_numpy(inside)[None])[0, i], base[i])


def test_a_model_remembers_which_wav2vec2_checkpoint_it_was_made_on(w2v_dir):
    """audio.wav2vec2_digest (recorded by `new-model --wav2vec2`): the same checkpoint loads, another one of the
    same size at the path is refused instead of giving silently different features."""
    from letstalk_rt.checkpoint import weights_digest

    digest = weights_digest(build_audio_encoder(w2v_config(w2v_dir)).model)
    assert weights_digest(build_audio_encoder(w2v_config(w2v_dir, wav2vec2_digest=digest)).model) == digest
    with pytest.raises(ModelError, match="not the one this model was made with"):
        build_audio_encoder(w2v_config(w2v_dir, wav2vec2_digest="0" * 16))


def test_wav2vec2_loading_errors(w2v_dir, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelError, match="nowhere.*does not exist"):
        build_audio_encoder(w2v_config(missing))
    with pytest.raises(ModelError, match="wav2vec2_path"):
        build_audio_encoder(w2v_config(None))
    no_weights = tmp_path / "config-only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((w2v_dir / "config.json").read_text())
    with pytest.raises(ModelError, match="config-only.*expected"):
        build_audio_encoder(w2v_config(no_weights))
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match="'bert'"):
        build_audio_encoder(w2v_config(other))
    with pytest.raises(ModelError, match="feature_layers=2 and audio.feature_dim=32"):
        build_audio_encoder(w2v_config(w2v_dir, feature_layers=12, feature_dim=768))
    # a checkpoint missing a layer's weights: transformers would fill them at random and only log it
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(w2v_dir, partial)
    weights = next(partial.glob("*.safetensors"))
    state = load_file(str(weights))
    save_file({k: v for k, v in state.items() if ".layers.1." not in k}, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="partial.*lacks weights"):
        build_audio_encoder(w2v_config(partial))
