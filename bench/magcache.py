"""MagCache: DiT forwards and denoising time per video with and without it, for a catalogue preset.

    python -m k5.bench magcache                                    # Lite sft 5 s preset, Lite widths, 4 blocks, CPU size
    python -m k5.bench magcache --model tiny --repeat 1 --no-save  # the smoke run of tests/test_bench_magcache.py
    python -m k5.bench magcache --model lite --height 512 --width 768 --frames 121 --dtype bf16   (a GPU: the real size)

One "video" is the whole sampler run of the preset (its steps, guidance, shift) through the step chain, as
``Kandinsky5Pipeline.generate`` runs it: with ``MagCache(the preset's ratios)`` in the chain, and without. Text
encoding and the VAE decode are the same with and without MagCache and are not timed. The DiT has seeded random
weights (bench.run.random_dit), so its latents mean nothing; the forwards that run and are skipped depend only on
the preset's ratios and step count, so they are exact, and they are counted twice: from the plan
(k5.engine.sampling.magcache.forwards) and by hooks on the model (DiT calls, and runs of the first visual block). Runs of
the two modes alternate (off, on, off, on, ...) so that a change of load on a shared machine hits both; the
result gives min / median / max wall seconds per video of each, and the same of the process's CPU seconds (on a
shared CPU the steadier measure of the work).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file, its folder on sys.path would shadow installed modules
    sys.exit("bench/magcache.py is a module of k5.bench: run `python -m k5.bench ...` or `k5 bench ...`")

from k5.bench import fast, flops, report
from k5.bench.run import DTYPES, make_inputs, model_config, random_dit
from k5.engine.sampling.magcache import MagCache, forwards
from k5.engine.pipelines.video import rope_scale
from k5.engine.sampling.sampler import initial_noise, sample, uses_cfg
from k5.engine.catalogue.variants import check_magcache, get


class ForwardCounter:
    """Counts DiT forwards and runs of the visual stack (its first block) with forward hooks."""

    def __init__(self, dit):
        self.calls = self.visual = 0
        dit.register_forward_hook(lambda *a: self._add("calls"))
        dit.visual_transformer_blocks[0].register_forward_hook(lambda *a: self._add("visual"))

    def _add(self, what: str) -> None:
        setattr(self, what, getattr(self, what) + 1)

    def take(self) -> dict:
        out = {"dit_calls": self.calls, "visual_stack_runs": self.visual}
        self.calls = self.visual = 0
        return out


def timed_in_turns(fns, device, repeat: int, after=None) -> list[tuple[list[float], list[float]]]:
    """(wall seconds, this process's CPU seconds) of each call, the functions in turns (a, b, a, b, ...). On a
    shared CPU the wall time includes waiting for cores that other jobs hold; the process time counts only the
    cycles this process ran, so it is the steadier measure of the work (1 thread: the compute time).
    ``after(index of the function, wall seconds)`` runs after each call, outside the timing."""
    out = [([], []) for _ in fns]
    for _ in range(repeat):
        for i, (fn, (wall, cpu)) in enumerate(zip(fns, out)):
            fast.sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            fast.sync(device)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
            if after is not None:
                after(i, wall[-1])
    return out


class Announce:
    """Progress on stderr (stdout keeps only the result): a line as each video ends, and within a video a line
    whenever ``every_s`` seconds passed since the last one (the default run's videos take a minute or more each on
    a CPU)."""

    def __init__(self, total: int, steps: int, every_s: float = 30.0):
        self.total, self.steps, self.every_s, self.done = total, steps, every_s, 0
        self.last = time.perf_counter()

    def say(self, line: str) -> None:
        print(f"bench magcache: {line}", file=sys.stderr, flush=True)
        self.last = time.perf_counter()

    def step(self, i: int) -> None:
        if time.perf_counter() - self.last >= self.every_s:
            self.say(f"video {self.done + 1}/{self.total}: step {i + 1}/{self.steps}")

    def __call__(self, what: str, seconds: float) -> None:
        self.done += 1
        self.say(f"video {self.done}/{self.total} ({what}) in {seconds:.1f} s")


def spread(times: list[float]) -> dict:
    return {"min": min(times), "median": statistics.median(times), "max": max(times), "runs": times}


def run(args) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    variant = get(args.variant)
    ratios = check_magcache(variant)
    steps = args.steps or variant.steps
    guidance = variant.guidance_scale
    shift = variant.shift or 5.0
    cfg = model_config(args.model, args.blocks)
    grid = flops.latent_grid(args.height, args.width, args.frames, cfg.patch_size)
    pt, ph, pw = cfg.patch_size
    dit = random_dit(cfg, dtype, device, args.seed)
    counter = ForwardCounter(dit)
    _, cond, uncond, _ = make_inputs(cfg, grid, args.text_tokens, device, args.seed + 1)
    noise = initial_noise((1, grid[0] * pt, grid[1] * ph, grid[2] * pw, 16), args.seed + 2, device)
    sf = rope_scale(args.height, args.width)
    guided = uses_cfg(guidance)
    uncond = uncond if guided else None

    def velocity(inp, t, c, **kw):
        return dit(inp, c.embeds, c.pooled, t, scale_factor=sf, text_mask=c.mask, **kw)

    cache = MagCache(ratios)
    latents = {}
    plan = forwards(ratios, steps, guided)
    per_video = (2 if guided else 1) * steps
    announce = Announce(2 + 2 * args.repeat, steps)
    announce.say(f"{variant.name}, {steps} steps, {args.model} widths"
                 f"{f' ({cfg.num_visual_blocks} visual blocks)' if args.blocks else ''} at {args.height}x"
                 f"{args.width}x{args.frames} on {device.type}: {announce.total} videos of {per_video} DiT forwards "
                 f"without MagCache and {plan.run} with it, in turns (one untimed of each first)")

    def video(chain, key):
        def go():
            with torch.no_grad():
                latents[key] = sample(velocity, noise, cond, uncond, steps=steps, guidance_scale=guidance,
                                      shift=shift, visual_cond=cfg.visual_cond, chain=chain, on_step=announce.step)
        return go

    off, on = video([], "off"), video([cache], "on")
    # One untimed video of each first: the counts, and the warm-up.
    counted = {}
    for fn, mode in ((off, "without"), (on, "with")):
        t0 = time.perf_counter()
        fn()
        announce(f"{mode} MagCache, untimed", time.perf_counter() - t0)
        counted[mode] = counter.take()
    counted_off, counted_on = counted["without"], counted["with"]
    (times_off, cpu_off), (times_on, cpu_on) = timed_in_turns(
        [off, on], device, args.repeat, after=lambda i, wall: announce(f"{('without', 'with')[i]} MagCache", wall))

    tokens = math.prod(grid)
    name = args.name or (f"{'cuda' if device.type == 'cuda' else 'cpu'}-magcache-{variant.name}-{args.model}"
                         f"{f'-b{args.blocks}' if args.blocks else ''}-{args.height}x{args.width}x{args.frames}-"
                         f"{args.dtype}-{steps}steps")
    diff = (latents["on"] - latents["off"]).double()
    result = {
        "name": name,
        "config": {"variant": variant.name, "steps": steps, "guidance_scale": guidance, "shift": shift,
                   "model": args.model, "visual_blocks": cfg.num_visual_blocks, "text_blocks": cfg.num_text_blocks,
                   "model_dim": cfg.model_dim, "height": args.height, "width": args.width, "frames": args.frames,
                   "visual_tokens": tokens, "text_tokens": args.text_tokens, "dtype": args.dtype,
                   "repeat": args.repeat, "weights": "seeded random (forward counts exact, latents meaningless)"},
        "forwards": {
            "per_video_without": per_video,
            "run_with": plan.run, "skipped_with": len(plan.skipped),
            "skipped": plan.skipped,
            "counted_without": counted_off, "counted_with": counted_on,
            "fraction_run": plan.run / per_video,
        },
        "seconds_per_video": {"without": spread(times_off), "with": spread(times_on)},
        "cpu_seconds_per_video": {"without": spread(cpu_off), "with": spread(cpu_on)},
        "speedup_median": statistics.median(times_off) / statistics.median(times_on),
        "speedup_min": min(times_off) / min(times_on),
        "speedup_cpu_median": statistics.median(cpu_off) / statistics.median(cpu_on),
        "latents_rel_diff_on_vs_off": (diff.norm() / latents["off"].double().norm()).item(),
        "env": report.environment(device, args.argv),
    }
    counts_agree = (counted_off == {"dit_calls": per_video, "visual_stack_runs": per_video}
                    and counted_on == {"dit_calls": per_video, "visual_stack_runs": plan.run}
                    and sorted(map(tuple, cache.skipped)) == sorted(map(tuple, plan.skipped)))
    result["checks"] = {"hook_counts_equal_the_plan": counts_agree}
    if not counts_agree:
        raise RuntimeError(f"forward counts disagree with the MagCache plan: {result['forwards']}")
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m k5.bench magcache", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="t2v-lite-sft-5s", help="catalogue variant: steps, guidance, shift, ratios")
    p.add_argument("--model", default="lite", help="DiT widths: tiny, lite, pro, ... (bench.run.model_config)")
    p.add_argument("--blocks", type=int, default=None,
                   help="cut the visual blocks to N (default 4; the tiny model keeps its own; 0: all of them)")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="default: the variant's")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--repeat", type=int, default=3, help="timed videos of each mode (after one untimed each)")
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
    args.argv = ["magcache", *argv]
    if args.blocks is None and args.model != "tiny":
        args.blocks = 4  # Lite widths at 4 blocks: a CPU runs 100 forwards in minutes
    args.blocks = args.blocks or None
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeat < 1:
        print("bench magcache: --repeat must be >= 1", file=sys.stderr)
        raise SystemExit(2)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    try:
        result = run(args)
    except ValueError as e:
        print(f"bench magcache: {e}", file=sys.stderr)
        raise SystemExit(2)
    result["env"]["load_avg_at_start"] = load_at_start
    if not args.no_save:
        json_path, md_path = report.write(result, Path(args.out))
        print(f"wrote {json_path} and {md_path}")
    print(summary_line(result))
    return result


def summary_line(r: dict) -> str:
    f, s, c = r["forwards"], r["seconds_per_video"], r["cpu_seconds_per_video"]
    return (f"{r['name']}: DiT forwards {f['per_video_without']} -> {f['run_with']} ({f['skipped_with']} skipped); "
            f"s/video median {s['without']['median']:.3f} -> {s['with']['median']:.3f} "
            f"({r['speedup_median']:.2f}x; min {s['without']['min']:.3f} -> {s['with']['min']:.3f}); "
            f"CPU s/video median {c['without']['median']:.3f} -> {c['with']['median']:.3f} "
            f"({r['speedup_cpu_median']:.2f}x)")


if __name__ == "__main__":
    main()
