"""Time the Kandinsky 5 DiT: forward, denoising step (CFG: 2 forwards), VAE decode; beside diffusers on the same
weights; one process or under torchrun with any parallel layout.

    python -m k5.bench --model lite --blocks 2 --height 256 --width 256 --frames 17 --dtype fp32 --peer diffusers
    torchrun --nproc_per_node=2 -m k5.bench --model lite --blocks 2 --height 256 --width 256 --frames 17 --ulysses 2
    python -m k5.bench attention --frames 121 --height 512 --width 768 --heads 2 --P 0.02   (dense vs NABLA kernels)

Every figure is a median over --repeat timed runs after --warmup runs (CUDA events on a GPU; under torchrun each
repetition is the slowest rank's time, ranks aligned by a barrier). FLOPs are counted analytically (flops.py),
NABLA by the density of the masks of a real forward on the same inputs. Results go to bench/results/<name>.json
and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a file, its folder on sys.path would shadow installed modules
    sys.exit("bench/run.py is a module of k5.bench: run `python -m k5.bench ...` or `k5 bench ...`")

from k5.bench import fast, flops, peers, report
from k5.engine.checkpoints.dit import keeps_fp32
from k5.engine.model.config import PRESETS, DiTConfig
from k5.engine.model.dit import Kandinsky5DiT, TokenGrid
from k5.engine.sampling.chain import StepCall, compose
from k5.engine.sampling.sampler import Conditioning, model_input
from k5.kernels.flex import FLEX_OPTIONS, check_compiled_flex, set_flex_options
from k5.kernels.nabla import (NablaSpec, block_sparse_attention, nabla_backend, nabla_block_mask, nabla_mask,
                              pool_blocks, sta_block_mask)
from k5.engine.checkpoints.dit import load_dit

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The DiT of engine/catalogue/tiny.py's checkpoint (text widths of its tiny Qwen / CLIP encoders).
TINY = DiTConfig(in_text_dim=32, in_text_dim2=24, time_dim=32, model_dim=64, ff_dim=128, num_text_blocks=1,
                 num_visual_blocks=2, axes_dims=(4, 6, 6))
GUIDANCE = 5.0


def model_config(name: str, blocks: int | None) -> DiTConfig:
    if name == "tiny":
        cfg = TINY
    elif name in PRESETS:
        cfg = PRESETS[name]
    elif Path(name).is_file():
        cfg = DiTConfig.from_json(name)
    else:
        raise ValueError(f"--model {name!r} is not tiny, {', '.join(PRESETS)} or a transformer config.json")
    return cfg.replace(num_visual_blocks=blocks) if blocks else cfg


# ---- the model and its inputs ---------------------------------------------------------------------------------


def random_dit(cfg, dtype: torch.dtype, device: torch.device, seed: int, model_class=Kandinsky5DiT) -> torch.nn.Module:
    """Our DiT (``model_class``: Kandinsky 5's, or 6's for bench/k6.py) with seeded random weights built straight on
    ``device`` (no full fp32 copy: Pro fits; the same on every rank: sequence parallelism needs the whole)."""
    with torch.device("meta"):
        model = model_class(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        owner, _, attr = name.rpartition(".")
        value = torch.empty(p.shape, device=device, dtype=torch.float32).normal_(generator=g)
        if "norm" in name:
            value = value.mul_(0.1).add_(1.0 if attr == "weight" else 0.0)
        else:
            value = value.div_(math.sqrt(p.shape[-1])) if p.ndim >= 2 else value.mul_(0.1)
        param = torch.nn.Parameter(value.to(torch.float32 if keeps_fp32(name) else dtype), requires_grad=False)
        setattr(model.get_submodule(owner), attr, param)
    return model.eval()


def make_inputs(cfg: DiTConfig, grid: tuple[int, int, int], text_tokens: int, device: torch.device, seed: int):
    """Noise state, conditional and unconditional text conditioning, timestep: all seeded, never zeros."""
    g = torch.Generator(device=device).manual_seed(seed)
    T, H, W = grid
    pt, ph, pw = cfg.patch_size
    rand = lambda *shape: torch.randn(*shape, device=device, generator=g)  # noqa: E731
    state = rand(1, T * pt, H * ph, W * pw, cfg.in_visual_dim)
    cond = Conditioning(rand(1, text_tokens, cfg.in_text_dim), None, rand(1, cfg.in_text_dim2))
    uncond = Conditioning(rand(1, text_tokens, cfg.in_text_dim), None, rand(1, cfg.in_text_dim2))
    return state, cond, uncond, torch.full((1,), 500.0, device=device)


class DensityProbe:
    """Single-device NABLA attention (as LocalAttention does it) that also counts the tiles its masks select, and
    with ``keep`` keeps each call's mask (in call order: one per visual block) for MaskReplay."""

    def __init__(self, spec: NablaSpec, keep: bool = False):
        self.nabla, self.selected, self.total, self.sta = spec, 0, 0, 0
        self.masks: list[torch.Tensor] | None = [] if keep else None

    def __call__(self, q, k, v, grid: TokenGrid):
        s = self.nabla
        sta = sta_block_mask(*grid.blocks, s.wT, s.wH, s.wW, device=q.device)
        mask = nabla_mask(q, k, s, *grid.blocks)
        self.selected += int(mask.sum())
        self.total += mask.numel()
        self.sta += int(sta.sum()) * mask.shape[0] * mask.shape[1]
        if self.masks is not None:  # on the host: they stay out of the device's peak memory figure
            self.masks.append(mask.to("cpu", non_blocking=False))
        return block_sparse_attention(q, k, v, mask, return_lse=False)[0]

    @property
    def density(self) -> float:
        return self.selected / self.total


