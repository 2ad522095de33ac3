"""Checkpoints and window-by-window generation on the tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import speechlike
from letstalk_rt.checkpoint import load_model, save_model
from letstalk_rt.errors import InputError, ModelError
from letstalk_rt.pipeline import LetsTalkPipeline, SpeechLevel, encode_together


def test_checkpoint_round_trip_gives_identical_weights(tiny_model_dir, tmp_path):
    comps = load_model(tiny_model_dir)
    save_model(comps, tmp_path / "copy")
    again = load_model(tmp_path / "copy")
    for name, module in comps.modules().items():
        a, b = module.state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["trained"] is False


def test_broken_model_directories_raise_model_error(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(ModelError, match="config.json is missing"):
        load_model(broken)
    (broken / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelError, match="incomplete"):
        load_model(broken)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["transformer"]["colour"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="colour"):
        load_model(broken)
    # weights that do not fit the config: a different depth
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["transformer"]["hidden_size"] = 96
    cfg["transformer"]["num_heads"] = 3
    bad = tmp_path / "mismatch"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    for f in tiny_model_dir.glob("*.safetensors"):
        (bad / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelError, match="does not fit"):
        load_model(bad)


def test_incremental_tokens_equal_offline(tiny_pipeline):
    wav = speechlike(1.37)
    offline = tiny_pipeline.audio_tokens(wav)  # (F, M, Dt)
    assert offline.shape[0] == math.ceil(len(wav) / 640)
    rng = np.random.default_rng(0)
    tok = tiny_pipeline.audio_tokenizer()
    tok.level = SpeechLevel(0.0, 0.0)  # the encoder path alone (the level raising has its own tests below)
    parts, pos = [], 0
    while pos < len(wav):
        n = int(rng.integers(1, 3000))
        parts.append(tok.push(wav[pos:pos + n]))
        pos += n
    parts.append(tok.flush())
    online = torch.cat(parts)
    assert online.shape == offline.shape
    torch.testing.assert_close(online, offline, atol=1e-4, rtol=1e-4)
    assert tok.lookahead_ms >= 80  # margin of 2 frames at least


@pytest.mark.parametrize("lookahead", [1, 0])
def test_less_audio_lookahead_makes_each_frames_tokens_sooner_from_copies_of_its_newest_features(tiny_model_dir,
                                                                                                 lookahead):
    """`audio_lookahead` F < margin (2): frame i's tokens come once the features of i+F are in, 40 ms sooner per
    frame left out, made as the projector makes them from frames i-2..i+2 with i+F+1..i+2 copies of i+F; at the end
    of the audio (flush) the frames left get all the features there are, as before, so as many tokens in all."""
    from letstalk_rt.pipeline import LetsTalkPipeline

    full = LetsTalkPipeline.from_pretrained(tiny_model_dir, traced=False)
    pipe = LetsTalkPipeline.from_pretrained(tiny_model_dir, traced=False, audio_lookahead=lookahead)
    m, spf = pipe.config.audio.margin, pipe.samples_per_frame
    assert pipe.audio_tokenizer().lookahead_ms == pytest.approx(full.audio_tokenizer().lookahead_ms
                                                                - (m - lookahead) * 1000 * spf / 16000)
    wav = speechlike(1.37)

    def tokens_as_pushed(p):
        tok = p.audio_tokenizer()
        tok.level = SpeechLevel(0.0, 0.0)  # the encoder path alone
        parts, first = [], None
        for pos in range(0, len(wav), 160):
            parts.append(tok.push(wav[pos:pos + 160]))
            if first is None and tok.frames_out:
                first = pos + 160
        before_flush = tok.frames_out
        parts.append(tok.flush())
        return torch.cat(parts), first, before_flush

    got, first, before_flush = tokens_as_pushed(pipe)
    feats = pipe.audio_encoder(torch.as_tensor(wav)[None])[0]  # (F, L, D)
    n = feats.shape[0]
    rows = torch.cat([feats[:1].expand(m, -1, -1), feats, feats[-1:].expand(m, -1, -1)])  # the start and end copied
    expected = []
    for i in range(n):
        ctx = rows[i:i + 2 * m + 1].clone()  # frames i-m..i+m
        if i < before_flush:  # made while the audio came: the newest feature in was i+F's
            ctx[m + lookahead + 1:] = rows[m + i + lookahead]
        expected.append(pipe.project_audio(ctx, pad_left=False, pad_right=False))
    assert got.shape[0] == n == math.ceil(len(wav) / spf) and 0 < before_flush < n
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-4, rtol=1e-4)
    _, first_full, _ = tokens_as_pushed(full)
    assert first_full - first == (m - lookahead) * spf  # the first frame's tokens (m - F) frames of audio sooner
    with pytest.raises(InputError, match="audio lookahead 3: choose 0..2"):
        LetsTalkPipeline.from_pretrained(tiny_model_dir, audio_lookahead=3)


def test_a_models_live_audio_lookahead_is_the_live_engines_and_not_offline_generations(tiny_model_dir, tmp_path):
    """sampling.live_audio_lookahead: the live engine's tokenizers wait for that many frames of audio (each frame 40
    ms of latency), offline generation for the model's audio_lookahead (default: all of the margin); a lookahead given
    to the pipeline is both; a config past the margin fails to load, naming the field."""
    from letstalk_rt.pipeline import LetsTalkPipeline
    from letstalk_rt.stream import StreamEngine

    comps = load_model(tiny_model_dir)
    comps.config.sampling.live_audio_lookahead = 1
    model = save_model(comps, tmp_path / "live1")
    pipe = LetsTalkPipeline.from_pretrained(model, traced=False)
    frame_ms = 1000 * pipe.samples_per_frame / 16000
    assert (pipe.audio_lookahead, pipe.live_audio_lookahead) == (2, 1)
    offline, live = pipe.audio_tokenizer().lookahead_ms, pipe.audio_tokenizer(live=True).lookahead_ms
    assert offline - live == pytest.approx(frame_ms)
    assert StreamEngine(pipe)._lookahead_s == pytest.approx(live / 1000)
    given = LetsTalkPipeline.from_pretrained(model, traced=False, audio_lookahead=2)
    assert (given.audio_lookahead, given.live_audio_lookahead) == (2, 2)
    comps.config.sampling.live_audio_lookahead = 3
    with pytest.raises(ModelError, match="sampling.live_audio_lookahead=3: choose 0..2"):
        load_model(save_model(comps, tmp_path / "live3"))


def test_many_streams_encoded_in_one_call_equal_each_encoded_alone(tiny_pipeline, monkeypatch):
    """The engine encodes every session's new audio in one encoder call (encode_together): each stream's
    tokens are its own offline tokens, in order, and defer() counts exactly the tokens complete() makes."""
    wavs = [speechlike(1.0 + 0.3 * i, seed=10 + i) for i in range(3)]
    offline = [tiny_pipeline.audio_tokens(w) for w in wavs]
    toks = [tiny_pipeline.audio_tokenizer() for _ in wavs]
    for t in toks:
        t.level = SpeechLevel(0.0, 0.0)
    enc = tiny_pipeline.audio_encoder
    calls = []
    real = enc._encode_windows
    monkeypatch.setattr(enc, "_encode_windows", lambda w: calls.append(w.shape[0]) or real(w))
    rng = np.random.default_rng(1)
    pos, out = [0] * 3, [[] for _ in wavs]
    while any(p < len(w) for p, w in zip(pos, wavs)):
        owed = []
        for i, (t, w) in enumerate(zip(toks, wavs)):  # each stream pushed in its own chunk sizes
            n = int(rng.integers(100, 2500))
            owed.append(t.defer(w[pos[i]:pos[i] + n]))
            pos[i] += n
        before = len(calls)
        made = encode_together(toks)
        assert len(calls) - before <= 1  # one call for all of them (none when no window completed)
        assert [m.shape[0] for m in made] == owed
        for o, m in zip(out, made):
            o.append(m)
    assert max(calls) > 1
    for o, t, ref in zip(out, toks, offline):
        online = torch.cat([*o, t.flush()])
        assert online.shape == ref.shape
        torch.testing.assert_close(online, ref, atol=1e-4, rtol=1e-4)


def _voiced_level(pcm: np.ndarray, block: int = 320, floor: float = 0.002) -> float:
    rms = np.sqrt(np.mean(pcm[: len(pcm) // block * block].reshape(-1, block) ** 2, axis=1))
    return float(np.sqrt(np.mean(rms[rms > max(floor, rms.max() / 3)] ** 2)))


def test_speech_level_scales_quiet_and_loud_speech_into_the_trained_range_and_leaves_the_rest():
    wav = speechlike(3.0)
    assert 0.05 <= _voiced_level(wav) <= 0.4  # the test voice is inside the range: untouched
    level = SpeechLevel(0.05, 0.4)
    np.testing.assert_array_equal(np.concatenate([level(wav[i:i + 320]) for i in range(0, len(wav), 320)]), wav)
    for scale, expect in ((0.04, 0.05), (4.0, 0.4)):  # 28 dB quieter (a far microphone); 12 dB louder
        level = SpeechLevel(0.05, 0.4)
        x = (wav * scale).astype(np.float32)
        out = np.concatenate([level(x[i:i + 320]) for i in range(0, len(x), 320)])
        assert abs(_voiced_level(out[8000:]) / expect - 1) < 0.25, (scale, _voiced_level(out[8000:]))
    silence = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.001  # below the floor
    np.testing.assert_array_equal(SpeechLevel(0.05, 0.2)(silence), silence)
    level, x = SpeechLevel(0.05, 0.2, max_gain=2.0), (wav * 0.04).astype(np.float32)  # would need ~7x
    assert _voiced_level(level(x)) <= 2.0 * _voiced_level(x) * 1.001  # gain capped
    off = SpeechLevel(0.0, 0.0)
    np.testing.assert_array_equal(off(wav * 0.02), wav * 0.02)


def test_a_corpus_level_is_its_loud_end_measured_as_live_speech_is():
    """corpus_level_min (what training writes to audio.level_min) scales with the corpus's loudness, is its
    loud end (80th percentile), measures a clip as SpeechLevel tracks live speech, and ignores silence."""
    from letstalk_rt.pipeline import corpus_level_min, speech_level

    wav = speechlike(3.0)
    one = speech_level(wav)
    assert one is not None and abs(one / _voiced_level(wav) - 1) < 0.3
    assert abs(speech_level(wav * 0.25) / one - 0.25) < 1e-3  # proportional: a level, not a threshold count
    quiet = np.random.default_rng(0).standard_normal(48000).astype(np.float32) * 0.001  # under the floor
    assert speech_level(quiet) is None and corpus_level_min([quiet]) is None
    clips = [wav * g for g in (0.1, 0.2, 0.3, 0.4, 0.5)] + [quiet]
    assert abs(corpus_level_min(clips) / one - 0.42) < 1e-3  # np.percentile(0.1..0.5, 80) = 0.42


def test_quiet_speech_is_encoded_about_as_speech_at_the_trained_loudness(tiny_pipeline):
    """Live input comes at any level; the tokenizer scales it into the model's range first, so a quiet
    microphone conditions the model nearly as a normal one does, where unscaled it would not."""
    wav = speechlike(2.0, seed=4)
    quiet = (wav * 0.04).astype(np.float32)
    gain = min(16.0, tiny_pipeline.config.audio.level_min / _voiced_level(quiet))  # SpeechLevel's cap: 16
    at_edge = tiny_pipeline.audio_tokens(quiet * gain)  # what the raising aims at
    tok = tiny_pipeline.audio_tokenizer()
    live = torch.cat([*(tok.push(quiet[i:i + 320]) for i in range(0, len(quiet), 320)), tok.flush()])
    raw = tiny_pipeline.audio_tokens(quiet)
    skip = 10  # the level is known after the first voiced block; skip the frames around it
    err_live = (live[skip:] - at_edge[skip:]).abs().mean().item()
    err_raw = (raw[skip:] - at_edge[skip:]).abs().mean().item()
    assert err_live < 0.3 * err_raw, (err_live, err_raw)


@pytest.mark.parametrize("seconds", [0.04, 0.5, 1.0, 1.33])
def test_offline_frame_count_is_exact(tiny_pipeline, seconds):
    portrait = tiny_pipeline.prepare_portrait(np.full((64, 64, 3), 128, np.uint8), detect=False)
    wav = speechlike(seconds)
    frames = list(tiny_pipeline.generate(portrait, wav, seed=0))
    assert len(frames) == math.ceil(len(wav) / 640)
    assert frames[0].shape == (32, 32, 3) and frames[0].dtype == np.uint8


def test_generation_is_deterministic_and_depends_on_seed_audio_and_portrait(tiny_pipeline):
    rng = np.random.default_rng(1)
    img_a = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    img_b = np.ascontiguousarray(img_a[::-1])
    pa = tiny_pipeline.prepare_portrait(img_a, detect=False)
    pb = tiny_pipeline.prepare_portrait(img_b, detect=False)
    wav = speechlike(0.6)
    run = lambda p, w, s: np.stack(list(tiny_pipeline.generate(p, w, seed=s)))  # noqa: E731
    base = run(pa, wav, 0)
    assert np.array_equal(base, run(pa, wav, 0))
    assert not np.array_equal(base, run(pa, wav, 1))
    assert not np.array_equal(base, run(pb, wav, 0))
    assert not np.array_equal(base, run(pa, speechlike(0.6, seed=5) * 3, 0))
    as_int16 = run(pa, np.round(wav * 32767).astype(np.int16), 0)  # int16: the same speech (was read as 32767x)
    assert np.abs(base.astype(int) - as_int16).mean() < 0.5, np.abs(base.astype(int) - as_int16).mean()
    for bad, said in ((np.where(np.arange(len(wav)) == 9000, np.nan, wav), "NaN"), (wav * 32768, "divide them by"),
                      (np.stack([wav, wav], 1), "shaped")):
        with pytest.raises(InputError, match=said):  # before any frame: a NaN blacked out every frame after it
            next(tiny_pipeline.generate(pa, bad))


def test_a_grey_rgba_or_pil_portrait_is_read_as_load_image_reads_its_file(tiny_pipeline):
    """What a program holds a photo as (grey, RGBA, a PIL image) is prepared as the same photo made RGB (transparency
    on white); an array that is no picture is refused saying what it looks like instead."""
    from PIL import Image

    rng = np.random.default_rng(3)
    grey = rng.integers(0, 255, (40, 40), dtype=np.uint8)
    rgba = np.dstack([rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), rng.integers(0, 255, (40, 40), np.uint8)])
    on_white = np.round(rgba[..., :3] * (rgba[..., 3:] / 255) + 255 * (1 - rgba[..., 3:] / 255))

    def crop(image):
        return tiny_pipeline.prepare_portrait(image, detect=False).image.astype(int)

    for given, seen in ((grey, np.repeat(grey[..., None], 3, 2)), (grey[..., None], np.repeat(grey[..., None], 3, 2)),
                        (Image.fromarray(grey), np.repeat(grey[..., None], 3, 2)),
                        (rgba, on_white.astype(np.uint8)), (Image.fromarray(rgba), on_white.astype(np.uint8))):
        assert np.abs(crop(given) - crop(seen)).max() <= 1
    for bad, said in ((grey / 255.0, "floats in 0..1"), (rgba[..., :3].transpose(2, 0, 1), "channels first")):
        with pytest.raises(InputError, match=said):
            tiny_pipeline.prepare_portrait(bad, detect=False)


def test_batched_streams_match_solo_streams(tiny_pipeline):
    """Sessions batched into one forward pass get the frames they would get alone (no bleeding)."""
    rng = np.random.default_rng(2)
    portraits = [tiny_pipeline.prepare_portrait(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), detect=False)
                 for _ in range(3)]
    T = tiny_pipeline.window
    tokens = [tiny_pipeline.audio_tokens(speechlike(T / 25, seed=i))[:T] for i in range(3)]
    solo = []
    for i, p in enumerate(portraits):
        s = tiny_pipeline.new_stream(p, seed=i)
        solo.append([tiny_pipeline.generate_windows([s], [tokens[i]])[0] for _ in range(2)])
    streams = [tiny_pipeline.new_stream(p, seed=i) for i, p in enumerate(portraits)]
    batched = [tiny_pipeline.generate_windows(streams, tokens) for _ in range(2)]
    for w in range(2):
        for i in range(3):
            diff = np.abs(batched[w][i].astype(int) - solo[i][w].astype(int))
            assert diff.max() <= 1  # equal up to float summation order


def test_a_window_that_comes_out_nan_shows_the_portrait_and_leaves_the_memory_clean(tiny_pipeline, monkeypatch):
    """A half-precision overflow makes one stream's window NaN: it shows its portrait for that window, its next
    window is drawn again (its memory bank once carried the NaN into every later window: black for good), and the
    stream batched beside it is untouched."""
    pipe = tiny_pipeline
    rng = np.random.default_rng(4)
    portraits = [pipe.prepare_portrait(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8), detect=False)
                 for _ in range(2)]
    T = pipe.window
    tokens = [pipe.audio_tokens(speechlike(T / 25, seed=i))[:T] for i in range(2)]
    clean = [pipe.new_stream(p, 0) for p in portraits]
    ref = [pipe.generate_windows(clean, tokens) for _ in range(2)]
    streams = [pipe.new_stream(p, 0) for p in portraits]
    step = pipe.sampler.step
    monkeypatch.setattr(pipe.sampler, "step", lambda v, t, x: step(v, t, x).index_fill(0, torch.tensor([0]), np.nan))
    first = pipe.generate_windows(streams, tokens)
    monkeypatch.undo()
    second = pipe.generate_windows(streams, tokens)
    assert [s.non_finite_windows for s in streams] == [1, 0]
    np.testing.assert_array_equal(first[1], ref[0][1])  # the stream beside it: as it was
    assert np.abs(first[0].astype(int) - first[0][:1]).max() <= 2 and first[0].mean() > 20  # a still, not black
    assert second[0].mean() > 20 and np.abs(second[0].astype(int) - ref[1][0]).mean() < 40  # drawn again
    np.testing.assert_array_equal(second[1], ref[1][1])


def test_memory_bank_carries_between_windows(tiny_pipeline):
    """The second window differs when the first window was different (continuity through memory)."""
    p = tiny_pipeline.prepare_portrait(np.full((40, 40, 3), 90, np.uint8), detect=False)
    T = tiny_pipeline.window
    tok = tiny_pipeline.audio_tokens(speechlike(2 * T / 25))
    a = tiny_pipeline.new_stream(p, seed=0)
    b = tiny_pipeline.new_stream(p, seed=0)
    tiny_pipeline.generate_windows([a], [tok[:T]])
    tiny_pipeline.generate_windows([b], [tok[:T] * 0])  # different first window
    b.generator.manual_seed(0); a.generator.manual_seed(0)  # same noise for the second window
    wa = tiny_pipeline.generate_windows([a], [tok[T:2 * T]])[0]
    wb = tiny_pipeline.generate_windows([b], [tok[T:2 * T]])[0]
    assert not np.array_equal(wa, wb)
    a.memory.reset(); b.memory.reset()
    a.generator.manual_seed(0); b.generator.manual_seed(0)
    assert np.array_equal(tiny_pipeline.generate_windows([a], [tok[T:2 * T]])[0],
                          tiny_pipeline.generate_windows([b], [tok[T:2 * T]])[0])


def test_the_portrait_anchor_conditions_the_first_window_and_memory_off_drops_it(tiny_model_dir):
    from letstalk_rt.pipeline import LetsTalkPipeline

    on = LetsTalkPipeline.from_pretrained(tiny_model_dir)
    off = LetsTalkPipeline.from_pretrained(tiny_model_dir, memory_anchor=False)
    ablation = LetsTalkPipeline.from_pretrained(tiny_model_dir, use_memory=False)
    assert on.memory_anchor and ablation.new_stream(_flat(on), 0).memory.anchor is None
    tok = on.audio_tokens(speechlike(on.window / 25))
    first = [p.generate_windows([p.new_stream(_flat(p), seed=0)], [tok])[0] for p in (on, off, ablation)]
    assert not np.array_equal(first[0], first[1])  # the anchor reaches the network
    np.testing.assert_array_equal(first[1], first[2])  # memory off = no anchor, no carried frames


def test_audio_guidance_in_the_mouth_box_leaves_the_rest_of_the_face_unguided(tiny_model_dir):
    """sampling.audio_guidance_box: audio guidance acts on the box's latent cells only. Outside them a window
    is what unguided sampling gives; inside it is the guided window (the same seed and audio)."""
    import dataclasses

    from letstalk_rt.memory import box_cells

    def pipe(box, scale):
        comps = load_model(tiny_model_dir)
        comps.config.sampling = dataclasses.replace(comps.config.sampling, audio_guidance_box=box)
        return LetsTalkPipeline(comps, num_steps=1, audio_guidance=scale)  # one step: the cells outside see the same input

    box = (0.25, 0.5, 0.5, 0.5)
    plain, everywhere, boxed = pipe(None, 1.0), pipe(None, 3.0), pipe(box, 3.0)
    tok = plain.audio_tokens(speechlike(plain.window / 25))
    out = [p.generate_latents([p.new_stream(_flat(p), seed=0)], [tok])[0] for p in (plain, everywhere, boxed)]
    h = out[0].shape[-1]
    inside = box_cells(h, h, box) > 0  # (h, w)
    assert 0 < inside.sum() < h * h
    torch.testing.assert_close(out[2][..., ~inside], out[0][..., ~inside], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[2][..., inside], out[1][..., inside], rtol=1e-4, atol=1e-4)
    assert (out[1] - out[0])[..., inside].abs().mean() > 1e-2  # the guidance does act there
    # the box as a setting of the pipeline (--audio-guidance-box) over the model's own: a box, or "all" over one
    given = LetsTalkPipeline(load_model(tiny_model_dir), num_steps=1, audio_guidance=3.0, audio_guidance_box=box)
    unboxed = LetsTalkPipeline(pipe(box, 3.0).components, num_steps=1, audio_guidance=3.0, audio_guidance_box="all")
    assert (given.audio_guidance_box, unboxed.audio_guidance_box) == (box, None)
    for p, want in ((given, out[2]), (unboxed, out[1])):
        torch.testing.assert_close(p.generate_latents([p.new_stream(_flat(p), seed=0)], [tok])[0], want)
    with pytest.raises(InputError, match="audio guidance box"):
        LetsTalkPipeline(load_model(tiny_model_dir), audio_guidance_box=(0.5, 0.5, 0.6, 0.2))
    comps = load_model(tiny_model_dir)  # a config.json with a box outside the crop fails to load, naming it
    comps.config.sampling = dataclasses.replace(comps.config.sampling, noise_hold_box=(0.9, 0.5, 0.3, 0.2))
    with pytest.raises(ModelError, match="sampling.noise_hold_box"):
        comps.config.validate()


def test_held_noise_keeps_the_face_outside_the_mouth_box_and_leaves_the_mouth_fresh(tiny_model_dir):
    """sampling.noise_hold: outside noise_hold_box each frame's starting noise is the previous frame's times hold
    plus fresh noise, across windows too (hold 1: one field for the whole stream), so a still face is drawn alike
    frame after frame, while the box's cells get fresh noise; hold 0 (the default) is plain fresh noise, the
    generator's draws unchanged."""
    import dataclasses

    from letstalk_rt.memory import box_cells

    def pipe(hold, box=(0.25, 0.5, 0.5, 0.5)):
        comps = load_model(tiny_model_dir)
        comps.config.sampling = dataclasses.replace(comps.config.sampling, noise_hold=hold, noise_hold_box=box)
        comps.config.validate()  # as loading a config.json does
        return LetsTalkPipeline(comps, num_steps=1)

    fresh, held = pipe(0.0), pipe(1.0)
    por = _flat(fresh)
    T, shape = fresh.window, (fresh.config.transformer.latent_channels,) + (fresh.config.transformer.latent_size,) * 2
    s0, s1 = fresh.new_stream(por, seed=0), held.new_stream(por, seed=0)
    plain = torch.randn((T, *shape), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fresh._start_noise(s0, T, shape), plain, atol=0, rtol=0)
    a, b = held._start_noise(s1, T, shape), held._start_noise(s1, T, shape)  # two windows of one stream
    mouth = box_cells(shape[1], shape[2], (0.25, 0.5, 0.5, 0.5)) > 0
    assert 0 < mouth.sum() < mouth.numel()
    torch.testing.assert_close(a, plain[:1].expand_as(a) * ~mouth + plain * mouth, atol=0, rtol=0)  # the same draws
    for n in (a[1:], b):  # outside the box: the first frame's noise again, in every later frame and window
        torch.testing.assert_close(n[..., ~mouth], a[:1, ..., ~mouth].expand_as(n[..., ~mouth]), atol=0, rtol=0)
    assert (a[1:] - a[:1])[..., mouth].abs().min() > 0 and (b - a)[..., mouth].abs().mean() > 0.5
    part = pipe(0.6)._start_noise(fresh.new_stream(por, seed=3), 400, shape)[..., ~mouth].flatten(1)  # (400, n)
    assert abs(float(part.std()) - 1) < 0.05  # unit variance kept
    c = torch.corrcoef(part)  # frames' noise against each other, over the cells
    lag1, lag2 = c.diagonal(1).mean(), c.diagonal(2).mean()
    assert abs(float(lag1) - 0.6) < 0.1 and abs(float(lag2) - 0.36) < 0.1, (lag1, lag2)  # hold ** k apart
    lat = held.generate_latents([held.new_stream(por, seed=0)], [held.audio_tokens(speechlike(T / 25))])[0]
    gen = fresh.generate_latents([fresh.new_stream(por, seed=0)], [fresh.audio_tokens(speechlike(T / 25))])[0]
    flick = lambda x: float((x[1:] - x[:-1])[..., ~mouth].abs().mean())  # noqa: E731
    assert flick(lat) < 0.5 * flick(gen)  # the face outside the mouth changes far less from frame to frame
    whole = pipe(1.0, box=None)._start_noise(fresh.new_stream(por, seed=0), T, shape)  # no box: no cell stays fresh
    torch.testing.assert_close(whole, plain[:1].expand_as(whole), atol=0, rtol=0)
    with pytest.raises(ModelError, match="noise_hold"):
        pipe(1.5)


