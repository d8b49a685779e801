"""imgmig-cache, the destination node's daemon.

Write side: the TCP `cache.listen` address, where proxies deliver checkpoints.
Read side: `criu restore --stream -D <cache.images_dir>` connects to streamer-serve.sock
and is served as soon as each image it asks for is complete and verified.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from imgmig.config import Config, is_allowed
from imgmig.datapath.receive import ReceiveSession
from imgmig.datapath.serve import ServeSession
from imgmig.datapath.store import Checkpoint, ImageStore, State
from imgmig.protocol import peer_wire as wire
from imgmig.roles.control import ControlServer, RoleView
from imgmig.roles.daemon import Daemon, Listener
from imgmig.roles.doorbell import DOORBELL_SOCKET, Doorbell
from imgmig.roles.endpoints import CONTROL_SOCKET, SERVE_SOCKET, Endpoint
from imgmig.roles.status import RateMeter, describe_store, human_rate

log = logging.getLogger(__name__)

MAX_SEEN = 64  # proxies remembered for `imgmig status` after their connection ended


class Cache:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = ImageStore(config.memory_limit, serve_only_complete=config.store_and_forward)
        self.daemon = Daemon("imgmig-cache", [
            Listener(Endpoint("peer", tcp=config.cache.listen), self._on_proxy),
            Listener(Endpoint("serve", path=config.cache.images_dir / SERVE_SOCKET), self._on_restore),
            Listener(Endpoint("control", path=config.cache.images_dir / CONTROL_SOCKET, optional=True),
                     self._on_control),
        ], self.status)
        self.control = ControlServer("cache", config.node, self.store, self.daemon.stop, RoleView(
            self._checkpoint_info, self._peers, self.status, self._may_drop))
        self.receiving: dict[int, ReceiveSession] = {}
        self.seen: dict[str, float] = {}  # proxy -> when its last connection ended
        if config.cache.restore == "auto":
            Doorbell(config.cache.images_dir / DOORBELL_SOCKET, self.store)
        self.receive_rate = RateMeter()

    def status(self) -> str:
        """E.g. `1 checkpoint (1 receiving), 1.3 GiB held of 12.0 GiB; receiving from node-a (10.0.0.1)
        at 410 MB/s on 0.0.0.0:9996`."""
        rate = self.receive_rate.rate(self.store.bytes_in)
        sessions = list(self.receiving.values())
        if sessions:
            peers = ", ".join(sorted({session.peer for session in sessions}))
            link = f"receiving from {peers} at {human_rate(rate)}"
        else:
            link = "waiting for proxies"
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
        session = ReceiveSession(conn, address, self.store, self.config.node, self.daemon.stop)
        self.receiving[id(session)] = session
        try:
            session.run()
        finally:
            del self.receiving[id(session)]
            self.seen[session.peer] = time.monotonic()
            while len(self.seen) > MAX_SEEN:
                self.seen.pop(min(self.seen, key=self.seen.__getitem__))

    def _on_control(self, conn: socket.socket, peer: str) -> None:
        self.control.handle(conn, peer)

    def _checkpoint_info(self, checkpoint: Checkpoint) -> dict[str, Any]:
        return {"received": checkpoint.size, "verified": checkpoint.size if checkpoint.done_receiving else 0}

    def _peers(self) -> list[dict[str, Any]]:
        rate = self.receive_rate.rate(self.store.bytes_in)
        now = time.monotonic()
        peers = []
        for session in list(self.receiving.values()):
            checkpoint = session.checkpoint
            receiving = checkpoint is not None and checkpoint.state is State.RECEIVING
            peers.append({"name": session.peer, "state": "receiving" if receiving else "connected",
                          "checkpoint": checkpoint.id if checkpoint else None, "rate": rate if receiving else 0.0})
        active = {peer["name"] for peer in peers}
        for name, at in sorted(self.seen.items(), key=lambda item: -item[1]):
            if name not in active:
                peers.append({"name": name, "state": "disconnected", "ago": round(now - at, 1), "rate": 0.0})
        return peers

    def _may_drop(self, checkpoint: Checkpoint) -> str | None:
        if checkpoint.claimed:
            return "a restore is reading it now; with --force that restore fails"
        return None

    def _on_restore(self, conn: socket.socket, _peer: str) -> None:
        ServeSession(conn, self.store, self.daemon.stop, "cache").run()
