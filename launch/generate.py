"""Generate videos with Kandinsky 5: one prompt, or a batch job over a prompt file that resumes where it stopped.

    python launch/generate.py --model M --prompt "a cat" --output cat.mp4
    torchrun --nproc_per_node=8 launch/generate.py --model M --prompts prompts.jsonl --output-dir out/

With several processes the degrees dp x cfg x ring x ulysses x tp multiply to the world size (one device mesh):
the visual tokens of every DiT forward are split over ring x ulysses, the weights over tp, the two guidance branches
over cfg, and whole items over dp. The VAE decode is split by tiles over the ranks that share an item; the first
of them writes the files.

Everything is checked before any weight loads: flags, every line of the prompt file, and that resuming into
--output-dir would not mix settings. A bad input ends with one message and exit code 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a script (python/torchrun launch/generate.py): use the checkout it is in
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k5.launch.failures import (EXIT_FAILED, EXIT_USAGE, POLL_S, Logs, Stopped, StopSignals, Supervisor,
                                exception_text, init_distributed)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (diffusers layout) or 'tiny' (built-in random model)")
    p.add_argument("--prompt", default=None, help="one prompt (or give --prompts FILE)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="batch job: .jsonl (one object per line), .csv with a header, or plain text (one prompt a "
                        "line); needs --output-dir")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="batch job folder: videos, manifest.jsonl, logs/; running the same command again resumes")
    p.add_argument("--negative-prompt", default=None, help="default: the reference negative prompt")
    p.add_argument("--image", default=None, help="conditioning image for image-to-video")
    p.add_argument("--height", type=int, default=None, help="pixels (default 512; 128 for --model tiny)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 768; 128 for --model tiny)")
    p.add_argument("--num-frames", type=int, default=None, help="4k+1 frames (default 121; 9 for --model tiny)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; 4 for --model tiny)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="1 disables CFG (nocfg/distilled models)")
    p.add_argument("--shift", type=float, default=None, help="schedule shift (default: scheduler config, else 5)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; in a batch job items default to seed + index")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (fp32 for --model tiny)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda (= cuda:LOCAL_RANK) or cuda:N; default cuda:LOCAL_RANK if CUDA is available, else cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="regional torch.compile of the DiT blocks (default: on with CUDA, off on the CPU)")
    p.add_argument("--attention-backend", choices=["auto", "cudnn", "flash", "efficient", "math"], default="auto",
                   help="CUDA kernel of dense attention (all return the lse the ring needs); auto: the fastest exact "
                        "one of the device (cuDNN on Hopper, else flash). Default auto")
    p.add_argument("--offload", choices=["none", "text", "model"], default=None,
                   help="where weights wait while unused: text = the text encoders leave the GPU once the prompts "
                        "are encoded; model = every component sits in host memory and visits the GPU only while it "
                        "runs (e.g. Pro on one 80 GB GPU); default text with CUDA, none on the CPU")
    p.add_argument("--output", default=None, help="MP4 path (H.264, 24 fps); omitted: no video is written")
    p.add_argument("--save-latents", nargs="?", const=True, default=None, metavar="PATH",
                   help="final latents as safetensors; in a batch job (no PATH) NAME.safetensors next to each video")
    p.add_argument("--save-frames", default=None, metavar="PATH", help="uint8 frames TxHxWx3 as safetensors")
    p.add_argument("--attention", choices=["auto", "dense", "nabla"], default="auto",
                   help="visual self-attention; auto follows the checkpoint config")
    p.add_argument("--nabla-threshold", type=float, default=None, metavar="P", help="override the NABLA CDF threshold P")
    p.add_argument("--ulysses-degree", type=int, default=None)
    p.add_argument("--ring-degree", type=int, default=None)
    p.add_argument("--tp-degree", type=int, default=1, help="tensor parallel: heads and FFN split over this many ranks")
    p.add_argument("--cfg-parallel", action="store_true",
                   help="the conditional and unconditional passes on two halves of the ranks")
    p.add_argument("--dp-degree", type=int, default=None,
                   help="data parallel over items (batch jobs); default: what ulysses x ring x tp x cfg leave of "
                        "the world when --ulysses-degree and --ring-degree are both given, else 1")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="a collective waiting longer fails the job; a failed or dead rank ends all ranks within it")
    p.add_argument("--verify", choices=["checksum", "size"], default="checksum",
                   help="how a resumed job checks finished files against the manifest")
    args = p.parse_args(argv)
    tiny = args.model == "tiny"
    defaults = dict(height=128 if tiny else 512, width=128 if tiny else 768, num_frames=9 if tiny else 121,
                    steps=4 if tiny else 50, dtype="fp32" if tiny else "bf16")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.nabla_threshold is not None and not 0 < args.nabla_threshold <= 1:
        p.error(f"--nabla-threshold {args.nabla_threshold} must be in (0, 1]")
    if args.timeout <= 0:
        p.error(f"--timeout {args.timeout:g} must be a positive number of seconds")
    if (args.prompt is None) == (args.prompts is None):
        p.error("give one prompt with --prompt TEXT or a prompt file with --prompts FILE" +
                (", not both" if args.prompt is not None else ""))
    if args.prompts is not None and args.output_dir is None:
        p.error("--prompts needs --output-dir DIR (the job's videos, manifest and logs go there)")
    if args.output_dir is not None:
        explicit = [f for f, v in (("--output", args.output), ("--save-frames", args.save_frames),
                                   ("--save-latents PATH", args.save_latents if args.save_latents is not True else None))
                    if v is not None]
        if explicit:
            p.error(f"{', '.join(explicit)}: in a batch job every file goes to --output-dir (name the videos with "
                    f"the prompt file's 'output' field; --save-latents takes no PATH there)")
    else:
        if args.save_latents is True:
            p.error("--save-latents needs a PATH for a single video (it takes none only with --output-dir)")
        if not (args.output or args.save_latents or args.save_frames):
            p.error("nothing to write: give --output and/or --save-latents / --save-frames (or --output-dir)")
    return args


def fail(message: str, code: int = EXIT_USAGE, show: bool = True) -> None:
    if show:
        print(f"error: {message}", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


def peak_memory(device: torch.device, rt=None, env=None) -> str:
    """The end-of-run facts of engine.fastpath.run_summary (compiled, recompiles, attention kernel, peak memory
    over the whole run with the decode's own peak and what was resident at the peak, the pre-load estimate)."""
    from k5.engine.fastpath import format_summary, run_summary

    return format_summary(run_summary(rt.fast if rt else None, device, env.estimate if env else None))


def comm_summary(stats) -> str:
    """Bytes this rank sent in the last denoising step, by collective (Runtime.generate closes a record per step;
    the first step also carries the text broadcast, so the last one is the steady state)."""
    if not stats.steps:
        return stats.format()
    return "; ".join(f"{kind} {v['bytes'] / 2**20:.3f} MiB in {v['calls']} calls" for kind, v in stats.steps[-1].items())


@dataclass
class Env:
    world: int
    rank: int
    local_rank: int
    device: torch.device
    estimate: object = None  # engine.memory.Estimate of this rank's peak, made before loading


def detect_env(args) -> Env:
    from k5.engine.fastpath import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device, local_rank)
    # The fast path's defaults depend on the device: compiled and text encoders off the GPU with CUDA.
    if args.compile is None:
        args.compile = device.type == "cuda"
    if args.offload is None:
        args.offload = "text" if device.type == "cuda" else "none"
    if args.offload == "model" and world > 1:
        raise ValueError("--offload model runs one process; with several GPUs split the DiT with --tp-degree instead")
    return Env(world, rank, local_rank, device)


