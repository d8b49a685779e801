"""Booted systemd containers for the system tests: cached Debian trees and nspawn.

A tree per suite lives under /var/cache/imgmig-testbed/nspawn-<suite> (built once with
debootstrap, or for trixie copied from the CRIU tree when that exists). Containers
boot it with `systemd-nspawn --ephemeral`, so the cached tree is never modified and
two nodes can share it. Commands run inside with nsenter into the container's PID 1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("IMGMIG_TESTBED_CACHE", "/var/cache/imgmig-testbed"))
MIRROR = os.environ.get("IMGMIG_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PACKAGES = ["systemd", "systemd-sysv", "dbus", "python3", "python3-systemd", "python3-yaml", "python3-psutil",
            "python3-cryptography", "procps"]
READY_MARK = ".imgmig-tree-ready"
# Units that cannot work in a container and would only make the system "degraded".
MASKED = ["systemd-modules-load.service", "systemd-networkd-wait-online.service", "getty@tty1.service",
          "console-getty.service", "systemd-timesyncd.service", "apt-daily.timer", "apt-daily-upgrade.timer",
          "e2scrub_all.timer", "fstrim.timer", "dpkg-db-backup.timer"]
BOOT_TIMEOUT = 60.0


class ContainerError(RuntimeError):
    pass


def tree(suite: str) -> Path:
    """The cached bootable tree for a Debian suite, built on first use."""
    root = CACHE / f"nspawn-{suite}"
    if (root / READY_MARK).exists():
        _complete(root, suite)
        return root
    partial = CACHE / f"nspawn-{suite}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    _populate(suite, partial)
    _customise(partial)
    (partial / READY_MARK).write_text(f"{suite} {' '.join(PACKAGES)}\n")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root


def _complete(root: Path, suite: str) -> None:
    """A tree cached before PACKAGES grew gets the new packages (from the Debian mirror)."""
    mark = root / READY_MARK
    missing = [package for package in PACKAGES if package not in mark.read_text().split()[1:]]
    if not missing:
        return
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}
    install = ["chroot", str(root), "apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["chroot", str(root), "apt-get", "update"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(install, env=env, check=True, stdout=subprocess.DEVNULL)
    mark.write_text(f"{suite} {' '.join(PACKAGES)}\n")


def _populate(suite: str, root: Path) -> None:
    criu_tree = CACHE / suite
    if _has_packages(criu_tree):
        # The CRIU tree already holds every package we need: a copy is seconds, debootstrap minutes.
        subprocess.run(["cp", "-a", "--reflink=auto", f"{criu_tree}/.", str(root)], check=True)
        return
    include = ",".join(PACKAGES)
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={include}", suite, str(root), MIRROR],
                   check=True, stdout=subprocess.DEVNULL)


def _has_packages(root: Path) -> bool:
    status = root / "var/lib/dpkg/status"
    if not status.exists():
        return False
    installed = set()
    for stanza in status.read_text(errors="replace").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
        if fields.get("Status") == "install ok installed":
            installed.add(fields.get("Package"))
    return installed.issuperset(PACKAGES)


def _customise(root: Path) -> None:
    systemd_dir = root / "etc/systemd/system"
    for unit in MASKED:
        link = systemd_dir / unit
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to("/dev/null")
    (root / "etc/hostname").write_text("imgmig-node\n")
    # No network inside: apt must never try to reach a mirror.
    (root / "etc/apt/apt.conf.d/99imgmig-offline").write_text('Acquire::Languages "none";\n')
    with contextlib.suppress(FileNotFoundError):
        (root / "etc/machine-id").unlink()
    (root / "etc/machine-id").write_text("")


REPO = Path(__file__).resolve().parents[1]
# What a package build needs from the source tree (no .git, caches or build leftovers).
# Debian's tools only: a pyenv or venv python on PATH must not build the package.
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
SOURCE_PARTS = ["debian", "docs", "etc", "imgmig", "units", "pyproject.toml", "README.md"]


def build_deb(workdir: Path) -> tuple[Path, Path]:
    """`dpkg-buildpackage -us -uc -b` on a clean copy of the tree; (the .deb, the .changes)."""
    source = workdir / "imgmig"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    for part in SOURCE_PARTS:
        origin = REPO / part
        if origin.is_dir():
            shutil.copytree(origin, source / part, ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc", ".debhelper", "files", "*.substvars", "*.log", "debhelper-build-stamp"))
        elif origin.exists():
            shutil.copy2(origin, source / part)
    shutil.rmtree(source / "debian" / "imgmig", ignore_errors=True)
    log = workdir / "dpkg-buildpackage.log"
    with open(log, "wb") as out:
        done = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=source, stdout=out,
                              stderr=subprocess.STDOUT, env=CLEAN_ENV)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise ContainerError(f"dpkg-buildpackage failed ({done.returncode}):\n{tail}")
    debs = sorted(workdir.glob("imgmig_*_all.deb"))
    changes = sorted(workdir.glob("imgmig_*.changes"))
    if not debs or not changes:
        raise ContainerError(f"dpkg-buildpackage made no .deb/.changes in {workdir}")
    return debs[-1], changes[-1]


@dataclass
class Container:
    name: str
    process: subprocess.Popen[bytes]
    leader: int
    log: Path

    @property
    def root(self) -> Path:
        """The container's file system as the host sees it."""
        return Path(f"/proc/{self.leader}/root")

    def run(self, *argv: str, check: bool = True, timeout: float = 120.0,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all its namespaces), capturing output."""
        command = ["nsenter", "-t", str(self.leader), "-a", "--", *argv]
        result = subprocess.run(command, capture_output=True, timeout=timeout, input=input)
        out = subprocess.CompletedProcess(result.args, result.returncode,
                                          result.stdout.decode(errors="replace"),
                                          result.stderr.decode(errors="replace"))
        if check and out.returncode != 0:
            raise ContainerError(f"{self.name}: {' '.join(argv)} exited {out.returncode}:\n"
                                 f"{out.stdout}\n{out.stderr}")
        return out

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def copy_in(self, source: Path, dest: str) -> None:
        target = self.root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)

    def write(self, dest: str, text: str) -> None:
        target = self.root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


@contextlib.contextmanager
def booted(root: Path, name: str, *, netns: str | None = None, workdir: Path | None = None,
           extra: Sequence[str] = ()) -> Iterator[Container]:
    """Boot `root` ephemerally as container `name`; yield once systemd is up."""
    log = (workdir or Path("/tmp")) / f"nspawn-{name}.log"
    argv = ["systemd-nspawn", "--ephemeral", "-D", str(root), "-b", "--register=no", "--keep-unit",
            "-M", name, "--console=pipe", *extra]
    if netns is not None:
        argv.append(f"--network-namespace-path=/run/netns/{netns}")
    env = dict(os.environ, SYSTEMD_NSPAWN_TMPFS_TMP="1")
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
    try:
        leader = _wait_leader(process, log)
        container = Container(name, process, leader, log)
        _wait_running(container)
        yield container
    finally:
        _poweroff(process)


def _wait_leader(process: subprocess.Popen[bytes], log: Path) -> int:
    """PID of the container's systemd: the child of systemd-nspawn that runs /sbin/init."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited {process.returncode}: {log.read_text(errors='replace')}")
        for child in _children(process.pid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return child
        time.sleep(0.1)
    raise ContainerError(f"no systemd in the container after {BOOT_TIMEOUT:.0f} s: {log.read_text(errors='replace')}")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            found.extend(int(child) for child in text.split())
    return found


def _wait_running(container: Container) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT
    state = ""
    while time.monotonic() < deadline:
        result = container.run("systemctl", "is-system-running", check=False)
        state = result.stdout.strip()
        if state in ("running", "degraded"):
            return
        time.sleep(0.3)
    raise ContainerError(f"{container.name}: system state {state!r} after {BOOT_TIMEOUT:.0f} s")


def _poweroff(process: subprocess.Popen[bytes]) -> None:
    """SIGRTMIN+4 asks the container's systemd to power off; nspawn then deletes the ephemeral copy."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # nspawn forwards SIGTERM as a clean poweroff request
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description="build the cached container trees, or the .deb")
    parser.add_argument("suites", nargs="*", help="Debian suites to build trees for, e.g. trixie bookworm")
    parser.add_argument("--deb", type=Path, metavar="DIR", help="build the package in DIR")
    args = parser.parse_args(argv)
    if args.deb:
        args.deb.mkdir(parents=True, exist_ok=True)
        print(*build_deb(args.deb.resolve()))
    for suite in args.suites:
        started = time.monotonic()
        print(f"{suite}: {tree(suite)} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
