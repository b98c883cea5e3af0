#!/usr/bin/env bash
# The CPU benchmark suite behind bench/results/ (2 cores; the targets of issue 7 that a CPU can answer).
#
#   bash bench/cpu.sh [all|peer|nabla|scaling|seqlen]                 results in a scratch folder
#   BENCH_OUT=bench/results bash bench/cpu.sh ...                       replace the committed results
#
# The machine is shared: before each run this waits (up to 10 min) for the 1-minute load average to drop under
# $MAX_LOAD (default 1.0) and every result records the load it saw (env.load_avg_1_5_15).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MAX_LOAD=${MAX_LOAD:-1.0}
WHAT=${1:-all}
OUT=${BENCH_OUT:-${TMPDIR:-/tmp}/k5-bench}
echo "results -> $OUT"

quiet() {
    for _ in $(seq 120); do
        awk -v max="$MAX_LOAD" '{exit !($1 < max)}' /proc/loadavg && return
        sleep 5
    done
    echo "load still $(cut -d' ' -f1 /proc/loadavg) after 10 min; running anyway"
}

bench() { quiet; echo "== $(cut -d' ' -f1-3 /proc/loadavg) | python -m k5.bench $*"; $PY -m k5.bench "$@" --out "$OUT" 2>&1 | grep -v "^There are\|^Attention backends\|UserWarning\|rms_norm("; }

LITE2=(--model lite --blocks 2 --height 512 --width 512 --frames 9)  # 3072 visual + 256 text tokens

if [[ $WHAT == all || $WHAT == peer ]]; then
    # Target: our forward <= 0.8x diffusers' on the same weights (Lite widths, 2 blocks; timed in turns).
    bench "${LITE2[@]}" --dtype fp32 --peer diffusers --vae tiny --vae-warmup 0 --vae-repeat 1 --warmup 1 --repeat 7
    bench "${LITE2[@]}" --dtype bf16 --peer diffusers --vae none --warmup 1 --repeat 7
    bench "${LITE2[@]}" --dtype fp32 --peer diffusers --compile --vae none --warmup 1 --repeat 7
    for dt in fp32 bf16; do  # where the time goes (torch.profiler, one forward each)
        bench "${LITE2[@]}" --dtype $dt --peer diffusers --profile --vae none --warmup 1 --repeat 1 \
            --name cpu-lite-b2-512x512x9-$dt-profile
    done
fi

if [[ $WHAT == all || $WHAT == nabla ]]; then
    # Target: NABLA at ~10% tile density >= 3x faster than dense at the same length (Lite 5 s: 47616 tokens).
    bench attention --height 512 --width 768 --frames 121 --heads 2 --head-dim 64 --P-list 0.01 0.03 0.1 \
        --repeat 3
fi

if [[ $WHAT == all || $WHAT == scaling ]]; then
    # Target: 2 processes on 2 cores <= 0.6x the 1-process step (1 thread per process in both).
    bench "${LITE2[@]}" --dtype fp32 --threads 1 --vae none --warmup 1 --repeat 3
    for lay in "--ulysses 2" "--ring 2" "--cfg 2" "--tp 2"; do
        quiet
        echo "== torchrun --nproc_per_node=2 -m k5.bench ${LITE2[*]} $lay"
        $PY -m torch.distributed.run --nproc_per_node=2 -m k5.bench "${LITE2[@]}" $lay --dtype fp32 --threads 1 \
            --vae none --warmup 1 --repeat 3 --out "$OUT" 2>&1 | grep -v "^W1\|^\*\*\*\|OMP_NUM_THREADS\|^There are"
    done
fi

if [[ $WHAT == all || $WHAT == seqlen ]]; then
    # Seconds per step against sequence length, dense and NABLA (tiny widths: attention-dominated).
    for size in "256 256 17" "512 512 17" "512 768 33" "512 768 65" "512 768 121"; do
        read -r h w f <<<"$size"
        for attn in "--attention dense" "--attention nabla --P 0.05"; do
            bench --model tiny --height "$h" --width "$w" --frames "$f" $attn --vae none --warmup 1 --repeat 3
        done
    done
fi

$PY -m k5.bench plot --results "$OUT" --out "$OUT"