class MaskReplay:
    """Single-device NABLA attention on given tile masks, the i-th call on the i-th mask: the compiled blocks run on
    the eager reference's masks, so comparing the outputs checks the compiled kernel, not the mask selection.

    With random weights the pooled attention is near uniform, and a last-bit difference in q or k between inductor
    and eager moves tiles across the top-CDF boundary: a compiled forward on its own masks can differ from the eager
    one by more than any kernel error. Each call also computes the mask the compiled code selects from its own q, k
    (nabla_mask, as LocalAttention does) and counts the tiles where it equals the replayed one: ``agreement``.
    """

    def __init__(self, spec: NablaSpec, masks: list[torch.Tensor]):
        self.nabla, self.masks, self.calls, self.equal, self.total = spec, masks, 0, 0, 0

    @torch.compiler.disable
    def _take(self, own: torch.Tensor) -> torch.Tensor:
        """The next replayed mask (eager: a graph break, so no compiled graph guards on the call count)."""
        if self.calls >= len(self.masks):
            raise RuntimeError(f"MaskReplay: call {self.calls + 1} but only {len(self.masks)} masks were recorded")
        mask = self.masks[self.calls].to(own.device)
        if own.shape != mask.shape:
            raise RuntimeError(f"MaskReplay: call {self.calls + 1} selects a {tuple(own.shape)} mask, "
                               f"the recorded one is {tuple(mask.shape)}")
        self.calls += 1
        self.equal += int((own == mask).sum())
        self.total += mask.numel()
        return mask

    def __call__(self, q, k, v, grid: TokenGrid):
        own = nabla_mask(q, k, self.nabla, *grid.blocks)
        return block_sparse_attention(q, k, v, self._take(own), return_lse=False)[0]

    @property
    def agreement(self) -> float:
        """Fraction of the tiles (every call, head and tile pair) where the own mask equals the replayed one."""
        return self.equal / self.total


# ---- parallel layouts -------------------------------------------------------------------------------------------


def plan(args, world_size: int, cfg: DiTConfig):
    """Degrees for this world: tp and cfg as given, the rest over ulysses x ring (k5.parallel's own planner)."""
    from k5.parallel.plan import plan_parallel

    return plan_parallel(world_size, cfg, tp=args.tp, cfg_parallel=args.cfg == 2, dp=1, ulysses=args.ulysses,
                         ring=args.ring)


def apply_layout(dit: Kandinsky5DiT, dims, device: torch.device):
    """Build the mesh and apply each technique with a degree above 1 to the built model, as the launcher does.

    Returns the CommStats every collective adds to and the guiding stages of the step chain (CfgParallel, or none:
    the chain's sequential Guidance).
    """
    from k5.parallel.cfg import CfgParallel
    from k5.parallel.comm_stats import CommStats
    from k5.parallel.sequence import apply_sequence_parallel
    from k5.parallel.tensor import apply_tensor_parallel

    dims.build_mesh(device.type)
    stats = CommStats()
    if dims.tp > 1:
        apply_tensor_parallel(dit, dims, stats)
    if dims.sp_size > 1:
        apply_sequence_parallel(dit, dims, stats)
    return stats, [CfgParallel(dims, stats)] if dims.cfg > 1 else []


# ---- distributed helpers ------------------------------------------------------------------------------------------


def world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def slowest(times: list[float], device: torch.device) -> list[float]:
    """Per repetition, the slowest rank's time."""
    if not dist.is_initialized():
        return times
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_ranks(value: float, device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return [value]
    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=device))
    return [x.item() for x in out]


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated since the timed runs began"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (ru_maxrss), whole run"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def median(times: list[float]) -> float:
    return statistics.median(times)


def unstable_series(result: dict) -> list[str]:
    """Names of the timing series whose max/min exceeds fast.UNSTABLE (their medians are not to be trusted)."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("unstable") is True and "max_over_min" in node:
                found.append(f"{path} (max/min {node['max_over_min']:.2f})")
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk({k: v for k, v in result.items() if k != "unstable"}, "")
    return found


def save(args, result: dict) -> None:
    """Write the result (rank 0; JSON, and Markdown unless --json-only) unless --no-save."""
    if args.no_save or world()[0] != 0:
        return
    paths = report.write(result, Path(args.out), markdown=not args.json_only)
    print("wrote " + " and ".join(str(p) for p in paths), flush=True)


def extra(fn, *args) -> dict:
    """An optional measurement after the main one: its failure (a missing package, a shape the device refuses) is
    recorded in the result instead of ending the run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


