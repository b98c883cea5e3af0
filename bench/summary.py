"""summary.md of a `bash bench/gpu.sh` run: each GPU target met or not, with the figures behind it.

    python -m k5.bench summary OUTDIR [--smoke] --peak 788.1 --peak-source measured [--failed NAME ...]

Every figure says where it comes from. Times, rates and ratios are measured by the run. The bf16 matrix peak is
measured by the run's env step; when that failed (or was not run) gpu.sh passes an assumed figure instead, and then
the peak, every MFU and every share of the peak below say "assumed". The verdicts themselves compare measured times
and rates with the targets, never the peak. A CPU smoke (``--smoke``) claims no target.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ASSUMED_WHY = "the figure measured on this workplace's H100/H200s before (769-798), not measured in this run"
# Targets on seconds per forward, from bench/results/README.md.
FORWARD_TARGETS = (("lite-5s-dense", 1.0), ("lite-10s-nabla", 1.3), ("pro-5s-dense", 5.0))


def peak_words(source: str | None, value: float) -> str:
    """How a peak is named wherever a figure is computed from it."""
    if source == "measured":
        return f"the measured bf16 peak ({value:.4g} TFLOP/s)"
    if source == "assumed":
        return f"an ASSUMED bf16 peak of {value:.4g} TFLOP/s (not measured)"
    return f"a peak of {value:.4g} TFLOP/s given on the command line (neither measured nor labelled)"


def summarize(out: Path, smoke: bool, peak: float, peak_source: str, failed: list[str]) -> str:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    lines = ["# GPU benchmark summary", ""]
    if smoke:
        lines += ["CPU smoke run: tiny shapes, plumbing only. No GPU target is evaluated.", ""]
    if peak_source == "measured":
        lines += [f"bf16 matrix peak: {peak:.4g} TFLOP/s, measured in this run (env.json).", ""]
    else:
        lines += [(f"bf16 matrix peak: ASSUMED {peak:.4g} TFLOP/s ({ASSUMED_WHY}): the env step did not measure it. "
                   f"Every MFU and share of the peak below is computed from this assumed figure."), ""]
    lines += [f"Steps that failed or timed out: {', '.join(failed)}." if failed else
              "Every step that ran finished without an error.", ""]
    rows = []

    def target(name, figure, unit, limit, better, shown, needs=""):
        if smoke:
            rows.append((name, shown or "not measured", "(GPU target, not evaluated on a CPU)"))
        elif figure is None:
            rows.append((name, shown or "not measured", f"{better} {limit} {unit}{needs}"))
        else:
            met = figure <= limit if better == "<=" else figure >= limit
            rows.append((name, shown, f"{better} {limit} {unit}{needs}: {'MET' if met else 'NOT MET'}"))

    def fwd(name, limit):
        """(seconds per forward or None, what is shown, what the limit asks of the chip: the run's FLOP count over
        the limit against the run's peak, labelled measured or assumed)"""
        r = runs.get(name)
        if not r or "timing" not in r:
            return None, "not measured", ""
        t, c = r["timing"], r["checks"]
        f = t["forward_s"]
        source, p = t.get("peak_source"), t["peak_tflops_per_device"]
        need = t["tflop_per_forward"] / limit
        needs = f" (needs {need:.0f} TFLOP/s, {need / p:.0%} of {peak_words(source, p)})"
        mfu = f"MFU {t['mfu']:.0%}" + ("" if source == "measured" else " of the ASSUMED peak")
        shown = (f"{t['s_per_forward']:.3f} s/forward (min {f['min']:.3f}, max {f['max']:.3f}), "
                 f"{t['tflops_per_device']:.0f} TFLOP/s, {mfu}")
        if "nabla" in r:
            nb = r["nabla"]
            shown += f", density {nb['density']:.3f}"
            if "compiled_mask_agreement" in nb:  # information: the check itself runs on the eager masks
                shown += (f", compiled blocks select {nb['compiled_mask_agreement']:.2%} of tiles alike "
                          f"(own masks: rel err {nb['compiled_own_masks_rel_err']:.1e})")
        for k, v in c.items():
            if isinstance(v, float):
                shown += f", {k} {v:.1e}" + (" (FAIL > 2e-2)" if v > 2e-2 else "")
        if r.get("unstable"):
            shown += ", UNSTABLE"
        if r.get("incomplete"):
            shown += f", INCOMPLETE ({r['incomplete']})"
        return t["s_per_forward"], shown, needs

    for name, limit in FORWARD_TARGETS:
        s, shown, needs = fwd(name, limit)
        target(name + " forward", s, "s", limit, "<=", shown, needs)
    env = runs.get("env", {})
    kernels = {k: v for k, v in env.get("attention_kernels_at_lite_shape", {}).items() if isinstance(v, dict)}
    if kernels:
        best = min(kernels, key=lambda k: kernels[k]["s"])
        flop = 4 * 47616**2 * 28 * 64 if not smoke else 4 * 1024**2 * 2 * 16
        tf = flop / kernels[best]["s"] / 1e12
        target("dense attention (Lite shape, head dim 64)", tf, "TFLOP/s", 500, ">=", f"{tf:.0f} TFLOP/s ({best})")
    else:
        target("dense attention (Lite shape, head dim 64)", None, "TFLOP/s", 500, ">=", "")
    att = runs.get("attention-lite-10s")
    if att:
        for row in att["nabla"]:
            ratio = row["kernel_over_density_x_dense"]
            target(f"NABLA kernel, P {row['P']} (density {row['density']:.3f})", ratio, "x (density x dense)", 1.3,
                   "<=", f"{ratio:.2f}x density x dense, rel err {row['rel_err_vs_masked_dense']:.1e}")
    else:
        target("NABLA kernel vs density x dense", None, "x", 1.3, "<=", "")
    rows.append(flex_choice((att or {}).get("flex_options_compare")))
    rows.append(host_syncs(runs.get("host-syncs"), smoke))
    lines += ["| what | measured | target |", "| --- | --- | --- |"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def flex_choice(c: dict | None) -> tuple[str, str, str]:
    """The flex kernel options compared at Pro's head dim (bench/run.py --compare-flex-options): a choice to make
    from the measurement, not a target; k5's default stays "k5" until a GPU run says otherwise."""
    name, want = "NABLA flex kernel options (head dim 128)", "the fastest becomes kernels/flex.py's default"
    if not c or not c.get("measured"):
        return name, (c or {}).get("why", "not measured"), want
    shown = ", ".join(f"{r['options']} {r['s_block_sparse_kernel'] * 1e3:.2f} ms" for r in c["rows"])
    return name, f"{shown} at P {c['P']} (density {c['density']:.3f}); fastest: {c['fastest']}", want


def host_syncs(r: dict | None, smoke: bool) -> tuple[str, str, str]:
    """The row of the sync check (bench/syncs.py): a check, not a speed target, so a CPU run says it did not run."""
    name, want = "device-to-host syncs in one denoising step", "none"
    if smoke:
        return name, "not measured on CPU (torch's sync checker needs CUDA)", "(GPU check, not evaluated on a CPU)"
    if not r:
        return name, "not measured", want
    found = [c for c in r["cases"] if c["syncs"] == "found"]
    clean = [c for c in r["cases"] if c["syncs"] == "none"]
    unmeasured = [c["case"] for c in r["cases"] if c not in found and c not in clean]
    listed = lambda c: ", ".join(f"{s} ({n}x)" for s, n in c["sites"].items()).replace("|", "/")  # noqa: E731
    shown = "; ".join([f"{c['case']}: {listed(c)}" for c in found] +
                      ([f"none in {', '.join(c['case'] for c in clean)}"] if clean else []) +
                      ([f"not measured for {', '.join(unmeasured)}"] if unmeasured else []))
    if found:
        return name, shown, f"{want}: NOT MET"
    return name, shown, f"{want}: MET" if not unmeasured else want


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m k5.bench summary", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the run's folder (gpu.sh's $OUT)")
    p.add_argument("--smoke", action="store_true", help="a CPU smoke run: no target is evaluated")
    p.add_argument("--peak", type=float, required=True, help="the bf16 matrix peak the run used, TFLOP/s")
    p.add_argument("--peak-source", required=True, choices=["measured", "assumed"])
    p.add_argument("--failed", nargs="*", default=[], help="steps that failed, timed out or were skipped")
    args = p.parse_args(argv)
    text = summarize(args.out, args.smoke, args.peak, args.peak_source, args.failed)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