# =====================================================================================================================
# PARALLEL LAYOUT: the one place where the degree flags become a ParallelDims and a pipeline becomes parallel.
# Tensor parallel, CFG parallel and shard-wise loading (issue 4) come in through k5.parallel.cfg (plan_parallel,
# setup_parallel); sequence parallelism through k5.parallel.sequence inside it. The launcher builds no process group
# of its own: the group of ranks that work on one item is a flattened view of the one mesh.
# =====================================================================================================================

def plan_dims(args, cfg, world: int):
    """The degrees for the flags, checked against the world size and the model (ValueError otherwise)."""
    from k5.parallel.cfg import plan_parallel

    return plan_parallel(world, cfg, tp=args.tp_degree, cfg_parallel=args.cfg_parallel, dp=args.dp_degree,
                         ulysses=args.ulysses_degree, ring=args.ring_degree)


def check_parallel_request(args, req) -> None:
    if args.cfg_parallel:
        from k5.parallel.cfg import check_cfg_parallel

        check_cfg_parallel(req.guidance_scale)


@dataclass
class Runtime:
    pipe: object  # Kandinsky5Pipeline, parallel where the layout says so
    dims: object  # ParallelDims with its mesh
    guided: object  # pipeline.generate(guided=...) for CFG parallel, else None
    stats: object  # CommStats of every collective, None on one process
    group: object  # the process group of the ranks that share an item (None: this process alone)
    group_rank: int
    dp_rank: int
    describe: str
    decode_report: list = field(default_factory=list)  # per-rank lines of the last split decode (group rank 0)
    fast: object = None  # engine.fastpath.FastPath: attention kernel and compile watch

    def generate(self, req, on_step):
        def step(i):
            if self.stats is not None:
                self.stats.end_step()  # one record of bytes sent per denoising step
            if self.fast is not None:
                self.fast.watch.step_done()
            on_step(i)

        return self.pipe.generate(req, on_step=step, guided=self.guided)

    def decode(self, latents):
        """uint8 frames [F, H, W, 3] on the group's rank 0, None on the others."""
        if self.group is None:
            return self.pipe.decode(latents)
        from k5.parallel.vae_tiles import parallel_decode

        frames, stats = parallel_decode(self.pipe.vae.vae, latents, group=self.group, dst=0)
        # One small gather after the decode, so the writing rank can report every rank's tiles, time and peak.
        lines = [None] * dist.get_world_size(self.group) if self.group_rank == 0 else None
        dist.gather_object(stats.summary(), lines, group=self.group, group_dst=0)
        self.decode_report = lines or []
        return None if frames is None else frames[0]


