"""Flow-matching objective, Euler sampler, guidance and the memory bank (no networks needed)."""

import pytest
import torch

from letstalk_rt.diffusion import (EulerSampler, FlowMatching, Guidance, combine_guidance, guidance_rows,
                                   shift_time)
from letstalk_rt.memory import MemoryBank, regularize_memory


def test_sampler_step_count_and_grid():
    s = EulerSampler()
    for n in (1, 2, 4, 50):
        s.set_timesteps(n)
        assert s.num_steps == n
        assert s.timesteps[0] == 1.0 and s.sigmas[-1] == 0.0
        assert torch.all(s.sigmas[1:] < s.sigmas[:-1])
    for bad in (0, 51, 2.5, -1):
        with pytest.raises(ValueError):
            s.set_timesteps(bad)


def test_a_later_start_scales_the_grid_and_still_lands_on_x0():
    """From x_s = (1 - s) x0 + s noise (SDEdit's start), the exact velocity reaches x0 from t = s."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    for n, shift, start in ((1, 1.0, 0.4), (3, 1.0, 0.7), (4, 3.0, 0.5)):
        s = EulerSampler(shift=shift)
        s.set_timesteps(n, start)
        assert s.num_steps == n and abs(float(s.timesteps[0]) - start) < 1e-6 and s.sigmas[-1] == 0.0
        assert torch.all(s.sigmas[1:] < s.sigmas[:-1])
        x = (1 - start) * x0 + start * noise
        for t in s.timesteps:
            x = s.step(noise - x0, t, x)
        torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)
    for bad in (0.0, -0.2, 1.5):
        with pytest.raises(ValueError, match="start"):
            EulerSampler().set_timesteps(1, bad)


def test_step_before_set_timesteps_says_the_fix():
    with pytest.raises(RuntimeError, match="set_timesteps"):
        EulerSampler().step(torch.zeros(1), 1.0, torch.zeros(1))


def test_step_rejects_a_time_off_the_grid():
    s = EulerSampler()
    s.set_timesteps(2)
    with pytest.raises(ValueError, match="not one of"):
        s.step(torch.zeros(1), 0.3, torch.zeros(1))


def test_exact_velocity_reaches_x0_in_one_step_and_in_many():
    """With the true velocity v = noise - x0, Euler lands exactly on x0 for any step count."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, generator=g)
    noise = torch.randn(2, 3, 4, generator=g)
    for n, shift in ((1, 1.0), (4, 1.0), (7, 3.0)):
        s = EulerSampler(shift=shift)
        s.set_timesteps(n)
        x = noise.clone()
        calls = 0
        for t in s.timesteps:
            x = s.step(noise - x0, t, x)
            calls += 1
        assert calls == n
        torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_sampling_is_deterministic_for_a_seed():
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 4, 8, 8, generator=g)
        s = EulerSampler(shift=2.0)
        s.set_timesteps(3)
        for t in s.timesteps:
            x = s.step(torch.tanh(x) * t, t, x)  # a fixed nonlinear "model"
        return x
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_flow_matching_interpolation_and_target():
    x0, noise = torch.zeros(2, 3), torch.ones(2, 3)
    t = torch.tensor([0.25, 1.0])
    xt = FlowMatching.add_noise(x0, noise, t)
    torch.testing.assert_close(xt[:, 0], t)
    fm = FlowMatching()
    assert fm.loss(FlowMatching.target(x0, noise), x0, noise) == 0
    ts = fm.sample_t(1000, torch.Generator().manual_seed(0))
    assert ts.min() > 0 and ts.max() < 1
    assert torch.allclose(shift_time(torch.tensor([0.0, 1.0]), 3.0), torch.tensor([0.0, 1.0]))


def test_guidance_rows_and_combination():
    assert guidance_rows(1.0, 1.0) == [(False, False)]
    full, port, none = torch.full((1,), 3.0), torch.full((1,), 2.0), torch.full((1,), 0.5)
    assert combine_guidance([full], 1.0, 1.0) == 3.0
    # v = none + sp (port - none) + sa (full - port)
    assert combine_guidance([full, port, none], 2.0, 3.0) == 0.5 + 2.0 * 1.5 + 3.0 * 1.0
    assert combine_guidance([full, port], 1.0, 2.0) == 2.0 + 2.0 * 1.0
    assert combine_guidance([full, none], 2.0, 1.0) == 0.5 + 2.0 * 2.5
    with pytest.raises(ValueError):
        combine_guidance([full], 2.0, 1.0)


def test_audio_guidance_in_a_region_leaves_the_rest_unguided():
    """With a region, the audio scale acts inside it and the rest gets the plain conditional velocity (the
    face outside the mouth is not pushed by audio guidance); the portrait scale still acts everywhere."""
    full, port, none = torch.full((2, 4, 4), 3.0), torch.full((2, 4, 4), 2.0), torch.full((2, 4, 4), 0.5)
    region = torch.zeros(4, 4)
    region[2:, 1:3] = 1.0
    got = combine_guidance([full, port], 1.0, 2.5, region)
    assert torch.equal(got[:, 2:, 1:3], combine_guidance([full, port], 1.0, 2.5)[:, 2:, 1:3])  # 2 + 2.5 * 1
    outside = region == 0
    assert torch.equal(got[:, outside], full[:, outside])
    got = combine_guidance([full, port, none], 2.0, 3.0, region)
    assert torch.equal(got[:, outside], (none + 2.0 * (port - none) + (full - port))[:, outside])


