#!/usr/bin/env bash
# The README results table: datasets x models x seeds, each run selected on dev and scored once on test.
#   bash script/reproduce.sh                                  # everything (long: hours on a 2-core CPU)
#   DATASETS=demo MODELS="roberta_crf MNER" SEEDS="1 2 3" bash script/reproduce.sh
#   JOBS=2 bash script/reproduce.sh                           # two runs at a time, cores split between them
# DATASETS: twitter2017 twitter2015 demo (any --dataset_name works)
# MODELS:   roberta_crf (text-only baseline) | MNER (EfficientNet-Lite0, script/train.sh)
#           | MNER_dual (dual granularity, script/train_dual_granularity.sh, same flags as that script)
#           | MNER_dual_conv (the same with the from-scratch conv stem + distillation, 112 px, 15 epochs)
#           | roberta_crf_distill (the text path distilled from a base-size teacher, script/distill.sh)
# SEEDS (default "1 2 3"), EPOCHS (default: each script's own), TEXT_ENCODER, DEVICE, EXTRA_ARGS as everywhere.
# Runs are save_models/repro_<dataset>_<model>_s<seed>; finished ones are kept, interrupted ones resume from
# last.pt, so rerunning the command continues where it stopped. Logs: results/logs/<run>.log.
# Ends with `python results.py`, which writes results/<dataset>.json and results/<dataset>.md.
set -uo pipefail
if [ $# -gt 0 ]; then  # no --dry-run here: an unread argument would start hours of runs
  echo "error: reproduce.sh takes no arguments ('$1'); set DATASETS, MODELS, SEEDS, JOBS, EPOCHS, EXTRA_ARGS" >&2; exit 2
fi
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
DATASETS=${DATASETS:-"twitter2017 twitter2015 demo"}
MODELS=${MODELS:-"roberta_crf MNER MNER_dual"}
SEEDS=${SEEDS:-"1 2 3"}
JOBS=${JOBS:-1}
SAVE_DIR="$MANGO_ROOT/save_models"
mkdir -p results/logs
CORES=$(nproc)
THREADS=$(( CORES / JOBS > 0 ? CORES / JOBS : 1 ))

one_run() {  # dataset model seed
  local ds=$1 model=$2 seed=$3 name="repro_$1_$2_s$3" run="$SAVE_DIR/repro_$1_$2_s$3"
  local log="results/logs/$name.log"
  if [ -f "$run/test_report.json" ]; then echo "done already: $name"; return 0; fi
  local script=script/train.sh resume=() extra=()
  case $model in
    roberta_crf) export MODEL=roberta_crf ;;
    MNER) export MODEL=MNER ;;
    MNER_dual) export MODEL=MNER; script=script/train_dual_granularity.sh ;;
    MNER_dual_conv) export MODEL=MNER EPOCHS=${EPOCHS:-15}; script=script/train_dual_granularity.sh  # 15 unless EPOCHS says
      extra=(--vision_stem conv --vision_img_size 112 --vision_patch_size 16 --vision_fine_patch_size 8) ;;
    roberta_crf_distill) export MODEL=roberta_crf; script=script/distill.sh ;;
    *) echo "error: MODELS: unknown '$model'; use roberta_crf, roberta_crf_distill, MNER, MNER_dual or MNER_dual_conv" >&2; return 2 ;;
  esac
  if [ -f "$run/last.pt" ]; then resume=(--continue_train_name "$name"); else rm -rf "$run"; fi
  echo "start: $name ($THREADS threads) -> $log"
  local t0=$SECONDS
  # the resume flag goes last so it wins; a resumed run keeps its own config.json
  DATASET=$ds SEED=$seed SAVE_NAME=$name OMP_NUM_THREADS=$THREADS \
    bash "$script" "${extra[@]}" --swanlab_mode "${SWANLAB_MODE:-local}" "${resume[@]}" > "$log" 2>&1
  local rc=$?
  echo $(( SECONDS - t0 )) >> "$run/wall_s.txt" 2>/dev/null
  if [ $rc -ne 0 ]; then echo "FAILED ($rc): $name, see $log" >&2; else echo "finished: $name in $(( SECONDS - t0 )) s"; fi
  return $rc
}

failed=$(mktemp)  # one line per failed run, written by the run itself: none is missed however jobs end
for ds in $DATASETS; do
  for model in $MODELS; do
    for seed in $SEEDS; do
      while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
      { one_run "$ds" "$model" "$seed" || echo "$ds $model $seed" >> "$failed"; } &
    done
  done
done
wait
fails=$(wc -l < "$failed"); rm -f "$failed"
python results.py --datasets $DATASETS --models $MODELS --seeds $SEEDS --save_dir "$SAVE_DIR" \
  --note "$JOBS run(s) at a time, $THREADS thread(s) each"
[ "$fails" -eq 0 ] || { echo "$fails run(s) failed; rerun the same command to resume them" >&2; exit 1; }