def build_runtime(args, job, env: Env, keep_text: bool) -> Runtime:
    from k5.engine.pipeline import Kandinsky5Pipeline

    dtype = DTYPES[args.dtype]
    if env.world == 1:
        pipe = Kandinsky5Pipeline.from_pretrained(job.root, dtype=dtype, device=env.device, offload=args.offload)
        if not keep_text and args.offload != "none":
            pipe.text_after_encode = "release"  # one video: the encoders are never needed again
        rt = Runtime(pipe, job.dims, None, None, None, 0, 0, "")
    else:
        from k5.parallel.cfg import setup_parallel

        d = job.dims
        s = setup_parallel(job.root, tp=d.tp, cfg_parallel=d.cfg == 2, dp=d.dp, ulysses=d.ulysses, ring=d.ring,
                           dtype=dtype, device=env.device, keep_text=keep_text)
        item_size = s.dims.world_size // s.dims.dp
        group = s.dims.group("item") if item_size > 1 else None
        rt = Runtime(s.pipeline, s.dims, s.guided, s.stats, group, s.dims.rank("item"), s.dims.rank("dp"),
                     s.describe())
    rt.pipe.dit.set_attention(args.attention, args.nabla_threshold)
    from k5.engine.fastpath import setup_fast_path

    requests = [job.request] if job.items is None else [item.request for item in job.items]
    shapes = {(r.num_frames, r.height, r.width) for r in requests}
    rt.fast = setup_fast_path(rt.pipe.dit, env.device, args.compile, args.attention_backend, len(shapes))
    return rt

