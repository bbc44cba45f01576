#!/usr/bin/env bash
# Install stampd into ./.venv and start a demo TSA: embedded SQLite records, encrypted key files and the demo
# PKI that `stampd init demo` creates on the first run (demo/stampd.toml, demo/pki, demo/secrets).
#
# Serves http://127.0.0.1:3180/ until Ctrl-C. Arguments go to `stampd serve`, e.g. --listen 127.0.0.1:8318.
# The host clock is NOT monitored in this profile: the log says so at start-up.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check .
if [ ! -f demo/stampd.toml ]; then
    .venv/bin/stampd init demo
fi
exec .venv/bin/stampd serve -c demo/stampd.toml "$@"
