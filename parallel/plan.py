"""The composition root of k5's parallelism: degree flags and a world size -> ParallelDims -> the one mesh -> a
pipeline with every technique applied.

Two stages, so that bad degrees fail before any weight is read:
- ``plan_parallel`` (no process group, no weights): tp, cfg (2 with --cfg-parallel) and dp as given, ulysses x ring
  filled in, every degree checked against the world size and the model (k5.parallel.mesh; ``LayoutError``).
- ``build_parallel`` (torch.distributed initialized): mesh -> DiT on meta, cut for tp, filled with this rank's
  slices -> sequence parallelism -> text encoders on one rank per replica (per cfg half) -> VAE on every rank (the
  tiled parallel decode needs it everywhere) -> the I2V image encoded once per item group -> the CFG exchange.
One process (all degrees 1) gets the plain single-device pipeline.

Image Lite checkpoints (FLUX VAE; k5.engine.pipelines.image.pipeline_class tells) get an ImagePipeline on the same
layouts: the one-frame token grid is sharded like a video's (pad blocks when it does not divide), the edit prompt and
its source image go to the text source rank, and the I2I source latent is encoded once per item group and broadcast.

The techniques themselves live in their own files: tensor.py, sequence.py, cfg.py, text_share.py, vae_tiles.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from k5.engine.model.config import DiTConfig
from k5.parallel.cfg import BranchText, CfgParallel, check_cfg_parallel
from k5.parallel.comm_stats import CommStats
from k5.parallel.mesh import LayoutError, ParallelDims, check_tp_degree
from k5.parallel.sequence import apply_sequence_parallel
from k5.parallel.tensor import format_parameter_bytes, load_rank_dit, parameter_bytes
from k5.parallel.text_share import SharedText, is_text_source

__all__ = ["LayoutError", "ParallelSetup", "build_parallel", "check_layout", "check_request", "image_sharing",
           "plan_layout", "plan_parallel", "setup_parallel"]


def plan_layout(world_size: int, num_heads: int, ulysses: int | None = None, ring: int | None = None,
                **other_degrees: int) -> ParallelDims:
    """Degrees for a world: what the user gave, the rest filled in (as much Ulysses as the heads allow).

    ``num_heads`` are the heads one tp rank holds; ``other_degrees`` (tp, cfg, dp) are taken as given and the
    sequence-parallel part is world / their product.
    """
    others = math.prod(other_degrees.values()) if other_degrees else 1
    if world_size % others:
        ParallelDims(ulysses=ulysses or 1, ring=ring or 1, **other_degrees).validate(world_size)
    sp = world_size // others
    if ulysses is None and ring is None:
        ulysses = max(u for u in range(1, sp + 1) if sp % u == 0 and num_heads % u == 0)
        ring = sp // ulysses
    elif ulysses is None:
        ulysses = sp // ring if sp % ring == 0 else 0
    elif ring is None:
        ring = sp // ulysses if sp % ulysses == 0 else 0
    dims = ParallelDims(ulysses=max(ulysses, 1), ring=max(ring, 1), **other_degrees)
    dims.validate(world_size)
    dims.check_heads(num_heads)
    return dims


def plan_parallel(world_size: int, config: DiTConfig, tp: int = 1, cfg_parallel: bool = False, dp: int | None = None,
                  ulysses: int | None = None, ring: int | None = None) -> ParallelDims:
    """Degrees for the CLI flags: tp, cfg (2 with --cfg-parallel) and dp as given, the rest over ulysses x ring.

    ``dp=None`` is inferred: the world left over when ulysses and ring are both given, else 1. Raises one
    LayoutError saying what would fit if the degrees do not multiply to ``world_size``, tp does not cut the model,
    or the heads each tp rank holds do not divide by the ulysses degree.
    """
    cfg = 2 if cfg_parallel else 1
    check_tp_degree(config.num_heads, config.ff_dim, tp)
    if dp is None:
        rest = cfg * tp * (ulysses or 0) * (ring or 0)
        dp = world_size // rest if rest and world_size % rest == 0 else 1
    return plan_layout(world_size, config.num_heads // tp, ulysses, ring, dp=dp, cfg=cfg, tp=tp)


def check_layout(config: DiTConfig, dims: ParallelDims) -> None:
    """Raise a LayoutError if the DiT of ``config`` cannot run on ``dims`` (tp cut, heads per Ulysses rank)."""
    dims.check_model(config.num_heads, config.ff_dim)


def check_request(dims: ParallelDims, guidance_scale: float) -> None:
    """Raise a LayoutError if a request cannot run on the layout (CFG parallelism needs two guidance branches)."""
    if dims.cfg == 2:
        check_cfg_parallel(guidance_scale)


@dataclass
class ParallelSetup:
    dims: ParallelDims  # with its mesh when world_size > 1
    pipeline: object  # Kandinsky5Pipeline or ImagePipeline (by checkpoint) with the parallel DiT and text encoder
    stages: list  # the layout's step-chain stages (CfgParallel under CFG parallelism): generate(req, chain=stages)
    stats: CommStats | None  # bytes sent by every collective (DiT, CFG exchange, text broadcast); None on one process
    parameter_bytes: dict[str, int]  # this rank's DiT parameters (k5.parallel.tensor.parameter_bytes)

    def describe(self) -> str:
        d = self.dims
        return (f"layout dp {d.dp} x cfg {d.cfg} x ring {d.ring} x ulysses {d.ulysses} x tp {d.tp}; "
                + format_parameter_bytes(self.parameter_bytes))

    @property
    def item_group(self) -> dist.ProcessGroup | None:
        """The ranks that work on one item (both cfg halves, ring x ulysses x tp); None when a rank is alone."""
        d = self.dims
        return d.group("item") if d.world_size // d.dp > 1 else None

    @property
    def item_rank(self) -> int:
        return self.dims.rank("item") if self.dims.world_size > 1 else 0

    @property
    def dp_rank(self) -> int:
        return self.dims.rank("dp") if self.dims.world_size > 1 else 0


def image_sharing(dims: ParallelDims, device):
    """The I2V image (I2I: the source image) is encoded once per item, on the item group's rank 0, and broadcast to
    the others."""
    from k5.parallel.vae_tiles import broadcast_image_latent

    def share(encode):
        latent = encode() if dims.rank("item") == 0 else None
        return broadcast_image_latent(latent, dims.group("item"), src=0, device=device)

    return share


def _source(source, config: DiTConfig | None):
    """(the checked Checkpoint, the DiT config to build) of a folder, a ``resolve_model`` result (with its variant's
    config) or a Checkpoint."""
    from k5.engine.checkpoints.dit import open_checkpoint

    checkpoint = open_checkpoint(source)
    return checkpoint, config or getattr(source, "config", None) or checkpoint.dit.config


def build_parallel(source, dims: ParallelDims, *, dtype: torch.dtype = torch.bfloat16, device="cpu",
                   keep_text: bool = False, expand: bool = False, adapters=(), offload: str = "none",
                   config: DiTConfig | None = None) -> ParallelSetup:
    """Everything a rank needs to generate on the planned ``dims`` (from ``plan_parallel``).

    ``source``: a diffusers-layout folder, what ``k5.engine.catalogue.resolve.resolve_model`` returned (its
    variant's config), or a checked engine.checkpoints.files.Checkpoint. ``config``: the DiT config to build when not
    the source's own (a variant's attention). ``keep_text``: keep the text encoders after the first encode (batch
    jobs encode again).
    ``expand``: load Qwen's lm_head for prompt expansion, run once per item on the item group's rank 0 and shared.
    ``adapters``: LoRA adapters (k5.engine.checkpoints.lora.open_lora) merged while each rank reads its slices. ``offload``:
    where weights wait while unused (Kandinsky5Pipeline; "model" runs one process only). With more than one
    process torch.distributed must be initialized and its world size equal ``dims.world_size``.
    """
    from k5.engine.pipelines.image import pipeline_class
    from k5.engine.pipelines.video import Sharing, make_expander
    from k5.engine.encoders.text import TextEncoder
    from k5.parallel.text_share import share_expansion

    checkpoint, config = _source(source, config)
    device = torch.device(device)
    Pipeline = pipeline_class(checkpoint)  # Image Lite (FLUX VAE) or video
    if dims.world_size == 1:
        pipeline = Pipeline.from_pretrained(checkpoint, dtype, device, expand=expand, adapters=adapters,
                                            offload=offload, config=config)
        return ParallelSetup(dims, pipeline, [], None, parameter_bytes(pipeline.dit))
    if not dist.is_initialized():
        raise RuntimeError(f"a layout of {dims.world_size} ranks needs torch.distributed initialized "
                           f"(torchrun / init_process_group)")
    check_layout(config, dims)
    dims.build_mesh(device.type)

    stats = CommStats()
    dit, _ = load_rank_dit(checkpoint.dit, dims, dtype, device, stats, config, adapters=adapters)
    if dims.sp_size > 1:
        apply_sequence_parallel(dit, dims, stats)
    encoder = (TextEncoder.from_pretrained(checkpoint.root, torch_dtype=dtype, device=device, lm_head=expand)
               if is_text_source(dims) else None)
    text = SharedText.for_dims(encoder, dims, device, keep=keep_text, stats=stats)
    if dims.cfg == 2:
        text = BranchText(text, dims)
    sharing = Sharing(image=image_sharing(dims, device), **({"text": share_expansion(dims, device)} if expand else {}))
    pipeline = Pipeline.from_pretrained(checkpoint, dtype, device, dit=dit, text=text, offload=offload,
                                        config=config, sharing=sharing,
                                        expander=make_expander(encoder) if expand else None)
    stages = [CfgParallel(dims, stats)] if dims.cfg == 2 else []
    return ParallelSetup(dims, pipeline, stages, stats, parameter_bytes(dit))


def setup_parallel(source, *, tp: int = 1, cfg_parallel: bool = False, dp: int | None = None,
                   ulysses: int | None = None, ring: int | None = None, dtype: torch.dtype = torch.bfloat16,
                   device="cpu", keep_text: bool = False, expand: bool = False, adapters=(),
                   config: DiTConfig | None = None) -> ParallelSetup:
    """``plan_parallel`` for this process group's world size, then ``build_parallel`` (torch.distributed
    initialized). ``source``: a diffusers-layout folder, a ``resolve_model`` result or a Checkpoint (see
    ``build_parallel``)."""
    if not dist.is_initialized():
        raise RuntimeError("setup_parallel needs torch.distributed initialized (torchrun / init_process_group)")
    checkpoint, config = _source(source, config)
    dims = plan_parallel(dist.get_world_size(), config, tp, cfg_parallel, dp, ulysses, ring)
    return build_parallel(checkpoint, dims, dtype=dtype, device=device, keep_text=keep_text, expand=expand,
                          adapters=adapters, config=config)


def recommended_layout(variant, world_size: int = 8) -> dict[str, int]:
    """Degrees for ``world_size`` GPUs: CFG parallel when the variant guides (one latent-sized exchange a step, the
    cheapest split), then as much Ulysses as the heads allow, the rest ring. No tensor parallelism: every released
    DiT fits one 80 GB GPU in bf16 (see k5.launch.catalogue.memory_per_gpu). ``variant``: a catalogue Variant."""
    from k5.engine.catalogue.variants import PRESETS

    heads = PRESETS[variant.family].num_heads
    cfg = 2 if abs(variant.guidance_scale - 1.0) > 1e-6 and world_size % 2 == 0 else 1
    sp = world_size // cfg
    ulysses = max(u for u in range(1, sp + 1) if sp % u == 0 and heads % u == 0)
    return {"dp": 1, "cfg": cfg, "ring": sp // ulysses, "ulysses": ulysses, "tp": 1}
