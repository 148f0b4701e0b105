#!/usr/bin/env bash
# The test command: installs what is missing, lints, then runs every test (unit, integration,
# MongoDB test server conformance, end to end, fault suite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m ruff check .
python3 -m pytest "$@"
