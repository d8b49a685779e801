"""Find, or build, a CRIU 4.x that works on this kernel.

Debian bookworm's CRIU 3.17 fails `criu check` on recent kernels (vDSO layout), so the
fallback is a minimal Debian trixie tree whose criu runs through the tree's own dynamic
loader: CRIU then sees the host's mounts and processes (a chroot does not work). The
same tree boots systemd-nspawn containers for the system tests, hence its include list.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TREE = Path(os.environ.get("IMGMIG_TESTBED_TREE", "/var/cache/imgmig-testbed/trixie"))
MIRROR = os.environ.get("IMGMIG_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "trixie"
INCLUDE = "systemd,systemd-sysv,dbus,python3,python3-systemd,python3-yaml,python3-psutil,criu,iproute2"
CHECK_OK = "Looks good"


class CriuUnavailable(RuntimeError):
    """No working CRIU could be found or built; the text says why."""


def tree_criu(root: Path = TREE) -> list[str]:
    """The argv prefix running ROOT's criu with ROOT's libraries on the host."""
    libs = f"{root}/lib/x86_64-linux-gnu:{root}/usr/lib/x86_64-linux-gnu"
    return [f"{root}/lib64/ld-linux-x86-64.so.2", "--library-path", libs, f"{root}/usr/sbin/criu"]


def check(prefix: list[str]) -> tuple[bool, str]:
    """Run `criu check`; (passed, its output)."""
    try:
        done = subprocess.run([*prefix, "check"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    output = (done.stdout + done.stderr).strip()
    return done.returncode == 0 and CHECK_OK in output, output


def build_tree(root: Path = TREE, mirror: str = MIRROR) -> None:
    """debootstrap the trixie tree into a temporary folder, then rename it into place,
    so an interrupted build never leaves a half tree at ROOT. A lock file makes
    concurrent callers (tests, benchmark) wait for one build instead of racing."""
    if shutil.which("debootstrap") is None:
        raise CriuUnavailable("debootstrap is not installed (apt-get install debootstrap, "
                              "or run tools/install-deps.sh)")
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not root.exists():
            _debootstrap(root, mirror)


def _debootstrap(root: Path, mirror: str) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        print(f"testbed: building a Debian {SUITE} tree for CRIU in {root} (a few minutes)", file=sys.stderr)
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE, str(staging), mirror],
                       check=True, stdout=sys.stderr)
        os.chmod(staging, 0o755)
        os.rename(staging, root)
    except (OSError, subprocess.CalledProcessError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise CriuUnavailable(f"building the {SUITE} tree in {root} failed: {exc}") from exc


def find_criu(*, build: bool = True) -> list[str]:
    """The argv prefix for a working CRIU 4.x: the system one if `criu check` passes,
    else the trixie tree's (built first if missing and `build`)."""
    if os.geteuid() != 0:
        raise CriuUnavailable("CRIU needs root; run as root")
    system = shutil.which("criu")
    reasons = []
    if system:
        ok, output = check([system])
        if ok:
            return [system]
        reasons.append(f"system {system}: `criu check` failed: {_last_line(output)}")
    if not (TREE / "usr/sbin/criu").exists():
        if not build:
            raise CriuUnavailable("; ".join([*reasons, f"no CRIU tree at {TREE}"]))
        build_tree(TREE)
    prefix = tree_criu(TREE)
    ok, output = check(prefix)
    if ok:
        return prefix
    reasons.append(f"{TREE}: `criu check` failed: {_last_line(output)}")
    raise CriuUnavailable("; ".join(reasons))


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m testbed.criu",
                                     description="prepare a working CRIU and print the command that runs it")
    parser.add_argument("--no-build", action="store_true", help="fail instead of building the trixie tree")
    args = parser.parse_args(argv)
    try:
        prefix = find_criu(build=not args.no_build)
    except CriuUnavailable as exc:
        print(f"testbed: no working CRIU: {exc}", file=sys.stderr)
        return 1
    print(" ".join(prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
