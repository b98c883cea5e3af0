"""LoRA adapters for the DiT: read from safetensors headers, checked against the model, merged into the weights.

Accepted files (safetensors only; a pickle file is refused, never unpickled):
- diffusers, as `KandinskyLoraLoaderMixin.save_lora_weights` writes it (`pytorch_lora_weights.safetensors`): keys
  `transformer.<module>.lora_A.weight` / `.lora_B.weight` as peft's `get_peft_model_state_dict` names them, and the
  peft LoraConfig as JSON in the header's `lora_adapter_metadata`, each field prefixed `transformer.`;
- peft's `save_pretrained` (`adapter_model.safetensors` + `adapter_config.json`): keys `base_model.model.<module>...`;
- the official Kandinsky 5 LoRA repos (`lora.safetensors` + `config_lora.json`, a trigger phrase in the header);
- the module names alone (the original checkpoint naming, which is also diffusers'), `lora_down`/`lora_up` for
  A/B, an adapter-name infix (`lora_A.default.weight`) and kohya `<module>.alpha` scalars.
Module names are the DiT's own (original checkpoint == diffusers, kandinsky5-architecture.md 2.9).

The scaling is peft's: alpha / r per module (alpha / sqrt(r) with use_rslora), r and alpha from the config's
rank_pattern / alpha_pattern when they name the module; with no config, alpha = r (scale 1), which is what diffusers
assumes for a file without metadata. The user's scale multiplies it, like diffusers' `set_adapters(weights=...)`.

Merging: W' = W + sum_i scale_i * s_i * B_i @ A_i in fp32, then cast to the parameter's dtype, while the weight is
read: ``merging_reader`` wraps a checkpoint reader. Under tensor parallelism the factor reader hands each rank only
the rows of B (column-parallel layers) or the columns of A (row-parallel layers) that its slice of W needs.
Switching adapters re-reads the base tensors from the checkpoint (engine.checkpoints.dit.switch_adapters): nothing is
subtracted. The key conventions of each format are in engine/checkpoints/state_dict.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from k5.engine.checkpoints.files import open_safetensors
from k5.engine.checkpoints.state_dict import LORA_ALPHA, LORA_FACTOR, LORA_UNSUPPORTED, lora_module

# Files a folder may hold, in the order they are looked for: diffusers, peft, the official LoRA repos.
WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "lora.safetensors")
CONFIG_NAMES = ("adapter_config.json", "config_lora.json")  # beside the file, when the header has no config
HEADER_CONFIG = "lora_adapter_metadata"  # diffusers' header key (loaders/lora_base.py LORA_ADAPTER_METADATA_KEY)
PEFT_DEFAULT_R = PEFT_DEFAULT_ALPHA = 8  # LoraConfig's defaults, for a config that leaves them out


class LoraError(ValueError):
    """A LoRA file or --lora argument that cannot be used (bad input: the CLI exits with code 2)."""


@dataclass(frozen=True)
class LoraTarget:
    """One adapted Linear: where its factors are in the file and how much they count."""

    weight: str  # DiT parameter name, e.g. 'visual_transformer_blocks.0.self_attention.to_query.weight'
    a_key: str  # file key of A [rank, in_features]
    b_key: str  # file key of B [out_features, rank]
    rank: int
    out_features: int
    in_features: int
    scaling: float  # alpha / r (peft), before the user's scale


@dataclass(frozen=True)
class LoraAdapter:
    path: Path  # the safetensors file
    sha256: str
    scale: float
    targets: dict[str, LoraTarget] = field(repr=False)  # by DiT parameter name
    config_source: str  # "header", a config file's path, "alpha keys", or "none (alpha = rank)"
    trigger: str | None = None  # the official LoRAs' trigger phrase (header "trigger")

    @property
    def key(self) -> tuple[str, float]:
        """Identity for switching: the same file content at the same scale is the same adapter."""
        return self.sha256, self.scale

    def record(self) -> dict:
        """What a manifest stores about this adapter."""
        ranks = sorted({t.rank for t in self.targets.values()})
        return {"path": str(self.path), "sha256": self.sha256, "scale": self.scale, "layers": len(self.targets),
                "ranks": ranks, "config": self.config_source, "trigger": self.trigger}


def parse_lora_spec(text: str, what: str = "--lora") -> tuple[Path, float]:
    """``--lora PATH[:SCALE]`` -> (path, scale). A path that exists as written keeps any ':' it contains.
    ``what`` names the argument in messages (a flag, or a prompt file's field)."""
    if Path(text).exists() or ":" not in text:
        path, scale_text = text, "1"
    else:
        path, scale_text = text.rsplit(":", 1)
    try:
        scale = float(scale_text)
    except ValueError:
        raise LoraError(f"{what} {text}: scale {scale_text!r} is not a number; use PATH or PATH:SCALE, e.g. "
                        f"{path}:0.8") from None
    check_scale(scale, f"{what} {text}")
    return Path(path), scale


def check_scale(scale, what: str = "LoRA") -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoraError(f"{what}: scale {scale!r} is not a finite number; give one like 1.0 or 0.5")
    return float(scale)


def find_weights(path: str | Path) -> Path:
    """The safetensors file of a LoRA given as a file or a folder."""
    path = Path(path)
    if not path.exists():
        raise LoraError(f"LoRA {path} does not exist; pass a LoRA .safetensors file or its folder")
    if path.is_file():
        return path
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = (f"; {', '.join(others)} are pickle files, which are never unpickled: convert them to safetensors"
            if others else "")
    what = f"{len(found)} .safetensors files ({', '.join(p.name for p in found)})" if found else "no .safetensors file"
    raise LoraError(f"LoRA folder {path} has {what}; expected one of {', '.join(WEIGHT_NAMES)}, or pass the file"
                    + hint)


def _read_header(file: Path) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """{key: (shape, dtype)} and the header metadata, reading nothing but the header."""
    with open(file, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip (PK) or a raw pickle (0x80); neither is ever handed to a loader here.
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise LoraError(f"LoRA {file} is a pickle (torch.save) file; pickle files are never unpickled: convert it to "
                        f"safetensors (safetensors.torch.save_file) and pass that")
    try:
        with open_safetensors(file) as f:
            info = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            meta = f.metadata() or {}
    except ValueError as e:
        raise LoraError(f"LoRA {file} is not a readable safetensors file ({e}); pass a .safetensors LoRA") from None
    return info, meta


def _config(file: Path, meta: dict) -> tuple[dict | None, str]:
    raw = meta.get(HEADER_CONFIG)
    if raw:
        try:
            cfg = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LoraError(f"LoRA {file}: header field {HEADER_CONFIG} is not JSON ({e})") from None
        # diffusers prefixes every field with the component ("transformer.r"); peft's own files do not.
        return {k.removeprefix("transformer."): v for k, v in cfg.items()}, "header"
    for name in CONFIG_NAMES:
        beside = file.parent / name
        if beside.is_file():
            try:
                return json.loads(beside.read_text()), str(beside)
            except (OSError, json.JSONDecodeError) as e:
                raise LoraError(f"LoRA config {beside} cannot be read: {e}") from None
    return None, ""


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first pattern that
    matches the module name as a dotted suffix (or as an anchored regex, as diffusers writes them with '^')."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _unmatched(file: Path, keys: list[str], why: str) -> LoraError:
    shown = ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
    return LoraError(f"LoRA {file}: {why}: {shown}")


def open_lora(path: str | Path, scale: float = 1.0) -> LoraAdapter:
    """Read a LoRA's header (and its config) and hash the file; no tensor is loaded.

    Raises LoraError (a ValueError) for anything wrong with it on its own, a missing file included; ``check_fits``
    then checks it against the model.
    """
    scale = check_scale(scale, f"LoRA {path}")
    file = find_weights(path)
    info, meta = _read_header(file)
    if not info:
        raise LoraError(f"LoRA {file} holds no tensors")
    for pattern, what in LORA_UNSUPPORTED:
        bad = sorted(k for k in info if pattern.search(k))
        if bad:
            raise _unmatched(file, bad, f"{what} is not supported, only plain LoRA (A/B factors); keys")
    cfg, source = _config(file, meta)
    if cfg is not None:
        for flag, what in (("use_dora", "DoRA"), ("lora_bias", "a LoRA bias"), ("fan_in_fan_out", "fan_in_fan_out")):
            if cfg.get(flag):
                raise LoraError(f"LoRA {file}: its config sets {flag} ({what}), which is not supported")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise LoraError(f"LoRA {file}: peft_type {cfg['peft_type']!r} is not supported, only LORA")

    factors: dict[str, dict[str, str]] = {}
    alphas: dict[str, str] = {}
    names, unknown = set(), []
    for key in info:
        bare = lora_module(key)
        if m := LORA_FACTOR.match(bare):
            which = "A" if m["kind"] in ("lora_A", "lora_down") else "B"
            other = factors.setdefault(m["module"], {}).setdefault(which, key)
            if other != key:
                raise LoraError(f"LoRA {file}: {other} and {key} are both factor {which} of {m['module']}")
            names.add(m["name"])
        elif m := LORA_ALPHA.match(bare):
            alphas[m["module"]] = key
        else:
            unknown.append(key)
    if unknown:
        raise _unmatched(file, sorted(unknown), "keys that are not LoRA factors (expected <module>.lora_A.weight / "
                                                ".lora_B.weight)")
    if len(names) > 1:
        raise LoraError(f"LoRA {file} holds several adapters ({', '.join(sorted(map(str, names)))}); pass one")
    lonely = sorted(f"{m} (has only {'A' if 'A' in f else 'B'})" for m, f in factors.items() if len(f) != 2)
    if lonely:
        raise _unmatched(file, lonely, "modules without both factors")
    if alphas.keys() - factors.keys():
        raise _unmatched(file, sorted(alphas[m] for m in alphas.keys() - factors.keys()), "alpha keys of no factor")

    alpha_values = _read_alphas(file, alphas) if alphas else {}
    if alpha_values and cfg is None:
        source = "alpha keys"
    targets = {}
    for module, f in sorted(factors.items()):
        a_shape, b_shape = info[f["A"]][0], info[f["B"]][0]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise LoraError(f"LoRA {file}: {module} has A {a_shape} and B {b_shape}; a LoRA needs A [rank, in] and "
                            f"B [out, rank] with the same rank")
        rank = a_shape[0]
        if module in alpha_values:
            scaling = alpha_values[module] / rank  # kohya convention
        elif cfg is not None:
            r = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", PEFT_DEFAULT_R))
            alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA))
            if r != rank:
                raise LoraError(f"LoRA {file}: {module} has rank {rank} factors but its config ({source}) says "
                                f"r={r}; the config does not belong to these weights")
            scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        else:
            scaling = 1.0  # diffusers without metadata: alpha = rank
        if not math.isfinite(scaling):
            raise LoraError(f"LoRA {file}: {module} has a non-finite scaling alpha/r = {scaling}")
        targets[module + ".weight"] = LoraTarget(module + ".weight", f["A"], f["B"], rank, b_shape[0], a_shape[1],
                                                 float(scaling))
    trigger = meta.get("trigger") or None
    return LoraAdapter(file.resolve(), sha256_file(file), scale, targets, source or "none (alpha = rank)", trigger)


