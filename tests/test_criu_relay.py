"""testbed/criu_relay.py, the `criu` command that the two-container system test gives
node B so that CRIU executes on the host: path translation, the stdio passed with
SCM_RIGHTS, the exit status, a client that goes away, and a bad request. No root, no
container: the relay's "container root" is a folder and its "CRIU" a small script."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed import criu_relay

RELAY = Path(criu_relay.__file__)
# Stands in for CRIU: reports its argv and cwd on stdout, a line on stderr, writes
# "4242" to the --pidfile it was given, then exits with $FAKE_EXIT (or sleeps, for "sleep").
FAKE_CRIU = """
import json, os, sys, time
args = sys.argv[1:]
print(json.dumps({"argv": args, "cwd": os.getcwd()}), flush=True)
print("criu says hello on stderr", file=sys.stderr, flush=True)
if "--pidfile" in args:
    open(args[args.index("--pidfile") + 1], "w").write("4242")
if "sleep" in args:
    time.sleep(60)
sys.exit(int(args[-1]) if args[-1].isdigit() else 0)
"""


def test_translate_moves_only_the_path_options_under_the_root() -> None:
    argv = ["restore", "--stream", "-D", "/tmp/s", "-d", "--pidfile", "/tmp/w/restore.pid", "-o", "restore.log",
            "-W", "/tmp/w", "--work-dir=/x", "--shell-job", "/not/an/option/value"]
    assert criu_relay.translate(argv, "/proc/7/root/") == [
        "restore", "--stream", "-D", "/proc/7/root/tmp/s", "-d", "--pidfile", "/proc/7/root/tmp/w/restore.pid",
        "-o", "restore.log", "-W", "/proc/7/root/tmp/w", "--work-dir=/proc/7/root/x", "--shell-job",
        "/not/an/option/value"]


@pytest.fixture
def relay(tmp_path: Path):  # type: ignore[no-untyped-def]
    root = tmp_path / "root"
    (root / "work").mkdir(parents=True)
    script = tmp_path / "fake_criu.py"
    script.write_text(FAKE_CRIU)
    with criu_relay.serving(root / "relay.sock", root, [sys.executable, str(script)]) as server:
        yield server, root


def _client(root: Path, tmp_path: Path, *argv: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(RELAY), str(root / "relay.sock"), *argv], cwd="/",
                                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    return proc, out, err


def test_criu_runs_on_the_relay_side_with_paths_under_the_root_and_the_clients_stdio(relay, tmp_path: Path) -> None:
    server, root = relay
    proc, out, err = _client(root, tmp_path, "restore", "--pidfile", "/work/restore.pid", "-W", "/work", "3")
    assert proc.wait(30) == 3  # CRIU's exit status is the client's
    seen = json.loads(out.read_text())  # CRIU wrote into the client's stdout (passed with SCM_RIGHTS)
    assert seen["argv"] == ["restore", "--pidfile", f"{root}/work/restore.pid", "-W", f"{root}/work", "3"]
    assert seen["cwd"] == str(root)  # the client's cwd, /, as the host sees it
    assert "criu says hello on stderr" in err.read_text()
    assert (root / "work/restore.pid").read_text() == "4242"
    assert [(run.argv[0], run.exit) for run in server.runs] == [("restore", 3)]


def test_criu_is_killed_when_the_client_goes_away(relay, tmp_path: Path) -> None:
    server, root = relay
    proc, out, _ = _client(root, tmp_path, "restore", "sleep")
    deadline = time.monotonic() + 20
    while not out.read_text() and time.monotonic() < deadline:  # CRIU started
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    while not server.runs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [run.exit for run in server.runs] == [-signal.SIGKILL]


def test_a_bad_request_is_refused_in_one_line_and_the_relay_serves_on(relay, tmp_path: Path) -> None:
    server, root = relay
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(str(root / "relay.sock"))
        sock.send(b"not json")
        answer = json.loads(sock.recv(criu_relay.MAX_MESSAGE))
    assert answer["exit"] == 2 and "CRIU not run" in answer["error"], answer
    proc, _, _ = _client(root, tmp_path, "check")
    assert proc.wait(30) == 0
    assert [(run.argv, run.exit) for run in server.runs] == [(["check"], 0)]
