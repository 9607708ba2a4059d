#!/usr/bin/env bash
# The calls on the lent H100 that train the shipped bundle (each must end inside a 10-minute call):
#   bash configs/tiny/device.sh OUT_DIR mid        # VAE, latent cache, stages 1 and 2 -> helios-tiny-mid
#   bash configs/tiny/device.sh OUT_DIR distilled  # from runs/tiny/helios-tiny-mid: stage 3 (ode, dmd), then the
#                                                  # 60-second study videos and the speed runs
#   bash configs/tiny/device.sh OUT_DIR all        # both, with short budgets, after a trained VAE
# Results land in runs/tiny and are packed into OUT_DIR as tar parts of at most 15 MB. One process
# at a time on the GPU: two small-model processes side by side ran ten times slower each.
set -uo pipefail
OUT=${1:?usage: device.sh OUT_DIR mid|distilled|all}
PART=${2:?usage: device.sh OUT_DIR mid|distilled|all}
R=${RUNS:-runs/tiny}
D="python3 benchmarks/drift_study.py generate --device ${DEVICE:-cuda}"
A="python3 benchmarks/prompt_adherence.py --device ${DEVICE:-cuda} --captions 8 --seeds 2"
L=${LONG_SECONDS:-60}  # length of the study videos
N=${STUDY_VIDEOS:-2}
pack() {  # pack NAME PATHS...: a tar split into parts small enough to come back from the device
    local name=$1; shift
    tar czf - "$@" 2>/dev/null | split -b 15M -d - "$OUT/$(basename "$R")-$name.tgz.part"
}
# A bounded CPU thread pool per process: on the 2-GPU machine (32 cores) two trainings with default
# threads ran 40x slower than one alone (5 s per step).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
mkdir -p "$R/logs"
case "$PART" in
mid)  # then prompt adherence of the stage-1 (base) and stage-2 (mid) models: the loss does not show it
    bash configs/tiny/train.sh vae cache stage1 stage2 bundle2 || exit 1
    # packed first: run 5's models were lost when the call's limit fell inside the adherence runs
    pack mid "$R/helios-tiny-mid" "$R"/*/metrics.jsonl "$R/init/vae_train_log.json" "$R/logs"
    for m in mid base; do
        timeout "${ADHERENCE_SECONDS:-120}" $A "$R/helios-tiny-$m" --out "$R/adherence-$m" > "$R/logs/adherence-$m.log" 2>&1
        pack "adherence-$m" "$R/adherence-$m" "$R/logs/adherence-$m.log"
    done ;;
all)  # one call for everything after the VAE (VAE_FROM: a trained vae/ folder), short budgets
    bash configs/tiny/train.sh vae cache stage1 stage2 bundle2 || exit 1
    pack mid "$R/helios-tiny-mid" "$R"/*/metrics.jsonl "$R/logs"
    bash configs/tiny/train.sh ode stage3 bundle3 || exit 1
    pack distilled "$R/helios-tiny-distilled" "$R"/stage3*/metrics.jsonl "$R/logs" ;;
distilled)
    CACHE_FROM="$R/helios-tiny-mid" bash configs/tiny/train.sh cache ode stage3 bundle3 || exit 1
    for m in distilled mid; do  # speed first, alone on the GPU: 10-second videos
        $D --model "$m=$R/helios-tiny-$m" --videos 1 --seconds 10 --out "$R/speed-$m" > "$R/logs/speed-$m.log" 2>&1
    done
    for m in distilled mid; do
        $D --model "$m=$R/helios-tiny-$m" --videos "$N" --seconds "$L" --out "$R/drift-$m" > "$R/logs/drift-$m.log" 2>&1
    done
    pack distilled "$R/helios-tiny-distilled" "$R"/stage3*/metrics.jsonl "$R"/speed-* "$R"/drift-* "$R/logs" ;;
*)
    echo "unknown part '$PART' (mid, distilled or all)" >&2; exit 2 ;;
esac
