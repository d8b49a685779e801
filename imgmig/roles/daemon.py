"""The shared daemon loop: accept on every listening socket, one thread per connection,
status for systemd, clean shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from imgmig.datapath.kernel_io import BurstLog, out_of_fds, report_out_of_fds
from imgmig.roles.admission import Admission
from imgmig.roles.endpoints import Endpoint, bind, match_passed
from imgmig.system import systemd_glue

log = logging.getLogger(__name__)

Handler = Callable[[socket.socket, str], None]
STATUS_EVERY = 2.0
JOIN_TIMEOUT = 5.0
ACCEPT_BACKOFF = 0.1  # out of fds: the connection waits in the backlog while others free some


@dataclass
class Listener:
    endpoint: Endpoint
    handler: Handler
    admission: Admission | None = None  # caps on connections (docs/config.md); None: no caps


class Daemon:
    def __init__(self, name: str, listeners: list[Listener], status: Callable[[], str],
                 reload: Callable[[], object] | None = None) -> None:
        self.name = name
        self.reload = reload  # SIGHUP (systemctl reload): re-read the TLS files
        self.reload_requested = threading.Event()
        self.listeners = listeners
        self.status = status
        self.stop = threading.Event()
        self.sockets: dict[str, socket.socket] = {}
        self.threads: set[threading.Thread] = set()
        self.owns_socket_files = False
        self.no_threads = BurstLog(logger=log, level=logging.ERROR)

    def open_sockets(self, passed_fds: list[int]) -> None:
        """Take systemd's sockets if any were passed, else bind the config's own."""
        endpoints = [listener.endpoint for listener in self.listeners]
        if passed_fds:
            self.sockets = match_passed(endpoints, passed_fds)
            origin = "passed by systemd"
        else:
            self.sockets = {endpoint.kind: bind(endpoint) for endpoint in endpoints}
            self.owns_socket_files = True
            origin = "bound"
        where = ", ".join(f"{endpoint.kind} {endpoint}" for endpoint in endpoints if endpoint.kind in self.sockets)
        log.info("%s listening (%s): %s", self.name, origin, where)

    def run(self) -> int:
        selector = selectors.DefaultSelector()
        for listener in self.listeners:
            sock = self.sockets.get(listener.endpoint.kind)
            if sock is None:  # an optional socket systemd did not pass
                continue
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, listener)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        selector.register(wake_r, selectors.EVENT_READ, None)
        previous = {sig: signal.signal(sig, lambda *_: self.stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())
        old_wakeup = signal.set_wakeup_fd(wake_w)
        systemd_glue.notify(f"READY=1\nSTATUS={self.status()}")
        try:
            self._serve(selector)
        finally:
            systemd_glue.notify("STOPPING=1\nSTATUS=stopping")
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._shutdown(selector)
            os.close(wake_r)
            os.close(wake_w)
        log.info("%s stopped", self.name)
        return 0

    def _serve(self, selector: selectors.BaseSelector) -> None:
        watchdog = systemd_glue.watchdog_interval()
        tick = min(STATUS_EVERY, watchdog or STATUS_EVERY)
        last_status = ""
        while not self.stop.is_set():
            for key, _ in selector.select(tick):
                if key.data is None:
                    _drain(key.fd)
                else:
                    self._accept(key.fileobj, key.data)
            if self.reload_requested.is_set():
                self._reload()
            status = self.status()
            if status != last_status:
                systemd_glue.notify(f"STATUS={status}")
                last_status = status
            if watchdog:
                systemd_glue.notify("WATCHDOG=1")

    def _reload(self) -> None:
        self.reload_requested.clear()
        if self.reload is None:
            log.info("%s: reload requested; nothing to reload (TLS is off)", self.name)
            return
        systemd_glue.notify("RELOADING=1")
        self.reload()
        systemd_glue.notify("READY=1")

    def _accept(self, sock: socket.socket, listener: Listener) -> None:
        try:
            conn, address = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if not out_of_fds(exc):
                raise
            report_out_of_fds(exc, f"a {listener.endpoint.kind} connection")
            self.stop.wait(ACCEPT_BACKOFF)
            return
        conn.setblocking(True)
        peer = address[0] if isinstance(address, tuple) else "local"
        # systemd's dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d; operators expect a.b.c.d.
        peer = peer.removeprefix("::ffff:") if "." in peer else peer
        admission = listener.admission
        if admission is not None and not admission.admit(conn, peer):
            conn.close()
            return
        try:
            self.spawn(f"{listener.endpoint.kind}-{peer}", self._handle, listener, conn, peer)
        except RuntimeError as exc:  # out of threads: refuse this one, keep serving the others
            self.no_threads.warn("%s: connection from %s refused: cannot start a thread (%s)", self.name, peer, exc)
            if admission is not None:
                admission.release(conn)
            conn.close()

    @staticmethod
    def _handle(listener: Listener, conn: socket.socket, peer: str) -> None:
        try:
            listener.handler(conn, peer)
        finally:
            if listener.admission is not None:
                listener.admission.release(conn)

    def spawn(self, name: str, target: Callable[..., None], *args: object) -> None:
        def guarded() -> None:
            try:
                target(*args)
            except Exception:
                log.exception("%s: unexpected error in %s; that connection is dropped, others go on",
                              self.name, name)
            finally:
                self.threads.discard(thread)

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        self.threads.add(thread)
        try:
            thread.start()
        except RuntimeError:
            self.threads.discard(thread)
            raise

    def _shutdown(self, selector: selectors.BaseSelector) -> None:
        self.stop.set()
        selector.close()
        for sock in self.sockets.values():
            sock.close()
        for listener in self.listeners:
            path = listener.endpoint.path
            if path is not None and self.owns_socket_files:
                _unlink(path)
        deadline = time.monotonic() + JOIN_TIMEOUT
        for thread in list(self.threads):
            thread.join(max(0.0, deadline - time.monotonic()))


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _unlink(path: os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
