#!/usr/bin/env bash
# The test suite: sets up .venv with the test packages (once), then runs pytest.
#   bash script/run_tests.sh [pytest args]
set -euo pipefail
MANGO_DEV=1 . "$(dirname "${BASH_SOURCE[0]}")/setup.sh" || exit 1
exec python -m pytest -q -p no:cacheprovider "${@:-tests}"
