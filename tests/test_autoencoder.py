"""DC-AE autoencoder: shapes, the residual shortcuts, clamping, learning, uint8 helpers, diffusers loader."""

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from letstalk_rt.config import AutoencoderConfig, model_preset
from letstalk_rt.errors import InputError, ModelError
from letstalk_rt.models.autoencoder import (
    DCAutoencoder,
    decode_to_uint8,
    encode_frames,
    load_diffusers_dcae,
)


def tiny_config(**overrides) -> AutoencoderConfig:
    return dataclasses.replace(model_preset("tiny").autoencoder, **overrides)  # 32x32 -> 8x8x4, (8, 16, 16)


def make_ae(config: AutoencoderConfig, seed: int = 0) -> DCAutoencoder:
    torch.manual_seed(seed)
    return DCAutoencoder(config)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth, structured images in [-1, 1]: upsampled low-resolution noise, (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 8, size // 8, generator=g) * 2 - 1  # (n, 3, s/8, s/8)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)  # (n, 3, s, s)


def zero_convs(module: nn.Module, keep: tuple[nn.Conv2d, ...] = ()) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d) and not any(m is k for k in keep):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()


# --------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------


def test_tiny_preset_shapes():
    cfg = tiny_config()
    ae = make_ae(cfg).eval()
    x = images(2, 32)  # (2, 3, 32, 32)
    with torch.no_grad():
        z = ae.encode(x)
        y = ae.decode(z)
        recon, lat = ae(x)
    assert cfg.downsample == 4 and cfg.latent_size == 8
    assert z.shape == (2, 4, 8, 8) and z.is_contiguous()
    assert y.shape == (2, 3, 32, 32) and y.is_contiguous()
    assert recon.shape == (2, 3, 32, 32) and torch.allclose(lat, z)
    assert ae.config is cfg


def test_two_stage_custom_config_shapes_and_frame_independence():
    cfg = AutoencoderConfig(image_size=16, latent_channels=4, block_channels=(8, 16), layers_per_block=2)
    ae = make_ae(cfg).eval()
    x = images(3, 16)  # (3, 3, 16, 16)
    with torch.no_grad():
        z = ae.encode(x)
        y = ae.decode(z)
        z1 = ae.encode(x[1:2])
        y1 = ae.decode(z[1:2])
    assert z.shape == (3, 4, 8, 8) and y.shape == (3, 3, 16, 16)
    # a frame's latent and decoding do not depend on the rest of the batch (streaming relies on it)
    assert torch.allclose(z1, z[1:2], atol=1e-5) and torch.allclose(y1, y[1:2], atol=1e-5)


def test_widths_the_shortcuts_cannot_bridge_are_refused_with_the_fix():
    with pytest.raises(ModelError, match="divide"):
        DCAutoencoder(AutoencoderConfig(block_channels=(8, 48), latent_channels=4))
    with pytest.raises(ModelError, match="latent_channels"):
        DCAutoencoder(AutoencoderConfig(block_channels=(8, 16), latent_channels=6))


# --------------------------------------------------------------------------------------------------
# The residual shortcuts are in the path
# --------------------------------------------------------------------------------------------------


