"""Online-softmax merge of partial attention results computed over disjoint key chunks.

Given (out_i, lse_i) of the same queries over key sets K_i, attention over the union is
    lse = log(sum_i exp(lse_i)),   out = sum_i exp(lse_i - lse) * out_i.
Written in the sigmoid / logsigmoid form of ring-flash-attention / yunchang (`update_out_and_lse`): the older
`lse + log(1 + exp(block_lse - lse))` overflows once the lse gap is large. Accumulators are fp32 because bf16
partial outputs lose precision with every merge.

Shapes follow the project convention: out [B, S, H, D], lse fp32 [B, H, S]. An empty chunk (lse = -inf, out = 0)
is the identity of the merge.
"""

import torch
import torch.nn.functional as F


def merge_attention(out, lse, block_out, block_lse):
    """Merge one more chunk into (out, lse). Returns fp32 (out [B,S,H,D], lse [B,H,S]).

    Rows with lse = -inf must have out = 0 (what every kernel in this package returns for them).
    """
    if out.shape != block_out.shape or lse.shape != block_lse.shape:
        raise ValueError(
            f"merge_attention needs matching chunks: out {tuple(out.shape)} vs {tuple(block_out.shape)}, "
            f"lse {tuple(lse.shape)} vs {tuple(block_lse.shape)}"
        )
    out, block_out = out.float(), block_out.float()
    lse, block_lse = lse.float(), block_lse.float()
    empty, block_empty = torch.isneginf(lse), torch.isneginf(block_lse)
    # Weight of the new chunk, exp(block_lse - new_lse). With -inf on a side the difference is NaN or +-inf, so
    # pin those cases: an empty side contributes nothing, and two empty sides stay empty.
    w = torch.sigmoid(block_lse - lse)
    w = torch.where(block_empty, 0.0, torch.where(empty, 1.0, w))
    new_lse = torch.where(empty, block_lse, lse - F.logsigmoid(lse - block_lse))
    # out - w * (out - block_out) is exact at w = 0 and, since empty rows hold 0, at w = 1.
    w = w.transpose(1, 2).unsqueeze(-1)  # [B,H,S] -> [B,S,H,1]
    return out - w * (out - block_out), new_lse


def merge_all(chunks):
    """Merge an iterable of (out, lse) pairs over disjoint key chunks into one fp32 (out, lse)."""
    chunks = iter(chunks)
    try:
        out, lse = next(chunks)
    except StopIteration:
        raise ValueError("merge_all needs at least one (out, lse) chunk") from None
    out, lse = out.float(), lse.float()
    for block_out, block_lse in chunks:
        out, lse = merge_attention(out, lse, block_out, block_lse)
    return out, lse