# =====================================================================================================================


@dataclass
class Job:
    root: Path
    cfg: object  # DiTConfig
    nabla: bool
    dims: object  # ParallelDims (no mesh yet)
    request: object = None  # single video: the Request
    items: list | None = None  # batch job: the prompt file's items
    settings: dict | None = None  # batch job: what a resumed job must repeat


def validate(args, env: Env) -> Job:
    """Everything that can be checked without loading a weight; raises ValueError (or OSError) with the message."""
    from k5.engine.pipeline import Kandinsky5Pipeline, Request, check_request
    from k5.launch.outputs import refuse_existing

    if args.model == "tiny":
        from k5.engine.tiny import tiny_checkpoint

        attention = "nabla" if args.attention == "nabla" else "regular"
        root = tiny_checkpoint(attention=attention)  # cached; built aside and renamed, safe under torchrun
    else:
        root = Path(args.model)
    cfg = Kandinsky5Pipeline.read_config(root)
    nabla = args.attention == "nabla" or (args.attention == "auto" and cfg.uses_nabla)
    dims = plan_dims(args, cfg, env.world)

    def check(req):
        check_request(req, cfg, nabla)
        check_parallel_request(args, req)

    defaults = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                    num_frames=args.num_frames, steps=args.steps, guidance_scale=args.guidance_scale,
                    shift=args.shift, seed=args.seed, image=args.image)
    if args.output_dir is None:
        if dims.dp > 1:
            raise ValueError(f"--dp-degree {dims.dp}: one video runs on one group of ranks; data parallelism over "
                             f"items needs a batch job (--prompts FILE --output-dir DIR), or use --dp-degree 1")
        req = Request(prompt=args.prompt, **{k: v for k, v in defaults.items() if v is not None})
        check(req)
        refuse_existing(args.output, args.save_latents, args.save_frames)
        return Job(root, cfg, nabla, dims, request=req)

    from k5.launch.batch import check_resume
    from k5.launch.prompts import read_prompts, single_item

    try:
        check(Request(prompt="(the command line's defaults)", **{k: v for k, v in defaults.items() if v is not None}))
    except ValueError as e:
        raise ValueError(f"the command-line defaults for the items: {e}") from None
    if args.prompts is not None:
        items = read_prompts(args.prompts, defaults, check)
    else:
        items = [single_item(Request(prompt=args.prompt, **{k: v for k, v in defaults.items() if v is not None}))]
        check(items[0].request)
    model = "tiny" if args.model == "tiny" else str(Path(args.model).resolve())
    settings = {"model": model, "dtype": args.dtype, "attention": args.attention,
                "nabla_threshold": args.nabla_threshold, "save_latents": args.save_latents is True}
    check_resume(items, Path(args.output_dir), settings)
    return Job(root, cfg, nabla, dims, items=items, settings=settings)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        env = detect_env(args)
    except ValueError as e:  # e.g. --device cuda on a machine without CUDA: before anything loads
        fail(str(e), show=int(os.environ.get("RANK", "0")) == 0)
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    try:
        job = validate(args, env)
        env.estimate = check_memory(args, env, job)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # Every rank checks the same inputs and ends; only rank 0 says why, so the terminal shows it once.
        fail(str(e), show=env.rank == 0)
    return run(args, env, job)


def check_memory(args, env: Env, job: Job):
    """The pre-load estimate of this rank's peak; raises ValueError for a run that cannot fit the device."""
    from k5.engine.memory import Shape, check_memory as estimate_and_check

    requests = [job.request] if job.items is None else [item.request for item in job.items]
    shapes = sorted({Shape(r.num_frames, r.height, r.width) for r in requests}, key=lambda s: (s.frames, s.height,
                                                                                                  s.width))
    d = job.dims
    return estimate_and_check(job.root, job.cfg, shapes, DTYPES[args.dtype], env.device, args.offload, job.nabla,
                              sp=d.sp_size, ulysses=d.ulysses, ring=d.ring, tp=d.tp)