def _flat(pipe):
    return pipe.prepare_portrait(np.full((40, 40, 3), 90, np.uint8), detect=False)


def test_noise_draws_show_the_mean_of_samples_from_their_own_noises(tiny_model_dir):
    """sampling.noise_draws K: a window is the mean of K samples of the stream, each from its own starting noise,
    batched side by side; batched streams still get what they get alone, and held noise is held per draw."""
    import dataclasses

    one = LetsTalkPipeline.from_pretrained(tiny_model_dir, num_steps=2, memory_noise=0)
    two = LetsTalkPipeline.from_pretrained(tiny_model_dir, num_steps=2, memory_noise=0, noise_draws=2)
    por, T = _flat(one), one.window
    tok = one.audio_tokens(speechlike(T / 25))[:T]
    shape = (one.config.transformer.latent_channels,) + (one.config.transformer.latent_size,) * 2
    draws = [torch.randn((T, *shape), generator=torch.Generator().manual_seed(s)) for s in (5, 6)]

    def start_from(pipe, noises):  # the pipeline's streams start from these noises, in turn
        it = iter(noises)
        pipe._start_noise = lambda stream, T, shape, draw=0: next(it)

    start_from(one, draws)
    a, b = (one.generate_latents([one.new_stream(por)], [tok])[0] for _ in draws)
    start_from(two, draws)
    mean = two.generate_latents([two.new_stream(por)], [tok])[0]
    assert (a - b).abs().mean() > 0.05  # the two noises give two different samples
    torch.testing.assert_close(mean, (a + b) / 2, atol=1e-5, rtol=1e-5)

    two = LetsTalkPipeline.from_pretrained(tiny_model_dir, noise_draws=2)
    portraits = [two.prepare_portrait(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8),
                                      detect=False) for i in range(2)]
    solo = [two.generate_latents([two.new_stream(p, seed=i)], [tok])[0] for i, p in enumerate(portraits)]
    both = two.generate_latents([two.new_stream(p, seed=i) for i, p in enumerate(portraits)], [tok, tok])
    for i in range(2):
        torch.testing.assert_close(both[i], solo[i], atol=1e-4, rtol=1e-4)

    comps = load_model(tiny_model_dir)
    comps.config.sampling = dataclasses.replace(comps.config.sampling, noise_hold=1.0, noise_draws=2)
    comps.config.validate()  # as loading a config.json does
    held = LetsTalkPipeline(comps, num_steps=1)
    assert held.noise_draws == 2  # the model's own setting
    s = held.new_stream(por)
    held.generate_latents([s], [tok])
    assert set(s.held_noise) == {0, 1} and (s.held_noise[0] - s.held_noise[1]).abs().mean() > 0.5  # a field each
    with pytest.raises(InputError, match="noise draws"):
        LetsTalkPipeline.from_pretrained(tiny_model_dir, noise_draws=0)
    comps.config.sampling = dataclasses.replace(comps.config.sampling, noise_draws=9)
    with pytest.raises(ModelError, match="noise_draws"):
        comps.config.validate()


