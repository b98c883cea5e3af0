"""The DiT's checkpoint: where its files are, and how their tensors reach a model built on the meta device.

Layouts (the key names of each format: engine/checkpoints/state_dict.py):
- diffusers: `<root>/transformer/` (or the folder itself) with config.json and either one
  `diffusion_pytorch_model.safetensors` or several shards listed in `diffusion_pytorch_model.safetensors.index.json`;
- original: one `.safetensors` file with no config (the config is inferred from the shapes, or read from a
  config.json beside it).

Every DiT (Kandinsky 5, Kandinsky 6, the K6 SR model) is built the one way (``load``): on the meta device, cut by
``prepare`` (tensor parallelism shrinks its layers to the rank's shard there), then filled one tensor at a time
through a ``Reader`` (the whole tensor, or the rank's rows or columns) with the LoRA adapters merged in as each
weight is read. The model classes know nothing of files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from k5.engine.checkpoints import lora
from k5.engine.checkpoints.files import (DIT_INDEX, DIT_SINGLE, Checkpoint, TensorInfo, check_components,
                                         open_safetensors, read_headers, weight_files)
from k5.engine.checkpoints.state_dict import K5, K6, K6_SR, DiTFormat


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
class DiTFiles:
    """A located DiT: its config as stored (or inferred), which file holds each tensor, and every tensor's header."""

    config: object  # DiTConfig, K6Config or SRConfig
    weight_map: dict[str, Path]  # tensor name (the model's) -> file holding it
    stored_names: dict[str, str] = field(default_factory=dict)  # model name -> name in the file, where they differ
    tensors: dict[str, TensorInfo] = field(default_factory=dict, repr=False)  # stored name -> header entry

    def stored(self, name: str) -> str:
        return self.stored_names.get(name, name)

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.weight_map.values()))


