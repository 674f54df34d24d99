#!/usr/bin/env bash
# The seed's grid: MNER over residual_lambda (the seed's align weight) x resampler_tokens, then a batch test of the grid's runs on dev and test;
# the setting is chosen on dev F1 only, and its test F1 is read next to it (one line at the end).
#   bash script/run_roberta_clip_lambdas.sh
#   LAMBDAS="0.1 0.3" TOKENS="4 8" DATASET=twitter2017 IMAGE_ENCODER=/models/clip bash script/run_roberta_clip_lambdas.sh
# Env: LAMBDAS (default "0.05 0.1 0.3 0.5"), TOKENS (default "4 8 16"), GRID_NAME (run-name prefix),
#      and DEVICE EPOCHS BATCH_SIZE DATASET SEED TEXT_ENCODER IMAGE_ENCODER EXTRA_ARGS
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
. script/env_args.sh
: "${DATASET:=twitter2017}" "${LAMBDAS:=0.05 0.1 0.3 0.5}" "${TOKENS:=4 8 16}" "${GRID_NAME:=grid_$(date +%Y%m%d-%H%M%S)}"
export DATASET MODEL=MNER
unset SAVE_NAME
env_args
names=()
for lam in $LAMBDAS; do
  for tok in $TOKENS; do
    name="${GRID_NAME}_res${lam}_tok${tok}"
    names+=("$name")
    python train.py --residual_lambda "$lam" --resampler_tokens "$tok" --save_name "$name" "${ARGS[@]}"
  done
done
# EXTRA_ARGS held training flags: the scoring takes each run's own (test.py refuses a training flag)
EXTRA_ARGS="" OUT_DIR="${OUT_DIR:-$PWD/logs_test_$GRID_NAME}" bash script/batch_test.sh "${names[@]}"
python - "${OUT_DIR:-$PWD/logs_test_$GRID_NAME}/summary.csv" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["dev_f1"] not in ("", "NA")]
if not rows:
    sys.exit("error: no run of the grid was scored on dev; see the logs next to " + sys.argv[1])
best = max(rows, key=lambda r: float(r["dev_f1"]))
print(f"best on dev: {best['run_name']} (dev F1 {best['dev_f1']}); its test F1 {best['f1']} "
      f"({len(rows)} settings compared on dev only)")
PY
