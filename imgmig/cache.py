"""imgmig-cache, the destination node's daemon.

Write side: the TCP `cache.listen` address, where proxies deliver checkpoints.
Read side: `criu restore --stream -D <cache.images_dir>` connects to streamer-serve.sock
and is served as soon as each image it asks for is complete and verified.
"""

from __future__ import annotations

import logging
import socket

from . import peer_wire as wire
from .config import Config, is_allowed
from .daemon import Daemon, Listener
from .endpoints import SERVE_SOCKET, Endpoint
from .receive import ReceiveSession
from .serve import ServeSession
from .status import describe_store
from .store import ImageStore

log = logging.getLogger(__name__)


class Cache:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = ImageStore(config.memory_limit, serve_only_complete=config.store_and_forward)
        self.daemon = Daemon("imgmig-cache", [
            Listener(Endpoint("peer", tcp=config.cache.listen), self._on_proxy),
            Listener(Endpoint("serve", path=config.cache.images_dir / SERVE_SOCKET), self._on_restore),
        ], self.status)
        self.receiving = 0

    def status(self) -> str:
        link = f"receiving {self.receiving}" if self.receiving else "waiting for proxies"
        return f"{describe_store(self.store)}; {link} on {self.config.cache.listen}"

    def _on_proxy(self, conn: socket.socket, address: str) -> None:
        if not is_allowed(self.config, address):
            log.error("connection from %s refused: not in cache.allow of %s; add it there if this "
                      "node should send checkpoints", address, self.config.source,
                      extra={"IMGMIG_PEER": address})
            try:
                conn.sendall(wire.encode_error(wire.ErrorCode.REFUSED, "address not allowed"))
            finally:
                conn.close()
            return
        self.receiving += 1
        try:
            ReceiveSession(conn, address, self.store, self.config.node, self.daemon.stop).run()
        finally:
            self.receiving -= 1

    def _on_restore(self, conn: socket.socket, _peer: str) -> None:
        ServeSession(conn, self.store, self.daemon.stop, "cache").run()
