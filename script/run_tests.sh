#!/usr/bin/env bash
# The test suite: sets up .venv with the test packages (once), then runs pytest in two processes (pytest-xdist),
# each taking whole test files (a file's module fixtures, such as a trained run, are built once).
#   bash script/run_tests.sh [pytest args]
set -euo pipefail
MANGO_DEV=1 . "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
exec python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile "${@:-tests}"
