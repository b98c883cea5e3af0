import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against the reference ``b``, computed in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def reference_attention(q, k, v, key_mask=None, block_mask=None):
    """Independent fp64 attention on BSHD: softmax(QK^T/sqrt(D))V with optional masks, written from the formula.

    ``key_mask`` bool [B, Sk] (True = attend); ``block_mask`` bool [B, H, Sq/64, Sk/64] expanded to 64x64 token
    tiles (NABLA). Returns (out [B, Sq, H, D], lse [B, H, Sq]); a query that sees no key gives (0, -inf).
    """
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    if block_mask is not None:
        tok = block_mask.repeat_interleave(64, -1).repeat_interleave(64, -2)
        s = s.masked_fill(~tok, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1).nan_to_num(0.0) @ v
    return out.transpose(1, 2), lse
