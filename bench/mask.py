"""NABLA's mask build beside its block-sparse attention, at one head of one layer (issue 19's mask target).

    python -m k5.bench mask --threads 1 --out bench/results      # Pro 10 s HD: 768x1280, 241 frames, 3660 tiles
    python -m k5.bench mask --height 256 --width 256 --frames 9 --repeat 1 --no-save     (a smoke run)

The mask build is what a DiT layer runs before its NABLA attention: the tile means of q and k (pool_blocks), the
top-CDF rule with the STA prior (nabla_block_mask), and the tile indices the kernel reads
(flex.block_mask_from_tiles, the CUDA route's full blocks). Each part is timed, and the whole; then the block-sparse
attention on the same mask (the CPU gather kernel on a CPU, compiled FlexAttention on CUDA). q, k, v are seeded
Gaussian, so their pooled attention is near uniform and the top-CDF part keeps about P of the tiles (P 0.1 by
default, as bench/gpu.sh does: near the density a trained model keeps); the STA prior adds its window. Every series
gives wall seconds and this process's CPU seconds (the steadier measure on a shared CPU), min / median / max; the
mask build's repetitions run in turns with its parts, the attention once per --attention-repeat.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file, its folder on sys.path would shadow installed modules
    sys.exit("bench/mask.py is a module of k5.bench: run `python -m k5.bench ...` or `k5 bench ...`")

from k5.bench import fast, flops, report
from k5.bench.run import DTYPES, model_config
from k5.kernels.flex import block_mask_from_tiles
from k5.kernels.nabla import (BLOCK, NablaSpec, _sta_cached, block_sparse_attention, nabla_block_mask, nabla_mask,
                              pool_blocks)


def _timed(fn, device) -> tuple[float, float, object]:
    fast.sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    fast.sync(device)
    return time.perf_counter() - w0, time.process_time() - c0, out


def _spread(times: list[float]) -> dict:
    return {"min": min(times), "median": statistics.median(times), "max": max(times), "runs": times}


def run(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = model_config(args.model, None)
    T, H, W = flops.latent_grid(args.height, args.width, args.frames, cfg.patch_size)
    if H % 8 or W % 8:
        raise ValueError(f"NABLA needs height and width multiples of 128 pixels; got {args.height}x{args.width}")
    grid = (T, H // 8, W // 8)
    S, D = T * H * W, cfg.head_dim
    g = torch.Generator(device=device).manual_seed(args.seed)
    q, k, v = (torch.randn(1, S, 1, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    spec = NablaSpec(P=args.P)
    _sta_cached(*grid, spec.wT, spec.wH, spec.wW, device)  # built once per shape in a real run, not per layer

    def pool():
        return pool_blocks(q), pool_blocks(k)

    qp, kp = pool()
    sta = _sta_cached(*grid, spec.wT, spec.wH, spec.wW, device)

    def build():  # the whole build, as a layer runs it
        mask = nabla_mask(q, k, spec, *grid)
        return mask, block_mask_from_tiles(mask, S, S)

    parts = {"pool": pool, "top_cdf_and_sta": lambda: nabla_block_mask(qp, kp, sta, spec.P),
             "tile_indices": lambda: block_mask_from_tiles(mask, S, S)}
    mask, bm = build()  # warm-up, and the mask every part and the attention use
    series = {name: ([], []) for name in ("mask_build", *parts)}
    for _ in range(args.repeat):
        for name, fn in (("mask_build", build), *parts.items()):
            wall, cpu, _ = _timed(fn, device)
            series[name][0].append(wall)
            series[name][1].append(cpu)
    # The kernel reads the first kv_num_blocks indices of each row: they must be the row's tiles, ascending.
    num, idx = bm.full_kv_num_blocks, bm.full_kv_indices
    want = torch.argsort(mask.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    checks = {"tile_indices_equal_stable_argsort": bool(torch.equal(idx, want)),
              "tile_counts_equal_mask_sums": bool(torch.equal(num, mask.sum(-1, dtype=torch.int32)))}

    attention = ([], [])
    for _ in range(args.attention_repeat):
        wall, cpu, _ = _timed(lambda: block_sparse_attention(q, k, v, mask, return_lse=False), device)
        attention[0].append(wall)
        attention[1].append(cpu)

    kind = "cuda" if device.type == "cuda" else "cpu"
    name = args.name or f"{kind}-mask-{args.model}-{args.height}x{args.width}x{args.frames}-h1-P{args.P:g}"
    result = {
        "name": name,
        "config": {"model": args.model, "tokens": S, "tiles": S // BLOCK, "grid_tiles": list(grid), "head_dim": D,
                   "heads": 1, "dtype": args.dtype, "P": args.P, "sta_window": [spec.wT, spec.wH, spec.wW],
                   "repeat": args.repeat, "attention_repeat": args.attention_repeat,
                   "mask_elements": mask.numel(), "density": mask.float().mean().item()},
        "wall_s": {n: _spread(s[0]) for n, s in series.items()} | {"attention": _spread(attention[0])},
        "cpu_s": {n: _spread(s[1]) for n, s in series.items()} | {"attention": _spread(attention[1])},
        "checks": checks,
        "env": report.environment(device, args.argv),
    }
    for clock in ("wall_s", "cpu_s"):
        r = result[clock]
        result[f"mask_build_over_attention_{clock[:-2]}"] = r["mask_build"]["median"] / r["attention"]["median"]
    if not all(checks.values()):
        raise RuntimeError(f"the tile indices are wrong: {checks}")
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m k5.bench mask", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="pro-hd", help="head dim and STA window of this preset (bench.run.model_config)")
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--frames", type=int, default=241)
    p.add_argument("--P", type=float, default=0.1, help="NABLA kept mass (random q, k: about the top-CDF density)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--repeat", type=int, default=3, help="timed mask builds (and of each part) after a warm-up")
    p.add_argument("--attention-repeat", type=int, default=1, help="timed block-sparse attentions")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None)
    p.add_argument("--out", default=str(report.SCRATCH),
                   help=f"results folder (default {report.SCRATCH}: bench/results/ holds the committed results and "
                        f"changes only when named)")
    p.add_argument("--no-save", action="store_true", help="print only")
    return p


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = ["mask", *argv]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeat < 1 or args.attention_repeat < 1:
        print("bench mask: --repeat and --attention-repeat must be >= 1", file=sys.stderr)
        raise SystemExit(2)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    try:
        result = run(args)
    except ValueError as e:
        print(f"bench mask: {e}", file=sys.stderr)
        raise SystemExit(2)
    result["env"]["load_avg_at_start"] = load_at_start
    if not args.no_save:
        json_path, md_path = report.write(result, Path(args.out))
        print(f"wrote {json_path} and {md_path}")
    print(summary_line(result))
    return result


def summary_line(r: dict) -> str:
    c = r["cpu_s"]
    parts = ", ".join(f"{n} {c[n]['median']:.3f}" for n in ("pool", "top_cdf_and_sta", "tile_indices"))
    return (f"{r['name']}: CPU s median: mask build {c['mask_build']['median']:.3f} ({parts}), block-sparse "
            f"attention {c['attention']['median']:.3f} at density {r['config']['density']:.3f}; mask build / "
            f"attention {r['mask_build_over_attention_cpu']:.3f} (wall {r['mask_build_over_attention_wall']:.3f})")


if __name__ == "__main__":
    main()
