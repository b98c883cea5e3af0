"""How a token sequence is cut into sequence-parallel shards.

Shards are contiguous, equal, and start on 64-token block boundaries (the NABLA block grid), so a
NABLA block never straddles two ranks. When the block count (or the token count) does not divide, the
sequence is padded at the END with whole pad blocks; dense attention masks pad keys (key_mask) and
NABLA excludes pad blocks (k_valid), so results stay exact. Pad query rows are trimmed by ``unshard``.

SP rank order is ``sp_rank = ring_rank * ulysses + ulysses_rank``: after the Ulysses all-to-all inside
Ulysses group g (= ring rank g), a rank holds contiguous span g (its group's shards concatenated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from k5.parallel.comm_stats import CommStats


@dataclass(frozen=True)
class SequenceLayout:
    num_tokens: int
    sp_size: int
    block: int = 64

    def __post_init__(self):
        if self.num_tokens < 1 or self.sp_size < 1 or self.block < 1:
            raise ValueError(f"SequenceLayout needs positive sizes, got {self}")

    @property
    def num_blocks(self) -> int:
        """Blocks holding at least one real token."""
        return -(-self.num_tokens // self.block)

    @property
    def padded_blocks(self) -> int:
        return -(-self.num_blocks // self.sp_size) * self.sp_size

    @property
    def padded_len(self) -> int:
        return self.padded_blocks * self.block

    @property
    def shard_blocks(self) -> int:
        return self.padded_blocks // self.sp_size

    @property
    def shard_len(self) -> int:
        return self.shard_blocks * self.block

    @property
    def pad(self) -> int:
        return self.padded_len - self.num_tokens

    def token_valid(self, start: int = 0, length: int | None = None, device=None) -> torch.Tensor:
        """bool [length]: which padded positions start..start+length-1 are real tokens."""
        length = self.padded_len - start if length is None else length
        return torch.arange(start, start + length, device=device) < self.num_tokens

    def block_valid(self, start: int = 0, length: int | None = None, device=None) -> torch.Tensor:
        """bool [length]: which padded blocks start..start+length-1 hold a real token."""
        length = self.padded_blocks - start if length is None else length
        return torch.arange(start, start + length, device=device) < self.num_blocks

    def pad_to_length(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if x.shape[dim] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens on dim {dim}, got shape {tuple(x.shape)}")
        if self.pad == 0:
            return x
        dim = dim % x.dim()
        return F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, self.pad])

    def shard(self, x: torch.Tensor, dim: int, sp_rank: int) -> torch.Tensor:
        """This SP rank's shard of the full sequence ``x`` (zero-padded at the end first), a copy with the standard
        strides: the blocks then see one memory layout at every layer, so a compiled block needs one variant, not
        two (``contiguous()`` would keep the view's stride on a size-1 batch dim, which dynamo guards on)."""
        shard = self.pad_to_length(x, dim).narrow(dim, sp_rank * self.shard_len, self.shard_len)
        return shard.clone(memory_format=torch.contiguous_format)

    def unshard(self, x_local: torch.Tensor, dim: int, group, stats: CommStats | None = None) -> torch.Tensor:
        """All-gather the shards over the SP ``group`` (rank order = SP order) and drop the padding."""
        n = dist.get_world_size(group)
        if n != self.sp_size or x_local.shape[dim] != self.shard_len:
            raise ValueError(
                f"unshard expects {self.sp_size} ranks with {self.shard_len} tokens on dim {dim}; "
                f"got {n} ranks and shape {tuple(x_local.shape)}"
            )
        parts = [torch.empty_like(x_local) for _ in range(n)]
        dist.all_gather(parts, x_local.contiguous(), group=group)
        if stats is not None:
            stats.all_gather(x_local, n)
        return torch.cat(parts, dim).narrow(dim, 0, self.num_tokens)
