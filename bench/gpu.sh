#!/usr/bin/env bash
# The whole GPU benchmark in one device call (timeout_s=600, the call's maximum) on one H100/H200, from a plain
# checkout: the image's own python3 and torch (2.11+), nothing installed, the checkout's code imported from where it
# lies.
#
#   here, once (optional):  bash bench/gpu.sh fetch      # diffusers + its missing deps as wheels into .whl/ (the GPU
#                                                        # image has none: without them the diffusers peer, the real
#                                                        # VAE decode and the CLI step are skipped and say so)
#   on the GPU:             device run: command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600
#   afterwards here:        cp <files_at>/*.json bench/results/ && python -m k5.bench project --model lite \
#                               --from bench/results/lite-5s-dense.json --out bench/results   (and the same for pro)
#   plumbing check, CPU:    bash bench/gpu.sh smoke      # the same steps at tiny shapes, results in a temp folder
#   the time plan:          bash bench/gpu.sh plan       # each step's cap, their sum, and whether it fits the call
#   a rerun of some steps:  ONLY="pro-5s-dense" CALL_S=200 bash bench/gpu.sh   (device: timeout_s=200; the plan
#                           then counts only those steps, so a short call can redo what a full one lost)
#
# Everything lands in $OUT (or a temp folder) as at most 8 files. Each DiT step writes its JSON as soon as its
# forward is timed and again after each later stage (a file still missing a stage says so in "incomplete"), so a
# step that fails or runs out of time loses only what it had not measured yet:
#   gpu-log.txt               everything printed
#   env.json                  GPU, versions, the measured bf16 matrix peak (8192^3, random data), each dense
#                             attention kernel at the Lite self-attention shape (28 heads x 47616 tokens x 64)
#   lite-5s-dense.json        Lite 5 s 512x768 dense forward and CFG step, compiled, checked against the eager
#                             forward (and diffusers' on the same weights where it imports); VAE decode after
#   lite-10s-nabla.json       Lite 10 s 512x768 NABLA forward, compiled, P = 0.1 (random weights give a near-uniform
#                             pooled attention: the density is about STA + P, near what a trained model keeps);
#                             checked on the eager forward's masks, the share of tiles the compiled blocks would
#                             select alike recorded beside it
#   pro-5s-dense.json         Pro 5 s 512x768 dense forward, compiled
#   attention-lite-10s.json   dense vs NABLA kernels at the Lite 10 s length at P 0.05, 0.1, 0.2, densities measured
#                             from the masks
#   summary.md                the targets, met or not, with the figures (a CPU smoke claims none)
# Each step has its own time cap (PLAN below). The script sums the caps itself and refuses to start when they, with
# the time reserved before, after and between steps, exceed the call's timeout (CALL_S); each step may run until the
# sum of its cap and the caps before it (what an earlier step leaves unused passes on), so every step gets at least
# its own cap and the script ends before CALL_S.
set -uo pipefail

CALL_S=${CALL_S:-600}  # the device call's timeout_s (600: the most one call may run)
SETUP_S=25             # before the first step: the carried wheels' install, the checkout's import check
END_S=15               # after the last step: the summary, the file count, the log's flush
MARGIN_S=20            # timeout's kill grace past a cap (5 s), and slack
# name:cap, in run order (seconds on an H200; estimates, see bench/results/README.md)
PLAN=(env:35 lite-5s-dense:150 lite-10s-nabla:145 pro-5s-dense:125 attention-lite-10s:45 cli-tiny:40)
ONLY=${ONLY:-}  # space-separated step names: run only these (a rerun); empty: all
selected() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; }
for name in $ONLY; do
    [[ " ${PLAN[*]%%:*} " == *" $name "* ]] || { echo "!! ONLY names $name, not one of: ${PLAN[*]%%:*}"; exit 3; }
