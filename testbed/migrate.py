"""Drive one real migration: `criu restore --stream` first (it waits on the cache),
then `criu dump --stream` into the proxy, timing each phase from the freeze.

Phases, in seconds since `criu dump` started (the task is frozen from about then):
dump (criu dump returned), transfer (the cache logged the checkpoint complete and
verified), restore (criu restore -d returned: the task runs again). `total` is the
freeze-to-running time, the one the user feels.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .daemons import Daemon

PR_SET_CHILD_SUBREAPER = 36
CACHE_COMPLETE = "complete from"  # the cache's "checkpoint X complete from P: ..., digests verified"


class MigrationFailed(RuntimeError):
    """CRIU failed; the text carries the tail of its log."""


@dataclass
class Timings:
    dump: float
    restore: float
    transfer: float | None = None

    @property
    def total(self) -> float:
        return self.restore

    @property
    def restore_after_dump(self) -> float:
        return self.restore - self.dump

    def describe(self) -> str:
        transfer = f"{self.transfer:.3f} s" if self.transfer is not None else "n/a"
        return (f"dump {self.dump:.3f} s, transfer complete at {transfer}, restore returned at "
                f"{self.restore:.3f} s ({self.restore_after_dump:.3f} s after the dump); "
                f"freeze-to-running {self.total:.3f} s")


@dataclass
class Result:
    pid: int  # of the restored root task (on this host's PID namespace)
    timings: Timings
    dump_log: Path
    restore_log: Path
    extra: dict[str, float] = field(default_factory=dict)


def become_subreaper(on: bool = True) -> bool:
    """Make this process adopt orphans (restored tasks, once `criu restore -d` exits),
    so reap() can collect them at once instead of waiting for a lazy PID 1."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """become_subreaper() for a while only: in a long-lived process (pytest) other
    code's orphans would otherwise stay our zombies, since nobody waits for them."""
    become_subreaper(True)
    try:
        yield
    finally:
        become_subreaper(False)


def reap(pid: int, timeout: float = 10.0) -> None:
    """Wait until `pid` is gone: waitpid if it is our child, else poll /proc (PID 1 reaps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return
        except ChildProcessError:
            if not Path(f"/proc/{pid}").exists():
                return
        time.sleep(0.01)
    raise TimeoutError(f"process {pid} still exists after {timeout:.0f} s")


def kill_and_reap(pid: int, timeout: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    reap(pid, timeout)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} missing)"


def start_restore(criu: Sequence[str], images_dir: Path, workdir: Path, name: str = "restore",
                  extra: Sequence[str] = ()) -> tuple[subprocess.Popen, Path, Path]:
    """Start `criu restore --stream -d` and wait (up to 2 s) until it has connected to the
    streamer socket, so its start-up is not counted in the freeze."""
    log, pidfile = workdir / f"{name}.log", workdir / f"{name}.pid"
    for path in (log, pidfile):
        path.unlink(missing_ok=True)
    proc = subprocess.Popen([*criu, "restore", "--stream", "-D", str(images_dir), "-d", "--pidfile", str(pidfile),
                             "-o", log.name, "-W", str(workdir), *extra], stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and proc.poll() is None and not _has_socket(proc.pid):
        time.sleep(0.005)
    return proc, log, pidfile


def _has_socket(pid: int) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def dump(criu: Sequence[str], pid: int, images_dir: Path, workdir: Path, name: str = "dump",
         extra: Sequence[str] = (), timeout: float = 300.0) -> tuple[float, Path]:
    """`criu dump --stream -t PID` into images_dir; returns (seconds, log path)."""
    log = workdir / f"{name}.log"
    log.unlink(missing_ok=True)
    started = time.monotonic()
    done = subprocess.run([*criu, "dump", "--stream", "-D", str(images_dir), "-t", str(pid),
                           "-o", log.name, "-W", str(workdir), *extra], stdin=subprocess.DEVNULL, timeout=timeout)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise MigrationFailed(f"criu dump of {pid} exited with {done.returncode}; {log}:\n{_tail(log)}")
    return elapsed, log


def finish_restore(proc: subprocess.Popen, log: Path, pidfile: Path, timeout: float = 300.0) -> int:
    """Wait for `criu restore -d` to return; the restored root task's PID."""
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise MigrationFailed(f"criu restore did not return within {timeout:.0f} s; {log}:\n{_tail(log)}") from None
    if code != 0:
        raise MigrationFailed(f"criu restore exited with {code}; {log}:\n{_tail(log)}")
    return int(pidfile.read_text().strip())


class _LogWatch(threading.Thread):
    """Note when a daemon's log first shows a line containing `text`."""

    def __init__(self, daemon: Daemon, text: str) -> None:
        super().__init__(daemon=True)
        self.target, self.text = daemon, text
        self.skip = len(daemon.log())
        self.seen: float | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            if self.text in self.target.log()[self.skip:]:
                self.seen = time.monotonic()
                return
            self.halt.wait(0.005)


def migrate(criu: Sequence[str], pid: int, proxy_dir: Path, restore_dir: Path, workdir: Path, *,
            cache: Daemon | None = None, dump_extra: Sequence[str] = (), restore_extra: Sequence[str] = (),
            on_dumped: Callable[[], None] | None = None, timeout: float = 300.0) -> Result:
    """Restore-first migration of task `pid`: start `criu restore` on restore_dir (the
    cache's images_dir, or the proxy's for a rollback), then dump into proxy_dir.

    on_dumped runs as soon as the dump returns (e.g. to read the workload's last
    pre-dump state before the restored task writes a new one). The caller must reap
    `pid` promptly once the dump kills it (keep it a child and wait() on it in a
    thread): the restore needs that PID free.
    """
    watch = _LogWatch(cache, CACHE_COMPLETE) if cache is not None else None
    proc, restore_log, pidfile = start_restore(criu, restore_dir, workdir, extra=restore_extra)
    try:
        if watch is not None:
            watch.start()
        started = time.monotonic()
        dump_time, dump_log = dump(criu, pid, proxy_dir, workdir, extra=dump_extra, timeout=timeout)
        if on_dumped is not None:
            on_dumped()
        restored = finish_restore(proc, restore_log, pidfile, timeout)
        restore_time = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if watch is not None:
            watch.halt.set()
    transfer = None
    if watch is not None:
        watch.join(1.0)
        transfer = watch.seen - started if watch.seen is not None else None
    return Result(restored, Timings(dump_time, restore_time, transfer), dump_log, restore_log)
