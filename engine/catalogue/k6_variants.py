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

Everything here is plain data, as engine/catalogue/variants.py; the recommended 8-GPU layouts and their memory are
k5.launch.k6's (they need the layout planner's memory estimate, k5.parallel.memory).
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

from k5.engine.catalogue.variants import VariantError
from k5.engine.model.k6_config import PRESETS, SR_PRESETS

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