def test_a_later_start_time_starts_from_the_portrait_and_leaves_less_to_the_noise(tiny_model_dir, tmp_path):
    """start_time s: a window starts as the portrait latent noised to s, so as s falls the seed decides less of
    the window and at s -> 0 it is the portrait; s = 1 (the config default) is plain sampling from noise."""
    base = LetsTalkPipeline.from_pretrained(tiny_model_dir)
    assert base.start_time == 1.0
    por = _flat(base)
    tok = base.audio_tokens(speechlike(base.window / 25))

    def window(pipe, seed):  # clean latents of a stream's first window
        return pipe.generate_latents([pipe.new_stream(por, seed=seed)], [tok])[0]  # (T, C, h, w)

    def seed_spread(start):
        pipe = LetsTalkPipeline.from_pretrained(tiny_model_dir, start_time=start)
        return float((window(pipe, 0) - window(pipe, 1)).abs().mean())

    torch.testing.assert_close(window(LetsTalkPipeline.from_pretrained(tiny_model_dir, start_time=1.0), 0),
                               window(base, 0), atol=0, rtol=0)
    spreads = [seed_spread(s) for s in (1.0, 0.5, 0.1)]
    assert spreads[0] > spreads[1] > spreads[2] > 0, spreads
    near = window(LetsTalkPipeline.from_pretrained(tiny_model_dir, start_time=1e-4), 0)
    far = window(base, 0)
    portrait = por.latent.float().cpu()[None]  # (1, C, h, w)
    assert float((near - portrait).abs().max()) < 1e-2 < float((far - portrait).abs().mean())
    two = LetsTalkPipeline.from_pretrained(tiny_model_dir, start_time=0.5, num_steps=2)
    assert [round(float(t), 6) for t in two.sampler.timesteps] == [0.5, 0.25]
    for bad in (0.0, 1.2):
        with pytest.raises(InputError, match="start time"):
            LetsTalkPipeline.from_pretrained(tiny_model_dir, start_time=bad)

    def model_with_start(start, name):  # the tiny model with sampling.start_time set in its config.json
        cfg = json.loads((tiny_model_dir / "config.json").read_text())
        cfg["sampling"]["start_time"] = start
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        for f in tiny_model_dir.glob("*.safetensors"):
            (d / f.name).write_bytes(f.read_bytes())
        return d, cfg["sampling"]["num_steps"]

    # the model's start time is tuned for its own step count; another count starts from noise unless told
    tuned, own = model_with_start(0.5, "tuned")
    assert LetsTalkPipeline.from_pretrained(tuned).start_time == 0.5
    other = LetsTalkPipeline.from_pretrained(tuned, num_steps=own + 1)
    assert other.start_time == 1.0 and float(other.sampler.timesteps[0]) == 1.0
    assert LetsTalkPipeline.from_pretrained(tuned, num_steps=own + 1, start_time=0.7).start_time == 0.7
    other.set_num_steps(own)  # the engine's step raising goes through set_num_steps too
    assert other.start_time == 0.5
    with pytest.raises(ModelError, match="start_time"):
        load_model(model_with_start(0, "bad")[0])


