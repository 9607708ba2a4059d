#!/usr/bin/env bash
# Retrain the bundled small model (src/helios/assets/helios-tiny) from scratch, best on one GPU:
#   bash configs/tiny/train.sh                  # every step, in order
#   bash configs/tiny/train.sh stage3 bundle3   # only some steps (each reads what the earlier ones wrote)
# Steps: vae cache stage1 stage2 bundle2 stage3 bundle3. Writes runs/tiny/: init/ (VAE + fresh
# transformer), cache/ (latents + text embeddings), stage1/, stage1-plain/ (no anti-drifting, for the
# drift study), stage2/, stage3/ and the bundles helios-tiny-base/, helios-tiny-plain-base/,
# helios-tiny-mid/, helios-tiny-distilled/ (the last is what ships).
# Budgets are wall-clock seconds per step (env: VAE_SECONDS, S1_SECONDS, S2_SECONDS, S3_SECONDS) and
# the number of training videos (VIDEOS); the defaults are what made the shipped bundle on one H100.
# Extra `key=value` config overrides for every transformer stage go in OVERRIDES (e.g. a CPU smoke run:
# OVERRIDES="batch.per_gpu=2").
set -euo pipefail
R=runs/tiny
T='import sys; from helios.train.config import load_config; from helios.train.trainer import train; train(load_config(sys.argv[1], sys.argv[2:]))'
read -r -a EXTRA <<< "${OVERRIDES:-}"
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(vae cache stage1 stage2 bundle2 stage3 bundle3)

for step in "${STEPS[@]}"; do
    echo "== $step ($(date +%T))"
    case "$step" in
    vae)
        python3 -m helios.train.tiny vae "$R/init" --steps 100000 --batch 16 --kind base \
            --max-seconds "${VAE_SECONDS:-150}" ;;
    cache)
        python3 -m helios.train.tiny cache "$R/init" "$R/cache" --videos "${VIDEOS:-400}" ;;
    stage1)  # with and without Easy Anti-Drifting, side by side (small models leave the GPU half idle)
        python3 -c "$T" configs/tiny/stage1.yaml max_seconds="${S1_SECONDS:-170}" "${EXTRA[@]}" &
        python3 -c "$T" configs/tiny/stage1-no-antidrift.yaml max_seconds="${S1_SECONDS:-170}" "${EXTRA[@]}" &
        wait %1
        wait %2
        python3 -m helios.train.tiny bundle "$R/stage1/model" "$R/helios-tiny-base" --kind base
        python3 -m helios.train.tiny bundle "$R/stage1-plain/model" "$R/helios-tiny-plain-base" --kind base ;;
    stage2)
        python3 -c "$T" configs/tiny/stage2.yaml max_seconds="${S2_SECONDS:-70}" "${EXTRA[@]}" ;;
    bundle2)
        python3 -m helios.train.tiny bundle "$R/stage2/model" "$R/helios-tiny-mid" --kind mid ;;
    stage3)
        python3 -c "$T" configs/tiny/stage3.yaml max_seconds="${S3_SECONDS:-240}" "${EXTRA[@]}" ;;
    bundle3)
        python3 -m helios.train.tiny bundle "$R/stage3/model" "$R/helios-tiny-distilled" --kind distilled ;;
    *)
        echo "unknown step '$step' (steps: vae cache stage1 stage2 bundle2 stage3 bundle3)" >&2; exit 2 ;;
    esac
done
