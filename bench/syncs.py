"""Device-to-host syncs in the denoising step loop, found on a GPU by torch's own sync checker.

    python -m k5.bench syncs --case lite:512x768x121 --case lite-10s:512x768x241:nabla --case pro:512x768x121

Each case is one model shape (MODEL:HEIGHTxWIDTHxFRAMES, ``:nabla`` for NABLA attention at P = 0.1): our DiT with
that model's widths and seeded random weights, set up as the CLI sets it up (``setup_fast_path``: the dense attention
kernel, and the compiled blocks with ``--compile``), a conditional and an unconditional text conditioning with a
padded key mask (real prompts are shorter than the text budget), and one step of ``k5.engine.sampling.sampler.sample`` with
CFG. The step runs once untimed (compiles, kernel probes and other first-call work), then once more under
``torch.cuda.set_sync_debug_mode("error")``, where any sync (an ``.item()``, a blocking copy to or from the host, an
op whose output size depends on the data, a stream or device synchronize) raises. If it raises, the step runs a
third time under "warn" so that every sync of the step is listed, not only the first; each is named by the
innermost frame of this checkout that led to it.

``--blocks`` (default 2) cuts the visual blocks: every block runs the same code, so the sites found are those of the
whole model (only their counts grow with depth), and a step costs a fraction of a second at the real token counts.

On a CPU the same steps run (the plumbing) but nothing is checked: torch's sync checker needs a CUDA device, and the
result says "not measured on CPU". Exit status: 0 when every case ran and no sync was found (or on a CPU), 1 when a
sync was found or a case failed, 2 for arguments that are wrong. The JSON (``--out``/``--name``) is rewritten after
each case, so a run stopped by a time cap keeps the cases it finished.
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file, its folder on sys.path would shadow installed modules
    sys.exit("bench/syncs.py is a module of k5.bench: run `python -m k5.bench syncs ...`")

from k5.bench import flops, report
from k5.bench.run import DTYPES, model_config, random_dit
from k5.engine.sampling.chain import Conditioning
from k5.engine.fastpath import setup_fast_path
from k5.engine.pipelines.video import rope_scale
from k5.engine.sampling.sampler import sample

ROOT = Path(__file__).resolve().parents[1]  # the checkout: sites are named relative to it
SYNC_MESSAGE = "synchronizing CUDA operation"  # torch's text for both modes ("called a synchronizing ...")
NOT_ON_CPU = "not measured on CPU: torch.cuda.set_sync_debug_mode needs a CUDA device"
GUIDANCE = 5.0
NABLA_P = 0.1  # as the timed NABLA run (bench/gpu.sh): random weights keep about the STA prior plus P
CASE = re.compile(r"^([\w.-]+):(\d+)x(\d+)x(\d+)(:nabla)?$")


def parse_case(text: str) -> dict:
    m = CASE.match(text)
    if not m:
        raise ValueError(f"--case {text!r} is not MODEL:HEIGHTxWIDTHxFRAMES[:nabla] (e.g. lite-10s:512x768x241:nabla)")
    model, h, w, f, nabla = m.groups()
    return {"model": model, "height": int(h), "width": int(w), "frames": int(f), "nabla": bool(nabla)}


def site(frames: list[traceback.FrameSummary]) -> str:
    """The innermost frame of this checkout among ``frames`` (outermost first), as 'path:line function: code'."""
    for fr in reversed(frames):
        path = Path(fr.filename)  # "<frozen ...>", "<string>": not a file, so not ours
        if path.is_absolute() and path.resolve().is_relative_to(ROOT):
            path = path.resolve()
            return f"{path.relative_to(ROOT)}:{fr.lineno} {fr.name}: {(fr.line or '').strip()}"
    last = frames[-1] if frames else None
    return f"outside this checkout: {last.filename}:{last.lineno} {last.name}" if last else "no Python frame"


def can_check(device: torch.device) -> bool:
    """Whether torch's sync checker works on ``device``: it is part of CUDA."""
    return device.type == "cuda"


def drain(device: torch.device) -> None:
    """Wait for the device outside the checked region (an error of queued work shows here, not in the check)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_sync(fn) -> str | None:
    """Run ``fn`` under sync debug mode "error": None if it ran through, else the site of the sync that raised."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as e:
        if SYNC_MESSAGE not in str(e):
            raise
        return site(traceback.extract_tb(e.__traceback__))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def every_sync(fn) -> dict[str, int]:
    """Run ``fn`` under sync debug mode "warn" and count its syncs by site (the stack is read when torch warns)."""
    sites: Counter[str] = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # every sync, not once per source line
        shown = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if SYNC_MESSAGE in str(message):  # the stack still holds the op's caller: drop warnings' and ours
                stack = [f for f in traceback.extract_stack()[:-1] if f.filename != warnings.__file__]
                sites[site(stack)] += 1
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return dict(sites)


