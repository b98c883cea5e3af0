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
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from k5.launch.env import DTYPES, Env, detect_env
from k5.launch.signals import EXIT_USAGE



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
                        "(built-in random video model), 'tiny-image' (built-in random Image Lite pair, t2i and "
                        "i2i) or 'tiny-k6' / 'tiny-k6-distill' (built-in random Kandinsky 6, video with audio); "
                        "required")
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
    from k5.launch import k6

    k6.add_flags(p)  # --no-audio, --upscale
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
    args.expand_prompt_given = args.expand_prompt is not None  # Kandinsky 6 refuses it given, ignores the default
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
class Job:
    root: Path
    cfg: object  # DiTConfig
    nabla: bool
    dims: object  # ParallelDims (no mesh yet)
    items: list  # the items (k5.launch.prompts.Item): one for a single video
    settings: dict  # what decides the outputs besides each request; a resumed job must repeat it
    dest: object  # a k5.launch.destination.Destination: OutputFiles or k5.launch.batch.JobFolder
    needs_frames: bool  # decode the latents (a video, an image or frames are written)
    adapters: tuple = ()  # --lora: merged at load (items with other adapters switch, k5.launch.job.prepare_item)
    expand: bool = False  # prompt expansion (loads Qwen's lm_head on the text-source ranks)
    resolved: object = None  # k5.engine.catalogue.resolve.Resolved: what --model / --variant name
    weights: object = None  # k5.engine.checkpoints.files.Checkpoint: its files listed and headers read, once
    ratios: tuple | None = None  # --magcache: the variant's MagCache ratios
    checkpoint: dict = field(default_factory=dict)  # the variant, its source, MagCache: for records and summary
    image: bool = False  # an Image Lite checkpoint (ImageRequest items, PNG images)
    k6: bool = False  # a Kandinsky 6 checkpoint (video with audio, k5.launch.k6)
    audio: bool = False  # Kandinsky 6: sample and write the audio track (not --no-audio)
    upscale: str | None = None  # Kandinsky 6 --upscale: the SR stage's target
    sr_root: Path | None = None  # its super-resolution checkpoint folder


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
    from k5.launch import k6 as k6_flags

    k6 = resolved.k6
    sr_root = None
    if k6:
        k6_flags.check_flags(args, resolved)
        sr_root = k6_flags.sr_checkpoint(args, resolved)
        if media != "video":
            check_suffix("video", args.output, "--output")  # Kandinsky 6 writes an MP4: the message says so
    else:
        k6_flags.refuse_on_k5(args, args.model)
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
    if k6:
        from k5.parallel.k6 import check_tensor_parallel

        check_tensor_parallel(cfg, dims.tp)  # both streams' heads and FFN widths cut into tp parts
    open_adapter = AdapterOpener(cfg)  # headers and sha256 of each LoRA file once, checked against the DiT
    adapters = tuple(open_adapter(spec) for spec in args.lora)
    if args.expand_prompt:
        check_lm_head(weights)

    def check(req, settings_only: bool = False):
        """The request as it will run (images: resolved), or ValueError; ``settings_only``: the command line's
        defaults for a prompt file's items, whose lines bring their own images."""
        if image_model:
            req = resolve_image(req, cfg)  # the task, the bucket (a size snapped with a note), the source image
        elif k6:
            from k5.engine.pipelines.k6 import check_request as check_k6_request, check_schedule

            check_k6_request(req, cfg, nabla)
            check_schedule(root, req.guidance_scale)  # a PiFlow checkpoint samples at guidance 1
            if sr_root is not None:
                k6_flags.check_upscale(sr_root, req, args.upscale)  # the video fits the SR model's tiles
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
    if k6:  # absent for Kandinsky 5, so their job folders still resume
        settings.update(k6_flags.settings(args))
    found = dict(resolved=resolved, weights=weights, ratios=ratios, checkpoint=model_flags.describe(resolved, ratios),
                 image=image_model, k6=k6, audio=k6 and not args.no_audio, upscale=args.upscale if k6 else None,
                 sr_root=sr_root)
    extra = [(Path(args.metrics_json), "--metrics-json")] if args.metrics_json else []
    for path, flag in extra:
        if path.is_dir():
            raise ValueError(folder_given(path, flag, {"metrics.json": "the summary"}))
    if single:
        from k5.launch.destination import OutputFiles

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
    from k5.launch.job import run_command

    return run_command(args, env, job)


def check_memory(args, env: Env, job: Job):
    """The pre-load estimate of this rank's peak; raises ValueError for a run that cannot fit the device."""
    from k5.parallel.memory import Shape, check_memory as estimate_and_check

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


if __name__ == "__main__":
    sys.exit(main())