# ---- the run ----------------------------------------------------------------------------------------------------


def load_model(args, cfg: DiTConfig, dtype, device) -> tuple[Kandinsky5DiT, Path | None]:
    """Our DiT with seeded random weights; with --peer diffusers, loaded from a folder that diffusers' own
    save_pretrained wrote (rank 0 writes it, every rank reads it), which the peer then loads too."""
    if args.peer != "diffusers":
        return random_dit(cfg, dtype, device, args.seed), None
    rank, _ = world()
    folder = peers.save_random_checkpoint(cfg, peers.temp_checkpoint_dir(), seed=args.seed) if rank == 0 else None
    if dist.is_initialized():
        box = [str(folder) if folder else None]
        dist.broadcast_object_list(box, src=0)
        folder = Path(box[0])
    return load_dit(folder, dtype=dtype, device=device, config=cfg), folder


@torch.no_grad()
def reference_forward(dit: Kandinsky5DiT, forward, keep_masks: bool = False):
    """One device, eager, default attention backend: the output every other path (diffusers, the parallel layout,
    the compiled fast path) must match; with NABLA the density of the masks this forward selected, and with
    ``keep_masks`` the masks themselves (one per visual block, for MaskReplay). Returns (out, info, masks)."""
    if dit.nabla is None:
        return forward(), None, None
    probe = DensityProbe(dit.nabla, keep=keep_masks)
    local, dit.visual_attention = dit.visual_attention, probe
    try:
        out = forward()
    finally:
        dit.visual_attention = local
    s = dit.nabla
    return out, {"density": probe.density, "sta_density": probe.sta / probe.total, "P": s.P,
                 "wT_wH_wW": [s.wT, s.wH, s.wW]}, probe.masks


@torch.no_grad()
def compiled_on_reference_masks(dit: Kandinsky5DiT, forward, masks: list[torch.Tensor]):
    """The compiled forward with every visual block on the eager reference's NABLA masks (MaskReplay).
    Returns (out, fraction of tiles where the compiled code's own selection equals the reference's)."""
    replay = MaskReplay(dit.nabla, masks)
    local, dit.visual_attention = dit.visual_attention, replay
    try:
        out = forward()
    finally:
        dit.visual_attention = local
    if replay.calls != len(masks):
        raise RuntimeError(f"MaskReplay: {replay.calls} calls for {len(masks)} recorded masks")
    return out, replay.agreement


@torch.no_grad()
def diffusers_peer(args, folder: Path, dtype, device, nabla_P, inputs, reference, checks: dict):
    """diffusers' transformer on our weights, its output checked against ours; None where it cannot run here."""
    if world()[1] > 1:
        checks["diffusers"] = "skipped: the diffusers peer runs in single-process runs only"
        return None
    if nabla_P is not None and device.type == "cpu":
        checks["diffusers"] = "skipped: diffusers' NABLA needs compiled flex attention, which fails on CPU"
        return None
    peer = peers.DiffusersPeer(folder, dtype, device, nabla_P)
    if args.peer_compile:
        peer.compile()
    try:
        theirs = peer.forward(*inputs)
    except RuntimeError as e:  # its preferred backend refused this shape or device: plain SDPA
        checks["diffusers_backend_fallback"] = f"{peer.backend}: {str(e).splitlines()[0][:160]}"
        peer.model.set_attention_backend("native")
        peer.backend = "native"
        theirs = peer.forward(*inputs)
    checks["diffusers_rel_err"] = rel_err(theirs.float(), reference.float())
    return peer


