#!/usr/bin/env bash
# New images with predict.py --input: posts/s with the checkpoint (pool decoding + batched backbone) and with
# bundles. Every run gets an empty feature cache, so no image is cached. (The sequential predict.py of 9e19cc0,
# the "before" of the int8 work, no longer runs against the current modules; its figure is kept in docs/speed.md.)
#   SAVE_NAME=<demo MNER run> bash script/images_bench.sh [bundle dir ...]
# Env: SAVE_NAME (required), DATASET (demo), REPEATS (3). Prints each run's posts/s line, then the medians.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
: "${SAVE_NAME:?set SAVE_NAME to a trained MNER run}"
DATASET=${DATASET:-demo}; REPEATS=${REPEATS:-3}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python script/demo_posts.py --dataset_name "$DATASET" --out "$work/posts.jsonl" >/dev/null
run() {  # label, command...: REPEATS runs, each with a fresh cache; prints the median posts/s
  local label=$1; shift; local vals=()
  for r in $(seq "$REPEATS"); do
    rm -rf "$work/cache"
    v=$("$@" --input "$work/posts.jsonl" --out_dir "$work/out" --cache_dir "$work/cache" | tail -1 | awk '{print $6}')
    vals+=("$v")
  done
  printf '%-34s %s posts/s (runs: %s)\n' "$label" "$(printf '%s\n' "${vals[@]}" | sort -g | sed -n "$(( (REPEATS + 1) / 2 ))p")" "${vals[*]}"
}
run "checkpoint (pool + batches)" python predict.py --save_name "$SAVE_NAME" --device cpu
for b in "$@"; do run "bundle $(basename "$b")" python predict.py --bundle "$b"; done
