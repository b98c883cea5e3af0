"""Where a bench run's numbers go: one JSON file and one Markdown table per run, with device, versions, command."""

from __future__ import annotations

import json
import os
import tempfile
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"  # the committed results: written only when named
SCRATCH = Path(tempfile.gettempdir()) / "k5-bench"  # where a run writes unless told otherwise


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=RESULTS.parent.parent, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, argv: list[str]) -> dict:
    """Device, library versions, commit and command of this run (what a reader needs to reproduce it)."""
    try:
        diffusers_version = metadata.version("diffusers")  # no import: diffusers takes seconds to import
    except metadata.PackageNotFoundError:  # the GPU image has no diffusers unless its wheel is carried
        diffusers_version = None
    env = {
        "device_type": device.type,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "cuda": torch.version.cuda,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "bench", "engine", "kernels", "parallel")),
        "command": " ".join(
            ([f"torchrun --nproc_per_node={os.environ['WORLD_SIZE']}"] if "WORLD_SIZE" in os.environ else
             [sys.executable.rsplit("/", 1)[-1]]) + ["-m k5.bench"] + list(argv)
        ),
    }
    if device.type == "cuda":
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


def _fmt(v) -> str:
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    if isinstance(v, dict):
        return "; ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _markdown(result: dict) -> str:
    """A two-column table of everything in the run, sections as bold rows."""
    lines = [f"# bench run `{result['name']}`", "", "| | |", "| --- | --- |"]
    for section, values in result.items():
        if section == "name":
            continue
        if isinstance(values, dict):
            lines.append(f"| **{section}** | |")
            for k, v in values.items():
                lines.append(f"| {k} | {_fmt(v).replace('|', '/')} |")
        else:
            lines.append(f"| **{section}** | {_fmt(values)} |")
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: Path, markdown: bool = True) -> tuple[Path, ...]:
    """Write ``<name>.json`` (and ``<name>.md``) into ``out_dir``, each whole or not at all (temporary name, then
    renamed), so a run killed mid-write leaves the previous file, never half of one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Names may hold dots (nabla0.05): append the suffix instead of Path.with_suffix.
    texts = {out_dir / f"{result['name']}.json": json.dumps(result, indent=2) + "\n"}
    if markdown:
        texts[out_dir / f"{result['name']}.md"] = _markdown(result)
    for path, text in texts.items():
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(text)
        tmp.replace(path)
    return tuple(texts)
