"""The generate command's Kandinsky 6 part: its flags and the checks that run before any weight loads.

Kandinsky 6 (engine/pipelines/k6.py) runs through the same validate, Job, Engine and job loop as Kandinsky 5; what
differs is checked here: the video carries an AAC audio track unless ``--no-audio``; ``--upscale`` adds the
super-resolution stage (engine/pipelines/k6_sr.py; its checkpoint found here); the Kandinsky 5 features that
have no Kandinsky 6 counterpart yet (LoRA, MagCache, prompt expansion, --offload model, --task) are refused with one
message; the Kandinsky 6 flags are refused on a Kandinsky 5 model.
"""

from __future__ import annotations

import argparse
import functools

from k5.engine.catalogue.k6_variants import K6_VARIANTS, K6Variant

UPSCALE_TARGETS = ("1080p",)
SR_REPO = "kandinskylab/Kandinsky-6.0-VSR-distilled2steps-5s-Diffusers"


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Kandinsky 6 (video with audio)")
    g.add_argument("--no-audio", action="store_true",
                   help="Kandinsky 6: sample the video alone and write it without an audio track (as diffusers' "
                        "sample_audio=False: the DiT's audio stream does not run, so the video is not the one a run "
                        "with audio gives); default: off (the MP4 has an AAC track)")
    g.add_argument("--upscale", choices=UPSCALE_TARGETS, default=None,
                   help="Kandinsky 6: run the super-resolution stage on the video, 2.25x (480x864 -> 1080x1944): "
                        "its tiles dealt over the item's ranks, each rank decoding its own; default: none")
    g.add_argument("--upscale-model", default=None, metavar="DIR|REPO",
                   help="the super-resolution checkpoint (a Kandinsky-6.0-VSR-*-Diffusers folder or cached repo id); "
                        f"default: {SR_REPO} from the Hugging Face cache (the tiny SR model for --model tiny-k6*)")


def refuse_on_k5(args, model: str) -> None:
    """The Kandinsky 6 flags on a Kandinsky 5 model: one message naming them."""
    given = [f for f, v in (("--no-audio", args.no_audio), (f"--upscale {args.upscale}", args.upscale),
                            ("--upscale-model", args.upscale_model)) if v]
    if given:
        raise ValueError(f"{' and '.join(given)}: --model {model} is a Kandinsky 5 checkpoint, which makes video "
                         f"without audio and has no super-resolution stage; these flags are for Kandinsky 6 "
                         f"(--model tiny-k6 or a Kandinsky-6.0-*-Diffusers checkpoint)")


def check_flags(args, resolved) -> None:
    """Refuse what a Kandinsky 6 run cannot do (before any weight loads), and turn off the defaults it has no use
    for (prompt expansion is on by default for real checkpoints)."""
    model = f"--model {args.model} is a Kandinsky 6 checkpoint"
    if args.upscale_model is not None and args.upscale is None:
        raise ValueError("--upscale-model names the super-resolution checkpoint of --upscale; add --upscale 1080p or "
                         "drop --upscale-model")
    refused = [(bool(args.lora), "--lora", "LoRA adapters are Kandinsky 5 layer names"),
               (args.magcache, "--magcache", "MagCache ratios are calibrated per Kandinsky 5 checkpoint"),
               (args.expand_prompt and getattr(args, "expand_prompt_given", False), "--expand-prompt",
                "the Kandinsky 6 prompt expansion is not built"),
               (args.offload == "model", "--offload model", "Kandinsky 6 keeps its components on the device; use "
                                                            "--offload text or --tp-degree"),
               (args.task is not None, f"--task {args.task}", "Kandinsky 6 makes video with audio: text only, or "
                                                              "an image with --image (I2AV)")]
    for bad, flag, why in refused:
        if bad:
            raise ValueError(f"{flag}: {model} ({why}); drop {flag.split()[0]}")
    from k5.engine.pipelines.k6 import has_audio
    from k5.engine.vae.audio import COMPONENTS

    if not args.no_audio and not has_audio(resolved.root):
        missing = [c for c in COMPONENTS if not (resolved.root / c / "config.json").is_file()]
        raise ValueError(f"--model {args.model} has no {' and '.join(c + '/' for c in missing)} (the audio VAE and "
                         f"vocoder that decode the audio track): use a complete Kandinsky-6.0-*-Diffusers folder, or "
                         f"--no-audio for the video alone")
    args.expand_prompt = False


