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

from imgmig.roles.endpoints import Endpoint, bind, match_passed
from imgmig.system import systemd_glue

log = logging.getLogger(__name__)

Handler = Callable[[socket.socket, str], None]
STATUS_EVERY = 2.0
JOIN_TIMEOUT = 5.0


@dataclass
class Listener:
    endpoint: Endpoint
    handler: Handler


class Daemon:
    def __init__(self, name: str, listeners: list[Listener], status: Callable[[], str]) -> None:
        self.name = name
        self.listeners = listeners
        self.status = status
        self.stop = threading.Event()
        self.sockets: dict[str, socket.socket] = {}
        self.threads: set[threading.Thread] = set()
        self.owns_socket_files = False

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
            status = self.status()
            if status != last_status:
                systemd_glue.notify(f"STATUS={status}")
                last_status = status
            if watchdog:
                systemd_glue.notify("WATCHDOG=1")

    def _accept(self, sock: socket.socket, listener: Listener) -> None:
        try:
            conn, address = sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(True)
        peer = address[0] if isinstance(address, tuple) else "local"
        # systemd's dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d; operators expect a.b.c.d.
        peer = peer.removeprefix("::ffff:") if "." in peer else peer
        self.spawn(f"{listener.endpoint.kind}-{peer}", listener.handler, conn, peer)

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
        thread.start()

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
