"""The fast path: regional torch.compile of the DiT blocks, and counting what dynamo compiled.

Regional compile: each text and visual block's forward is compiled (``nn.Module.compile``), not the whole model.
All visual blocks share one compiled graph (parameters are graph inputs, torch's default
``inline_inbuilt_nn_modules``), so compile time does not grow with depth. With fixed shapes (``dynamic=False``) a
block compiles once per token grid and text-mask variant (a prompt that fills the text budget has no mask) and is
reused by every later step, layer and item of that shape. Dynamo caches these variants per block class, up to its
recompile limit (8 by default) after which a block would silently run eagerly: ``allow_variants`` raises the limit
to what a job needs (two variants per distinct video shape). The model file needs no change for this: blocks take
tensors and two small immutable Python objects (the attention op and the token grid), which dynamo guards on.
Ring attention adds code objects of its own: its loop runs eagerly between compiled steps, each step's attention
compiled once per shape and kind (plain, or key-masked for a padded span) and never per ring step
(parallel/ring.py), so its need does not grow with the ring degree either.

Everything here works with and without parallelism: sequence-parallel and tensor-parallel collectives inside a
block are traced or become graph breaks, both keep the result exact. The byte counters of the collectives
(parallel/comm_stats.py) and the ring's step counters go through one effectful custom op (k5::tally), traced into the
graph without a break and without guards on their values. What a block closes over must not change between calls
either: caches
filled inside a block are lru caches (parallel/usp.py), not dicts dynamo would guard on.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

VARIANTS_PER_SHAPE = 2  # a block: text mask or none
RING_STEP_VARIANTS = 2  # a ring step's attention: plain, or with the key mask of a padded span


def compile_blocks(dit: nn.Module, dynamic: bool = False, mode: str | None = None) -> int:
    """Compile every transformer block of ``dit`` in place; returns the number of blocks compiled."""
    from k5.engine.model.k6_dit import Kandinsky6DiT

    if isinstance(dit, Kandinsky6DiT):  # one text branch per stream, then the fused video/audio blocks
        blocks = [*dit.video_text_transformer_blocks, *dit.audio_text_transformer_blocks, *dit.visual_blocks]
    else:
        blocks = [*dit.text_transformer_blocks, *dit.visual_transformer_blocks]
    for block in blocks:
        block.compile(dynamic=dynamic, mode=mode)
    return len(blocks)


def variants_per_shape(ring: int = 1) -> int:
    """Compiled variants one code object may need per video shape: a block's, and with ring attention (``ring`` > 1)
    a ring step's. The same for every ring degree: the step index is no input of a compiled frame."""
    return max(VARIANTS_PER_SHAPE, RING_STEP_VARIANTS if ring > 1 else 0)


def allow_variants(shapes: int, ring: int = 1) -> int:
    """Raise dynamo's per-function recompile limit (never lower it) so ``shapes`` distinct video shapes, each
    with its variants (``variants_per_shape``), all get compiled code instead of eager fallbacks. Returns the limit
    in force."""
    import torch._dynamo.config as dynamo_config

    need = variants_per_shape(ring) * max(1, shapes) + 2
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, need)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * need)
    return dynamo_config.recompile_limit


@contextlib.contextmanager
def no_recompile():
    """Raise instead of silently recompiling (a shape or guard that changes between timed calls)."""
    import torch._dynamo.config as dynamo_config

    with dynamo_config.patch(error_on_recompile=True):
        yield


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far (every torch.compile region, flex kernels included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompileWatch:
    """Whether the run is compiled, and how many graphs were compiled after the first denoising step.

    ``step_done()`` is called after every denoising step; the first call fixes the baseline (the first step
    compiles every variant it meets). Later compiles are recompiles: a new shape, a new mask variant, or a guard
    that failed, which for steps and items of one shape must stay zero.
    """

    def __init__(self, compiled: bool):
        self.compiled = compiled
        self.start = graphs_compiled()
        self.baseline: int | None = None

    def step_done(self) -> None:
        if self.baseline is None:
            self.baseline = graphs_compiled()

    def report(self) -> dict:
        now = graphs_compiled()
        return {
            "compiled": self.compiled,
            "graphs": now - self.start,
            "recompiles": 0 if self.baseline is None else now - self.baseline,
        }


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a host clock read after it measures the work (CUDA is async)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