def test_bad_step_count_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="1 to 50"):
        LetsTalkPipeline.from_pretrained(tiny_model_dir, num_steps=0)


def test_stream_window_is_the_models_default_window_live_and_offline(tiny_model_dir, tmp_path):
    """sampling.stream_window picks the frames per window of a model (offline and, through the pipeline,
    the engine); a pipeline argument overrides it; out-of-range values are refused with the range."""
    from letstalk_rt.errors import InputError
    from letstalk_rt.stream import EngineConfig, StreamEngine

    comps = load_model(tiny_model_dir)
    assert comps.config.transformer.num_frames == 4
    comps.config.sampling.stream_window = 2
    d = save_model(comps, tmp_path / "w2")
    pipe = LetsTalkPipeline.from_pretrained(d)
    assert pipe.window == 2 and pipe.max_window == 4
    assert LetsTalkPipeline.from_pretrained(d, window=3).window == 3
    assert StreamEngine(pipe, EngineConfig()).window == 2
    assert StreamEngine(pipe, EngineConfig(window=4)).window == 4
    windows = []
    frames = list(pipe.generate(_flat(pipe), speechlike(0.4), on_window=lambda done, total: windows.append(total)))
    assert len(frames) == 10 and windows[-1] == 5  # 10 frames in windows of 2
    with pytest.raises(InputError, match="1..4"):
        LetsTalkPipeline.from_pretrained(d, window=5)
    cfg = json.loads((d / "config.json").read_text())
    cfg["sampling"]["stream_window"] = 9
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="stream_window=9"):
        load_model(d)


