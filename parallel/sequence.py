"""Sequence parallelism applied to a built Kandinsky5DiT.

The visual tokens (in NABLA tile order when NABLA is on) are split across the sequence-parallel ranks once, before
the first visual block, and stay split through the whole visual stack: modulation, cross-attention (local queries
against the replicated text: no collective) and the FFN are per token. Only the visual self-attention communicates
(Ulysses all-to-alls and/or the ring). RoPE angles are sliced with the tokens. The output projection runs on the
local tokens and the 64-channel result is gathered once at the end.

The model file knows none of this: ``apply_sequence_parallel`` swaps the model's ``tokens`` and
``visual_attention`` attributes.
"""

from __future__ import annotations

from torch import Tensor

from k5.engine.model.dit import Kandinsky5DiT, TokenGrid
from k5.kernels.nabla import NablaSpec
from k5.parallel.comm_stats import CommStats
from k5.parallel.layout import SequenceLayout
from k5.parallel.mesh import ParallelDims
from k5.parallel.usp import SequenceParallelAttention


class SequenceShards:
    """Token placement over the sequence-parallel ranks: contiguous 64-token-block shards, padded at the end."""

    def __init__(self, dims: ParallelDims, stats: CommStats):
        self.dims, self.stats = dims, stats
        self.layout: SequenceLayout | None = None

    def scatter(self, x: Tensor, dim: int = 1) -> Tensor:
        n = x.shape[dim]
        if self.layout is None or self.layout.num_tokens != n:
            self.layout = SequenceLayout(n, self.dims.sp_size)
        return self.layout.shard(x, dim, self.dims.sp_rank)

    def gather(self, x: Tensor, dim: int = 1) -> Tensor:
        return self.layout.unshard(x, dim, self.dims.sp_group, self.stats)


class ShardedAttention:
    """The DiT's visual self-attention op over sharded tokens (same interface as engine.model.dit.LocalAttention)."""

    def __init__(self, attn: SequenceParallelAttention, shards: SequenceShards, nabla: NablaSpec | None):
        self.attn, self.shards, self.nabla = attn, shards, nabla

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, grid: TokenGrid) -> Tensor:
        if self.nabla is None:
            return self.attn(q, k, v, self.shards.layout)
        return self.attn(q, k, v, self.shards.layout, nabla=self.nabla, grid=grid.blocks)


def apply_sequence_parallel(dit: Kandinsky5DiT, dims: ParallelDims, stats: CommStats | None = None) -> CommStats:
    """Split ``dit``'s visual tokens over ``dims``' ring x ulysses ranks (mesh already built); return the byte
    counter that its collectives add to."""
    dims.check_heads(dit.config.num_heads // dims.tp)  # under tensor parallelism Ulysses splits the local heads
    stats = stats if stats is not None else CommStats()
    shards = SequenceShards(dims, stats)
    dit.tokens = shards
    dit.visual_attention = ShardedAttention(SequenceParallelAttention(dims, stats), shards, dit.nabla)
    return stats
