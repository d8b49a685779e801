#!/usr/bin/env bash
# Install everything imgmig's tests, benchmark and demo need on a Debian machine, and
# prepare a working CRIU 4.x (tools/ensure-criu). Idempotent: installs only what is
# missing, and runs `apt-get update` only when the package lists are empty or an
# install fails. Run as root. Usage: tools/install-deps.sh [--no-criu] [EXTRA_PACKAGE...]
set -euo pipefail
cd "$(dirname "$0")/.."

# One package per line; add new needs here.
PACKAGES=(
    python3            # /usr/bin/python3 runs the daemons, tests and testbed
    python3-yaml       # the config file
    python3-psutil
    python3-systemd    # sd_notify, socket activation, journald
    python3-xxhash     # XXH3-128 file digests (without it: SHA-256)
    python3-cryptography # imgmig pki and the TLS files' checks
    python3-pytest
    python3-hypothesis # the fuzz tests (tests/test_fuzz_*.py, tests/test_control_wire.py)
    python3-rich       # `imgmig migrate`'s progress bar on a terminal
    python3-venv       # tools/test.sh makes a venv for ruff
    iproute2           # ip netns / veth: the two "nodes"
    debootstrap        # builds the Debian trixie tree that provides CRIU 4.x
    systemd-container  # systemd-nspawn for the system tests
    util-linux         # nsenter into the containers
    debhelper          # building the .deb: dpkg-buildpackage -us -uc -b
    dh-python
    pybuild-plugin-pyproject
    python3-all
    python3-setuptools
    lintian
    socat              # the benchmark's disk-style baseline
    iperf3             # the benchmark's link baseline
    python3-matplotlib # the benchmark's plot
    ca-certificates
)

with_criu=1
extra=()
for arg in "$@"; do
    case "$arg" in
        --no-criu) with_criu=0 ;;
        -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
        *) extra+=("$arg") ;;
    esac
done

if [ "$(id -u)" != 0 ]; then
    echo "install-deps.sh: run as root" >&2
    exit 2
fi

missing=()
for pkg in "${PACKAGES[@]}" "${extra[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$pkg")
    fi
done

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps.sh: installing ${missing[*]}" >&2
    if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
        apt-get update -q
    fi
    if ! apt_install "${missing[@]}"; then
        apt-get update -q
        apt_install "${missing[@]}"
    fi
fi

if [ "$with_criu" = 1 ]; then
    # The system criu if `criu check` passes, else the trixie tree (built once, ~2 min).
    criu=$(sh tools/ensure-criu)
    echo "install-deps.sh: CRIU: $criu" >&2
fi
