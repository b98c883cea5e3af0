"""The Kandinsky 6 schedules against diffusers' FlowMatchEulerDiscreteScheduler and PiflowScheduler.

Equal (torch.equal), not close: both sides evaluate the same fp32 expressions in the same order on the same tensors,
so any difference would be a different rule. Each step is taken from the same sample and prediction on both sides,
at every step index of a schedule (PiFlow's last segment ends at eps and is a different branch), for a video and an
audio latent (the two shapes the sampler steps), with random widened predictions.
"""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, PiflowScheduler

from k5.engine.sampling.k6_schedule import EulerSchedule, PiFlowSchedule, flow_sigmas, schedule_from_config

SHAPES = {"video": (2, 3, 4, 6, 16), "audio": (2, 11, 40)}


@pytest.mark.parametrize("steps,shift", [(1, 5.0), (4, 5.0), (50, 5.0), (7, 3.0), (9, 1.0)])
def test_euler_sigmas_equal_the_scheduler(steps, shift):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(steps)
    ours = EulerSchedule.default(steps, shift)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(ours.timesteps, ref.timesteps)
    # diffusers' quirk, kept: the smallest sigma is 1/1000 shifted twice (0.0244 at shift 5), not once (0.00498)
    once = shift * 0.001 / (1 + (shift - 1) * 0.001)
    if steps > 1:
        assert abs(ours.sigmas[-2].item() - shift * once / (1 + (shift - 1) * once)) < 1e-7


@pytest.mark.parametrize("stream", list(SHAPES))
def test_euler_steps_equal_the_scheduler(stream):
    steps = 4
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    ref.set_timesteps(steps)
    ours = EulerSchedule.default(steps, 5.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPES[stream], generator=g)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(SHAPES[stream], generator=g)
        want = ref.step(v, t, x, return_dict=False)[0]
        got = ours.step(i, v, x)
        assert torch.equal(got, want), i
        x = want


@pytest.mark.parametrize("steps", [1, 2, 4, 16])
def test_piflow_schedule_equals_the_scheduler(steps):
    ref = PiflowScheduler()
    ref.set_timesteps(steps)
    ours = PiFlowSchedule(steps)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.sigmas[0] == 1.0 and ours.sigmas[-1] == 0.0


@pytest.mark.parametrize("stream", list(SHAPES))
@pytest.mark.parametrize("config", [dict(), dict(n_grid=4, shift=3.0, final_step_size_scale=1.0,
                                                 num_policy_substeps=32)])
def test_piflow_steps_equal_the_scheduler(stream, config):
    steps = 3
    ref = PiflowScheduler(**config)
    ref.set_timesteps(steps)
    ours = PiFlowSchedule(steps, **config)
    n = ours.n_grid
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPES[stream], generator=g)
    for i, t in enumerate(ref.timesteps):
        out = torch.randn(*SHAPES[stream][:-1], n * SHAPES[stream][-1], generator=g)
        want = ref.step(out, t, x, return_dict=False)[0]
        got = ours.step(i, out, x)
        assert torch.equal(got, want), i
        assert (got - x).abs().max() > 1e-3  # a step moves the latent
        x = want


def test_piflow_step_refuses_a_velocity_output():
    with pytest.raises(ValueError, match="distilled checkpoint"):
        PiFlowSchedule(4).step(0, torch.zeros(1, 5, 16), torch.zeros(1, 5, 16))


def test_schedule_from_config(tmp_path):
    (tmp_path / "scheduler").mkdir()
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "PiflowScheduler", "shift": 3.0, "n_grid": 4}))
    s = schedule_from_config(tmp_path, 8)
    assert isinstance(s, PiFlowSchedule) and (s.steps, s.shift, s.n_grid) == (8, 3.0, 4)
    path.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0}))
    assert torch.equal(schedule_from_config(tmp_path, 6).sigmas, flow_sigmas(6, 5.0))
    path.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}))
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        schedule_from_config(tmp_path, 6)
    path.write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    with pytest.raises(ValueError, match="PiflowScheduler"):
        schedule_from_config(tmp_path, 6)
