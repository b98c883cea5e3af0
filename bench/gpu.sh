#!/usr/bin/env bash
# The whole GPU benchmark in one device call (timeout_s=600, the call's maximum) on one H100/H200, from a plain
# checkout: the image's own python3 and torch (2.11+), nothing installed, the checkout's code imported from where it
# lies. Python: $PYTHON if set, else the checkout's .venv/bin/python if there is one (./install.sh made it), else
# python3 (the device machine has no .venv). An interpreter without torch, or one that cannot import k5 from this
# checkout, stops the script at once with one line and exit status 2.
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
# Everything lands in $OUT (or a temp folder) as 8 files, the most a device call brings back. Each DiT step writes
# its JSON as soon as its forward is timed and again after each later stage (a file still missing a stage says so in
# "incomplete"), so a step that fails or runs out of time loses only what it had not measured yet:
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
#                             from the masks; and the NABLA flex kernel under the old options (64x64 tiles only)
#                             against k5's (tiles, 4 warps, stages) at Pro's head dim 128, P 0.05
#   host-syncs.json           one CFG denoising step of each shape above (Lite, Lite 10 s NABLA, Pro; 2 visual
#                             blocks each, eager) through the sampler under torch.cuda.set_sync_debug_mode("error"):
#                             every device-to-host sync in the step loop, by its line in the checkout (python -m
#                             k5.bench syncs); a sync fails the step. On a CPU the steps run (the plumbing) and the
#                             check says "not measured on CPU"
#   summary.md                the targets, met or not, with the figures (a CPU smoke claims none)
# Every figure is measured by this run except the bf16 matrix peak when the env step could not measure it: then it
# is ASSUMED (790 TFLOP/s, this workplace's earlier H100/H200 measurements), printed and written as assumed, and each
# MFU and share of the peak computed from it says so (the DiT JSONs' timing.peak_source: measured or assumed).
#
# Exit status: 0 when every step ran to its end; 1 when any step failed, timed out or had no time left (the other
# steps still run, so one call keeps every result it can; the last lines name each failed step); 2 when python,
# torch or k5 is missing or broken (nothing runs); 3 when the plan does not fit the call or ONLY names an unknown step.
# cli-tiny without diffusers (no wheels carried) is skipped, said so, and is no failure. K5_GPU_SMOKE_REDUCED=1 (CI's
# smoke): nothing compiled, one timed run, diffusers treated as absent.
#
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
PLAN=(env:35 lite-5s-dense:125 lite-10s-nabla:120 pro-5s-dense:115 attention-lite-10s:70 host-syncs:40 cli-tiny:35)
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
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON; PY_FROM="PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then
    PY=$REPO/.venv/bin/python; PY_FROM="the checkout's .venv"
else
    PY=python3; PY_FROM="no .venv in this checkout"
fi

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
end_run() {  # status: the log complete (the device collects $OUT once the script ends), the scratch folder gone
    rm -rf "$SCRATCH"
    exec 1>&- 2>&-
    wait $TEE
    exit "$1"
}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export K5_TINY_CACHE=${K5_TINY_CACHE:-$SCRATCH/tiny}

echo "== checkout $REPO -> $OUTDIR"
if ! command -v "$PY" >/dev/null; then
    echo "!! $PY ($PY_FROM) is not an interpreter here: set PYTHON to a python with torch 2.11+, or run ./install.sh"
    end_run 2
fi
if ! TORCH=$("$PY" -c "import torch; print(torch.__version__)" 2>&1); then
    echo "!! $PY ($PY_FROM) cannot import torch ($(tail -n 1 <<<"$TORCH")): run ./install.sh for the" \
        "checkout's .venv, or set PYTHON to a python with torch 2.11+"
    end_run 2
