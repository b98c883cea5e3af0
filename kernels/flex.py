"""NABLA's block-sparse attention through FlexAttention: the CUDA kernel, and the CPU route the tests run it on.

Four traps of torch's FlexAttention that this file exists to avoid:
- Tile sizes. A selected 64x64 NABLA tile is one BlockMask block of 64 tokens, and the kernel's own tiles (BLOCK_M
  query rows, BLOCK_N keys) must divide it. Inductor's sm90 defaults are 128x128 (head dim 64) and 128x64 (head dim
  128), which raise "Q and KV block size must be divisible by BLOCK_M and BLOCK_N" at the first forward, so the
  tiles are pinned to 64x64 (KERNEL_OPTIONS).
- Eager fallback. Eager flex_attention evaluates the mask over the whole score matrix and ignores the block
  sparsity of a BlockMask built from kv blocks: it computes dense attention, a wrong result with no error. The
  kernel is compiled once (dynamic=None: the first shape gets a static kernel, a second shape one dynamic-shape
  kernel that every later shape reuses, so a batch job of many sizes never runs out of recompiles), and dynamo's
  recompile limit is made an error for the call, so a fallback to eager raises instead of returning wrong output.
- Backward-only work. BlockMask.from_kv_blocks by default also builds the transposed (query-block) index lists,
  two dense scatter/argsort passes per layer that only a backward pass reads: compute_q_blocks=False.
- A second sort. The kernel reads, per tile row, the selected key tiles in ascending order. A stable descending
  argsort of the 0/1 mask gives them, but the top-CDF rule has just sorted a tensor of the same size; a running
  count and one scatter give the same indices without sorting again (``kv_tiles``).

On the CPU, compiled flex has no log-sum-exp output and fails to build kernels for BlockMasks holding only *full*
blocks (torch 2.13), so there the selected tiles go in as *partial* blocks with a mask_mod that keeps every
element: the same tiles, the same result, and the same conversion code as the CUDA route.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

BLOCK = 64  # tokens per NABLA tile, one BlockMask block
KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64}

_compiled = None


# ---- the tile indices the kernel reads ------------------------------------------------------------------------


def kv_tiles(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(selected tiles per row, int32 [...]; tile indices, int32 [..., n]) of a bool tile mask [..., n].

    A row's indices are its selected tiles in ascending order, then its other tiles in ascending order: exactly a
    stable descending argsort of the 0/1 mask, without the sort. A selected tile j goes to position c_j - 1, where
    c_j counts the selected tiles up to and including j; an unselected one to num + (j - c_j). The counts are
    int16 where a row has fewer than 2**15 tiles (every K5 shape: Pro 10 s HD has 3660), which halves the memory
    traffic of the passes before the scatter. Peak 12 bytes per mask element (the int64 positions scatter takes and
    the int32 indices), as the argsort's int64 indices and their int32 copy took.
    """
    n = mask.shape[-1]
    dt = torch.int16 if n < 2**15 else torch.int32
    c = mask.cumsum(-1, dtype=dt)
    num = c[..., -1].to(torch.int32)
    pos = torch.neg(c).add_(torch.arange(n, dtype=dt, device=mask.device)).add_(c[..., -1:])  # unselected
    pos = torch.where(mask, c.sub_(1), pos)
    del c
    pos = pos.long()  # scatter takes int64 positions
    idx = torch.empty(mask.shape, dtype=torch.int32, device=mask.device)
    return num, idx.scatter_(-1, pos, torch.arange(n, dtype=torch.int32, device=mask.device).expand(mask.shape))


def _keep_all(b, h, q_idx, kv_idx):
    """mask_mod of the partial-block route: every element of a selected tile attends (one function object, so
    the compiled kernel's guard on it holds across calls)."""
    return q_idx >= 0


def block_mask_from_tiles(mask: Tensor, q_len: int, kv_len: int, partial: bool = False):
    """BlockMask of a bool tile mask [B, H, nq, nk] (True = compute this 64x64 tile), forward metadata only.

    ``partial=False`` (CUDA): selected tiles are *full* blocks, so the kernel evaluates no mask inside them.
    ``partial=True`` (CPU): they are partial blocks under ``_keep_all``, which computes the same thing.
    """
    from torch.nn.attention.flex_attention import BlockMask

    num, idx = kv_tiles(mask)
    if partial:
        return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=BLOCK, mask_mod=_keep_all, seq_lengths=(q_len, kv_len),
                                        compute_q_blocks=False)
    return BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx, BLOCK_SIZE=BLOCK, mask_mod=None,
                                    seq_lengths=(q_len, kv_len), compute_q_blocks=False)


def compiled_flex():
    """The one compiled flex_attention of this process (see the module docstring for dynamic=None)."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=None)
    return _compiled


@contextlib.contextmanager
def recompile_limit_is_an_error():
    """Within this block, a frame that hits dynamo's recompile limit raises instead of running eagerly."""
    import torch._dynamo.config as dynamo_config

    if not hasattr(dynamo_config, "fail_on_recompile_limit_hit"):  # every torch this package accepts has it
        raise RuntimeError(f"torch {torch.__version__} lacks torch._dynamo.config.fail_on_recompile_limit_hit")
    with dynamo_config.patch(fail_on_recompile_limit_hit=True):
        yield


def flex_block_sparse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, return_lse: bool = True):
    """Attention of q [B, H, nq*64, D] over k, v [B, H, nk*64, D] restricted to the tiles of ``mask`` (BHSD).

    Returns (out [B, H, Sq, D] in q.dtype, lse fp32 [B, H, Sq] or None). Rows whose tile row is empty hold
    unspecified values: the caller pins them (block_sparse_attention does). ``return_lse`` is refused on the CPU,
    whose compiled flex cannot produce it.
    """
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    on_cpu = q.device.type == "cpu"
    if return_lse and on_cpu:
        raise ValueError("compiled FlexAttention on the CPU returns no log-sum-exp; use the CPU gather kernel "
                         "(k5.kernels.nabla, backend 'gather') where the lse is needed")
    if on_cpu:
        # Inductor's CPU flex template reads its inputs as plain buffers: a transposed view inside a compiled block
        # fails its lowering. (The CUDA kernel takes strided inputs.)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bm = block_mask_from_tiles(mask, q.shape[2], k.shape[2], partial=on_cpu)
    kwargs = {"block_mask": bm, "kernel_options": dict(KERNEL_OPTIONS)}
    if return_lse:
        kwargs["return_aux"] = AuxRequest(lse=True)
    if torch.compiler.is_compiling():
        # Traced into the caller's compiled graph (a regionally compiled DiT block): inductor lowers it there.
        res = flex_attention(q, k, v, **kwargs)
    else:
        with recompile_limit_is_an_error():
            res = compiled_flex()(q, k, v, **kwargs)
    if return_lse:
        out, aux = res
        return out, aux.lse
    return res, None
