"""The step chain: how one denoising step turns into DiT forwards, as a list of stages each calling the next.

A step asks the chain for the velocity of one ``StepCall`` (model input, time, step index, both conditionings).
Stages run outermost first; each does its part and calls ``next`` with a (possibly changed) call:

- a *guiding* stage comes first and splits the step into its branches: ``Guidance`` runs the conditional and the
  unconditional forward one after the other and combines them (the reference's CFG); ``CfgParallel``
  (k5.parallel.cfg) runs only this cfg half's branch and exchanges velocities;
- the stages after it see one branch at a time (``call.branch`` is "cond" or "uncond"): the step cache
  (k5.engine.sampling.magcache.MagCache) and whatever comes later;
- the end of the chain is the model: ``velocity(inp, t, cond, **call.dit_kwargs)``.

A chain without a guiding stage gets ``Guidance()`` in front, so a caller adds only what it changes. The chain is
the only way a sampler feature changes a step: a new feature is one more stage.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from torch import Tensor

BRANCHES = ("cond", "uncond")


@dataclass
class Conditioning:
    """What the DiT needs besides the latent: text embeddings, their key mask and the CLIP pooled vector."""

    embeds: Tensor
    mask: Tensor | None
    pooled: Tensor


# (model input, t*1000 [B] fp32, conditioning, **DiT keyword arguments) -> velocity
Velocity = Callable[..., Tensor]


def uses_cfg(guidance_scale: float) -> bool:
    # The reference skips the unconditional pass when |w - 1| <= 1e-6 (nocfg and distilled checkpoints).
    return abs(guidance_scale - 1.0) > 1e-6


def combine_cfg(v_cond: Tensor, v_uncond: Tensor, guidance_scale: float) -> Tensor:
    return v_uncond + guidance_scale * (v_cond - v_uncond)


@dataclass(frozen=True)
class StepCall:
    inp: Tensor  # model input [B, T, H, W, C_in]
    t: Tensor  # t*1000 [B] fp32
    index: int  # step index, 0 .. steps-1
    steps: int
    guidance_scale: float
    cond: Conditioning  # the conditioning to evaluate (after the split: this branch's)
    uncond: Conditioning | None = None  # None after the split, or when the step has one branch only
    branch: str | None = None  # None before the split, then "cond" or "uncond"
    dit_kwargs: dict = field(default_factory=dict)  # extra keyword arguments of the DiT forward

    @property
    def guided(self) -> bool:
        """Whether this step has an unconditional branch."""
        return self.uncond is not None and uses_cfg(self.guidance_scale)

    def branch_call(self, branch: str) -> "StepCall":
        """The call for one branch: its conditioning, no other."""
        if branch not in BRANCHES:
            raise ValueError(f"branch {branch!r} is not one of {BRANCHES}")
        cond = self.cond if branch == "cond" else self.uncond
        if cond is None:
            raise ValueError("this step has no unconditional branch")
        return dataclasses.replace(self, cond=cond, uncond=None, branch=branch)

    def with_dit_kwargs(self, **kwargs) -> "StepCall":
        return dataclasses.replace(self, dit_kwargs={**self.dit_kwargs, **kwargs})


Next = Callable[[StepCall], Tensor]


class Stage(Protocol):
    guides: bool  # True: splits the step into branches (at most one such stage, the first)

    def __call__(self, call: StepCall, next: Next) -> Tensor: ...


class Guidance:
    """Classifier-free guidance, the branches one after the other: v_u + w (v_c - v_u), as the reference."""

    guides = True

    def __call__(self, call: StepCall, next: Next) -> Tensor:
        v = next(call.branch_call("cond"))
        if not call.guided:
            return v
        return combine_cfg(v, next(call.branch_call("uncond")), call.guidance_scale)


def model_end(velocity: Velocity) -> Next:
    """The end of the chain: one DiT forward for one branch, fp32 out (as the sampler combined it before)."""

    def run(call: StepCall) -> Tensor:
        if call.branch is None:
            raise ValueError("the chain reached the model before a guiding stage chose a branch")
        return velocity(call.inp, call.t, call.cond, **call.dit_kwargs).float()

    return run


def compose(stages: Sequence[Stage], velocity: Velocity) -> Next:
    """The chain as one function of a StepCall. ``Guidance()`` goes in front unless a stage guides."""
    stages = list(stages)
    guiding = [i for i, s in enumerate(stages) if getattr(s, "guides", False)]
    if not guiding:
        stages.insert(0, Guidance())
    elif guiding != [0]:
        names = ", ".join(type(stages[i]).__name__ for i in guiding)
        raise ValueError(f"the step chain needs exactly one guiding stage, first; got {names} at {guiding}")
    fn = model_end(velocity)
    for stage in reversed(stages):
        fn = (lambda s, nxt: lambda call: s(call, nxt))(stage, fn)
    return fn
