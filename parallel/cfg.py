"""CFG parallelism: the conditional and the unconditional pass on the two halves of the "cfg" mesh dim, and the one
entry point (``setup_parallel``) that puts dp x cfg x ring x ulysses x tp together for the CLI.

Half 0 evaluates the conditional branch, half 1 the unconditional one, each with its own ring/ulysses/tp ranks.
Once per step the two velocities (fp32, the size of the latent) are exchanged with one all-gather over the cfg
group, and both halves combine them with the same arithmetic as the sequential sampler, so the latents stay
identical on every rank. Each half encodes only its own prompt (``BranchText``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from k5.engine.config import DiTConfig
from k5.engine.chain import BRANCHES, Conditioning, StepCall, Velocity, combine_cfg, compose, uses_cfg
from k5.engine.text import TextEmbeds
from k5.parallel.comm_stats import CommStats
from k5.parallel.mesh import ParallelDims
from k5.parallel.sequence import apply_sequence_parallel, plan_layout
from k5.parallel.tensor import (check_tensor_parallel, check_tp_degree, format_parameter_bytes, load_dit,
                                parameter_bytes)
from k5.parallel.text_share import SharedText, is_text_source, share_expansion

COND, UNCOND = 0, 1  # cfg rank -> branch (BRANCHES[rank])


def check_cfg_parallel(guidance_scale: float) -> None:
    """--cfg-parallel needs two branches to run; raise if the guidance scale turns the unconditional one off."""
    if not uses_cfg(guidance_scale):
        raise ValueError(
            f"--cfg-parallel runs the unconditional pass on half of the GPUs, but --guidance-scale {guidance_scale:g} "
            f"has no unconditional pass; drop --cfg-parallel (and give its GPUs to --ulysses-degree / --ring-degree)"
        )


class CfgParallel:
    """The guiding stage of the step chain (k5.engine.chain) under CFG parallelism: this half's branch, then one
    exchange. Put it first in ``sample(chain=[...])`` / ``Kandinsky5Pipeline.generate(chain=[...])``; the stages
    after it (the step cache) see this half's branch only."""

    guides = True

    def __init__(self, dims: ParallelDims, stats: CommStats | None = None):
        if dims.cfg != 2:
            raise ValueError(f"CFG parallelism needs a cfg mesh dim of size 2, got {dims.cfg}")
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

    def guided(self, velocity: Velocity, inp: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning | None,
               guidance_scale: float) -> Tensor:
        """The former ``guided=`` hook's signature, for its callers: this stage alone in front of ``velocity``
        (``sample(guided=...)`` puts it in front of the rest of the chain)."""
        return compose([self], velocity)(StepCall(inp, t, 0, 1, guidance_scale, cond, uncond))


class BranchText:
    """Wraps a text encoder (TextEncoder or SharedText) so that each cfg half encodes only its own prompt.

    Asked for [prompt, negative_prompt] (what Kandinsky5Pipeline.generate asks), it encodes the one of this half
    and returns both rows; the other half's row is NaN (embeddings and pooled vector), never evaluated by
    ``CfgParallel.guided``, and any accidental use turns the output into NaN instead of a plausible wrong video.
    The truncation flags are exchanged, so both halves know whether the prompt was truncated.
    """

    def __init__(self, inner, dims: ParallelDims):
        if dims.cfg != 2:
            raise ValueError(f"BranchText needs a cfg mesh dim of size 2, got {dims.cfg}")
        self.inner, self.group, self.branch = inner, dims.group("cfg"), dims.rank("cfg")

    def encode(self, prompts: list[str]) -> TextEmbeds:
        if len(prompts) != 2:
            return self.inner.encode(prompts)  # no guidance: both halves need the one prompt
        own = self.inner.encode([prompts[self.branch]])
        flag = torch.tensor([int(own.truncated[0])], device=own.embeds.device)
        flags = [torch.empty_like(flag) for _ in range(2)]
        dist.all_gather(flags, flag, group=self.group)

        def both(t: Tensor, other: Tensor) -> Tensor:
            return torch.cat([t, other] if self.branch == COND else [other, t])

        nan = lambda t: torch.full_like(t, float("nan"))
        return TextEmbeds(both(own.embeds, nan(own.embeds)), both(own.mask, own.mask),
                          both(own.pooled, nan(own.pooled)), [bool(f.item()) for f in flags])


