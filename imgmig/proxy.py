"""imgmig-proxy, the source node's daemon.

Write side: `criu dump --stream -D <proxy.images_dir>` connects to streamer-capture.sock;
each connection is a checkpoint, captured into memory and forwarded to the cache at once.
Read side: streamer-serve.sock serves the proxy's own copy (a rollback restore here).
"""

from __future__ import annotations

import itertools
import socket
import time

from .capture import CaptureSession
from .config import Config, require_proxy_peer
from .daemon import Daemon, Listener
from .endpoints import CAPTURE_SOCKET, SERVE_SOCKET, Endpoint
from .forward import Forwarder
from .serve import ServeSession
from .status import describe_store
from .store import ImageStore


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.peer = require_proxy_peer(config)
        self.store = ImageStore(config.memory_limit)
        self.counter = itertools.count(1)
        images_dir = config.proxy.images_dir
        self.daemon = Daemon("imgmig-proxy", [
            Listener(Endpoint("capture", path=images_dir / CAPTURE_SOCKET), self._on_capture),
            Listener(Endpoint("serve", path=images_dir / SERVE_SOCKET), self._on_restore),
        ], self.status)
        self.forwarders: set[Forwarder] = set()

    def status(self) -> str:
        rates = sum(1 for _ in self.forwarders)
        link = f"forwarding {rates} to {self.peer}" if rates else f"peer {self.peer}"
        return f"{describe_store(self.store)}; {link}"

    def new_checkpoint_id(self) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        return f"{self.config.node}-{stamp}-{next(self.counter)}"

    def _on_capture(self, conn: socket.socket, _peer: str) -> None:
        checkpoint = self.store.begin(self.new_checkpoint_id(), self.config.node)
        forwarder = Forwarder(self.store, checkpoint, self.peer, self.config.node, self.daemon.stop,
                              wait_for_complete=self.config.store_and_forward)
        self.daemon.spawn(f"forward-{checkpoint.id}", self._forward, forwarder)
        CaptureSession(conn, self.store, checkpoint, self.daemon.stop).run()

    def _forward(self, forwarder: Forwarder) -> None:
        self.forwarders.add(forwarder)
        try:
            forwarder.run()
        finally:
            self.forwarders.discard(forwarder)

    def _on_restore(self, conn: socket.socket, _peer: str) -> None:
        ServeSession(conn, self.store, self.daemon.stop, "proxy").run()
