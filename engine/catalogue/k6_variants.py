"""The catalogue of released Kandinsky 6 checkpoints (2026-10-06) and the settings they run with.

Sources (each row names its own):
- the four video+audio -Diffusers repos, their scheduler, steps and guidance: FastVideo's Kandinsky 6 T2IVA page
  (docs/inference/.../kandinsky6_ti2va.md: "the defaults of the preset the registry selects for each repo id"),
  which agrees with diffusers 0.42.1's Kandinsky6TI2VAPipeline (__call__ defaults: 512x768, 121 frames at 24 fps,
  50 steps, guidance 5.0; a PiflowScheduler refuses any guidance but 1.0) and with the PiFlow config tiny-k6 copies
  (n_grid 10, eps 1e-6, final_step_size_scale 0.5, 128 policy substeps);
- sizes: every preset is 512x768 x 121 frames (5 s at 24 fps): "SD" in the official figures;
- the VSR repo: kandinskylab/Kandinsky-6.0-VSR-distilled2steps-5s-Diffusers (the issue, peers-2026-12.md): 1.4B,
  distilled to 2 steps, to 1920x1080, NABLA by default (engine/model/k6_config.py's SR presets);
- official one-H100 times (peers-2026-12.md): Pro SD 356 s, HD 292 s, Full HD 402 s; Lite SD 239 s.
Attention: dense in every video+audio release (NABLA is our optional branch, --attention nabla); the SR model runs
NABLA (P 0.8, windows 11,7,7: SRConfig's defaults).

Everything here is plain data and arithmetic, as engine/catalogue/variants.py; nothing loads weights.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

from k5.engine.catalogue.variants import CLIP_PARAMS, GIB, QWEN_TEXT_PARAMS, VAE_PARAMS, VariantError
from k5.engine.model.k6_config import PRESETS, SR_PRESETS, K6Config

ORG = "kandinskylab"
FASTVIDEO = "hao-ai-lab/FastVideo docs kandinsky6_ti2va.md (registry presets)"
SD, FRAMES, FPS = (512, 768), 121, 24
# Official seconds on one H100 for a 5 s clip (peers-2026-12.md).
OFFICIAL_H100_S = {"pro-sd": 356.0, "pro-hd": 292.0, "pro-full-hd": 402.0, "lite-sd": 239.0}
SR_TARGET = (1080, 1920)


@dataclass(frozen=True)
class K6Variant:
    name: str
    task: str  # "t2av" (an image makes it I2AV: every release takes one) or "sr"
    family: str  # lite | pro | sr: the DiT shapes (engine.model.k6_config.PRESETS / SR_PRESETS)
    repo: str
    scheduler: str  # euler (sft) | piflow (distilled)
    steps: int
    guidance_scale: float
    height: int
    width: int
    num_frames: int
    attention: str  # dense | nabla
    source: str

    @property
    def preset(self) -> str:
        if self.family == "sr":
            return "sr"
        return self.family + ("-distill" if self.scheduler == "piflow" else "")

    def config(self):
        return SR_PRESETS["sr"] if self.family == "sr" else PRESETS[self.preset]

    def sampling(self) -> dict:
        return {"steps": self.steps, "guidance_scale": self.guidance_scale, "shift": None}

    def defaults(self) -> dict:
        """Request defaults of a real checkpoint (flags override them); the shift stays the scheduler config's."""
        return {**self.sampling(), "height": self.height, "width": self.width, "num_frames": self.num_frames}


_ROWS = (
    ("k6-pro-5s", "t2av", "pro", "Kandinsky-6.0-Pro-5s-Diffusers", "euler", 50, 5.0, FASTVIDEO),
    ("k6-pro-distill-5s", "t2av", "pro", "Kandinsky-6.0-Pro-distill-5s-Diffusers", "piflow", 10, 1.0, FASTVIDEO),
    ("k6-lite-5s", "t2av", "lite", "Kandinsky-6.0-Lite-5s-Diffusers", "euler", 50, 5.0, FASTVIDEO),
    ("k6-lite-distill-5s", "t2av", "lite", "Kandinsky-6.0-Lite-distill-5s-Diffusers", "piflow", 10, 1.0, FASTVIDEO),
    ("k6-vsr-distilled2steps-5s", "sr", "sr", "Kandinsky-6.0-VSR-distilled2steps-5s-Diffusers", "piflow", 2, 1.0,
     "issue 22 / peers-2026-12.md (1.4B, 2 steps, to 1920x1080); SRConfig defaults (NABLA)"),
)


def _variant(row) -> K6Variant:
    name, task, family, repo, scheduler, steps, guidance, source = row
    h, w = SR_TARGET if task == "sr" else SD
    return K6Variant(name, task, family, f"{ORG}/{repo}", scheduler, steps, guidance, h, w, FRAMES,
                     "nabla" if family == "sr" else "dense", source)


K6_VARIANTS: dict[str, K6Variant] = {row[0]: _variant(row) for row in _ROWS}


def get(name: str) -> K6Variant:
    key = name.strip().lower()
    if key in K6_VARIANTS:
        return K6_VARIANTS[key]
    close = difflib.get_close_matches(key, K6_VARIANTS, n=3, cutoff=0.5)
    raise VariantError(f"unknown Kandinsky 6 variant {name!r}; " + (f"did you mean {', '.join(close)}?" if close
                                                                    else f"one of {', '.join(K6_VARIANTS)}"))


def recognise(repo_or_folder: str) -> K6Variant | None:
    """The variant a repo id, HF cache folder name or local folder named like the repo means."""
    from k5.engine.catalogue.variants import _repo_key

    key = _repo_key(repo_or_folder)
    return next((v for v in K6_VARIANTS.values() if _repo_key(v.repo) == key), None)


# ---- recommended layout and memory on 8 GPUs --------------------------------------------------------------------

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

    if isinstance(config, K6Config):
        from k5.engine.model.k6_dit import Kandinsky6DiT as cls
    else:
        from k5.engine.model.k6_sr import Kandinsky6SR as cls
    with torch.device("meta"):
        model = cls(config)
    return sum(p.numel() * (4 if keeps_fp32(n) else dtype_bytes) for n, p in model.named_parameters())


def _tp_bytes(config, tp: int) -> int:
    import torch

    from k5.engine.memory import dit_rank_bytes
    from k5.engine.model.k6_dit import Kandinsky6DiT

    with torch.device("meta"):
        return dit_rank_bytes(Kandinsky6DiT(config), 2, tp)


def memory_per_gpu(variant: K6Variant, world_size: int = 8) -> dict:
    """Estimated peak GiB per GPU at the variant's default size with the recommended layout, by engine.memory's
    model (the one the CLI refuses a run with), here from parameter counts: bf16 DiT and Qwen, fp32 CLIP, fp16 VAE,
    text encoders off the GPU once the prompts are encoded. The activations are those of the video stream (the
    audio's 218 tokens of a 5 s clip are 0.4 % of the video's and add their replicated share on every rank)."""
    return _estimate(variant, recommended_layout(variant, world_size))


def _estimate(variant: K6Variant, layout: dict[str, int]) -> dict:
    import torch

    from k5.engine.memory import Shape, Weights, estimate

    config = variant.config()
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
