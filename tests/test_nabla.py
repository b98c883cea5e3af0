"""NABLA against diffusers (fractal order, STA, nablaT_v2), hand-worked cases, and a dense masked fp64 reference."""

import warnings

import pytest
import torch
from diffusers.models.transformers.transformer_kandinsky import fractal_flatten, fractal_unflatten, nablaT_v2
from diffusers.pipelines.kandinsky5.pipeline_kandinsky import Kandinsky5T2VPipeline

from k5.kernels import nabla as nabla_mod
from k5.kernels.attention import dense_attention
from k5.kernels.nabla import (
    NablaSpec,
    block_sparse_attention,
    from_fractal,
    nabla_attention,
    nabla_block_mask,
    pool_blocks,
    sta_block_mask,
    to_fractal,
)
from numerics import reference_attention, rel_err

# fp32 kernel vs fp64 reference: rounding only.
FP32_TOL = 1e-5


def blockmask_to_bool(bm):
    """diffusers' BlockMask (all selected tiles passed as *full* blocks) -> bool [B, H, nq, nk]."""
    num, idx = bm.full_kv_num_blocks, bm.full_kv_indices.long()
    assert (bm.kv_num_blocks == 0).all()  # nablaT_v2 passes no partial blocks
    selected = torch.arange(idx.shape[-1]) < num[..., None]
    return torch.zeros(idx.shape, dtype=torch.bool).scatter_(-1, idx, selected)


def structured_qk(B, nb, H, D, seed, spread=4.0):
    """Random q, k [B, nb*64, H, D] with per-tile offsets, so the pooled block attention is far from uniform."""
    g = torch.Generator().manual_seed(seed)

    def one():
        tiles = spread * torch.randn(B, nb, 1, H, D, generator=g)
        return (tiles + torch.randn(B, nb, 64, H, D, generator=g)).reshape(B, nb * 64, H, D)

    return one(), one()


