"""NABLA's FlexAttention route (the CUDA kernel), run on the CPU through compiled flex with partial blocks.

The BlockMask conversion is checked against an independent fp64 attention with the tile mask expanded to tokens,
over more distinct shapes than dynamo's recompile limit in one process (the limit is lowered to keep it cheap): a
silent fallback to eager flex would compute dense attention (wrong by far more than the tolerance, shown below).
"""

import pytest
import torch
import torch._dynamo
import torch._dynamo.config as dynamo_config

from k5.kernels import flex
from k5.kernels.attention import resolve_dense_backend, set_dense_backend
from k5.kernels.nabla import block_sparse_attention, nabla_backend
from numerics import reference_attention, rel_err

FP32_TOL = 1e-5  # compiled fp32 kernel vs the fp64 reference: rounding only
LIMIT = 2  # the recompile limit inside these tests (dynamo's default is 8)


def _case(B, H, nq, nk, D, seed, density=0.4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nq * 64, H, D, generator=g)
    k, v = (torch.randn(B, nk * 64, H, D, generator=g) for _ in range(2))
    mask = torch.rand(B, H, nq, nk, generator=g) < density
    mask[0, 0, 0] = False  # an empty tile row: its queries see nothing
    mask[-1, -1, -1] = True  # a full tile row
    return q, k, v, mask


def _decode(num, idx, nk):
    """kv_num_blocks / kv_indices -> bool [B, H, nq, nk] (the first num indices of a row are its tiles)."""
    sel = torch.arange(idx.shape[-1]) < num[..., None]
    return torch.zeros(*idx.shape[:-1], nk, dtype=torch.bool).scatter_(-1, idx.long(), sel)


def test_block_mask_holds_the_tiles_and_no_backward_metadata():
    _, _, _, mask = _case(2, 3, 4, 5, 8, seed=1)
    full = flex.block_mask_from_tiles(mask, 4 * 64, 5 * 64)
    assert torch.equal(_decode(full.full_kv_num_blocks, full.full_kv_indices, 5), mask)
    assert not full.kv_num_blocks.any()  # CUDA route: every selected tile is a full block, no mask_mod inside
    part = flex.block_mask_from_tiles(mask, 4 * 64, 5 * 64, partial=True)
    assert torch.equal(_decode(part.kv_num_blocks, part.kv_indices, 5), mask) and part.full_kv_num_blocks is None
    for bm in (full, part):
        assert bm.q_num_blocks is None and bm.q_indices is None  # only a backward pass would read these
        assert bm.BLOCK_SIZE == (64, 64) and bm.seq_lengths == (4 * 64, 5 * 64)
    # The kernel's tiles divide the 64-token NABLA blocks (inductor's sm90 defaults of 128 would not).
    assert 64 % flex.KERNEL_OPTIONS["BLOCK_M"] == 0 and 64 % flex.KERNEL_OPTIONS["BLOCK_N"] == 0


def test_compiled_flex_matches_masked_reference_past_the_recompile_limit():
    torch._dynamo.reset()
    shapes = [(3, 3), (4, 4), (2, 5), (5, 2), (6, 3)]  # more distinct shapes than LIMIT
    assert len(shapes) > LIMIT
    with dynamo_config.patch(recompile_limit=LIMIT), nabla_backend("flex"):
        for i, (nq, nk) in enumerate(shapes):
            q, k, v, mask = _case(1, 2, nq, nk, 16, seed=10 + i)
            out, lse = block_sparse_attention(q, k, v, mask, return_lse=False)
            ref, _ = reference_attention(q, k, v, block_mask=mask)
            assert lse is None and out.dtype == torch.float32
            assert rel_err(out, ref) < FP32_TOL, (nq, nk)
            assert (out[0, :64, 0] == 0).all()  # the empty tile row: out = 0, as the other kernels give
    # One static kernel for the first shape, one dynamic-shape kernel reused by every later one.
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(flex.compiled_flex()._torchdynamo_orig_callable)
    assert len(entries) <= LIMIT

    # The failure this guards against is detectable: eager flex on the same BlockMask computes dense attention.
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v, mask = _case(1, 2, 3, 3, 16, seed=10)
    eager = flex_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                           block_mask=flex.block_mask_from_tiles(mask, 192, 192, partial=True)).transpose(1, 2)
    assert rel_err(eager, reference_attention(q, k, v, block_mask=mask)[0]) > 0.1


def test_recompile_limit_hit_raises_instead_of_running_eager():
    q, k, v, mask = _case(1, 2, 2, 2, 16, seed=20)
    with nabla_backend("flex"):
        block_sparse_attention(q, k, v, mask, return_lse=False)  # compiled (or reused) for fp32
        code = flex.compiled_flex()._torchdynamo_orig_callable
        entries = len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code))
        # No room for one more variant: bf16 needs a new kernel, which must be an error, not eager flex.
        with dynamo_config.patch(recompile_limit=entries), pytest.raises(Exception, match="recompile"):
            block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, return_lse=False)


