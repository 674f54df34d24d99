#!/usr/bin/env bash
# One training pass and the test tagging of one dataset, flair's recipe (script/peer_flair.sh) then MANGO's text
# path, one after the other at the same thread count, and the ratios of the two. MANGO tags twice: from the
# checkpoint (torch) and from its fp32 export (export.py's bundle, onnxruntime; the same tags). Run it with nothing
# else on the machine: the figures are wall-clock.
#   bash script/speed_vs_flair.sh                       Twitter-2017, 2 threads, seed 1
#   THREADS=1 DATASET=twitter2015 OUT=results/speed_vs_flair_t15_1thread.json bash script/speed_vs_flair.sh
# DATASET, SEED, TEXT_ENCODER (a local encoder directory; default the shipped MiniLM) and EXTRA_ARGS (e.g.
# "--data_dir DIR") go to both sides, through the scripts' env-to-flag helper; MANGO_ARGS (e.g. "--amp", split on
# spaces) to MANGO's training only (the checkpoint's tagging follows the run's own settings).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1  # MANGO's environment (flair's is peer_flair.sh's own)
THREADS=${THREADS:-2}
DATASET=${DATASET:-twitter2017}
SEED=${SEED:-1}
# MANGO_ARGS name their own file ("--amp": ..._amp.json), so the fp32 figures stay
TAG=$(printf %s "${MANGO_ARGS:-}" | tr -cs 'A-Za-z0-9' '_' | sed 's/^_*//; s/_*$//')
OUT=${OUT:-results/speed_vs_flair_${DATASET}_${THREADS}thread${TAG:+_$TAG}.json}
RUN=speed_mango_${DATASET}_${THREADS}thread
export OMP_NUM_THREADS=$THREADS
. script/env_args.sh
env_args DATASET SEED TEXT_ENCODER
SHARED=(--epochs 1 "${ARGS[@]}")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

bash script/peer_flair.sh "${SHARED[@]}" --threads "$THREADS" --json "$tmp/flair.json"
read -ra MANGO_ONLY <<< "${MANGO_ARGS:-}"
python train.py --model roberta_crf "${SHARED[@]}" "${MANGO_ONLY[@]}" --save_dir "$tmp" --save_name "$RUN" \
  --swanlab_mode disabled
python test.py --save_dir "$tmp" --save_name "$RUN" --split test | tee "$tmp/test.log"
python export.py --save_dir "$tmp" --save_name "$RUN"
python test.py --save_dir "$tmp" --save_name "$RUN" --split test --bundle "$tmp/$RUN/bundle" | tee "$tmp/bundle.log"

python - "$tmp" "$OUT" "$RUN" "$THREADS" "$DATASET" "${MANGO_ARGS:-}" <<'EOF'
import json, re, shlex, sys
from pathlib import Path
tmp, out, run, threads, dataset, mango_args = sys.argv[1:]
flair = json.loads(Path(tmp, "flair.json").read_text())
metrics = [json.loads(l) for l in Path(tmp, run, "metrics.jsonl").read_text().splitlines() if l.strip()]
pps = {f: float(re.search(r"([0-9.]+) posts/s", Path(tmp, f + ".log").read_text()).group(1)) for f in ("test", "bundle")}
mango_pps = pps["test"]
flair_train = flair["epochs"][0]["train_s"]
res = {"what": f"one training pass and the test tagging of {dataset}, flair's recipe then MANGO's text path, "
               f"{threads} thread(s) each, one after the other",
       "command": f"THREADS={threads} DATASET={dataset}" + (f" MANGO_ARGS={shlex.quote(mango_args)}" if mango_args
                                                             else "") + " bash script/speed_vs_flair.sh",
       "flair": {"train_s": flair_train, "test_posts_per_s": flair["test_posts_per_s"]},
       "mango": {"train_s": metrics[0]["train_s"], "test_posts_per_s": mango_pps,
                 "amp": json.loads(Path(tmp, run, "config.json").read_text())["amp"],
                 "bundle_test_posts_per_s": pps["bundle"]}}
res["train_ratio"] = round(res["mango"]["train_s"] / flair_train, 3)
res["eval_ratio"] = round(mango_pps / flair["test_posts_per_s"], 3)
res["bundle_eval_ratio"] = round(pps["bundle"] / flair["test_posts_per_s"], 3)
Path(out).write_text(json.dumps(res, indent=1) + "\n")
print(f"train pass: MANGO {res['mango']['train_s']} s, flair {flair_train} s: {res['train_ratio']}x; "
      f"test tagging: MANGO {mango_pps:.0f} posts/s, flair {flair['test_posts_per_s']}: {res['eval_ratio']}x; "
      f"MANGO's fp32 bundle {pps['bundle']:.0f} posts/s: {res['bundle_eval_ratio']}x ({threads} thread(s); {out})")
EOF
