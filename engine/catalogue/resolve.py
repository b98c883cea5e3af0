"""What ``--model`` names, turned into files on this machine, a DiT config and a catalogue variant.

``--model`` may be:
- a local folder in the diffusers layout (``transformer/``, ``vae/``, ``text_encoder/``, ...);
- a Hugging Face repo id (``kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers``, optionally ``@revision``),
  found in the local Hugging Face cache, never downloaded: a repo that is not there is an error naming the command
  that downloads it;
- ``tiny`` (the built-in tiny model, engine/catalogue/tiny.py): random weights in the real layout for a CPU; a variant of its
  task gives it the variant's sampling settings (steps, guidance, shift, MagCache ratios) and nothing else;
- an original single-file checkpoint (``kandinsky5lite_t2v_sft_10s.safetensors``, or an original-format repo or
  folder holding ``model/<name>.safetensors``). It carries no settings, so its variant (given, or recognised from
  the file or repo name) sets the attention: config inference alone would run a NABLA-trained 10 s or HD model
  dense. Its VAE and text encoders come from a diffusers-layout folder (``components``), or from any Kandinsky 5
  -Diffusers repo of the same kind in the cache.

The variant is recognised from the repo id or folder name, or given; a given variant must fit the checkpoint's
shapes (a Pro variant on Lite weights is an error naming both). Nothing here reads a weight, only safetensors
headers and JSON.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from k5.engine.catalogue import variants
from k5.engine.catalogue.variants import Variant, VariantError
from k5.engine.checkpoints.dit import DiTFiles, locate
from k5.engine.checkpoints.files import OTHER_COMPONENTS, Checkpoint, check_components, missing_components
from k5.engine.model.config import DiTConfig

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
DIFFUSERS_MARKERS = ("model_index.json", "transformer")
# The built-in tiny models: ``--model`` name -> (engine.catalogue.tiny.tiny_checkpoint kind, the tasks it runs, its own
# request defaults: a size a CPU runs in seconds). "tiny-image" is two checkpoints, one per task (kind "t2i" or
# "i2i", chosen by the task); its images take the buckets' sizes (1024-class: 4096 tokens, about 20 s an image with 4
# steps on two CPU cores).
TINY_MODELS = {"tiny": ("video", ("t2v", "i2v"), {"height": 128, "width": 128, "num_frames": 9, "steps": 4}),
               "tiny-image": ("by task", ("t2i", "i2i"), {"steps": 4}),
               # Kandinsky 6 (engine/catalogue/k6_tiny.py): video with audio; an image makes it I2AV. sft: Euler
               # with guidance (the released sft default 5.0); distill: PiFlow at guidance 1.
               "tiny-k6": ("sft", ("t2av",), {"height": 64, "width": 64, "num_frames": 9, "steps": 4,
                                               "guidance_scale": 5.0}),
               "tiny-k6-distill": ("distill", ("t2av",), {"height": 64, "width": 64, "num_frames": 9, "steps": 2,
                                                          "guidance_scale": 1.0})}
K6_TINY = ("tiny-k6", "tiny-k6-distill")
# model_index.json ``_class_name`` of the diffusers pipelines -> the task of a -Diffusers checkpoint.
PIPELINE_TASKS = {"Kandinsky5T2VPipeline": "t2v", "Kandinsky5I2VPipeline": "i2v", "Kandinsky5T2IPipeline": "t2i",
                  "Kandinsky5I2IPipeline": "i2i"}
class ResolveError(ValueError):
    """--model or --variant names nothing usable; the message says what would be."""


def hub_cache(cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face hub cache folder, with huggingface_hub's precedence of environment variables."""
    if cache_dir:
        return Path(cache_dir)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def download_hint(repo: str, exclude: str | None = None) -> str:
    extra = f" --exclude '{exclude}'" if exclude else ""
    return f"hf download {repo}{extra}  (older huggingface_hub: huggingface-cli download {repo}{extra})"


def closest_repos(repo: str) -> list[str]:
    """The catalogue's repo ids that a repo id not in it was probably meant to be (a typo: case, a letter, a
    swapped part), best first; empty for a name unlike all of them, which may well be some other real repo."""
    known = {r.lower(): r for v in variants.VARIANTS.values() for r in v.repos}
    if repo in known.values():
        return []
    if repo.lower() in known:  # the hub cache's folder names keep the case the repo was created with
        return [known[repo.lower()]]
    return [known[m] for m in difflib.get_close_matches(repo.lower(), known, n=3, cutoff=0.8)]


