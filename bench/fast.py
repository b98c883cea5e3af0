"""The fast path the bench measures: regional torch.compile of the DiT blocks, the dense SDPA backend, the peak.

Regional compile: each text and visual block's forward is compiled (``nn.Module.compile``), not the whole model.
All visual blocks share one compiled graph (parameters are graph inputs, torch's default
``inline_inbuilt_nn_modules``), so compile time does not grow with depth, and with fixed shapes
(``dynamic=False``) nothing recompiles between steps: the bench turns recompilation into an error after warm-up.
The model file needs no change for this: the blocks take only tensors and two small immutable Python objects
(the attention op and the token grid), which dynamo guards on by value.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

# Dense attention backends worth trying, fastest first on Hopper for bf16 (cuDNN's fused kernel, then flash 2).
SDPA_BACKENDS = {
    "auto": None,
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def sdpa_backend(name: str):
    """Context manager restricting F.scaled_dot_product_attention to one backend ('auto': no restriction)."""
    if name not in SDPA_BACKENDS:
        raise ValueError(f"SDPA backend {name!r} is not one of {', '.join(SDPA_BACKENDS)}")
    if SDPA_BACKENDS[name] is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])


def compile_blocks(dit: torch.nn.Module, mode: str | None = None) -> int:
    """Compile every transformer block of ``dit`` in place; returns the number of blocks compiled."""
    blocks = [*dit.text_transformer_blocks, *dit.visual_transformer_blocks]
    for block in blocks:
        block.compile(dynamic=False, mode=mode)
    return len(blocks)


@contextlib.contextmanager
def no_recompile():
    """Raise instead of silently recompiling (a shape or guard that changes between steps)."""
    import torch._dynamo.config as dynamo_config

    old = dynamo_config.error_on_recompile
    dynamo_config.error_on_recompile = True
    try:
        yield
    finally:
        dynamo_config.error_on_recompile = old


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    times = time_calls(lambda: a @ b, device, warmup=3, repeat=repeat)
    return 2.0 * n**3 / min(times) / 1e12  # the best run: a peak, and on a shared CPU the least disturbed one


def best_sdpa_backend(heads: int, tokens: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Time each dense SDPA backend on one [1, tokens, heads, head_dim] self-attention; {name: seconds or error}."""
    from k5.kernels.attention import attention

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype, generator=g) for _ in range(3))
    ref = attention(q.double(), k.double(), v.double()) if device.type == "cpu" else None
    out = {}
    for name in SDPA_BACKENDS:
        try:
            with sdpa_backend(name):
                t = statistics.median(time_calls(lambda: attention(q, k, v), device, warmup=2, repeat=5))
                y = attention(q, k, v)
            if not torch.isfinite(y).all():
                raise RuntimeError("non-finite output")
            if ref is not None:
                torch.testing.assert_close(y.double(), ref, atol=2e-2, rtol=2e-2)
            out[name] = t
        except Exception as e:  # a backend unavailable for this dtype/device/shape
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return out
