"""Checkpoint files of the DiT: where they are and how their tensors reach a meta-device model.

The only module that knows the on-disk layouts:
- diffusers: `<root>/transformer/` (or the folder itself) with config.json and either one
  `diffusion_pytorch_model.safetensors` or several shards listed in `diffusion_pytorch_model.safetensors.index.json`;
- original: one `.safetensors` file with the same tensor names and no config (the config is inferred from the
  shapes, or read from a config.json beside it).
Tensor names are identical in both (kandinsky5-architecture.md section 2.9).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn

from k5.engine.model.config import DiTConfig, infer_config

INDEX = "diffusion_pytorch_model.safetensors.index.json"
SINGLE = "diffusion_pytorch_model.safetensors"

# Parameters that stay fp32 whatever the compute dtype. Time embedding and modulation: the original runs them under
# autocast(fp32) and diffusers keeps them fp32 (`_keep_in_fp32_modules`); bf16 modulation visibly degrades the
# output. q/k RMSNorm weights: the norm sees fp32 inputs anyway, and an fp32 weight (bf16 values are exact in fp32)
# lets torch use its fused kernel instead of the mixed-dtype fallback.
# Kandinsky 6 has one time embedding per stream (video_time_embeddings, audio_time_embeddings), and its SR model
# folds the pooled text of its empty caption into pooled_bias, which diffusers keeps fp32 with them.
def keeps_fp32(name: str) -> bool:
    return (name.startswith("time_embeddings.") or "_time_embeddings." in name or "modulation." in name
            or "_norm." in name or name == "pooled_bias")


@dataclass(frozen=True)
class CheckpointFiles:
    config: DiTConfig
    weight_map: dict[str, Path]  # tensor name (the model's) -> file holding it
    stored_names: dict[str, str] = field(default_factory=dict)  # model name -> name in the file, where they differ

    def stored(self, name: str) -> str:
        return self.stored_names.get(name, name)

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.weight_map.values()))


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises several types for a damaged or foreign file
        raise ValueError(f"cannot read safetensors file {path}: {e}") from e


open_safetensors = _open  # for the LoRA files (engine/checkpoints/lora.py): the same error for a damaged file


def _names_in(path: Path) -> list[str]:
    with _open(path) as f:
        return list(f.keys())


def locate(path: str | Path, read_config: Callable[[Path], object] = DiTConfig.from_json,
           infer: Callable[[dict], object] = infer_config, rename: Callable[[str], str] | None = None,
           what: str = "Kandinsky 5") -> CheckpointFiles:
    """Find the DiT weights and config under ``path`` (pipeline root, transformer folder or single file).

    The defaults describe the Kandinsky 5 DiT; another model passes how its config.json reads, how its config is
    inferred from the tensor shapes of a single file, and ``rename``: a file's tensor name -> the model's (the
    Kandinsky 6 layouts name the same tensors differently, engine/checkpoints/k6.py).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors file; pass a {what} checkpoint folder or file")
        with _open(path) as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        names = _renamed(list(shapes), rename, path)
        beside = path.with_name("config.json")
        config = read_config(beside) if beside.exists() else infer({n: shapes[s] for n, s in names.items()})
        return _files(config, {n: path for n in names}, names)

    folder = path / "transformer" if (path / "transformer").is_dir() else path
    if not (folder / "config.json").exists():
        raise ValueError(
            f"{path} is not a {what} checkpoint: expected transformer/config.json (diffusers layout) "
            f"or a single .safetensors file"
        )
    config = read_config(folder / "config.json")
    if (folder / INDEX).exists():
        try:
            index = json.loads((folder / INDEX).read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"cannot read the shard index {folder / INDEX}: {e}") from e
        weight_map = {k: folder / f for k, f in index.items()}
        for f in set(weight_map.values()):
            if not f.exists():
                raise FileNotFoundError(f"shard {f} listed in {folder / INDEX} is missing")
    elif (folder / SINGLE).exists():
        weight_map = {k: folder / SINGLE for k in _names_in(folder / SINGLE)}
    else:
        raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {folder}")
    names = _renamed(list(weight_map), rename, folder)
    return _files(config, {n: weight_map[s] for n, s in names.items()}, names)


def _renamed(stored: list[str], rename: Callable[[str], str] | None, where: Path) -> dict[str, str]:
    """model name -> stored name; two stored tensors that land on one model name are refused."""
    if rename is None:
        return {s: s for s in stored}
    names: dict[str, str] = {}
    for s in stored:
        n = rename(s)
        if n in names:
            raise ValueError(f"{where} holds both {names[n]} and {s}, two names of the one tensor {n}: "
                             f"a checkpoint mixes two layouts")
        names[n] = s
    return names


