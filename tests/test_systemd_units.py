"""The daemons under systemd-style activation, without a container.

`systemd-socket-activate` passes listening sockets exactly as systemd does; a
test-owned datagram socket is NOTIFY_SOCKET, so READY/STATUS/STOPPING and FDSTORE
messages (with their fds) are read here. A tiny exec shim plays systemd's part on a
restart: it hands the stored fds back with LISTEN_FDS/LISTEN_FDNAMES.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Pki

from imgmig.system.fdstore import META_SLOTS

REPO = Path(__file__).resolve().parents[1]
PYTHON = "/usr/bin/python3"
ACTIVATE = shutil.which("systemd-socket-activate")
UNITS = REPO / "units"

pytestmark = pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is missing "
                                "(apt-get install systemd): the socket-activation tests cannot run")

# Sets LISTEN_PID to its own PID (kept across exec), moves the given fds to 3.., then execs.
SHIM = """
import fcntl, os, sys
fds = [int(x) for x in os.environ.pop("SHIM_FDS").split(",") if x]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for fd in fds]  # out of the way of 3..
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index, inheritable=True)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(fds))
os.execv(sys.argv[1], sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Notifications:
    """What the daemon told "systemd": messages in order, stored fds by name."""
    sock: socket.socket
    messages: list[dict[str, str]] = field(default_factory=list)
    stored: dict[str, int] = field(default_factory=dict)

    def poll(self, timeout: float = 0.1) -> None:
        self.sock.settimeout(timeout)
        with contextlib.suppress(TimeoutError, BlockingIOError):
            while True:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, 64)
                self._take(data.decode(), fds)
                self.sock.settimeout(0.01)

    def _take(self, text: str, fds: list[int]) -> None:
        message = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        self.messages.append(message)
        name = message.get("FDNAME", "stored")
        if message.get("FDSTORE") == "1":
            for fd in fds:
                self.stored.setdefault(name, fd)
        elif message.get("FDSTOREREMOVE") == "1":
            fd = self.stored.pop(name, -1)
            if fd >= 0:
                os.close(fd)
        else:
            for fd in fds:
                os.close(fd)

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.messages:
                if key in message and (value is None or message[key] == value):
                    return message
            self.poll()
        raise AssertionError(f"no {key}={value or '*'} within {timeout:.0f} s; got {self.messages}")

    def statuses(self) -> list[str]:
        return [m["STATUS"] for m in self.messages if "STATUS" in m]


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[Path, Notifications]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    notes = Notifications(sock)
    yield path, notes
    for fd in notes.stored.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    sock.close()


def write_config(tmp_path: Path, port: int, pki: Pki) -> Path:
    config = tmp_path / "imgmig.yaml"
    config.write_text(f"node: test-node\nmemory: {{limit: 64MiB}}\n"
                      f"tls: {{ca: {pki.ca}, cert: {pki.cert('test-node')}, key: {pki.key('test-node')}}}\n"
                      f"proxy: {{images_dir: {tmp_path}/proxy, peer: '127.0.0.1:{port}'}}\n"
                      f"cache: {{images_dir: {tmp_path}/cache, listen: '127.0.0.1:{port}', allow: [127.0.0.1]}}\n")
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "proxy").mkdir(exist_ok=True)
    return config


def env_for(notify: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "JOURNAL_", "INVOCATION"))}
    return env | {"NOTIFY_SOCKET": str(notify), "PYTHONPATH": str(REPO)}