def run(args, env: Env, job: Job) -> int:
    batch = job.items is not None
    if env.world > 1:
        init_distributed(args.timeout, env.device)
    logs = Logs(env.rank, Path(args.output_dir) / "logs" if batch else None)
    signals = StopSignals()
    signals.install()
    sup = None
    try:
        sup = Supervisor(env.rank, env.world, args.timeout, logs, signals, env.device)
        code = run_batch(args, env, job, sup) if batch else run_single(args, env, job, sup)
    except Exception as e:
        if sup is not None and env.world > 1:
            sup.fail(e)  # tells the other ranks and ends this process
        logs.log.error("error: %s", exception_text(e), exc_info=e)
        code = EXIT_FAILED
    finally:
        signals.restore()
        if sup is not None:
            sup.close()
        logs.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


def run_single(args, env: Env, job: Job, sup: Supervisor) -> int:
    from tqdm import tqdm

    log, lead, req = sup.log, env.rank == 0, job.request
    t_start = time.perf_counter()
    rt = build_runtime(args, job, env, keep_text=False)
    if rt.describe:
        log.info(rt.describe)
    sup.begin_item(0, "the prompt")
    bar = tqdm(total=req.steps, desc="denoising", disable=not lead, file=sys.stderr)

    def on_step(i: int) -> None:
        bar.update(1)
        sup.step(i)

    try:
        result = rt.generate(req, on_step)
        if sup.agree_stop():
            raise Stopped()
    except Stopped:
        bar.close()
        log.info("stopped by %s before the video was finished; nothing was written", sup.signals.name)
        code = sup.stopped()
        sup.finish()
        return code
    bar.close()
    if result.truncated:
        log.warning("warning: the prompt is longer than the 256-token text budget and was truncated")

    t_decode = time.perf_counter()
    frames = rt.decode(result.latents) if (args.output or args.save_frames) else None
    decode_s = time.perf_counter() - t_decode

    if lead:
        from k5.engine.video import write_mp4
        from k5.launch.outputs import save_tensors

        if args.save_latents:
            save_tensors(args.save_latents, {"latents": result.latents})
        if args.save_frames:
            save_tensors(args.save_frames, {"frames": frames})
        if args.output:
            write_mp4(frames, args.output, fps=24)
        total = time.perf_counter() - t_start
        line = (f"done: {req.steps} steps, {result.timings['step_s']:.3f} s/step, decode {decode_s:.2f} s, "
                f"total {total:.1f} s, {peak_memory(env.device, rt, env)}")
        if rt.stats is not None:
            line += f", sent per denoising step: {comm_summary(rt.stats)}"
        log.info(line)
        for decode_line in rt.decode_report:
            log.info(decode_line)
    sup.finish()
    return 0


class Progress:
    """Rank 0's terminal: a bar over the job's items (all dp groups) and one over the current item's steps.

    Only on a terminal: redirected to a file (a Slurm output file) the per-item log lines say the same without a
    carriage-return redraw per step."""

    def __init__(self, items: int, enabled: bool):
        from tqdm import tqdm

        disable = None if enabled else True  # None: tqdm shows the bar only if stderr is a terminal
        self.items = tqdm(total=items, desc="items", unit="item", position=0, disable=disable, file=sys.stderr)
        self.steps = tqdm(total=1, desc="steps", unit="step", position=1, leave=False, disable=disable,
                          file=sys.stderr)

    def step(self, item, i: int) -> None:
        if i == 0:
            self.steps.reset(total=item.request.steps)
        self.steps.update(1)

    def set_items(self, n: int) -> None:
        if n != self.items.n:
            self.items.n = n
            self.items.refresh()

    def close(self) -> None:
        self.steps.close()
        self.items.close()


