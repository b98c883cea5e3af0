"""The GPU path as the CLI sets it up: which dense attention kernel, compiled or not, and the summary (the device
itself is chosen by k5.launch.env.resolve_device).

``setup_fast_path`` is what launch/generate.py calls on a built DiT; ``run_summary`` returns the facts of the run's
end-of-run line (compiled or not and the recompile count, the attention kernel, peak memory over the whole run with
the decode's own peak and what was resident at the peak, the estimate made before loading) as one dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from k5.engine.compile import CompileWatch, allow_variants, compile_blocks
from k5.engine.memory import PEAKS, format_peaks


@dataclass
class FastPath:
    """What was set up: the resolved dense attention kernel and the compile watch."""

    attention_backend: str
    watch: CompileWatch


def setup_fast_path(dit, device: torch.device, compile: bool, attention_backend: str = "auto",
                    distinct_shapes: int = 1, ring: int = 1, attention_calls=()) -> FastPath:
    """Choose the dense attention kernel (kernels.attention) and compile the DiT's blocks (engine.compile).

    ``distinct_shapes``: how many video shapes the job holds, so dynamo keeps a compiled variant for each
    instead of falling back to eager blocks past its default recompile limit; ``ring``: the ring degree, whose
    compiled steps need their own variants (engine.compile.variants_per_shape). ``attention_calls``: this rank's
    attention calls at the job's sizes (kernels.attention.AttentionCall), which the kernels are probed on.
    """
    from k5.kernels.attention import resolve_dense_backend, set_dense_backend

    backend = resolve_dense_backend(attention_backend, device, dit.dtype, dit.config.head_dim, attention_calls)
    set_dense_backend(backend if backend != "cpu" else "auto")
    if compile:
        allow_variants(distinct_shapes, ring)
        compile_blocks(dit)
    return FastPath(backend, CompileWatch(compile))


def run_summary(fast: FastPath | None, device, estimate=None) -> dict:
    """This rank's end-of-run facts as a dict (JSON-ready)."""
    out = {"compile": fast.watch.report() if fast else {"compiled": False, "graphs": 0, "recompiles": 0},
           "attention_backend": fast.attention_backend if fast else None,
           "memory": PEAKS.report(device)}
    if estimate is not None:
        out["memory"]["estimated_peak_gib"] = round(estimate.peak / 2**30, 3)
        out["memory"]["estimated_peak_phase"] = estimate.peak_phase
    return out


def format_summary(summary: dict) -> str:
    """The summary dict as the tail of the end-of-run line."""
    c = summary["compile"]
    compiled = (f"compiled ({c['graphs']} graphs, {c['recompiles']} recompiles after the first step)"
                if c["compiled"] else "not compiled")
    line = f"{compiled}, attention {summary['attention_backend'] or 'default'}, {format_peaks(summary['memory'])}"
    if "estimated_peak_gib" in summary["memory"]:
        line += f" (estimated {summary['memory']['estimated_peak_gib']:.2f} GiB)"
    return line