def test_encoder_with_zeroed_convs_is_exactly_the_space_to_channel_shortcut():
    """Tiny widths 8 -> 16 -> 16 -> 4 latent channels. With every conv but conv_in zeroed (ResBlocks
    become identities), the encoder is unshuffle + group means, which we spell out pixel by pixel."""
    cfg = tiny_config(scaling_factor=0.5)
    ae = make_ae(cfg)
    enc = ae.encoder
    zero_convs(ae, keep=(enc.conv_in,))
    with torch.no_grad():  # conv_in: channel c copies RGB channel c % 3 (centre tap)
        enc.conv_in.weight.zero_()
        enc.conv_in.bias.zero_()
        for c in range(8):
            enc.conv_in.weight[c, c % 3, 1, 1] = 1.0
    x = images(2, 32, seed=1)  # (2, 3, 32, 32)
    with torch.no_grad():
        z = ae.encode(x)  # (2, 4, 8, 8)

    h0 = x[:, [c % 3 for c in range(8)]]  # (2, 8, 32, 32)
    # 8 -> 16: unshuffled channel 4c + 2dy + dx, groups of 2 -> out k = mean over dx of (c = k//2, dy = k%2)
    h1 = torch.zeros(2, 16, 16, 16)
    for k in range(16):
        c, dy = divmod(k, 2)
        h1[:, k] = (h0[:, c, dy::2, 0::2] + h0[:, c, dy::2, 1::2]) / 2
    # 16 -> 16: groups of 4 = the 2x2 block of one channel -> a 2x2 average pool
    h2 = (h1[:, :, 0::2, 0::2] + h1[:, :, 0::2, 1::2] + h1[:, :, 1::2, 0::2] + h1[:, :, 1::2, 1::2]) / 4
    # bottleneck 16 -> 4: mean of 4 adjacent channels
    expected = torch.stack([h2[:, 4 * k:4 * k + 4].mean(dim=1) for k in range(4)], dim=1) * 0.5
    assert torch.allclose(z, expected, atol=1e-6)
    assert expected.abs().mean() > 0.05  # the check is not vacuous


def test_decoder_with_zeroed_convs_is_exactly_the_channel_to_space_shortcut():
    """Latent 4 -> 16 -> 16 -> 8 channels: channel repeat, then 'repeat 4 + shuffle' (a nearest 2x
    upsample), then 'repeat 2 + shuffle' (rows from channel pairs), then norm, SiLU and conv_out."""
    cfg = tiny_config()
    ae = make_ae(cfg)
    dec = ae.decoder
    zero_convs(ae, keep=(dec.conv_out,))
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        y = ae.decode(z)  # (2, 3, 32, 32)

        h = z.repeat_interleave(4, dim=1)  # (2, 16, 8, 8): channel 4c..4c+3 = z[c]
        h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # (2, 16, 16, 16) nearest 2x
        up = torch.zeros(2, 8, 32, 32)
        for k in range(8):  # out channel k: top row of each 2x2 block from 2k, bottom row from 2k+1
            for dy in range(2):
                for dx in range(2):
                    up[:, k, dy::2, dx::2] = h[:, 2 * k + dy]
        normed = up * torch.rsqrt(up.pow(2).mean(dim=1, keepdim=True) + 1e-5)  # RMSNorm, weight 1
        expected = F.conv2d(F.silu(normed), dec.conv_out.weight, dec.conv_out.bias, padding=1).clamp(-1, 1)
    assert torch.allclose(y, expected, atol=1e-5)


