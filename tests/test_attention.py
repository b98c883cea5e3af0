"""Dense attention kernels against a naive fp64 softmax(QK^T/sqrt(D))V."""

import pytest
import torch

from k5.kernels import attention as attn_mod
from k5.kernels.attention import attention, dense_attention
from numerics import reference_attention as naive, rel_err


def make(B=2, Sq=37, Sk=53, H=3, D=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, generator=g).to(dtype) for S in (Sq, Sk, Sk))
    mask = torch.rand(B, Sk, generator=g) > 0.4
    return q, k, v, mask


# fp32 kernels vs fp64 reference: rounding only.
FP32_TOL = 1e-5
# bf16 inputs are rounded before both runs; what is left is bf16 accumulation / output rounding.
BF16_TOL = 2e-2


@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_naive(masked):
    q, k, v, mask = make()
    mask = mask if masked else None
    out = attention(q, k, v, mask)
    ref, _ = naive(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < FP32_TOL


@pytest.mark.parametrize("masked", [False, True])
def test_dense_attention_out_and_lse(masked):
    q, k, v, mask = make()
    mask = mask if masked else None
    out, lse = dense_attention(q, k, v, mask)
    ref, ref_lse = naive(q, k, v, mask)
    assert lse.shape == (2, 3, 37) and lse.dtype == torch.float32
    assert rel_err(out, ref) < FP32_TOL
    assert (lse.double() - ref_lse).abs().max() < 1e-5


def test_fully_masked_rows_are_zero_with_minus_inf_lse():
    q, k, v, mask = make()
    mask[1] = False
    out, lse = dense_attention(q, k, v, mask)
    ref, ref_lse = naive(q, k, v, mask)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert rel_err(out[0], ref[0]) < FP32_TOL and (lse[0].double() - ref_lse[0]).abs().max() < 1e-5
    out2 = attention(q, k, v, mask)
    assert (out2[1] == 0).all() and rel_err(out2[0], ref[0]) < FP32_TOL


def test_bf16_inputs():
    q, k, v, mask = make(dtype=torch.bfloat16)
    ref, ref_lse = naive(q, k, v, mask)
    out, lse = dense_attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert rel_err(out, ref) < BF16_TOL
    assert (lse.double() - ref_lse).abs().max() < BF16_TOL * ref_lse.abs().max()
    assert rel_err(attention(q, k, v, mask), ref) < BF16_TOL


def test_explicit_fallback(monkeypatch):
    """The chunked fallback (used for dtypes/devices the CPU kernel lacks) on several query chunks."""
    monkeypatch.setattr(attn_mod, "_FALLBACK_Q_CHUNK", 8)
    q, k, v, mask = make()
    mask[0] = False
    out, lse = attn_mod._dense_explicit(*(t.transpose(1, 2) for t in (q, k, v)), mask)
    ref, ref_lse = naive(q, k, v, mask)
    assert not out.isnan().any()
    assert rel_err(out.transpose(1, 2), ref) < FP32_TOL
    assert torch.isneginf(lse[0]).all() and (lse[1].double() - ref_lse[1]).abs().max() < 1e-5


def test_bad_shapes_are_named():
    q, k, v, mask = make()
    with pytest.raises(ValueError, match="key_mask"):
        dense_attention(q, k, v, mask[:, :5])
    with pytest.raises(ValueError, match="q"):
        attention(q, k[..., :8], v[..., :8])
