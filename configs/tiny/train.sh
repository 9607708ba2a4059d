#!/usr/bin/env bash
# Retrain the bundled small model (src/helios/assets/helios-tiny) from scratch, best on one GPU:
#   bash configs/tiny/train.sh                  # every step, in order
#   bash configs/tiny/train.sh stage3 bundle3   # only some steps (each reads what the earlier ones wrote)
# Steps: vae cache stage1 stage2 bundle2 ode stage3 bundle3 (and stage1-plain, stage3-3step, not in the default list). Writes runs/tiny/: init/ (VAE + fresh
# transformer), cache/ (latents + text embeddings), stage1/, stage1-plain/ (no anti-drifting, for the
# drift study), stage2/, stage3/ and the bundles helios-tiny-base/, helios-tiny-plain-base/,
# helios-tiny-mid/, helios-tiny-distilled/ (the last is what ships).
# Budgets are wall-clock seconds per step (env: VAE_SECONDS (and VAE_STEPS, VAE_OBJECT_WEIGHT: the weight of
# object pixels in the VAE's loss, VAE_DECODER_ONLY=1: train only VAE_FROM's decoder), S1_SECONDS, S2_SECONDS, S3O_SECONDS,
# S3_SECONDS), the number of training videos (VIDEOS) and of teacher captions (ODE_CAPTIONS), the teacher's
# guidance in stage 3 (ODE_GUIDANCE: the CFG scale of the ODE pairs; DMD_GUIDANCE: the real score's
# distill.real_guidance_scale; defaults in stage3-ode.yaml and stage3.yaml: CFG 1.5 for both), the text
# encoder's pretraining steps (TEXT_STEPS, 0: a random encoder); the defaults are what made the shipped bundle on one H100.
# Extra `key=value` config overrides for every transformer stage go in OVERRIDES (e.g. a CPU smoke run:
# OVERRIDES="batch.per_gpu=2"), for stage 1 alone in S1_OVERRIDES. RUNS moves everything from runs/tiny
# to another folder (a second recipe beside the first).
set -euo pipefail
R=${RUNS:-runs/tiny}
T='import sys; from helios.train.config import load_config; from helios.train.trainer import train; train(load_config(sys.argv[1], sys.argv[2:]))'
read -r -a EXTRA <<< "${OVERRIDES:-}"
read -r -a S1_EXTRA <<< "${S1_OVERRIDES:-}"
dmd() {  # dmd OUTPUT_DIR [OVERRIDES...]: stage 3, phase dmd, from the ode phase's export, the mid bundle as real score
    local out=$1; shift
    python3 -c "$T" configs/tiny/stage3.yaml max_seconds="${S3_SECONDS:-240}" output_dir="$out" \
        model.init_from="$R/stage3-ode/model" model.real_score_from="$R/helios-tiny-mid" \
        model.components_from="$R/helios-tiny-mid" data.cache_dir="$R/cache" \
        ${DMD_GUIDANCE:+distill.real_guidance_scale=$DMD_GUIDANCE} "$@" "${EXTRA[@]}"
}
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(vae cache stage1 stage2 bundle2 ode stage3 bundle3)

for step in "${STEPS[@]}"; do
    echo "== $step ($(date +%T))"
    case "$step" in
    vae)  # VAE_FROM: a vae/ folder to continue from (with VAE_STEPS=0: the same init as the run that made it)
        python3 -m helios.train.tiny vae "$R/init" --steps "${VAE_STEPS:-100000}" --batch "${VAE_BATCH:-48}" --kind base \
            --max-seconds "${VAE_SECONDS:-150}" ${VAE_FROM:+--init-vae "$VAE_FROM"} \
            ${VAE_OBJECT_WEIGHT:+--object-weight "$VAE_OBJECT_WEIGHT"} ${VAE_DECODER_ONLY:+--decoder-only} \
            ${TEXT_STEPS:+--text-pretrain-steps "$TEXT_STEPS"} ;;
    cache)  # CACHE_FROM: the model folder whose VAE and text encoder make the cache
        python3 -m helios.train.tiny cache "${CACHE_FROM:-$R/init}" "$R/cache" --videos "${VIDEOS:-4000}" ;;
    stage1)
        python3 -c "$T" configs/tiny/stage1.yaml max_seconds="${S1_SECONDS:-200}" output_dir="$R/stage1" \
            model.init_from="$R/init" data.cache_dir="$R/cache" "${EXTRA[@]}" "${S1_EXTRA[@]}"
        python3 -m helios.train.tiny bundle "$R/stage1/model" "$R/helios-tiny-base" --kind base ;;
    stage1-plain)  # the same without Easy Anti-Drifting, for the drift study (one process at a time on
                   # a GPU: two small-model trainings side by side ran 10x slower, not 2x)
        python3 -c "$T" configs/tiny/stage1-no-antidrift.yaml max_seconds="${S1_SECONDS:-200}" \
            output_dir="$R/stage1-plain" model.init_from="$R/init" data.cache_dir="$R/cache" "${EXTRA[@]}" "${S1_EXTRA[@]}"
        python3 -m helios.train.tiny bundle "$R/stage1-plain/model" "$R/helios-tiny-plain-base" --kind base ;;
    stage2)
        python3 -c "$T" configs/tiny/stage2.yaml max_seconds="${S2_SECONDS:-100}" output_dir="$R/stage2" \
            model.init_from="$R/stage1/model" data.cache_dir="$R/cache" "${EXTRA[@]}" ;;
    bundle2)
        python3 -m helios.train.tiny bundle "$R/stage2/model" "$R/helios-tiny-mid" --kind mid ;;
    ode)  # stage 3, phase ode: the teacher's (mid bundle's) trajectories, then regression on them
        O=(output_dir="$R/stage3-ode" model.init_from="$R/helios-tiny-mid" data.cache_dir="$R/cache"
           distill.ode.data="$R/ode-pairs" ${ODE_GUIDANCE:+distill.ode.teacher.guidance_scale=$ODE_GUIDANCE})
        python3 -m helios.train.ode configs/tiny/stage3-ode.yaml --limit "${ODE_CAPTIONS:-40}" "${O[@]/#/--set=}"
        python3 -c "$T" configs/tiny/stage3-ode.yaml max_seconds="${S3O_SECONDS:-60}" "${O[@]}" "${EXTRA[@]}" ;;
    stage3)  # stage 3, phase dmd, from the ode phase's export
        dmd "$R/stage3" ;;
    bundle3)
        python3 -m helios.train.tiny bundle "$R/stage3/model" "$R/helios-tiny-distilled" --kind distilled ;;
    stage3-3step)  # phase dmd for 1/1/1 sampling ("3 steps"; sample it with --steps 1), from the same ode export
        dmd "$R/stage3-3step" "distill.rollout_steps_per_stage=[1,1,1]"
        python3 -m helios.train.tiny bundle "$R/stage3-3step/model" "$R/helios-tiny-distilled-3step" --kind distilled ;;
    *)
        echo "unknown step '$step' (steps: vae cache stage1 stage1-plain stage2 bundle2 ode stage3 bundle3 stage3-3step)" >&2; exit 2 ;;
    esac
done
