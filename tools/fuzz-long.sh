#!/usr/bin/env bash
# The long fuzz run: every property of tests/test_fuzz_criu_wire.py and
# tests/test_fuzz_peer_wire.py with N fresh random examples each (default 25000; each
# decoder has at least four properties, so >= 100,000 examples per decoder), and the
# control socket's decoder (tests/test_control_wire.py, two properties, 2N each), niced, one
# process. Prints Hypothesis' per-test statistics. Usage: tools/fuzz-long.sh [N] [PYTEST_ARG...]
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-25000}
shift || true
export IMGMIG_FUZZ_EXAMPLES=$examples PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for module in tests/test_fuzz_criu_wire.py tests/test_fuzz_peer_wire.py; do
    nice /usr/bin/python3 -m pytest -p no:cacheprovider -q --hypothesis-show-statistics "$@" "$module"
done
IMGMIG_FUZZ_EXAMPLES=$((examples * 2)) nice /usr/bin/python3 -m pytest -p no:cacheprovider -q \
    --hypothesis-show-statistics -k fuzz "$@" tests/test_control_wire.py