def _wait_for_plan(sup: Supervisor) -> dict:
    while (plan := sup.channel.poll("plan")) is None:
        time.sleep(POLL_S / 2)  # rank 0 may be verifying many files; the watchdog ends this if rank 0 dies
    return plan


def run_batch(args, env: Env, job: Job, sup: Supervisor) -> int:
    from k5.launch.batch import JobLock, Worker, deal, prepare, run_items

    log, out_dir, items = sup.log, Path(args.output_dir), job.items
    t_start = time.perf_counter()
    # The plan: rank 0 cleans and verifies under the job lock; every rank gets the list of remaining items.
    lock = None
    if env.rank == 0:
        try:
            lock = JobLock(out_dir).acquire()
            plan = prepare(items, out_dir, job.settings, args.verify)
            for note in plan.notes:
                log.info(note)
            plan = {"pending": plan.pending, "finished": plan.finished}
        except ValueError as e:
            plan = {"error": str(e)}
        if sup.channel is not None:
            sup.channel.put("plan", plan)
    else:
        plan = _wait_for_plan(sup)
    try:
        if "error" in plan:
            if env.rank == 0:
                log.error("error: %s", plan["error"])
            sup.finish()
            return EXIT_USAGE
        pending = plan["pending"]
        source = args.prompts or "--prompt"
        if not pending:
            log.info("nothing to do: all %d item(s) of %s are finished in %s", len(items), source, out_dir)
            sup.finish()
            return 0
        log.info("%d of %d item(s) to do (%d finished before) -> %s", len(pending), len(items), plan["finished"],
                 out_dir)

        rt = build_runtime(args, job, env, keep_text=True)
        if rt.describe:
            log.info(rt.describe)
        sup.group = rt.group
        sup.group_size = 1 if rt.group is None else dist.get_world_size(rt.group)
        mine = [items[i] for i in deal(pending, rt.dims.dp, rt.dp_rank)]
        log.info("dp group %d of %d: %d item(s)", rt.dp_rank, rt.dims.dp, len(mine))

        progress = Progress(len(pending), enabled=env.rank == 0)
        if sup.channel is not None and env.rank == 0:
            sup.on_items_done = progress.set_items

        def on_item(item, record) -> None:
            if sup.channel is not None:
                sup.channel.counter("items_done", 1)
            else:
                progress.set_items(progress.items.n + 1)

        config = job.root / "transformer" / "config.json"
        record_base = {
            "checkpoint": {"model": job.settings["model"], "path": str(job.root),
                           "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file()
                           else None},
            "layout": {"world": env.world, **rt.dims.degrees, "dp_group": rt.dp_rank},
            "host": socket.gethostname(),
        }
        worker = Worker(generate=rt.generate, decode=rt.decode, leader=rt.group_rank == 0)
        finished, stopped = run_items(mine, worker, sup, out_dir, record_base, job.settings,
                                      on_step=progress.step, on_item=on_item)
        if stopped:
            sup.stopped()
        sup.finish()
        if sup.channel is not None and env.rank == 0:
            progress.set_items(sup.channel.counter("items_done"))
        progress.close()
        done = sup.channel.counter("items_done") if sup.channel is not None else finished
        if done == len(pending):
            line = (f"done: {done} item(s) -> {out_dir} ({plan['finished']} finished before), "
                    f"total {time.perf_counter() - t_start:.1f} s, {peak_memory(env.device, rt, env)}")
            if rt.stats is not None:
                line += f", sent per denoising step: {comm_summary(rt.stats)}"
            log.info(line)
            return 0
        log.info("stopped by %s: %d item(s) finished in this run, %d remain; run the same command again to resume",
                 sup.signals.name, done, len(pending) - done)
        return sup.signals.exit_code if sup.stop_requested else EXIT_FAILED
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
