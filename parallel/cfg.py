"""CFG parallelism: the conditional and the unconditional pass on the two halves of the "cfg" mesh dim.

Half 0 evaluates the conditional branch, half 1 the unconditional one, each with its own ring/ulysses/tp ranks.
Once per step the two velocities (fp32, the size of the latent) are exchanged with one all-gather over the cfg
group, and both halves combine them with the same arithmetic as the sequential sampler, so the latents stay
identical on every rank. Each half encodes only its own prompt (``BranchText``). k5.parallel.plan applies both.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from k5.engine.sampling.chain import BRANCHES, StepCall, combine_cfg, uses_cfg
from k5.engine.encoders.text import TextEmbeds
from k5.parallel.comm_stats import CommStats
from k5.parallel.mesh import LayoutError, ParallelDims

COND, UNCOND = 0, 1  # cfg rank -> branch (BRANCHES[rank])


def check_cfg_parallel(guidance_scale: float) -> None:
    """--cfg-parallel needs two branches to run; raise if the guidance scale turns the unconditional one off."""
    if not uses_cfg(guidance_scale):
        raise LayoutError(
            f"--cfg-parallel runs the unconditional pass on half of the GPUs, but --guidance-scale {guidance_scale:g} "
            f"has no unconditional pass; drop --cfg-parallel (and give its GPUs to --ulysses-degree / --ring-degree)",
            {"cfg": 2},
        )


class CfgParallel:
    """The guiding stage of the step chain (k5.engine.sampling.chain) under CFG parallelism: this half's branch, then one
    exchange. Put it first in ``sample(chain=[...])`` / ``Kandinsky5Pipeline.generate(chain=[...])``; the stages
    after it (the step cache) see this half's branch only."""

    guides = True

    def __init__(self, dims: ParallelDims, stats: CommStats | None = None):
        if dims.cfg != 2:
            raise LayoutError(f"CFG parallelism needs a cfg mesh dim of size 2, got {dims.cfg}", dims.degrees)
        self.group, self.branch = dims.group("cfg"), dims.rank("cfg")
        self.stats = stats if stats is not None else CommStats()

    def __call__(self, call: StepCall, next) -> Tensor:
        if not call.guided:
            return next(call.branch_call("cond"))  # one branch only: both halves compute it
        own = next(call.branch_call(BRANCHES[self.branch])).contiguous()
        parts = [torch.empty_like(own) for _ in range(2)]
        dist.all_gather(parts, own, group=self.group)
        self.stats.all_gather(own, 2)
        return combine_cfg(parts[COND], parts[UNCOND], call.guidance_scale)


class BranchText:
    """Wraps a text encoder (TextEncoder or SharedText) so that each cfg half encodes only its own prompt.

    Asked for [prompt, negative_prompt] (what Kandinsky5Pipeline.generate and ImagePipeline.generate ask; an image
    edit gives the source image with each), it encodes the one of this half and returns both rows; the other half's
    row is NaN (embeddings and pooled vector), never evaluated by ``CfgParallel``, and any accidental use
    turns the output into NaN instead of a plausible wrong video. Rows of image-edit prompts are as long as this
    half's own prompt (unpadded), which is all the DiT of this half sees.
    The truncation flags are exchanged, so both halves know whether the prompt was truncated.
    """

    def __init__(self, inner, dims: ParallelDims):
        if dims.cfg != 2:
            raise LayoutError(f"BranchText needs a cfg mesh dim of size 2, got {dims.cfg}", dims.degrees)
        self.inner, self.group, self.branch = inner, dims.group("cfg"), dims.rank("cfg")

    def encode(self, prompts: list[str], **kwargs) -> TextEmbeds:
        """``kwargs`` as TextEncoder.encode (``fmt``, ``images``: one per prompt, of which this half takes its own)."""
        if len(prompts) != 2:
            return self.inner.encode(prompts, **kwargs)  # no guidance: both halves need the one prompt
        if kwargs.get("images") is not None:
            kwargs["images"] = [kwargs["images"][self.branch]]
        own = self.inner.encode([prompts[self.branch]], **kwargs)
        flag = torch.tensor([int(own.truncated[0])], device=own.embeds.device)
        flags = [torch.empty_like(flag) for _ in range(2)]
        dist.all_gather(flags, flag, group=self.group)

        def both(t: Tensor, other: Tensor) -> Tensor:
            return torch.cat([t, other] if self.branch == COND else [other, t])

        nan = lambda t: torch.full_like(t, float("nan"))
        return TextEmbeds(both(own.embeds, nan(own.embeds)), both(own.mask, own.mask),
                          both(own.pooled, nan(own.pooled)), [bool(f.item()) for f in flags])
