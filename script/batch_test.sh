#!/usr/bin/env bash
# Score many runs and collect one CSV.
#   bash script/batch_test.sh                 # every run directory under save_models/
#   bash script/batch_test.sh run_a run_b     # these runs (a missing one gets an NA row)
# Writes logs_test_<stamp>/<run>.log and logs_test_<stamp>/summary.csv with columns
#   run_name,acc,precision,recall,f1,per_f1,loc_f1,org_f1,misc_f1,log_file
# Env: DEVICE BATCH_SIZE EXTRA_ARGS (e.g. "--split valid"), SAVE_DIR (default save_models), OUT_DIR
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
. script/env_args.sh
SAVE_DIR="${SAVE_DIR:-$MANGO_ROOT/save_models}"
OUT_DIR="${OUT_DIR:-$PWD/logs_test_$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT_DIR"
if [ $# -gt 0 ]; then runs=("$@"); else
  runs=(); for d in "$SAVE_DIR"/*/; do [ -f "$d/config.json" ] && runs+=("$(basename "$d")"); done
fi
unset SAVE_NAME
env_args
summary="$OUT_DIR/summary.csv"
echo "run_name,acc,precision,recall,f1,per_f1,loc_f1,org_f1,misc_f1,log_file" > "$summary"
for run in "${runs[@]}"; do
  log="$OUT_DIR/$run.log"
  echo "== $run"
  python test.py --save_dir "$SAVE_DIR" --save_name "$run" "${ARGS[@]}" > "$log" 2>&1
  python - "$run" "$log" >> "$summary" <<'PY'
import sys
from metrics import parse_report
run, log = sys.argv[1:]
r = parse_report(open(log, encoding="utf-8", errors="replace").read())
o = r.get("Overall")
f = lambda t: f"{r[t]['f1']:.4f}" if t in r else "NA"
cells = [f"{o['acc']:.4f}", f"{o['p']:.4f}", f"{o['r']:.4f}", f"{o['f1']:.4f}"] if o else ["NA"] * 4
print(",".join([run, *cells, f("PER"), f("LOC"), f("ORG"), f("MISC"), log]))
PY
  tail -n 1 "$summary"
done
echo "summary: $summary"
