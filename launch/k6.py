"""The generate command's Kandinsky 6 part: its flags and the checks that run before any weight loads.

Kandinsky 6 (engine/pipelines/k6.py) runs through the same validate, Job, Engine and job loop as Kandinsky 5; what
differs is checked here: the video carries an AAC audio track unless ``--no-audio``; the Kandinsky 5 features that
have no Kandinsky 6 counterpart yet (LoRA, MagCache, prompt expansion, --offload model, --task) are refused with one
message; the Kandinsky 6 flags are refused on a Kandinsky 5 model.
"""

from __future__ import annotations

import argparse

UPSCALE_TARGETS = ("1080p",)


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Kandinsky 6 (video with audio)")
    g.add_argument("--no-audio", action="store_true",
                   help="Kandinsky 6: sample the video alone and write it without an audio track (as diffusers' "
                        "sample_audio=False: the DiT's audio stream does not run, so the video is not the one a run "
                        "with audio gives); default: off (the MP4 has an AAC track)")
    g.add_argument("--upscale", choices=UPSCALE_TARGETS, default=None,
                   help="Kandinsky 6: run the 1080p super-resolution stage on the video (needs the VSR checkpoint); "
                        "default: none")


def refuse_on_k5(args, model: str) -> None:
    """The Kandinsky 6 flags on a Kandinsky 5 model: one message naming them."""
    given = [f for f, v in (("--no-audio", args.no_audio), (f"--upscale {args.upscale}", args.upscale)) if v]
    if given:
        raise ValueError(f"{' and '.join(given)}: --model {model} is a Kandinsky 5 checkpoint, which makes video "
                         f"without audio and has no super-resolution stage; these flags are for Kandinsky 6 "
                         f"(--model tiny-k6 or a Kandinsky-6.0-*-Diffusers checkpoint)")


def check_flags(args, resolved) -> None:
    """Refuse what a Kandinsky 6 run cannot do (before any weight loads), and turn off the defaults it has no use
    for (prompt expansion is on by default for real checkpoints)."""
    model = f"--model {args.model} is a Kandinsky 6 checkpoint"
    if args.upscale is not None:
        raise ValueError(f"--upscale {args.upscale}: the super-resolution stage is not wired into k5 generate yet "
                         f"(the SR DiT is engine/model/k6_sr.py; the K-VAE tiles and their per-rank decode are not "
                         f"built); generate without --upscale")
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


def settings(args) -> dict:
    """What a Kandinsky 6 job folder's files depend on besides the model and each request (a resume repeats it)."""
    return {"audio": not args.no_audio}
