#!/usr/bin/env bash
# Score many runs on dev and test and collect one CSV (choose on dev_f1, read test next to it).
#   bash script/batch_test.sh                 # every run directory under save_models/
#   bash script/batch_test.sh run_a run_b     # these runs (a missing one gets an NA row)
# Writes logs_test_<stamp>/<run>.log and logs_test_<stamp>/summary.csv: test.py --record_file's columns
#   run_name,split,mode,image_control,dev_f1,acc,precision,recall,f1,per_f1,loc_f1,org_f1,misc_f1 + log_file
# Env: DEVICE BATCH_SIZE EXTRA_ARGS (e.g. "--image_control shuffle"), SPLIT (default valid,test),
#      SAVE_DIR (default save_models), OUT_DIR
set -uo pipefail
caller=$PWD  # relative SAVE_DIR / OUT_DIR are the caller's, not the repo root setup.sh moves to
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
. script/env_args.sh
SAVE_DIR="${SAVE_DIR:-$MANGO_ROOT/save_models}"
OUT_DIR="${OUT_DIR:-$MANGO_ROOT/logs_test_$(date +%Y%m%d-%H%M%S)}"
case $SAVE_DIR in /*) ;; *) SAVE_DIR="$caller/$SAVE_DIR" ;; esac
case $OUT_DIR in /*) ;; *) OUT_DIR="$caller/$OUT_DIR" ;; esac
mkdir -p "$OUT_DIR"
if [ $# -gt 0 ]; then runs=("$@"); else
  runs=(); for d in "$SAVE_DIR"/*/; do [ -f "$d/config.json" ] && runs+=("$(basename "$d")"); done
fi
env_args DEVICE BATCH_SIZE
summary="$OUT_DIR/summary.csv"
rows="$OUT_DIR/.rows.csv"
rm -f "$rows"
python -c "import results; print(','.join(results.RECORD_FIELDS + ['log_file']))" > "$summary"
for run in "${runs[@]}"; do
  log="$OUT_DIR/$run.log"
  echo "== $run"
  n0=$( [ -f "$rows" ] && wc -l < "$rows" || echo 0)
  python test.py --save_dir "$SAVE_DIR" --save_name "$run" --split "${SPLIT:-valid,test}" --record_file "$rows" \
    "${ARGS[@]}" > "$log" 2>&1
  python - "$run" "$log" "$rows" "$n0" >> "$summary" <<'PY'
import csv, sys
import results
run, log, rows, n0 = sys.argv[1:]
try:
    got = list(csv.DictReader(open(rows)))
except FileNotFoundError:
    got = []
new = got[int(n0) - 1:] if int(n0) else got  # the row test.py appended for this run, if it got that far
row = next((r for r in new if r["run_name"] == run), None) or {"run_name": run}
print(",".join([row.get(k, "NA") or "NA" for k in results.RECORD_FIELDS] + [log]))
PY
  tail -n 1 "$summary"
done
echo "summary: $summary"
