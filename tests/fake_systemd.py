"""systemd's part for a daemon run by the tests: its notify socket, its fd store, restarts.

A `Supervised` daemon is started with NOTIFY_SOCKET pointing at a test-owned datagram
socket. Every FDSTORE=1 message is kept with its fds, FDSTOREREMOVE=1 closes them, as
systemd does. `restart()` (what `systemctl restart` does: SIGTERM, wait, start) and
`kill9()` + `start()` (a crash and `Restart=on-failure`) hand the stored fds to the new
process with LISTEN_FDS/LISTEN_FDNAMES through a small exec shim, so that LISTEN_PID is
the daemon's own pid. The daemon binds its own listening sockets (no socket activation).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from conftest import PYTHON, REPO, START_TIMEOUT, STOP_TIMEOUT, Daemon, Log, wait_until

from imgmig.system.fdstore import newest_document

# Moves the fds named in SHIM_FDS to 3.. (by way of numbers above all of them, which cannot
# be targets), closes the originals, sets LISTEN_PID to its own pid (kept across exec), execs.
SHIM = """
import fcntl, os, sys
fds = [int(x) for x in os.environ.pop("SHIM_FDS").split(",") if x]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, max(fds) + 1) for fd in fds]
for fd in fds:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index, inheritable=True)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(fds))
os.execv(sys.argv[1], sys.argv[1:])
"""


class Supervised:
    """One daemon (role "proxy" or "cache") of a conftest Pair, under a fake systemd."""

    def __init__(self, role: str, config: Path, tmp: Path) -> None:
        self.role = role
        self.config = config
        self.log_path = tmp / f"{role}.log"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_path = tmp / f"{role}-notify.sock"
        self.sock.bind(str(self.notify_path))
        self.lock = threading.Lock()
        self.stored: dict[str, int] = {}
        self.ready = 0  # READY=1 messages received
        self.daemon: Daemon | None = None
        self.closed = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    # ---- the notify socket ----------------------------------------------------------------
    def _read(self) -> None:
        while not self.closed:
            with self.lock:
                self._drain(0.05)

    def _drain(self, timeout: float) -> None:
        """Take every queued message (called with the lock held)."""
        self.sock.settimeout(timeout)
        with contextlib.suppress(TimeoutError, BlockingIOError, OSError):
            while True:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, 253)
                self._take(data.decode(errors="replace"), fds)
                self.sock.settimeout(0)

    def _take(self, text: str, fds: list[int]) -> None:
        message = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        name = message.get("FDNAME", "stored")
        if message.get("FDSTORE") == "1":
            for fd in fds:
                if name in self.stored:
                    os.close(fd)
                else:
                    self.stored[name] = fd
            return
        for fd in fds:
            os.close(fd)
        if message.get("FDSTOREREMOVE") == "1":
            fd = self.stored.pop(name, -1)
            if fd >= 0:
                os.close(fd)
        if message.get("READY") == "1":
            self.ready += 1

    def recorded(self) -> list[dict]:
        """The checkpoints the fd store's metadata lists now (the daemon rewrites its
        memfds in place, from its own thread, a moment after its store changes)."""
        with self.lock:
            document = newest_document(self.stored)
        return document["checkpoints"] if document else []

    def images_stored(self) -> int:
        with self.lock:
            return sum(1 for name in self.stored if name.startswith("img-"))

    # ---- the process ----------------------------------------------------------------------
    def start(self) -> Daemon:
        """Start it with what the fd store holds, and wait for READY=1."""
        with self.lock:
            self._drain(0)  # everything the previous run said is in the store before it is handed back
            names = list(self.stored)
            fds = [self.stored[name] for name in names]
            ready_before = self.ready
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("LISTEN_", "NOTIFY_", "JOURNAL_", "INVOCATION", "WATCHDOG_"))}
        env |= {"PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(self.notify_path),
                "SHIM_FDS": ",".join(map(str, fds)), "LISTEN_FDNAMES": ":".join(names)}
        with open(self.log_path, "ab") as log_file:
            process = subprocess.Popen([PYTHON, "-c", SHIM, PYTHON, "-m", "imgmig", self.role, "--config",
                                        str(self.config)], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                       stdout=log_file, stderr=log_file, pass_fds=fds)
        self.daemon = Daemon(self.role, process, Log(self.log_path, f"imgmig-{self.role}"))
        wait_until(lambda: process.poll() is not None or self.ready > ready_before, START_TIMEOUT,
                   f"READY=1 from imgmig-{self.role}")
        assert process.poll() is None, f"imgmig-{self.role} exited at start:\n{self.daemon.log}"
        return self.daemon

    def forget(self) -> None:
        """`systemctl stop` then `start`: the fd store is emptied (its fds closed)."""
        with self.lock:
            self._drain(0)
            for fd in self.stored.values():
                os.close(fd)
            self.stored.clear()

    def kill9(self) -> None:
        assert self.daemon is not None
        self.daemon.process.send_signal(signal.SIGKILL)
        self.daemon.process.wait()

    def restart(self) -> Daemon:
        """`systemctl restart`: SIGTERM, which must end it with status 0, then start again."""
        assert self.daemon is not None
        self.daemon.process.send_signal(signal.SIGTERM)
        code = self.daemon.process.wait(STOP_TIMEOUT)
        assert code == 0, f"imgmig-{self.role} exited {code} on SIGTERM:\n{self.daemon.log}"
        return self.start()

    def close(self) -> None:
        self.closed = True
        self.reader.join(5)
        with self.lock:
            for fd in self.stored.values():
                os.close(fd)
            self.stored.clear()
        self.sock.close()


def wait_for_stored(supervised: Supervised, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while supervised.images_stored() < count:
        assert time.monotonic() < deadline, f"{count} images never reached the fd store of {supervised.role}"
        time.sleep(0.02)