def _read_alphas(file: Path, alphas: dict[str, str]) -> dict[str, float]:
    # Scalars, not weights: reading them is part of checking the file.
    out = {}
    with open_safetensors(file) as f:
        for module, key in alphas.items():
            t = f.get_tensor(key)
            if t.numel() != 1:
                raise LoraError(f"LoRA {file}: {key} has shape {tuple(t.shape)}, an alpha is one number")
            out[module] = float(t.float().item())
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{weight name: (out, in)} of every nn.Linear (works on a meta model: no weight is needed)."""
    return {f"{name}.weight": tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def dit_linear_shapes(config) -> dict[str, tuple[int, int]]:
    """The full (unsliced) Linear shapes of a Kandinsky5DiT with ``config`` (built on meta)."""
    from k5.engine.model.dit import meta_dit

    return linear_shapes(meta_dit(config))


def check_fits(adapters: Sequence[LoraAdapter], shapes: dict[str, tuple[int, int]]) -> None:
    """Every adapter key must name a Linear of the model with matching in/out features (headers only)."""
    for ad in adapters:
        missing = sorted(t.a_key for t in ad.targets.values() if t.weight not in shapes)
        if missing:
            raise _unmatched(ad.path, missing, "keys that match no Linear layer of the Kandinsky 5 DiT "
                                               "(is this a LoRA for another model?)")
        for t in ad.targets.values():
            out_f, in_f = shapes[t.weight]
            if (t.out_features, t.in_features) != (out_f, in_f):
                raise LoraError(
                    f"LoRA {ad.path}: {t.weight.removesuffix('.weight')} factors give a [{t.out_features}, "
                    f"{t.in_features}] update (B [{t.out_features}, {t.rank}] @ A [{t.rank}, {t.in_features}]) "
                    f"but the layer's weight is [{out_f}, {in_f}]; the LoRA was made for another model size"
                )


# A factor reader returns the part of a LoRA factor ("A" or "B") that this rank's slice of the weight needs, given
# the file's lazy slice of the factor. One process reads the whole factor; tensor parallelism passes its own.
FactorReader = Callable[[str, str, object], Tensor]


def read_whole_factor(weight: str, which: str, sl) -> Tensor:
    return sl[:]


@contextlib.contextmanager
def merging_reader(base: Callable, adapters: Sequence[LoraAdapter], factor_reader: FactorReader = read_whole_factor,
                   device="cpu") -> Iterator[Callable]:
    """A checkpoint reader (engine.checkpoints.dit.Reader) that returns ``base``'s tensor with the adapters merged in
    (fp32, on ``device``).

    Untouched tensors pass through unchanged; touched ones come back fp32 and are cast by the loader once."""
    device = torch.device(device)
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open_safetensors(ad.path)) for ad in adapters]

        def read(name: str, sl, shape: torch.Size) -> Tensor:
            tensor = base(name, sl, shape)
            terms = [(ad, ad.targets[name], f) for ad, f in zip(adapters, files) if name in ad.targets]
            if not terms:
                return tensor
            w = tensor.to(device=device, dtype=torch.float32, copy=True)
            for ad, t, f in terms:
                a = factor_reader(name, "A", f.get_slice(t.a_key)).to(device=device, dtype=torch.float32)
                b = factor_reader(name, "B", f.get_slice(t.b_key)).to(device=device, dtype=torch.float32)
                if (b.shape[0], a.shape[1]) != tuple(w.shape) or a.shape[0] != b.shape[1]:
                    raise LoraError(f"LoRA {ad.path}: {name} slice {tuple(w.shape)} does not match the factor slices "
                                    f"B {tuple(b.shape)} @ A {tuple(a.shape)}")
                w.addmm_(b, a, alpha=ad.scale * t.scaling)
            return w

        yield read


def same_adapters(a: Sequence[LoraAdapter], b: Sequence[LoraAdapter]) -> bool:
    return [x.key for x in a] == [x.key for x in b]


class AdapterOpener:
    """``opener(spec, folder=None, what="--lora") -> LoraAdapter`` for a ``PATH[:SCALE]``: each file's header is read
    and hashed once, and checked against the Linear shapes of the DiT of ``config`` (``check_fits``) before any
    weight loads; LoraError (a ValueError) otherwise. A relative PATH is taken in ``folder`` when one is given (a
    prompt file's folder)."""

    def __init__(self, config):
        self.config, self.shapes, self.by_file = config, None, {}

    def __call__(self, spec: str, folder: Path | None = None, what: str = "--lora") -> LoraAdapter:
        path, scale = parse_lora_spec(spec, what)
        path = path.expanduser()
        if folder is not None and not path.is_absolute():
            path = folder / path
        key = path.resolve()
        if key not in self.by_file:
            adapter = open_lora(path)
            if self.shapes is None:
                self.shapes = dit_linear_shapes(self.config)
            check_fits([adapter], self.shapes)
            self.by_file[key] = adapter
        adapter = self.by_file[key]
        return adapter if adapter.scale == scale else replace(adapter, scale=scale)
