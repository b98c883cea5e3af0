"""The two Kandinsky 6 schedules: flow-matching Euler for the sft checkpoints, PiFlow for the distilled ones.

Both give the DiT's timesteps (sigma * 1000, fp32) and advance a latent by one step from the DiT's prediction. They
are stateless (a step is told its index), so the video and the audio latent share one schedule object (diffusers
deep-copies its scheduler for the audio, because its schedulers count their steps).

Euler: the schedule of diffusers' FlowMatchEulerDiscreteScheduler (what the sft checkpoints ship), which is not the
Kandinsky 5 original's: N times from linspace(1000, 1000 * shift(1/1000), N), divided by 1000 and shifted *again*
(the smallest sigma is shifted twice), then a terminal 0. Computed with numpy in float64 as there, so the sigmas are
the scheduler's to the bit.

PiFlow (pi-Flow, arXiv 2510.14974, as diffusers' PiflowScheduler): the distilled DiT predicts n_grid clean-latent
estimates x0_k per channel (its outputs are n_grid times wider), read as a piecewise-linear x0 over the step's
segment of *raw* time (before the shift). Between two DiT evaluations a network-free policy integrates the flow
v = (x_t - x0(raw t)) / sigma_t with up to ``num_policy_substeps`` Euler substeps per unit of raw time. Raw times
1, 1 - d, 1 - 2d, ... with d = 1 / (N - (1 - final_step_size_scale)), so the last segment is that scale of the
others and ends at eps. All in fp32, each expression in the order of the reference, so that the steps equal it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def shift_sigma(t, shift: float):
    """Raw flow-matching time -> the DiT's shifted time."""
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> Tensor:
    """The N+1 sigmas of FlowMatchEulerDiscreteScheduler(shift).set_timesteps(N) (static shift, no extras)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = num_train_timesteps
    # The scheduler's own sigma range: its fp32 training grid 1..n, shifted once.
    train = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
    train = shift_sigma(train, shift)
    sigma_max, sigma_min = train[0].item(), train[-1].item()
    sigmas = np.linspace(sigma_max * n, sigma_min * n, steps) / n
    sigmas = torch.from_numpy(shift_sigma(sigmas, shift)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


@dataclass(frozen=True)
class EulerSchedule:
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v, in fp32."""

    sigmas: Tensor  # N+1, from 1 (noise) down to 0
    num_train_timesteps: int = 1000

    @classmethod
    def default(cls, steps: int, shift: float = 5.0) -> "EulerSchedule":
        return cls(flow_sigmas(steps, shift))

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def timesteps(self) -> Tensor:
        return self.sigmas[:-1] * self.num_train_timesteps

    @property
    def n_grid(self) -> int:
        return 1

    def step(self, i: int, velocity: Tensor, x: Tensor) -> Tensor:
        return x.float() + (self.sigmas[i + 1] - self.sigmas[i]) * velocity


