"""Bytes each rank sends, per collective type.

A ``CommStats`` is owned by whoever issues the collectives (e.g. one attention layer) and passed down;
nothing here is global. Counts are bytes that actually leave this rank:

- all_to_all over n ranks: (n-1)/n of the buffer (the 1/n addressed to itself stays local);
- all_gather of a local chunk over n ranks: (n-1) * chunk (every peer needs it once);
- p2p_ring: each K/V buffer sent to the next ring rank.

Counting never ends a compiled graph. A counter that dynamo traced would be a Python int it guards on (a recompile
at every call), and an eager counter (``torch.compiler.disable``) ends the graph at every collective (20 breaks in a
tensor-parallel forward). So every count goes through one custom op, ``k5::tally(key, kind, amount)``: opaque to the
compiler, declared to have a side effect so it is neither removed nor reordered, its arguments constants of the
traced shapes; the compiled graph calls it on every run, as eager code does, and it adds to the counter object
registered under ``key``. Under fake tensors (tests/fakecuda.py) the op does nothing.
"""

from __future__ import annotations

import itertools
import weakref
from collections import defaultdict

import torch
from torch._library.effects import EffectType

# Counter objects by key: a custom op takes strings and numbers, not objects. Weak, so a counter lives as long as its
# owner (a model's attention, a TP layer) and no longer.
_COUNTERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_next_key = itertools.count()


def register_counter(counter) -> str:
    """The key under which ``counter._count(kind, amount)`` receives the tallies of ``tally``."""
    key = f"{type(counter).__name__}:{next(_next_key)}"
    _COUNTERS[key] = counter
    return key


@torch.library.custom_op("k5::tally", mutates_args=())
def tally(key: str, kind: str, amount: int) -> None:
    """Add ``amount`` to counter ``kind`` of the object registered under ``key`` (compiled graphs keep this call)."""
    counter = _COUNTERS.get(key)
    if counter is not None:
        counter._count(kind, amount)


@tally.register_fake
def _(key: str, kind: str, amount: int) -> None:
    return None  # tracing and fake tensors count nothing: only real runs do


torch.library._register_effectful_op("k5::tally", EffectType.ORDERED)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class CommStats:
    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.steps: list[dict[str, dict[str, int]]] = []
        self.key = register_counter(self)

    def add(self, kind: str, num_bytes: int) -> None:
        tally(self.key, kind, int(num_bytes))

    def _count(self, kind: str, num_bytes: int) -> None:
        self.bytes[kind] += num_bytes
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
