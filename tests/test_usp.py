"""Ulysses x ring sequence-parallel attention against single-process attention on the full sequence."""

import pytest
import torch

from distributed import run_distributed
from k5.kernels.attention import dense_attention
from k5.kernels.nabla import NablaSpec, block_sparse_attention, nabla_block_mask, pool_blocks, sta_block_mask
from k5.parallel.layout import SequenceLayout
from k5.parallel.mesh import ParallelDims
from k5.parallel.usp import SequenceParallelAttention
from numerics import reference_attention, rel_err

B, H, D = 2, 12, 8  # 12 heads divide by ulysses 2, 3, 4
TOL = 1e-4
GRID = (5, 1, 2)  # 10 NABLA blocks: not divisible by 3 or 4
SPEC = NablaSpec(P=0.6, wT=3, wH=1, wW=1)


# ---- layout (single process) -----------------------------------------------------------------------------------


def test_layout_pads_whole_blocks_at_the_end():
    lay = SequenceLayout(600, 3)
    # By hand: 600 tokens = 9 full blocks + 24 tokens -> 10 blocks -> 12 (next multiple of 3) -> 4 per rank.
    assert (lay.num_blocks, lay.padded_blocks, lay.shard_blocks) == (10, 12, 4)
    assert (lay.padded_len, lay.shard_len, lay.pad) == (768, 256, 168)
    assert lay.token_valid().sum() == 600 and not lay.token_valid()[600:].any()
    assert lay.block_valid().tolist() == [True] * 10 + [False] * 2
    assert lay.block_valid(8, 4).tolist() == [True, True, False, False]
    x = torch.randn(2, 600, 3)
    shards = [lay.shard(x, 1, r) for r in range(3)]
    assert all(s.shape == (2, 256, 3) for s in shards)
    full = torch.cat(shards, 1)
    assert torch.equal(full[:, :600], x) and not full[:, 600:].any()
    assert SequenceLayout(640, 2).pad == 0


def test_layout_rejects_wrong_length():
    with pytest.raises(ValueError, match="expected 600 tokens"):
        SequenceLayout(600, 3).shard(torch.zeros(1, 599), 1, 0)


# ---- distributed ---------------------------------------------------------------------------------------------------


