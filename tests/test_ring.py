"""Ring attention (ring degree R, no Ulysses) against single-process attention on the full sequence."""

import torch
import torch.nn.functional as F

from distributed import run_distributed
from k5.kernels.attention import dense_attention
from k5.kernels.nabla import NablaSpec, block_sparse_attention, nabla_block_mask, pool_blocks, sta_block_mask
from k5.parallel.comm_stats import CommStats
from k5.parallel.layout import SequenceLayout
from k5.parallel.mesh import ParallelDims
from k5.parallel.ring import Padding, RingCounters, ring_dense_attention, ring_nabla_attention
from numerics import reference_attention, rel_err

B, H, D = 2, 4, 8
TOL = 1e-4


def _qkv(num_tokens, seed, block_scale=1.5):
    """Random q, k, v with a per-64-token-block offset, so pooled blocks differ and NABLA masks are not trivial."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-num_tokens // 64)

    def one():
        offset = block_scale * torch.randn(B, nb, 1, H, D, generator=g)
        x = torch.randn(B, nb, 64, H, D, generator=g) + offset
        return x.reshape(B, nb * 64, H, D)[:, :num_tokens].contiguous()

    return one(), one(), one()


def _run_cases(rank, world_size, cases):
    dims = ParallelDims(ring=world_size)
    dims.build_mesh("cpu")
    group = dims.ring_group
    results = []
    for case in cases:
        layout = SequenceLayout(case["num_tokens"], world_size)
        ql, kl, vl = (layout.shard(x, 1, rank) for x in case["qkv"])
        stats, counters = CommStats(), RingCounters()
        rows = None
        if case["spec"] is None:
            padding = Padding(layout.num_tokens, layout.token_valid()) if layout.pad else None
            out, lse = ring_dense_attention(ql, kl, vl, group, padding, stats, counters)
        else:
            spec, nbl = case["spec"], layout.shard_blocks
            pad = layout.padded_blocks - layout.num_blocks
            sta = F.pad(sta_block_mask(*case["grid"], spec.wT, spec.wH, spec.wW), (0, pad, 0, pad))
            out, lse, rows = ring_nabla_attention(
                ql, kl, vl, group, spec.P, sta[rank * nbl : (rank + 1) * nbl],
                k_valid=layout.num_blocks, q_valid=layout.block_valid(rank * nbl, nbl),
                stats=stats, counters=counters,
            )
        results.append(dict(
            out=layout.unshard(out, 1, group), lse=layout.unshard(lse, 2, group), rows=rows,
            stats=stats.summary(), counters=counters,
        ))
    return results


def _nabla_case(num_tokens, grid, spec, seed, **kw):
    return dict(num_tokens=num_tokens, grid=grid, spec=spec, qkv=_qkv(num_tokens, seed, **kw))


def _check_dense(case, res):
    q, k, v = case["qkv"]
    ref_out, ref_lse = dense_attention(q, k, v)
    for r in res:
        assert rel_err(r["out"], ref_out) <= TOL
        assert rel_err(r["lse"], ref_lse) <= TOL


def _check_nabla(case, res):
    q, k, v = case["qkv"]
    spec = case["spec"]
    mask = nabla_block_mask(pool_blocks(q), pool_blocks(k), sta_block_mask(*case["grid"], spec.wT, spec.wH, spec.wW), spec.P)
    assert 0 < mask.float().mean() < 1  # the test data selects some blocks, not all
    ref_out, ref_lse = block_sparse_attention(q, k, v, mask)
    naive = reference_attention(q, k, v, block_mask=mask)[0]
    nb = mask.shape[-1]
    rows = torch.cat([r["rows"] for r in res], 2)  # ring rank g holds the rows of span g
    assert not rows[:, :, nb:].any() and not rows[..., nb:].any()  # pad blocks: never selected, empty rows
    assert torch.equal(rows[:, :, :nb, :nb], mask)
    for r in res:
        assert rel_err(r["out"], ref_out) <= TOL
        assert rel_err(r["out"], naive) <= TOL
        assert rel_err(r["lse"], ref_lse) <= TOL


def _check_bytes(case, res, R):
    layout = SequenceLayout(case["num_tokens"], R)
    # R-1 hops, each sends this rank's packed K and V chunk: 2 * B * shard_len * H * D fp32 values.
    p2p = (R - 1) * 2 * B * layout.shard_len * H * D * 4
    expected = {"p2p_ring": {"bytes": p2p, "calls": R - 1}}
    if case["spec"] is not None:
        # Pooled keys (fp32 [B, H, shard_blocks, D]) all-gathered once: sent to the R-1 other ranks.
        expected["all_gather"] = {"bytes": (R - 1) * B * H * layout.shard_blocks * D * 4, "calls": 1}
    for r in res:
        assert r["stats"] == expected


def test_ring_uneven_three_ranks():
    # 600 tokens: 10 blocks, the last partial, padded to 12 blocks (4 per rank); the 10-block NABLA grid is
    # padded with 2 whole pad blocks.
    cases = [
        dict(num_tokens=600, grid=None, spec=None, qkv=_qkv(600, 1)),
        _nabla_case(640, (5, 1, 2), NablaSpec(P=0.5, wT=3, wH=1, wW=1), seed=2),
    ]
    res = run_distributed(_run_cases, 3, cases)
    for i, case in enumerate(cases):
        per_case = [r[i] for r in res]
        if case["spec"] is None:
            _check_dense(case, per_case)
        else:
            _check_nabla(case, per_case)
        _check_bytes(case, per_case, 3)


def _diagonal_qkv(nb):
    """q and k of block i both point along basis vector i (plus noise): each query block's pooled attention puts
    almost all of its mass (about 0.98) on its own key block, so NABLA with P = 0.5 keeps only the diagonal."""
    g = torch.Generator().manual_seed(3)
    basis = 4.0 * torch.eye(D)[torch.arange(nb) % D]  # [nb, D]
    centers = basis[None, :, None, None, :].expand(B, nb, 64, H, D)
    q, k = (centers + 0.1 * torch.randn(B, nb, 64, H, D, generator=g) for _ in range(2))
    v = torch.randn(B, nb, 64, H, D, generator=g)
    return tuple(x.reshape(B, nb * 64, H, D) for x in (q, k, v))


def test_ring_skips_empty_steps_four_ranks():
    R, nb = 4, 8
    diag = dict(num_tokens=nb * 64, grid=(nb, 1, 1), spec=NablaSpec(P=0.5, wT=1, wH=1, wW=1), qkv=_diagonal_qkv(nb))
    uneven = _nabla_case(640, (5, 2, 1), NablaSpec(P=0.7, wT=3, wH=3, wW=1), seed=4)
    res = run_distributed(_run_cases, R, [diag, uneven])
    # Diagonal mask: a rank's rows select only blocks of its own span, i.e. step 0 runs and the R-1 others are
    # skipped without a kernel call. (K/V still rotate: the bytes below count all R-1 hops.)
    q, k, _ = diag["qkv"]
    mask = nabla_block_mask(pool_blocks(q), pool_blocks(k), torch.eye(nb, dtype=torch.bool), 0.5)
    assert torch.equal(mask, torch.eye(nb, dtype=torch.bool).expand(B, H, nb, nb))
    for r in res:
        assert (r[0]["counters"].kernel_calls, r[0]["counters"].skipped_steps) == (1, R - 1)
        assert r[1]["counters"].kernel_calls + r[1]["counters"].skipped_steps == R
    _check_nabla(diag, [r[0] for r in res])
    _check_bytes(diag, [r[0] for r in res], R)
    _check_nabla(uneven, [r[1] for r in res])
    _check_bytes(uneven, [r[1] for r in res], R)


# ---- under torch.compile: one compiled step serves every ring step (issue 19) ------------------------------------


def _compiled_ring(rank, world_size, cases):
    """Each case's ring attention inside a compiled function (static shapes, as engine.compile compiles a DiT
    block), called twice, under a recompile limit of one shape's variants that raises when hit; and eagerly.
    Returns the outputs, the frames dynamo compiled in each call, and the compiled variants of the per-step
    functions (dense_attention, block_sparse_attention, merge_attention)."""
    import torch._dynamo
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.testing import CompileCounter

    from k5.engine.compile import variants_per_shape
    from k5.kernels.merge import merge_attention

    dims = ParallelDims(ring=world_size)
    dims.build_mesh("cpu")
    group = dims.ring_group
    results = []
    for case in cases:
        torch._dynamo.reset()
        layout = SequenceLayout(case["num_tokens"], world_size)
        ql, kl, vl = (layout.shard(x, 1, rank) for x in case["qkv"])
        if case["spec"] is None:
            padding = Padding(layout.num_tokens, layout.token_valid()) if layout.pad else None

            def attend(q, k, v):
                return ring_dense_attention(q, k, v, group, padding)
        else:
            spec, nbl = case["spec"], layout.shard_blocks
            pad = layout.padded_blocks - layout.num_blocks
            sta = F.pad(sta_block_mask(*case["grid"], spec.wT, spec.wH, spec.wW), (0, pad, 0, pad))
            q_valid = layout.block_valid(rank * nbl, nbl)

            def attend(q, k, v):
                return ring_nabla_attention(q, k, v, group, spec.P, sta[rank * nbl : (rank + 1) * nbl],
                                            k_valid=layout.num_blocks, q_valid=q_valid)[:2]

        def block(q, k, v):  # work before and after the attention, as in a DiT block
            out, lse = attend(q * 0.5, k, v)
            return out + 1.0, lse

        counter = CompileCounter()  # dynamo's graphs, run as captured: what is compiled and how often
        compiled = torch.compile(block, backend=counter, dynamic=False)
        eager = block(ql, kl, vl)
        frames = []
        with dynamo_config.patch(recompile_limit=variants_per_shape(ring=world_size),
                                 fail_on_recompile_limit_hit=True):
            for _ in range(2):
                before = counter.frame_count
                out = compiled(ql, kl, vl)
                frames.append(counter.frame_count - before)
        variants = {fn.__name__: len(_debug_get_cache_entry_list(fn.__code__))
                    for fn in (dense_attention, block_sparse_attention, merge_attention)}
        results.append(dict(out=[layout.unshard(x, d, group) for x, d in zip(out, (1, 2))],
                            eager=[layout.unshard(x, d, group) for x, d in zip(eager, (1, 2))],
                            frames=frames, variants=variants))
    return results


def test_compiled_ring_compiles_each_step_kind_once_three_ranks():
    """Three ring ranks under torch.compile (dynamo, its graphs counted and run as captured: recompiles are dynamo's
    decision, whatever backend then generates the code). Dense without padding: three steps alike, one compiled
    step; dense with padding (200 tokens in 3 spans of 128: one full span, one partial, one all padding): a plain
    and a key-masked step, the empty span skipped; NABLA: one step. No code object needs more compiled variants than
    one shape's allowance (engine.compile.variants_per_shape, made the recompile limit, with hitting it an error),
    whatever the ring degree: the step index never reaches a compiled frame (before issue 19 each step was a
    recompile of its own, three here). The second call compiles nothing, and the output equals the eager one (same
    kernels; tolerance 1e-6) and, for the plain case, one process's dense attention (TOL)."""
    cases = [
        dict(num_tokens=384, grid=None, spec=None, qkv=_qkv(384, 11)),
        dict(num_tokens=200, grid=None, spec=None, qkv=_qkv(200, 12)),
        _nabla_case(384, (3, 2, 1), NablaSpec(P=0.7, wT=3, wH=3, wW=1), seed=13),
    ]
    res = run_distributed(_compiled_ring, 3, cases)
    for r in res:
        plain, padded, nabla = r
        for case in (plain, padded, nabla):
            assert case["frames"][0] > 0 and case["frames"][1] == 0, case["frames"]
            for got, want in zip(case["out"], case["eager"]):
                assert rel_err(got, want) <= 1e-6
        assert plain["variants"]["dense_attention"] == 1 and plain["variants"]["merge_attention"] == 1
        assert padded["variants"]["dense_attention"] == 2  # plain and key-masked
        assert nabla["variants"]["block_sparse_attention"] == 1
    # And it is the attention: the plain case against one process's dense attention on the whole sequence.
    q, k, v = cases[0]["qkv"]
    ref_out, ref_lse = dense_attention(q * 0.5, k, v)
    for r in res:
        assert rel_err(r[0]["out"][0] - 1.0, ref_out) <= TOL and rel_err(r[0]["out"][1], ref_lse) <= TOL