def activate(listen: list[str], argv: list[str], notify: Path, log: Path,
             extra_env: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """systemd-socket-activate with the given Listen addresses, in the order given."""
    # systemd-socket-activate passes on only the environment named with -E, like systemd's Environment=.
    passed = ["-E", "NOTIFY_SOCKET", "-E", "PYTHONPATH", *extra_env]
    command = [ACTIVATE or "", *passed, *(f"--listen={address}" for address in listen), *argv]
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env_for(notify), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_listening(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def poke(port: int) -> None:
    """The first connection makes systemd-socket-activate start the daemon."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def cache_argv(config: Path) -> list[str]:
    return [PYTHON, "-m", "imgmig", "cache", "--config", str(config)]


@pytest.mark.parametrize("unix_first", [True, False], ids=["unix-then-tcp", "tcp-then-unix"])
def test_cache_ready_status_stopping_any_fd_order(tmp_path: Path, notify_socket, pki: Pki, unix_first: bool) -> None:
    notify, notes = notify_socket
    port = free_port()
    config = write_config(tmp_path, port, pki)
    serve = tmp_path / "cache" / "streamer-serve.sock"
    listen = [str(serve), f"127.0.0.1:{port}"]
    proc = activate(listen if unix_first else listen[::-1], cache_argv(config), notify, tmp_path / "log")
    try:
        wait_listening(serve)
        poke(port)
        ready = notes.wait_for("READY", "1")
        assert "STATUS" in ready and "0 checkpoints" in ready["STATUS"], ready
        assert "waiting for proxies" in ready["STATUS"]
    finally:
        code = stop(proc)
    notes.poll()
    assert code == 0, (tmp_path / "log").read_text()
    stopping = notes.wait_for("STOPPING", "1")
    assert notes.messages.index(stopping) > notes.messages.index(ready)
    log = (tmp_path / "log").read_text()
    assert "passed by systemd" in log, log
    assert set(META_SLOTS) <= set(notes.stored), "the fd-store metadata memfds were not stored"


def test_mismatched_port_refused_with_one_line(tmp_path: Path, notify_socket, pki: Pki) -> None:
    notify, notes = notify_socket
    port, other = free_port(), free_port()
    config = write_config(tmp_path, port, pki)   # config says `port`, the "socket unit" says `other`
    serve = tmp_path / "cache" / "streamer-serve.sock"
    proc = activate([str(serve), f"127.0.0.1:{other}"], cache_argv(config), notify, tmp_path / "log")
    try:
        wait_listening(serve)
        poke(other)
        code = proc.wait(20)
    finally:
        stop(proc)
    assert code == 2
    errors = [line for line in (tmp_path / "log").read_text().splitlines() if "ERROR" in line]
    assert len(errors) == 1, errors
    assert f"127.0.0.1:{port}" in errors[0] and f"127.0.0.1:{other}" in errors[0], errors[0]
    notes.poll()
    assert not any(m.get("READY") == "1" for m in notes.messages), "READY=1 sent with a wrong socket"
    assert any("refused to start" in status for status in notes.statuses())


def test_proxy_identifies_its_two_unix_sockets(tmp_path: Path, notify_socket, pki: Pki) -> None:
    notify, notes = notify_socket
    config = write_config(tmp_path, free_port(), pki)
    capture, serve = tmp_path / "proxy" / "streamer-capture.sock", tmp_path / "proxy" / "streamer-serve.sock"
    argv = [PYTHON, "-m", "imgmig", "proxy", "--config", str(config)]
    proc = activate([str(serve), str(capture)], argv, notify, tmp_path / "log")
    try:
        wait_listening(capture)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(serve))  # wakes the daemon; the read side, so nothing is captured
            ready = notes.wait_for("READY", "1")
    finally:
        assert stop(proc) == 0, (tmp_path / "log").read_text()
    assert "peer 127.0.0.1" in ready["STATUS"], ready
    log = (tmp_path / "log").read_text()
    assert f"capture {capture}" in log and f"serve {serve}" in log, log


def test_watchdog_keepalives(tmp_path: Path, notify_socket, pki: Pki) -> None:
    notify, notes = notify_socket
    port = free_port()
    config = write_config(tmp_path, port, pki)
    serve = tmp_path / "cache" / "streamer-serve.sock"
    proc = activate([str(serve), f"127.0.0.1:{port}"], cache_argv(config), notify, tmp_path / "log",
                    ("-E", "WATCHDOG_USEC=400000"))
    try:
        wait_listening(serve)
        poke(port)
        notes.wait_for("READY", "1")
        time.sleep(1.0)
        notes.poll()
    finally:
        stop(proc)
    assert sum(1 for m in notes.messages if m.get("WATCHDOG") == "1") >= 3, notes.messages


# ---- the fd store over a restart ------------------------------------------------------

def _send_checkpoint(port: int, checkpoint: str, files: dict[str, bytes], pki: Pki) -> None:
    """Deliver one checkpoint to the cache the way a proxy (node fake-proxy) does, over TLS."""
    import hashlib

    from imgmig.protocol import peer_wire as wire
    with pki.client("fake-proxy").wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as sock:
        sock.sendall(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, "fake-proxy", auth=wire.Auth.TLS)))
        sock.sendall(wire.encode_checkpoint_begin(checkpoint))
        for file_id, (name, data) in enumerate(files.items()):
            sock.sendall(wire.encode_file_begin(file_id, name))
            for offset in range(0, len(data), 1 << 20):
                sock.sendall(wire.encode_file_data(file_id, offset, data[offset:offset + (1 << 20)]))
            sock.sendall(wire.encode_file_end(file_id, len(data), hashlib.sha256(data).digest()))
        sock.sendall(wire.encode_checkpoint_end(True, len(files), sum(map(len, files.values()))))
        decoder = wire.FrameDecoder()
        while True:
            event = decoder.next_event()
            if isinstance(event, wire.CheckpointDone):
                assert event.ok, event
                return
            if event is None:
                data = sock.recv(65536)
                assert data, "the cache closed the connection before CHECKPOINT_DONE"
                decoder.feed(data)


def _link_back_and_grant(port: int, checkpoint: str, pki: Pki) -> threading.Thread:
    """The proxy's side after the cache restarted: resume the checkpoint's conversation
    (the cache has it complete) and grant the restore its right (docs/protocol.md)."""
    from imgmig.protocol import peer_wire as wire

    def run() -> None:
        with pki.client("fake-proxy").wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as sock:
            sock.sendall(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, "fake-proxy", auth=wire.Auth.TLS))
                         + wire.encode_checkpoint_begin(checkpoint, resume=True))
            decoder = wire.FrameDecoder()
            while True:
                event = decoder.next_event()
                if event is None:
                    data = sock.recv(65536)
                    if not data:
                        return
                    decoder.feed(data)
                elif isinstance(event, wire.Begun):
                    assert event.status is wire.BeginStatus.COMPLETE, event
                elif isinstance(event, wire.Claim):
                    sock.sendall(wire.encode_grant(True, checkpoint, "test-b"))
                elif isinstance(event, wire.Restored):
                    sock.sendall(wire.encode_confirm(wire.FrameType.RESTORED, checkpoint))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _restore_all(path: Path, names: list[str]) -> dict[str, bytes | None]:
    """Play `criu restore --stream`: ask for each name, read what exists."""
    from imgmig.protocol import criu_wire
    got: dict[str, bytes | None] = {}
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        for name in names:
            sock.sendall(criu_wire.encode_request(name))
            reply = sock.recv(6, socket.MSG_WAITALL)
            if not criu_wire.decode_reply_body(reply[4:]):
                got[name] = None
                continue
            read_end, write_end = os.pipe()
            socket.send_fds(sock, [b"\0"], [write_end])
            os.close(write_end)
            chunks = []
            while chunk := os.read(read_end, 1 << 16):
                chunks.append(chunk)
            os.close(read_end)
            got[name] = b"".join(chunks)
    return got


def _run_with_fds(argv: list[str], sockets: list[socket.socket], stored: dict[str, int], notify: Path,
                  log: Path) -> subprocess.Popen[bytes]:
    """Start the daemon the way systemd restarts it: sockets first, then the fd store, by name."""
    ordered = [(sock.fileno(), "imgmig-cache.socket") for sock in sockets] + [
        (fd, name) for name, fd in reversed(stored.items())]  # stored fds come in any order
    numbers = [fd for fd, _ in ordered]
    env = env_for(notify) | {"SHIM_FDS": ",".join(map(str, numbers)),
                             "LISTEN_FDNAMES": ":".join(name for _, name in ordered)}
    with open(log, "ab") as out:
        return subprocess.Popen([PYTHON, "-c", SHIM, *argv], env=env, stdout=out, stderr=subprocess.STDOUT,
                                pass_fds=numbers, start_new_session=True)


def _cache_sockets(tmp_path: Path, port: int) -> tuple[socket.socket, socket.socket]:
    """The cache's listening sockets as its .socket unit would pass them: peer TCP, serve UNIX."""
    tcp = socket.create_server(("127.0.0.1", port))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "cache" / "streamer-serve.sock"))
    unix.listen(8)
    return tcp, unix