@dataclass(frozen=True)
class PiFlowSchedule:
    """The PiFlow sampler of the distilled checkpoints (module docstring); fields as PiflowScheduler's config."""

    steps: int
    shift: float = 5.0
    n_grid: int = 10
    eps: float = 1e-6
    final_step_size_scale: float = 0.5
    num_policy_substeps: int = 128
    num_train_timesteps: int = 1000
    raw: Tensor = field(init=False, repr=False, compare=False)
    sigmas: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.n_grid < 2 or self.eps <= 0 or not 0 < self.final_step_size_scale <= 1 \
                or self.num_policy_substeps < 1:
            raise ValueError(f"PiFlow needs n_grid >= 2, eps > 0, 0 < final_step_size_scale <= 1 and "
                             f"num_policy_substeps >= 1; got {self}")
        segment = 1.0 / (self.steps - (1.0 - self.final_step_size_scale))
        raw = 1.0 - torch.arange(self.steps, dtype=torch.float32) * segment
        sigmas = shift_sigma(raw, float(self.shift))
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "sigmas", torch.cat([sigmas, sigmas.new_zeros(1)]))

    @property
    def timesteps(self) -> Tensor:
        return self.sigmas[:-1] * self.num_train_timesteps

    def _unwarp(self, sigma: Tensor) -> Tensor:
        return sigma / (self.shift + (1 - self.shift) * sigma)

    def step(self, i: int, output: Tensor, x: Tensor) -> Tensor:
        """Advance x [B, ..., C] from grid point i to i+1 with the DiT's widened output [B, ..., n_grid * C]."""
        x = x.float()
        if output.shape[:-1] != x.shape[:-1] or output.shape[-1] != self.n_grid * x.shape[-1]:
            raise ValueError(f"PiFlow needs the DiT output [..., {self.n_grid} x {x.shape[-1]}] of the latent "
                             f"{tuple(x.shape)}; got {tuple(output.shape)} (is this a distilled checkpoint?)")
        B, ones = x.shape[0], (1,) * (x.dim() - 1)
        # [B, ..., n*C] -> [B, n, ..., C]: the n clean-latent estimates of the segment
        grid = output.reshape(*output.shape[:-1], self.n_grid, x.shape[-1]).movedim(-2, 1)
        raw_src = self.raw[i].to(x.device)
        raw_dst = (self.raw[i + 1] if i + 1 < self.steps else self.raw.new_full((), self.eps)).to(x.device)
        sigma = self.sigmas[i].to(x.device).expand(B).reshape(B, *ones)

        # The policy of this segment: x0 estimates at raw times spread evenly over [raw_dst, raw_src].
        seg_src = self._unwarp(sigma)
        seg_dst = (seg_src - (raw_src - raw_dst).expand(B).reshape(B, *ones)).clamp(min=0)
        seg_len = (seg_src - seg_dst).clamp(min=self.eps)
        x0 = x.unsqueeze(1) - sigma.unsqueeze(1) * grid

        start, end = raw_src.expand(B).reshape(B, *ones), raw_dst.expand(B).reshape(B, *ones)
        delta = start - end
        substeps = (delta * self.num_policy_substeps).round().to(torch.long).clamp(min=1)
        size = delta / substeps
        raw_t, sigma_t = start, sigma
        for k in range(substeps.max().item()):
            velocity = (x - _interpolate(x0, (self._unwarp(sigma_t) - seg_dst) / seg_len)) / \
                sigma_t.clamp(min=self.eps)
            raw_next = (raw_t - size).clamp(min=0)
            sigma_next = shift_sigma(raw_next, self.shift)
            x_next = x + velocity * (sigma_next - sigma_t)
            active = substeps > k
            x = torch.where(active, x_next, x)
            sigma_t = torch.where(active, sigma_next, sigma_t)
            raw_t = torch.where(active, raw_next, raw_t)
        return x


def _interpolate(x0: Tensor, t: Tensor) -> Tensor:
    """Piecewise-linear x0 [B, n, ...] at the relative segment time t [B, 1, ...] (0: segment end, 1: start)."""
    n = x0.size(1)
    t = t.clamp(min=0, max=1) * (n - 1)
    t0 = t.floor().to(torch.long).clamp(min=0, max=n - 2)
    t1 = t0 + 1
    pair = torch.gather(x0, 1, torch.stack([t0, t1], dim=1).expand(-1, -1, *x0.shape[2:]))
    return (t1 - t) * pair[:, 0] + (t - t0) * pair[:, 1]


Schedule = EulerSchedule | PiFlowSchedule

_EULER_DEFAULTS = {"num_train_timesteps": 1000, "shift": 1.0}
_EULER_UNSUPPORTED = ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                      "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")


def schedule_from_config(path: str | Path, steps: int) -> Schedule:
    """The schedule of a checkpoint's ``scheduler/scheduler_config.json`` (or a pipeline root holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "scheduler" / "scheduler_config.json" if (path / "scheduler").is_dir() \
            else path / "scheduler_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the scheduler config {path}: {e}") from e
    name = config.get("_class_name")
    if name == "PiflowScheduler":
        keys = ("num_train_timesteps", "shift", "n_grid", "eps", "final_step_size_scale", "num_policy_substeps")
        return PiFlowSchedule(steps, **{k: config[k] for k in keys if k in config})
    if name == "FlowMatchEulerDiscreteScheduler":
        used = [k for k in _EULER_UNSUPPORTED if config.get(k)]
        if used:
            raise ValueError(f"{path} sets {', '.join(used)}; the Kandinsky 6 Euler schedule supports a static shift "
                             f"only")
        cfg = {**_EULER_DEFAULTS, **{k: config[k] for k in _EULER_DEFAULTS if k in config}}
        return EulerSchedule(flow_sigmas(steps, float(cfg["shift"]), cfg["num_train_timesteps"]),
                             cfg["num_train_timesteps"])
    raise ValueError(f"{path} describes a {name!r} scheduler; Kandinsky 6 checkpoints ship a "
                     f"FlowMatchEulerDiscreteScheduler (sft) or a PiflowScheduler (distilled)")
