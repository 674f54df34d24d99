#!/usr/bin/env bash
# Shared by every script: turns environment variables into flags in the array ARGS.
#   DEVICE EPOCHS BATCH_SIZE VISION_DEPTH DATASET MODEL SEED TEXT_ENCODER IMAGE_ENCODER SAVE_NAME SWANLAB_MODE
# and appends EXTRA_ARGS (split on spaces) last, so it wins over everything else.
#   env_args                   every variable above (training scripts)
#   env_args DEVICE BATCH_SIZE only these (a tool that loads a run takes its other settings from the run)
MANGO_ENV_FLAGS="DEVICE:device EPOCHS:epochs BATCH_SIZE:batch_size VISION_DEPTH:vision_depth DATASET:dataset_name
MODEL:model SEED:seed TEXT_ENCODER:text_encoder IMAGE_ENCODER:image_encoder SAVE_NAME:save_name
SWANLAB_MODE:swanlab_mode"
env_args() {
  ARGS=()
  local pair var only=" $* "
  for pair in $MANGO_ENV_FLAGS; do
    var=${pair%%:*}
    if [ $# -gt 0 ] && [[ $only != *" $var "* ]]; then continue; fi
    if [ -n "${!var:-}" ]; then ARGS+=("--${pair#*:}" "${!var}"); fi
  done
  if [ -n "${EXTRA_ARGS:-}" ]; then
    local extra
    read -r -a extra <<< "$EXTRA_ARGS"
    ARGS+=("${extra[@]}")
  fi
}
