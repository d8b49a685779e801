"""imgmig-proxy, the source node's daemon.

Write side: `criu dump --stream -D <proxy.images_dir>` connects to streamer-capture.sock;
each connection is a checkpoint, captured into memory and forwarded to the cache at once.
Read side: streamer-serve.sock serves the proxy's own copy (a rollback restore here).
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from imgmig.config import Config, HostPort, peer_address, require_proxy_peer
from imgmig.datapath import custody
from imgmig.datapath.capture import CaptureSession
from imgmig.datapath.digest import NAMES, usable
from imgmig.datapath.forward import Forwarder
from imgmig.datapath.kernel_io import out_of_fds
from imgmig.datapath.link import Link, open_link
from imgmig.datapath.serve import ServeSession
from imgmig.datapath.store import FILES_IMAGE, Checkpoint, ImageStore, State
from imgmig.datapath.tunnel import LAZY_IMAGE, lazy_marker
from imgmig.protocol import control_wire as cw
from imgmig.roles.control import ControlServer, ControlSession, OpError, RoleView
from imgmig.roles.daemon import Daemon, Listener
from imgmig.roles.endpoints import CAPTURE_SOCKET, CONTROL_SOCKET, SERVE_SOCKET, Endpoint
from imgmig.roles.probe import probe_cache
from imgmig.roles.status import RateMeter, describe_store, human_bytes, human_rate
from imgmig.system.fdstore import TakenBack
from imgmig.system.tls import Trust

log = logging.getLogger(__name__)

FILES_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK
ENDED_LINKS = 256  # forwarded byte counts kept for `imgmig status` after a link ends


@dataclass(frozen=True)
class Target:
    """A cache to forward to, and the node its certificate must name (None: its address)."""
    address: HostPort
    node: str | None


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.peer = require_proxy_peer(config)
        self.trust = None if config.tls is None else Trust(config.tls, config.node)
        self.store = ImageStore(config.memory_limit, max_files=config.max_files, reuse=config.memory_reuse)
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
            Listener(Endpoint("control", path=images_dir / CONTROL_SOCKET, optional=True), self._on_control),
        ], self.status, reload=None if self.trust is None else self.trust.reload)
        self.control = ControlServer("proxy", config.node, self.store, self.daemon.stop, RoleView(
            self._checkpoint_info, self._peers, self.status, self._may_drop,
            {"expect": self._expect, "probe": self._probe, "prepare": self._prepare,
             "lazy_source": self._lazy_source},
            self._ended_as, gate=self._take_right))
        self.forwarders: set[Forwarder] = set()
        self.forwarded_before = 0  # bytes sent by forwarders that have finished
        self.capture_rate, self.forward_rate = RateMeter(), RateMeter()
        self.ended_links: dict[str, int] = {}  # checkpoint id -> bytes forwarded, once its link ended
        self.restored_there: dict[str, tuple[str, str]] = {}  # checkpoint id -> (state, outcome) at the peer

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
            expectation = self.control.take_expectation()  # announced by `imgmig migrate`, if any
            route = (expectation.to or "") if expectation is not None else ""
            target = self._target(route or None)
            checkpoint = self.store.begin(self.new_checkpoint_id(), self.config.node, route)
            page_server = None
            if expectation is not None:
                expectation.checkpoint = checkpoint.id
                if expectation.files is not None:  # first in the checkpoint: unpacked before the restore
                    self.store.add_complete_image(checkpoint, FILES_IMAGE, expectation.files)
                    expectation.files = None
                page_server, expectation.page_server = expectation.page_server, None
                if page_server is not None:  # next: marked lazy before CRIU's first image
                    self.store.add_complete_image(checkpoint, LAZY_IMAGE, _sealed(lazy_marker()))
            forwarder = self._new_forwarder(checkpoint, target, after=self.last_begun)
            forwarder.page_server = page_server
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

    def _new_forwarder(self, checkpoint: Checkpoint, target: Target, *, after: threading.Event | None = None,
                       taken_back: bool = False) -> Forwarder:
        return Forwarder(self.store, checkpoint, target.address, self.config.node, self.daemon.stop,
                         functools.partial(self._connect, target), wait_for_complete=self.config.store_and_forward,
                         after=after, digest=self.digest, reconnect_for=self.config.proxy.reconnect_for,
                         keep_restored_for=self.config.proxy.keep_restored_for, taken_back=taken_back)

    def resume_after_restart(self, taken: TakenBack) -> None:
        """After a restart: forward again what systemd's fd store kept (resumed at the cache's
        offsets, the right to restore each where it was), and tell the cache to drop what a
        capture cut by the restart left there (CRIU's dump failed with it)."""
        self.counter = itertools.count(taken.last_number + 1)  # no checkpoint id of the previous run repeats
        for checkpoint in taken.checkpoints:
            self.control.journal.note(checkpoint.id, "kept over a restart of imgmig-proxy")
            self._resume_forwarding(checkpoint)
        for cut in taken.abandoned:
            log.warning("checkpoint %s was being captured when imgmig-proxy stopped: CRIU's dump failed with it "
                        "and the process went on running here; the cache is told to drop its part",
                        cut.id, extra={"IMGMIG_CHECKPOINT": cut.id})
            ghost = Checkpoint(cut.id, cut.origin, state=State.FAILED, dropped=True, route=cut.route,
                               reason="its capture was cut by a restart of imgmig-proxy")
            self._resume_forwarding(ghost)

    def _resume_forwarding(self, checkpoint: Checkpoint) -> None:
        try:
            target = self._target(checkpoint.route or None)
        except OpError as exc:
            kept = "" if checkpoint.state is State.FAILED else "; it stays on this node for a rollback"
            log.error("checkpoint %s cannot be forwarded after the restart: %s%s", checkpoint.id, exc, kept,
                      extra={"IMGMIG_CHECKPOINT": checkpoint.id})
            return
        forwarder = self._new_forwarder(checkpoint, target, taken_back=True)
        self.daemon.spawn(f"forward-{checkpoint.id}", self._forward, forwarder)

    def _connect(self, target: Target) -> Link:
        return open_link(target.address, target.node, self.trust, self.config.link)

    def _forward(self, forwarder: Forwarder) -> None:
        self.forwarders.add(forwarder)
        try:
            forwarder.run()
        finally:
            self._note_outcome(forwarder)  # before it leaves `forwarders`: _ended_as finds it in one or the other
            self.forwarders.discard(forwarder)
            self.forwarded_before += forwarder.bytes_sent

    def _note_outcome(self, forwarder: Forwarder) -> None:
        """Its bytes forwarded, and, if the link ended without a restore there, that (migrate rolls back)."""
        checkpoint = forwarder.checkpoint
        self.ended_links[checkpoint.id] = forwarder.bytes_sent
        ended_as = _ended_there(forwarder)
        if ended_as is not None:
            self.restored_there[checkpoint.id] = ended_as
            self.control.journal.note(checkpoint.id, ended_as[1], ended_as[0])
        while len(self.restored_there) > ENDED_LINKS:
            self.restored_there.pop(next(iter(self.restored_there)))
        while len(self.ended_links) > ENDED_LINKS:
            self.ended_links.pop(next(iter(self.ended_links)))
        if forwarder.returned_by_peer:
            self.control.journal.note(checkpoint.id, f"the restore on {forwarder.peer_node} failed; the right to "
                                      f"restore it is back on this node: roll it back here")
        elif not forwarder.restored_at_peer and not forwarder.running_at_peer and checkpoint.state is State.COMPLETE \
                and not self.daemon.stop.is_set():
            self.control.journal.note(checkpoint.id, f"the link to {forwarder.peer_node} closed before a restore "
                                      f"there; this node keeps its copy for a rollback")

    def _ended_as(self, event: str, checkpoint: Checkpoint) -> tuple[str, str] | None:
        """Dropped once the peer confirmed the process runs there, or after it reported it
        read whole by a bare restore (kept proxy.keep_restored_for first)."""
        forwarder = self._forwarder(checkpoint)
        known = _ended_there(forwarder) if forwarder is not None else self.restored_there.get(checkpoint.id)
        return known if event == "dropped" else None

    def _on_control(self, conn: socket.socket, peer: str) -> None:
        self.control.handle(conn, peer)

    def _target(self, node: str | None) -> Target:
        """Where a checkpoint for `node` goes, and the node its cache's certificate must
        name: proxy.peer for None, else the peers-map entry (its key is that node)."""
        if node is None:
            return Target(self.peer, self.config.proxy.peer_node)
        address = peer_address(self.config, node)
        if address is None:
            raise OpError(f"node {node!r} is not in the peers map of {self.config.source}")
        return Target(address, node)

    def _forwarder(self, checkpoint: Checkpoint) -> Forwarder | None:
        return next((f for f in list(self.forwarders) if f.checkpoint is checkpoint), None)

    def _checkpoint_info(self, checkpoint: Checkpoint) -> dict[str, Any]:
        forwarder = self._forwarder(checkpoint)
        if forwarder is not None:
            link = "verified, waiting for a restore there" if checkpoint.delivered else "sending"
            forwarded, peer = forwarder.bytes_sent, forwarder.peer_node
        else:
            link, forwarded, peer = "closed", self.ended_links.get(checkpoint.id, 0), None
        restored_at_peer = forwarder is not None and forwarder.restored_at_peer
        returned = forwarder is not None and forwarder.returned_by_peer
        if restored_at_peer:
            link = "read whole by a restore there, not confirmed running; this copy kept for proxy.keep_restored_for"
        elif returned:
            link = "the restore there failed and gave the right back; both copies kept"
        return {"forwarded": forwarded, "verified": checkpoint.size if checkpoint.delivered else 0,
                "delivered": checkpoint.delivered, "link": link, "peer": peer, "restored_at_peer": restored_at_peer,
                "returned": returned, "pages_sent": forwarder.tunnelled if forwarder is not None else 0}

    def _peers(self) -> list[dict[str, Any]]:
        forwarders = list(self.forwarders)
        sent = self.forwarded_before + sum(f.bytes_sent for f in forwarders)
        rate = self.forward_rate.rate(sent)
        by_address = {address: name for name, address in self.config.peers}
        named = [(by_address.get(self.peer, "default"), self.peer),
                 *((name, address) for name, address in self.config.peers if address != self.peer)]
        peers = []
        for name, address in named:
            active = [f for f in forwarders if f.peer == address]
            peers.append({"name": name, "address": str(address), "forwarding": len(active),
                          "node": active[0].peer_node if active else None,
                          "state": "forwarding" if active else "idle", "rate": rate if active else 0.0})
        return peers

    def _may_drop(self, checkpoint: Checkpoint) -> str | None:
        return ("it is this node's copy for a rollback and is not confirmed running on another node; "
                "with --force it is discarded, and if the restore elsewhere fails the process is lost")

    def _expect(self, session: ControlSession, request: cw.Request) -> dict[str, Any]:
        to = cw.text_arg(request, "to", required=False)
        self._target(to)
        files = _sealed_memfd(session.take_fd()) if cw.bool_arg(request, "files") else None
        expectation = self.control.expect(to)
        expectation.files = files
        session.expectations.append(expectation)
        return {"ticket": expectation.ticket}

    def _lazy_source(self, session: ControlSession, request: cw.Request) -> dict[str, Any]:
        """`imgmig migrate --lazy`: the page-server socket of the lazy dump it announced with
        `expect` (its ticket), passed with the request. Its checkpoint is then marked lazy, and
        the tunnel's channel reaches that socket, never a listening port."""
        ticket = request.args.get("ticket")
        sock = session.take_unix_stream("lazy_source needs the dump's page-server socket")
        sock.setblocking(True)
        expectation = next((e for e in session.expectations if e.ticket == ticket), None)
        with self.control.lock:  # a capture takes expectations under it
            if expectation is not None and expectation in self.control.expectations \
                    and expectation.page_server is None:
                expectation.page_server = sock
                return {"ticket": ticket}
        sock.close()
        raise OpError(f"no dump announced on this connection with ticket {ticket!r} is waiting to begin (or it has "
                      f"its page server already): send expect, then lazy_source, then start the dump")

    def _probe(self, _session: ControlSession, request: cw.Request) -> dict[str, Any]:
        target = self._target(cw.text_arg(request, "to", required=False))
        try:
            answer = probe_cache(target.address, target.node, self.trust, self.config.link, self.config.node,
                                 self.digest)
        except (OSError, ValueError) as exc:
            raise OpError(f"the cache at {target.address} is not reachable or not authenticated: "
                          f"{_reason(exc)}") from None
        return {"node": answer.node, "address": str(target.address), "authenticated": self.trust is not None,
                "memory_limit": answer.memory_limit, "room": answer.room}

    def _prepare(self, _session: ControlSession, request: cw.Request) -> dict[str, Any]:
        """`imgmig migrate`, before it freezes the process: memory for about `bytes` of pages
        made ready here and at the cache at once (ImageStore.prepare, PREPARE), so that
        neither allocates it during the freeze. Declined if the cache did not answer; the
        memory made ready here then stays ready all the same."""
        size = cw.size_arg(request, "bytes")
        target = self._target(cw.text_arg(request, "to", required=False))
        started = time.monotonic()
        here: list[int] = []
        local = threading.Thread(target=lambda: here.append(self.store.prepare(size)), name="prepare", daemon=True)
        local.start()
        try:
            answer = probe_cache(target.address, target.node, self.trust, self.config.link, self.config.node,
                                 self.digest, prepare=size)
        except (OSError, ValueError) as exc:
            raise OpError(f"the cache at {target.address} did not make memory ready: {_reason(exc)}") from None
        finally:
            local.join()
        seconds, ready = time.monotonic() - started, here[0] if here else 0
        log.info("memory ready for a checkpoint of about %s: %s here, %s at %s (%.2f s)", human_bytes(size),
                 human_bytes(ready), human_bytes(answer.prepared), answer.node, seconds)
        return {"proxy": ready, "cache": answer.prepared, "node": answer.node, "seconds": round(seconds, 3)}

    def _on_restore(self, conn: socket.socket, _peer: str) -> None:
        ServeSession(conn, self.store, self.daemon.stop, "proxy", gate=self._take_right,
                     mine=custody.source(self.config.node)).run()

    def _take_right(self, checkpoint: Checkpoint) -> None:
        """A rollback here takes the right to restore the checkpoint, unless the cache holds it."""
        if LAZY_IMAGE in checkpoint.images:
            raise custody.NoRight("it is a lazy checkpoint: its memory was never in it (a failed lazy migration "
                                  "resumes the process on this node by itself)")
        custody.take_for_rollback(self.store, checkpoint, self.config.node)


def _reason(exc: OSError | ValueError) -> str:
    """Why probing the cache failed, in words (an OSError's strerror, not its repr)."""
    return str((exc.strerror if isinstance(exc, OSError) else None) or exc)


def _ended_there(forwarder: Forwarder) -> tuple[str, str] | None:
    """(state, outcome) of a checkpoint the peer restored: confirmed running, or read whole."""
    if forwarder.running_at_peer:
        return "running-at-peer", f"running on {forwarder.running_at_peer}, confirmed by its restore"
    if forwarder.restored_at_peer:
        return "restored-at-peer", f"restored on {forwarder.peer_node}"
    return None


def _sealed(data: bytes) -> int:
    """A small image made here, as a sealed memfd (as the files image comes)."""
    fd = os.memfd_create("imgmig-image", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, FILES_SEALS)
    return fd


def _sealed_memfd(fd: int | None) -> int:
    """The files image as passed: a memfd nobody can change any more, or OpError."""
    if fd is None:
        raise OpError("expect with files needs the files image passed with it (SCM_RIGHTS)")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if seals & FILES_SEALS != FILES_SEALS:
        os.close(fd)
        raise OpError("the files image must be a memfd sealed against writing, growing and shrinking")
    return fd
