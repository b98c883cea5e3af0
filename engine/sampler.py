"""Flow-matching Euler sampling with classifier-free guidance, as the original Kandinsky 5 code does it.

Schedule (kandinsky5-architecture.md section 5.1): t_i = linspace(1, 0, N+1), shifted t -> s*t / (1 + (s-1)*t);
the DiT sees t*1000 in fp32 (diffusers rounds it to the compute dtype and uses another sigma grid, section 5.3);
x_{i+1} = x_i + (t_{i+1} - t_i) * v. The latent state is kept in fp32 across steps: the DiT input is cast to its
compute dtype each step, so only the accumulation differs from the original's bf16 state, and it is more exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

DEFAULT_SHIFT = 5.0


def timesteps(steps: int, shift: float = DEFAULT_SHIFT) -> Tensor:
    """The N+1 times of the shifted schedule, from 1 (noise) to 0 (data), fp32."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)
    return shift * t / (1 + (shift - 1) * t)


def uses_cfg(guidance_scale: float) -> bool:
    # The reference skips the unconditional pass when |w - 1| <= 1e-6 (nocfg and distilled checkpoints).
    return abs(guidance_scale - 1.0) > 1e-6


def combine_cfg(v_cond: Tensor, v_uncond: Tensor, guidance_scale: float) -> Tensor:
    return v_uncond + guidance_scale * (v_cond - v_uncond)


@dataclass
class Conditioning:
    """What the DiT needs besides the latent: text embeddings, their key mask and the CLIP pooled vector."""

    embeds: Tensor
    mask: Tensor | None
    pooled: Tensor


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


Velocity = Callable[[Tensor, Tensor, Conditioning], Tensor]  # (model input, t*1000 [B] fp32, conditioning) -> v


def guided_velocity(velocity: Velocity, inp: Tensor, t: Tensor, cond: Conditioning,
                    uncond: Conditioning | None, guidance_scale: float) -> Tensor:
    v = velocity(inp, t, cond).float()
    if uncond is None or not uses_cfg(guidance_scale):
        return v
    return combine_cfg(v, velocity(inp, t, uncond).float(), guidance_scale)


def sample(velocity: Velocity, noise: Tensor, cond: Conditioning, uncond: Conditioning | None, *, steps: int,
           guidance_scale: float, shift: float = DEFAULT_SHIFT, visual_cond: bool = True,
           first_frame: Tensor | None = None, on_step: Callable[[int], None] | None = None,
           guided: Callable | None = None) -> Tensor:
    """Integrate from noise [B,T,H,W,16] (fp32) to the final latent (fp32).

    ``guided`` replaces ``guided_velocity`` (CFG parallelism runs the two branches on two halves of the mesh).
    """
    guided = guided or guided_velocity
    ts = timesteps(steps, shift)
    x = noise.float()
    for i in range(steps):
        inp = model_input(x, visual_cond, first_frame)
        t = (ts[i] * 1000).expand(x.shape[0]).to(x.device)
        v = guided(velocity, inp, t, cond, uncond, guidance_scale)
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
