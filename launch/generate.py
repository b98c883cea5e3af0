"""Generate a video with Kandinsky 5: `python launch/generate.py ...` or `torchrun --nproc_per_node=N launch/generate.py ...`.

With several processes the visual tokens of every DiT forward are split across them (Ulysses x ring sequence
parallelism on one device mesh) and the VAE decode is split by tiles; rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder (diffusers layout) or 'tiny' (built-in random model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None, help="default: the reference negative prompt")
    p.add_argument("--image", default=None, help="conditioning image for image-to-video")
    p.add_argument("--height", type=int, default=None, help="pixels (default 512; 128 for --model tiny)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 768; 128 for --model tiny)")
    p.add_argument("--num-frames", type=int, default=None, help="4k+1 frames (default 121; 9 for --model tiny)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; 4 for --model tiny)")
    p.add_argument("--guidance-scale", type=float, default=5.0, help="1 disables CFG (nocfg/distilled models)")
    p.add_argument("--shift", type=float, default=None, help="schedule shift (default: scheduler config, else 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (fp32 for --model tiny)")
    p.add_argument("--device", default=None, help="default cuda:LOCAL_RANK if CUDA is available, else cpu")
    p.add_argument("--output", default=None, help="MP4 path (H.264, 24 fps); omitted: no video is written")
    p.add_argument("--save-latents", default=None, metavar="PATH", help="final latents as safetensors")
    p.add_argument("--save-frames", default=None, metavar="PATH", help="uint8 frames TxHxWx3 as safetensors")
    p.add_argument("--attention", choices=["auto", "dense", "nabla"], default="auto",
                   help="visual self-attention; auto follows the checkpoint config")
    p.add_argument("--nabla-threshold", type=float, default=None, metavar="P", help="override the NABLA CDF threshold P")
    p.add_argument("--ulysses-degree", type=int, default=None)
    p.add_argument("--ring-degree", type=int, default=None)
    args = p.parse_args(argv)
    tiny = args.model == "tiny"
    defaults = dict(height=128 if tiny else 512, width=128 if tiny else 768, num_frames=9 if tiny else 121,
                    steps=4 if tiny else 50, dtype="fp32" if tiny else "bf16")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.nabla_threshold is not None and not 0 < args.nabla_threshold <= 1:
        p.error(f"--nabla-threshold {args.nabla_threshold} must be in (0, 1]")
    if not (args.output or args.save_latents or args.save_frames):
        p.error("nothing to write: give --output and/or --save-latents / --save-frames")
    return args


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    lead = rank == 0
    t_start = time.perf_counter()

    from k5.engine.pipeline import Kandinsky5Pipeline, Request, check_request
    from k5.launch.outputs import refuse_existing, save_tensors

    try:
        if args.model == "tiny":
            from k5.engine.tiny import tiny_checkpoint

            attention = "nabla" if args.attention == "nabla" else "regular"
            root = tiny_checkpoint(attention=attention)  # cached; built aside and renamed, safe under torchrun
        else:
            root = Path(args.model)
        cfg = Kandinsky5Pipeline.read_config(root)
        nabla = args.attention == "nabla" or (args.attention == "auto" and cfg.uses_nabla)
        req = Request(prompt=args.prompt, height=args.height, width=args.width, num_frames=args.num_frames,
                      steps=args.steps, guidance_scale=args.guidance_scale, shift=args.shift, seed=args.seed,
                      image=args.image)
        if args.negative_prompt is not None:
            req.negative_prompt = args.negative_prompt
        check_request(req, cfg, nabla)
        refuse_existing(args.output, args.save_latents, args.save_frames)
        layout = None
        if world > 1:
            from k5.parallel.sequence import plan_layout

            layout = plan_layout(world, cfg.num_heads, args.ulysses_degree, args.ring_degree)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        fail(str(e))

    pipe = Kandinsky5Pipeline.from_pretrained(root, dtype=DTYPES[args.dtype], device=device)
    pipe.dit.set_attention(args.attention, args.nabla_threshold)
    stats = None
    if layout is not None:
        from k5.parallel.sequence import apply_sequence_parallel

        layout.build_mesh(device.type)
        stats = apply_sequence_parallel(pipe.dit, layout)

    from tqdm import tqdm

    bar = tqdm(total=req.steps, desc="denoising", disable=not lead, file=sys.stderr)
    def on_step(i):
        bar.update(1)
        if stats is not None:
            stats.end_step()  # one record of bytes sent per denoising step

    result = pipe.generate(req, on_step=on_step)
    bar.close()
    if result.truncated and lead:
        print("warning: the prompt is longer than the 256-token text budget and was truncated", file=sys.stderr)

    t_decode = time.perf_counter()
    frames = None
    if args.output or args.save_frames:
        if world > 1:
            from k5.parallel.vae_tiles import parallel_decode

            frames, _ = parallel_decode(pipe.vae.vae, result.latents, group=None, dst=0)
            frames = None if frames is None else frames[0]
        else:
            frames = pipe.decode(result.latents)
    decode_s = time.perf_counter() - t_decode

    if lead:
        from k5.engine.video import write_mp4

        if args.save_latents:
            save_tensors(args.save_latents, {"latents": result.latents})
        if args.save_frames:
            save_tensors(args.save_frames, {"frames": frames})
        if args.output:
            write_mp4(frames, args.output, fps=24)
        total = time.perf_counter() - t_start
        line = (f"done: {req.steps} steps, {result.timings['step_s']:.3f} s/step, decode {decode_s:.2f} s, "
                f"total {total:.1f} s, peak memory {peak_memory(device)}")
        if stats is not None:
            per_step = stats.steps[-1]
            line += ", sent per step: " + "; ".join(
                f"{kind} {v['bytes'] / 2**20:.3f} MiB in {v['calls']} calls" for kind, v in per_step.items())
        print(line, file=sys.stderr)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
