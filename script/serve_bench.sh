#!/usr/bin/env bash
# Service load by hand (not CI): serve.py on loopback, CLIENTS concurrent clients each sending single posts with
# their images for DURATION seconds, then predict.py --input on the same posts for comparison.
#   BUNDLE=save_models/<run>/bundle_int8 bash script/serve_bench.sh
#   SAVE_NAME=<run> bash script/serve_bench.sh          # serve the checkpoint instead
# Env: BUNDLE or SAVE_NAME, DATASET (demo), DURATION (seconds, 60), CLIENTS (8), PORT (8765), EXTRA_ARGS (to serve.py)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
DATASET=${DATASET:-demo}; DURATION=${DURATION:-60}; CLIENTS=${CLIENTS:-8}; PORT=${PORT:-8765}
if [ -n "${BUNDLE:-}" ]; then SRC=(--bundle "$BUNDLE"); else SRC=(--save_name "${SAVE_NAME:?set BUNDLE or SAVE_NAME}" --device cpu); fi
work=$(mktemp -d)
python script/demo_posts.py --dataset_name "$DATASET" --out "$work/posts.jsonl" >/dev/null
read -r -a extra <<< "${EXTRA_ARGS:-}"
python serve.py "${SRC[@]}" --port "$PORT" "${extra[@]}" > "$work/serve.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$work/serve.log"; exit 1; }
  sleep 0.5
done
curl -s "http://127.0.0.1:$PORT/info"; echo
echo "load: $CLIENTS clients, single posts with images, ${DURATION} s"
python script/serve_bench.py --url "http://127.0.0.1:$PORT" --posts "$work/posts.jsonl" --clients "$CLIENTS" \
  --seconds "$DURATION" --out "$work/load.json"
kill "$server"; wait "$server" 2>/dev/null || true
echo "predict.py --input on the same posts:"
python predict.py "${SRC[@]}" --input "$work/posts.jsonl" --out_dir "$work/out" --cache_dir "$work/cache" | tail -1
