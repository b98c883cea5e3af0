"""MagCache step skipping as the reference defines it (kandinskylab/kandinsky-5 ``kandinsky/magcache_utils.py``).

The reference counts DiT calls: call ``c = 2*step + branch`` (cond 0, uncond 1) of a run of ``2*steps`` calls.
Its ratio table is ``[1, 1] + mag_ratios`` (the config's per-call magnitude ratios, cond/uncond interleaved); for
another step count each branch's column is resampled by nearest index (``round(i * (n-1) / (steps-1))``, numpy's
half-to-even ``round``). From call ``int(2*steps * 0.2)`` on, each branch keeps its own accumulators:

    ratio *= table[c];  count += 1;  error += |1 - ratio|
    skip if error < 0.12 and count <= 2, else reset (error 0, count 0, ratio 1) and run the forward

A skipped forward still runs the text blocks and the output layer; the visual blocks are replaced by the input
plus the residual (output - input of the visual stack) that this branch's last forward left.

The decision depends on nothing but the step index, the branch and the ratios, so it is computed once as a plan:
every rank of an item takes the same decision without exchanging anything, and under CFG parallelism each half
follows its own branch's accumulator because the accumulators are per branch by construction. One difference from
the reference: it would skip a branch's first forward when the retention point is 0 (one or two steps) and then
fail for want of a residual; here a branch's first forward always runs (and resets the accumulators).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from torch import Tensor

from k5.engine.sampling.chain import BRANCHES, Next, StepCall

THRESHOLD = 0.12  # magcache_thresh
MAX_SKIPS = 2  # K: consecutive skips per branch
RETENTION = 0.2  # fraction of the calls that always run at the start


def nearest_resample(values: Sequence[float], n: int) -> list[float]:
    """``values`` resampled to ``n`` entries by nearest index, as the reference's ``nearest_interp``."""
    if n == 1:
        return [values[-1]]
    scale = (len(values) - 1) / (n - 1)
    return [values[round(i * scale)] for i in range(n)]  # Python's round is half-to-even, as numpy's


def ratio_table(mag_ratios: Sequence[float], steps: int) -> list[float]:
    """Per-call ratios for ``steps`` steps, cond/uncond interleaved (index 2*step + branch)."""
    table = [1.0, 1.0] + [float(r) for r in mag_ratios]
    if len(table) == 2 * steps:
        return table
    cond, uncond = nearest_resample(table[0::2], steps), nearest_resample(table[1::2], steps)
    return [r for pair in zip(cond, uncond) for r in pair]


def skip_plan(mag_ratios: Sequence[float], steps: int, threshold: float = THRESHOLD, max_skips: int = MAX_SKIPS,
              retention: float = RETENTION) -> frozenset[tuple[int, str]]:
    """The (step, branch) forwards MagCache skips in a run of ``steps`` steps."""
    table = ratio_table(mag_ratios, steps)
    start = int(2 * steps * retention)
    skipped = set()
    for b, branch in enumerate(BRANCHES):
        ratio, count, error = 1.0, 0, 0.0
        for step in range(steps):
            call = 2 * step + b
            if call < start:
                continue
            ratio *= table[call]
            count += 1
            error += abs(1 - ratio)
            if step > 0 and error < threshold and count <= max_skips:
                skipped.add((step, branch))
            else:
                ratio, count, error = 1.0, 0, 0.0
    return frozenset(skipped)


@dataclass
class Forwards:
    """DiT forwards of one item: how many ran, and which were skipped as [step, branch] pairs."""

    run: int
    skipped: list[list]

    def as_dict(self) -> dict:
        return {"run": self.run, "skipped": self.skipped}


def forwards(mag_ratios: Sequence[float] | None, steps: int, guided: bool) -> Forwards:
    """The forwards of a whole item (both cfg halves), known to every rank: the plan alone decides them."""
    branches = BRANCHES if guided else BRANCHES[:1]
    plan = skip_plan(mag_ratios, steps) if mag_ratios is not None else frozenset()
    skipped = sorted([s, b] for s, b in plan if b in branches)
    skipped.sort(key=lambda sb: (sb[0], BRANCHES.index(sb[1])))
    return Forwards(steps * len(branches) - len(skipped), skipped)


@dataclass
class MagCache:
    """The step-cache stage of the step chain; put it after the guiding stage (it needs ``call.branch``).

    Keeps the last visual-stack residual of each branch this rank evaluates (its own token shard under sequence
    parallelism). A branch's step 0 starts a new item for it: its residual and record are dropped.
    """

    mag_ratios: Sequence[float]
    threshold: float = THRESHOLD
    max_skips: int = MAX_SKIPS
    retention: float = RETENTION
    residual: dict = field(default_factory=dict, repr=False)
    skipped: list = field(default_factory=list)  # (step, branch) this rank skipped in the current item
    ran: list = field(default_factory=list)  # (step, branch) this rank ran in the current item
    _plans: dict = field(default_factory=dict, repr=False)

    guides = False

    def plan(self, steps: int) -> frozenset[tuple[int, str]]:
        if steps not in self._plans:
            self._plans[steps] = skip_plan(self.mag_ratios, steps, self.threshold, self.max_skips, self.retention)
        return self._plans[steps]

    def __call__(self, call: StepCall, next: Next) -> Tensor:
        if call.branch is None:
            raise ValueError("MagCache must come after the guiding stage of the step chain (it needs the branch)")
        if call.index == 0:  # a new item for this branch: forget the last item's residual and record
            self.residual.pop(call.branch, None)
            self.skipped[:] = [k for k in self.skipped if k[1] != call.branch]
            self.ran[:] = [k for k in self.ran if k[1] != call.branch]
        key = (call.index, call.branch)
        skip = key in self.plan(call.steps) and call.branch in self.residual
        (self.skipped if skip else self.ran).append(key)

        def visual_stack(visual: Tensor, run) -> Tensor:
            if skip:
                return visual + self.residual[call.branch]
            out = run(visual)
            self.residual[call.branch] = out - visual
            return out

        return next(call.with_dit_kwargs(visual_stack=visual_stack))