def test_the_bundled_default_is_trained_small_and_few_step():
    """The shipped contract of the default model: trained weights under 50 MB that sample a window in at
    most 2 network evaluations (steps x guidance rows x noise draws), and generate frames of its size from speech."""
    from letstalk_rt.checkpoint import DEFAULT_MODEL_DIR
    from letstalk_rt.diffusion import guidance_rows

    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir())
    assert size < 50 * 2**20
    pipe = LetsTalkPipeline.from_pretrained(None)
    assert pipe.config.trained
    assert pipe.num_steps * len(guidance_rows(pipe.portrait_guidance, pipe.audio_guidance)) * pipe.noise_draws <= 2
    assert 1 <= pipe.window <= pipe.max_window
    s = pipe.config.image_size
    frames = list(pipe.generate(pipe.prepare_portrait(np.full((s, s, 3), 128, np.uint8), detect=False),
                                speechlike(0.2)))
    assert len(frames) == 5 and frames[0].shape == (s, s, 3)


def test_detail_transfer_restores_the_portrait_where_it_kept_still_and_never_over_motion(tiny_model_dir):
    """The portrait's fine detail that the autoencoder loses is added back to frames that look like the
    portrait, but not to a frame that moved away from it, nor for a while after (the stream's memory of
    movement fades with detail_half_life_s); batched streams each get their own portrait's detail."""
    from letstalk_rt.models.autoencoder import decode_to_uint8

    pipe = LetsTalkPipeline.from_pretrained(tiny_model_dir, detail_transfer=12)
    rng = np.random.default_rng(3)
    images = [rng.integers(128, 255, (32, 32, 3), dtype=np.uint8), np.full((32, 32, 3), 10, np.uint8)]  # far apart
    a, b = (pipe.prepare_portrait(im, detect=False) for im in images)
    plain = decode_to_uint8(pipe.autoencoder, a.latent[None])[0]
    assert np.abs(plain.astype(int) - images[0]).mean() > 20  # the untrained autoencoder loses a lot

    sa = pipe.new_stream(a)
    still = pipe.decode(a.latent[None], [sa])[0]
    assert np.abs(still.astype(int) - images[0]).max() <= 1  # nothing moved: the portrait itself

    moving = pipe.new_stream(a)  # first a frame far from the portrait, then the portrait's own latent
    fps = pipe.fps
    seq = torch.stack([-a.latent] + [a.latent] * (10 * fps))  # 10 s, 4 half-lives of the default 2.5 s
    out = pipe.decode(seq, [moving]).astype(int)
    far = decode_to_uint8(pipe.autoencoder, -a.latent[None])[0]
    lost = np.abs(plain.astype(int) - images[0]).mean()  # what the transfer adds back when fully on
    assert np.abs(out[0] - far).mean() < 0.05 * lost  # nothing of the portrait pasted over the movement
    err = [np.abs(f - images[0]).mean() for f in out[1:]]
    assert err[0] > 0.8 * lost  # right after it: still held off, although the frame is the portrait again
    assert err[-1] < 0.1 * lost and all(x >= y - 0.5 for x, y in zip(err, err[1:]))  # fades back in, steadily

    sa, sb = pipe.new_stream(a), pipe.new_stream(b)
    both = pipe.decode(torch.stack([a.latent, b.latent]), [sa, sb])
    np.testing.assert_array_equal(both[0], still)
    assert np.abs(both[1].astype(int) - images[1]).max() <= 1

    off = LetsTalkPipeline.from_pretrained(tiny_model_dir, detail_transfer=0)
    np.testing.assert_array_equal(off.decode(a.latent[None], [off.new_stream(a)])[0], plain)
    with pytest.raises(InputError, match="detail transfer"):
        LetsTalkPipeline.from_pretrained(tiny_model_dir, detail_transfer=-1)


