#!/usr/bin/env bash
# One run on one GPU for the speed work of issue 4: the GPU tests, then bench_e2e.py's configs.
#   bash benchmarks/device_speed.sh OUT_DIR tests,bench CONFIGS [TAG]
# Needs diffusers (and ftfy) importable: bring them as wheels in .whl (the GPU machine has no network);
# this script installs whatever is in .whl into /tmp/site. Each part writes under OUT_DIR as it goes,
# so a run stopped at its limit still returns what finished.
# The tracked tree is over the GPU machine's 64 MiB limit because of the two kept small-model bundles under
# benchmarks/results/ (run 10's base, run 11's mid; 19 MB each): move those folders out of the tree for the
# run and back after it (on 2026-12-02 they went to /tmp/parked; they are not needed on the GPU).
set -uo pipefail
OUT=${1:?usage: device_speed.sh OUT_DIR PARTS CONFIGS [TAG]}
PARTS=${2:-tests,bench}
CONFIGS=${3:-ours,ours-no-graphs}
TAG=${4:-$(date +%F)}
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
else
    export PYTHONPATH=$PWD/src:$PWD/benchmarks
fi
# FlashAttention-4, where benchmarks/fa4_wheels.sh installed it into /tmp/site (its `cutlass` needs this path)
[ -d /tmp/site/nvidia_cutlass_dsl/dsl_packages ] && export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu-$TAG.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" \
    | tee -a "$OUT/gpu-$TAG.txt"
if [[ ,$PARTS, == *,tests,* ]]; then
    timeout 240 python3 -m pytest tests/gpu -q -rA -s -p no:cacheprovider > "$OUT/gpu-tests-$TAG.log" 2>&1
    tail -3 "$OUT/gpu-tests-$TAG.log"
fi
if [[ ,$PARTS, == *,bench,* ]]; then
    python3 benchmarks/bench_e2e.py --configs "$CONFIGS" --out "$OUT/bench-$TAG.json" \
        --results-md "$OUT/results-rows-$TAG.md" 2>&1 | grep -v "should be kept in float32" | tee "$OUT/bench-$TAG.log"
fi