def sr_checkpoint(args, resolved):
    """The super-resolution folder ``--upscale`` runs with (None without --upscale); ValueError naming what is
    missing. Only configs are read."""
    if args.upscale is None:
        return None
    from pathlib import Path

    from k5.engine.catalogue.resolve import K6_TINY, cached_snapshot, download_hint, hub_cache
    from k5.engine.pipelines.k6_sr import is_sr_checkpoint

    if args.upscale_model is None and resolved.kind == "tiny" and args.model in K6_TINY:
        from k5.engine.catalogue.k6_tiny import k6_tiny_checkpoint

        return k6_tiny_checkpoint(kind="sr")
    name = args.upscale_model or SR_REPO
    path = Path(name).expanduser()
    if not path.exists():
        snap = cached_snapshot(name)
        if snap is None:
            raise ValueError(f"--upscale {args.upscale} needs the super-resolution checkpoint {name}: no such folder, "
                             f"and not in the Hugging Face cache {hub_cache()} (nothing is downloaded at run time): "
                             f"{download_hint(name.partition('@')[0])}, or name a folder with --upscale-model")
        path = snap[0]
    if not is_sr_checkpoint(path):
        raise ValueError(f"--upscale-model {name}: {path} is not a Kandinsky 6 super-resolution checkpoint "
                         f"(model_index.json of a Kandinsky6SRPipeline)")
    return path


def check_upscale(root, req, target: str) -> None:
    """The video's size against the SR model's trained tiles (configs only)."""
    from k5.engine.pipelines.k6_sr import checkpoint_tiles, plan_tiles

    tiles, snap = checkpoint_tiles(root)
    plan_tiles(req.height, req.width, target, tiles, snap)


def settings(args) -> dict:
    """What a Kandinsky 6 job folder's files depend on besides the model and each request (a resume repeats it)."""
    return {"audio": not args.no_audio, "upscale": args.upscale}


# ---- the catalogue's recommended layout and memory on 8 GPUs (engine/catalogue/k6_variants.py's rows) -----------------------------------------------------------------

FIT_GIB = 76.0  # what the recommended layout leaves room within on an 80 GB GPU (H100 / A100: 79.1 GiB for torch)


