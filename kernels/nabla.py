"""NABLA block-sparse attention (Kandinsky 5), exactly as `nablaT_v2` + `fast_sta_nabla` in the reference code.

Tokens are in "fractal" order: every run of 64 tokens is one 8x8 spatial tile of one latent frame (to_fractal).
Per (batch, head) a query tile attends to the key tiles that carry the top P of the pooled-attention mass, plus the
static sliding-tile (STA) neighbourhood. Selected 64x64 tile pairs are computed exactly (no partial blocks).

The mask functions take pooled rows of *some* query tiles and all key tiles, so a sequence-parallel rank can build
just its own rows; a row's result never depends on which other rows are computed with it (see nabla_block_mask).
"""

import contextlib
import functools
import math
from dataclasses import dataclass

import torch

from .flex import flex_block_sparse, kv_tiles

BLOCK = 64  # tokens per NABLA tile (8x8)
_TILE = 8

# Element budgets of the temporaries: the nabla_block_mask scores per step (B*H*nq*nk is 430M for Pro 10 s with
# 32 heads), and the K/V tiles gathered per step of the CPU kernel (1 MiB fp32, so they are still in cache when the
# attention kernel reads them; larger steps were no faster).
_MASK_CHUNK_ELEMS = 1 << 24
_CPU_CHUNK_ELEMS = 1 << 18


# The STA window (wT, wH, wW, in tiles) of every released NABLA config (Kandinsky 5 and 6): the one definition.
NABLA_WINDOW = (11, 3, 3)
# The kept mass of the released NABLA configs that do not say otherwise (a dense checkpoint run with --attention nabla).
NABLA_P = 0.9


@dataclass(frozen=True)
class NablaSpec:
    """NABLA settings of a checkpoint: kept mass P and STA window (in tiles), by default NABLA_WINDOW."""

    P: float
    wT: int = NABLA_WINDOW[0]
    wH: int = NABLA_WINDOW[1]
    wW: int = NABLA_WINDOW[2]


# ---- token order -------------------------------------------------------------------------------------------------


