#!/usr/bin/env bash
# The main job without Docker: installs what is missing, then runs the whole pipeline locally
# (redis-server, the MongoDB test server, an SMTP sink, the listener, two workers, Flower) and
# performs sample writes. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec python3 -m harness.quickstart "$@"