fi
echo "== python $PY ($PY_FROM), torch $TORCH"
# Carried wheels (bash bench/gpu.sh fetch) go to a folder of their own, after the image's packages.
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import diffusers" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SCRATCH/site" .whl/*.whl \
        && export PYTHONPATH=$SCRATCH/site
fi
# The checkout itself is the import root: k5/__init__.py adds the checkout's folders to k5's path.
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
"$PY" - "$REPO" <<'EOF' || end_run 2
import os, sys
try:
    import k5.engine.model.dit, k5.kernels.attention, k5.parallel.mesh
except Exception as e:  # noqa: BLE001 - one line, not a traceback: what failed and with which interpreter
    sys.exit(f"!! k5 does not import from this checkout with {sys.executable}: {type(e).__name__}: "
             f"{str(e).splitlines()[0] if str(e) else ''}")
here = os.path.realpath(k5.engine.model.dit.__file__)  # engine/ is a namespace portion: no __file__ of its own
if not here.startswith(os.path.realpath(sys.argv[1]) + os.sep):
    sys.exit(f"!! k5.engine comes from {here}, not from this checkout {sys.argv[1]}")
print("k5 from", os.path.dirname(os.path.dirname(here)))
EOF
PEER=none
[ "$REDUCED" != 1 ] && "$PY" -c "import diffusers" 2>/dev/null && PEER=diffusers  # (an import of seconds)

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
    SYNC_CASES=(--case tiny:128x128x5 --case tiny:256x256x5:nabla --case tiny:128x128x5)  # plumbing: any NABLA size
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
    SYNC_CASES=(--case lite:512x768x121 --case lite-10s:512x768x241:nabla --case pro:512x768x121)
fi
[ "$PEER" = none ] && VAE=none  # the VAE is diffusers' model

# A CPU smoke (another machine's load, no device time to fit) gets ten times every cap and reserve, so that a busy
# CPU does not fail it by chance.
SCALE=1
[ $SMOKE = 1 ] && SCALE=10
DEADLINE=$((SETUP_S * SCALE))  # seconds since the start by which the current step must end
CAP=0
FAILED=()  # "name (why)" of each step that failed, timed out or had no time left: the exit status and last lines
begin() {  # name: sets CAP, the seconds this step may run (to its deadline); false when it does not run
    local name=$1 entry cap=
    for entry in "${PLAN[@]}"; do [ "${entry%%:*}" = "$name" ] && cap=${entry#*:}; done
    [ -n "$cap" ] || { echo "!! $name is not in the plan"; FAILED+=("$name (not in the plan)"); return 1; }
    selected "$name" || { echo "-- $name: not in ONLY"; return 1; }
    DEADLINE=$((DEADLINE + cap * SCALE))
    CAP=$((DEADLINE - SECONDS))
    if [ $CAP -lt $((10 * SCALE)) ]; then
        echo "!! $name SKIPPED: ${CAP}s to its deadline"
        FAILED+=("$name (skipped: ${CAP}s left to its deadline)")
        return 1
    fi
    echo "== $name (${CAP}s max: its cap $((cap * SCALE))s, ${SECONDS}s elapsed)"
}
step() {  # name command...: runs under its own timeout; a failure is recorded, and the script goes on
    local name=$1 rc; shift
    begin "$name" || return 0
    timeout --kill-after=5 "$CAP" "$@"
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "!! $name FAILED: timed out at ${CAP}s (exit $rc)"
        FAILED+=("$name (timed out at ${CAP}s)")
    elif [ $rc -ne 0 ]; then
        echo "!! $name FAILED (exit $rc)"
        FAILED+=("$name (exit $rc)")
    fi
}
bench() {  # name bench-arguments...
    local name=$1; shift
    step "$name" "$PY" -m k5.bench "$@" "${DEVARG[@]}" --peak-tflops "$PEAK" --peak-source "$PEAK_SOURCE" \
        --out "$OUTDIR" --name "$name" --json-only
}

echo "== 1. environment, matrix peak, dense attention kernels"
plan_line
step env "$PY" - "$DEV" "$OUTDIR/env.json" "$SCRATCH/peak" <<EOF
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
env["matmul_peak_source"] = "measured"
open(sys.argv[3], "w").write(f"{env['matmul_peak_tflops_bf16']:.3f}\n")  # the peak, even if what follows fails
env["attention_kernels_at_lite_shape"] = fast.best_attention_backend($ATTN_SHAPE, torch.bfloat16, device)
json.dump(env, open(sys.argv[2], "w"), indent=1)
print(json.dumps(env, indent=1))
EOF
PEAK=$(cat "$SCRATCH/peak" 2>/dev/null)
if [ -n "$PEAK" ]; then
    PEAK_SOURCE=measured
    echo "bf16 matrix peak: $PEAK TFLOP/s, measured"
else
    # What this workplace's H100/H200s measured before (769-798 TFLOP/s, bench/results/README.md): a stand-in so
    # that the later steps still report an MFU, each labelled assumed.
    PEAK=790 PEAK_SOURCE=assumed
    echo "bf16 matrix peak: ASSUMED $PEAK TFLOP/s (earlier H100/H200 measurements; not measured in this run: the" \
        "env step $(selected env && echo failed || echo 'was not run')); every MFU and share of the peak is assumed"
fi

echo "== 2. Lite 5 s 512x768 dense"
bench lite-5s-dense "${LITE[@]}" "${SD5[@]}" --dtype $DTYPE "${COMPILE[@]}" --peer "$PEER" --vae $VAE \
    --vae-warmup 0 --vae-repeat 1 "${LITE_REPEAT[@]}"

echo "== 3. Lite 10 s NABLA"
bench lite-10s-nabla "${LITE10[@]}" "${SD10[@]}" --dtype $DTYPE --attention nabla --P 0.1 "${COMPILE[@]}" \
    "${NABLA_KERNEL[@]}" --vae none "${NABLA_REPEAT[@]}"

echo "== 4. Pro 5 s 512x768 dense"
bench pro-5s-dense "${PRO[@]}" "${SD5[@]}" --dtype $DTYPE "${COMPILE[@]}" --vae none "${PRO_REPEAT[@]}"

echo "== 5. dense vs NABLA attention kernels at the Lite 10 s length"
bench attention-lite-10s attention "${SD10[@]}" "${HEADS[@]}" --P-list 0.05 0.1 0.2 --dtype $DTYPE --repeat 5 \
    --compare-flex-options default k5

echo "== 6. device-to-host syncs in one denoising step of each shape (torch.cuda.set_sync_debug_mode)"
step host-syncs "$PY" -m k5.bench syncs "${SYNC_CASES[@]}" --dtype $DTYPE "${DEVARG[@]}" --out "$OUTDIR" \
    --name host-syncs

echo "== 7. the CLI on this device: tiny model, its defaults (compiled on CUDA)"
if [ "$PEER" = diffusers ]; then
    step cli-tiny "$PY" launch/generate.py --model tiny "${DEVARG[@]}" --prompt "a red fox running through snow" \
        --steps 2 --num-frames 5 --save-latents "$SCRATCH/cli.safetensors" $([ $SMOKE = 1 ] && echo --no-compile)
else
    echo "!! cli-tiny SKIPPED: the tiny checkpoint is built with diffusers, which does not import here"
fi

echo "== summary"
timeout 120 "$PY" -m k5.bench summary "$OUTDIR" $([ $SMOKE = 1 ] && echo --smoke) --peak "$PEAK" \
    --peak-source "$PEAK_SOURCE" --failed "${FAILED[@]}" || FAILED+=("summary (exit $?)")
rm -f "$OUTDIR"/.*.partial  # a result write cut off by a cap (report.write renames a whole file into place)
n=$(find "$OUTDIR" -maxdepth 1 -type f | wc -l)
echo "$n files in $OUTDIR (at most 8 come back from the device): $(ls "$OUTDIR" | tr '\n' ' ')"
[ "$n" -le 8 ] || FAILED+=("file count ($n files: only 8 come back from the device)")
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "!! ${#FAILED[@]} step(s) failed (an error, a check that did not pass, a timeout or no time left):"
    printf '!!   %s\n' "${FAILED[@]}"
    end_run 1
fi
echo "== every step finished"
end_run 0