def one_step(case: dict, args, device: torch.device):
    """The case's model and inputs; returns a function running one CFG denoising step through the sampler."""
    cfg = model_config(case["model"], args.blocks)
    dtype = DTYPES[args.dtype]
    grid = flops.latent_grid(case["height"], case["width"], case["frames"], cfg.patch_size)
    dit = random_dit(cfg, dtype, device, args.seed)
    dit.set_attention("nabla" if case["nabla"] else "dense", NABLA_P if case["nabla"] else None)
    fast = setup_fast_path(dit, device, args.compile)
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    T, H, W = grid
    pt, ph, pw = cfg.patch_size
    noise = torch.randn(1, T * pt, H * ph, W * pw, 16, device=device, generator=g)
    real = args.text_tokens * 3 // 4  # a prompt shorter than the budget: the key mask is part of the step

    def conditioning():
        mask = (torch.arange(args.text_tokens, device=device) < real)[None]
        return Conditioning(torch.randn(1, args.text_tokens, cfg.in_text_dim, device=device, generator=g), mask,
                            torch.randn(1, cfg.in_text_dim2, device=device, generator=g))

    cond, uncond = conditioning(), conditioning()
    sf = rope_scale(case["height"], case["width"])

    def velocity(inp, t, c, **kw):
        return dit(inp, c.embeds, c.pooled, t, scale_factor=sf, text_mask=c.mask, **kw)

    @torch.inference_mode()
    def step():
        return sample(velocity, noise, cond, uncond, steps=1, guidance_scale=GUIDANCE,
                      visual_cond=cfg.visual_cond)

    info = {"visual_tokens": T * H * W, "visual_blocks": cfg.num_visual_blocks, "model_dim": cfg.model_dim,
            "attention_backend": fast.attention_backend, "compiled": args.compile}
    return step, info


def check(case: dict, args, device: torch.device) -> dict:
    step, info = one_step(case, args, device)
    out = step()  # first-call work stays out of the check
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("the warm-up step's latent is not finite")
    if not can_check(device):
        return info | {"syncs": NOT_ON_CPU}
    drain(device)
    first = first_sync(step)
    drain(device)
    if first is None:
        return info | {"syncs": "none", "mode": "error"}
    sites = every_sync(step)
    drain(device)
    return info | {"syncs": "found", "mode": "error, then warn to list them", "first": first, "sites": sites}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m k5.bench syncs", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", required=True, help="MODEL:HEIGHTxWIDTHxFRAMES[:nabla], repeatable")
    p.add_argument("--blocks", type=int, default=2, help="visual blocks of each model (default 2; 0: all)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--compile", action="store_true", help="compile the blocks as the CLI does on CUDA")
    p.add_argument("--text-tokens", type=int, default=256)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda:0 if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(report.SCRATCH), help=f"results folder (default {report.SCRATCH})")
    p.add_argument("--name", default="host-syncs", help="result file name")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    try:
        cases = [parse_case(c) for c in args.case]
        for c in cases:
            model_config(c["model"], None)
    except ValueError as e:
        print(f"bench syncs: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:  # set_device and the checks need the index
            device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    args.blocks = args.blocks or None
    result = {"name": args.name, "what": "device-to-host syncs in one CFG denoising step (k5.engine.sampling.sampler)",
              "cases": [], "env": report.environment(device, ["syncs", *argv])}
    bad = 0
    for case in cases:
        label = f"{case['model']} {case['height']}x{case['width']}x{case['frames']} " \
                f"{'nabla P ' + str(NABLA_P) if case['nabla'] else 'dense'}"
        print(f"-- {label}", flush=True)
        try:
            row = {"case": label} | check(case, args, device)
        except Exception as e:  # noqa: BLE001 - a case that cannot run is recorded, and the others still run
            traceback.print_exc()  # the log keeps where it broke; the JSON keeps the one line
            row = {"case": label, "syncs": "not measured: the step failed",
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        bad += row["syncs"] not in ("none", NOT_ON_CPU)
        result["cases"].append(row)
        result["verdict"] = verdict(result["cases"], device)
        report.write(result, Path(args.out), markdown=False)
        print(f"   {describe(row)}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"host syncs: {result['verdict']}")
    return 1 if bad else 0


def verdict(rows: list[dict], device: torch.device) -> str:
    if not can_check(device):
        return NOT_ON_CPU
    found = [r["case"] for r in rows if r["syncs"] == "found"]
    failed = [r["case"] for r in rows if r["syncs"] not in ("none", "found")]
    parts = ([f"syncs found in {', '.join(found)}"] if found else []) + \
        ([f"not measured (the step failed) for {', '.join(failed)}"] if failed else [])
    return "; ".join(parts) if parts else f"none in {len(rows)} case(s) (measured)"


def describe(row: dict) -> str:
    if row["syncs"] == "found":
        listed = "; ".join(f"{n}x {s}" for s, n in row["sites"].items())
        return f"SYNCS FOUND (first: {row['first']}); all: {listed}"
    return row["syncs"] + (f" ({row['error']})" if "error" in row else "")


if __name__ == "__main__":
    sys.exit(main())
