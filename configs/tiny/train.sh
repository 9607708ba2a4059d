#!/usr/bin/env bash
# Retrain the bundled small model from scratch on one GPU (about 9 minutes on an H100):
#   bash configs/tiny/train.sh            (VAE_FROM=path/to/vae to continue a trained VAE)
# Writes runs/tiny/: init/ (VAE + fresh transformer), cache/ (latents of 384 synthetic videos),
# stage1/, stage1-plain/ (no anti-drifting, for the drift study), stage2/, and helios-tiny-mid/.
set -euo pipefail
R=runs/tiny
python3 -m helios.train.tiny vae "$R/init" --steps 100000 --batch 16 --max-seconds "${VAE_SECONDS:-90}" \
    ${VAE_FROM:+--init-vae "$VAE_FROM"}
python3 -m helios.train.tiny cache "$R/init" "$R/cache" --videos "${VIDEOS:-384}"
python3 -m helios.cli train configs/tiny/stage1.yaml
python3 -m helios.cli train configs/tiny/stage1-no-antidrift.yaml
python3 -m helios.cli train configs/tiny/stage2.yaml
python3 -m helios.train.tiny bundle "$R/stage2/model" "$R/helios-tiny-mid" --kind mid
