"""Plots of the bench results: seconds per step against world size, and against sequence length (dense vs NABLA).

    python -m k5.bench plot [--results bench/results] [--out DIR]

Reads every DiT run's JSON in the folder; runs that differ only in world size (or only in resolution) form one
line. Writes step_vs_world.png and step_vs_tokens.png beside them.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load_runs(folder: Path) -> list[dict]:
    runs = []
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        if "timing" in r and "config" in r and "s_per_step" in r["timing"]:
            runs.append(r)
    return runs


def _series(runs, key, x):
    lines = defaultdict(dict)
    for r in runs:
        lines[key(r)][x(r)] = r["timing"]["s_per_step"]  # a later file with the same point replaces an earlier
    return {k: sorted(v.items()) for k, v in lines.items() if len(v) > 1}


def by_world(runs):
    """One line per parallel layout; the 1-process run with the same settings (and threads per process) is the
    first point of every layout's line."""
    def key(r):
        c = r["config"]
        return (r["env"]["device"][:24], c["model"], f"{c['visual_blocks']} blocks", f"{c['visual_tokens']} tok",
                c["attention"], c["dtype"], f"{r['env']['torch_threads']} thread/proc",
                "compiled" if c.get("compile") else "")

    groups = defaultdict(dict)
    for r in runs:
        layout = "+".join(f"{k}{v}" for k, v in sorted(r["config"]["layout"].items()) if k != "single")
        groups[key(r)][layout] = r
    lines = {}
    for k, by_layout in groups.items():
        single = by_layout.get("")
        for layout, r in by_layout.items():
            if layout and single is not None:
                lines[(*k, layout)] = [(1, single["timing"]["s_per_step"]),
                                       (r["config"]["world_size"], r["timing"]["s_per_step"])]
    return lines


def by_tokens(runs):
    def key(r):
        c = r["config"]
        return (r["env"]["device"][:24], c["model"], f"{c['visual_blocks']} blocks", c["dtype"],
                f"w{c['world_size']}", f"{c['attention']}" + (f" P={c['P']}" if c["P"] is not None else ""),
                "compiled" if c.get("compile") else "")

    return _series(runs, key, lambda r: r["config"]["visual_tokens"])


def plot(folder: Path, out: Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(folder)
    written = []
    for name, series, xlabel, logx in (
        ("step_vs_world.png", by_world(runs), "processes / GPUs (world size)", False),
        ("step_vs_tokens.png", by_tokens(runs), "visual tokens per forward", True),
    ):
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        for key, points in series.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=", ".join(str(k) for k in key if k))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds per denoising step (CFG: 2 forwards)")
        if logx:
            ax.set_xscale("log")
            ax.set_yscale("log")
        else:
            ax.set_xticks(sorted({x for pts in series.values() for x, _ in pts}))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(name.removesuffix(".png").replace("_", " "))
        fig.tight_layout()
        target = out or folder
        target.mkdir(parents=True, exist_ok=True)
        fig.savefig(target / name, dpi=110)
        plt.close(fig)
        written.append(target / name)
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m k5.bench plot")
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"),
                   help="folder of result JSONs to plot (default: the committed bench/results)")
    p.add_argument("--out", default=None,
                   help="where the PNGs go (default: a scratch folder; bench/results only when named)")
    args = p.parse_args(argv)
    from k5.bench.report import SCRATCH

    for path in plot(Path(args.results), Path(args.out) if args.out else SCRATCH):
        print(f"wrote {path}")
