"""Unified sequence parallelism: Ulysses (inner, fast mesh dim) x ring (outer) self-attention.

Input and output are this rank's shard [B, S_local, H, D] of the (padded) sequence, in SP order
``sp_rank = ring_rank * U + ulysses_rank`` (see layout.py). The Ulysses all-to-all turns it into
span g = ring_rank of the sequence with H/U heads; the ring then covers all spans; the inverse
all-to-all restores the shard. Padding is excluded exactly: dense attention masks pad keys, NABLA
excludes pad blocks from the mask (k_valid) and empties pad query rows.

With NABLA the tokens are already in fractal order; the STA prior is a pure function of the global
block grid (T, Hb, Wb) of the UNPADDED sequence, computed identically on every rank.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from k5.kernels.nabla import NablaSpec, sta_block_mask
from k5.parallel.comm_stats import CommStats
from k5.parallel.layout import SequenceLayout
from k5.parallel.mesh import ParallelDims
from k5.parallel.ring import Padding, RingCounters, ring_dense_attention, ring_nabla_attention
from k5.parallel.ulysses import out_to_sequence, qkv_to_heads


# Pad information and the STA prior, built on the device once per shape and reused by every layer and step. An
# lru_cache, not a dict on the attention object: dynamo traces through the cache wrapper (the few fused ops are free
# inside a compiled block), where filling a dict would be a side effect it guards on and recompiles for.
@functools.lru_cache(maxsize=32)
def _key_padding(num_tokens: int, padded_len: int, device: torch.device) -> Padding:
    return Padding(num_tokens, torch.arange(padded_len, device=device) < num_tokens)


@functools.lru_cache(maxsize=32)
def _real_blocks(num_blocks: int, start: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + length, device=device) < num_blocks


@functools.lru_cache(maxsize=16)
def _padded_sta(grid: tuple, wT: int, wH: int, wW: int, padded_blocks: int, device: torch.device) -> torch.Tensor:
    """STA prior [padded_blocks, padded_blocks] of the unpadded grid; pad rows/columns False."""
    sta = sta_block_mask(*grid, wT, wH, wW, device=device)
    pad = padded_blocks - sta.shape[0]
    return F.pad(sta, (0, pad, 0, pad), value=False)


class SequenceParallelAttention:
    """Self-attention over a sequence sharded on the ("ring", "ulysses") dims of ``dims``' mesh.

    Owns its ``CommStats`` (bytes sent) and ``RingCounters`` (kernel calls / skipped ring steps).
    """

    def __init__(self, dims: ParallelDims, stats: CommStats | None = None):
        self.dims = dims
        self.stats = stats if stats is not None else CommStats()
        self.counters = RingCounters()

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: SequenceLayout,
        nabla: NablaSpec | None = None,
        grid: tuple[int, int, int] | None = None,
        return_mask: bool = False,
    ):
        """Local q, k, v [B, S_local, H, D] -> local out [B, S_local, H, D] (in q.dtype).

        With ``return_mask`` (NABLA only) also returns this rank's rows of the NABLA block mask,
        bool [B, H/U, L/64, padded_blocks]: heads of Ulysses rank u, query blocks of span g = ring rank.
        """
        dims = self.dims
        dims.check_heads(q.shape[2])
        if layout.sp_size != dims.sp_size or q.shape[1] != layout.shard_len:
            raise ValueError(
                f"q has {q.shape[1]} tokens per rank for sp size {dims.sp_size}; the layout expects "
                f"{layout.shard_len} tokens per rank for sp size {layout.sp_size}"
            )
        ulysses, ring = dims.ulysses_group, dims.ring_group
        qs, ks, vs = qkv_to_heads(q, k, v, ulysses, self.stats)
        g, L = dims.ring_rank, qs.shape[1]

        mask_rows = None
        if nabla is None:
            padding = _key_padding(layout.num_tokens, layout.padded_len, q.device) if layout.pad else None
            out, _ = ring_dense_attention(qs, ks, vs, ring, padding, self.stats, self.counters)
        else:
            if grid is None:
                raise ValueError("NABLA attention needs the block grid (T, Hb, Wb) of the unpadded sequence")
            T, Hb, Wb = grid
            if layout.block != 64 or layout.num_tokens != T * Hb * Wb * 64:
                raise ValueError(
                    f"NABLA needs 64-token blocks covering the grid exactly: grid {tuple(grid)} has "
                    f"{T * Hb * Wb * 64} tokens, the layout {layout.num_tokens} in blocks of {layout.block}"
                )
            nbl = L // 64
            sta = _padded_sta(tuple(grid), nabla.wT, nabla.wH, nabla.wW, layout.padded_blocks, q.device)
            out, _, mask_rows = ring_nabla_attention(
                qs, ks, vs, ring, nabla.P,
                sta_rows=sta[g * nbl : (g + 1) * nbl],
                k_valid=layout.num_blocks,
                q_valid=_real_blocks(layout.num_blocks, g * nbl, nbl, q.device),
                stats=self.stats, counters=self.counters,
            )
        out = out_to_sequence(out.to(q.dtype), ulysses, self.stats)
        return (out, mask_rows) if return_mask else out
