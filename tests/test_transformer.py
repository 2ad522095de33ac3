"""The LetsTalk transformer on the tiny config: linear attention numerics, zero init, memory, the three
fusion schemes of each condition, guidance dropout, shape errors, gradients."""

import dataclasses

import pytest
import torch

from letstalk_rt.config import FUSIONS, TransformerConfig, model_preset
from letstalk_rt.errors import ModelError
from letstalk_rt.models.letstalk import LetsTalkTransformer, LinearAttention, relu_linear_attention, softmax_attention


def tiny_config(**overrides) -> TransformerConfig:
    cfg = model_preset("tiny").transformer  # 8x8x4 latents, hidden 64, depth 2, 4 frames, K=2, 4 audio tokens of 32
    return dataclasses.replace(cfg, **overrides)


def perturb(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add seeded noise to every parameter, so zero-initialised gates and outputs let signals through
    the way a trained model's do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def make_model(perturbed: bool = True, **overrides) -> LetsTalkTransformer:
    torch.manual_seed(0)
    model = LetsTalkTransformer(tiny_config(**overrides))
    return perturb(model) if perturbed else model


def inputs(cfg: TransformerConfig, B: int = 2, T: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = cfg.num_frames if T is None else T
    lat = (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    return {
        "x": torch.randn(B, T, *lat, generator=g),
        "t": torch.rand(B, generator=g),
        "portrait": torch.randn(B, *lat, generator=g),
        "audio": torch.randn(B, T, cfg.num_audio_tokens, cfg.audio_token_dim, generator=g),
        "memory": torch.randn(B, cfg.num_memory, *lat, generator=g),
    }


def run(model: LetsTalkTransformer, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-4


# --------------------------------------------------------------------------------------------------
# Linear attention
# --------------------------------------------------------------------------------------------------


def slow_relu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out_i = sum_j relu(q_i).relu(k_j) v_j / sum_j relu(q_i).relu(k_j), one query at a time. (L, d) each."""
    out = torch.zeros_like(v, dtype=torch.float64)
    for i in range(q.shape[0]):
        num = torch.zeros(v.shape[1], dtype=torch.float64)
        den = torch.zeros((), dtype=torch.float64)
        for j in range(k.shape[0]):
            w = torch.relu(q[i]).double() @ torch.relu(k[j]).double()
            num += w * v[j].double()
            den += w
        out[i] = num / den if den > 0 else 0.0
    return out


def test_relu_linear_attention_equals_explicit_kernel_formula():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 12, 8).unbind(0)  # (B=2, H=3, L=12, d=8) each
    fast = relu_linear_attention(q, k, v)
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(fast[b, h].double(), slow_relu_attention(q[b, h], k[b, h], v[b, h]),
                                       rtol=1e-5, atol=1e-5)
    # a query with no positive component has zero kernel mass: 0 / eps = 0, not NaN
    q0 = q.clone()
    q0[0, 0, 0] = -q0[0, 0, 0].abs()
    assert torch.equal(relu_linear_attention(q0, k, v)[0, 0, 0], torch.zeros(8))


@pytest.mark.parametrize("q_len,kv_len", [(6, 6), (64, 8), (1, 5)])
def test_cpu_softmax_attention_equals_the_fused_kernel(q_len, kv_len):
    # the CPU path writes the attention out (faster for the model's short sequences); it must be the same function
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, q_len, 32, generator=g)
    k, v = torch.randn(2, 3, 4, kv_len, 32, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(softmax_attention(q, k, v), ref, rtol=1e-5, atol=1e-5)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    torch.testing.assert_close(softmax_attention(qb, kb, vb).float(), ref, rtol=0.05, atol=0.05)


def test_linear_attention_module_equals_explicit_per_head_formula():
    torch.manual_seed(0)
    dim, head_dim = 64, 32
    attn = LinearAttention(dim, head_dim)
    x = torch.randn(2, 10, dim)  # (B, L, D)
    with torch.no_grad():
        out = attn(x)  # (B, L, D)
        wq, wk, wv = attn.qkv.weight.chunk(3, dim=0)  # (D, D) each: q, k, v projections, heads in order
        for b in range(2):
            heads = []
            for h in range(dim // head_dim):
                sl = slice(h * head_dim, (h + 1) * head_dim)
                heads.append(slow_relu_attention(x[b] @ wq[sl].T, x[b] @ wk[sl].T, x[b] @ wv[sl].T))
            expected = attn.proj(torch.cat(heads, dim=1).float())  # (L, D)
            torch.testing.assert_close(out[b], expected, rtol=1e-4, atol=1e-5)


def test_linear_attention_accumulates_in_fp32_under_autocast():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = relu_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, relu_linear_attention(q.bfloat16().float(), k.bfloat16().float(),
                                                          v.bfloat16().float()))


# --------------------------------------------------------------------------------------------------
# Shapes and initialisation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("portrait_fusion", FUSIONS)
def test_output_shape_and_exact_zero_at_init(portrait_fusion):
    model = make_model(perturbed=False, portrait_fusion=portrait_fusion)
    cfg = model.config
    kw = inputs(cfg, B=2)
    out = run(model, **kw)
    assert out.shape == (2, cfg.num_frames, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised final layer
    out = run(perturb(model), **kw)
    assert out.abs().mean() > 1e-3 and torch.isfinite(out).all()


def test_initialize_weights_zeroes_gates_and_nulls():
    model = make_model(perturbed=False, portrait_fusion="siamese", audio_fusion="siamese")
    zero = [model.final_layer.linear.weight, model.final_layer.adaLN_modulation[-1].weight,
            model.null_portrait, model.null_audio]
    for blk in model.blocks:
        zero += [blk.temporal_attn.proj.weight, blk.spatial.adaLN_modulation[-1].weight]
    zero += [g.weight for g in model.portrait_branch.gates] + [g.weight for g in model.audio_branch.gates]
    assert all(torch.count_nonzero(p) == 0 for p in zero)
    assert model.num_parameters() == sum(p.numel() for p in model.parameters()) > 0


def test_shorter_clip_works_and_too_long_raises():
    model = make_model()
    cfg = model.config
    for T in (1, cfg.num_frames - 1):
        out = run(model, **inputs(cfg, B=1, T=T))
        assert out.shape == (1, T, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    with pytest.raises(ModelError, match=f"num_frames={cfg.num_frames}"):
        run(model, **inputs(cfg, B=1, T=cfg.num_frames + 1))


def test_mismatched_shapes_raise_model_error_with_expected_shape():
    model = make_model()
    cfg = model.config
    kw = inputs(cfg, B=2)
    bad = dict(kw, audio=kw["audio"][:, :, :-1])
    with pytest.raises(ModelError, match=r"audio: expected shape \(2, 4, 4, 32\)"):
        run(model, **bad)
    with pytest.raises(ModelError, match="portrait"):
        run(model, **dict(kw, portrait=kw["portrait"][:1]))
    with pytest.raises(ModelError, match="memory"):
        run(model, **dict(kw, memory=kw["memory"][:, :1]))
    with pytest.raises(ModelError, match=r"x: expected \(B, T, 4, 8, 8\)"):
        run(model, **dict(kw, x=kw["x"][:, :, :2]))


def test_rows_of_a_batch_are_independent():
    model = make_model()
    kw = inputs(model.config, B=3)
    full = run(model, **kw)
    alone = run(model, **{k: v[1:2] for k, v in kw.items()})
    torch.testing.assert_close(full[1:2], alone, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def test_temporal_attention_reaches_memory_and_masking_all_equals_no_memory():
    model = make_model()
    cfg = model.config
    kw = inputs(cfg)
    out = run(model, **kw)
    other = run(model, **dict(kw, memory=torch.randn_like(kw["memory"])))
    assert differs(out, other)
    masked = torch.zeros(2, cfg.num_memory, cfg.latent_size, cfg.latent_size)
    none = run(model, **dict(kw, memory=None))
    torch.testing.assert_close(run(model, **dict(kw, memory_mask=masked)), none, rtol=0, atol=1e-6)
    assert differs(out, none)
    # all ones is the default mask
    torch.testing.assert_close(run(model, **dict(kw, memory_mask=torch.ones_like(masked))), out, rtol=0, atol=0)


def test_masked_memory_positions_are_ignored():
    model = make_model()
    cfg = model.config
    kw = inputs(cfg)
    mask = (torch.rand(2, cfg.num_memory, cfg.latent_size, cfg.latent_size, generator=torch.Generator().manual_seed(1))
            > 0.25).float()
    out = run(model, **dict(kw, memory_mask=mask))
    changed = kw["memory"] + torch.randn_like(kw["memory"]) * (1 - mask[:, :, None])  # only masked positions
    torch.testing.assert_close(run(model, **dict(kw, memory=changed, memory_mask=mask)), out, rtol=0, atol=1e-6)
    kept_changed = kw["memory"] + torch.randn_like(kw["memory"]) * mask[:, :, None]
    assert differs(run(model, **dict(kw, memory=kept_changed, memory_mask=mask)), out)


# --------------------------------------------------------------------------------------------------
# Conditions: every fusion scheme, guidance dropout
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", FUSIONS)
def test_portrait_fusion_reaches_output_and_drop_removes_it(fusion):
    model = make_model(portrait_fusion=fusion)
    kw = inputs(model.config)
    other_portrait = torch.randn_like(kw["portrait"])
    out = run(model, **kw)
    assert differs(out, run(model, **dict(kw, portrait=other_portrait)))
    drop = torch.tensor([True, False])
    a = run(model, **dict(kw, drop_portrait=drop))
    b = run(model, **dict(kw, portrait=other_portrait, drop_portrait=drop))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)  # dropped row: portrait ignored
    assert differs(a[1], b[1])  # kept row still sees it
    assert differs(a[0], out[0])  # the null portrait is a different condition
    torch.testing.assert_close(a[1], out[1], rtol=1e-5, atol=1e-6)  # dropping one row leaves the other alone


@pytest.mark.parametrize("fusion", FUSIONS)
def test_audio_fusion_reaches_output_and_drop_removes_it(fusion):
    model = make_model(audio_fusion=fusion)
    kw = inputs(model.config)
    other_audio = torch.randn_like(kw["audio"])
    out = run(model, **kw)
    assert differs(out, run(model, **dict(kw, audio=other_audio)))
    drop = torch.tensor([False, True])
    a = run(model, **dict(kw, drop_audio=drop))
    b = run(model, **dict(kw, audio=other_audio, drop_audio=drop))
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6)
    assert differs(a[0], b[0])
    assert differs(a[1], out[1])
    torch.testing.assert_close(a[0], out[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_audio_of_frame_zero_changes_frame_zero(fusion):
    model = make_model(audio_fusion=fusion)
    kw = inputs(model.config)
    out = run(model, **kw)
    audio = kw["audio"].clone()
    audio[:, 0] = torch.randn_like(audio[:, 0])
    changed = run(model, **dict(kw, audio=audio))
    assert differs(out[:, 0], changed[:, 0])


def test_audio_reaches_other_frames_only_through_temporal_attention():
    """With the temporal attention's output zeroed frames are independent, so frame 0's audio moves
    frame 0 alone; with it on, the change spreads to the other frames."""
    model = make_model()
    kw = inputs(model.config)
    audio = kw["audio"].clone()
    audio[:, 0] = torch.randn_like(audio[:, 0])
    with torch.no_grad():
        for blk in model.blocks:
            blk.temporal_attn.proj.weight.zero_()
            blk.temporal_attn.proj.bias.zero_()
    out, changed = run(model, **kw), run(model, **dict(kw, audio=audio))
    assert differs(out[:, 0], changed[:, 0])
    torch.testing.assert_close(out[:, 1:], changed[:, 1:], rtol=0, atol=1e-6)
    model = make_model()
    out, changed = run(model, **kw), run(model, **dict(kw, audio=audio))
    assert differs(out[:, 1:], changed[:, 1:])


# --------------------------------------------------------------------------------------------------
# Gradients and autocast
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("portrait_fusion,audio_fusion",
                         [("symbiotic", "direct"), ("direct", "symbiotic"), ("siamese", "siamese")])
def test_backward_gives_finite_gradients_to_every_parameter(portrait_fusion, audio_fusion):
    model = make_model(portrait_fusion=portrait_fusion, audio_fusion=audio_fusion)
    cfg = model.config
    kw = inputs(cfg, B=2, T=3)
    mask = torch.ones(2, cfg.num_memory, cfg.latent_size, cfg.latent_size)
    mask[:, :, :4] = 0  # some memory positions masked, so the mask token is used
    out = model(**kw, memory_mask=mask, drop_portrait=torch.tensor([True, False]),
                drop_audio=torch.tensor([False, True]))
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_bf16_autocast_matches_fp32():
    model = make_model()
    kw = inputs(model.config)
    ref = run(model, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, **kw)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_patch_size_two_and_shallow_siamese_branches():
    model = make_model(patch_size=2, portrait_fusion="siamese", audio_fusion="siamese", siamese_depth=1)
    cfg = model.config
    assert len(model.portrait_branch) == len(model.audio_branch) == 1
    kw = inputs(cfg, B=2, T=2)
    mask = torch.ones(2, cfg.num_memory, cfg.latent_size, cfg.latent_size)
    mask[:, :, 0, 0] = 0  # a quarter of one patch masked: that patch blends in a quarter of the mask token
    out = run(model, **kw, memory_mask=mask)
    assert out.shape == (2, 2, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    assert differs(out, run(model, **kw))
    with pytest.raises(ModelError, match="siamese_depth"):
        LetsTalkTransformer(tiny_config(siamese_depth=3))