def cached_snapshot(repo: str, cache_dir: str | Path | None = None) -> tuple[Path, str] | None:
    """(snapshot folder, commit) of ``repo[@revision]`` in the hub cache, or None when it is not there."""
    repo, _, revision = repo.partition("@")
    revision = revision or "main"
    base = hub_cache(cache_dir) / ("models--" + repo.replace("/", "--"))
    snapshots = base / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = base / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    if (snapshots / commit).is_dir():
        return snapshots / commit, commit
    found = [p for p in snapshots.iterdir() if p.is_dir()]
    if revision == "main" and not ref.is_file() and len(found) == 1:  # downloaded by commit, no ref written
        return found[0], found[0].name
    return None


def _single_file_in(folder: Path, variant: Variant | None) -> Path | None:
    """The original-format weights in a repo snapshot or folder: ``model/<variant's file>`` or the only one."""
    if variant is not None and (folder / variant.weights).is_file():
        return folder / variant.weights
    files = sorted((folder / "model").glob("*.safetensors")) if (folder / "model").is_dir() else []
    return files[0] if len(files) == 1 else None


def _recognise_file(path: Path) -> Variant | None:
    matches = [v for v in variants.VARIANTS.values() if Path(v.weights).name == path.name]
    return matches[0] if matches else None  # SD/HD rows share a file: the first (HD) is the default


def _components(variant: Variant | None, config: DiTConfig, given: str | Path | None,
                cache_dir: str | Path | None) -> Path:
    """A diffusers-layout folder to take the VAE and text encoders from, for a single-file DiT."""
    if given is not None:
        root = Path(given)
        missing = missing_components(root, transformer=False)
        if missing:
            raise ResolveError(f"components folder {root} lacks {', '.join(m + '/' for m in missing)} (expected a "
                               f"Kandinsky 5 -Diffusers folder: {', '.join(OTHER_COMPONENTS)})")
        return root
    family = variants.family_of(config)
    image = family == "image-lite"
    candidates = [variant.diffusers_repo] if variant is not None and variant.diffusers_repo else []
    candidates += [v.diffusers_repo for v in variants.VARIANTS.values()
                   if v.diffusers_repo and (v.family == "image-lite") == image and v.diffusers_repo not in candidates]
    for repo in candidates:
        snap = cached_snapshot(repo, cache_dir)
        if snap is not None and not missing_components(snap[0], transformer=False):
            return snap[0]
    suggest = candidates[0] if candidates else "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers"
    raise ResolveError(
        "a single-file checkpoint holds only the DiT; the VAE and text encoders come from a Kandinsky 5 -Diffusers "
        f"folder, and none is in the Hugging Face cache {hub_cache(cache_dir)}. Pass one as the components folder, "
        f"or download one without its transformer: {download_hint(suggest, 'transformer/*')}"
    )


