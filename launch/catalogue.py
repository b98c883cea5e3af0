"""The catalogue of official checkpoints as a table: `k5 variants`, `launch/generate.py --list-variants`, and the
README's table (tests/test_cli.py checks that the README holds exactly what ``markdown()`` prints).

    k5 variants                      # one aligned row per variant
    k5 variants --markdown           # the README table
    k5 variants --json --world-size 16
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from k5.engine.catalogue.variants import Variant
    from k5.engine.model.config import DiTConfig

# ---- the table: recommended layout and memory on 8 GPUs --------------------------------------------------------------------

# Parameter counts of the other resident components, as engine/encoders/text.py and engine/vae/video.py load them (their configs):
# Qwen2.5-VL-7B-Instruct's text decoder with its embeddings (8,292,166,656 in all, less the 544,997,376 of lm_head
# and the 676,550,144 of the vision tower, which a video prompt does not load), CLIP ViT-L/14's text tower (fp32, as
# the reference runs it), the HunyuanVideo VAE and the FLUX.1 VAE.
QWEN_TEXT_PARAMS, CLIP_PARAMS = 7_070_619_136, 123_060_480
VAE_PARAMS = {"video": 246_000_000, "image": 83_800_000}
GIB = 1024 ** 3


def num_tokens(variant: Variant, height: int | None = None, width: int | None = None,
               num_frames: int | None = None) -> int:
    h, w, f = height or variant.height, width or variant.width, num_frames or variant.num_frames
    return ((f - 1) // 4 + 1) * (h // 16) * (w // 16)


def layout_flags(layout: dict[str, int]) -> str:
    flags = ["--cfg-parallel"] if layout["cfg"] == 2 else []
    flags.append(f"--ulysses-degree {layout['ulysses']}")
    flags.append(f"--ring-degree {layout['ring']}")
    return " ".join(flags)


@functools.lru_cache(maxsize=8)
def dit_parameter_bytes(config: DiTConfig, dtype_bytes: int = 2) -> int:
    """Bytes of the DiT's parameters: fp32 for time embedding, modulation and q/k norms, ``dtype_bytes`` else."""
    from k5.engine.checkpoints.dit import keeps_fp32
    from k5.engine.model.dit import meta_dit

    model = meta_dit(config)
    return sum(p.numel() * (4 if keeps_fp32(n) else dtype_bytes) for n, p in model.named_parameters())


def memory_per_gpu(variant: Variant, world_size: int = 8, offload: str = "text") -> dict:
    """Estimated peak GiB per GPU for the variant's default size on ``world_size`` GPUs with the recommended layout.

    The estimate is k5.parallel.memory's, the one the CLI refuses a run with before loading (weights resident in each
    phase, the DiT block's live activations per rank, the tiled decode), here from parameter counts instead of a
    checkpoint's headers: bf16 DiT and Qwen, fp32 CLIP, fp16 VAE, ``offload`` as the CLI's default on CUDA (the
    text encoders leave the GPU once the prompts are encoded). The peak is the worst rank's: the text-source rank
    of each replica also holds the text encoders while it encodes."""
    import torch

    from k5.engine.catalogue.variants import PRESETS
    from k5.parallel.memory import Shape, Weights, estimate
    from k5.parallel.plan import recommended_layout

    layout = recommended_layout(variant, world_size)
    config = variant.configure(PRESETS[variant.family])
    weights = Weights(dit=dit_parameter_bytes(config), text=QWEN_TEXT_PARAMS * 2 + CLIP_PARAMS * 4,
                      vae=VAE_PARAMS["image" if variant.family == "image-lite" else "video"] * 2)
    shape = Shape(variant.num_frames, variant.height, variant.width)
    est = estimate(weights, config, [shape], torch.bfloat16, "cuda", offload, variant.nabla_P is not None,
                   sp=layout["ulysses"] * layout["ring"], ulysses=layout["ulysses"], ring=layout["ring"],
                   tp=layout["tp"], cfg_degree=layout["cfg"], dp=layout["dp"], image=variant.family == "image-lite")
    return {"weights": (weights.dit + weights.vae) / GIB, "text_encoders": weights.text / GIB,
            "phases": {k: v / GIB for k, v in est.phases.items()}, "peak": est.peak / GIB,
            "peak_phase": est.peak_phase}


