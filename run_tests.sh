#!/usr/bin/env bash
# Installs what the tests need into .venv (created if missing) and runs them.
# Extra arguments go to pytest, e.g. ./run_tests.sh -k labels
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[cpu,test,beam,faces,tflite]'
exec .venv/bin/python -m pytest "$@"
