"""Flow-matching Euler sampling with classifier-free guidance, as the original Kandinsky 5 code does it.

Schedule (kandinsky5-architecture.md section 5.1): t_i = linspace(1, 0, N+1), shifted t -> s*t / (1 + (s-1)*t);
the DiT sees t*1000 in fp32 (diffusers rounds it to the compute dtype and uses another sigma grid, section 5.3);
x_{i+1} = x_i + (t_{i+1} - t_i) * v. The latent state is kept in fp32 across steps: the DiT input is cast to its
compute dtype each step, so only the accumulation differs from the original's bf16 state, and it is more exact.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

# The guidance math and the conditioning type live with the step chain; imported here for existing callers.
from k5.engine.sampling.chain import Conditioning, Stage, StepCall, Velocity, combine_cfg, compose, uses_cfg

DEFAULT_SHIFT = 5.0


def timesteps(steps: int, shift: float = DEFAULT_SHIFT) -> Tensor:
    """The N+1 times of the shifted schedule, from 1 (noise) to 0 (data), fp32."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)
    return shift * t / (1 + (shift - 1) * t)


def model_input(x: Tensor, visual_cond: bool, first_frame: Tensor | None) -> Tensor:
    """[x, visual_cond, mask] along channels (33 channels) for visual_cond checkpoints.

    I2V overwrites latent frame 0 with the image latent and sets the mask there; visual_cond stays all zeros
    (diffusers' PR #14282 fixed the opposite, which caused artifacts).
    """
    if first_frame is not None:
        x = x.clone()
        x[:, :1] = first_frame
    if not visual_cond:
        return x
    mask = torch.zeros_like(x[..., :1])
    if first_frame is not None:
        mask[:, :1] = 1
    return torch.cat([x, torch.zeros_like(x), mask], -1)


def sample(velocity: Velocity, noise: Tensor, cond: Conditioning, uncond: Conditioning | None, *, steps: int,
           guidance_scale: float, shift: float = DEFAULT_SHIFT, visual_cond: bool = True,
           first_frame: Tensor | None = None, on_step: Callable[[int], None] | None = None,
           chain: Sequence[Stage] = ()) -> Tensor:
    """Integrate from noise [B,T,H,W,16] (fp32) to the final latent (fp32).

    Each step's velocity comes from the step chain (k5.engine.sampling.chain): ``chain`` lists its stages (CFG parallel,
    the step cache, ...); ``Guidance`` is put in front when no stage guides.
    """
    run = compose(chain, velocity)
    ts = timesteps(steps, shift)
    x = noise.float()
    # The DiT's times, copied to the device once, before the loop: a copy from pageable host memory at every step
    # would synchronise the stream. The step sizes stay host scalars (a CPU 0-dim operand is passed by value).
    t_device = (ts[:-1] * 1000).to(x.device)
    for i in range(steps):
        inp = model_input(x, visual_cond, first_frame)
        t = t_device[i].expand(x.shape[0])
        v = run(StepCall(inp, t, i, steps, guidance_scale, cond, uncond))
        x = x + (ts[i + 1] - ts[i]) * v
        if on_step is not None:
            on_step(i)
    if first_frame is not None:
        x[:, :1] = first_frame
    return x


def initial_noise(shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> Tensor:
    """Noise drawn on the CPU from the seed, so every device and every world size starts from the same latent."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device)
