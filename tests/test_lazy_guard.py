"""The guard of a lazy restore (commands/lazy_guard.py) on real processes: a stand-in for
`criu lazy-pages` and one for the restored process (named in the pidfile, as `criu
restore --pidfile` names it). What it does when `imgmig restore --lazy` dies decides
whether the process may run on with missing memory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


@pytest.fixture
def restored(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The 'restored process', its pid in the pidfile."""
    proc = subprocess.Popen(SLEEPER)
    (tmp_path / "restore.pid").write_text(f"{proc.pid}\n")
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def guard(tmp_path: Path, lazy_argv: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """The guard running lazy_argv, and that process's pid, as the command starts it."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.Popen([sys.executable, "-m", "imgmig.commands.lazy_guard", str(tmp_path / "restore.pid"),
                                 str(tmp_path / "lazy.out"), str(theirs.fileno()), "--", *lazy_argv],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=[theirs.fileno()],
                                start_new_session=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    word, _, pid = proc.stdout.readline().decode().partition(" ")
    assert word == "pid"
    return proc, int(pid)


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def test_a_command_gone_mid_copy_takes_lazy_pages_and_the_restored_process_with_it(tmp_path, restored):
    proc, lazy_pid = guard(tmp_path, SLEEPER)
    assert proc.stdin is not None
    proc.stdin.close()  # imgmig restore --lazy was killed
    assert proc.wait(30) == 0
    assert gone(lazy_pid)
    assert restored.wait(10) == -9, "the half-restored process was left running"
    assert "was killed; it resumes on its source" in (tmp_path / "lazy.out").read_text()


def test_a_command_gone_after_every_page_arrived_leaves_the_process(tmp_path, restored):
    proc, _ = guard(tmp_path, [sys.executable, "-c", "pass"])  # lazy-pages ended 0
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == b"exit 0\n"
    proc.stdin.close()
    assert proc.wait(30) == 0
    assert restored.poll() is None, "a complete restore was killed"
    assert "after every page arrived" in (tmp_path / "lazy.out").read_text()


def test_done_leaves_the_outcome_to_the_command(tmp_path, restored):
    proc, _ = guard(tmp_path, [sys.executable, "-c", "raise SystemExit(3)"])
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == b"exit 3\n"
    proc.stdin.write(b"done\n")
    proc.stdin.close()
    assert proc.wait(30) == 0
    assert restored.poll() is None  # the command kills it itself when it must (LazyRestore.finish)


def test_ctrl_c_on_the_commands_terminal_does_not_reach_the_guard(tmp_path, restored):
    proc, lazy_pid = guard(tmp_path, SLEEPER)
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.3)
    assert proc.poll() is None and not gone(lazy_pid)
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(30) == 0 and restored.wait(10) == -9