def run_dit(args) -> dict:
    rank, world_size = world()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cfg = model_config(args.model, args.blocks)
    nabla = args.attention == "nabla"
    grid = flops.latent_grid(args.height, args.width, args.frames, cfg.patch_size)
    if nabla and (grid[1] % 8 or grid[2] % 8):
        raise ValueError(f"NABLA needs height and width multiples of 128 pixels; got {args.height}x{args.width}")
    tokens = math.prod(grid)
    dims = plan(args, world_size, cfg) if world_size > 1 else None
    layout = {k: v for k, v in dims.degrees.items() if v > 1} if dims else {}

    dit, folder = load_model(args, cfg, dtype, device)
    dit.set_attention("nabla" if nabla else "dense", args.P)
    P = dit.nabla.P if nabla else None
    state, cond, uncond, t = make_inputs(cfg, grid, args.text_tokens, device, args.seed + 1)
    inp = model_input(state, cfg.visual_cond, None)
    inputs = (inp, cond.embeds, cond.pooled, t)
    forward = lambda: dit(*inputs)  # noqa: E731

    result = {"name": args.name or default_name(args, world_size, layout, P), "config": {
        "model": args.model, "visual_blocks": cfg.num_visual_blocks, "text_blocks": cfg.num_text_blocks,
        "model_dim": cfg.model_dim, "heads": cfg.num_heads, "height": args.height, "width": args.width,
        "frames": args.frames, "latent_grid": list(grid), "visual_tokens": tokens, "text_tokens": args.text_tokens,
        "attention": args.attention, "P": P, "nabla_kernel": args.nabla_kernel, "flex_options": args.flex_options,
        "dtype": args.dtype,
        "world_size": world_size, "layout": layout or {"single": 1}, "compile": args.compile,
        "attention_backend": args.attention_backend, "warmup": args.warmup, "repeat": args.repeat,
    }}
    step_repeat = args.repeat if args.step_repeat is None else args.step_repeat
    result["config"]["step_repeat"] = step_repeat
    checks, timing = {}, {}
    # A compiled single-device NABLA run is checked on the reference's own masks (MaskReplay): keep them.
    replay = nabla and args.compile and dims is None
    reference, nabla_info, ref_masks = reference_forward(dit, forward, keep_masks=replay)
    density = nabla_info["density"] if nabla else 1.0
    if nabla_info:
        result["nabla"] = nabla_info
    peer = None
    if folder is not None:
        peer = diffusers_peer(args, folder, dtype, device, P, inputs, reference, checks)
        timing["diffusers_compiled"] = args.peer_compile

    stats, stages = apply_layout(dit, dims, device) if dims else (None, [])
    guided = compose(stages, lambda x, tt, c: dit(x, c.embeds, c.pooled, tt))
    result["config"]["attention_backend"] = fast.use_attention_backend(args.attention_backend, device, dtype,
                                                                       cfg.head_dim)
    count = flops.forward_flops(cfg, tokens, args.text_tokens, density=density)
    result["flops"] = {k: v / 1e12 for k, v in count.as_dict().items()} | {"unit": "TFLOP per forward"}
    result["timing"], result["checks"] = timing, checks

    def memory() -> None:  # after each timing; every rank calls it (the figure is gathered)
        peak, peak_kind = peak_memory_bytes(device)
        result["memory"] = {"peak_gib_per_rank": [round(b / 2**30, 3) for b in all_ranks(peak, device)],
                            "kind": peak_kind}

    def record(stage: str | None) -> None:
        """Save what is measured so far (a run killed at its time cap keeps it); ``stage`` says what is still
        missing, None when the DiT measurement is complete."""
        result["env"] = report.environment(device, args.argv) | {"load_avg_at_start": args.load_at_start}
        result["unstable"] = unstable_series(result)
        if stage:
            result["incomplete"] = stage
        else:
            result.pop("incomplete", None)
        save(args, result)

    if args.compile:
        fast.compile_blocks(dit)
    with torch.no_grad():
        if stats is not None or args.compile:
            err = rel_err(forward().float(), reference.float())  # also the compile's first (untimed) call
            if stats is not None:
                checks["layout_rel_err"] = err
            elif replay:  # its own masks: tiles can flip at the top-CDF boundary; informative, not the check
                result["nabla"]["compiled_own_masks_rel_err"] = err
            else:
                checks["compiled_rel_err"] = err

        def step():
            v = guided(StepCall(inp, t, 0, 1, GUIDANCE, cond, uncond))
            return state + (-0.02) * v  # one Euler step: x + (t_next - t) * v

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with fast.no_recompile() if args.compile else contextlib.nullcontext():
            if peer is not None:  # one process: ours and diffusers' forwards in turns
                fwd, pf = fast.time_interleaved([forward, lambda: peer.forward(*inputs)], device, args.warmup,
                                                args.repeat)
                timing["diffusers_s_per_forward"] = median(pf)
                timing["diffusers_runs_s"] = pf
                timing["diffusers_forward_s"] = fast.spread(pf)
                timing["diffusers_backend"] = peer.backend
            else:
                fwd = slowest(fast.time_calls(forward, device, args.warmup, args.repeat, barrier), device)
        s_fwd = median(fwd)
        peak_tflops, peak_source = measure_peak(args, dtype, device)
        # A forward runs on world/cfg devices (each CFG half does its own); a step (2 forwards) on all of them.
        achieved = count.total / s_fwd / 1e12 / (world_size // (dims.cfg if dims else 1))
        timing.update({
            "s_per_forward": s_fwd, "s_per_forward_min": min(fwd), "forward_runs_s": fwd,
            "forward_s": fast.spread(fwd), "visual_tokens_per_s": tokens / s_fwd,
            "tflop_per_forward": count.total / 1e12, "tflops_per_device": achieved,
            "peak_tflops_per_device": peak_tflops, "peak_source": peak_source, "mfu": achieved / peak_tflops,
        })
        if peer is not None:
            # Three views of one comparison (the runs alternate ours, theirs, ours, ...): medians; the fastest run
            # of each (the least disturbed on a shared machine); and the median ratio of back-to-back pairs.
            pf = timing["diffusers_runs_s"]
            timing["ours_over_diffusers"] = s_fwd / timing["diffusers_s_per_forward"]
            timing["ours_over_diffusers_min"] = min(fwd) / min(pf)
            timing["ours_over_diffusers_paired"] = median([a / b for a, b in zip(fwd, pf)])
        memory()
        left = ["the step timing"] * (step_repeat > 0) + ["the check on the reference's masks"] * replay
        record("forward timed; not yet: " + ", ".join(left) if left else None)

        if step_repeat > 0:
            with fast.no_recompile() if args.compile else contextlib.nullcontext():
                stp = slowest(fast.time_calls(step, device, min(args.warmup, 1), step_repeat, barrier), device)
            s_step = median(stp)
            timing.update({"s_per_step": s_step, "s_per_step_min": min(stp), "step_runs_s": stp,
                           "step_s": fast.spread(stp),
                           "step_tflops_per_device": 2 * count.total / s_step / 1e12 / world_size})
            memory()
            if replay:
                record("forward and step timed; not yet: the check on the reference's masks")
        if stats is not None:
            stats.reset()
            forward()
            sent_forward = stats.summary()
            stats.reset()
            step()
            sent_step = stats.summary()
            result["comm_bytes_per_rank"] = {"forward": sent_forward, "step": sent_step}
        if replay:
            # After the timings (a second compile: the blocks on another attention op), so a run killed at its cap
            # during it keeps them.
            out, agreement = compiled_on_reference_masks(dit, forward, ref_masks)
            checks["compiled_rel_err"] = rel_err(out.float(), reference.float())
            result["nabla"]["compiled_mask_agreement"] = agreement
            ref_masks.clear()

    if args.profile:
        fns = {"ours": forward}
        if peer is not None:
            fns["diffusers"] = lambda: peer.forward(*inputs)
        result["profile"] = {name: profile_ops(fn, device) for name, fn in fns.items()}
    # The DiT measurement is done: written now, so a later extra that fails or runs out of time loses nothing.
    record(None)
    if args.vae != "none":
        result["vae"] = extra(time_vae, args, grid, device)
    if args.xfuser:
        result["xfuser"] = xfuser_peer(args, cfg, grid, dtype, device, dims)
    result["unstable"] = unstable_series(result)
    if folder is not None and rank == 0:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return result


@torch.no_grad()
def profile_ops(fn, device: torch.device, top: int = 12) -> dict:
    """torch.profiler over one call: the ops with the most self time, and the share of matrix products."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        fast.sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    total = sum(getattr(e, attr) for e in ops) / 1e6
    rows = [{"op": e.key, "self_s": getattr(e, attr) / 1e6, "calls": e.count} for e in ops[:top]]
    share = lambda keys: sum(r["self_s"] for r in rows if any(k in r["op"] for k in keys)) / total  # noqa: E731
    return {"total_self_s": total, "matmul_share": share(("aten::mm", "aten::addmm", "aten::bmm", "gemm")),
            "attention_share": share(("scaled_dot_product", "flash", "attention", "flex")), "top": rows}


def measure_peak(args, dtype, device) -> tuple[float, str]:
    """The matrix peak MFU is computed against, and where it comes from: measured here, or given with
    --peak-tflops (labelled by --peak-source: measured by the caller on this device, assumed, or just given)."""
    if args.peak_tflops != "measure":
        return float(args.peak_tflops), args.peak_source
    return statistics.median(all_ranks(fast.matmul_peak_tflops(dtype, device), device)), "measured"


def default_name(args, world_size: int, layout: dict, P: float | None) -> str:
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    lay = "-".join(f"{k}{v}" for k, v in layout.items()) or "single"
    attn = f"nabla{P}" if args.attention == "nabla" else "dense"
    blocks = f"-b{args.blocks}" if args.blocks else ""
    extra = "-compiled" if args.compile else ""
    threads = f"-t{torch.get_num_threads()}" if kind == "cpu" else ""  # 1 vs 2 cores is another experiment
    return (f"{kind}-{args.model}{blocks}-{args.height}x{args.width}x{args.frames}-{attn}-{args.dtype}-"
            f"w{world_size}{threads}-{lay}{extra}")


def time_vae(args, grid, device) -> dict:
    """Decode latents of this run's shape with a random VAE (tiny widths, or the real HunyuanVideo widths)."""
    from diffusers import AutoencoderKLHunyuanVideo

    from k5.engine.vae.video import VideoVAE
    from k5.parallel.vae_tiles import parallel_decode

    widths = {"tiny": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4),
              "real": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)}
    torch.manual_seed(args.seed)
    if args.vae in widths:
        ae = AutoencoderKLHunyuanVideo(latent_channels=16, scaling_factor=0.476986, spatial_compression_ratio=8,
                                       temporal_compression_ratio=4, mid_block_add_attention=True,
                                       **widths[args.vae])
    elif Path(args.vae).exists():  # a VAE config.json or its folder: that architecture, random weights
        ae = AutoencoderKLHunyuanVideo.from_config(AutoencoderKLHunyuanVideo.load_config(args.vae))
    else:
        raise ValueError(f"--vae {args.vae!r} is not none, tiny, real or a HunyuanVideo VAE config.json/folder")
    vae = VideoVAE(ae.to(device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32))
    T, H, W = grid
    latents = torch.randn(1, T, H * 2, W * 2, 16, device=device, generator=torch.Generator(device).manual_seed(3))
    _, world_size = world()
    decode = (lambda: parallel_decode(vae, latents, dst=0)) if world_size > 1 else (lambda: vae.decode(latents))
    runs = slowest(fast.time_calls(decode, device, args.vae_warmup, args.vae_repeat, barrier), device)
    return {"widths": args.vae, "latent": [1, T, H * 2, W * 2, 16], "dtype": str(vae.dtype),
            "s_per_decode": median(runs), "runs_s": runs, "decode_s": fast.spread(runs), "tiled": True,
            "parallel_tiles": world_size > 1}


