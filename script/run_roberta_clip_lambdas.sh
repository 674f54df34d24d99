#!/usr/bin/env bash
# The seed's grid: MNER over align_lambda x resampler_tokens, then a batch test of the grid's runs.
#   bash script/run_roberta_clip_lambdas.sh
#   LAMBDAS="0.1 0.3" TOKENS="4 8" DATASET=twitter2017 IMAGE_ENCODER=/models/clip bash script/run_roberta_clip_lambdas.sh
# Env: LAMBDAS (default "0.05 0.1 0.3 0.5"), TOKENS (default "4 8 16"), GRID_NAME (run-name prefix),
#      and DEVICE EPOCHS BATCH_SIZE DATASET SEED TEXT_ENCODER IMAGE_ENCODER EXTRA_ARGS
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
. script/env_args.sh
: "${DATASET:=twitter2017}" "${LAMBDAS:=0.05 0.1 0.3 0.5}" "${TOKENS:=4 8 16}" "${GRID_NAME:=grid_$(date +%Y%m%d-%H%M%S)}"
export DATASET MODEL=MNER
unset SAVE_NAME
env_args
names=()
for lam in $LAMBDAS; do
  for tok in $TOKENS; do
    name="${GRID_NAME}_align${lam}_tok${tok}"
    names+=("$name")
    python train.py --align_lambda "$lam" --resampler_tokens "$tok" --save_name "$name" "${ARGS[@]}"
  done
done
bash script/batch_test.sh "${names[@]}"
