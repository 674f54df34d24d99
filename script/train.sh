#!/usr/bin/env bash
# MNER with a pretrained vision encoder: EfficientNet-Lite0 (default) or a local CLIP directory.
#   bash script/train.sh
#   DATASET=twitter2015 IMAGE_ENCODER=/models/clip-vit-base-patch32 EPOCHS=20 bash script/train.sh
# Env: DEVICE EPOCHS BATCH_SIZE VISION_DEPTH DATASET MODEL SEED TEXT_ENCODER IMAGE_ENCODER SAVE_NAME SWANLAB_MODE
#      EXTRA_ARGS
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
. script/env_args.sh
: "${DATASET:=twitter2017}" "${MODEL:=MNER}"
export DATASET MODEL
env_args
exec python train.py "${ARGS[@]}" "$@"
