#!/usr/bin/env bash
# Installs what changeflow needs on a Debian machine with Python 3.11+: the Debian packages it runs
# (redis-server, redis-sentinel and openssl for the Sentinel and TLS tests, chromium for the realtime
# page's browser test, prometheus for promtool (the alert rules' tests), and python3-venv where the
# interpreter lacks it), then a project virtualenv (.venv, or $CHANGEFLOW_VENV) holding changeflow
# with its test extras (pip, editable).
# Never the system interpreter: Debian's is externally managed (PEP 668).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)  # the TLS tests make a private CA
# The realtime page's browser test drives Debian's Chromium (Playwright downloads no browser here).
[ -x /usr/bin/chromium ] || missing+=(chromium)
# promtool (Debian's prometheus package) checks the alert rules (deploy/prometheus, tests/unit/test_alert_rules.py).
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# Node.js 20+ and npm are optional: where they are installed, tests/mongo_double/test_node_driver.py
# runs the Node.js driver conformance tests (its own `npm ci` on first use); elsewhere it skips, saying why.
# Debian ships venv's ensurepip in a package of its own.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install: installing Debian packages: ${missing[*]}"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

venv="${CHANGEFLOW_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "install: creating the virtualenv $venv"
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