def test_gaussian_blur_is_the_reflect_padded_separable_conv():
    """The blur's matrix products give the sums of the reflect-padded depthwise conv they replaced, on frames
    that are not square, for a radius clipped by a small frame too; the cached matrices are not inference
    tensors, so a call with autograd on works after one in inference mode."""
    import torch.nn.functional as F

    from letstalk_rt.pipeline import gaussian_blur

    def reference(x, sigma):
        r = max(1, min(math.ceil(3 * sigma), x.shape[-1] - 1, x.shape[-2] - 1))
        k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
        k, c = k / k.sum(), x.shape[1]
        x = F.pad(x, (r, r, r, r), mode="reflect")
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    x = torch.randn(2, 3, 20, 28, generator=torch.Generator().manual_seed(0))
    for sigma in (0.5, 3.2, 12.0):  # 12: the radius is clipped to the frame
        with torch.inference_mode():
            assert torch.allclose(gaussian_blur(x, sigma), reference(x, sigma), atol=1e-5)
        y = x.clone().requires_grad_()
        gaussian_blur(y, sigma).sum().backward()
        assert y.grad is not None and torch.isfinite(y.grad).all()


def test_cuda_graph_batches_are_padded_with_copies_and_cut_back():
    """CudaGraphed pads a batch up to its bucket with copies of the last row (the rows of these models never
    mix at inference) and leaves tensors of another leading size, scalars and None alone; off a GPU it is
    the plain function."""
    from letstalk_rt.pipeline import CudaGraphed, pad_batch

    x = torch.arange(6.0).reshape(3, 2)
    p = pad_batch(x, 3, 4)
    assert p.shape == (4, 2) and torch.equal(p[:3], x) and torch.equal(p[3], x[2])
    assert pad_batch(x, 5, 8) is x and pad_batch(torch.tensor(1.0), 3, 4).dim() == 0
    calls = []
    f = CudaGraphed(lambda a, b=None: calls.append(a.shape) or a * 2)
    assert torch.equal(f(x, b=None), x * 2) and calls == [(3, 2)] and not f.graphs  # CPU: eager, nothing captured


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_give_what_eager_gives_for_every_batch_size(tiny_model_dir, tmp_path, w2v_dir):
    """On a GPU the transformer, decoder and wav2vec2 run from CUDA graphs, one per padded batch size: windows
    of 1, 3 and 4 streams (3 padded to 4) and their audio tokens match the eager pipeline's."""
    import dataclasses

    from letstalk_rt.checkpoint import build_components
    from letstalk_rt.config import model_preset

    config = model_preset("tiny")
    config.audio = dataclasses.replace(config.audio, encoder="wav2vec2", wav2vec2_path=str(w2v_dir),
                                       feature_layers=2, feature_dim=32, wav2vec2_chunk_seconds=0.4,
                                       wav2vec2_context_seconds=0.2)
    model = save_model(build_components(config, seed=0), tmp_path / "w2v")
    graphed = LetsTalkPipeline.from_pretrained(model, device="cuda", dtype=torch.bfloat16)
    eager = LetsTalkPipeline.from_pretrained(model, device="cuda", dtype=torch.bfloat16, cuda_graphs=False)
    assert graphed.cuda_graphs and not eager.cuda_graphs
    portrait = eager.prepare_portrait(np.full((64, 64, 3), 128, np.uint8), detect=False)
    wav = speechlike(1.0, seed=3)
    for b in (1, 3, 4, 3):
        toks = [p.audio_tokens(wav)[: p.window] for p in (graphed, eager)]
        torch.testing.assert_close(toks[0], toks[1], rtol=1e-4, atol=1e-4)
        outs = [p.generate_windows([p.new_stream(portrait, seed=i) for i in range(b)], [t] * b)
                for p, t in zip((graphed, eager), toks)]
        for g, e in zip(*outs):
            assert g.shape == e.shape
            assert np.abs(g.astype(int) - e.astype(int)).mean() < 1.0  # bf16: the same frames to a grey level
    assert graphed.graph_failures() == {}
    assert len(graphed._transformer_fn.graphs) == 2  # 3 streams ran in the graph of 4 (x the guidance rows)
    graphed.capture_graphs(False)  # as the engine runs live: a size not captured yet runs eagerly, the same
    outs = [p.generate_windows([p.new_stream(portrait, seed=i) for i in range(6)], [toks[1]] * 6)
            for p in (graphed, eager)]
    assert all(np.abs(g.astype(int) - e.astype(int)).mean() < 1.0 for g, e in zip(*outs))
    assert len(graphed._transformer_fn.graphs) == 2 and len(graphed._transformer_fn.uncaptured) == 1
    assert graphed.graph_failures() == {}


