"""Merging per-chunk (out, lse) must reproduce attention over all keys (fp64 naive reference)."""

import pytest
import torch

from k5.kernels.attention import dense_attention
from k5.kernels.merge import merge_all, merge_attention
from numerics import rel_err
from test_attention import naive

# fp32 kernels + fp32 merge vs fp64 reference.
FP32_TOL = 1e-5


def chunks_of(q, k, v, key_mask, bounds, dtype=torch.float32):
    """dense_attention of q over each key range [a, b) of ``bounds``."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    return [dense_attention(q, k[:, a:b], v[:, a:b], key_mask[:, a:b]) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("bounds", [[0, 20, 48], [0, 10, 24, 48], [0, 5, 16, 30, 48]])
def test_merge_matches_full_attention(bounds):
    g = torch.Generator().manual_seed(1)
    B, Sq, Sk, H, D = 2, 19, 48, 3, 8
    q, k, v = (torch.randn(B, S, H, D, generator=g) for S in (Sq, Sk, Sk))
    mask = torch.rand(B, Sk, generator=g) > 0.3
    mask[:, bounds[1] : bounds[2]] = False  # one chunk fully masked: lse -inf, out 0
    k[:, :4] *= 8  # large logits in the first chunk: big lse gaps between chunks
    out, lse = merge_all(chunks_of(q, k, v, mask, bounds))
    ref, ref_lse = naive(q, k, v, mask)
    assert out.dtype == torch.float32 and not out.isnan().any() and not lse.isnan().any()
    assert rel_err(out, ref) < FP32_TOL
    assert (lse.double() - ref_lse).abs().max() < 1e-5 * ref_lse.abs().max()


def test_bf16_chunks_merge_in_fp32():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, S, 2, 8, generator=g) for S in (16, 40, 40))
    mask = torch.ones(1, 40, dtype=torch.bool)
    out, lse = merge_all(chunks_of(q, k, v, mask, [0, 13, 40], dtype=torch.bfloat16))
    ref, _ = naive(*(t.bfloat16() for t in (q, k, v)), mask)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 2e-2  # bf16 per-chunk outputs


def test_empty_sides():
    """Hand cases: empty chunk is the identity; two empty chunks give (0, -inf); no NaN anywhere."""
    out = torch.randn(1, 3, 2, 4)
    lse = torch.randn(1, 2, 3)
    zero, ninf = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    o, l = merge_attention(out, lse, zero, ninf)
    assert torch.equal(o, out) and torch.equal(l, lse)
    o, l = merge_attention(zero, ninf, out, lse)
    assert torch.equal(o, out) and torch.equal(l, lse)
    o, l = merge_attention(zero, ninf, zero, ninf)
    assert (o == 0).all() and torch.isneginf(l).all()
    # Equal lse: plain average, lse + log 2.
    o, l = merge_attention(out, lse, 3 * out, lse)
    assert torch.allclose(o, 2 * out) and torch.allclose(l, lse + torch.log(torch.tensor(2.0)))
    # Huge gap: no overflow, the larger side wins.
    o, l = merge_attention(out, lse + 1e4, zero, lse)
    assert torch.allclose(o, out) and torch.allclose(l, lse + 1e4)


def test_mismatched_chunks_are_named():
    with pytest.raises(ValueError, match="matching"):
        merge_attention(torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 3), torch.zeros(1, 4, 2, 4), torch.zeros(1, 2, 4))
