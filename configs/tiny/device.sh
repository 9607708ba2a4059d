#!/usr/bin/env bash
# The one call on the lent H100 that trains the shipped bundle and renders the studies' videos:
#   bash configs/tiny/device.sh OUT_DIR
# 1. configs/tiny/train.sh up to the stage-2 ("mid") bundle; the mid bundle is packed at once, so a
#    later failure still leaves it.
# 2. While stage 3 distils, 60-second videos of the stage-1 models with and without Easy Anti-Drifting
#    (docs/drift-study.md) and of the mid model render in the background.
# 3. 60-second videos of the distilled model, then a clean speed run (one model at a time, nothing
#    else on the GPU): 10-second videos from the mid and the distilled bundles.
# Everything lands in runs/tiny and is packed into OUT_DIR as tar parts of at most 15 MB.
set -uo pipefail
OUT=${1:?usage: device.sh OUT_DIR}
R=runs/tiny
export VAE_SECONDS=${VAE_SECONDS:-80} VIDEOS=${VIDEOS:-300} S1_SECONDS=${S1_SECONDS:-100} \
       S2_SECONDS=${S2_SECONDS:-50} S3_SECONDS=${S3_SECONDS:-90}
D="python3 benchmarks/drift_study.py generate --device ${DEVICE:-cuda}"
L=${LONG_SECONDS:-60}  # length of the study videos
N=${STUDY_VIDEOS:-3}
pack() {  # pack NAME PATHS...: a tar split into parts small enough to come back from the device
    local name=$1; shift
    tar czf - "$@" 2>/dev/null | split -b 15M -d - "$OUT/$name.tgz.part"
}
mkdir -p "$R/logs"
bash configs/tiny/train.sh vae cache stage1 stage2 bundle2 || exit 1
pack mid "$R/helios-tiny-mid" "$R"/*/metrics.jsonl "$R/init/vae_train_log.json"

$D --model anti-drift="$R/helios-tiny-base" --videos $N --seconds $L --out "$R/drift-ad" > "$R/logs/drift-ad.log" 2>&1 &
$D --model plain="$R/helios-tiny-plain-base" --videos $N --seconds $L --out "$R/drift-plain" > "$R/logs/drift-plain.log" 2>&1 &
$D --model mid="$R/helios-tiny-mid" --videos $N --seconds $L --out "$R/drift-mid" > "$R/logs/drift-mid.log" 2>&1 &
bash configs/tiny/train.sh stage3 bundle3
$D --model distilled="$R/helios-tiny-distilled" --videos $N --seconds $L --out "$R/drift-distilled" \
    > "$R/logs/drift-distilled.log" 2>&1
wait
for m in mid distilled; do
    $D --model "$m=$R/helios-tiny-$m" --videos 1 --seconds 10 --out "$R/speed-$m" > "$R/logs/speed-$m.log" 2>&1
done
pack final "$R/helios-tiny-distilled" "$R"/stage3/metrics.jsonl "$R"/drift-* "$R"/speed-* "$R/logs"