def checkpoint_task(root: Path) -> str | None:
    """The task a diffusers-layout folder declares (its model_index.json pipeline class), None when it does not."""
    try:
        name = json.loads((Path(root) / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return PIPELINE_TASKS.get(name)


@dataclass(frozen=True)
class Resolved:
    model: str  # what was asked for
    kind: str  # "folder" (diffusers layout), "file" (original single file) or "tiny" (a built-in tiny model)
    root: Path  # diffusers-layout folder: the VAE, text encoders (and the DiT unless ``kind == "file"``)
    dit: Path  # where the DiT is: ``root`` or the single file
    config: DiTConfig  # the DiT config to build with (the variant's attention applied)
    variant: Variant | None
    variant_from: str | None  # "given" or "recognised"
    repo: str | None = None  # the hub repo id, when --model was one
    revision: str | None = None  # its cached commit
    task: str | None = None  # t2v | i2v | t2i | i2i | t2av: the variant's, else the folder's, else None
    files: DiTFiles | None = field(default=None, compare=False, repr=False)  # the DiT located (read once)

    @property
    def k6(self) -> bool:
        """A Kandinsky 6 video+audio checkpoint (engine.pipelines.k6)."""
        from k5.engine.model.k6_config import K6Config

        return isinstance(self.config, K6Config)

    def open(self) -> Checkpoint:
        """Every weight file of the checkpoint listed and its header read (once per run: the loaders and the memory
        estimate take what this finds)."""
        return Checkpoint.open(self.root, self.files or locate(self.dit))

    def defaults(self) -> dict:
        """Request settings the variant sets (flags override them): steps, guidance, shift, and for a real
        checkpoint the size and frames; a tiny model has its own size (and 4 steps without a variant). A ``shift``
        of None leaves the folder's scheduler config in charge. Empty for a checkpoint without a variant."""
        if self.kind == "tiny":
            return {**TINY_MODELS[self.model][2], **(self.variant.sampling() if self.variant else {})}
        if self.k6 and self.variant is None:
            from k5.engine.catalogue import k6_variants

            known = k6_variants.recognise(self.repo or self.root.name)
            return known.defaults() if known else {}
        return self.variant.defaults() if self.variant else {}

    @property
    def mag_ratios(self) -> tuple[float, ...] | None:
        return self.variant.mag_ratios if self.variant else None

    def describe(self) -> dict:
        """For the manifest record and the summary."""
        return {"model": self.model, "kind": self.kind, "root": str(self.root), "dit": str(self.dit),
                "repo": self.repo, "revision": self.revision, "task": self.task,
                "variant": self.variant.name if self.variant else None, "variant_from": self.variant_from}


def _choose_variant(given: str | None, recognised: Variant | None, what: str) -> tuple[Variant | None, str | None]:
    if given is None:
        return recognised, "recognised" if recognised else None
    variant = variants.get(given)
    if recognised is not None and recognised.task != variant.task:
        raise VariantError(f"variant {variant.name} is a {variant.task} model, but {what} is the {recognised.task} "
                           f"checkpoint {recognised.repo}: use one of its variants ({recognised.name}, ...)")
    return variant, "given"


def resolve_model(model: str, variant: str | None = None, *, components: str | Path | None = None,
                  cache_dir: str | Path | None = None, tiny_attention: str = "regular",
                  tiny_task: str | None = None) -> Resolved:
    """Turn ``--model`` (and ``--variant``) into files, a config and a variant; raise ResolveError / VariantError
    (both ValueError) with one message naming what is wrong and what would be right.

    ``tiny_attention`` ("regular" or "nabla"): which tiny checkpoint ``--model tiny`` means (built on first use);
    ``tiny_task``: which of a tiny model's tasks is asked for (``tiny-image``: its t2i or its i2i checkpoint;
    default: the variant's task, else the model's first)."""
    if model in K6_TINY:
        return _resolve_k6_tiny(model, variant)
    if model in TINY_MODELS:
        return _resolve_tiny(model, variant, tiny_attention, tiny_task)
    path, repo, revision, recognised = Path(model).expanduser(), None, None, None
    if not path.exists():
        if not REPO_ID.match(model):
            tiny = difflib.get_close_matches(model, TINY_MODELS, n=1, cutoff=0.7)
            raise ResolveError(f"--model {model}: no such file or folder, and not a Hugging Face repo id "
                               f"(org/name); " + (f"did you mean {tiny[0]}? " if tiny else "")
                               + "pass a Kandinsky 5 checkpoint folder, a .safetensors file, a repo id, "
                               + " or ".join(TINY_MODELS))
        snap = cached_snapshot(model, cache_dir)
        close = closest_repos(model.partition("@")[0]) if snap is None else []
        if close:
            raise ResolveError(f"--model {model}: no such local path, and no repo of that name in the Hugging Face "
                               f"cache {hub_cache(cache_dir)}; did you mean {close[0]}"
                               + (f" (or {', '.join(close[1:])})" if close[1:] else "") + f"? (`k5 variants` "
                               f"lists the official checkpoints; nothing is downloaded at run time: "
                               f"{download_hint(close[0])})")
        if snap is None:
            raise ResolveError(f"--model {model}: no such local path, and the repo is not in the Hugging Face cache "
                               f"{hub_cache(cache_dir)} (nothing is downloaded at run time); download it first: "
                               f"{download_hint(model.partition('@')[0])}")
        path, revision = snap
        repo = model.partition("@")[0]
        if _is_k6(path):
            return _resolve_k6(model, path, variant, repo, revision)
        recognised = variants.recognise(repo)
    elif path.is_dir() and _is_k6(path):
        return _resolve_k6(model, path, variant)
    elif path.is_dir():
        snapshot_of = next((p.name for p in path.resolve().parents if p.name.startswith("models--")), None)
        recognised = variants.recognise(path.name) or (variants.recognise(snapshot_of) if snapshot_of else None)
    else:
        recognised = _recognise_file(path)
    chosen, chosen_from = _choose_variant(variant, recognised, f"--model {model}")

    # A folder that is no original-format release (model/*.safetensors) must be a diffusers-layout one: its
    # component folders are checked first, so a missing or misplaced component is named as such.
    if path.is_dir() and (any((path / m).exists() for m in DIFFUSERS_MARKERS) or not (path / "model").is_dir()):
        check_components(path)
        files = locate(path)
        config, kind, root, dit = files.config, "folder", path, path
    else:
        if path.is_dir():
            single = _single_file_in(path, chosen)
            if single is None:
                raise ResolveError(
                    f"--model {model}: {path} is neither a diffusers-layout folder (model_index.json, transformer/) "
                    f"nor an original release holding one model/*.safetensors")
            if chosen is None:
                chosen = _recognise_file(single)
                chosen_from = "recognised" if chosen else None
        else:
            single = path
        if not single.exists():  # a cache symlink to a blob that never finished downloading
            raise ResolveError(f"{single} is missing (an interrupted download?); "
                               f"{download_hint(repo) if repo else 'copy the checkpoint again'}")
        files = locate(single)
        config = files.config
        if chosen is None and not single.with_name("config.json").exists():
            family = variants.family_of(config)
            fitting = [v.name for v in variants.VARIANTS.values() if v.family == family]
            raise VariantError(
                f"--model {model} is a single-file checkpoint, which carries no settings (attention, steps, "
                f"guidance); name its variant with --variant" + (f": one of {', '.join(fitting)}" if fitting else ""))
        kind, dit = "file", single
        root = _components(chosen, config, components, cache_dir)

    if chosen is not None:
        variants.check_fits(chosen, config, f"--model {model}")
        config = chosen.configure(config)
    task = chosen.task if chosen is not None else checkpoint_task(root) if kind == "folder" else None
    return Resolved(model, kind, root, dit, config, chosen, chosen_from, repo, revision, task, files)


def _is_k6(path: Path) -> bool:
    from k5.engine.pipelines.k6 import is_k6_checkpoint

    return is_k6_checkpoint(path)


def _resolve_k6(model: str, path: Path, variant: str | None, repo: str | None = None,
                revision: str | None = None) -> Resolved:
    """A Kandinsky 6 -Diffusers folder (or cached repo): its own scheduler and sizes; Kandinsky 5 variants do not
    apply (the catalogue's Kandinsky 6 rows give the settings of a recognised repo, engine/catalogue/k6_variants.py)."""
    from k5.engine.checkpoints.state_dict import K6

    if variant is not None:
        raise VariantError(f"--variant {variant}: the catalogue's variants are Kandinsky 5 settings; --model {model} "
                           f"is a Kandinsky 6 checkpoint, which runs with its own scheduler and the settings of its "
                           f"repo: drop --variant")
    check_components(path)
    files = locate(path, K6)
    return Resolved(model, "folder", path, path, files.config, None, None, repo, revision, "t2av", files)


def _resolve_k6_tiny(model: str, variant: str | None) -> Resolved:
    from k5.engine.catalogue.k6_tiny import k6_tiny_checkpoint
    from k5.engine.checkpoints.state_dict import K6

    if variant is not None:
        raise VariantError(f"--variant {variant}: --model {model} is the tiny Kandinsky 6 model, which the Kandinsky 5 "
                           f"variants do not apply to; drop --variant (its steps and guidance are flags)")
    root = k6_tiny_checkpoint(kind=TINY_MODELS[model][0])  # cached; built aside and renamed, safe under torchrun
    check_components(root)
    files = locate(root, K6)
    return Resolved(model, "tiny", root, root, files.config, None, None, task="t2av", files=files)


def _resolve_tiny(model: str, variant: str | None, attention: str, task: str | None = None) -> Resolved:
    from k5.engine.catalogue.tiny import tiny_checkpoint

    kind, tasks, _ = TINY_MODELS[model]
    chosen = tiny_variant(variant, tasks, f"the tiny model --model {model}")
    task = task or (chosen.task if chosen else tasks[0])
    if task not in tasks:
        raise ResolveError(f"--task {task}: the tiny model --model {model} runs {' or '.join(tasks)}"
                           + ("; --model tiny-image runs t2i and i2i" if model == "tiny" else
                              "; --model tiny runs t2v and i2v" if model == "tiny-image" else ""))
    if kind == "by task":  # one checkpoint per task (tiny-image: the I2I DiT has the edit-latent input)
        kind, attention = task, "regular"  # Image Lite is dense; a NABLA request is refused by the caller
    root = tiny_checkpoint(attention=attention, kind=kind)  # cached; built aside and renamed, safe under torchrun
    check_components(root)
    files = locate(root)
    return Resolved(model, "tiny", root, root, files.config, chosen, "given" if chosen else None, task=task,
                    files=files)


def tiny_variant(name: str | None, tasks=("t2v", "i2v"), what: str = "the tiny model") -> Variant | None:
    """The variant a tiny model takes its sampling settings from (steps, guidance, shift, MagCache ratios): any
    variant of the tiny model's tasks; its attention, size and frames stay the tiny model's own."""
    if name is None:
        return None
    variant = variants.get(name)
    variants.check_task(variant, tasks, what)
    return variant