def to_fractal(x):
    """[B, T, Hp, Wp, ...] -> [B, T*Hp*Wp, ...]: block b = (t*Hb + hb)*Wb + wb, in-block index ph*8 + pw."""
    B, T, Hp, Wp = x.shape[:4]
    rest = x.shape[4:]
    if Hp % _TILE or Wp % _TILE:
        raise ValueError(f"NABLA tiles need Hp, Wp multiples of 8 (pixel H, W multiples of 128); got {Hp}x{Wp}")
    x = x.reshape(B, T, Hp // _TILE, _TILE, Wp // _TILE, _TILE, *rest)
    x = x.permute(0, 1, 2, 4, 3, 5, *range(6, 6 + len(rest)))
    return x.reshape(B, T * Hp * Wp, *rest)


def from_fractal(s, T, Hp, Wp):
    """Inverse of to_fractal: [B, T*Hp*Wp, ...] -> [B, T, Hp, Wp, ...]."""
    B, rest = s.shape[0], s.shape[2:]
    if s.shape[1] != T * Hp * Wp or Hp % _TILE or Wp % _TILE:
        raise ValueError(f"from_fractal: sequence {s.shape[1]} is not T*Hp*Wp = {T}*{Hp}*{Wp} with Hp, Wp % 8 == 0")
    s = s.reshape(B, T, Hp // _TILE, Wp // _TILE, _TILE, _TILE, *rest)
    s = s.permute(0, 1, 2, 4, 3, 5, *range(6, 6 + len(rest)))
    return s.reshape(B, T, Hp, Wp, *rest)


# ---- masks -------------------------------------------------------------------------------------------------------


def sta_block_mask(T, Hb, Wb, wT, wH, wW, device=None):
    """Sliding-tile prior on the tile grid, bool [nb, nb]: |dt| <= wT//2 and |dh| <= wH//2 and |dw| <= wW//2."""
    t, h, w = torch.meshgrid(
        *(torch.arange(n, device=device) for n in (T, Hb, Wb)), indexing="ij"
    )
    t, h, w = t.flatten(), h.flatten(), w.flatten()
    return (
        ((t[:, None] - t[None]).abs() <= wT // 2)
        & ((h[:, None] - h[None]).abs() <= wH // 2)
        & ((w[:, None] - w[None]).abs() <= wW // 2)
    )


@functools.lru_cache(maxsize=16)
def _sta_cached(T, Hb, Wb, wT, wH, wW, device):
    return sta_block_mask(T, Hb, Wb, wT, wH, wW, device=device)


def pool_blocks(x):
    """Mean of every 64-token tile: x [B, S, H, D] -> fp32 [B, H, S/64, D].

    Summed as a fixed pairwise tree of elementwise adds (exactly rounded, no reduction kernel), so the result is
    bitwise the same whatever the layout of x or the part of the sequence / heads a rank holds.
    """
    B, S, H, D = x.shape
    if S % BLOCK:
        raise ValueError(f"pool_blocks needs a sequence length multiple of {BLOCK}; got {S}")
    y = x.reshape(B, S // BLOCK, BLOCK, H, D)
    half = BLOCK // 2
    y = y[:, :, :half].float() + y[:, :, half:].float()
    while y.shape[2] > 1:
        half = y.shape[2] // 2
        y = y[:, :, :half] + y[:, :, half:]
    return (y[:, :, 0] / BLOCK).transpose(1, 2).contiguous()


def _top_cdf(qp, kp, P):
    """The nablaT_v2 rule on [b, h, nq, D] x [b, h, nk, D] -> bool [b, h, nq, nk].

    The scores are accumulated in fp64 and then rounded to fp32: fp32 products are exact in fp64 and the fp64 sum
    is rounded once, so a row does not depend on how BLAS blocks the rows around it (a fp32 GEMM may take another
    kernel or summation order for 1 row than for 100). Softmax, sort and cumsum are row-wise fp32 as in the
    reference under autocast.
    """
    D = qp.shape[-1]
    scores = (qp.double() @ kp.double().transpose(-1, -2)).float() / math.sqrt(D)
    vals, order = scores.softmax(-1).sort(dim=-1, stable=True)
    keep_sorted = vals.cumsum(-1) >= 1 - P  # drop the smallest blocks whose total mass stays below 1 - P
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def nabla_block_mask(q_pooled, k_pooled, sta_rows, P, k_valid: int | None = None):
    """NABLA tile mask, bool [B, H, nq, nk].

    q_pooled [B,H,nq,D]: pooled queries of some (e.g. one rank's contiguous) query tiles; k_pooled [B,H,nk,D]:
    pooled keys of all key tiles; sta_rows bool [nq, nk]: the matching rows of the STA mask. k_valid: the number of
    real key tiles, which come first (sequence padding is always at the end, parallel/layout.py); the padding tiles
    after them take no softmax mass and are never selected, so a padded sequence gets exactly the mask of the
    unpadded one on its real tiles. A host int, so no device sync is needed to find them.
    """
    B, H, nq, D = q_pooled.shape
    nk = k_pooled.shape[2]
    if k_pooled.shape != (B, H, nk, D) or tuple(sta_rows.shape) != (nq, nk):
        raise ValueError(
            f"nabla_block_mask: q_pooled [B,H,nq,D] = {tuple(q_pooled.shape)} needs k_pooled [B,H,nk,D] and "
            f"sta_rows [nq,nk]; got k_pooled {tuple(k_pooled.shape)}, sta_rows {tuple(sta_rows.shape)}"
        )
    if not 0.0 <= P <= 1.0:
        raise ValueError(f"NABLA P is the kept probability mass, in [0, 1]; got {P}")
    sta_rows = sta_rows.to(device=q_pooled.device, dtype=torch.bool)
    if k_valid is not None and k_valid != nk:
        if not 0 <= k_valid <= nk:
            raise ValueError(f"k_valid counts the real key tiles, 0..{nk}; got {k_valid}")
        # Run the rule on the real tiles only: the same softmax length and summation order as without padding.
        mask = torch.zeros(B, H, nq, nk, dtype=torch.bool, device=q_pooled.device)
        if k_valid:
            mask[..., :k_valid] = nabla_block_mask(q_pooled, k_pooled[:, :, :k_valid], sta_rows[:, :k_valid], P)
        return mask

    mask = torch.empty(B, H, nq, nk, dtype=torch.bool, device=q_pooled.device)
    heads = max(1, _MASK_CHUNK_ELEMS // max(1, nq * nk))
    for b in range(B):
        for h in range(0, H, heads):
            mask[b, h : h + heads] = _top_cdf(q_pooled[b, h : h + heads], k_pooled[b, h : h + heads], P)
    return mask | sta_rows


# ---- block-sparse attention --------------------------------------------------------------------------------------


# Never traced: the kernel plans its steps from the mask on the host, so a compiled block would specialise on every
# mask's tile counts and recompile each call. Inside a compiled block it runs eagerly (a graph break).
@torch.compiler.disable
def _block_sparse_cpu(q, k, v, block_mask):
    """Gather-based kernel: each query tile attends to its selected key tiles, gathered into one padded [L*64, D]
    operand, with the fused CPU attention kernel (fp32 softmax, returns the lse) run on a batch of query tiles.
    Unselected tiles cost nothing. All (b, h, query tile) rows are processed together, ordered by their number of
    selected tiles so that a step pads little and steps are few."""
    B, Sq, H, D = q.shape
    nq, nk = Sq // BLOCK, k.shape[1] // BLOCK
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    # [B*H*n, 64, D]: a tile is one contiguous slab, so gathering tiles is one index_select.
    qb = q.to(ct).transpose(1, 2).reshape(B * H * nq, BLOCK, D)
    kb = k.to(ct).transpose(1, 2).reshape(B * H * nk, BLOCK, D)
    vb = v.to(ct).transpose(1, 2).reshape(B * H * nk, BLOCK, D)
    out = torch.zeros(B * H * nq, BLOCK, D, dtype=ct, device=q.device)
    lse = torch.full((B * H * nq, BLOCK), float("-inf"), dtype=torch.float32, device=q.device)

    mask = block_mask.reshape(B * H * nq, nk)
    # Selected key tiles of each row first, ascending, as rows of the flat kb (int32: B*H*nk rows fit easily).
    counts, order = kv_tiles(mask)
    order += (torch.arange(B * H * nq, dtype=torch.int32, device=q.device) // nq * nk)[:, None]
    rows = torch.argsort(counts, stable=True)
    rows = rows[counts[rows] > 0]  # empty query tiles stay (0, -inf)
    sorted_counts = counts[rows].tolist()
    budget = max(1, _CPU_CHUNK_ELEMS // (BLOCK * 2 * D))  # gathered K+V tiles per step
    i = 0
    while i < len(rows):
        # Counts ascend, so a step's widest row is its last one: shrink the step until it fits the budget.
        n = max(1, budget // sorted_counts[i])
        while n > 1 and sorted_counts[min(i + n, len(rows)) - 1] * n > budget:
            n = max(1, budget // sorted_counts[min(i + n, len(rows)) - 1])
        blk = rows[i : i + n]
        n, L = len(blk), sorted_counts[i + len(blk) - 1]
        idx = order[blk, :L].flatten()  # [n*L]
        kg = kb.index_select(0, idx).view(n, 1, L * BLOCK, D)
        vg = vb.index_select(0, idx).view(n, 1, L * BLOCK, D)
        bias = None
        if sorted_counts[i] < L:  # rows with fewer than L tiles: mask their padded slots
            pad = torch.arange(L, device=q.device) >= counts[blk, None]
            bias = torch.zeros(n, 1, 1, L * BLOCK, dtype=ct, device=q.device)
            bias.masked_fill_(pad.repeat_interleave(BLOCK, -1)[:, None, None, :], float("-inf"))
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qb[blk].unsqueeze(1), kg, vg, attn_mask=bias)
        out[blk] = o.squeeze(1)
        lse[blk] = l.squeeze(1).float()
        i += n
    return out.reshape(B, H, Sq, D).transpose(1, 2), lse.reshape(B, H, Sq)


# Which kernel runs the selected tiles: "flex" (compiled FlexAttention, the CUDA kernel; on the CPU the route the
# tests exercise it by) or "gather" (the CPU kernel above). "auto": flex on CUDA, gather elsewhere.
_BACKENDS = ("auto", "flex", "gather")
_backend = "auto"


@contextlib.contextmanager
def nabla_backend(name: str):
    """Run NABLA's block-sparse attention on one kernel within this block (like torch's sdpa_kernel)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"NABLA backend {name!r} is not one of {', '.join(_BACKENDS)}")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def _use_flex(q) -> bool:
    if _backend == "auto":
        return q.is_cuda
    if _backend == "gather" and q.is_cuda:
        raise ValueError("the NABLA 'gather' kernel runs on the CPU only; use 'flex' or 'auto' on CUDA")
    return _backend == "flex"


def block_sparse_attention(q, k, v, block_mask, return_lse: bool = True):
    """Exact attention restricted to selected 64x64 tile pairs. Returns (out [B,Sq,H,D] in q.dtype, lse fp32 [B,H,Sq]).

    q [B, nq*64, H, D], k/v [B, nk*64, H, D], block_mask bool [B, H, nq, nk]. Query rows of a tile with no selected
    key tile get out = 0, lse = -inf. ``return_lse=False`` returns lse None where the kernel can skip it.
    """
    B, Sq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2:] != q.shape[2:] or Sq % BLOCK or k.shape[1] % BLOCK:
        raise ValueError(
            f"block_sparse_attention expects q [B,nq*64,H,D], k/v [B,nk*64,H,D]; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    shape = (B, H, Sq // BLOCK, k.shape[1] // BLOCK)
    if tuple(block_mask.shape) != shape or block_mask.dtype != torch.bool:
        raise ValueError(
            f"block_mask must be bool [B,H,nq,nk] = {shape}; got {block_mask.dtype} {tuple(block_mask.shape)}"
        )
    if _use_flex(q):
        out, lse = flex_block_sparse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask,
                                     return_lse=return_lse)
        out = out.transpose(1, 2)
        # The kernel leaves rows with no selected tile unspecified: pin them to (0, -inf) on the device.
        empty = (~block_mask.any(-1)).repeat_interleave(BLOCK, -1)  # [B,H,Sq]
        out = out.masked_fill(empty.transpose(1, 2)[..., None], 0.0)
        if lse is not None:
            lse = lse.float().masked_fill(empty, float("-inf"))
    else:
        out, lse = _block_sparse_cpu(q, k, v, block_mask)
    return out.to(q.dtype), lse


def nabla_mask(q, k, spec, T, Hb, Wb):
    """The tile mask single-device NABLA selects for fractal-ordered q, k [B, T*Hb*Wb*64, H, D]: bool [B, H, nb, nb]."""
    if q.shape[1] != T * Hb * Wb * BLOCK:
        raise ValueError(f"nabla_attention: sequence {q.shape[1]} != T*Hb*Wb*64 = {T}*{Hb}*{Wb}*64")
    sta = _sta_cached(T, Hb, Wb, spec.wT, spec.wH, spec.wW, q.device)
    return nabla_block_mask(pool_blocks(q), pool_blocks(k), sta, spec.P)


def nabla_attention(q, k, v, spec, T, Hb, Wb):
    """Single-device NABLA self-attention on fractal-ordered q, k, v [B, T*Hb*Wb*64, H, D] -> out (q.dtype)."""
    return block_sparse_attention(q, k, v, nabla_mask(q, k, spec, T, Hb, Wb), return_lse=False)[0]
