"""DiT hyper-parameters, read from a checkpoint's config.json (or inferred from a single file's tensors:
engine/checkpoints/state_dict.py).

Field names are those of the checkpoint (`transformer/config.json` of the diffusers layout, `dit_params` of the
original YAML), so a config round-trips without a translation table.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from k5.kernels.nabla import NABLA_WINDOW

CLASS_NAME = "Kandinsky5Transformer3DModel"

@dataclass(frozen=True)
class DiTConfig:
    in_visual_dim: int = 16
    out_visual_dim: int = 16
    in_text_dim: int = 3584
    in_text_dim2: int = 768
    time_dim: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    model_dim: int = 1792
    ff_dim: int = 7168
    num_text_blocks: int = 2
    num_visual_blocks: int = 32
    axes_dims: tuple[int, int, int] = (16, 24, 24)
    visual_cond: bool = True
    attention_type: str = "regular"
    attention_P: float | None = None
    attention_wT: int | None = None
    attention_wH: int | None = None
    attention_wW: int | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.model_dim % self.head_dim:
            raise ValueError(
                f"model_dim {self.model_dim} is not a multiple of head_dim {self.head_dim} (= sum of axes_dims "
                f"{list(self.axes_dims)}); fix the checkpoint's config.json"
            )
        if any(d % 2 for d in self.axes_dims):
            raise ValueError(f"axes_dims {list(self.axes_dims)} must all be even (RoPE rotates pairs)")
        if self.attention_type not in ("regular", "flash", "nabla"):
            raise ValueError(f"attention_type {self.attention_type!r} is not one of 'regular', 'nabla'")

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dims)

    @property
    def num_heads(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def in_channels(self) -> int:
        """Channels of the latent the DiT takes: noisy latent, conditioning latent and mask with visual_cond."""
        return 2 * self.in_visual_dim + 1 if self.visual_cond else self.in_visual_dim

    @property
    def uses_nabla(self) -> bool:
        return self.attention_type == "nabla"

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        for k in ("patch_size", "axes_dims"):
            if k in kwargs:
                kwargs[k] = tuple(kwargs[k])
        return cls(**kwargs, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def from_json(cls, path: str | Path) -> "DiTConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the DiT config {path}: {e}") from e
        name = d.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ValueError(f"{path} describes a {name}, not a Kandinsky 5 transformer ({CLASS_NAME})")
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["patch_size"], d["axes_dims"] = list(self.patch_size), list(self.axes_dims)
        return {"_class_name": CLASS_NAME, **self.extra, **d}

    def replace(self, **changes) -> "DiTConfig":
        return dataclasses.replace(self, **changes)


def _nabla(P: float) -> dict:
    wT, wH, wW = NABLA_WINDOW
    return dict(attention_type="nabla", attention_P=P, attention_wT=wT, attention_wH=wH, attention_wW=wW)


# Shapes of the released models (kandinsky5-architecture.md section 1.1), for benchmarks and shape tests.
PRESETS: dict[str, DiTConfig] = {
    "lite": DiTConfig(),
    "lite-10s": DiTConfig(**_nabla(0.9)),
    "pro": DiTConfig(model_dim=4096, ff_dim=16384, time_dim=1024, num_text_blocks=4, num_visual_blocks=60,
                     axes_dims=(32, 48, 48)),
    "pro-hd": DiTConfig(model_dim=4096, ff_dim=16384, time_dim=1024, num_text_blocks=4, num_visual_blocks=60,
                        axes_dims=(32, 48, 48), **_nabla(0.8)),
    "image-lite": DiTConfig(model_dim=2560, ff_dim=10240, num_text_blocks=2, num_visual_blocks=50,
                            axes_dims=(32, 48, 48), visual_cond=False),
    # I2I: the original's instruct_type "channel" = diffusers' visual_cond (edit latent + mask channels)
    "image-lite-i2i": DiTConfig(model_dim=2560, ff_dim=10240, num_text_blocks=2, num_visual_blocks=50,
                                axes_dims=(32, 48, 48), visual_cond=True),
}
