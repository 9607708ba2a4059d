#!/usr/bin/env bash
# The GPU runs that train the shipped bundle (each must end inside a 10-minute run; bring the
# wheels without PyAV: nothing here writes an mp4, and the tree with them would pass the 64 MiB limit):
#   bash configs/tiny/device.sh OUT_DIR mid        # VAE, latent cache, stages 1 and 2 -> helios-tiny-mid
#   bash configs/tiny/device.sh OUT_DIR distilled  # from runs/tiny/helios-tiny-mid (or MID_FROM): stage 3 (ode,
#                                                  # dmd), then the speed of the distilled and mid bundles on the GPU
#   bash configs/tiny/device.sh OUT_DIR more       # right after mid, on the still-warm machine: more stage 1, stage 2 again
#   bash configs/tiny/device.sh OUT_DIR plain      # from runs/tiny/helios-tiny-base: stage 1 without anti-drifting
#   bash configs/tiny/device.sh OUT_DIR all        # mid and distilled, with short budgets, after a trained VAE
#   FROM=BASE bash configs/tiny/device.sh OUT_DIR continue  # as mid, stage 1 starting from the trained base bundle BASE
#   bash configs/tiny/device.sh OUT_DIR decoder    # the shipped VAE's decoder alone, into a copy of the shipped bundle
# Parts mid, more and distilled end with a prompt-adherence run of their model on the GPU (ADH_SECONDS each,
# 0: none) into OUT_DIR/adherence-*, to choose the next run before the machine cools.
# Results land in runs/tiny and are packed into OUT_DIR as tar parts of at most 15 MB. One process
# at a time on the GPU: two small-model processes side by side ran ten times slower each.
set -uo pipefail
OUT=${1:?usage: device.sh OUT_DIR mid|continue|more|plain|distilled|all|decoder}
PART=${2:?usage: device.sh OUT_DIR mid|continue|more|plain|distilled|all|decoder}
R=${RUNS:-runs/tiny}
pack() {  # pack NAME PATHS...: a tar split into parts small enough to come back from the device
    local name=$1; shift
    tar czf - "$@" 2>/dev/null | split -b 15M -d - "$OUT/$(basename "$R")-$name.tgz.part"
}
# A bounded CPU thread pool per process: on the 2-GPU machine (32 cores) two trainings with default
# threads ran 40x slower than one alone (5 s per step).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
mkdir -p "$R/logs"
START=$(date +%s)
budget() {  # budget CAP RESERVE: CAP seconds, or what the run has left (CALL_SECONDS from the start) less RESERVE
    local left=$(( START + ${CALL_SECONDS:-540} - $(date +%s) - $2 ))
    echo $(( left < $1 ? left : $1 ))
}
adherence() {  # adherence NAME MODEL [ARGS...]: prompt adherence on the GPU (seconds; the CPU numbers of the docs
    # come from the same script afterwards), so that the next run can be chosen before the machine cools
    local name=$1 model=$2; shift 2
    [ "${ADH_SECONDS:-45}" -gt 0 ] || return 0
    timeout "${ADH_SECONDS:-45}" python3 benchmarks/prompt_adherence.py "$model" --device "${DEVICE:-cuda}" \
        --out "$OUT/adherence-$name" "$@" > "$R/logs/adherence-$name.log" 2>&1
    grep "^mean" "$R/logs/adherence-$name.log" | sed "s/^/adherence $name: /"
}
run_stage() {  # run_stage VAR CAP RESERVE STEPS...: the train.sh steps with VAR set to its budget
    local var=$1 cap=$2 b; b=$(budget "$2" "$3"); shift 3
    echo "$var budget: ${b}s"
    [ "$b" -ge $(( cap < 20 ? cap : 20 )) ] || { echo "no time left for $*" >&2; exit 1; }
    env "$var=$b" bash configs/tiny/train.sh "$@" || exit 1
}
# Reserves (seconds) for what must still run after a stage, from the H200 runs of 2026-12-01: stage 2
# and its start-up, export and packing (+35), and stage 3: ~4 s of ODE pairs per caption, phase ode and
# its overhead, at least a minute of phase dmd (+100).
S2=${S2_SECONDS:-100}
ADH=$(( ${ADH_SECONDS:-45} * 2 + 5 ))
DISTILL=$(( ${S3O_SECONDS:-60} + ${ODE_CAPTIONS:-40} * 4 + 100 ))
case "$PART" in
mid)  # VAE (VAE_FROM: continue a trained vae/ folder), latent cache, stages 1 and 2; prompt adherence and
      # the long videos are scored on the CPU afterwards (benchmarks/prompt_adherence.py, drift_study.py).
      # Stage 1 gets what the run has left, at most S1_SECONDS: a slow cache must not cost the models.
    bash configs/tiny/train.sh vae cache || exit 1
    run_stage S1_SECONDS "${S1_SECONDS:-200}" $(( S2 + 35 + ADH )) stage1 stage2 bundle2
    adherence mid-g3 "$R/helios-tiny-mid" --guidance 3; adherence mid "$R/helios-tiny-mid"
    pack mid "$R/helios-tiny-mid" "$R/helios-tiny-base" "$R"/*/metrics.jsonl "$R/init/vae_train_log.json" "$R/logs" ;;
continue)  # as mid, with stage 1 starting from a trained base bundle (FROM, e.g. run 10's in benchmarks/results)
           # rather than a fresh transformer: its VAE and text encoder make the cache and go into every bundle.
           # No VAE step: the VAE is the one the base model learnt. `more` and `distilled` follow as after mid.
    FROM=${FROM:?FROM: the trained base bundle to continue stage 1 from}
    CACHE_FROM="$FROM" bash configs/tiny/train.sh cache || exit 1
    S1_OVERRIDES="model.init_from=$FROM ${S1_OVERRIDES:-}" \
        run_stage S1_SECONDS "${S1_SECONDS:-200}" $(( S2 + 35 + ADH )) stage1 stage2 bundle2
    adherence continue-g3 "$R/helios-tiny-mid" --guidance 3; adherence continue-g2 "$R/helios-tiny-mid" --guidance 2
    pack mid "$R/helios-tiny-mid" "$R/helios-tiny-base" "$R"/*/metrics.jsonl "$R/logs" ;;