def test_fd_store_keeps_a_checkpoint_over_a_restart(tmp_path: Path, notify_socket, pki: Pki) -> None:
    notify, notes = notify_socket
    port = free_port()
    config = write_config(tmp_path, port, pki)
    tcp, unix = _cache_sockets(tmp_path, port)
    files = {"inventory.img": b"inventory" * 100, "pages-1.img": os.urandom(3 << 20), "core-1.img": b"core"}
    log = tmp_path / "log"
    first = _run_with_fds(cache_argv(config), [tcp, unix], {}, notify, log)
    try:
        notes.wait_for("READY", "1")
        _send_checkpoint(port, "fake-proxy-1", files, pki)
        deadline = time.monotonic() + 10
        while len([n for n in notes.stored if n.startswith("img-")]) < len(files):
            assert time.monotonic() < deadline, f"images not stored: {notes.stored}"
            notes.poll()
    finally:
        assert stop(first) == 0, log.read_text()
    notes.poll()
    stored = dict(notes.stored)
    assert set(META_SLOTS) <= set(stored)
    notes.messages.clear()

    second = _run_with_fds(cache_argv(config), [unix, tcp], stored, notify, log)
    try:
        ready = notes.wait_for("READY", "1")
        assert ready["STATUS"].startswith("1 checkpoint,"), ready
        proxy = _link_back_and_grant(port, "fake-proxy-1", pki)
        got = _restore_all(unix.getsockname(), [*files, "absent.img"])
        proxy.join(10)
        assert not proxy.is_alive(), "the cache reported the restore and closed the link"
        assert got == {**files, "absent.img": None}
        deadline = time.monotonic() + 10
        while any(name.startswith("img-") for name in notes.stored):
            assert time.monotonic() < deadline, f"restored images were not released: {notes.stored}"
            notes.poll()
    finally:
        assert stop(second) == 0, log.read_text()
        tcp.close()
        unix.close()
    assert "taken back from systemd's fd store" in log.read_text()


