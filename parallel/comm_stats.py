"""Bytes each rank sends, per collective type.

A ``CommStats`` is owned by whoever issues the collectives (e.g. one attention layer) and passed down;
nothing here is global. Counts are bytes that actually leave this rank:

- all_to_all over n ranks: (n-1)/n of the buffer (the 1/n addressed to itself stays local);
- all_gather of a local chunk over n ranks: (n-1) * chunk (every peer needs it once);
- p2p_ring: each K/V buffer sent to the next ring rank.
"""

from __future__ import annotations

from collections import defaultdict

import torch


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CommStats:
    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.steps: list[dict[str, dict[str, int]]] = []

    # Inside a compiled block this runs eagerly: traced, dynamo would guard on the counters' values and recompile
    # the block at every call (and past its recompile limit fall back to eager for good).
    @torch.compiler.disable
    def add(self, kind: str, num_bytes: int) -> None:
        self.bytes[kind] += int(num_bytes)
        self.calls[kind] += 1

    def all_to_all(self, buffer: torch.Tensor, group_size: int) -> None:
        self.add("all_to_all", nbytes(buffer) * (group_size - 1) // group_size)

    def all_gather(self, chunk: torch.Tensor, group_size: int) -> None:
        self.add("all_gather", nbytes(chunk) * (group_size - 1))

    def p2p_ring(self, buffer: torch.Tensor) -> None:
        self.add("p2p_ring", nbytes(buffer))

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def summary(self) -> dict[str, dict[str, int]]:
        """{kind: {"bytes": ..., "calls": ...}} since the last reset()."""
        return {k: {"bytes": self.bytes[k], "calls": self.calls[k]} for k in sorted(self.bytes)}

    def end_step(self) -> dict[str, dict[str, int]]:
        """Close one step (e.g. one denoising step): record its summary in ``steps`` and reset the counters."""
        s = self.summary()
        self.steps.append(s)
        self.reset()
        return s

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def format(self) -> str:
        parts = [f"{k} {v['bytes'] / 2**20:.2f} MiB in {v['calls']} calls" for k, v in self.summary().items()]
        return "; ".join(parts) if parts else "no communication"