def xfuser_peer(args, cfg, grid, dtype, device, dims) -> dict:
    """xfuser's USP attention against ours on this run's self-attention shape (GPU only; errors are recorded)."""
    try:
        u, r = (dims.ulysses, dims.ring) if dims else (1, 1)
        usp = peers.xfuser_usp_attention(u, r)
        _, world_size = world()
        S = math.prod(grid) // world_size
        g = torch.Generator(device=device).manual_seed(7)
        q, k, v = (torch.randn(1, S, cfg.num_heads, cfg.head_dim, device=device, dtype=dtype, generator=g)
                   for _ in range(3))
        theirs = median(slowest(fast.time_calls(lambda: usp(q, k, v), device, 2, args.repeat, barrier), device))
        return {"ulysses": u, "ring": r, "s_per_attention": theirs, "tokens_per_rank": S}
    except Exception as e:  # noqa: BLE001 - a missing or failing peer is a recorded fact, not a crash
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


# ---- dense vs NABLA kernels ---------------------------------------------------------------------------------------


def run_attention(args) -> dict:
    """Dense SDPA against NABLA (mask + block-sparse kernel) on one self-attention of the same length."""
    from k5.kernels.attention import attention
    from k5.kernels.nabla import nabla_attention

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    T, H, W = flops.latent_grid(args.height, args.width, args.frames)
    if H % 8 or W % 8:
        raise ValueError(f"NABLA needs height and width multiples of 128 pixels; got {args.height}x{args.width}")
    S = T * H * W
    g = torch.Generator(device=device).manual_seed(args.seed)
    q, k, v = (torch.randn(1, S, args.heads, args.head_dim, device=device, dtype=dtype, generator=g)
               for _ in range(3))
    backend = fast.use_attention_backend(args.attention_backend, device, dtype, args.head_dim)
    dense_runs = fast.time_calls(lambda: attention(q, k, v), device, 1, args.repeat)
    dense = median(dense_runs)
    rows = []
    for P in args.P_list:
        spec = NablaSpec(P=P)
        sta = sta_block_mask(T, H // 8, W // 8, spec.wT, spec.wH, spec.wW, device=device)
        mask = nabla_block_mask(pool_blocks(q), pool_blocks(k), sta, P)
        density = mask.float().mean().item()
        full_runs = fast.time_calls(lambda: nabla_attention(q, k, v, spec, T, H // 8, W // 8), device, 1, args.repeat)
        kernel_runs = fast.time_calls(lambda: block_sparse_attention(q, k, v, mask, return_lse=False), device, 1, args.repeat)
        full, kernel = median(full_runs), median(kernel_runs)
        # The first query tiles against dense SDPA in fp32 with the tile mask expanded to tokens: the same function.
        rows_checked = min(args.check_tiles, mask.shape[2]) * 64
        token_mask = mask[:, :, : rows_checked // 64].repeat_interleave(64, -1).repeat_interleave(64, -2)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[:, :rows_checked].transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(),
            attn_mask=token_mask,
        ).transpose(1, 2)
        err = rel_err(block_sparse_attention(q, k, v, mask, return_lse=False)[0][:, :rows_checked].float(), want)
        rows.append({"P": P, "density": density, "s_nabla": full, "s_block_sparse_kernel": kernel,
                     "speedup_vs_dense": dense / full, "kernel_speedup_vs_dense": dense / kernel,
                     # target: the block-sparse kernel within 1.3x of (density x dense time)
                     "kernel_over_density_x_dense": kernel / (density * dense),
                     "nabla_s": fast.spread(full_runs), "kernel_s": fast.spread(kernel_runs),
                     "rel_err_vs_masked_dense": err, "query_tiles_checked": rows_checked // 64})
    flex_compare = compare_flex_options(args, S, T, H, W, device, dtype) if args.compare_flex_options else None
    kind = "cuda" if device.type == "cuda" else "cpu"
    name = args.name or f"{kind}-attention-{args.height}x{args.width}x{args.frames}-h{args.heads}-{args.dtype}"
    fl = flops.attention_flops(1, args.heads, S, S, args.head_dim)
    result = {"name": name, "config": {"tokens": S, "grid_blocks": [T, H // 8, W // 8], "heads": args.heads,
                                       "head_dim": args.head_dim, "dtype": args.dtype, "repeat": args.repeat,
                                       "attention_backend": backend, "nabla_kernel": args.nabla_kernel,
                                       "flex_options": args.flex_options},
              "dense": {"s": dense, "tflops": fl / dense / 1e12, "dense_s": fast.spread(dense_runs)},
              "nabla": rows, "env": report.environment(device, args.argv)}
    if flex_compare is not None:
        result["flex_options_compare"] = flex_compare
    result["unstable"] = unstable_series(result)
    return result


def compare_flex_options(args, S, T, H, W, device, dtype) -> dict:
    """The block-sparse kernel at the first --P-list value under each of the given flex kernel option sets
    (kernels/flex.py kernel_options), at --compare-head-dim: the choice issue 19 leaves to a GPU measurement. The
    options set only the CUDA kernel; on a CPU the template reads the tiles alone, so nothing is compared there."""
    from k5.kernels.flex import flex_options, kernel_options

    if device.type != "cuda":
        return {"measured": False, "why": "not measured on CPU: the CPU flex template reads only the tile sizes"}
    D, P = args.compare_head_dim, args.P_list[0]
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    q, k, v = (torch.randn(1, S, args.heads, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    spec = NablaSpec(P=P)
    sta = sta_block_mask(T, H // 8, W // 8, spec.wT, spec.wH, spec.wW, device=device)
    mask = nabla_block_mask(pool_blocks(q), pool_blocks(k), sta, P)
    before, rows = flex_options(), []
    try:
        with nabla_backend("flex"):
            reference = None
            for choice in args.compare_flex_options:
                set_flex_options(choice)
                runs = fast.time_calls(lambda: block_sparse_attention(q, k, v, mask, return_lse=False), device, 1,
                                       args.repeat)
                out = block_sparse_attention(q, k, v, mask, return_lse=False)[0].float()
                reference = out if reference is None else reference
                options = kernel_options(D, dtype, torch.cuda.get_device_capability(device), choice)
                rows.append({"options": choice, "kernel_options": options,
                             "s_block_sparse_kernel": median(runs), "kernel_s": fast.spread(runs),
                             "rel_err_vs_first": rel_err(out, reference)})
    finally:
        set_flex_options(before)
    best = min(rows, key=lambda r: r["s_block_sparse_kernel"])["options"]
    return {"measured": True, "P": P, "head_dim": D, "heads": args.heads, "density": mask.float().mean().item(),
            "rows": rows, "fastest": best}


# ---- command line -----------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m k5.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="?", default="dit", choices=["dit", "attention"],
                   help="dit: model forward/step/VAE (default); attention: dense vs NABLA kernels")
    p.add_argument("--model", default="tiny", help="tiny, lite, lite-10s, pro, pro-hd, image-lite or a config.json")
    p.add_argument("--blocks", type=int, help="cut the visual blocks to N (CPU-sized runs of big widths)")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--frames", type=int, default=5, help="video frames, 4k+1")
    p.add_argument("--text-tokens", type=int, default=256, help="text tokens (the original pads to 256)")
    p.add_argument("--attention", default="dense", choices=["dense", "nabla"])
    p.add_argument("--P", type=float, default=None, help="NABLA kept mass (default: the config's or 0.9)")
    p.add_argument("--nabla-kernel", default="auto", choices=["auto", "flex", "gather"],
                   help="NABLA's block-sparse kernel: auto (flex on CUDA, gather on the CPU); flex on the CPU runs "
                        "the CUDA route through compiled CPU FlexAttention (single process)")
    p.add_argument("--flex-options", default="k5", choices=list(FLEX_OPTIONS),
                   help="NABLA's FlexAttention kernel options (kernels/flex.py kernel_options): k5 every knob (64x64 "
                        "tiles, 4 warps, 3 stages where they fit), default the 64x64 tiles only (warps and stages "
                        "from inductor's default config: k5 before issue 19), autotune inductor times the candidates "
                        "whose tiles divide 64 at compile time")
    p.add_argument("--P-list", type=float, nargs="+", default=[0.02, 0.1, 0.5], help="attention: NABLA P values")
    p.add_argument("--compare-flex-options", nargs="+", default=None, choices=list(FLEX_OPTIONS),
                   help="attention, CUDA: also time the block-sparse kernel at the first --P-list value under each of "
                        "these flex kernel option sets (e.g. default k5 autotune)")
    p.add_argument("--compare-head-dim", type=int, default=128,
                   help="attention: head dim of --compare-flex-options (128: Pro's, where the old pins kept 8 warps)")
    p.add_argument("--heads", type=int, default=2, help="attention: heads")
    p.add_argument("--head-dim", type=int, default=64, help="attention: head dim")
    p.add_argument("--check-tiles", type=int, default=8, help="attention: query tiles checked vs masked dense")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--ulysses", type=int, default=None, help="Ulysses degree (default: as many as heads allow)")
    p.add_argument("--ring", type=int, default=None, help="ring degree")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--cfg", type=int, default=1, choices=[1, 2], help="CFG-parallel degree")
    p.add_argument("--peer", default="none", choices=["none", "diffusers"],
                   help="time diffusers' transformer on the same weights (loads both from one save_pretrained)")
    p.add_argument("--peer-compile", action="store_true", help="compile diffusers' repeated blocks too")
    p.add_argument("--xfuser", action="store_true", help="GPU: time xfuser's USP attention on the same shapes")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks (fast path)")
    p.add_argument("--attention-backend", "--sdpa-backend", dest="attention_backend", default="auto",
                   choices=list(fast.DENSE_BACKENDS), help="dense attention kernel, as the CLI's --attention-backend")
    p.add_argument("--vae", default="tiny",
                   help="none, tiny, real (HunyuanVideo widths) or a VAE config.json/folder; random weights")
    p.add_argument("--vae-repeat", type=int, default=2)
    p.add_argument("--vae-warmup", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--step-repeat", type=int, default=None,
                   help="timed denoising steps (default: --repeat; 0: no step timing)")
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops of one forward (and the peer's)")
    p.add_argument("--peak-tflops", default="measure", help="peak for MFU in TFLOP/s, or 'measure' (matmul bench)")
    p.add_argument("--peak-source", default="given", choices=["measured", "assumed", "given"],
                   help="what a --peak-tflops number is, recorded as timing.peak_source: measured (by the caller, "
                        "on this device), assumed, or given (default); 'measure' records measured")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="result file name (default: from the settings)")
    p.add_argument("--out", default=str(report.SCRATCH),
                   help=f"results folder (default {report.SCRATCH}: bench/results/ holds the committed results and "
                        f"is written only when named here)")
    p.add_argument("--json-only", action="store_true", help="write the JSON result without its Markdown table")
    p.add_argument("--no-save", action="store_true", help="print only")
    return p


def setup(args) -> bool:
    """Device, threads and (under torchrun) the process group; True if this call created the group."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device is None:
        args.device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.device == "cpu" and "LOCAL_WORLD_SIZE" in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        return True
    return False


def summary_line(r: dict) -> str:
    flag = f" UNSTABLE: {'; '.join(r['unstable'])}" if r.get("unstable") else ""
    if "nabla" in r and isinstance(r["nabla"], list):
        parts = [f"P {x['P']}: density {x['density']:.3f}, {x['speedup_vs_dense']:.2f}x" for x in r["nabla"]]
        d = r["dense"]["dense_s"]
        return (f"{r['name']}: dense {d['median']:.3f} s (min {d['min']:.3f}, max {d['max']:.3f}); "
                + "; ".join(parts) + flag)
    t = r["timing"]
    f = t["forward_s"]
    line = (f"{r['name']}: {t['s_per_forward']:.4f} s/forward (min {f['min']:.4f}, max {f['max']:.4f}), "
            + (f"{t['s_per_step']:.4f} s/step, " if "s_per_step" in t else "no step timed, ")
            + f"{t['tflops_per_device']:.3g} TFLOP/s/device (MFU {t['mfu']:.1%}"
            + ("" if t.get("peak_source") == "measured" else f" of the {t.get('peak_source', 'given')} peak") + ")")
    if "ours_over_diffusers" in t:
        line += (f", ours/diffusers {t['ours_over_diffusers']:.3f} (fastest runs {t['ours_over_diffusers_min']:.3f}, "
                 f"paired {t['ours_over_diffusers_paired']:.3f})")
    checks = [f"{k} {v:.2e}" for k, v in r["checks"].items() if isinstance(v, float)]
    if isinstance(r.get("nabla"), dict) and "compiled_mask_agreement" in r["nabla"]:
        checks.append(f"compiled masks equal to the eager ones on {r['nabla']['compiled_mask_agreement']:.2%} of "
                      f"tiles")
    return line + (f"; {', '.join(checks)}" if checks else "") + flag


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv
    load_at_start = [round(x, 2) for x in os.getloadavg()]  # env's load is read at the end, this run included
    args.load_at_start = load_at_start
    created = setup(args)
    try:
        set_flex_options(args.flex_options)
        flex_nabla = args.nabla_kernel == "flex" or (args.nabla_kernel == "auto" and args.device.startswith("cuda"))
        if flex_nabla and (args.what == "attention" or args.attention == "nabla"):
            check_compiled_flex()  # eager flex would time dense attention as NABLA
        with nabla_backend(args.nabla_kernel):
            result = run_attention(args) if args.what == "attention" else run_dit(args)
        result["env"]["load_avg_at_start"] = load_at_start
    except ValueError as e:
        print(f"bench: {e}", file=sys.stderr)
        raise SystemExit(2)
    save(args, result)
    if world()[0] == 0:
        print(summary_line(result))
    if created:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