def _qkv(num_tokens, seed):
    """Random q, k, v with a per-64-token-block offset, so pooled blocks differ and NABLA masks are not trivial."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-num_tokens // 64)

    def one():
        x = torch.randn(B, nb, 64, H, D, generator=g) + 1.5 * torch.randn(B, nb, 1, H, D, generator=g)
        return x.reshape(B, nb * 64, H, D)[:, :num_tokens].contiguous()

    return one(), one(), one()


def _usp_worker(rank, world_size, splits, cases):
    results = {}
    for U, R in splits:
        dims = ParallelDims(ring=R, ulysses=U)
        dims.build_mesh("cpu")
        for name, case in cases.items():
            layout = SequenceLayout(case["num_tokens"], dims.sp_size)
            q, k, v = (layout.shard(x, 1, dims.sp_rank) for x in case["qkv"])
            attn = SequenceParallelAttention(dims)
            out, rows = attn(q, k, v, layout, nabla=case["spec"], grid=case["grid"], return_mask=True)
            results[(U, R, name)] = dict(
                out=layout.unshard(out, 1, dims.sp_group), rows=rows, g=dims.ring_rank, u=dims.ulysses_rank,
                stats=attn.stats.summary(), counters=attn.counters,
            )
    return results


def _expected_bytes(case, U, R):
    layout = SequenceLayout(case["num_tokens"], U * R)
    shard = B * layout.shard_len * H * D * 4  # one fp32 q/k/v/out shard
    expected = {}
    if U > 1:
        # Packed q/k/v in (3 shards) + out (1 shard), each all-to-all keeps 1/U of its buffer local.
        expected["all_to_all"] = {"bytes": 4 * shard * (U - 1) // U, "calls": 2}
    if R > 1:
        # After Ulysses a rank holds U shards' tokens for H/U heads (= one shard's size); K and V go R-1 hops.
        expected["p2p_ring"] = {"bytes": (R - 1) * 2 * shard, "calls": R - 1}
        if case["spec"] is not None:
            # Pooled keys fp32 [B, H/U, U*shard_blocks, D] all-gathered to R-1 peers.
            expected["all_gather"] = {"bytes": (R - 1) * B * H * layout.shard_blocks * D * 4, "calls": 1}
    return expected


def _check(splits, cases, res):
    for name, case in cases.items():
        q, k, v = case["qkv"]
        if case["spec"] is None:
            ref = dense_attention(q, k, v)[0]
        else:
            spec = case["spec"]
            mask = nabla_block_mask(pool_blocks(q), pool_blocks(k), sta_block_mask(*case["grid"], spec.wT, spec.wH, spec.wW), spec.P)
            assert 0 < mask.float().mean() < 1  # the data selects some blocks, not all
            ref = block_sparse_attention(q, k, v, mask)[0]
            assert rel_err(ref, reference_attention(q, k, v, block_mask=mask)[0]) <= TOL
        for U, R in splits:
            per_rank = [r[(U, R, name)] for r in res]
            for r in per_rank:
                assert r["out"].shape == ref.shape
                assert rel_err(r["out"], ref) <= TOL, (U, R, name)
                assert r["stats"] == _expected_bytes(case, U, R), (U, R, name)
            if case["spec"] is None:
                continue
            # Assemble the global mask from every rank's rows: heads of ulysses rank u, query blocks of span g.
            layout = SequenceLayout(case["num_tokens"], U * R)
            nbp, nbl, Hl, nb = layout.padded_blocks, layout.padded_blocks // R, H // U, mask.shape[-1]
            full = torch.zeros(B, H, nbp, nbp, dtype=torch.bool)
            filled = torch.zeros(H, nbp, dtype=torch.int64)
            for r in per_rank:
                g, u = r["g"], r["u"]
                assert r["rows"].shape == (B, Hl, nbl, nbp)
                full[:, u * Hl : (u + 1) * Hl, g * nbl : (g + 1) * nbl] = r["rows"]
                filled[u * Hl : (u + 1) * Hl, g * nbl : (g + 1) * nbl] += 1
            assert (filled == 1).all()  # every (head, query block) computed by exactly one rank
            assert torch.equal(full[:, :, :nb, :nb], mask), (U, R, name)
            assert not full[:, :, nb:].any() and not full[..., nb:].any()  # pad blocks: empty rows, never selected
            nabla_out = per_rank[0]["out"]
            assert rel_err(nabla_out, reference_attention(q, k, v, block_mask=mask)[0]) <= TOL


def _cases(seed):
    return {
        # 600 tokens: the last block is partial, so dense needs key masking of pad tokens at every split.
        "dense": dict(num_tokens=600, spec=None, grid=None, qkv=_qkv(600, seed)),
        "nabla": dict(num_tokens=640, spec=SPEC, grid=GRID, qkv=_qkv(640, seed + 1)),
    }


def test_usp_two_ranks():
    splits, cases = [(2, 1), (1, 2)], _cases(10)
    _check(splits, cases, run_distributed(_usp_worker, 2, splits, cases))


def test_usp_three_ranks_uneven():
    splits, cases = [(3, 1), (1, 3)], _cases(20)
    _check(splits, cases, run_distributed(_usp_worker, 3, splits, cases))


def test_usp_four_ranks():
    splits, cases = [(4, 1), (1, 4), (2, 2)], _cases(30)
    # 300 tokens = 5 blocks, padded to 8 (2 per rank): at ring degree 4 span 3 is all padding, so dense
    # attention skips it (no kernel call) rather than attending to nothing.
    cases["dense_short"] = dict(num_tokens=300, spec=None, grid=None, qkv=_qkv(300, 31))
    res = run_distributed(_usp_worker, 4, splits, cases)
    _check(splits, cases, res)
    for r in res:
        c = r[(1, 4, "dense_short")]["counters"]
        assert (c.kernel_calls, c.skipped_steps) == (3, 1)
