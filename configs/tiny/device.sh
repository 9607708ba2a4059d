#!/usr/bin/env bash
# The calls on the lent H100 that train the shipped bundle (each must end inside a 10-minute call):
#   bash configs/tiny/device.sh OUT_DIR mid        # VAE, latent cache, stages 1 and 2 -> helios-tiny-mid
#   bash configs/tiny/device.sh OUT_DIR distilled  # from runs/tiny/helios-tiny-mid: stage 3 (ode, dmd), then the
#                                                  # speed of the distilled and mid bundles on the GPU
#   bash configs/tiny/device.sh OUT_DIR all        # both, with short budgets, after a trained VAE
# Results land in runs/tiny and are packed into OUT_DIR as tar parts of at most 15 MB. One process
# at a time on the GPU: two small-model processes side by side ran ten times slower each.
set -uo pipefail
OUT=${1:?usage: device.sh OUT_DIR mid|distilled|all}
PART=${2:?usage: device.sh OUT_DIR mid|distilled|all}
R=${RUNS:-runs/tiny}
pack() {  # pack NAME PATHS...: a tar split into parts small enough to come back from the device
    local name=$1; shift
    tar czf - "$@" 2>/dev/null | split -b 15M -d - "$OUT/$(basename "$R")-$name.tgz.part"
}
# A bounded CPU thread pool per process: on the 2-GPU machine (32 cores) two trainings with default
# threads ran 40x slower than one alone (5 s per step).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
mkdir -p "$R/logs"
case "$PART" in
mid)  # VAE (VAE_FROM: continue a trained vae/ folder), latent cache, stages 1 and 2; prompt adherence and
      # the long videos are scored on the CPU afterwards (benchmarks/prompt_adherence.py, drift_study.py).
      # Stage 1 gets what the call has left (CALL_SECONDS from the start, less stage 2 and ~70 s of
      # start-ups, exports and packing), at most S1_SECONDS: a slow cache must not cost the models.
    START=$(date +%s)
    bash configs/tiny/train.sh vae cache || exit 1
    left=$(( START + ${CALL_SECONDS:-540} - $(date +%s) - ${S2_SECONDS:-100} - 70 ))
    S1_SECONDS=$(( left < ${S1_SECONDS:-200} ? left : ${S1_SECONDS:-200} ))
    echo "stage 1 budget: ${S1_SECONDS}s"
    [ "$S1_SECONDS" -gt 20 ] || { echo "no time left for stage 1" >&2; exit 1; }
    S1_SECONDS=$S1_SECONDS bash configs/tiny/train.sh stage1 stage2 bundle2 || exit 1
    pack mid "$R/helios-tiny-mid" "$R/helios-tiny-base" "$R"/*/metrics.jsonl "$R/init/vae_train_log.json" "$R/logs" ;;
all)  # one call for everything after the VAE (VAE_FROM: a trained vae/ folder), short budgets
    bash configs/tiny/train.sh vae cache stage1 stage2 bundle2 || exit 1
    pack mid "$R/helios-tiny-mid" "$R"/*/metrics.jsonl "$R/logs"
    bash configs/tiny/train.sh ode stage3 bundle3 || exit 1
    pack distilled "$R/helios-tiny-distilled" "$R"/stage3*/metrics.jsonl "$R/logs" ;;
distilled)  # from runs/tiny/helios-tiny-mid: stage 3 (ode pairs, ode, dmd), then the GPU speed of both
    START=$(date +%s)  # phase dmd gets what is left (CALL_SECONDS less the speed runs and ~40 s), at most S3_SECONDS
    CACHE_FROM="$R/helios-tiny-mid" bash configs/tiny/train.sh cache ode || exit 1
    left=$(( START + ${CALL_SECONDS:-540} - $(date +%s) - ${SPEED_SECONDS:-90} - 40 ))
    S3_SECONDS=$(( left < ${S3_SECONDS:-240} ? left : ${S3_SECONDS:-240} ))
    echo "stage 3 (dmd) budget: ${S3_SECONDS}s"
    [ "$S3_SECONDS" -gt 20 ] || { echo "no time left for stage 3" >&2; exit 1; }
    S3_SECONDS=$S3_SECONDS bash configs/tiny/train.sh stage3 bundle3 || exit 1
    pack distilled "$R/helios-tiny-distilled" "$R"/stage3*/metrics.jsonl "$R/logs"
    timeout "${SPEED_SECONDS:-90}" python3 benchmarks/small_model_speed.py --device "${DEVICE:-cuda}" --seconds 10 \
        --model "distilled=$R/helios-tiny-distilled" --model "mid=$R/helios-tiny-mid" \
        --out "$OUT/speed-gpu.json" > "$R/logs/speed-gpu.log" 2>&1
    cp "$R/logs/speed-gpu.log" "$OUT/" ;;
*)
    echo "unknown part '$PART' (mid, distilled or all)" >&2; exit 2 ;;
esac