def _files(config, weight_map: dict[str, Path], names: dict[str, str]) -> CheckpointFiles:
    return CheckpointFiles(config, weight_map, {n: s for n, s in names.items() if n != s})


# ---- every component, before anything loads -------------------------------------------------------------------

# The weight files of each component a pipeline loads (diffusers layout): one file, or shards listed in an index.
WEIGHT_FILES = {
    "transformer": (SINGLE, INDEX),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    "text_encoder": ("model.safetensors", "model.safetensors.index.json"),
    "text_encoder_2": ("model.safetensors", "model.safetensors.index.json"),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def component_weights(folder: Path, single: str, index: str) -> list[Path]:
    """The safetensors files of one component folder; ValueError naming the problem otherwise."""
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
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{folder} holds {', '.join(pickles)}, a pickle file, and no safetensors: k5 loads weights only from "
            f"safetensors (unpickling a file can run any code in it); use the release's {single} (or convert the "
            f"weights with safetensors.torch.save_file)")
    raise ValueError(f"{folder} has no weights: expected {single} (or {index} with its shards)")


def check_weights(root: str | Path, transformer: bool = True) -> None:
    """Every component's weights are safetensors files whose headers read, before any weight loads.

    Catches a missing, truncated or foreign file (a pickle .bin in place of the safetensors) in a second instead of
    after minutes of loading the components before it. ``transformer=False``: the DiT comes from another file."""
    root = Path(root)
    for component, (single, index) in WEIGHT_FILES.items():
        if component == "transformer" and not transformer:
            continue
        for path in component_weights(root / component, single, index):
            with _open(path) as f:
                if not list(f.keys()):
                    raise ValueError(f"safetensors file {path} holds no tensors")


# A reader returns the tensor a parameter should hold, given the checkpoint's lazy slice of it. The default reads
# the whole tensor; tensor parallelism passes one that reads only the rank's rows or columns.
Reader = Callable[[str, object, torch.Size], torch.Tensor]


def read_whole(name: str, sl, shape: torch.Size) -> torch.Tensor:
    return sl[:]


def load_into(
    model: nn.Module,
    ckpt: CheckpointFiles,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    reader: Reader = read_whole,
) -> None:
    """Fill a meta-device ``model`` from the checkpoint, one tensor at a time (never a second full copy).

    Every parameter must be in the checkpoint with the expected shape, and every checkpoint tensor must belong to
    the model; the error names the tensor or file otherwise.
    """
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(ckpt.weight_map))
    unexpected = sorted(set(ckpt.weight_map) - set(params))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise ValueError(f"checkpoint {ckpt.files[0].parent} does not fit the {type(model).__name__}: "
                         + "; ".join(parts))

    by_file: dict[Path, list[str]] = {}
    for name, f in ckpt.weight_map.items():
        by_file.setdefault(f, []).append(name)
    for path, names in by_file.items():
        with _open(path) as f:
            for name in names:
                param = params[name]
                sl = f.get_slice(ckpt.stored(name))
                tensor = reader(name, sl, param.shape)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(
                        f"tensor {ckpt.stored(name)} in {path} has shape {tuple(tensor.shape)}, the model expects "
                        f"{tuple(param.shape)} (does config.json match the weights?)"
                    )
                target = torch.float32 if keeps_fp32(name) else dtype
                tensor = tensor.to(device=device, dtype=target)
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def reload_into(model: nn.Module, ckpt: CheckpointFiles, names: list[str], reader: Reader = read_whole) -> None:
    """Read ``names`` again from the checkpoint into the model's parameters, in place.

    Each tensor goes through ``reader`` and the same cast as at load (the parameter keeps its dtype and device), so
    a reader that adds nothing restores exactly the values ``load_into`` gave (LoRA switching relies on this)."""
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params or n not in ckpt.weight_map]
    if unknown:
        raise KeyError(f"cannot reload {', '.join(unknown[:5])}: not a parameter of the model and the checkpoint")
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(ckpt.weight_map[name], []).append(name)
    with torch.no_grad():
        for path, group in by_file.items():
            with open_safetensors(path) as f:
                for name in group:
                    param = params[name]
                    tensor = reader(name, f.get_slice(ckpt.stored(name)), param.shape)
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise ValueError(f"tensor {name} in {path} read as {tuple(tensor.shape)}, the parameter is "
                                         f"{tuple(param.shape)}")
                    param.copy_(tensor.to(device=param.device, dtype=param.dtype))
