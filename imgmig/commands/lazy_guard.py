"""The guard of a lazy restore: `criu lazy-pages` runs as its child, not as the child of
`imgmig restore --lazy`, so that the command's death cannot leave half a process behind.

Run as `python3 -m imgmig.commands.lazy_guard PIDFILE OUTPUT FD -- CRIU-LAZY-PAGES-ARGV` (FD:
lazy-pages' `--ps-socket`, which the guard passes on and closes), in
its own session (Ctrl-C on the command's terminal does not reach it; SIGINT, SIGTERM and
SIGHUP are ignored). It speaks lines with the command:
- to the command (stdout): `pid N` once lazy-pages started, `exit N` once it ended;
- from the command (stdin): `restore N` once `criu restore --lazy-pages -d` (pid N)
  started, `done` once the command has dealt with the outcome itself.

If its stdin ends without `done` the command died (kill -9, a lost terminal). The
process must then be in exactly one place (docs/design.md, "Lazy migration"):
- lazy-pages still fetching pages: it is given GRACE to finish by itself (its close
  request had gone to the source: the dump there is ending); else it is killed. Its
  channel then ends mid-copy, the source's dump fails and the process resumes there;
- lazy-pages ended 0: every page arrived, and the source's dump has let the process go:
  the restored process is complete and stays;
- otherwise the restored process (its pid from PIDFILE, once the restore ended) is killed:
  without lazy-pages its missing pages would read as zeros.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

GRACE = 3.0          # for a lazy-pages whose close request went to finish by itself
RESTORE_WAIT = 60.0  # for an orphaned `criu restore -d` to end before its process is killed
POLL = 0.05


class Orders:
    """The command's lines on stdin, read on a thread."""

    def __init__(self, stream: TextIO) -> None:
        self.restore_pid = 0
        self.done = False
        self.ended = threading.Event()  # stdin closed, or `done`
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: TextIO) -> None:
        for line in stream:
            word, _, value = line.strip().partition(" ")
            if word == "restore" and value.isdigit():
                self.restore_pid = int(value)
            elif word == "done":
                self.done = True
                break
        self.ended.set()


def main(argv: list[str]) -> int:
    if len(argv) < 5 or argv[3] != "--" or not argv[2].isdigit():
        print("usage: python3 -m imgmig.commands.lazy_guard PIDFILE OUTPUT FD -- CRIU-LAZY-PAGES-ARGV",
              file=sys.stderr)
        return 2
    pidfile, output, passed, lazy_argv = Path(argv[0]), Path(argv[1]), int(argv[2]), argv[4:]
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    with open(output, "ab") as out:
        lazy = subprocess.Popen(lazy_argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=[passed],
                                preexec_fn=_default_signals)
    os.close(passed)  # lazy-pages' alone: its end of stream must reach the cache when it ends
    orders = Orders(sys.stdin)
    _tell(f"pid {lazy.pid}")
    while lazy.poll() is None and not orders.ended.wait(POLL):
        pass
    if lazy.poll() is not None:
        _tell(f"exit {lazy.returncode}")
        orders.ended.wait()
    if orders.done:
        return 0
    _orphaned(lazy, orders.restore_pid, pidfile, output)
    return 0


def _orphaned(lazy: subprocess.Popen[bytes], restore_pid: int, pidfile: Path, output: Path) -> None:
    try:
        code = lazy.wait(GRACE)
    except subprocess.TimeoutExpired:
        lazy.kill()
        code = lazy.wait()
    if code == 0:
        _note(output, "imgmig restore --lazy went away after every page arrived: the restored process stays")
        return
    deadline = time.monotonic() + RESTORE_WAIT
    while restore_pid and _alive(restore_pid) and time.monotonic() < deadline:
        time.sleep(POLL)
    try:
        restored = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        _note(output, f"imgmig restore --lazy went away mid-copy (lazy-pages ended with {code}); no process was "
                      f"restored here; it resumes on its source")
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(restored, signal.SIGKILL)
    _note(output, f"imgmig restore --lazy went away mid-copy (lazy-pages ended with {code}): the restored process "
                  f"{restored}, whose memory is incomplete, was killed; it resumes on its source")


def _default_signals() -> None:
    """lazy-pages itself keeps CRIU's own handling of signals (the guard ignores them)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _tell(line: str) -> None:
    with contextlib.suppress(OSError):  # the command may be gone
        os.write(sys.stdout.fileno(), f"{line}\n".encode())


def _note(output: Path, line: str) -> None:
    """The command that would have said it is gone: the line goes to the lazy-pages output."""
    with contextlib.suppress(OSError), open(output, "a") as out:
        out.write(f"imgmig lazy guard: {line}\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
