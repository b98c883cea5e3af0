"""Time the Kandinsky 6 DiT (video and audio streams together): a forward and a denoising step (CFG: two forwards,
or one per half under CFG parallelism), on one process or under torchrun with a sequence layout (Ulysses, ring)
and CFG parallelism, on seeded random weights.

    python -m k5.bench k6 --model lite --blocks 2 --height 256 --width 256 --frames 17 --dtype fp32
    torchrun --nproc_per_node=2 -m k5.bench k6 --model tiny-k6 --height 128 --width 128 --frames 9 --ulysses 2

Figures are medians over --repeat runs after --warmup (CUDA events on a GPU; under torchrun the slowest rank's,
ranks aligned by a barrier); FLOPs are bench/k6_projection.py's count (its linear part is tested against torch's
FlopCounterMode). Results go to a scratch folder, to bench/results only when named with --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
import torch.distributed as dist

from k5.bench import fast, report
from k5.bench.k6_projection import forward_flops
from k5.engine.catalogue.k6_tiny import TRANSFORMER as TINY_K6
from k5.engine.model.k6_config import PRESETS, K6Config
from k5.engine.model.k6_dit import Kandinsky6DiT
from k5.engine.sampling.chain import Conditioning
from k5.engine.sampling.k6_sampler import audio_length, guided_forward

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODELS = ("tiny-k6", *PRESETS)  # the benchmark's Kandinsky 6 models


def model_config(name: str, blocks: int | None) -> K6Config:
    if name == "tiny-k6":
        cfg = K6Config(**TINY_K6, out_visual_dim=16, out_audio_dim=40)
    elif name in PRESETS:
        cfg = PRESETS[name]
    else:
        raise ValueError(f"--model {name!r} is not one of {', '.join(MODELS)}")
    return cfg.replace(num_visual_blocks=blocks) if blocks else cfg


def random_dit(cfg: K6Config, dtype: torch.dtype, device: torch.device, seed: int) -> Kandinsky6DiT:
    """Seeded random weights built on ``device``, as bench/run.py's Kandinsky 5 DiT."""
    from k5.bench.run import random_dit as seeded

    return seeded(cfg, dtype, device, seed, model_class=Kandinsky6DiT)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m k5.bench k6", description="Time the Kandinsky 6 DiT.")
    p.add_argument("--model", default="tiny-k6", choices=MODELS)
    p.add_argument("--blocks", type=int, default=None, help="fused blocks (default: the model's)")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--no-audio", action="store_true", help="the video stream alone")
    p.add_argument("--ulysses", type=int, default=1)
    p.add_argument("--ring", type=int, default=1)
    p.add_argument("--cfg-parallel", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=str(report.SCRATCH))
    args = p.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    cfg = model_config(args.model, args.blocks)
    dtype = DTYPES[args.dtype]
    dit = random_dit(cfg, dtype, device, seed=0)
    guided, cfg_degree = guided_forward, 2 if args.cfg_parallel else 1
    if world > 1:
        from k5.parallel.k6 import CfgParallel, apply_sequence_parallel
        from k5.parallel.mesh import ParallelDims

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        dims = ParallelDims(ulysses=args.ulysses, ring=args.ring, cfg=cfg_degree)
        dims.validate(world)
        dims.build_mesh(device.type)
        if dims.sp_size > 1:
            apply_sequence_parallel(dit, dims)
        if cfg_degree == 2:
            guided = CfgParallel(dims)
    elif args.ulysses * args.ring * cfg_degree != 1:
        p.error("a parallel layout needs torchrun with as many processes as its degrees multiply to")

    g = torch.Generator(device=device).manual_seed(1)
    T, H, W = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    x = torch.randn(1, T, H, W, cfg.in_channels, device=device, generator=g)
    Sa = 0 if args.no_audio else audio_length(args.frames, 24)
    audio = None if args.no_audio else torch.randn(1, Sa, cfg.in_audio_dim, device=device, generator=g)
    conds = [Conditioning(torch.randn(1, args.text_tokens, cfg.in_text_dim, device=device, generator=g), None,
                          torch.randn(1, cfg.in_text_dim2, device=device, generator=g)) for _ in range(2)]
    t = torch.full((1,), 500.0, device=device)

    def forward():
        with torch.inference_mode():
            dit(x, audio, conds[0].embeds, conds[0].pooled, t)

    def step():
        with torch.inference_mode():
            guided(dit, x, audio, t, conds[0], conds[1], 5.0)

    barrier = (lambda: dist.barrier()) if world > 1 else (lambda: None)

    def slowest(times: list[float]) -> list[float]:
        if world == 1:
            return times
        tensor = torch.tensor(times, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    fwd = statistics.median(slowest(fast.time_calls(forward, device, args.warmup, args.repeat, barrier)))
    stp = statistics.median(slowest(fast.time_calls(step, device, args.warmup, args.repeat, barrier)))
    Sv = T * (H // 2) * (W // 2)
    flops = forward_flops(cfg, Sv, Sa, args.text_tokens)
    layout = "x".join(f"{k}{v}" for k, v in (("cfg", cfg_degree), ("ulysses", args.ulysses), ("ring", args.ring))
                      if v > 1) or "single"
    result = {
        "name": f"{device.type}-k6-{args.model}-b{cfg.num_visual_blocks}-{args.height}x{args.width}x{args.frames}-"
                f"{args.dtype}-w{world}-{layout}" + ("-noaudio" if args.no_audio else ""),
        "env": report.environment(device, ["k6", *(argv or [])]),
        "config": {"model": args.model, "visual_blocks": cfg.num_visual_blocks, "video_tokens": Sv,
                   "audio_tokens": Sa, "text_tokens": args.text_tokens, "dtype": args.dtype, "world_size": world,
                   "layout": layout},
        "flops": {"tflop_per_forward": flops.total / 1e12, "linear": flops.linear / 1e12},
        "timing": {"s_per_forward": fwd, "s_per_step": stp, "tflops_per_device": flops.total / 1e12 / fwd / world},
    }
    if world == 1 or dist.get_rank() == 0:
        paths = report.write(result, Path(args.out))
        print(f"k6 {args.model} {layout}: {fwd:.4f} s/forward, {stp:.4f} s/step -> {paths[0]}")
    if world > 1:
        dist.destroy_process_group()
    return result
