"""The generate command's Kandinsky 6 part: its flags and the checks that run before any weight loads.

Kandinsky 6 (engine/pipelines/k6.py) runs through the same validate, Job, Engine and job loop as Kandinsky 5; what
differs is checked here: the video carries an AAC audio track unless ``--no-audio``; ``--upscale`` adds the
super-resolution stage (engine/pipelines/k6_sr.py; its checkpoint found here); the Kandinsky 5 features that
have no Kandinsky 6 counterpart yet (LoRA, MagCache, prompt expansion, --offload model, --task) are refused with one
message; the Kandinsky 6 flags are refused on a Kandinsky 5 model.
"""

from __future__ import annotations

import argparse

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
