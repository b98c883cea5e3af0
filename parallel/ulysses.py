"""Ulysses all-to-alls (BSHD): sequence-sharded <-> head-sharded.

In: q, k, v [B, S/U, H, D] -> [B, S, H/U, D], as ONE packed all-to-all (q, k, v stacked), because
three latency-bound collectives per layer cost more than one three times larger.
Out: [B, S, H/U, D] -> [B, S/U, H, D].

Ulysses rank u ends up with heads [u*H/U, (u+1)*H/U) of the sequence made of the group's shards in
rank order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from k5.parallel.comm_stats import CommStats


def _all_to_all(send: torch.Tensor, group, stats: CommStats | None) -> torch.Tensor:
    """all_to_all_single on dim 0 (= destination rank on send, source rank on receive)."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    if stats is not None:
        stats.all_to_all(send, dist.get_world_size(group))
    return recv


def qkv_to_heads(q, k, v, group, stats: CommStats | None = None):
    """[B, S_l, H, D] x3 -> [B, U*S_l, H/U, D] x3 with one all-to-all over the Ulysses ``group``."""
    U = dist.get_world_size(group)
    B, S_l, H, D = q.shape
    if H % U:
        raise ValueError(f"{H} heads do not divide by ulysses degree {U}")
    if U == 1:
        return q, k, v
    qkv = torch.stack((q, k, v))  # [3, B, S_l, H, D]
    send = qkv.view(3, B, S_l, U, H // U, D).permute(3, 0, 1, 2, 4, 5).contiguous()
    recv = _all_to_all(send, group, stats)  # [U (sequence chunk), 3, B, S_l, H/U, D]
    qkv = recv.permute(1, 2, 0, 3, 4, 5).reshape(3, B, U * S_l, H // U, D)
    return qkv[0], qkv[1], qkv[2]


def out_to_sequence(x, group, stats: CommStats | None = None):
    """[B, U*S_l, H/U, D] -> [B, S_l, H, D], the inverse of ``qkv_to_heads`` for one tensor."""
    U = dist.get_world_size(group)
    if U == 1:
        return x
    B, S, Hl, D = x.shape
    send = x.view(B, U, S // U, Hl, D).transpose(0, 1).contiguous()
    recv = _all_to_all(send, group, stats)  # [U (head chunk), B, S_l, H/U, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(B, S // U, U * Hl, D)