def table(world_size: int = 8) -> list[dict]:
    """One row per variant, for --list-variants and the README."""
    from k5.engine.catalogue.variants import NABLA_WINDOWS, VARIANTS
    from k5.parallel.plan import recommended_layout

    rows = []
    for v in VARIANTS.values():
        layout = recommended_layout(v, world_size)
        memory = memory_per_gpu(v, world_size)
        attn = "dense" if v.nabla_P is None else f"NABLA P={v.nabla_P:g} (wT,wH,wW={','.join(map(str, NABLA_WINDOWS))})"
        rows.append({
            "variant": v.name, "task": v.task, "repo": v.diffusers_repo or v.repo, "steps": v.steps,
            "guidance": v.guidance_scale, "shift": v.shift, "attention": attn,
            "size": f"{v.height}x{v.width}" + (f"x{v.num_frames}" if v.num_frames > 1 else ""),
            "magcache": v.mag_ratios is not None, "layout": layout_flags(layout),
            "memory_gib": round(memory["peak"], 1), "denoise_gib": round(memory["phases"]["denoise"], 1),
        })
    return rows


# (column title, key of table()'s rows)
COLUMNS = (("variant", "variant"), ("task", "task"), ("steps", "steps"), ("guidance", "guidance"),
           ("attention", "attention"), ("size", "size"), ("MagCache", "magcache"), ("layout", "layout"),
           ("GiB/GPU", "memory_gib"))


def rows(world_size: int = 8) -> list[dict]:
    return table(world_size)


def _cell(row: dict, key: str) -> str:
    value = row[key]
    if key == "magcache":
        return "yes" if value else "-"
    if key == "guidance":
        return f"{value:g}"
    return str(value)


def text(world_size: int = 8) -> str:
    """Aligned columns for a terminal, then one line per variant with the repo it is downloaded from."""
    table = rows(world_size)
    cells = [[title for title, _ in COLUMNS]] + [[_cell(r, k) for _, k in COLUMNS] for r in table]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.append("")
    lines.append(f"layout and GiB/GPU (estimated peak per GPU) for {world_size} GPUs at the default size; repos "
                 f"(hf download REPO):")
    lines += [f"  {r['variant']}: {r['repo']}" for r in table]
    return "\n".join(lines)


def markdown(world_size: int = 8) -> str:
    """The README table: one row per variant, the repo id in the first column."""
    head = ["variant (repo `kandinskylab/Kandinsky-5.0-...`)", "steps", "guidance", "attention", "size (HxWxF)",
            "MagCache", f"layout on {world_size} GPUs", f"GiB per GPU ({world_size} GPUs)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows(world_size):
        repo = r["repo"].removeprefix("kandinskylab/Kandinsky-5.0-")
        out.append(f"| `{r['variant']}` (`{repo}`) | {r['steps']} | {r['guidance']:g} | {r['attention']} | "
                   f"{r['size']} | {_cell(r, 'magcache')} | `{r['layout']}` | {r['memory_gib']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="k5 variants", description="The official Kandinsky 5 checkpoints and the "
                                "settings their authors run them with (the defaults of --variant).")
    p.add_argument("--world-size", type=int, default=8, help="GPUs for the layout and memory columns (default 8)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the rows as JSON")
    fmt.add_argument("--markdown", action="store_true", help="the README's table")
    args = p.parse_args(argv)
    if args.world_size < 1:
        p.error(f"--world-size must be >= 1, got {args.world_size}")
    if args.json:
        print(json.dumps(rows(args.world_size), indent=1))
    else:
        print(markdown(args.world_size) if args.markdown else text(args.world_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
