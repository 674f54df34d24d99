#!/usr/bin/env bash
# MNER with the dual-granularity vision encoder (trained from scratch).
#   bash script/train_dual_granularity.sh                       # demo set, a few minutes on 2 CPU cores
#   DATASET=twitter2017 bash script/train_dual_granularity.sh   # full-size encoder on Twitter-2017
# On the demo set the encoder is made small so it learns in minutes: 64 px images, 8 px coarse patches
# (8x8 grid, window 4), 4 px fine patches pooled to 8x8, width 128, depth 2 (VISION_DEPTH overrides),
# and 12 epochs. Every value lands in the run's config.json.
# Env: DEVICE EPOCHS BATCH_SIZE VISION_DEPTH DATASET MODEL SEED TEXT_ENCODER SAVE_NAME EXTRA_ARGS
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
. script/env_args.sh
: "${DATASET:=demo}" "${MODEL:=MNER}"
SMALL=()
if [ "$DATASET" = demo ]; then
  : "${EPOCHS:=12}" "${VISION_DEPTH:=2}"
  SMALL=(--vision_img_size 64 --vision_patch_size 8 --vision_swin_window 4 --vision_fine_patch_size 4
         --vision_max_patches 64 --vision_embed_dim 128 --vision_delegate_topk 8)
fi
export DATASET MODEL EPOCHS VISION_DEPTH
env_args
exec python train.py --use_dual_granularity "${SMALL[@]}" "${ARGS[@]}" "$@"