def test_cpu_flex_refuses_the_lse_it_cannot_give():
    q, k, v, mask = _case(1, 1, 2, 2, 8, seed=30)
    with nabla_backend("flex"), pytest.raises(ValueError, match="log-sum-exp"):
        block_sparse_attention(q, k, v, mask)
    with pytest.raises(ValueError, match="not one of"):
        nabla_backend("triton").__enter__()


def test_dense_backend_names():
    assert resolve_dense_backend("auto", "cpu", torch.bfloat16, 64) == "cpu"
    with pytest.raises(ValueError, match="cudnn, flash"):
        set_dense_backend("fastest")


# ---- the tile indices: no second sort (issue 19) ------------------------------------------------------------------


def _argsort_tile_indices(mask):
    """The tile indices as k5 built them before issue 19: a stable descending argsort of the 0/1 mask (selected
    tiles first; within each group, ties broken by ascending key index)."""
    return torch.argsort(mask.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)


def _old_block_mask_from_tiles(mask, q_len, kv_len, partial=False):
    """block_mask_from_tiles before issue 19, written out."""
    from torch.nn.attention.flex_attention import BlockMask

    num = mask.sum(-1, dtype=torch.int32)
    idx = _argsort_tile_indices(mask)
    if partial:
        return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=64, mask_mod=flex._keep_all, seq_lengths=(q_len, kv_len),
                                        compute_q_blocks=False)
    return BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx, BLOCK_SIZE=64, mask_mod=None,
                                    seq_lengths=(q_len, kv_len), compute_q_blocks=False)


def test_tile_indices_are_the_argsort_they_replace():
    """kv_tiles against the stable argsort it replaces, bitwise, on random masks of every density: rows with no
    selected tile, with every tile, and everything between (every selected tile ties with every other, and so does
    every unselected one: the order within a group is the tie rule)."""
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 3, 7, 13), (1, 2, 5, 300), (1, 1, 1, 1), (4, 64)):
        for density in (0.0, 0.03, 0.5, 0.97, 1.0):
            mask = torch.rand(shape, generator=g) < density
            num, idx = flex.kv_tiles(mask)
            assert num.dtype == idx.dtype == torch.int32
            assert torch.equal(idx, _argsort_tile_indices(mask)), (shape, density)
            assert torch.equal(num, mask.sum(-1, dtype=torch.int32)), (shape, density)


def test_nabla_block_masks_are_bitwise_the_old_ones_with_ties():
    """The whole build (nabla_mask, then the BlockMask of both routes) against the old conversion written out above,
    on q, k whose tiles repeat: equal pooled keys give exactly tied scores, so the top-CDF sort meets ties too (its
    rule is unchanged: a stable ascending sort, the lower key index dropped first; the reference's
    nablaT_v2 sorts without stable=True, so its choice among tied tiles is the sort implementation's).

    By hand, four equal scores (p = 0.25 each, cdf 0.25, 0.5, 0.75, 1) at P = 0.5 keep cdf >= 0.5: tiles 1, 2, 3,
    and tile 0 (first in the stable order) is the one dropped."""
    from k5.kernels.nabla import NablaSpec, nabla_block_mask, nabla_mask

    none = torch.zeros(1, 4, dtype=torch.bool)
    tied = nabla_block_mask(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 4, 1), none, 0.5)
    assert tied.view(4).tolist() == [False, True, True, True]

    g = torch.Generator().manual_seed(3)
    T, Hb, Wb, H, D = 3, 2, 2, 2, 16
    nb = T * Hb * Wb
    base = torch.randint(-2, 3, (1, 4, 1, H, D), generator=g).float()  # 4 distinct tiles, integers: exact sums
    tiles = base[:, torch.arange(nb) % 4]  # each repeated 3 times
    q = (tiles + 0.5).expand(1, nb, 64, H, D).reshape(1, nb * 64, H, D)
    k = tiles.expand(1, nb, 64, H, D).reshape(1, nb * 64, H, D)
    for P in (0.3, 0.5, 0.8):
        mask = nabla_mask(q, k, NablaSpec(P=P, wT=1, wH=1, wW=1), T, Hb, Wb)
        assert mask.any() and not mask.all(), P
        for partial in (False, True):
            new = flex.block_mask_from_tiles(mask, nb * 64, nb * 64, partial=partial)
            old = _old_block_mask_from_tiles(mask, nb * 64, nb * 64, partial=partial)
            for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
                a, b = getattr(new, name), getattr(old, name)
                assert (a is None and b is None) or torch.equal(a, b), (P, partial, name)