def test_guidance_is_one_batched_call_of_every_row():
    """A model whose output depends on x, t, a condition and the two drop flags: the one batched call
    must give combine_guidance of the rows evaluated one by one, and pass each row its own flags."""
    calls = []

    def model(x, t, cond, drop_portrait, drop_audio):
        calls.append(x.shape[0])
        k = 1.0 + 2.0 * (~drop_portrait).float() + 5.0 * (~drop_audio).float()  # (R*B,)
        return x * t[:, None] + cond * k[:, None]

    x, t, cond = torch.randn(3, 4), torch.tensor([0.2, 0.5, 0.9]), torch.randn(3, 4)
    for sp, sa in [(1.0, 1.0), (1.0, 2.0), (1.5, 3.0)]:
        calls.clear()
        rows = guidance_rows(sp, sa)
        got = Guidance(sp, sa, cond=cond).velocity(model, x, t)
        assert calls == [3 * len(rows)]  # one call, all rows stacked
        each = [model(x, t, cond, torch.full((3,), dp), torch.full((3,), da)) for dp, da in rows]
        torch.testing.assert_close(got, combine_guidance(each, sp, sa))
    assert not torch.allclose(Guidance(1.0, 2.0, cond=cond).velocity(model, x, t),
                              Guidance(1.0, 1.0, cond=cond).velocity(model, x, t))


def test_memory_bank_keeps_last_k_and_masks_empty_slots():
    bank = MemoryBank(2)
    mem, mask = bank.condition((3, 4, 4), 0.0, None, torch.device("cpu"), torch.float32)
    assert mask.sum() == 0 and mem.abs().sum() == 0  # start of a stream: nothing to remember
    bank.update(torch.arange(1.0, 2.0)[:, None, None, None].expand(1, 3, 4, 4))  # a 1-frame window
    mem, mask = bank.condition((3, 4, 4), 0.0, None, torch.device("cpu"), torch.float32)
    assert mask[0].sum() == 0 and mask[1].sum() == 16 and torch.all(mem[1] == 1.0)
    frames = torch.arange(5.0)[:, None, None, None].expand(5, 3, 4, 4)
    bank.update(frames)
    mem, mask = bank.condition((3, 4, 4), 0.0, None, torch.device("cpu"), torch.float32)
    assert torch.all(mask == 1) and mem[:, 0, 0, 0].tolist() == [3.0, 4.0]
    g = torch.Generator().manual_seed(0)
    noisy, _ = bank.condition((3, 4, 4), 0.05, g, torch.device("cpu"), torch.float32)
    err = (noisy - mem).abs()
    assert 0 < err.mean() < 0.5  # forward-diffused a little, not replaced
    bank.reset()
    assert bank.latents is None


def test_an_anchored_bank_keeps_the_portrait_in_slot_0_and_starts_from_it():
    cpu, f32 = torch.device("cpu"), torch.float32
    portrait = torch.full((3, 4, 4), 7.0)
    bank = MemoryBank(2, anchor=portrait)
    mem, mask = bank.condition((3, 4, 4), 0.0, None, cpu, f32)
    assert torch.all(mask == 1) and torch.all(mem == 7.0)  # start of a stream: the portrait everywhere
    bank.update(torch.arange(5.0)[:, None, None, None].expand(5, 3, 4, 4))
    mem, mask = bank.condition((3, 4, 4), 0.0, None, cpu, f32)
    assert torch.all(mask == 1) and mem[:, 0, 0, 0].tolist() == [7.0, 4.0]  # anchor + the last frame
    bank.reset()  # an interrupt: back to the anchor alone
    assert bank.condition((3, 4, 4), 0.0, None, cpu, f32)[0][:, 0, 0, 0].tolist() == [7.0, 7.0]
    one = MemoryBank(1, anchor=portrait)  # a single slot must carry frames, or there is no continuity
    one.update(torch.ones(2, 3, 4, 4))
    assert one.condition((3, 4, 4), 0.0, None, cpu, f32)[0][:, 0, 0, 0].tolist() == [1.0]


def test_training_regularisation_noise_and_mask_ratio():
    g = torch.Generator().manual_seed(0)
    mem = torch.randn(64, 2, 4, 8, 8, generator=g)
    noised, mask = regularize_memory(mem, noise_max=0.05, mask_ratio=0.25, generator=g)
    assert mask.shape == (64, 2, 8, 8)
    assert abs(float(1 - mask.mean()) - 0.25) < 0.03
    assert 0 < float((noised - mem).abs().mean()) < 0.1


def test_weighted_flow_loss_is_a_weighted_mean_and_reduces_to_the_plain_one():
    from letstalk_rt.diffusion import FlowMatching

    g = torch.Generator().manual_seed(0)
    x0, z, v = (torch.randn(2, 3, 4, 8, 8, generator=g) for _ in range(3))
    flow = FlowMatching()
    plain = flow.loss(v, x0, z)
    assert torch.allclose(flow.loss(v, x0, z, weight=torch.ones(2, 1, 1, 8, 8)), plain)
    w = torch.ones(2, 1, 1, 8, 8)
    w[..., 5:7, 3:5] += 4.0  # the "mouth" cells count 5x
    err = (v - flow.target(x0, z)) ** 2
    expected = (err.sum() + 4 * err[..., 5:7, 3:5].sum()) / (err.numel() + 4 * 2 * 3 * 4 * 2 * 2)
    assert torch.allclose(flow.loss(v, x0, z, weight=w), expected)
