#!/usr/bin/env bash
# MNER with MANGO's dual-granularity vision encoder: EfficientNet-Lite0's final features and its stride-16 map (frozen,
# cached once per image) under a coarse Swin + delegate branch and a fine salient-patch transformer branch.
#   bash script/train_dual_granularity.sh                       # demo set, a few minutes on 2 CPU cores
#   DATASET=twitter2017 bash script/train_dual_granularity.sh   # the same encoder on Twitter-2017
#   EPOCHS=15 EXTRA_ARGS="--vision_stem conv --vision_img_size 112 --vision_patch_size 16 --vision_fine_patch_size 8" \
#     bash script/train_dual_granularity.sh                     # from-scratch stem + distillation, its recipe
# Every value lands in the run's config.json.
# Env: DEVICE EPOCHS BATCH_SIZE VISION_DEPTH DATASET MODEL SEED TEXT_ENCODER IMAGE_ENCODER SAVE_NAME SWANLAB_MODE
#      EXTRA_ARGS
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
. script/env_args.sh
: "${DATASET:=demo}" "${MODEL:=MNER}"
export DATASET MODEL
env_args
exec python train.py --use_dual_granularity "${ARGS[@]}" "$@"