all)  # everything in one run, each training stage on what the run has left
    bash configs/tiny/train.sh vae cache || exit 1
    run_stage S1_SECONDS "${S1_SECONDS:-200}" $(( S2 + 35 + DISTILL )) stage1 stage2 bundle2
    pack mid "$R/helios-tiny-mid" "$R/helios-tiny-base" "$R"/*/metrics.jsonl "$R/init/vae_train_log.json" "$R/logs"
    bash configs/tiny/train.sh ode || exit 1
    run_stage S3_SECONDS "${S3_SECONDS:-240}" 25 stage3 bundle3
    pack distilled "$R/helios-tiny-distilled" "$R"/stage3*/metrics.jsonl "$R/logs" ;;
more)  # on a machine still warm from a `mid` (or `more`) run, whose runs/ is still there: stage 1
      # continues from its checkpoint for what the run has left, then stage 2 starts again from it
    ls "$R"/stage1/checkpoints/step-* >/dev/null 2>&1 || {
        echo "no stage-1 checkpoint in $R/stage1: run part mid first, on the same warm machine" >&2; exit 2; }
    rm -rf "$R/stage2"
    S1_OVERRIDES="checkpointing.resume=latest ${S1_OVERRIDES:-}" \
        run_stage S1_SECONDS "${S1_SECONDS:-600}" $(( S2 + 35 + ADH )) stage1 stage2 bundle2
    adherence more-g3 "$R/helios-tiny-mid" --guidance 3; adherence more-g2 "$R/helios-tiny-mid" --guidance 2
    pack mid "$R/helios-tiny-mid" "$R/helios-tiny-base" "$R"/*/metrics.jsonl "$R/logs" ;;
plain)  # the drift study's second model, from runs/tiny/helios-tiny-base: the same init (its VAE, no more VAE
        # steps), cache and stage-1 steps (S1_STEPS: the anti-drift run's, from its log) with Easy
        # Anti-Drifting off; its long videos are made on the CPU afterwards (benchmarks/drift_study.py)
    VAE_FROM="$R/helios-tiny-base/vae" VAE_STEPS=0 bash configs/tiny/train.sh vae cache || exit 1
    S1_OVERRIDES="max_steps=${S1_STEPS:?S1_STEPS: the stage-1 steps of the anti-drift run} ${S1_OVERRIDES:-}" \
        run_stage S1_SECONDS "${S1_SECONDS:-600}" 10 stage1-plain
    pack plain "$R/helios-tiny-plain-base" "$R"/stage1-plain/metrics.jsonl "$R/logs" ;;
decoder)  # the decoder of VAE_FROM (default: the shipped VAE) trained with its encoder frozen (VAE_SECONDS,
         # VAE_OBJECT_WEIGHT): the latents stay those the shipped transformer learnt, so the new decoder goes
         # into a copy of the shipped bundle as it is (runs/tiny/helios-tiny-decoder), scored beside the shipped one
    VAE_FROM=${VAE_FROM:-src/helios/assets/helios-tiny/vae} VAE_DECODER_ONLY=1 TEXT_STEPS=0 \
        bash configs/tiny/train.sh vae || exit 1
    rm -rf "$R/helios-tiny-decoder" && cp -r src/helios/assets/helios-tiny "$R/helios-tiny-decoder" &&
        rm -rf "$R/helios-tiny-decoder/vae" && cp -r "$R/init/vae" "$R/helios-tiny-decoder/vae" || exit 1
    adherence shipped src/helios/assets/helios-tiny; adherence decoder "$R/helios-tiny-decoder"
    pack decoder "$R/init/vae" "$R/init/vae_train_log.json" "$R/logs" ;;
distilled)  # from runs/tiny/helios-tiny-mid (or MID_FROM, a kept mid bundle, copied there first: no earlier run
            # needed): stage 3 (ode pairs, ode, dmd), then the GPU speed of both
    if [ -n "${MID_FROM:-}" ]; then
        rm -rf "$R/helios-tiny-mid" && cp -r "$MID_FROM" "$R/helios-tiny-mid" || exit 1
    fi
    [ -f "$R/helios-tiny-mid/model_index.json" ] || {
        echo "no mid bundle in $R/helios-tiny-mid: run part mid first, or give MID_FROM" >&2; exit 2; }
    CACHE_FROM="$R/helios-tiny-mid" bash configs/tiny/train.sh cache ode || exit 1
    run_stage S3_SECONDS "${S3_SECONDS:-240}" $(( ${SPEED_SECONDS:-90} + 40 + ADH / 2 )) stage3 bundle3
    adherence distilled "$R/helios-tiny-distilled"
    pack distilled "$R/helios-tiny-distilled" "$R"/stage3*/metrics.jsonl "$R/logs"
    [ "${SPEED_SECONDS:-90}" -gt 0 ] || exit 0  # SPEED_SECONDS=0: no speed run (timeout 0 would mean no limit)
    timeout "${SPEED_SECONDS:-90}" python3 benchmarks/small_model_speed.py --device "${DEVICE:-cuda}" --seconds 10 \
        --model "distilled=$R/helios-tiny-distilled" --model "mid=$R/helios-tiny-mid" \
        --out "$OUT/speed-gpu.json" > "$R/logs/speed-gpu.log" 2>&1
    cp "$R/logs/speed-gpu.log" "$OUT/" ;;
*)
    echo "unknown part '$PART' (mid, continue, more, plain, distilled, all or decoder)" >&2; exit 2 ;;
esac
