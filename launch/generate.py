"""Generate videos and images with Kandinsky 5: one prompt, or a batch job over a prompt file that resumes where it
stopped. Video checkpoints make MP4 videos (t2v, i2v); Image Lite checkpoints make PNG images (t2i, i2i: an edit of
--image / the prompt file's 'image'), the task following the checkpoint (k5.launch.images).

    k5 generate --model M --prompt "a cat" --output cat.mp4
    k5 generate --model tiny-image --prompt "a cat" --output cat.png
    torchrun --nproc_per_node=8 -m k5 generate --model M --prompts prompts.jsonl --output-dir out/
    k5 generate --nproc-per-node 8 --model M ...    # checks the inputs once, then starts 8 workers

With several processes the degrees dp x cfg x ring x ulysses x tp multiply to the world size (one device mesh):
the visual tokens of every DiT forward are split over ring x ulysses, the weights over tp, the two guidance branches
over cfg, and whole items over dp. The VAE decode is split by tiles over the ranks that share an item; the first
of them writes the files.

Everything is checked before any weight loads: flags, every component of the checkpoint, every line of the prompt
file, the output names and folders, and that resuming into --output-dir would not mix settings. A bad input ends
with one message and exit code 2, and nothing is written. A single video and a batch job run through the same job
loop (k5.launch.job): the same stopping, failure handling, progress, checked writing and summary.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script (python/torchrun launch/generate.py): use the checkout it is in
    # Python put this script's folder first on sys.path, where launch/'s plain modules (logs, signals, watchdog, ...)
    # would shadow installed ones of the same name: take it out before anything else is imported. The checkout root
    # goes on instead: every folder in it is a namespace portion (no __init__.py), which a regular installed package
    # of the same name always wins over, so only k5 itself is found there.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from k5.launch.channel import exception_text
from k5.launch.logs import Logs
from k5.launch.signals import EXIT_FAILED, EXIT_USAGE, StopSignals
from k5.launch.supervisor import Supervisor, init_distributed

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def finite_float(text: str) -> float:
    """argparse type: a finite number (nan and inf run without an error but produce NaN latents or no guidance)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # Under torchrun every worker parses the same flags: only rank 0 shows the message, all exit 2.
        if os.environ.get("RANK", "0") == "0":
            self.print_usage(sys.stderr)
            print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a Hugging Face repo id from the local cache (kandinskylab/Kandinsky-5.0-...), a checkpoint "
                        "folder (diffusers layout), an original single-file .safetensors (with --variant), 'tiny' "
                        "(built-in random video model) or 'tiny-image' (built-in random Image Lite pair, t2i and "
                        "i2i); required")
    p.add_argument("--prompt", default=None, help="one prompt (or give --prompts FILE); default: none")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="batch job: .jsonl (one object per line), .csv with a header, or plain text (one prompt a "
                        "line); needs --output-dir; default: none")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="job folder: videos, manifest.jsonl, metrics.json, logs/; running the same command again "
                        "resumes; default: none (a single video goes to --output)")
    p.add_argument("--negative-prompt", default=None,
                   help="default: the reference negative prompt (video), empty (images, as the reference)")
    p.add_argument("--image", default=None,
                   help="video: the image to animate (i2v); Image Lite: the source image to edit (i2i); default: none "
                        "(text only)")
    p.add_argument("--task", choices=["t2v", "i2v", "t2i", "i2i"], default=None,
                   help="what to make where the checkpoint can do more than one (an I2I checkpoint also runs t2i); "
                        "default: the checkpoint's own (model_index.json or the variant), i2i/i2v with an image")
    p.add_argument("--height", type=int, default=None,
                   help="pixels; default: the variant's, else 512 (128 for --model tiny); images: the bucket (the "
                        "source image's for an edit, else 1024), other sizes snapped to the nearest bucket")
    p.add_argument("--width", type=int, default=None,
                   help="pixels; default: the variant's, else 768 (128 for --model tiny); images: as --height")
    p.add_argument("--num-frames", type=int, default=None,
                   help="4k+1 frames (video only); default: the variant's, else 121 (9 for --model tiny)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps; default: the variant's, else 50 (4 for --model tiny)")
    p.add_argument("--guidance-scale", type=finite_float, default=None,
                   help="CFG weight; 1 disables CFG (nocfg/distilled models); default: the variant's, else 5 "
                        "(images 3.5)")
    p.add_argument("--shift", type=finite_float, default=None,
                   help="schedule shift; default: the variant's, else the checkpoint's scheduler config, else 5 "
                        "(images 3)")
    p.add_argument("--seed", type=int, default=0, help="noise seed; in a batch job items default to seed + index; "
                                                       "default 0")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (fp32 for --model tiny)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda (= cuda:LOCAL_RANK) or cuda:N (one process a machine only; several ranks use "
                        "cuda); default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="regional torch.compile of the DiT blocks; default: on with CUDA, off on the CPU")
    p.add_argument("--attention-backend", choices=["auto", "cudnn", "flash", "efficient", "math"], default="auto",
                   help="CUDA kernel of dense attention (all return the lse the ring needs); auto: the fastest exact "
                        "one of the device (cuDNN on Hopper, else flash); default auto")
    p.add_argument("--offload", choices=["none", "text", "model"], default=None,
                   help="where weights wait while unused: text = the text encoders leave the GPU once the prompts "
                        "are encoded; model = every component sits in host memory and visits the GPU only while it "
                        "runs (e.g. Pro on one 80 GB GPU); default: text with CUDA, none on the CPU")
    p.add_argument("--output", default=None,
                   help="video path, .mp4 (H.264, 24 fps); for an Image Lite model an image path, .png; default: none "
                        "(no video or image is written)")
    p.add_argument("--save-latents", nargs="?", const=True, default=None, metavar="PATH",
                   help="final latents as .safetensors; in a job folder (no PATH) NAME.safetensors next to each "
                        "video; default: not saved")
    p.add_argument("--save-frames", default=None, metavar="PATH",
                   help="uint8 frames FxHxWx3 as .safetensors; default: not saved")
    p.add_argument("--metrics-json", default=None, metavar="PATH",
                   help="the run's summary as JSON (layout, stage and step times, DiT forwards, bytes sent, peak "
                        "memory); default: none (a job folder always gets DIR/metrics.json)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="LoRA adapter merged into the DiT weights (diffusers/peft safetensors file or folder; "
                        "repeatable; SCALE multiplies it, default 1); a prompt file's 'lora' field overrides it per "
                        "item; default: none")
    p.add_argument("--expand-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="rewrite each prompt with the text encoder's Qwen2.5-VL before encoding it, as the reference "
                        "does (the adapters' trigger phrases go first); default: on (off for --model tiny)")
    p.add_argument("--attention", choices=["auto", "dense", "nabla"], default="auto",
                   help="visual self-attention; auto follows the checkpoint config; default auto")
    p.add_argument("--nabla-threshold", type=finite_float, default=None, metavar="P",
                   help="override the NABLA CDF threshold P in (0, 1]; default: the checkpoint config's")
    p.add_argument("--ulysses-degree", type=int, default=None,
                   help="sequence parallel: attention heads split over this many ranks; default: as many as the "
                        "head count allows of what the other degrees leave")
    p.add_argument("--ring-degree", type=int, default=None,
                   help="sequence parallel: keys/values passed around a ring of this many ranks; default: what "
                        "the Ulysses degree leaves")
    p.add_argument("--tp-degree", type=int, default=1,
                   help="tensor parallel: heads and FFN split over this many ranks; default 1")
    p.add_argument("--cfg-parallel", action="store_true",
                   help="the conditional and unconditional passes on two halves of the ranks; default off")
    p.add_argument("--dp-degree", type=int, default=None,
                   help="data parallel over items (job folders); default: what ulysses x ring x tp x cfg leave of "
                        "the world when --ulysses-degree and --ring-degree are both given, else 1")
    p.add_argument("--timeout", type=finite_float, default=600.0, metavar="SECONDS",
                   help="a collective waiting longer fails the job; a failed, dead or stuck rank ends all ranks "
                        "within it; default 600")
    p.add_argument("--verify", choices=["checksum", "size"], default="checksum",
                   help="how a resumed job checks finished files against the manifest; default checksum")
    from k5.launch.model import add_flags

    add_flags(p)  # --variant, --list-variants, --magcache, --components
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="check the inputs once, then start N workers on this machine (torchrun --standalone); "
                        "default: run in this process (or as the torchrun worker it is)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    # Size, steps, guidance and shift: flag > variant > built-in, once the model is resolved (validate).
    from k5.engine.catalogue.resolve import TINY_MODELS

    tiny = args.model in TINY_MODELS
    for k, v in dict(dtype="fp32" if tiny else "bf16", expand_prompt=not tiny).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.nabla_threshold is not None and not 0 < args.nabla_threshold <= 1:
        p.error(f"--nabla-threshold {args.nabla_threshold} must be in (0, 1]")
    if args.timeout <= 0:
        p.error(f"--timeout {args.timeout:g} must be a positive number of seconds")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        p.error(f"--nproc-per-node {args.nproc_per_node} must be at least 1")
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
    """World, rank and device; raises ValueError for a device this machine does not have (before anything loads)."""
    from k5.engine.fastpath import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # The job's processes on this machine: torchrun's LOCAL_WORLD_SIZE (else the world), or the workers to start.
    ranks_here = max(int(os.environ.get("LOCAL_WORLD_SIZE", world)), args.nproc_per_node or 1)
    device = resolve_device(args.device, local_rank, ranks_here)
    # The fast path's defaults depend on the device: compiled and text encoders off the GPU with CUDA.
    if args.compile is None:
        args.compile = device.type == "cuda"
    if args.offload is None:
        args.offload = "text" if device.type == "cuda" else "none"
    if args.offload == "model" and max(world, args.nproc_per_node or 1) > 1:
        raise ValueError("--offload model runs one process; with several GPUs split the DiT with --tp-degree instead")
    return Env(world, rank, local_rank, device)


# =====================================================================================================================
# PARALLEL LAYOUT: k5.parallel.plan turns the degree flags into a ParallelDims (plan_parallel, before any weight) and
# builds the parallel pipeline on its mesh (build_parallel). The launcher builds no process group of its own: the
# group of ranks that work on one item is a flattened view of the one mesh.
# =====================================================================================================================

def plan_dims(args, cfg, world: int):
    """The degrees for the flags, checked against the world size and the model (LayoutError otherwise)."""
    from k5.parallel.plan import plan_parallel

    return plan_parallel(world, cfg, tp=args.tp_degree, cfg_parallel=args.cfg_parallel, dp=args.dp_degree,
                         ulysses=args.ulysses_degree, ring=args.ring_degree)


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
    device: torch.device = torch.device("cpu")
    decode_report: list = field(default_factory=list)  # per-rank lines of the last split decode (group rank 0)
    dit_forwards: int = 0  # DiT forwards that ran the visual blocks on this rank (counted by a forward hook)
    fast: object = None  # engine.fastpath.FastPath: attention kernel and compile watch
    estimate: object = None  # engine.memory.Estimate made before loading
    ratios: tuple | None = None  # --magcache: the variant's ratios (the step cache is a stage of the step chain)
    chain: list = field(default_factory=list)
    image: bool = False  # an Image Lite pipeline: images are decoded on the group's rank 0

    @property
    def group_size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)

    def forwards(self) -> int:
        return self.dit_forwards

    def comm_steps(self) -> list:
        """Bytes sent by collective, one record per denoising step so far (none on one process)."""
        return [] if self.stats is None else self.stats.steps

    def count_forwards(self) -> None:
        def hook(module, args):
            self.dit_forwards += 1

        # The first visual block: a forward that MagCache skips still calls the DiT (text blocks, output layer)
        # but not its visual blocks.
        self.pipe.dit.visual_transformer_blocks[0].register_forward_pre_hook(hook)

    def generate(self, req, on_step, prompt=None):
        def step(i):
            if self.stats is not None:
                self.stats.end_step()  # one record of bytes sent per denoising step
            on_step(i)

        from k5.launch.model import forwards

        result = self.pipe.generate(req, on_step=step, guided=self.guided, prompt=prompt, chain=self.chain)
        result.forwards = forwards(self.ratios, req)  # the whole item's, both branches: the plan decides them
        return result

    def switch_adapters(self, adapters) -> list[str]:
        """The DiT with ``adapters`` merged (every rank of the item group calls it; each re-reads its own slices of
        the base weights the old or new adapters touch, no communication). Returns the weights re-read."""
        if self.dims.world_size > 1:
            from k5.parallel.tensor import switch_dit_adapters

            return switch_dit_adapters(self.pipe.dit, self.pipe.checkpoint.dit, self.dims, adapters)
        from k5.engine.checkpoints.dit import switch_adapters

        return switch_adapters(self.pipe.dit, self.pipe.checkpoint.dit, adapters)

    def expand(self, req, reuse):
        """(the expansion of the request's prompt, the same on every rank of the item group; whether it was generated
        (True) or reused (False) on the rank that expands, None on the others)."""
        reused = []

        def ask():
            text = reuse()
            reused.append(text is not None)
            return text

        text = self.pipe.expand_prompt(req, reuse=ask)
        return text, (not reused[0]) if reused else None

    def decode(self, latents):
        """uint8 frames [F, H, W, 3] on the group's rank 0, None on the others."""
        if self.group is None:
            return self.pipe.decode(latents)
        if self.image:
            # One 2D image: the group's rank 0 decodes it whole (the FLUX VAE decodes a 1024-class image in well under
            # a second on a GPU; tiles and their exchange would cost more than they save). The others go on.
            return self.pipe.decode(latents) if self.group_rank == 0 else None
        from k5.parallel.vae_tiles import parallel_decode

        frames, stats = parallel_decode(self.pipe.vae.vae, latents, group=self.group, dst=0)
        # One small gather after the decode, so the writing rank can report every rank's tiles, time and peak.
        lines = [None] * dist.get_world_size(self.group) if self.group_rank == 0 else None
        dist.gather_object(stats.summary(), lines, group=self.group, group_dst=0)
        self.decode_report = lines or []
        return None if frames is None else frames[0]


def build_runtime(args, job, env: Env, keep_text: bool) -> Runtime:
    from k5.engine.fastpath import setup_fast_path
    from k5.parallel.plan import build_parallel

    # The resolved checkpoint: components from its root, the DiT from its folder or single file with the config
    # the variant gives it (a NABLA-trained file runs NABLA with the variant's P).
    s = build_parallel(job.weights, job.dims, dtype=DTYPES[args.dtype], device=env.device, keep_text=keep_text,
                       expand=job.expand, adapters=job.adapters, offload=args.offload, config=job.cfg)
    if env.world == 1 and not keep_text and args.offload != "none":
        s.pipeline.text_after_encode = "release"  # one video: the encoders are never needed again
    s.pipeline.dit.set_attention(args.attention, args.nabla_threshold)
    rt = Runtime(s.pipeline, s.dims, s.guided, s.stats, s.item_group, s.item_rank, s.dp_rank,
                 s.describe() if env.world > 1 else "", env.device, estimate=env.estimate, ratios=job.ratios,
                 image=job.image)
    if job.ratios is not None:
        from k5.engine.sampling.magcache import MagCache

        # After the guiding stage (Guidance, or CfgParallel: each cfg half follows its own branch's accumulator).
        rt.chain = [MagCache(job.ratios)]
    shapes = {(item.request.num_frames, item.request.height, item.request.width) for item in job.items}
    rt.fast = setup_fast_path(rt.pipe.dit, env.device, args.compile, args.attention_backend, len(shapes),
                              ring=s.dims.ring, attention_calls=attention_calls(rt, shapes))
    rt.count_forwards()
    return rt


def attention_calls(rt, shapes) -> list:
    """This rank's dense attention calls at the job's sizes, which the kernels are probed on before the first step:
    text self-attention and cross-attention (with and without the text mask: a prompt that fills the budget has
    none) and the visual self-attention unless NABLA runs it (a ring chunk's, masked where the sequence is padded)."""
    from k5.kernels.attention import AttentionCall
    from k5.parallel.layout import SequenceLayout

    cfg, d = rt.pipe.dit.config, rt.dims
    heads, text = cfg.num_heads // d.tp, 512 if rt.image else 256
    calls = []
    for frames, height, width in shapes:
        tokens = ((frames - 1) // 4 + 1) * ((height or 1024) // 16) * ((width or 1024) // 16)  # image: a 1024 bucket
        layout = SequenceLayout(tokens, d.sp_size)
        local = layout.shard_len if d.sp_size > 1 else tokens
        for masked in (False, True):
            calls += [AttentionCall(text, text, heads, masked), AttentionCall(local, text, heads, masked)]
        if rt.pipe.dit.nabla is None and d.sp_size == 1:
            calls.append(AttentionCall(tokens, tokens, heads))
        elif rt.pipe.dit.nabla is None:
            span = local * d.ulysses  # a ring chunk: one span's tokens after the all-to-all, the rank's heads
            calls += [AttentionCall(span, span, heads // d.ulysses, masked, lse=True)
                      for masked in ((False, True) if layout.pad else (False,))]
    return calls


@dataclass
class Job:
    root: Path
    cfg: object  # DiTConfig
    nabla: bool
    dims: object  # ParallelDims (no mesh yet)
    items: list  # the items (k5.launch.prompts.Item): one for a single video
    settings: dict  # what decides the outputs besides each request; a resumed job must repeat it
    dest: object  # k5.launch.job.OutputFiles or k5.launch.batch.JobFolder
    needs_frames: bool  # decode the latents (a video, an image or frames are written)
    adapters: tuple = ()  # --lora: merged at load (items with other adapters switch, k5.launch.job.prepare_item)
    expand: bool = False  # prompt expansion (loads Qwen's lm_head on the text-source ranks)
    resolved: object = None  # k5.engine.catalogue.resolve.Resolved: what --model / --variant name
    weights: object = None  # k5.engine.checkpoints.files.Checkpoint: its files listed and headers read, once
    ratios: tuple | None = None  # --magcache: the variant's MagCache ratios
    checkpoint: dict = field(default_factory=dict)  # the variant, its source, MagCache: for records and summary
    image: bool = False  # an Image Lite checkpoint (ImageRequest items, PNG images)


def validate(args, env: Env) -> Job:
    """Everything that can be checked without loading a weight; raises ValueError (or OSError) with the message."""
    from k5.engine.checkpoints.lora import AdapterOpener
    from k5.engine.checkpoints.qwen import check_lm_head
    from k5.engine.pipelines.image import check_image_checkpoint
    from k5.engine.pipelines.image_request import resolve as resolve_image
    from k5.engine.pipelines.video import Request, check_request
    from k5.launch import images
    from k5.launch.outputs import check_suffix, check_writable, folder_given, media_kind, refuse_existing
    from k5.launch.prompts import Item, check_image
    from k5.parallel.plan import check_request as check_layout_request

    # Names first: a wrong extension or an unwritable folder is known without reading the checkpoint (the main file
    # is a video or an image by its extension; whether the checkpoint makes that is checked once it is known).
    single = args.output_dir is None
    media = media_kind(args.output) if args.output is not None else "video"
    paths = {kind: Path(p) for kind, p in ((media, args.output), ("latents", args.save_latents),
                                            ("frames", args.save_frames)) if single and p is not None}
    flags = {media: "--output", "latents": "--save-latents", "frames": "--save-frames"}
    for kind, path in paths.items():
        check_suffix(kind, path, flags[kind])
    if args.image is not None:
        check_image(args.image, "--image")
    from k5.launch import model as model_flags

    # A repo id from the cache, a folder, a single file or a tiny model; the variant given or recognised, checked
    # against the weights' shapes (a tiny model is built once and cached, safe under torchrun).
    resolved = model_flags.resolve(args, tiny_task=images.tiny_task(args))
    root = resolved.root
    # Every weight file of every component listed and its header read, once for the whole run.
    weights = resolved.open()
    image_model = weights.image  # Image Lite: the FLUX VAE
    images.check_family(args, image_model)  # the other family's settings, before any default is filled in
    if image_model and args.output is not None and media != "image":
        check_suffix("image", args.output, "--output")  # an Image Lite model writes a PNG: the message says so
    cfg = resolved.config  # the variant's attention applied
    if image_model:
        check_image_checkpoint(weights, cfg)
    ratios = model_flags.magcache_ratios(args, resolved)
    # flag > variant > built-in (the family's), for the request and the items
    model_flags.request_defaults(args, resolved, images.IMAGE_BUILT_IN if image_model else model_flags.BUILT_IN)
    nabla = args.attention == "nabla" or (args.attention == "auto" and cfg.uses_nabla)
    if nabla and env.device.type == "cuda":
        from k5.kernels.flex import check_compiled_flex

        check_compiled_flex()  # NABLA runs flex on CUDA: with dynamo off it would compute dense attention
    dims = plan_dims(args, cfg, env.world)
    open_adapter = AdapterOpener(cfg)  # headers and sha256 of each LoRA file once, checked against the DiT
    adapters = tuple(open_adapter(spec) for spec in args.lora)
    if args.expand_prompt:
        check_lm_head(weights)

    def check(req, settings_only: bool = False):
        """The request as it will run (images: resolved), or ValueError; ``settings_only``: the command line's
        defaults for a prompt file's items, whose lines bring their own images."""
        if image_model:
            req = resolve_image(req, cfg)  # the task, the bucket (a size snapped with a note), the source image
        else:
            check_request(req, cfg, nabla)
            if not settings_only:
                images.check_video_task(args.task, req)
        check_layout_request(dims, req.guidance_scale)
        return req

    defaults = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                    num_frames=args.num_frames, steps=args.steps, guidance_scale=args.guidance_scale,
                    shift=args.shift, seed=args.seed, image=args.image)
    make = Request
    if image_model:
        defaults.pop("num_frames")  # one frame; a video setting was refused above
        defaults["task"] = args.task  # None: an edit with a source image, else the checkpoint's own task
        make = images.image_request
    media = "image" if image_model else "video"
    if resolved.kind == "tiny":
        model = args.model if args.model == "tiny" else f"{args.model}/{resolved.task}"  # one checkpoint per task
    elif resolved.repo is not None:
        model = f"{resolved.repo}@{resolved.revision}"  # another revision is other weights
    else:
        model = str(Path(args.model).resolve())
    # What decides a job folder's files besides each request (a resume must repeat it); for a single video, the
    # summary's record of the run. The variant decides the attention of a single file; step_cache None (absent in
    # older manifests) is no step skipping.
    settings = {"model": model, "dtype": args.dtype, "attention": args.attention,
                "nabla_threshold": args.nabla_threshold, "save_latents": args.save_latents is True,
                "variant": resolved.variant.name if resolved.variant else None,
                "step_cache": "magcache" if ratios is not None else None}
    if args.expand_prompt:  # absent when off, so job folders made before expansion existed still resume
        settings["expand_prompt"] = True
    found = dict(resolved=resolved, weights=weights, ratios=ratios, checkpoint=model_flags.describe(resolved, ratios),
                 image=image_model)
    extra = [(Path(args.metrics_json), "--metrics-json")] if args.metrics_json else []
    for path, flag in extra:
        if path.is_dir():
            raise ValueError(folder_given(path, flag, {"metrics.json": "the summary"}))
    if single:
        from k5.launch.job import OutputFiles

        if dims.dp > 1:
            raise ValueError(f"--dp-degree {dims.dp}: one video runs on one group of ranks; data parallelism over "
                             f"items needs a batch job (--prompts FILE --output-dir DIR), or use --dp-degree 1")
        req = check(make(prompt=args.prompt, **{k: v for k, v in defaults.items() if v is not None}))
        refuse_existing(*paths.values(), *(p for p, _ in extra))
        for kind, path in paths.items():
            check_writable(path, flags[kind])
        for path, flag in extra:
            check_writable(path, flag)
        name = str(paths.get(media) or paths.get("latents") or paths.get("frames"))
        item = Item(0, 0, "--prompt", req, name, adapters)
        note_changes([item], env)
        return Job(root, cfg, nabla, dims, [item], settings, OutputFiles(paths),
                   needs_frames=media in paths or "frames" in paths, adapters=adapters, expand=args.expand_prompt,
                   **found)

    from k5.launch.batch import JobFolder, check_resume
    from k5.launch.prompts import read_prompts, single_item

    try:
        given = {k: v for k, v in defaults.items() if v is not None}
        if image_model and args.image is None:
            given["task"] = "t2i"  # the settings alone: an edit's lines bring their own source images
        check(make(prompt="(the command line's defaults)", **given), settings_only=True)
    except ValueError as e:
        raise ValueError(f"the command-line defaults for the items: {e}") from None
    if args.prompts is not None:
        items = read_prompts(args.prompts, defaults, check, adapters,
                             lambda spec, folder: open_adapter(spec, folder, "'lora'"), make=make, kind=media)
    else:
        request = check(make(prompt=args.prompt, **{k: v for k, v in defaults.items() if v is not None}))
        items = [replace(single_item(request, kind=media), adapters=adapters)]
    note_changes(items, env)
    out_dir = Path(args.output_dir)
    check_resume(items, out_dir, settings)
    check_writable(out_dir, "--output-dir", folder=True)
    refuse_existing(*(p for p, _ in extra))
    for path, flag in extra:
        check_writable(path, flag)
    return Job(root, cfg, nabla, dims, items, settings, JobFolder(out_dir, settings, args.verify), needs_frames=True,
               adapters=adapters, expand=args.expand_prompt, **found)


def note_changes(items: list, env: Env) -> None:
    """Rank 0 says what resolving the requests changed (an image size snapped to the nearest bucket)."""
    from k5.launch.images import describe_notes

    if env.rank == 0:
        for item in items:
            for line in describe_notes(item):
                print(f"note: {line}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    launching = args.nproc_per_node is not None and "LOCAL_RANK" not in os.environ
    try:
        env = detect_env(args)
    except ValueError as e:  # e.g. --device cuda on a machine without CUDA: before anything loads
        fail(str(e), show=int(os.environ.get("RANK", "0")) == 0)
    if launching:
        env = Env(args.nproc_per_node, 0, 0, env.device)
    if env.device.type == "cuda" and not launching:
        torch.cuda.set_device(env.device)
    try:
        job = validate(args, env)
        # A launcher on GPUs leaves the memory check to its workers: the free memory of a GPU is known only through a
        # CUDA context, and this process's would hold about 0.5 GiB of GPU 0 for the whole job. Each worker checks its
        # own GPU and refuses (exit 2, which the launcher returns) before any weight loads.
        if not (launching and env.device.type == "cuda"):
            env.estimate = check_memory(args, env, job)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # Every rank checks the same inputs and ends; only rank 0 says why, so the terminal shows it once.
        fail(str(e), show=env.rank == 0)
    if launching:
        from k5.launch.workers import start_workers

        return start_workers(args.nproc_per_node, sys.argv if argv is None else [sys.argv[0], *argv])
    return run(args, env, job)


def check_memory(args, env: Env, job: Job):
    """The pre-load estimate of this rank's peak; raises ValueError for a run that cannot fit the device."""
    from k5.engine.memory import Shape, check_memory as estimate_and_check

    shapes = sorted({Shape(it.request.num_frames, it.request.height, it.request.width) for it in job.items},
                    key=lambda s: (s.frames, s.height, s.width))
    d = job.dims
    # The vision tower loads for an image prompt: an edit's source, or an I2V/I2I item's image when it is expanded.
    vision = any(it.request.image for it in job.items) and (job.image or job.expand)
    # Several items on several ranks: the text source keeps its encoders on the device (run_job's keep_text; the
    # items already finished are known only later, so all of them count here).
    return estimate_and_check(job.weights, job.cfg, shapes, DTYPES[args.dtype], env.device, args.offload, job.nabla,
                              lm_head=job.expand, vision=vision, sp=d.sp_size, ulysses=d.ulysses, ring=d.ring,
                              tp=d.tp, cfg_degree=d.cfg, dp=d.dp, keep_text=len(job.items) > 1)


def run(args, env: Env, job: Job) -> int:
    from k5.launch.job import run_job

    if env.world > 1:
        init_distributed(args.timeout, env.device)
    logs = Logs(env.rank, job.dest.log_dir)
    signals = StopSignals()
    signals.install()
    sup = None
    written: list[str] = []
    t_start = time.perf_counter()
    try:
        sup = Supervisor(env.rank, env.world, args.timeout, logs, signals, env.device)
        sup.written_note = lambda: written_note(job, written, sup.job_items_done())
        result = run_job(job, sup, env.rank, lambda keep_text: build_runtime(args, job, env, keep_text), written)
        if env.rank == 0:
            report_end(args, job, result, time.perf_counter() - t_start, written)
        code = result.code
    except Exception as e:
        if sup is not None and env.world > 1:
            sup.fail(e)  # tells the other ranks and ends this process
        logs.log.error("error: %s", exception_text(e), exc_info=e)
        logs.log.error(written_note(job, written, 0 if sup is None else sup.job_items_done()))
        code = EXIT_FAILED
    finally:
        signals.restore()
        if sup is not None:
            sup.close()
        job.dest.close()
        logs.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


def written_note(job: Job, written: list[str], items_done: int) -> str:
    """The last line of a failed run: what it wrote before it failed (finished files are kept)."""
    out_dir = getattr(job.dest, "out_dir", None)
    if out_dir is not None:
        return (f"{items_done} item(s) finished in this run; every finished item stays in {out_dir}; run the same "
                f"command again to resume")
    return f"written before the failure (kept): {', '.join(written)}" if written else "nothing was written"


def report_end(args, job: Job, result, wall_s: float, written: list[str]) -> None:
    """Rank 0: the summary line, the metrics JSON, and the last line, which names the files written."""
    import logging

    from k5.launch.job import last_line
    from k5.launch.logs import LOGGER
    from k5.launch.metrics import format_bytes, summary, write_json

    log = logging.getLogger(LOGGER)
    rt, outcome = result.runtime, result.outcome
    metrics_files = []
    if outcome is not None and outcome.reports is not None and result.status in ("done", "stopped"):
        dims = rt.dims if rt is not None else job.dims  # stopped before loading: the planned layout
        layout = {"world": dims.world_size, **dims.degrees}
        files = written + [str(p) for p in (args.metrics_json, job.dest.metrics_path) if p]
        doc = summary(args=args, job=job, layout=layout, plan=result.plan, outcome=outcome, status=result.status,
                      exit_code=result.code, wall_s=wall_s, files=files)
        items = doc["per_item"]
        if result.status == "done" and items:
            steps = [s for it in items for s in it["step_s"]]
            peak = max((r["peak_memory"]["bytes"] for r in doc["ranks"] if r.get("peak_memory")), default=None)
            fw = doc["dit_forwards"]
            line = (f"summary: {len(items)} item(s) in {wall_s:.1f} s, {sum(steps) / len(steps):.3f} s/step, "
                    f"decode {doc['times']['stages']['decode_s']:.2f} s, peak memory {format_bytes(peak)} "
                    f"(highest rank), variant {doc['variant'] or 'none'}, DiT forwards {fw['run']} run, "
                    f"{fw['skipped']} skipped" + (" (MagCache)" if doc["magcache"] else ""))
            rank0 = next((r for r in doc["ranks"] if r["rank"] == 0 and r.get("compile")), None)
            if rank0 is not None:
                from k5.engine.fastpath import format_summary

                line += "; rank 0: " + format_summary(rank0)
            if rt.stats is not None:
                line += f", sent per denoising step: {comm_summary(rt.stats)}"
            log.info(line)
            for decode_line in rt.decode_report:
                log.info(decode_line)
        for path in (job.dest.metrics_path, args.metrics_json):
            if path:
                write_json(path, doc)
                metrics_files.append(str(path))
    line = last_line(job, result)
    if metrics_files and result.status == "done":
        line += f"; metrics: {', '.join(metrics_files)}"
    log.info(line)


if __name__ == "__main__":
    sys.exit(main())