def _frames_until(sock: socket.socket, decoder, kind: type) -> object:
    while True:
        event = decoder.next_event()
        if isinstance(event, kind):
            return event
        if event is None:
            data = sock.recv(65536)
            assert data, f"the cache closed the connection before {kind.__name__}"
            decoder.feed(data)


def test_fd_store_keeps_a_checkpoint_still_arriving_and_the_proxy_resumes_it(tmp_path: Path, notify_socket,
                                                                              pki: Pki) -> None:
    """Restart the cache in the middle of a transfer: the images that arrived so far come back
    from the fd store, BEGUN says how far each got, and the proxy sends only the rest."""
    import hashlib

    from imgmig.protocol import peer_wire as wire
    notify, notes = notify_socket
    port = free_port()
    config = write_config(tmp_path, port, pki)
    tcp, unix = _cache_sockets(tmp_path, port)
    pages, inventory = os.urandom(6 << 20), b"inventory" * 100
    hello = wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, "fake-proxy", auth=wire.Auth.TLS))

    def connect() -> socket.socket:
        return pki.client("fake-proxy").wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))

    log = tmp_path / "log"
    first = _run_with_fds(cache_argv(config), [tcp, unix], {}, notify, log)
    try:
        notes.wait_for("READY", "1")
        sock = connect()
        sock.sendall(hello + wire.encode_checkpoint_begin("fake-proxy-2") + wire.encode_file_begin(0, "pages-1.img"))
        for offset in range(0, 3 << 20, 1 << 20):
            sock.sendall(wire.encode_file_data(0, offset, pages[offset:offset + (1 << 20)]))
        _frames_until(sock, wire.FrameDecoder(), wire.Begun)
        deadline = time.monotonic() + 10
        while not any(name.startswith("img-") for name in notes.stored):
            assert time.monotonic() < deadline, f"the arriving image was not stored: {notes.stored}"
            notes.poll()
        time.sleep(0.5)  # let the cache read what is on the way
    finally:
        assert stop(first) == 0, log.read_text()
    sock.close()
    notes.poll()
    stored = dict(notes.stored)

    second = _run_with_fds(cache_argv(config), [unix, tcp], stored, notify, log)
    try:
        notes.wait_for("READY", "1")
        with connect() as sock:
            decoder = wire.FrameDecoder()
            sock.sendall(hello + wire.encode_checkpoint_begin("fake-proxy-2", resume=True))
            begun = _frames_until(sock, decoder, wire.Begun)
            assert begun.status is wire.BeginStatus.RESUMED and begun.files == 1, begun
            (file_id, held), = begun.held
            assert file_id == 0 and 0 < held <= 3 << 20, begun
            for offset in range(held, len(pages), 1 << 20):
                sock.sendall(wire.encode_file_data(0, offset, pages[offset:offset + (1 << 20)]))
            sock.sendall(wire.encode_file_end(0, len(pages), hashlib.sha256(pages).digest())
                         + wire.encode_file_begin(1, "inventory.img") + wire.encode_file_data(1, 0, inventory)
                         + wire.encode_file_end(1, len(inventory), hashlib.sha256(inventory).digest())
                         + wire.encode_checkpoint_end(True, 2, len(pages) + len(inventory)))
            done = _frames_until(sock, decoder, wire.CheckpointDone)
            assert done.ok, done
            restoring = threading.Thread(target=lambda: got.update(_restore_all(unix.getsockname(), ["inventory.img",
                                                                                            "pages-1.img"])))
            got: dict[str, bytes | None] = {}
            restoring.start()
            _frames_until(sock, decoder, wire.Claim)
            sock.sendall(wire.encode_grant(True, "fake-proxy-2", "test-node (the destination)"))
            restoring.join(20)
        assert got == {"inventory.img": inventory, "pages-1.img": pages}, "what was restored is what was sent"
    finally:
        assert stop(second) == 0, log.read_text()
        tcp.close()
        unix.close()
    assert "taken back from systemd's fd store after a restart: 1 files" in log.read_text()
    assert "still arriving" in log.read_text()


def test_passed_control_socket_is_matched_and_answers(tmp_path: Path, notify_socket, pki: Pki) -> None:
    notify, notes = notify_socket
    config = write_config(tmp_path, free_port(), pki)
    proxy_dir = tmp_path / "proxy"
    capture, serve, control = (proxy_dir / name for name in ("streamer-capture.sock", "streamer-serve.sock",
                                                             "control.sock"))
    argv = [PYTHON, "-m", "imgmig", "proxy", "--config", str(config)]
    proc = activate([str(control), str(serve), str(capture)], argv, notify, tmp_path / "log")
    try:
        wait_listening(control)
        status = subprocess.run([PYTHON, "-m", "imgmig", "status", "--json", "--config", str(config)],
                                capture_output=True, text=True, timeout=30, env=env_for(notify), cwd=REPO)
        notes.wait_for("READY", "1")
    finally:
        assert stop(proc) == 0, (tmp_path / "log").read_text()
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["proxy"]["role"] == "proxy"
    log = (tmp_path / "log").read_text()
    assert f"control {control}" in log and "passed by systemd" in log and "WARNING" not in log, log