# ---- token order and STA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,Hp,Wp", [(1, 8, 8), (3, 16, 24), (2, 24, 16)])
def test_fractal_order_matches_diffusers(T, Hp, Wp):
    B, D = 2, 5
    x = torch.randn(B, T, Hp, Wp, D)
    ref, _ = fractal_flatten(x, x.clone(), (B, T, Hp, Wp), block_mask=True)
    s = to_fractal(x)
    assert torch.equal(s, ref)
    assert torch.equal(from_fractal(s, T, Hp, Wp), fractal_unflatten(ref, (B, T, Hp, Wp), block_mask=True))
    assert torch.equal(from_fractal(s, T, Hp, Wp), x)
    # Extra trailing dims (heads, head_dim) travel along, and the hand formula for one token holds.
    y = torch.randn(B, T, Hp, Wp, 3, 4)
    assert torch.equal(from_fractal(to_fractal(y), T, Hp, Wp), y)
    t, hp, wp = T - 1, Hp - 3, 5
    pos = ((t * (Hp // 8) + hp // 8) * (Wp // 8) + wp // 8) * 64 + (hp % 8) * 8 + wp % 8
    assert torch.equal(to_fractal(y)[:, pos], y[:, t, hp, wp])


@pytest.mark.parametrize("T,Hb,Wb,w", [(3, 2, 3, (3, 3, 3)), (7, 4, 5, (11, 3, 3)), (4, 3, 3, (1, 1, 5))])
def test_sta_matches_diffusers(T, Hb, Wb, w):
    ref = Kandinsky5T2VPipeline.fast_sta_nabla(T, Hb, Wb, *w, device="cpu")
    assert torch.equal(sta_block_mask(T, Hb, Wb, *w), ref.bool())


# ---- the block mask -----------------------------------------------------------------------------------------------


def tie_distance(q, k, P) -> float:
    """How far the nablaT_v2 rule on q, k [B, S, H, D] is from a tie, in fp64: the smallest distance of a row's
    ascending cumulative block mass from 1 - P, or of the first kept block's mass from the last dropped one's. Two
    computations of the rule that agree with fp64 to better than this select the same tiles."""
    B, S, H, D = q.shape
    pooled = [x.double().reshape(B, S // 64, 64, H, D).mean(2).transpose(1, 2) for x in (q, k)]
    vals = (pooled[0] @ pooled[1].transpose(-1, -2) / D**0.5).softmax(-1).sort(-1).values
    cdf = vals.cumsum(-1)
    first = (cdf >= 1 - P).int().argmax(-1, keepdim=True)  # the first kept position of each row
    gap = vals.gather(-1, first) - vals.gather(-1, (first - 1).clamp_min(0))
    return min((cdf - (1 - P)).abs().min().item(), gap[first > 0].min().item())


@pytest.mark.parametrize("P", [0.3, 0.7, 0.9])
@pytest.mark.parametrize("w", [(1, 1, 1), (3, 3, 3)])
def test_block_mask_matches_nablaT_v2(P, w):
    T, Hb, Wb, B, H, D = 3, 2, 4, 2, 3, 32
    q, k = structured_qk(B, T * Hb * Wb, H, D, seed=int(P * 10) + w[0])
    sta = sta_block_mask(T, Hb, Wb, *w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = blockmask_to_bool(nablaT_v2(q, k, sta[None, None], thr=P))
    mask = nabla_block_mask(pool_blocks(q), pool_blocks(k), sta, P)
    # Two computations of the rule (diffusers: fp32 mean and GEMM; ours: pairwise pool, fp64 scores) give the same
    # bool mask only away from ties: this data keeps every decision 1e-4 or more from one (fp32 rounding: ~1e-7).
    assert tie_distance(q, k, P) > 1e-4
    assert torch.equal(mask, ref)
    # Not a vacuous comparison: the top-CDF part selects beyond STA and drops blocks.
    assert (mask & ~sta).any() and not mask.all()


def test_top_cdf_by_hand():
    """D = 1, q = 1, k_j = log p_j: the block probabilities are exactly p = [0.3, 0.1, 0.4, 0.2].

    Ascending: 0.1 (j=1), 0.2 (j=3), 0.3 (j=0), 0.4 (j=2); cdf 0.1, 0.3, 0.6, 1.0.
    P=0.5 keeps cdf >= 0.5: j=0, 2. P=0.75 keeps cdf >= 0.25: j=0, 2, 3. P=0.95 keeps all. P=0.3: only j=2.
    """
    qp = torch.ones(1, 1, 1, 1)
    kp = torch.tensor([0.3, 0.1, 0.4, 0.2]).log().view(1, 1, 4, 1)
    none = torch.zeros(1, 4, dtype=torch.bool)
    cases = {0.5: [1, 0, 1, 0], 0.75: [1, 0, 1, 1], 0.95: [1, 1, 1, 1], 0.3: [0, 0, 1, 0]}
    for P, want in cases.items():
        assert nabla_block_mask(qp, kp, none, P).view(4).tolist() == [bool(x) for x in want], P
    # Boundary: equal scores give p = 0.25 exactly and cdf 0.25, 0.5, 0.75, 1; P = 0.5 keeps cdf >= 0.5 (3 tiles).
    assert int(nabla_block_mask(qp, torch.zeros(1, 1, 4, 1), none, 0.5).sum()) == 3
    # STA is OR-ed in.
    sta = torch.tensor([[False, True, False, False]])
    assert nabla_block_mask(qp, kp, sta, 0.5).view(4).tolist() == [True, True, True, False]


def test_P_one_keeps_every_block():
    q, k = structured_qk(1, 12, 2, 16, seed=3)
    sta = torch.zeros(12, 12, dtype=torch.bool)
    assert nabla_block_mask(pool_blocks(q), pool_blocks(k), sta, 1.0).all()


def test_rows_are_independent_of_the_other_rows():
    """What a sequence-parallel rank computes for its own rows (and heads) is bitwise the full computation."""
    T, Hb, Wb, B, H, D = 6, 4, 4, 1, 4, 64
    nb = T * Hb * Wb
    q, k = structured_qk(B, nb, H, D, seed=5, spread=1.0)
    sta = sta_block_mask(T, Hb, Wb, 3, 1, 1)
    qp, kp = pool_blocks(q), pool_blocks(k)
    full = nabla_block_mask(qp, kp, sta, 0.8)
    assert not full.all() and not torch.equal(full, sta.expand_as(full))
    for a, b in [(0, 1), (5, 6), (0, 48), (48, 96), (3, 40), (17, 50), (95, 96), (1, 96)]:
        # A ring rank holds tokens [a*64, b*64): pools them itself, gets the pooled keys of every tile.
        qp_rank = pool_blocks(q[:, a * 64 : b * 64])
        assert torch.equal(qp_rank, qp[:, :, a:b])
        assert torch.equal(nabla_block_mask(qp_rank, kp, sta[a:b], 0.8), full[:, :, a:b]), (a, b)
    # An Ulysses rank holds all tokens of a subset of heads, in a non-contiguous layout after the all-to-all.
    q_heads = q.transpose(1, 2).contiguous().transpose(1, 2)[:, :, 1:3]
    k_heads = k[:, :, 1:3]
    assert torch.equal(nabla_block_mask(pool_blocks(q_heads), pool_blocks(k_heads), sta, 0.8), full[:, 1:3])


def test_padded_key_blocks_are_ignored():
    nb, pad, H, D = 10, 3, 2, 16
    q, k = structured_qk(1, nb + pad, H, D, seed=7)
    qp, kp = pool_blocks(q), pool_blocks(k)
    sta = torch.eye(nb + pad, dtype=torch.bool)
    sta[:, nb:] = True  # even an STA hit on a padding tile must not select it
    padded = nabla_block_mask(qp, kp, sta, 0.7, k_valid=nb)
    unpadded = nabla_block_mask(qp[:, :, :nb], kp[:, :, :nb], sta[:nb, :nb], 0.7)
    assert torch.equal(padded[:, :, :nb, :nb], unpadded)
    assert not padded[..., nb:].any()
    assert not unpadded.all()


def test_pool_blocks_is_the_tile_mean():
    x = torch.randn(2, 3 * 64, 4, 8, dtype=torch.bfloat16)
    ref = x.double().reshape(2, 3, 64, 4, 8).mean(2).transpose(1, 2)
    got = pool_blocks(x)
    assert got.dtype == torch.float32 and got.shape == (2, 4, 3, 8)
    assert (got.double() - ref).abs().max() < 1e-6


# ---- block-sparse attention ---------------------------------------------------------------------------------------


def random_block_mask(B, H, nq, nk, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, H, nq, nk, generator=g) < density


@pytest.mark.parametrize("budget", [1, 64 * 16 * 2 * 6, 1 << 18])
@pytest.mark.parametrize("nq,nk", [(6, 6), (4, 7)])
def test_block_sparse_matches_masked_dense(nq, nk, budget, monkeypatch):
    # The gather-step budget decides how query tiles are grouped: one tile per step, a few tiles with different
    # tile counts per step (padded slots), or everything in one step.
    monkeypatch.setattr(nabla_mod, "_CPU_CHUNK_ELEMS", budget)
    B, H, D = 2, 3, 16
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, nq * 64, H, D, generator=g)
    k, v = (torch.randn(B, nk * 64, H, D, generator=g) for _ in range(2))
    mask = random_block_mask(B, H, nq, nk, 0.4, seed=12)
    mask[0, 1, 2] = False  # an empty query tile
    mask[1, 2, 0] = True  # a full row
    out, lse = block_sparse_attention(q, k, v, mask)
    ref, ref_lse = reference_attention(q, k, v, block_mask=mask)
    assert out.dtype == torch.float32 and lse.shape == (B, H, nq * 64)
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_err(out, ref) < FP32_TOL
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite].double() - ref_lse[finite]).abs().max() < 1e-5 * ref_lse[finite].abs().max()
    assert (out[0, 2 * 64 : 3 * 64, 1] == 0).all()


def test_block_sparse_really_drops_blocks():
    B, H, D, nb = 1, 2, 16, 5
    q, k = structured_qk(B, nb, H, D, seed=13, spread=0.5)
    v = torch.randn_like(k)
    dense, dense_lse = dense_attention(q, k, v)
    full = torch.ones(B, H, nb, nb, dtype=torch.bool)
    out, lse = block_sparse_attention(q, k, v, full)
    assert rel_err(out, dense) < FP32_TOL and (lse - dense_lse).abs().max() < 1e-4
    sparse = full & torch.eye(nb, dtype=torch.bool)
    out, _ = block_sparse_attention(q, k, v, sparse)
    assert rel_err(out, dense) > 0.1


def test_block_sparse_bf16():
    B, H, D, nb = 1, 2, 32, 4
    q, k = structured_qk(B, nb, H, D, seed=14, spread=0.5)
    q, k, v = q.bfloat16(), k.bfloat16(), torch.randn_like(k).bfloat16()
    mask = random_block_mask(B, H, nb, nb, 0.5, seed=15) | torch.eye(nb, dtype=torch.bool)
    out, lse = block_sparse_attention(q, k, v, mask)
    ref, ref_lse = reference_attention(q, k, v, block_mask=mask)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert rel_err(out, ref) < 1e-2  # bf16 output rounding; inputs are the same bf16 values
    assert (lse.double() - ref_lse).abs().max() < 1e-4 * ref_lse.abs().max()


def test_nabla_attention_matches_diffusers_mask_and_dense_reference():
    T, Hb, Wb, B, H, D = 2, 2, 3, 1, 2, 32
    spec = NablaSpec(P=0.6, wT=1, wH=3, wW=1)
    q, k = structured_qk(B, T * Hb * Wb, H, D, seed=16)
    v = torch.randn_like(q)
    sta = Kandinsky5T2VPipeline.fast_sta_nabla(T, Hb, Wb, spec.wT, spec.wH, spec.wW, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_mask = blockmask_to_bool(nablaT_v2(q, k, sta[None, None], thr=spec.P))
    assert not ref_mask.all()
    ref, _ = reference_attention(q, k, v, block_mask=ref_mask)
    out = nabla_attention(q, k, v, spec, T, Hb, Wb)
    assert out.shape == q.shape and rel_err(out, ref) < FP32_TOL


def test_bad_inputs_are_named():
    q = torch.randn(1, 128, 2, 8)
    with pytest.raises(ValueError, match="block_mask"):
        block_sparse_attention(q, q, q, torch.ones(1, 2, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of 64"):
        pool_blocks(q[:, :100])
    with pytest.raises(ValueError, match="sta_rows"):
        nabla_block_mask(pool_blocks(q), pool_blocks(q), torch.ones(3, 2, dtype=torch.bool), 0.9)
    with pytest.raises(ValueError, match="multiples of 8"):
        to_fractal(torch.randn(1, 1, 12, 8, 3))