def _layout(variant: K6Variant, world_size: int, tp: int) -> dict[str, int]:
    heads = variant.config().num_heads // tp
    cfg = 2 if abs(variant.guidance_scale - 1.0) > 1e-6 and (world_size // tp) % 2 == 0 else 1
    sp = world_size // (cfg * tp)
    ulysses = max(u for u in range(1, sp + 1) if sp % u == 0 and heads % u == 0)
    return {"dp": 1, "cfg": cfg, "ring": sp // ulysses, "ulysses": ulysses, "tp": tp}


def recommended_layout(variant: K6Variant, world_size: int = 8) -> dict[str, int]:
    """The least tensor parallelism whose estimated peak fits an 80 GB GPU (``FIT_GIB``; the Pro DiT alone is 30B
    parameters, 60 GB in bf16, so it needs tp 2 beside the text encoders), then CFG parallel when the variant guides
    (one latent-sized exchange a step), then as much Ulysses as the video heads allow, the rest ring; the audio
    tokens are replicated on every sequence rank (parallel/k6.py says why). The SR model refines independent tiles:
    its layout deals the tiles over the ranks (every rank holds the 1.4B model)."""
    if variant.task == "sr":
        return {"dp": 1, "cfg": 1, "ring": 1, "ulysses": 1, "tp": 1, "tiles": world_size}
    tps = [t for t in (1, 2, 4, 8) if world_size % t == 0]
    for tp in tps:
        layout = _layout(variant, world_size, tp)
        if _estimate(variant, layout)["peak"] <= FIT_GIB:
            return layout
    return _layout(variant, world_size, tps[-1])


def layout_flags(layout: dict[str, int]) -> str:
    if "tiles" in layout:
        return f"--upscale 1080p on {layout['tiles']} ranks (tiles dealt over them)"
    flags = ["--cfg-parallel"] if layout["cfg"] == 2 else []
    flags += [f"--tp-degree {layout['tp']}"] if layout["tp"] > 1 else []
    return " ".join(flags + [f"--ulysses-degree {layout['ulysses']}", f"--ring-degree {layout['ring']}"])


@functools.lru_cache(maxsize=8)
def dit_parameter_bytes(config, dtype_bytes: int = 2) -> int:
    """Bytes of a Kandinsky 6 DiT's (or SR DiT's) parameters, fp32 where the loader keeps them fp32."""
    import torch

    from k5.engine.checkpoints.dit import keeps_fp32

    from k5.engine.model.k6_config import K6Config

    if isinstance(config, K6Config):
        from k5.engine.model.k6_dit import Kandinsky6DiT as cls
    else:
        from k5.engine.model.k6_sr import Kandinsky6SR as cls
    with torch.device("meta"):
        model = cls(config)
    return sum(p.numel() * (4 if keeps_fp32(n) else dtype_bytes) for n, p in model.named_parameters())


def _tp_bytes(config, tp: int) -> int:
    import torch

    from k5.parallel.memory import dit_rank_bytes
    from k5.engine.model.k6_dit import Kandinsky6DiT

    with torch.device("meta"):
        return dit_rank_bytes(Kandinsky6DiT(config), 2, tp)


def memory_per_gpu(variant: K6Variant, world_size: int = 8) -> dict:
    """Estimated peak GiB per GPU at the variant's default size with the recommended layout, by parallel.memory's
    model (the one the CLI refuses a run with), here from parameter counts: bf16 DiT and Qwen, fp32 CLIP, fp16 VAE,
    text encoders off the GPU once the prompts are encoded. The activations are those of the video stream (the
    audio's 218 tokens of a 5 s clip are 0.4 % of the video's and add their replicated share on every rank)."""
    return _estimate(variant, recommended_layout(variant, world_size))


def _estimate(variant: K6Variant, layout: dict[str, int]) -> dict:
    import torch

    from k5.parallel.memory import Shape, Weights, estimate

    config = variant.config()
    from k5.launch.catalogue import CLIP_PARAMS, GIB, QWEN_TEXT_PARAMS, VAE_PARAMS

    text = 0 if variant.task == "sr" else QWEN_TEXT_PARAMS * 2 + CLIP_PARAMS * 4
    dit = dit_parameter_bytes(config) if layout["tp"] == 1 else _tp_bytes(config, layout["tp"])
    weights = Weights(dit=dit, text=text, vae=VAE_PARAMS["video"] * 2)
    if variant.task == "sr":
        return {"weights": (weights.dit + weights.vae) / GIB, "text_encoders": 0.0, "phases": {},
                "peak": None, "peak_phase": None}
    shape = Shape(variant.num_frames, variant.height, variant.width)
    sp = layout["ulysses"] * layout["ring"]
    est = estimate(weights, config, [shape], torch.bfloat16, "cuda", "text", variant.attention == "nabla",
                   sp=sp, ulysses=layout["ulysses"], ring=layout["ring"], tp=layout["tp"], cfg_degree=layout["cfg"],
                   dp=layout["dp"])
    return {"weights": (weights.dit + weights.vae) / GIB, "text_encoders": weights.text / GIB,
            "phases": {k: v / GIB for k, v in est.phases.items()}, "peak": est.peak / GIB,
            "peak_phase": est.peak_phase}


def table(world_size: int = 8) -> list[dict]:
    """One row per Kandinsky 6 checkpoint, for --list-variants and the README."""
    rows = []
    for v in K6_VARIANTS.values():
        memory = memory_per_gpu(v, world_size)
        rows.append({
            "variant": v.name, "task": v.task, "repo": v.repo, "steps": v.steps, "guidance": v.guidance_scale,
            "scheduler": v.scheduler, "attention": v.attention,
            "size": f"{v.height}x{v.width}" + ("" if v.task == "sr" else f"x{v.num_frames}"),
            "layout": layout_flags(recommended_layout(v, world_size)),
            "memory_gib": None if memory["peak"] is None else round(memory["peak"], 1),
            "weights_gib": round(memory["weights"], 1),
        })
    return rows


def markdown(world_size: int = 8) -> str:
    """The README's Kandinsky 6 table (``k5 variants`` prints it after the Kandinsky 5 one)."""
    head = ["checkpoint (`kandinskylab/...`)", "task", "scheduler", "steps", "guidance", "attention", "size",
            f"layout on {world_size} GPUs", f"GiB per GPU ({world_size} GPUs)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table(world_size):
        mem = "-" if r["memory_gib"] is None else r["memory_gib"]
        out.append(f"| `{r['variant']}` (`{r['repo'].split('/')[1]}`) | {r['task']} | {r['scheduler']} | "
                   f"{r['steps']} | {r['guidance']:g} | {r['attention']} | {r['size']} | `{r['layout']}` | {mem} |")
    return "\n".join(out)


def variants(argv=None) -> int:
    """``k5 variants``: the Kandinsky 5 catalogue (k5.launch.catalogue), then, as text, the Kandinsky 6 checkpoints."""
    import sys

    from k5.launch.catalogue import main

    argv = list(sys.argv[1:] if argv is None else argv)
    code = main(argv)
    if code == 0 and not {"--json", "--markdown"} & set(argv):
        world = int(argv[argv.index("--world-size") + 1]) if "--world-size" in argv else 8
        print("\nKandinsky 6 (video with audio; --model REPO takes the repo's settings):")
        print(markdown(world))
    return code
