#!/usr/bin/env bash
# The test command: installs what is missing, lints, then runs every test (unit, integration,
# MongoDB test server conformance, end to end, fault suite) in the project virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python="${CHANGEFLOW_VENV:-.venv}/bin/python"
"$python" -m ruff check .
"$python" -m pytest "$@"
