"""Kandinsky 6 hyper-parameters: the video/audio DiT and the super-resolution DiT.

Field names and defaults are those of diffusers' ``Kandinsky6Transformer3DModel`` and
``Kandinsky6SRTransformer3DModel`` (their ``transformer/config.json``), so a config.json reads exactly as diffusers
reads it, including the fields a release omits. The audio stream's ``*_a`` widths default to the video ones there
too; ``from_dict`` resolves them once, so the rest of the engine never sees a None.

Where the presets' numbers come from (there is no public original config to cite, only these):
- Lite: the Lite ``transformer/config.json`` as written out in vLLM-Omni's test of the published bundle (snapshot
  6510114a: widths, depths, in_audio_dim 40, audio_freqs_scaling 0.144, the four flags True, 2 token types) and the
  kandinskylab ComfyUI node's release table (time_dim_a 512).
- Pro: diffusers' defaults (4096 / 16384 / 1024 / 4 text / 60 blocks / axes (32, 48, 48)) and vLLM-Omni's release
  table (model_dim_a 2048, ff_dim_a 7168, time_dim_a 1024). axes_dims_a = axes_dims is GUESSED (diffusers' default;
  ca_rope rotates video keys with audio angles, so the head dims must agree).
- out_audio_dim = in_audio_dim * n_grid and n_grid = 10 for the distilled checkpoints: the ComfyUI node's shape check
  and diffusers' PiflowScheduler default; n_grid 10 itself is GUESSED (no distilled config.json was available).
- SR: diffusers' Kandinsky6SRTransformer3DModel defaults, which its docstring gives as the distilled release
  (out_visual_dim 640 = 64 x n_grid 10); the flow-matching teacher's out_visual_dim 64 is GUESSED.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

CLASS_NAME = "Kandinsky6Transformer3DModel"
SR_CLASS_NAME = "Kandinsky6SRTransformer3DModel"


@dataclass(frozen=True)
class StreamDims:
    """The widths of one stream (video or audio): what a block of that stream is built from."""

    model_dim: int
    time_dim: int
    ff_dim: int
    axes_dims: tuple[int, ...]

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dims)

    @property
    def num_heads(self) -> int:
        return self.model_dim // self.head_dim


def _read_json(path: Path, class_name: str) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the DiT config {path}: {e}") from e
    name = d.get("_class_name", class_name)
    if name != class_name:
        raise ValueError(f"{path} describes a {name}, not a {class_name}")
    return d


class _FromDict:
    """Round-trip through the checkpoint's config dict; unknown keys travel in ``extra``."""

    _tuples: tuple[str, ...] = ()
    _class_name = ""

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        for k in cls._tuples:
            if k in kwargs:
                kwargs[k] = tuple(tuple(v) if isinstance(v, list) else v for v in kwargs[k])
        return cls(**kwargs, extra={k: v for k, v in d.items() if k not in names})

    @classmethod
    def from_json(cls, path: str | Path):
        return cls.from_dict(_read_json(path, cls._class_name))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for k in self._tuples:
            d[k] = [list(v) if isinstance(v, tuple) else v for v in d[k]]
        return {"_class_name": self._class_name, **self.extra, **d}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class K6Config(_FromDict):
    in_visual_dim: int = 16
    out_visual_dim: int = 16
    in_text_dim: int = 3584
    in_text_dim2: int = 768
    time_dim: int = 1024
    patch_size: tuple[int, int, int] = (1, 2, 2)
    model_dim: int = 4096
    ff_dim: int = 16384
    num_text_blocks: int = 4
    num_visual_blocks: int = 60
    axes_dims: tuple[int, int, int] = (32, 48, 48)
    visual_cond: bool = True
    in_audio_dim: int = 20
    out_audio_dim: int = 20
    model_dim_a: int | None = None  # None: model_dim (diffusers' rule), resolved in __post_init__
    time_dim_a: int | None = None
    ff_dim_a: int | None = None
    axes_dims_a: tuple[int, int, int] | None = None
    audio_freqs_scaling: float = 1.0
    scale_factor: tuple[float, float, float] = (1.0, 2.0, 2.0)
    text_token_padding: bool = False
    ca_rope: bool = False
    cross_gates: bool = False
    fix_modulation: bool = False
    visual_token_type_num_embeddings: int = 0
    # Not in diffusers' config: the video self-attention is dense in every release; NABLA is our optional branch.
    attention_type: str = "regular"
    attention_P: float | None = None
    attention_wT: int | None = None
    attention_wH: int | None = None
    attention_wW: int | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    _tuples = ("patch_size", "axes_dims", "axes_dims_a", "scale_factor")
    _class_name = CLASS_NAME

    def __post_init__(self):
        for name, video in (("model_dim_a", "model_dim"), ("time_dim_a", "time_dim"), ("ff_dim_a", "ff_dim"),
                            ("axes_dims_a", "axes_dims")):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(self, video))
        for s, dims in (("video", self.video), ("audio", self.audio)):
            if dims.model_dim % dims.head_dim:
                raise ValueError(f"{s} model dim {dims.model_dim} is not a multiple of its head dim {dims.head_dim} "
                                 f"(= sum of axes dims {list(dims.axes_dims)}); fix the checkpoint's config.json")
            if any(d % 2 for d in dims.axes_dims):
                raise ValueError(f"{s} axes dims {list(dims.axes_dims)} must all be even (RoPE rotates pairs)")
        if self.ca_rope and self.video.head_dim != self.audio.head_dim:
            raise ValueError(f"ca_rope rotates video keys with audio angles and back: the head dims must agree, got "
                             f"video {self.video.head_dim} and audio {self.audio.head_dim}")
        if not self.fix_modulation and self.time_dim != self.time_dim_a:
            raise ValueError(f"without fix_modulation each stream's cross-modal modulation reads the other stream's "
                             f"time embedding: time_dim {self.time_dim} and time_dim_a {self.time_dim_a} must agree")
        if self.out_visual_dim % self.in_visual_dim or self.out_audio_dim != self.in_audio_dim * self.n_grid:
            raise ValueError(
                f"outputs must hold n_grid whole predictions of each stream: out_visual_dim {self.out_visual_dim} "
                f"(in {self.in_visual_dim}) and out_audio_dim {self.out_audio_dim} (in {self.in_audio_dim})")
        if self.attention_type not in ("regular", "nabla"):
            raise ValueError(f"attention_type {self.attention_type!r} is not one of 'regular', 'nabla'")

    @property
    def video(self) -> StreamDims:
        return StreamDims(self.model_dim, self.time_dim, self.ff_dim, tuple(self.axes_dims))

    @property
    def audio(self) -> StreamDims:
        return StreamDims(self.model_dim_a, self.time_dim_a, self.ff_dim_a, tuple(self.axes_dims_a))

    @property
    def head_dim(self) -> int:
        return self.video.head_dim

    @property
    def num_heads(self) -> int:
        return self.video.num_heads

    @property
    def in_channels(self) -> int:
        """Channels of the video input: noisy latent, conditioning latent and mask with visual_cond."""
        return 2 * self.in_visual_dim + 1 if self.visual_cond else self.in_visual_dim

    @property
    def n_grid(self) -> int:
        """Predictions per output channel: 1 for a velocity (sft) model, n_grid for a PiFlow-distilled one."""
        return self.out_visual_dim // self.in_visual_dim

    @property
    def uses_nabla(self) -> bool:
        return self.attention_type == "nabla"

    @property
    def supports_image(self) -> bool:
        """I2AV appends the image as a masked tail frame with token type 1 (diffusers' check_inputs)."""
        return self.visual_cond and self.visual_token_type_num_embeddings >= 2


