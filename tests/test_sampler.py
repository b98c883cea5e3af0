import pytest
import torch

from k5.engine.sampling.sampler import Conditioning, combine_cfg, initial_noise, model_input, sample, timesteps


def test_schedule_by_hand():
    # shift 5, 2 steps: t = 1, 0.5, 0 -> 1, 5*0.5/(1+4*0.5) = 5/6, 0
    assert torch.allclose(timesteps(2, 5.0), torch.tensor([1.0, 5 / 6, 0.0]))
    # shift 1 is the plain linear grid
    assert torch.allclose(timesteps(4, 1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="steps"):
        timesteps(0)


def _cond(v):
    return Conditioning(embeds=torch.full((1, 2, 3), float(v)), mask=None, pooled=torch.zeros(1, 4))


def test_euler_with_constant_velocity_lands_at_x0_minus_v():
    # dx/dt = v from t=1 to t=0 gives x(0) = x(1) - v, whatever the schedule
    calls = []

    def velocity(inp, t, cond):
        calls.append((t.dtype, t.clone(), cond.embeds[0, 0, 0].item()))
        return torch.full_like(inp[..., :16], 2.0)

    noise = initial_noise((1, 2, 4, 4, 16), seed=3)
    out = sample(velocity, noise, _cond(1), _cond(0), steps=5, guidance_scale=1.0, shift=5.0)
    assert torch.allclose(out, noise - 2.0, atol=1e-5)
    assert len(calls) == 5 and all(c[2] == 1 for c in calls)  # w == 1: no unconditional pass
    assert calls[0][0] == torch.float32 and calls[0][1].item() == 1000.0


def test_cfg_combines_both_branches():
    def velocity(inp, t, cond):
        return torch.full_like(inp[..., :16], cond.embeds[0, 0, 0].item())

    noise = torch.zeros(1, 1, 2, 2, 16)
    # cond velocity 3, uncond 1, w = 4: 1 + 4 * (3 - 1) = 9 per unit time; one step of length 1
    out = sample(velocity, noise, _cond(3), _cond(1), steps=1, guidance_scale=4.0)
    assert torch.allclose(out, torch.full_like(noise, -9.0))
    assert torch.allclose(combine_cfg(torch.tensor(3.0), torch.tensor(1.0), 4.0), torch.tensor(9.0))


def test_model_input_layout_and_i2v_first_frame():
    x = torch.randn(1, 3, 2, 2, 16)
    first = torch.randn(1, 1, 2, 2, 16)
    inp = model_input(x, True, first)
    assert inp.shape[-1] == 33
    assert torch.equal(inp[:, :1, ..., :16], first) and torch.equal(inp[:, 1:, ..., :16], x[:, 1:])
    assert torch.count_nonzero(inp[..., 16:32]) == 0  # visual_cond stays zero for T2V and I2V
    assert torch.equal(inp[..., 32], torch.tensor([1.0, 0.0, 0.0])[None, :, None, None].expand(1, 3, 2, 2))
    assert torch.equal(model_input(x, False, None), x)


def test_noise_is_seeded():
    assert torch.equal(initial_noise((2, 3), 7), initial_noise((2, 3), 7))
    assert not torch.equal(initial_noise((2, 3), 7), initial_noise((2, 3), 8))
