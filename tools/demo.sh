#!/usr/bin/env bash
# The imgmig demo: on a Debian machine, as root, install what is needed, then migrate a
# live process holding 512 MiB (--mib N to change) between two "nodes" (network
# namespaces) through imgmig-proxy and imgmig-cache, with a real CRIU and the operator's
# commands (imgmig restore on B, imgmig migrate on A, with its progress and phase times);
# proves the process continues with its memory intact.
# Usage: tools/demo.sh [--mib N] [--transfer streaming|store-and-forward] [--keep]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "tools/demo.sh: run as root (CRIU and network namespaces need it)" >&2
    exit 2
fi

bash tools/install-deps.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec /usr/bin/python3 -m testbed.demo "$@"
