"""What `--model`, `--variant`, `--magcache` and `--components` mean for a run: the checkpoint resolved (k5.engine.catalogue.resolve),
the request defaults (flag > variant > built-in), the MagCache ratios, and what a record says about the variant and
the DiT forwards. Everything here runs before any weight loads and raises ValueError with one message.
"""

from __future__ import annotations

import argparse

# Without a variant: the original pipeline's defaults (512x768, 5 s at 24 fps, 50 steps, guidance 5).
BUILT_IN = {"height": 512, "width": 768, "num_frames": 121, "steps": 50, "guidance_scale": 5.0}
REQUEST_DEFAULTS = ("height", "width", "num_frames", "steps", "guidance_scale", "shift")


class ListVariants(argparse.Action):
    """``--list-variants``: print the catalogue and exit 0, whatever else is on the command line."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from k5.launch.catalogue import text

        print(text())
        parser.exit(0)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="catalogue variant (see --list-variants): its steps, guidance, shift, size and attention "
                        "become the defaults; default: recognised from the repo id or folder name. Needed for an "
                        "original single-file checkpoint; with --model tiny, only its sampling settings")
    p.add_argument("--list-variants", action=ListVariants,
                   help="print the catalogue of official checkpoints (the defaults each --variant sets) and exit")
    p.add_argument("--magcache", action="store_true",
                   help="skip DiT forwards as the reference's MagCache does, with the variant's calibrated ratios; "
                        "default off")
    p.add_argument("--components", default=None, metavar="DIR",
                   help="for a single-file checkpoint: a -Diffusers folder to take the VAE and text encoders from; "
                        "default: a Kandinsky 5 -Diffusers repo in the Hugging Face cache")


def resolve(args, tiny_task: str | None = None):
    """The checkpoint ``--model`` names (a k5.engine.catalogue.resolve.Resolved); VariantError / ResolveError otherwise.
    ``tiny_task``: which task's checkpoint a tiny model means (``--model tiny-image``: t2i or i2i)."""
    from k5.engine.catalogue.resolve import resolve_model

    tiny_attention = "nabla" if getattr(args, "attention", None) == "nabla" else "regular"
    return resolve_model(args.model, args.variant, components=args.components, tiny_attention=tiny_attention,
                         tiny_task=tiny_task)


def request_defaults(args, resolved, built_in: dict = BUILT_IN) -> dict:
    """Each request setting: the flag if given, else the variant's, else the built-in default (``built_in``: the
    family's; Image Lite's leaves size and frames open). Sets them on ``args`` too (the prompt file's items fall
    back to them) and returns them."""
    variant = resolved.defaults()
    out = {}
    for key in REQUEST_DEFAULTS:
        value = getattr(args, key)
        if value is None:
            value = variant.get(key)
        if value is None:
            value = built_in.get(key)  # shift stays None: the checkpoint's scheduler config, else 5
        setattr(args, key, value)
        out[key] = value
    return out


def magcache_ratios(args, resolved) -> tuple[float, ...] | None:
    """The ratios ``--magcache`` runs with, None when it is off; a variant without ratios (or no variant) is an
    error naming the variants that have them."""
    if not args.magcache:
        return None
    from k5.engine.catalogue.variants import VARIANTS, check_magcache

    if resolved.variant is None:
        have = [v.name for v in VARIANTS.values() if v.mag_ratios is not None]
        raise ValueError(f"--magcache needs the variant's calibrated ratios, and --model {args.model} is no catalogue "
                         f"variant: name one with --variant ({', '.join(have)})")
    return check_magcache(resolved.variant)


def forwards(ratios, request) -> dict:
    """The DiT forwards of one item (both guidance branches, whatever the layout): {"run": N, "skipped":
    [[step, "cond"|"uncond"], ...]}; the MagCache plan decides them, identically on every rank."""
    from k5.engine.sampling.magcache import forwards as plan
    from k5.engine.sampling.sampler import uses_cfg

    return plan(ratios, request.steps, guided=uses_cfg(request.guidance_scale)).as_dict()


def describe(resolved, ratios) -> dict:
    """The variant part of a manifest record and of the summary."""
    d = resolved.describe()
    return {"kind": d["kind"], "dit": d["dit"], "variant": d["variant"], "variant_from": d["variant_from"],
            "task": d["task"], "repo": d["repo"], "revision": d["revision"], "magcache": ratios is not None}
