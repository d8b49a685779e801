#!/usr/bin/env bash
# The project's one test command (the README's, and .ci/run's): installs what the
# tests need on a fresh Debian machine, then lints and runs every test, real CRIU,
# network namespaces and systemd containers included. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "tools/test.sh: run as root (the tests make network namespaces, run CRIU and boot containers)" >&2
    exit 2
fi

bash tools/install-deps.sh

lint_venv=/var/cache/imgmig-testbed/lint-venv
if [ ! -x "$lint_venv/bin/ruff" ]; then
    /usr/bin/python3 -m venv "$lint_venv"
    "$lint_venv/bin/pip" install --quiet ruff
fi
"$lint_venv/bin/ruff" check .

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec /usr/bin/python3 -m pytest -p no:cacheprovider -rs "$@" tests
