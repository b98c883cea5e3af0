"""A checkpoint's files before anything loads: which component folders it has, which safetensors files hold each
component's weights, and that their headers read.

``check_components`` (folders) runs when ``--model`` is resolved (engine.catalogue.resolve), ``Checkpoint.open``
(every weight file's header, once) when the run is validated; both only once per run. What they find is kept: the
loaders and the memory estimate read it from the ``Checkpoint`` instead of listing and opening the files again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

# The diffusers layout of a Kandinsky 5 pipeline (model_index.json's components that hold files).
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
# What a single-file DiT needs from a diffusers-layout folder: everything but the transformer.
OTHER_COMPONENTS = COMPONENTS[1:]
# The weight files of each component that has weights: one file, or shards listed in an index.
DIT_SINGLE, DIT_INDEX = "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"
WEIGHT_FILES = {
    "transformer": (DIT_SINGLE, DIT_INDEX),
    "vae": (DIT_SINGLE, DIT_INDEX),
    "text_encoder": ("model.safetensors", "model.safetensors.index.json"),
    "text_encoder_2": ("model.safetensors", "model.safetensors.index.json"),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
IMAGE_VAE_CLASS = "AutoencoderKL"  # the FLUX.1-dev VAE of Image Lite; video checkpoints have AutoencoderKLHunyuanVideo
VIDEO_VAE_CLASS = "AutoencoderKLHunyuanVideo"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}


def open_safetensors(path: Path):
    """``safe_open`` on the CPU, with one error type (ValueError naming the file) for a damaged or foreign file."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises several types for a damaged or foreign file
        raise ValueError(f"cannot read safetensors file {path}: {e}") from e


def missing_components(root: Path, transformer: bool = True) -> list[str]:
    needed = COMPONENTS if transformer else OTHER_COMPONENTS
    return [c for c in needed if not (Path(root) / c).is_dir()]


def check_components(root: str | Path, transformer: bool = True) -> None:
    """Raise ValueError unless ``root`` holds every component folder; ``transformer=False`` when the DiT comes from
    elsewhere (an original single-file checkpoint: the folder then supplies only the VAE and text encoders)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"checkpoint {root} is not a folder; pass a Kandinsky 5 diffusers-format folder or 'tiny'")
    missing = missing_components(root, transformer)
    if missing:
        needed = COMPONENTS if transformer else OTHER_COMPONENTS
        raise ValueError(
            f"{root} is not a complete Kandinsky 5 checkpoint: missing component folder(s) {', '.join(missing)} "
            f"(expected {', '.join(needed)} as in the diffusers layout)"
        )


def weight_files(folder: Path, single: str = "model.safetensors",
                 index: str = "model.safetensors.index.json") -> list[Path]:
    """The safetensors files of one component folder (the shards its index lists, its single file, else every
    .safetensors file in it); ValueError naming the problem otherwise. A pickle file is never opened."""
    folder = Path(folder)
    if (folder / index).is_file():
        try:
            names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"cannot read the shard index {folder / index}: {e}") from e
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ValueError(f"shard(s) {', '.join(missing)} listed in {folder / index} are missing")
        return [folder / n for n in names]
    if (folder / single).is_file():
        return [folder / single]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise ValueError(
            f"{folder} holds {', '.join(pickles)}, a pickle file, and no safetensors: k5 loads weights only from "
            f"safetensors (unpickling a file can run any code in it); use the release's {single} (or convert the "
            f"weights with safetensors.torch.save_file)")
    raise ValueError(f"{folder} has no weights: expected {single} (or {index} with its shards)")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, ...
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def nbytes(self, dtype_bytes: int | None = None) -> int:
        """Bytes as stored, or at ``dtype_bytes`` per element (how it sits on the device after a cast)."""
        return self.numel * (dtype_bytes or _DTYPE_BYTES.get(self.dtype, 4))


def read_headers(files: list[Path]) -> dict[str, TensorInfo]:
    """Every tensor's name, shape and dtype from the files' headers (no data is read); ValueError for a file that
    does not read or holds no tensor."""
    out = {}
    for path in files:
        with open_safetensors(path) as f:
            names = list(f.keys())
            if not names:
                raise ValueError(f"safetensors file {path} holds no tensors")
            for name in names:
                sl = f.get_slice(name)
                out[name] = TensorInfo(tuple(sl.get_shape()), sl.get_dtype(), path)
    return out


def vae_class(root: str | Path) -> str | None:
    """The ``_class_name`` of a checkpoint's vae/config.json (None when it does not read)."""
    try:
        return json.loads((Path(root) / "vae" / "config.json").read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def is_image_checkpoint(root: str | Path) -> bool:
    """Whether a diffusers-format checkpoint folder is an Image Lite one: its VAE is the 2D FLUX AutoencoderKL."""
    return vae_class(root) == IMAGE_VAE_CLASS


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint whose weight files were listed and whose headers were read, once: ``root`` supplies the VAE and
    text encoders, ``dit`` is the located DiT (its folder or single file, k5.engine.checkpoints.dit.locate)."""

    root: Path
    dit: object  # engine.checkpoints.dit.DiTFiles
    tensors: dict[str, dict[str, TensorInfo]] = field(repr=False)  # component -> its tensors, from the headers

    @classmethod
    def open(cls, root: str | Path, dit) -> "Checkpoint":
        """Read the header of every weight file of the VAE and text encoders and keep what they hold. ``dit``: the
        located DiT (engine.checkpoints.dit.locate, which read its headers). Catches a missing, truncated or foreign
        file (a pickle .bin in place of the safetensors) in a second instead of after minutes of loading the
        components before it."""
        root = Path(root)
        tensors = {"transformer": dit.tensors}
        for component, (single, index) in WEIGHT_FILES.items():
            if component != "transformer":
                tensors[component] = read_headers(weight_files(root / component, single, index))
        return cls(root, dit, tensors)

    @property
    def image(self) -> bool:
        return is_image_checkpoint(self.root)

    def files(self, component: str) -> list[Path]:
        return sorted({t.file for t in self.tensors[component].values()})

    def holds(self, component: str, name: str) -> bool:
        return name in self.tensors.get(component, {})

    def bytes(self, component: str, keep=lambda name: True, dtype_bytes: int | None = None) -> int:
        """Bytes of a component's tensors whose name ``keep`` accepts, as stored or at ``dtype_bytes`` each."""
        return sum(t.nbytes(dtype_bytes) for name, t in self.tensors[component].items() if keep(name))
