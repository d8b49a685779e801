"""imgmig-proxy, the source node's daemon.

Write side: `criu dump --stream -D <proxy.images_dir>` connects to streamer-capture.sock;
each connection is a checkpoint, captured into memory and forwarded to the cache at once.
Read side: streamer-serve.sock serves the proxy's own copy (a rollback restore here).
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time

from imgmig.config import Config, require_proxy_peer
from imgmig.datapath import custody
from imgmig.datapath.capture import CaptureSession
from imgmig.datapath.digest import NAMES, usable
from imgmig.datapath.forward import Forwarder
from imgmig.datapath.kernel_io import out_of_fds
from imgmig.datapath.link import Link, open_link
from imgmig.datapath.serve import ServeSession
from imgmig.datapath.store import Checkpoint, ImageStore
from imgmig.roles.daemon import Daemon, Listener
from imgmig.roles.endpoints import CAPTURE_SOCKET, SERVE_SOCKET, Endpoint
from imgmig.roles.status import RateMeter, describe_store, human_rate
from imgmig.system.tls import Trust

log = logging.getLogger(__name__)


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.peer = require_proxy_peer(config)
        self.trust = None if config.tls is None else Trust(config.tls, config.node)
        self.store = ImageStore(config.memory_limit, max_files=config.max_files)
        self.counter = itertools.count(1)
        self.begin_lock = threading.Lock()
        self.digest = usable(NAMES[config.digest])
        if self.digest is not NAMES[config.digest]:
            log.warning("digest %s is configured but python3-xxhash is not installed; using sha256 "
                        "(install python3-xxhash for the faster digest)", config.digest)
        self.last_begun: threading.Event | None = None
        images_dir = config.proxy.images_dir
        self.daemon = Daemon("imgmig-proxy", [
            Listener(Endpoint("capture", path=images_dir / CAPTURE_SOCKET), self._on_capture),
            Listener(Endpoint("serve", path=images_dir / SERVE_SOCKET), self._on_restore),
        ], self.status, reload=None if self.trust is None else self.trust.reload)
        self.forwarders: set[Forwarder] = set()
        self.forwarded_before = 0  # bytes sent by forwarders that have finished
        self.capture_rate, self.forward_rate = RateMeter(), RateMeter()

    def status(self) -> str:
        """E.g. `1 checkpoint (1 receiving), 1.3 GiB held of 12.0 GiB; capturing at 900 MB/s;
        forwarding 1 to node-b (10.0.0.2:9996) at 410 MB/s`."""
        forwarders = list(self.forwarders)
        sent = self.forwarded_before + sum(f.bytes_sent for f in forwarders)
        forward_rate = self.forward_rate.rate(sent)
        capture_rate = self.capture_rate.rate(self.store.bytes_in)
        parts = [describe_store(self.store)]
        if capture_rate > 0:
            parts.append(f"capturing at {human_rate(capture_rate)}")
        if forwarders:
            parts.append(f"forwarding {len(forwarders)} to {forwarders[0].peer_node} at {human_rate(forward_rate)}")
        else:
            parts.append(f"peer {self.peer} idle")
        return "; ".join(parts)

    def new_checkpoint_id(self) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        return f"{self.config.node}-{stamp}-{next(self.counter)}"

    def _on_capture(self, conn: socket.socket, _peer: str) -> None:
        with self.begin_lock:
            checkpoint = self.store.begin(self.new_checkpoint_id(), self.config.node)
            forwarder = Forwarder(self.store, checkpoint, self.peer, self.config.node, self.daemon.stop, self._connect,
                                  wait_for_complete=self.config.store_and_forward, after=self.last_begun,
                                  digest=self.digest, reconnect_for=self.config.proxy.reconnect_for,
                                  keep_restored_for=self.config.proxy.keep_restored_for)
            self.last_begun = forwarder.begun
        self.daemon.spawn(f"forward-{checkpoint.id}", self._forward, forwarder)
        try:
            session = CaptureSession(conn, self.store, checkpoint, self.daemon.stop)
        except OSError as exc:
            if not out_of_fds(exc):
                raise
            log.error("checkpoint %s failed: out of file descriptors (%s) to capture it; raise LimitNOFILE "
                      "and dump again", checkpoint.id, exc.strerror, extra={"IMGMIG_CHECKPOINT": checkpoint.id})
            self.store.fail(checkpoint, "out of file descriptors")
            conn.close()
            return
        session.run()

    def _connect(self) -> Link:
        return open_link(self.peer, self.config.proxy.peer_node, self.trust, self.config.link)

    def _forward(self, forwarder: Forwarder) -> None:
        self.forwarders.add(forwarder)
        try:
            forwarder.run()
        finally:
            self.forwarders.discard(forwarder)
            self.forwarded_before += forwarder.bytes_sent

    def _on_restore(self, conn: socket.socket, _peer: str) -> None:
        ServeSession(conn, self.store, self.daemon.stop, "proxy", gate=self._take_right,
                     mine=custody.source(self.config.node)).run()

    def _take_right(self, checkpoint: Checkpoint) -> None:
        """A rollback here takes the right to restore the checkpoint, unless the cache holds it."""
        custody.take_for_rollback(self.store, checkpoint, self.config.node)