done
CAPS_S=0
for entry in "${PLAN[@]}"; do selected "${entry%%:*}" && CAPS_S=$((CAPS_S + ${entry#*:})); done
TOTAL_S=$((SETUP_S + CAPS_S + END_S + MARGIN_S))
plan_line() {
    local parts= entry
    for entry in "${PLAN[@]}"; do selected "${entry%%:*}" && parts+="${parts:+ + }${entry%%:*} ${entry#*:}"; done
    echo "plan: caps $parts = ${CAPS_S} s; with setup ${SETUP_S}, end ${END_S} and margin ${MARGIN_S}: ${TOTAL_S} s" \
        "of the call's ${CALL_S} s"
}

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}

if [ "${1:-}" = fetch ]; then
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl diffusers==0.42.1 ffmpeg-python==0.2.0 future==1.0.0
    exit $?
fi
if [ "$TOTAL_S" -gt "$CALL_S" ]; then
    plan_line
    echo "!! the plan does not fit the call: $TOTAL_S s > $CALL_S s (shorten the caps, or name fewer steps in ONLY)"
    exit 3
fi
if [ "${1:-}" = plan ]; then
    plan_line
    exit 0
fi

SMOKE=0
[ "${1:-}" = smoke ] && SMOKE=1
# CI's reduced smoke: nothing compiled (a compile costs a minute on a small CPU), one timed run, and diffusers treated
# as absent, which is how the GPU image comes when no wheels are carried.
REDUCED=${K5_GPU_SMOKE_REDUCED:-0}
if [ $SMOKE = 1 ]; then
    OUTDIR=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/k5-gpu-smoke.XXXX")}
else
    OUTDIR=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/k5-gpu.XXXX")}
fi
mkdir -p "$OUTDIR"
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/k5-gpu-scratch.XXXX")  # what must not come back (the CLI's output)
exec > >(tee "$OUTDIR/gpu-log.txt") 2>&1
TEE=$!
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export K5_TINY_CACHE=${K5_TINY_CACHE:-$SCRATCH/tiny}

# Carried wheels (bash bench/gpu.sh fetch) go to a folder of their own, after the image's packages.
if ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c "import diffusers" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SCRATCH/site" .whl/*.whl \
        && export PYTHONPATH=$SCRATCH/site
fi
# The checkout itself is the import root: k5/__init__.py adds the checkout's folders to k5's path.
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
echo "== checkout $REPO -> $OUTDIR"
$PY - "$REPO" <<'EOF' || { echo "!! k5 does not import from this checkout"; exit 1; }
import os, sys
import k5.engine.dit, k5.kernels.attention, k5.parallel.mesh
here = os.path.realpath(k5.engine.dit.__file__)  # engine/ is a namespace portion: no __file__ of its own
assert here.startswith(os.path.realpath(sys.argv[1]) + os.sep), f"k5.engine comes from {here}, not this checkout"
print("k5 from", os.path.dirname(os.path.dirname(here)))
EOF
PEER=none
$PY -c "import diffusers" 2>/dev/null && [ "$REDUCED" != 1 ] && PEER=diffusers

if [ $SMOKE = 1 ]; then
    DEV=cpu; DEVARG=(--device cpu); LITE=(--model tiny); LITE10=(--model tiny); PRO=(--model tiny)
    SD5=(--height 128 --width 128 --frames 5)
    SD10=(--height 512 --width 512 --frames 9)  # 3 x 4 x 4 tiles: the STA prior keeps 0.39, so NABLA is sparse
    HEADS=(--heads 2 --head-dim 16); VAE=tiny; ATTN_SHAPE="2, 1024, 16"; DTYPE=fp32
    COMPILE=(--compile); REPEAT=(--warmup 0 --repeat 2 --threads 2)
    NABLA_KERNEL=(--nabla-kernel flex)  # the CUDA route (FlexAttention traced into the compiled blocks) on the CPU
    [ "$REDUCED" = 1 ] && COMPILE=() && REPEAT=(--warmup 0 --repeat 1 --threads 2) && NABLA_KERNEL=()
    LITE_REPEAT=("${REPEAT[@]}"); NABLA_REPEAT=("${REPEAT[@]}" --step-repeat 1)
    PRO_REPEAT=("${REPEAT[@]}" --step-repeat 1)
else
    DEV=cuda; DEVARG=(); LITE=(--model lite); LITE10=(--model lite-10s); PRO=(--model pro)
    SD5=(--height 512 --width 768 --frames 121); SD10=(--height 512 --width 768 --frames 241)
    HEADS=(--heads 28 --head-dim 64); VAE=real; ATTN_SHAPE="28, 47616, 64"; DTYPE=bf16
    COMPILE=(--compile); NABLA_KERNEL=()
    # Repeats sized to the caps. The untimed compiled forward that checks the compile against the eager one is
    # already a warm call of the compiled blocks: the NABLA and Pro steps time without another warm-up. A Pro
    # forward is 3.6 PFLOP (>= 4.5 s at the measured peak), so Pro times 2 forwards and 1 CFG step.
    LITE_REPEAT=(--warmup 1 --repeat 3 --step-repeat 2)
    NABLA_REPEAT=(--warmup 0 --repeat 3 --step-repeat 1)
    PRO_REPEAT=(--warmup 0 --repeat 2 --step-repeat 1)
fi
[ "$PEER" = none ] && VAE=none  # the VAE is diffusers' model

# A CPU smoke (another machine's load, no device time to fit) gets ten times every cap and reserve, so that a busy
# CPU does not fail it by chance.
SCALE=1
[ $SMOKE = 1 ] && SCALE=10
DEADLINE=$((SETUP_S * SCALE))  # seconds since the start by which the current step must end
CAP=0
begin() {  # name: sets CAP, the seconds this step may run (to its deadline); false when it does not run
    local name=$1 entry cap=
    for entry in "${PLAN[@]}"; do [ "${entry%%:*}" = "$name" ] && cap=${entry#*:}; done
    [ -n "$cap" ] || { echo "!! $name is not in the plan"; return 1; }
    selected "$name" || { echo "-- $name: not in ONLY"; return 1; }
    DEADLINE=$((DEADLINE + cap * SCALE))
    CAP=$((DEADLINE - SECONDS))
    if [ $CAP -lt $((10 * SCALE)) ]; then echo "!! $name SKIPPED: ${CAP}s to its deadline"; return 1; fi
    echo "== $name (${CAP}s max: its cap $((cap * SCALE))s, ${SECONDS}s elapsed)"
}
step() {  # name command...: runs under its own timeout, never stops the script
    local name=$1; shift
    begin "$name" || return 0
    timeout --kill-after=5 "$CAP" "$@" || echo "!! $name FAILED or timed out (exit $?)"
}
bench() {  # name bench-arguments...
    local name=$1; shift
    step "$name" $PY -m k5.bench "$@" "${DEVARG[@]}" --peak-tflops "$PEAK" --out "$OUTDIR" --name "$name" --json-only
}

echo "== 1. environment, matrix peak, dense attention kernels"
plan_line
PEAK=
begin env && PEAK=$(timeout --kill-after=5 "$CAP" $PY - "$DEV" "$OUTDIR/env.json" <<EOF | tail -1
import json, sys, torch
from k5.bench import fast, report
device = torch.device(sys.argv[1])
env = report.environment(device, ["gpu.sh", "env"])
env["diffusers_importable"] = "$PEER" == "diffusers"
try:
    import xfuser
    env["xfuser"] = xfuser.__version__
except Exception as e:  # noqa: BLE001
    env["xfuser"] = f"not importable: {type(e).__name__}"
env["matmul_peak_tflops_bf16"] = fast.matmul_peak_tflops(torch.bfloat16, device)
env["attention_kernels_at_lite_shape"] = fast.best_attention_backend($ATTN_SHAPE, torch.bfloat16, device)
json.dump(env, open(sys.argv[2], "w"), indent=1)
print(json.dumps(env, indent=1))
print(f"{env['matmul_peak_tflops_bf16']:.3f}")
EOF
)
PEAK=${PEAK:-790}
echo "bf16 matrix peak: $PEAK TFLOP/s"

echo "== 2. Lite 5 s 512x768 dense"
bench lite-5s-dense "${LITE[@]}" "${SD5[@]}" --dtype $DTYPE "${COMPILE[@]}" --peer "$PEER" --vae $VAE \
    --vae-warmup 0 --vae-repeat 1 "${LITE_REPEAT[@]}"

echo "== 3. Lite 10 s NABLA"
bench lite-10s-nabla "${LITE10[@]}" "${SD10[@]}" --dtype $DTYPE --attention nabla --P 0.1 "${COMPILE[@]}" \
    "${NABLA_KERNEL[@]}" --vae none "${NABLA_REPEAT[@]}"

echo "== 4. Pro 5 s 512x768 dense"
bench pro-5s-dense "${PRO[@]}" "${SD5[@]}" --dtype $DTYPE "${COMPILE[@]}" --vae none "${PRO_REPEAT[@]}"

echo "== 5. dense vs NABLA attention kernels at the Lite 10 s length"
bench attention-lite-10s attention "${SD10[@]}" "${HEADS[@]}" --P-list 0.05 0.1 0.2 --dtype $DTYPE --repeat 5

echo "== 6. the CLI on this device: tiny model, its defaults (compiled on CUDA)"
if [ "$PEER" = diffusers ]; then
    step cli-tiny $PY launch/generate.py --model tiny "${DEVARG[@]}" --prompt "a red fox running through snow" \
        --steps 2 --num-frames 5 --save-latents "$SCRATCH/cli.safetensors" $([ $SMOKE = 1 ] && echo --no-compile)
else
    echo "!! cli-tiny SKIPPED: the tiny checkpoint is built with diffusers, which does not import here"
fi

echo "== summary"
$PY - "$OUTDIR" "$SMOKE" <<'EOF'
import json, sys
from pathlib import Path

out, smoke = Path(sys.argv[1]), sys.argv[2] == "1"
runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
lines = ["# GPU benchmark summary", ""]
if smoke:
    lines += ["CPU smoke run: tiny shapes, plumbing only. No GPU target is evaluated.", ""]
rows = []


def target(name, figure, unit, limit, better, shown, needs=""):
    if smoke:
        rows.append((name, shown, "(GPU target, not evaluated on a CPU)"))
    elif figure is None:
        rows.append((name, shown or "not measured", f"{better} {limit} {unit}{needs}"))
    else:
        met = figure <= limit if better == "<=" else figure >= limit
        rows.append((name, shown, f"{better} {limit} {unit}{needs}: {'MET' if met else 'NOT MET'}"))


def fwd(name, limit):
    """(seconds per forward or None, what is shown, what the limit asks of the chip: the run's FLOP count over
    the limit against its measured matrix peak)"""
    r = runs.get(name)
    if not r or "timing" not in r:
        return None, "not measured", ""
    t, c = r["timing"], r["checks"]
    f = t["forward_s"]
    need = t["tflop_per_forward"] / limit
    needs = f" (needs {need:.0f} TFLOP/s, {need / t['peak_tflops_per_device']:.0%} of the measured bf16 peak)"
    shown = (f"{t['s_per_forward']:.3f} s/forward (min {f['min']:.3f}, max {f['max']:.3f}), "
             f"{t['tflops_per_device']:.0f} TFLOP/s, MFU {t['mfu']:.0%}")
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


for name, limit in (("lite-5s-dense", 1.0), ("lite-10s-nabla", 1.3), ("pro-5s-dense", 5.0)):
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
lines += ["| what | measured | target |", "| --- | --- | --- |"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text)
EOF
rm -f "$OUTDIR"/.*.partial  # a result write cut off by a cap (report.write renames a whole file into place)
n=$(find "$OUTDIR" -maxdepth 1 -type f | wc -l)
echo "$n files in $OUTDIR (at most 8 come back from the device): $(ls "$OUTDIR" | tr '\n' ' ')"
[ "$n" -le 8 ] || echo "!! more than 8 files"
rm -rf "$SCRATCH"
exec 1>&- 2>&-
wait $TEE  # the log is complete before the script ends (and the device collects $OUT)
