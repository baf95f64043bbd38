#!/usr/bin/env bash
# The GPU rows of the speed table (docs/results/benchmark_gpu_*.json, README "GPU"): one prepared run
# of `drdd-med benchmark` on one CUDA GPU, for a machine that is lent for minutes.
#
#   scripts/benchmark_gpu.sh OUTDIR
#
# Steps, most important first: the GPU tests; the default ("gpu") and reference-sized networks in
# bf16 (the GPU profile's precision) in 2D; the default networks in 3D, and in fp32. (A compiled
# step did not finish in 370 s on an H200: docs/results/benchmark_gpu_compile_log.txt.) Each
# step writes its own JSON and has its own limits, so a step that runs out of time loses only itself:
# --max-minutes stops it starting a configuration it has no time for, `timeout` ends a stuck one.
set -u
out=${1:?usage: scripts/benchmark_gpu.sh OUTDIR}
mkdir -p "$out"
log="$out/benchmark_gpu.log"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$log"
timeout 80 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_inferers.py 2>&1 | tee -a "$log"

step() {  # step NAME SECONDS MINUTES OPTIONS...: one benchmark run
    local name=$1 seconds=$2 minutes=$3
    shift 3
    echo "== $name: $*" | tee -a "$log"
    timeout "$seconds" python3 -m drdd_med benchmark --device cuda --max-minutes "$minutes" \
        --output "$out/benchmark_gpu_$name.json" "$@" 2>&1 | tee -a "$log"
}
step 2d_bf16 210 1.8 --presets gpu,reference --dims 2d --precision bf16
step 3d_bf16 80 0.5 --presets gpu --dims 3d --precision bf16
step 2d_fp32 170 0.5 --presets gpu --dims 2d --precision fp32
