#!/usr/bin/env bash
# Score one run: SAVE_NAME=<run> bash script/test.sh   (EXTRA_ARGS="--split valid --eval_mode strict" ...)
# Env: SAVE_NAME (required) DEVICE BATCH_SIZE EXTRA_ARGS
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
. script/env_args.sh
[ -n "${SAVE_NAME:-}" ] || { echo "error: set SAVE_NAME to a run directory under save_models/" >&2; exit 2; }
env_args SAVE_NAME DEVICE BATCH_SIZE
exec python test.py "${ARGS[@]}" "$@"