def test_a_batch_is_decoded_in_chunks_that_give_the_frames_of_one_call(tiny_pipeline):
    """pipeline.decode splits a big batch into DECODE_CHUNK frames per decoder call (bounded memory); every
    frame is what decoding it alone gives."""
    from letstalk_rt.pipeline import DECODE_CHUNK

    cfg = tiny_pipeline.config
    n = DECODE_CHUNK + 3
    lat = torch.randn(n, cfg.transformer.latent_channels, cfg.autoencoder.latent_size, cfg.autoencoder.latent_size,
                      generator=torch.Generator().manual_seed(0))
    calls = []
    real = tiny_pipeline._decode_fn
    tiny_pipeline._decode_fn = lambda z: calls.append(z.shape[0]) or real(z)
    try:
        frames = tiny_pipeline.decode(lat)
    finally:
        tiny_pipeline._decode_fn = real
    assert calls == [DECODE_CHUNK, 3] and frames.shape[0] == n
    alone = np.concatenate([tiny_pipeline.decode(lat[i:i + 1]) for i in (0, DECODE_CHUNK, n - 1)])
    assert np.abs(alone.astype(int) - frames[[0, DECODE_CHUNK, n - 1]].astype(int)).max() <= 1


def test_traced_model_gives_what_eager_gives_for_each_signature_and_new_ones_run_eagerly_once_capture_is_off(
        tiny_model_dir):
    """On a CPU the transformer, the decoder and the audio encoder run from TorchScript traces, one per call
    signature (which arguments are given, shapes, dtypes): the same audio tokens as eager, and the same frames for
    windows with and without memory, solo and batched; with capture off a new signature runs eagerly, and grad mode
    always does."""
    from letstalk_rt.pipeline import Traced

    traced = LetsTalkPipeline.from_pretrained(tiny_model_dir)
    eager = LetsTalkPipeline.from_pretrained(tiny_model_dir, traced=False)
    assert isinstance(traced._transformer_fn, Traced) and isinstance(traced._decode_fn, Traced)
    assert isinstance(traced.audio_encoder.encode_fn, Traced) and eager.audio_encoder.encode_fn is None
    assert eager._transformer_fn is eager.transformer
    speech = speechlike(1.0, seed=5)
    assert torch.allclose(traced.audio_tokens(speech), eager.audio_tokens(speech), atol=1e-5)
    assert traced.audio_encoder.encode_fn.traces  # type: ignore[union-attr]
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(2)]
    T = traced.window
    tokens = [traced.audio_tokens(speechlike(T / 25, seed=i))[:T] for i in range(2)]

    def windows(pipe, n):  # 2 windows of n sessions: the first without memory, the second with
        streams = [pipe.new_stream(pipe.prepare_portrait(images[i], detect=False), seed=i) for i in range(n)]
        return [pipe.generate_windows(streams, tokens[:n]) for _ in range(2)]

    for n in (1, 2):
        got, want = windows(traced, n), windows(eager, n)
        for w in range(2):
            for i in range(n):
                assert np.abs(got[w][i].astype(int) - want[w][i].astype(int)).max() <= 1
    made = len(traced._transformer_fn.traces)
    assert made >= 2 and len(traced._decode_fn.traces) >= 2  # solo and batched (and the memory's signature)
    traced.capture_graphs(False)
    streams = [traced.new_stream(traced.prepare_portrait(images[0], detect=False)) for _ in range(3)]
    traced.generate_windows(streams, [tokens[0]] * 3)  # 3 sessions: not traced, eager
    assert len(traced._transformer_fn.traces) == made
    calls = []
    f = Traced(lambda x, y=None: calls.append(1) or x * 2)
    f(torch.ones(2))  # grad mode: eager
    with torch.no_grad():
        f(torch.ones(2), y=3)  # not a tensor: eager
        assert len(calls) == 2 and not f.traces
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0)) and len(f.traces) == 1  # traced: ran once more
        assert torch.equal(f(torch.arange(3.0)), torch.arange(3.0) * 2) and len(calls) == 3  # the trace, not fn
        # a trace runs unoptimised: optimising profiled the graph at its second call (a 290-450 ms stall live)
        key, trace = next(iter(f.traces.items()))
        optimise = []
        f.traces[key] = lambda *ts: optimise.append(torch._C._get_graph_executor_optimize()) or trace(*ts)
        f(torch.ones(3))
        assert optimise == [False] and torch._C._get_graph_executor_optimize()  # this thread's setting restored
