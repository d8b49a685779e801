"""imgmig-cache, the destination node's daemon.

Write side: the TCP `cache.listen` address, where proxies deliver checkpoints.
Read side: `criu restore --stream -D <cache.images_dir>` connects to streamer-serve.sock
and is served as soon as each image it asks for is complete and verified.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import Any

from imgmig.config import Config, is_allowed
from imgmig.datapath import custody
from imgmig.datapath.link import Link, LinkRefused, PeerRefusedUs, accept_link
from imgmig.datapath.receive import ReceiveSession, Transfers
from imgmig.datapath.serve import ServeSession
from imgmig.datapath.store import Checkpoint, ImageStore, State
from imgmig.datapath.tunnel import LAZY_IMAGE, Tunnels
from imgmig.protocol import control_wire as cw
from imgmig.protocol import peer_wire as wire
from imgmig.roles.admission import Admission
from imgmig.roles.control import ControlServer, ControlSession, OpError, RoleView, node_of
from imgmig.roles.daemon import Daemon, Listener
from imgmig.roles.doorbell import DOORBELL_SOCKET, Doorbell
from imgmig.roles.endpoints import CONTROL_SOCKET, SERVE_SOCKET, Endpoint
from imgmig.roles.lazy import LazyOps
from imgmig.roles.status import RateMeter, describe_store, human_rate
from imgmig.system.tls import Trust

log = logging.getLogger(__name__)

REFUSAL_LINGER = 1.0  # seconds a refused peer gets to read the refusal
RETURN_WAIT = 5.0  # how long a failed restore's right waits for the link to its source to carry it back
MAX_SEEN = 64  # proxies remembered for `imgmig status` after their connection ended


class Cache:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.trust = None if config.tls is None else Trust(config.tls, config.node)
        self.store = ImageStore(config.memory_limit, serve_only_complete=config.store_and_forward,
                                max_files=config.max_files, reuse=config.memory_reuse)
        self.admission = Admission(config.cache.max_handshakes, config.cache.max_connections_per_peer, config.source)
        self.daemon = Daemon("imgmig-cache", [
            Listener(Endpoint("peer", tcp=config.cache.listen), self._on_proxy, self.admission),
            Listener(Endpoint("serve", path=config.cache.images_dir / SERVE_SOCKET), self._on_restore),
            Listener(Endpoint("control", path=config.cache.images_dir / CONTROL_SOCKET, optional=True),
                     self._on_control),
        ], self.status, reload=None if self.trust is None else self.trust.reload)
        self.tunnels = Tunnels()  # lazy restores' page-server sockets, carried by the checkpoints' links
        lazy = LazyOps(self.store, config.node, self.tunnels, self.daemon.stop, self._await_grant,
                       self._give_right_back)
        self.control = ControlServer("cache", config.node, self.store, self.daemon.stop, RoleView(
            self._checkpoint_info, self._peers, self.status, self._may_drop, {"handoff": self._handoff} | lazy.ops,
            gate=self._await_right, restore_failed=self._give_right_back))
        self.receiving: dict[int, ReceiveSession] = {}
        self.transfers = Transfers(self.store, config.cache.resume_for)
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
        # Node names in cache.allow need the handshake; addresses alone are checked before it.
        if not self.config.cache.allow_nodes and not is_allowed(self.config, address):
            self._refuse_unallowed(conn, address, address)
            return
        try:
            link = accept_link(conn, self.trust, self.config.link)
        except PeerRefusedUs as exc:
            log.warning("connection from %s ended: %s", address, exc, extra={"IMGMIG_PEER": address})
            return
        except LinkRefused as exc:
            log.error("connection from %s refused: %s", address, exc, extra={"IMGMIG_PEER": address})
            return
        except OSError:  # gone before the handshake: a port probe, nothing to report
            return
        if not is_allowed(self.config, address, link.peer_node):
            self._refuse_unallowed(link, address, f"node {link.peer_node} ({address})")
            return
        session = ReceiveSession(link, address, self.store, self.config.node, self.daemon.stop, self.transfers,
                                 idle_timeout=self.config.cache.idle_timeout,
                                 on_hello=lambda: self.admission.established(conn), tunnels=self.tunnels)
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
        info = {"received": checkpoint.size, "verified": checkpoint.size if checkpoint.done_receiving else 0}
        lazy = self.tunnels.progress(checkpoint.id)
        return info if lazy is None else info | {"lazy": lazy}

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

    def _refuse_unallowed(self, conn: socket.socket | Link, address: str, who: str) -> None:
        log.error("connection from %s refused: not in cache.allow of %s; add its node name or address there "
                  "if it should send checkpoints", who, self.config.source, extra={"IMGMIG_PEER": address})
        try:
            with contextlib.suppress(OSError):
                conn.send(wire.encode_error(wire.ErrorCode.REFUSED, "not allowed"))
                # read what it sent until it hangs up: closing with its bytes unread would reset
                # the connection, and it would never read why
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(REFUSAL_LINGER)
                while conn.recv(65536):
                    pass
        finally:
            conn.close()

    def _on_restore(self, conn: socket.socket, _peer: str) -> None:
        ServeSession(conn, self.store, self.daemon.stop, "cache", gate=self._await_right,
                     mine=custody.destination(self.config.node)).run()

    def _await_right(self, checkpoint: Checkpoint) -> None:
        """Serve nothing before the proxy granted this node the right to restore it; never
        serve a lazy checkpoint to a stream restore (its pages are not in it)."""
        if LAZY_IMAGE in checkpoint.images:
            raise custody.NoRight("it is a lazy checkpoint (its memory is on the source's page server): "
                                  "restore it with `imgmig restore --lazy`")
        self._await_grant(checkpoint)

    def _await_grant(self, checkpoint: Checkpoint) -> None:
        custody.await_grant(self.store, checkpoint, self.config.cache.grant_timeout, self.daemon.stop)

    def _handoff(self, _session: ControlSession, request: cw.Request) -> dict[str, Any]:
        """`imgmig handoff --force ID`: fencing. The source node is down (the operator says
        so with force), so no GRANT can come: this node takes the right to restore the
        checkpoint itself, and a restore waiting for it, or the next, proceeds."""
        checkpoint_id = cw.text_arg(request, "id")
        if not cw.bool_arg(request, "force"):
            raise OpError(custody.not_fenced(checkpoint_id))
        checkpoint = self.store.get(checkpoint_id)
        if checkpoint is None:
            raise OpError(f"this cache holds no checkpoint {checkpoint_id}; `imgmig list` shows what it holds")
        if checkpoint.state is not State.COMPLETE:
            raise OpError(f"checkpoint {checkpoint_id} is {checkpoint.state.value} here, not complete: only a "
                          f"complete checkpoint can be restored; nothing handed over")
        mine = custody.destination(self.config.node)
        if checkpoint.holder == mine:
            return {"id": checkpoint_id, "holder": mine, "already": True}
        custody.force(self.store, checkpoint, self.config.node)
        log.warning("checkpoint %s: the right to restore it is taken on this node without its source %s, by the "
                    "operator (imgmig handoff --force): fencing, the operator vouches that %s is down; if its proxy "
                    "comes back, it is told, and a rollback there is refused", checkpoint_id, checkpoint.origin,
                    node_of(checkpoint.origin), extra={"IMGMIG_CHECKPOINT": checkpoint_id})
        return {"id": checkpoint_id, "holder": mine, "already": False}

    def _lazy_source_unreachable(self, checkpoint: Checkpoint) -> None:
        """A lazy restore here failed and no link to its source carries the right back: the
        source node is down, or cut off. Its memory was never here, so a retry cannot help;
        the copy is dropped, and its outcome says where the process is."""
        source = node_of(checkpoint.origin)
        where = (f"the process is not here; it runs on {source} if that node is up (its dump failed there, which "
                 f"resumes it), else nowhere: a source node lost during the background copy loses the process "
                 f"(the price of post-copy)")
        log.error("checkpoint %s: its lazy restore here failed and its source %s is unreachable: %s", checkpoint.id,
                  source, where, extra={"IMGMIG_CHECKPOINT": checkpoint.id})
        self.store.fail(checkpoint, f"lazy restore failed, source unreachable: {where}")

    def _give_right_back(self, checkpoint: Checkpoint) -> None:
        """imgmig restore says CRIU failed here: the right goes back to the source, which may
        then roll back (the link driver logs it), or, with no link to carry it, stays here."""
        if not checkpoint.holder or checkpoint.state not in (State.RECEIVING, State.COMPLETE):
            return
        if custody.give_back(self.store, checkpoint, RETURN_WAIT, self.daemon.stop) or self.daemon.stop.is_set():
            return
        if LAZY_IMAGE in checkpoint.images:
            self._lazy_source_unreachable(checkpoint)
            return
        log.error("checkpoint %s: the restore here failed, and the right to restore it cannot go back to its "
                  "source %s: no link to it carried it within %.0f s; this node keeps the right and its copy, "
                  "so the source cannot roll back: retry here with `imgmig restore --id %s`", checkpoint.id,
                  checkpoint.origin, RETURN_WAIT, checkpoint.id, extra={"IMGMIG_CHECKPOINT": checkpoint.id})