def plan_parallel(world_size: int, config: DiTConfig, tp: int = 1, cfg_parallel: bool = False, dp: int | None = None,
                  ulysses: int | None = None, ring: int | None = None) -> ParallelDims:
    """Degrees for the CLI flags: tp, cfg (2 with --cfg-parallel) and dp as given, the rest over ulysses x ring.

    ``dp=None`` is inferred: the world left over when ulysses and ring are both given, else 1. The degrees must
    multiply to ``world_size``, and the heads each tp rank holds must divide by the ulysses degree; otherwise one
    ValueError says what would fit.
    """
    heads, cfg = config.num_heads, 2 if cfg_parallel else 1
    check_tp_degree(config, tp)
    if dp is None:
        rest = cfg * tp * (ulysses or 0) * (ring or 0)
        dp = world_size // rest if rest and world_size % rest == 0 else 1
    try:
        dims = plan_layout(world_size, heads // tp, ulysses, ring, dp=dp, cfg=cfg, tp=tp)
    except ValueError as e:
        if tp > 1 and "heads do not divide" in str(e):
            raise ValueError(f"with --tp-degree {tp} each rank holds {heads // tp} of the {heads} heads, and {e}") \
                from None
        raise
    check_tensor_parallel(config, dims)
    return dims


@dataclass
class ParallelSetup:
    dims: ParallelDims
    pipeline: object  # k5.engine.pipeline.Kandinsky5Pipeline with the parallel DiT and text encoder
    guided: Callable | None  # pass to pipeline.generate(req, guided=...)
    stats: CommStats  # bytes sent by every collective of the DiT, the CFG exchange and the text broadcast
    parameter_bytes: dict[str, int]  # this rank's DiT parameters (k5.parallel.tensor.parameter_bytes)

    def describe(self) -> str:
        d = self.dims
        return (f"layout dp {d.dp} x cfg {d.cfg} x ring {d.ring} x ulysses {d.ulysses} x tp {d.tp}; "
                + format_parameter_bytes(self.parameter_bytes))


def image_sharing(dims: ParallelDims, device):
    """The I2V image is encoded once per item, on the item group's rank 0, and broadcast to the others."""
    from k5.parallel.vae_tiles import broadcast_image_latent

    def share(encode):
        latent = encode() if dims.rank("item") == 0 else None
        return broadcast_image_latent(latent, dims.group("item"), src=0, device=device)

    return share


def setup_parallel(root: str | Path, *, tp: int = 1, cfg_parallel: bool = False, dp: int | None = None,
                   ulysses: int | None = None, ring: int | None = None, dtype: torch.dtype = torch.bfloat16,
                   device="cpu", keep_text: bool = False, expand: bool = False, adapters=()) -> ParallelSetup:
    """Everything a rank needs to generate with the given degrees (torch.distributed already initialized).

    Order: degrees checked (before any weight is read) -> mesh -> DiT on meta, cut for tp, filled with this rank's
    slices -> sequence parallelism -> text encoders on one rank per replica (per cfg half) -> VAE on every rank
    (the tiled parallel decode needs it everywhere).
    """
    from k5.engine.pipeline import Kandinsky5Pipeline, make_expander
    from k5.engine.text import TextEncoder

    if not dist.is_initialized():
        raise RuntimeError("setup_parallel needs torch.distributed initialized (torchrun / init_process_group)")
    root, device = Path(root), torch.device(device)
    config = Kandinsky5Pipeline.read_config(root)
    dims = plan_parallel(dist.get_world_size(), config, tp, cfg_parallel, dp, ulysses, ring)
    dims.build_mesh(device.type)

    stats = CommStats()
    dit, _ = load_dit(root, dims, dtype, device, stats, config, adapters=adapters)
    if dims.sp_size > 1:
        apply_sequence_parallel(dit, dims, stats)
    encoder = (TextEncoder.from_pretrained(root, torch_dtype=dtype, device=device, lm_head=expand)
               if is_text_source(dims) else None)
    text = SharedText.for_dims(encoder, dims, device, keep=keep_text, stats=stats)
    if cfg_parallel:
        text = BranchText(text, dims)
    pipeline = Kandinsky5Pipeline.from_pretrained(root, dtype, device, dit=dit, text=text)
    pipeline.share_image = image_sharing(dims, device)
    if expand:
        pipeline.expander = make_expander(encoder)
        pipeline.share_text = share_expansion(dims, device)
    guided = CfgParallel(dims, stats).guided if cfg_parallel else None
    return ParallelSetup(dims, pipeline, guided, stats, parameter_bytes(dit))
