#!/usr/bin/env bash
# One run on one GPU for the speed work: the GPU tests, the VAE decode probe, then bench_e2e.py's configs.
#   bash benchmarks/device_speed.sh OUT_DIR tests,vae,bench CONFIGS [TAG]
# Needs diffusers (and ftfy) importable: bring them as wheels in .whl (the GPU machine has no network);
# this script installs whatever is in .whl into /tmp/site. Each part writes under OUT_DIR as it goes,
# so a run stopped at its limit still returns what finished.
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
    timeout 300 python3 -m pytest tests/gpu -q -rA -s -p no:cacheprovider > "$OUT/gpu-tests-$TAG.log" 2>&1
    tail -3 "$OUT/gpu-tests-$TAG.log"
fi
if [[ ,$PARTS, == *,vae,* ]]; then  # the decode alone: default tuned graph, the implicit-GEMM variants, cuDNN's searches
    timeout 300 python3 benchmarks/probe_vae_decode.py --quick --out "$OUT/vae-$TAG.json" > "$OUT/vae-$TAG.log" 2>&1
    grep -E '^(diffusers|ours)' "$OUT/vae-$TAG.log" | cut -c1-160
fi
if [[ ,$PARTS, == *,bench,* ]]; then
    python3 benchmarks/bench_e2e.py --configs "$CONFIGS" --out "$OUT/bench-$TAG.json" \
        --results-md "$OUT/results-rows-$TAG.md" 2>&1 | grep -v "should be kept in float32" | tee "$OUT/bench-$TAG.log"
fi