def test_res_block_is_conv3x3_silu_conv1x1_norm_and_the_weights_stay_channels_last(tmp_path, tiny_model_dir):
    """The pointwise conv runs as a linear over the channels-last view: the block is still
    x + RMSNorm_C(conv1x1(silu(conv3x3(x)))) of the NCHW formula, for channels-last and for contiguous input. The
    conv weights are kept channels-last (no per-call copy to that layout), and a model saved and loaded
    again keeps that layout and decodes the same."""
    from letstalk_rt.checkpoint import load_model, save_model
    from letstalk_rt.models.autoencoder import ResBlock

    torch.manual_seed(0)
    block = ResBlock(8)
    with torch.no_grad():
        nn.init.normal_(block.norm.weight)  # not the identity block it starts as
        x = torch.randn(2, 8, 6, 5)
        h = F.conv2d(F.silu(block.conv1(x)), block.conv2.weight)  # (2, 8, 6, 5)
        expected = x + h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + block.norm.eps) * block.norm.weight[:, None, None]
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            assert torch.allclose(block(inp), expected, atol=1e-5)

    model = load_model(tiny_model_dir)
    ae = model.autoencoder
    convs = [m for m in ae.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert any(not c.weight.is_contiguous() for c in convs)  # the check is not vacuous: 3x3 weights differ
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    again = load_model(save_model(model, tmp_path / "again")).autoencoder
    with torch.no_grad():
        assert torch.equal(ae.decode(z), again.decode(z))


def test_decode_output_is_clamped_to_unit_range():
    ae = make_ae(tiny_config()).eval()
    with torch.no_grad():
        ae.decoder.conv_out.weight.mul_(20)  # make the raw decoder overshoot [-1, 1]
        z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        raw = ae.decoder(z)
        y = ae.decode(z)
    assert raw.abs().max() > 1.5  # the check is not vacuous
    assert y.min() >= -1.0 and y.max() <= 1.0
    assert torch.equal(y, raw.clamp(-1, 1))


# --------------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------------


def test_a_few_adam_steps_lower_the_reconstruction_loss():
    ae = make_ae(tiny_config(), seed=0).train()
    x = images(4, 32, seed=4)  # (4, 3, 32, 32), fixed batch
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)

    def loss_now() -> float:
        with torch.no_grad():
            return F.mse_loss(ae(x)[0], x).item()

    start = loss_now()
    for _ in range(40):
        recon, _ = ae(x)
        loss = F.mse_loss(recon, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = loss_now()
    assert end < 0.5 * start, (start, end)


# --------------------------------------------------------------------------------------------------
# uint8 frame helpers
# --------------------------------------------------------------------------------------------------


class IdentityAE(nn.Module):
    """encode/decode as identities (f = 1), to check the helpers' pixel mapping exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.config = AutoencoderConfig(image_size=8, latent_channels=3, block_channels=(3,))
        self.dummy = nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return x

    def decode(self, z):
        return z.clamp(-1, 1)


def test_uint8_helpers_map_pixels_exactly_and_round_trip():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    frames[0, 0, 0] = (0, 128, 255)
    ident = IdentityAE()
    x = encode_frames(ident, frames)
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32
    assert x[0, :, 0, 0].tolist() == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0], abs=1e-6)
    back = decode_to_uint8(ident, x)
    assert back.dtype == np.uint8 and back.shape == frames.shape
    assert np.array_equal(back, frames)


def test_uint8_helpers_with_the_tiny_autoencoder():
    ae = make_ae(tiny_config()).eval()
    frames = np.random.default_rng(1).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    z = encode_frames(ae, frames)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    out = decode_to_uint8(ae, z)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    with pytest.raises(InputError, match="uint8"):
        encode_frames(ae, frames.astype(np.float32))
    with pytest.raises(InputError, match="multiple"):
        encode_frames(ae, frames[:, :30, :30])


# --------------------------------------------------------------------------------------------------
# diffusers loader
# --------------------------------------------------------------------------------------------------


def test_missing_directory_raises_model_error_with_the_path(tmp_path):
    pytest.importorskip("diffusers")
    missing = tmp_path / "no_such_dcae"
    with pytest.raises(ModelError, match="no_such_dcae"):
        load_diffusers_dcae(missing)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ModelError, match="empty_dir"):
        load_diffusers_dcae(empty)


def test_without_diffusers_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(ModelError, match=r"pip install 'letstalk-rt\[diffusers\]'"):
        load_diffusers_dcae(tmp_path)


def test_diffusers_dcae_loads_from_disk_and_matches_the_original(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    orig = diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=8,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        scaling_factor=0.5,
    ).eval()
    orig.save_pretrained(tmp_path / "dcae")

    ae = load_diffusers_dcae(tmp_path / "dcae", image_size=32)
    cfg = ae.config
    assert (cfg.latent_channels, cfg.block_channels, cfg.downsample) == (4, (8, 16), 2)
    assert cfg.scaling_factor == 0.5 and cfg.image_size == 32 and cfg.latent_size == 16

    x = images(2, 32, seed=5)  # (2, 3, 32, 32)
    with torch.no_grad():
        z = ae.encode(x)
        z_ref = orig.encode(x).latent * 0.5
        y = ae.decode(z)
        y_ref = orig.decode(z / 0.5).sample.clamp(-1, 1)
    assert z.shape == (2, 4, 16, 16) and torch.allclose(z, z_ref, atol=1e-6)
    assert y.shape == (2, 3, 32, 32) and torch.allclose(y, y_ref, atol=1e-6)
    assert y.min() >= -1 and y.max() <= 1

    frames = np.random.default_rng(2).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    assert decode_to_uint8(ae, encode_frames(ae, frames)).shape == (2, 32, 32, 3)

    # a checkpoint without its decoder: diffusers would initialise it at random (decoding NaN) and only log it
    from safetensors.torch import load_file, save_file

    weights = next((tmp_path / "dcae").glob("*.safetensors"))
    state = load_file(str(weights))
    save_file({k: v for k, v in state.items() if not k.startswith("decoder.")}, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="lacks weights"):
        load_diffusers_dcae(tmp_path / "dcae", image_size=32)


def test_a_model_made_on_a_pretrained_dcae_loads_it_from_its_folder_and_generates(tmp_path, capsys, monkeypatch):
    """`letstalk new-model --dcae DIR`: the DC-AE is the model's autoencoder, read from DIR (not copied), its
    latents decide the transformer's; the model loads and talks, and its autoencoder cannot be trained."""
    diffusers = pytest.importorskip("diffusers")
    from letstalk_rt.checkpoint import load_model
    from letstalk_rt.cli import main
    from letstalk_rt.models import autoencoder
    from letstalk_rt.models.autoencoder import DiffusersDCAE
    from letstalk_rt.pipeline import LetsTalkPipeline

    torch.manual_seed(0)
    diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=8,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), scaling_factor=0.5,
    ).save_pretrained(tmp_path / "dcae")
    loads = []  # a real DC-AE is hundreds of MB: new-model reads it once
    monkeypatch.setattr(autoencoder, "load_diffusers_dcae",
                        lambda *a, real=autoencoder.load_diffusers_dcae, **k: loads.append(a) or real(*a, **k))
    assert main(["new-model", "--preset", "tiny", "--dcae", str(tmp_path / "dcae"), "--out", str(tmp_path / "m")]) == 0
    assert len(loads) == 1
    assert not (tmp_path / "m" / "autoencoder.safetensors").exists()
    comps = load_model(tmp_path / "m")
    assert isinstance(comps.autoencoder, DiffusersDCAE)
    assert (comps.config.transformer.latent_channels, comps.config.transformer.latent_size) == (4, 16)
    pipe = LetsTalkPipeline(comps)
    face = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    frames = list(pipe.generate(pipe.prepare_portrait(face, detect=False), np.zeros(16000, np.float32)))
    assert len(frames) == 25 and frames[0].shape == (32, 32, 3)
    # the DC-AE's folder changed under the model: refused, not decoded with other latents
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["autoencoder"]["scaling_factor"] = 0.25
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="new-model --dcae"):
        load_model(tmp_path / "m")


def test_decoder_widths_default_to_the_encoders_and_leave_cache_keys_unchanged():
    # caches of latents are keyed by repr(config) + weights; models without a narrower decoder keep their keys
    cfg = AutoencoderConfig(image_size=32, latent_channels=4, block_channels=(8, 16, 16), layers_per_block=1)
    assert cfg.decoder_widths == (8, 16, 16) and "decoder_channels" not in repr(cfg)
    narrow = dataclasses.replace(cfg, decoder_channels=(4, 8, 16))
    ae = DCAutoencoder(narrow)
    assert ae.decoder.conv_out.in_channels == 4 and ae.encoder.conv_in.out_channels == 8
    assert ae.decode(torch.zeros(2, 4, 8, 8)).shape == (2, 3, 32, 32)
    with pytest.raises(ModelError, match="as many stages"):
        DCAutoencoder(dataclasses.replace(cfg, decoder_channels=(8, 16)))
