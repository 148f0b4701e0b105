#!/usr/bin/env bash
# The main job without Docker: installs what is missing, then runs the whole pipeline locally
# (redis-server, the MongoDB test server, an SMTP sink, the listener, two workers, Flower) and
# performs sample writes, in the project virtualenv. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${CHANGEFLOW_VENV:-.venv}/bin/python" -m harness.quickstart "$@"
