"""A `criu` command for a systemd-nspawn container that executes the HOST's CRIU.

CRIU cannot run inside nspawn on this kernel: a dump fails with "Can't lookup mount ...
/dev/null" and /proc/sys is read-only in the container (docs/systemd.md, Tests). The
system test still wants everything else real on the destination: `cache.restore: auto`,
the root imgmig-restore@.service, `imgmig restore` claiming the checkpoint and running
the `criu:` command of the node's config. That command is this file, copied in:

    criu: /usr/bin/python3 /usr/local/lib/imgmig-criu-relay.py /run/imgmig-criu-relay.sock

The client (inside) sends its argv and cwd, with its fds 0, 1 and 2 (SCM_RIGHTS), as one
message on a SOCK_SEQPACKET connection to the socket the test's Relay (on the host)
listens on, and exits with the status the relay answers. The relay runs the host's CRIU:
- with the values of the path options (-D/--images-dir, -W/--work-dir, --pidfile,
  -o/--log-file) and the cwd, when absolute, prefixed with the container's root as the
  host sees it (/proc/<container's PID 1>/root): CRIU connects to the socket `imgmig
  restore` listens on and writes its log and its pidfile where `imgmig restore` reads them;
- with the passed fds as its stdin, stdout and stderr, so its output lands where `imgmig
  restore` sent it;
- and kills CRIU if the client goes away (as `imgmig restore` kills a CRIU that never
  connects).
Those fds are all CRIU inherits from `imgmig restore`: CRIU connects to the private
socket `imgmig restore` listens on (-D DIR/streamer-serve.sock, reached under the root),
and `imgmig restore` hands that connection to the cache itself (control op `serve`).

PIDs: the restored process lives in the HOST's PID namespace, under the PID it was dumped
with (CRIU restores PIDs). The pidfile holds that host PID, so `imgmig restore` reports it
and the cache records it; inside the container that PID names nothing.

The client uses only the standard library: the container's python3 runs it as a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MAX_MESSAGE = 64 << 10
STDIO = 3
PATH_OPTIONS = frozenset({"-D", "--images-dir", "-W", "--work-dir", "--pidfile", "-o", "--log-file"})
POLL = 0.1


def host_path(path: str, root: str) -> str:
    """A container path as the host reaches it; a relative one stays relative (to -W or the cwd)."""
    return f"{root.rstrip('/')}{path}" if path.startswith("/") else path


def translate(argv: Sequence[str], root: str) -> list[str]:
    """CRIU's arguments with the values of its path options moved under `root`."""
    out: list[str] = []
    value_next = False
    for arg in argv:
        name, eq, value = arg.partition("=")
        if value_next:
            arg = host_path(arg, root)
        elif eq and name in PATH_OPTIONS and name.startswith("--"):
            arg = f"{name}={host_path(value, root)}"
        value_next = not value_next and arg in PATH_OPTIONS
        out.append(arg)
    return out


# --- the client, inside the container -------------------------------------------------

def relay_client(socket_path: str, argv: Sequence[str]) -> int:
    """Have the host run CRIU with `argv` on our stdio; its exit status (128+N for signal N)."""
    request = json.dumps({"argv": list(argv), "cwd": os.getcwd()}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(socket_path)
        socket.send_fds(sock, [request], [0, 1, 2])
        reply = sock.recv(MAX_MESSAGE)
    if not reply:
        print(f"criu-relay: {socket_path} closed without CRIU's exit status", file=sys.stderr)
        return 1
    answer = json.loads(reply)
    if answer.get("error"):
        print(f"criu-relay: {answer['error']}", file=sys.stderr)
    code = int(answer["exit"])
    return code if code >= 0 else 128 - code


# --- the server, on the host ----------------------------------------------------------

@dataclass
class Run:
    argv: list[str]  # as the container gave it
    host_argv: list[str]  # as CRIU got it
    exit: int


@dataclass
class Relay:
    """Listens on `path` (under the container's root), runs `criu` for each client."""

    path: Path
    root: str
    criu: Sequence[str]
    runs: list[Run] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="criu-relay")

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._listener.bind(str(self.path))
        os.chmod(self.path, 0o600)  # it runs CRIU as the host's root: root in the container only
        self._listener.listen(4)
        self._listener.settimeout(POLL)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._listener.close()
        self.path.unlink(missing_ok=True)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            conn.setblocking(True)
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="criu-relay-run").start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            message, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, STDIO)
            try:
                code, error = self._run(conn, message, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            with contextlib.suppress(OSError):  # the client may be gone already
                conn.send(json.dumps({"exit": code, "error": error}).encode())
            if error:
                print(f"criu-relay: {error}", file=sys.stderr)

    def _run(self, conn: socket.socket, message: bytes, fds: list[int]) -> tuple[int, str]:
        try:
            request = json.loads(message)
            argv, cwd = [str(arg) for arg in request["argv"]], str(request["cwd"])
        except (ValueError, KeyError, TypeError) as exc:
            return 2, f"a request that is not {{argv, cwd}} JSON ({exc}); CRIU not run"
        if len(fds) != STDIO:
            return 2, f"{len(fds)} fds passed instead of stdin, stdout and stderr; CRIU not run"
        host_argv = translate(argv, self.root)
        try:
            proc = subprocess.Popen([*self.criu, *host_argv], cwd=host_path(cwd, self.root),
                                    stdin=fds[0], stdout=fds[1], stderr=fds[2])
        except OSError as exc:
            return 127, f"the host's CRIU could not start: {exc}"
        code = _wait(proc, conn)
        self.runs.append(Run(argv, host_argv, code))
        return code, ""



def _wait(proc: subprocess.Popen[bytes], conn: socket.socket) -> int:
    """CRIU's exit status; CRIU is killed if the client hangs up first."""
    while True:
        try:
            return proc.wait(POLL)
        except subprocess.TimeoutExpired:
            pass
        if _hung_up(conn):
            proc.kill()
            return proc.wait()


def _hung_up(conn: socket.socket) -> bool:
    readable, _, _ = select.select([conn], [], [], 0)
    return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""


@contextlib.contextmanager
def serving(path: Path, root: Path | str, criu: Sequence[str]) -> Iterator[Relay]:
    relay = Relay(path, str(root), criu)
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()


def main(argv: Sequence[str]) -> int:
    if len(argv) < 1:
        print("usage: criu_relay.py SOCKET [CRIU ARGUMENTS...]", file=sys.stderr)
        return 2
    return relay_client(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
