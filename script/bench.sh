#!/usr/bin/env bash
# Speed and memory benchmark (bench.py): train posts/s, s/epoch, eval posts/s, peak memory; fp32 vs --amp,
# length bucketing on/off; medians over repeats. Twitter-2017 by default.
#   bash script/bench.sh
#   bash script/bench.sh --cases text,mner_cached --amp_modes amp --repeats 5
#   DEVICE=cuda bash script/bench.sh --sizes base      # RoBERTa-base / CLIP-B/32-sized random encoders
# Env: DEVICE BATCH_SIZE DATASET TEXT_ENCODER IMAGE_ENCODER EXTRA_ARGS (as in every script)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
. script/env_args.sh
env_args
exec python bench.py "${ARGS[@]}" "$@"