@dataclass(frozen=True)
class SRConfig(_FromDict):
    in_visual_dim: int = 64
    out_visual_dim: int = 640
    time_dim: int = 512
    patch_size: tuple[int, int, int] = (1, 1, 1)
    model_dim: int = 1792
    ff_dim: int = 7168
    num_visual_blocks: int = 32
    axes_dims: tuple[int, int, int] = (16, 24, 24)
    scale_factor: tuple[float, float, float] = (1.0, 2.0, 2.0)
    nabla_threshold: float = 0.8
    nabla_window: tuple[int, int, int] = (11, 7, 7)
    tile_sizes: tuple[tuple[int, int], ...] = ((512, 512), (512, 768), (768, 512))
    attention_type: str = "nabla"  # ours: diffusers' SR always runs NABLA; "regular" for a dense comparison
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    _tuples = ("patch_size", "axes_dims", "scale_factor", "nabla_window", "tile_sizes")
    _class_name = SR_CLASS_NAME

    def __post_init__(self):
        if self.model_dim % self.head_dim:
            raise ValueError(f"model_dim {self.model_dim} is not a multiple of head_dim {self.head_dim}")
        if any(w % 2 == 0 for w in self.nabla_window):
            raise ValueError(f"nabla_window {list(self.nabla_window)} must be odd extents (t, h, w)")
        if self.attention_type not in ("regular", "nabla"):
            raise ValueError(f"attention_type {self.attention_type!r} is not one of 'regular', 'nabla'")

    @property
    def head_dim(self) -> int:
        return sum(self.axes_dims)

    @property
    def num_heads(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def in_channels(self) -> int:
        return 2 * self.in_visual_dim + 1  # noisy latent, anchor latent, anchor mask

    @property
    def n_grid(self) -> int:
        return self.out_visual_dim // self.in_visual_dim


_LITE = dict(time_dim=512, model_dim=1792, ff_dim=7168, num_text_blocks=2, num_visual_blocks=32,
             axes_dims=(16, 24, 24), in_audio_dim=40, out_audio_dim=40, model_dim_a=896, time_dim_a=512,
             ff_dim_a=3584, axes_dims_a=(16, 24, 24), audio_freqs_scaling=0.144, text_token_padding=True,
             ca_rope=True, cross_gates=True, fix_modulation=True, visual_token_type_num_embeddings=2)
_PRO = dict(_LITE, time_dim=1024, model_dim=4096, ff_dim=16384, num_text_blocks=4, num_visual_blocks=60,
            axes_dims=(32, 48, 48), model_dim_a=2048, time_dim_a=1024, ff_dim_a=7168, axes_dims_a=(32, 48, 48))
N_GRID = 10


def _distilled(d: dict) -> dict:
    return dict(d, out_visual_dim=16 * N_GRID, out_audio_dim=d["in_audio_dim"] * N_GRID)


# Shapes of the released models (sources in the module docstring), for benchmarks and shape tests.
PRESETS: dict[str, K6Config] = {
    "lite": K6Config(**_LITE),
    "lite-distill": K6Config(**_distilled(_LITE)),
    "pro": K6Config(**_PRO),
    "pro-distill": K6Config(**_distilled(_PRO)),
}
SR_PRESETS: dict[str, SRConfig] = {
    "sr": SRConfig(),
    "sr-teacher": SRConfig(out_visual_dim=64),
}
