"""Timing helpers of the bench, and the fast path it measures: the same regional compile and attention-kernel choice
as the CLI (k5.engine.compile, k5.kernels.attention), imported from the package so the bench times what users run.
"""

from __future__ import annotations

import statistics
import time

import torch

from k5.engine.compile import compile_blocks, no_recompile  # noqa: F401 - the bench's fast path is the package's
from k5.kernels.attention import DENSE_BACKENDS, resolve_dense_backend, set_dense_backend


def use_attention_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Set the dense attention kernel as the CLI does (--attention-backend); returns the one resolved."""
    resolved = resolve_dense_backend(name, device, dtype, head_dim)
    set_dense_backend(resolved if resolved != "cpu" else "auto")
    return resolved


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(times: list[float]) -> dict:
    """min / median / max of repeated timings, and whether they are too spread to trust (max/min > 1.3)."""
    lo, hi = min(times), max(times)
    ratio = hi / lo if lo > 0 else float("inf")
    return {"min": lo, "median": statistics.median(times), "max": hi, "max_over_min": ratio,
            "unstable": ratio > UNSTABLE}


UNSTABLE = 1.3  # max/min of a series above which its median is flagged


def time_calls(fn, device: torch.device, warmup: int, repeat: int, before=None) -> list[float]:
    """Seconds per call of fn() after ``warmup`` calls: CUDA events on a GPU, the host clock on CPU.

    ``before`` (e.g. a barrier) runs outside the timed region before each call.
    """
    for _ in range(warmup):
        if before:
            before()
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        if before:
            before()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def time_interleaved(fns: list, device: torch.device, warmup: int, repeat: int) -> list[list[float]]:
    """Like time_calls for several functions, run in turns (a, b, a, b, ...): on a shared machine a change of load
    then hits every function alike instead of whichever happened to run during it."""
    for fn in fns:
        time_calls(fn, device, warmup, 0)
    runs = [[] for _ in fns]
    for _ in range(repeat):
        for fn, out in zip(fns, runs):
            out += time_calls(fn, device, 0, 1)
    return runs


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device, n: int | None = None, repeat: int = 10) -> float:
    """Measured dense matrix-product rate (TFLOP/s) of an n x n x n product on random data (never zeros)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    times = time_calls(lambda: a @ b, device, warmup=3, repeat=repeat)
    return 2.0 * n**3 / min(times) / 1e12  # the best run: a peak, and on a shared CPU the least disturbed one


def best_attention_backend(heads: int, tokens: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Time each dense attention kernel on one [1, tokens, heads, head_dim] self-attention, each checked against
    the fp32 math kernel first; {name: {"s": median seconds, ...spread} or an error string}."""
    from k5.kernels.attention import attention, dense_backend

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype, generator=g) for _ in range(3))
    old, out = dense_backend(), {}
    rows = min(tokens, 1024)  # the reference on the first query rows: an exact fp32 softmax is O(rows x tokens)
    set_dense_backend("math")
    try:
        ref = attention(q[:, :rows].float(), k.float(), v.float()) if device.type == "cuda" else None
    finally:
        set_dense_backend(old)
    for name in DENSE_BACKENDS[:-1]:  # not "math": it is the reference, seconds per call at real lengths
        try:
            resolved = use_attention_backend(name, device, dtype, head_dim)
            runs = time_calls(lambda: attention(q, k, v), device, warmup=2, repeat=5)
            y = attention(q, k, v)
            if not bool(torch.isfinite(y).all()):
                raise RuntimeError("non-finite output")
            err = None
            if ref is not None:
                err = float((y[:, :rows].float() - ref).norm() / ref.norm())
                if err > 2e-2:
                    raise RuntimeError(f"relative error {err:.1e} against the fp32 math kernel")
            out[name] = {"resolved": resolved, "s": statistics.median(runs), "rel_err": err, **spread(runs)}
        except Exception as e:  # noqa: BLE001 - a backend unavailable for this dtype/device/shape is a recorded fact
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        finally:
            set_dense_backend(old)
    return out
