#!/usr/bin/env bash
# Installs what changeflow needs on a Debian machine with Python 3.11+: redis-server, redis-sentinel and
# openssl (Debian packages; the Sentinel and TLS tests run them) when missing, and the project with its
# test extras (pip, editable).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)  # the TLS tests make a private CA
if [ ${#missing[@]} -gt 0 ]; then
  echo "install: ${missing[*]} missing, installing the Debian package(s)"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[test]'
