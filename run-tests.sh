#!/usr/bin/env bash
# Run every check CI runs: ruff, mypy (strict, src/), the import-linter contracts and the whole pytest suite
# (unit, property, vector and integration tests; the integration tests start real servers on loopback).
#
# Creates ./.venv with python3 on first use (set PYTHON to choose another interpreter, 3.11 or newer) and
# installs stampd in editable mode with its test dependencies, so the checks always see the working tree.
# Arguments are passed to pytest, e.g. `./run-tests.sh -x -k token`.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
export PATH="$PWD/.venv/bin:$PATH"

if ! command -v openssl >/dev/null 2>&1; then
    echo "run-tests.sh: warning: the openssl command is missing; the OpenSSL interoperability tests will be skipped" >&2
fi

echo "== ruff check"
ruff check .
echo "== mypy"
mypy
echo "== lint-imports"
lint-imports --no-cache --no-logo
echo "== pytest"
pytest "$@"