def locate(path: str | Path, fmt: DiTFormat = K5) -> DiTFiles:
    """Find the DiT weights and config under ``path`` (pipeline root, transformer folder or single file) and read
    their headers (once: the ``Checkpoint`` keeps them). ``fmt``: the DiT's checkpoint format."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors file; pass a {fmt.name} checkpoint folder or file")
        tensors = read_headers([path])
        names = fmt.renamed(list(tensors), path)
        beside = path.with_name("config.json")
        config = fmt.read_config(beside) if beside.exists() else fmt.infer_config(
            {n: tensors[s].shape for n, s in names.items()})
        return _files(config, {n: path for n in names}, names, tensors)

    folder = path / "transformer" if (path / "transformer").is_dir() else path
    if not (folder / "config.json").exists():
        raise ValueError(
            f"{path} is not a {fmt.name} checkpoint: expected transformer/config.json (diffusers layout) "
            f"or a single .safetensors file"
        )
    config = fmt.read_config(folder / "config.json")
    if (folder / DIT_INDEX).exists():
        try:
            index = json.loads((folder / DIT_INDEX).read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"cannot read the shard index {folder / DIT_INDEX}: {e}") from e
        weight_map = {k: folder / f for k, f in index.items()}
        for f in set(weight_map.values()):
            if not f.exists():
                raise FileNotFoundError(f"shard {f} listed in {folder / DIT_INDEX} is missing")
        tensors = read_headers(sorted(set(weight_map.values())))
    elif (folder / DIT_SINGLE).exists():
        tensors = read_headers([folder / DIT_SINGLE])
        weight_map = {k: folder / DIT_SINGLE for k in tensors}
    else:
        weight_files(folder, DIT_SINGLE, DIT_INDEX)  # a pickle file in place of the safetensors is named as such
        raise FileNotFoundError(f"no {DIT_SINGLE} or {DIT_INDEX} in {folder}")
    names = fmt.renamed(list(weight_map), folder)
    return _files(config, {n: weight_map[s] for n, s in names.items()}, names, tensors)


def _files(config, weight_map: dict[str, Path], names: dict[str, str], tensors) -> DiTFiles:
    return DiTFiles(config, weight_map, {n: s for n, s in names.items() if n != s}, tensors)


# ---- building and filling a model -------------------------------------------------------------------------------

# A reader returns the tensor a parameter should hold, given the checkpoint's lazy slice of it. The default reads
# the whole tensor; tensor parallelism passes one that reads only the rank's rows or columns.
Reader = Callable[[str, object, torch.Size], torch.Tensor]


def read_whole(name: str, sl, shape: torch.Size) -> torch.Tensor:
    return sl[:]


def load_into(
    model: nn.Module,
    ckpt: DiTFiles,
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
        with open_safetensors(path) as f:
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


def reload_into(model: nn.Module, ckpt: DiTFiles, names: list[str], reader: Reader = read_whole) -> None:
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


def load(cls: type[nn.Module], files: DiTFiles, dtype: torch.dtype = torch.bfloat16, device="cpu", *,
         config=None, reader: Reader = read_whole, prepare: Callable[[nn.Module], None] | None = None,
         adapters: Sequence[lora.LoraAdapter] = (),
         factor_reader: lora.FactorReader = lora.read_whole_factor) -> nn.Module:
    """A ``cls`` DiT from ``files``: built on meta with ``config`` (default: the checkpoint's), ``prepare(model)``
    run on the meta model before any tensor is read, then filled through ``reader`` with the LoRA ``adapters``
    (engine.checkpoints.lora.open_lora; checked against the full, uncut shapes) merged as the weights are read
    (``factor_reader``: the part of each factor this rank's slice needs). Returned in eval mode, no grad; the
    adapters merged are ``model.lora_adapters``."""
    with torch.device("meta"):
        model = cls(config or files.config)
    adapters = tuple(adapters)
    lora.check_fits(adapters, lora.linear_shapes(model))  # before prepare: the full shapes
    if prepare is not None:
        prepare(model)
    with lora.merging_reader(reader, adapters, factor_reader, device) as merged:
        load_into(model, files, dtype, device, merged)
    model.lora_adapters = adapters
    return model.eval().requires_grad_(False)


def _located(path_or_files, fmt: DiTFormat) -> DiTFiles:
    return path_or_files if isinstance(path_or_files, DiTFiles) else locate(path_or_files, fmt)


def load_dit(path_or_files, dtype: torch.dtype = torch.bfloat16, device="cpu", **kwargs):
    """The Kandinsky 5 DiT from a checkpoint folder, a single file or already located ``DiTFiles``; ``kwargs``
    as ``load`` (config, reader, prepare, adapters, factor_reader)."""
    from k5.engine.model.dit import Kandinsky5DiT

    return load(Kandinsky5DiT, _located(path_or_files, K5), dtype, device, **kwargs)


def load_k6_dit(path_or_files, dtype: torch.dtype = torch.bfloat16, device="cpu", **kwargs):
    """The Kandinsky 6 video/audio DiT (diffusers folder or original single file), as ``load_dit``."""
    from k5.engine.model.k6_dit import Kandinsky6DiT

    return load(Kandinsky6DiT, _located(path_or_files, K6), dtype, device, **kwargs)


def load_k6_sr(path_or_files, dtype: torch.dtype = torch.bfloat16, device="cpu", **kwargs):
    """The Kandinsky 6 super-resolution DiT, as ``load_dit``."""
    from k5.engine.model.k6_sr import Kandinsky6SR

    return load(Kandinsky6SR, _located(path_or_files, K6_SR), dtype, device, **kwargs)


def switch_adapters(model: nn.Module, path_or_files, adapters: Sequence[lora.LoraAdapter],
                    reader: Reader = read_whole,
                    factor_reader: lora.FactorReader = lora.read_whole_factor) -> list[str]:
    """Make ``model`` (loaded from ``path_or_files``, a checkpoint or its located DiTFiles, with
    ``model.lora_adapters`` merged) hold ``adapters``.

    Every tensor the old or the new adapters touch is read again from the base checkpoint (through ``reader``, so a
    tensor-parallel rank reads its slices only) and the new adapters are merged into it: the base weights come
    back bit for bit, nothing is subtracted in low precision. Returns the names re-read (none if unchanged)."""
    adapters = tuple(adapters)
    old = tuple(getattr(model, "lora_adapters", ()))
    if lora.same_adapters(old, adapters):
        return []
    lora.check_fits(adapters, lora.dit_linear_shapes(model.config))  # full shapes: a tp rank's are cut
    touched = sorted({name for ad in (*old, *adapters) for name in ad.targets})
    device = next(model.parameters()).device
    with lora.merging_reader(reader, adapters, factor_reader, device) as merged:
        reload_into(model, _located(path_or_files, K5), touched, merged)
    model.lora_adapters = adapters
    return touched


def open_checkpoint(source) -> Checkpoint:
    """The checked ``Checkpoint`` of a source: a Checkpoint itself, what ``resolve_model`` returned (its ``open``), or
    a diffusers-layout folder (every component folder, then every header)."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, (str, os.PathLike)):
        check_components(source)
        return Checkpoint.open(source, locate(source))
    return source.open()  # engine.catalogue.resolve.Resolved
