"""The proxy's link to the cache: the driver of one ProxyConnection per connection
(protocol/conversation.py), streaming one checkpoint while CRIU is still writing it.

Bytes go memfd -> socket with sendfile as soon as they are in the store; the digest is
taken from a mapping of the same memfd. This thread is the only writer to its link.
When the link is cut it reconnects with backoff for up to `proxy.reconnect_for`
seconds and resumes: each file continues at the offset the cache says it holds, so
nothing the cache acknowledged is sent again. After CHECKPOINT_DONE the connection
stays: the proxy decides who may restore the checkpoint (CLAIM / GRANT, or a rollback
here, which takes the right and tells the cache to DROP its copy), releases its own
copy at once when the cache confirms the process runs there (RUNNING), keeps it
`keep_restored_for` when a bare restore there only read it all (RESTORED), and keeps it
when a failed restore there gives the right back (RETURN): then a rollback here, or a
retry there, may take the right.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from imgmig.config import HostPort
from imgmig.datapath import custody
from imgmig.datapath.digest import Digester, new_hasher, usable
from imgmig.datapath.link import HandshakeCut, Link, LinkRefused, TlsLink
from imgmig.datapath.receive import receive_within
from imgmig.datapath.store import SMALL_IMAGE, Checkpoint, Image, ImageStore, State
from imgmig.datapath.tunnel import LAZY_IMAGE, NotLazy, TunnelPump, end_page_server
from imgmig.protocol import conversation as conv
from imgmig.protocol import peer_wire as wire
from imgmig.protocol import tunnel_wire
from imgmig.protocol.peer_wire import BeginStatus, ErrorCode

log = logging.getLogger(__name__)

# A FILE_DATA frame carries up to this, the most the protocol allows: against 1 MiB frames
# the cache spent a fifth less CPU per GB (bench/README.md, "The restore starts when the dump ends").
FRAME_PAYLOAD = wire.MAX_DATA_PAYLOAD
# An image still being written is sent in steps of at least this much: each step costs a
# mapping for the digest, a header and a sendfile, so 64 KiB dribbles from CRIU's pipe
# would cost four times the system calls and wake-ups for the same bytes.
SEND_STEP = 1 << 20
# The most of one file sent before the forwarder looks for new files again (_send_active).
ROUND_BYTES = 8 << 20
# A complete image up to store.SMALL_IMAGE goes as one buffered FILE_DATA frame, together
# with its FILE_BEGIN and FILE_END in a single send: small files are bound by system calls.
SMALL_BATCH = 32  # small files per send
# Complete small images fewer than a batch wait this long for the next ones before they go:
# woken for each, the forwarder made one send (and the cache one read) per file.
SMALL_LINGER = 0.002
PREVIOUS_WAIT = 10.0  # longest a checkpoint's BEGIN waits for the previous checkpoint's
LINGER_AFTER_FAILURE = 2.0
LOOK_EVERY = 0.2      # an idle link looks at the store this often (a rollback may take the right)
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0


class LinkLost(Exception):
    """The connection ended; a new one may resume the checkpoint."""


class GiveUp(Exception):
    """The checkpoint cannot be delivered; the text says why (already logged if `logged`)."""

    def __init__(self, message: str, logged: bool = False) -> None:
        super().__init__(message)
        self.logged = logged


class Settled(Exception):
    """Nothing is left to say about this checkpoint."""


class Retained(Settled):
    """Restored on the cache: this node keeps its copy for `keep_restored_for` seconds."""


@dataclass
class _Outgoing:
    image: Image
    file_id: int
    hasher: Digester
    sent: int = 0
    ended: bool = False
    acked: int = 0  # the most the cache ever acknowledged of it, on any connection


class Forwarder:
    def __init__(self, store: ImageStore, checkpoint: Checkpoint, peer: HostPort, node: str,
                 stop: threading.Event, connect: Callable[[], Link], *, wait_for_complete: bool = False,
                 after: threading.Event | None = None, digest: wire.Digest = wire.Digest.SHA256,
                 reconnect_for: float = 300.0, keep_restored_for: float = 600.0, taken_back: bool = False) -> None:
        self.connect = connect  # link.open_link with this proxy's peer and trust
        self.store = store
        self.checkpoint = checkpoint
        self.peer = peer
        self.node = node
        self.stop = stop
        self.wait_for_complete = wait_for_complete
        self.reconnect_for = reconnect_for
        self.keep_restored_for = keep_restored_for
        self.link: Link | None = None
        self.conn: conv.ProxyConnection | None = None
        self.outgoing: list[_Outgoing] = []  # by file id
        self.next_to_begin = 0               # file id of the first file not begun on this connection
        self.active: list[_Outgoing] = []    # begun, not yet ended
        self.bytes_sent = 0
        self.resent = 0         # bytes sent again after a cut (in flight when it happened)
        self.resent_acked = 0   # of which the cache had acknowledged: must stay 0
        self.reconnects = 0
        self.progressed = False  # the current connection got as far as BEGUN
        self.lost_at = 0.0       # when the link was last lost
        self.peer_node = str(peer)
        self.peer_name = ""     # the cache's node name, from its HELLO
        # Checkpoints reach the cache in the order CRIU connected: this one's
        # CHECKPOINT_BEGIN waits until the cache answered the previous forwarder's (`after`)
        # with BEGUN, or that forwarder ended.
        self.after = after
        self.begun = threading.Event()
        # A CHECKPOINT_BEGIN went out, answered or not: a cache that died before its BEGUN
        # may have kept the checkpoint's start in its fd store, so later connections resume
        # (a cache that has none of it answers NEW to a resume as well).
        self.begin_sent = False
        # Kept over a restart of the proxy (fdstore.py): the cache may hold any part of it, so
        # the first connection is a resume; what a previous run sent is unknown here.
        self.taken_back = taken_back
        self.held_at_restart = -1  # bytes the cache held when a taken-back checkpoint resumed
        if taken_back:
            self.begun.set()
        self.restored_at_peer = False  # the cache reported every image read by a restore there
        self.running_at_peer = ""      # the cache confirmed the process runs there: "NODE as pid P"
        self.returned_by_peer = False  # a restore there failed and the cache gave the right back (since the last grant)
        self.digest = usable(digest)  # offered in HELLO; the cache's HELLO says which is used
        self.started = time.monotonic()
        self.pump: TunnelPump | None = None  # a lazy restore on the cache reaching the page server here
        self.page_server: socket.socket | None = None  # a lazy dump's page server, passed by `imgmig migrate`
        self.tunnelled_before = 0  # page bytes that earlier connections' pumps carried

    @property
    def tunnelled(self) -> int:
        """Bytes of a lazy restore's pages sent to the cache so far."""
        pump = self.pump
        return self.tunnelled_before + (pump.moved_out if pump is not None else 0)

    @property
    def fields(self) -> dict[str, str]:
        return {"IMGMIG_CHECKPOINT": self.checkpoint.id, "IMGMIG_PEER": self.peer_node}

    # ---- connections, and reconnecting -------------------------------------------------------
    def run(self) -> None:
        try:
            with self.store.using(self.checkpoint):
                if self.wait_for_complete:
                    self._await_captured()
                self._until_settled()
        except Retained:
            self._keep_after_restored()
        finally:
            self.begun.set()
            if self.page_server is not None:  # no lazy restore ever reached it: the dump must fail
                end_page_server(self.page_server, at_record_boundary=True, abort=True)
                self.page_server = None

    def _await_captured(self) -> None:
        """Store-and-forward connects once the dump has ended: a link opened at the start
        would carry nothing for the whole dump, and the cache fails a checkpoint whose
        link is idle for cache.idle_timeout."""
        self.store.wait_until(lambda: self.checkpoint.state is not State.RECEIVING, self.stop)

    def _keep_after_restored(self) -> None:
        """A bare `criu restore --stream` on the cache read everything; whether it then
        succeeded nobody here can tell. The safe side: keep this copy (the right stays with
        the cache, so it is not restored here by accident) until it is released, evicted
        for memory, or keep_restored_for has passed."""
        checkpoint = self.checkpoint
        if self.store.wait_until(lambda: checkpoint.dropped, self.stop, self.keep_restored_for) or self.stop.is_set():
            return
        log.info("checkpoint %s was restored on %s %.0f s ago (proxy.keep_restored_for); releasing this "
                 "node's copy", checkpoint.id, self.peer_node, self.keep_restored_for, extra=self.fields)
        self.store.drop(checkpoint)

    def _until_settled(self) -> None:
        lost_at: float | None = None
        backoff = BACKOFF_FIRST
        while not self.stop.is_set():
            try:
                self._connection()
                return
            except Retained:
                raise
            except Settled:
                return
            except GiveUp as exc:
                if not exc.logged:
                    self._report_failure(str(exc))
                return
            except wire.PeerProtocolError as exc:
                self._report_failure(f"the cache broke the protocol: {exc}")
                return
            except HandshakeCut as exc:  # a refusal, or a cache that stopped then: tried again like a cut
                reason = str(exc)
            except LinkRefused as exc:  # not authenticated: trying again will not help
                self._report_failure(str(exc))
                return
            except (OSError, LinkLost) as exc:
                reason = _describe(exc)
            now = time.monotonic()
            if self.progressed:  # that connection got as far as BEGUN: a fresh outage starts
                self.progressed = False
                lost_at, backoff = now, BACKOFF_FIRST
                if not self.stop.is_set():
                    log.warning("link to %s lost while it carried checkpoint %s (%s); reconnecting for up "
                                "to %.0f s (proxy.reconnect_for)", self.peer_node, self.checkpoint.id, reason,
                                self.reconnect_for, extra=self.fields)
            elif lost_at is None:
                lost_at = now
                log.warning("checkpoint %s: cannot reach the cache at %s (%s); retrying for up to %.0f s "
                            "(proxy.reconnect_for); the checkpoint stays on this node meanwhile, a rollback "
                            "restore here is possible", self.checkpoint.id, self.peer, reason,
                            self.reconnect_for, extra=self.fields)
            if self.checkpoint.state is State.RESTORED and not self.checkpoint.delivered and not self.begun.is_set():
                return  # rolled back here, and the cache never had any of it: nothing to tell it
            if now - lost_at > self.reconnect_for:
                self._report_failure(f"{reason}; no working link for {self.reconnect_for:.0f} s")
                return
            self.lost_at = lost_at
            self.stop.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _connection(self) -> None:
        resume = self.begun.is_set() or self.begin_sent
        self.conn = None
        self.link = self.connect()
        delivered = False
        try:
            auth = wire.Auth.TLS if isinstance(self.link, TlsLink) else wire.Auth.NONE
            self.conn = conv.ProxyConnection(self.node, self.checkpoint.id, self.digest, time.monotonic(),
                                             resume=resume, auth=auth, memory_limit=self.store.limit,
                                             room=max(0, self.store.room()))
            self._flush()
            hello = self._wait_for(conv.HelloReceived).hello
            if self.link.peer_node is not None and hello.node != self.link.peer_node:
                raise GiveUp(f"the cache calls itself {hello.node!r} in HELLO but its certificate names "
                             f"{self.link.peer_node!r}")
            self.link.settimeout(None)  # the handshake deadline is over; the machine keeps time now
            self.peer_name = hello.node
            self.peer_node = f"{hello.node} ({self.peer})"
            if not resume:
                self._await_previous()
            holder = self.checkpoint.holder  # before BEGIN: a CLAIM may come right after BEGUN
            self.conn.begin(time.monotonic())
            self._flush()
            self.begin_sent = True
            answered = self._wait_for(conv.BeginAnswered)
            self._on_begun(answered, resume, holder)
            if self.conn.phase is conv.Phase.TRANSFER:
                self._stream()
            delivered = True
            self._hold()
        finally:
            if self.pump is not None:
                self.pump.close("the link to the cache ended")
                self.tunnelled_before += self.pump.moved_out
                self.pump = None
            if delivered:
                self.link.close()
            else:
                # An undelivered checkpoint ends with a reset: a FIN would queue behind bytes that a
                # cache waiting for memory does not read, and it would wait on.
                self.link.abort()

    def _await_previous(self) -> None:
        """Keep the order in which dumps connected, but never wait on a stuck predecessor long."""
        if self.after is None:
            return
        deadline = time.monotonic() + PREVIOUS_WAIT
        while not self.after.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or self.stop.is_set():
                return
            self._tick()

    def _on_begun(self, answered: conv.BeginAnswered, resume: bool, holder: str) -> None:
        self.begun.set()
        self.progressed = True
        if answered.status is BeginStatus.RESTORED:
            self._restored_there()
        if answered.status is BeginStatus.GONE:
            raise GiveUp(f"the cache no longer has checkpoint {self.checkpoint.id} (dropped or failed there)")
        if answered.status is BeginStatus.NEW and holder == custody.destination(self.peer_name):
            log.error("checkpoint %s: %s no longer knows it, yet it was granted the right to restore it: the process "
                      "may run there; this copy is not sent again, and a rollback here is refused (`imgmig drop "
                      "--force %s` once it is known not to run there)", self.checkpoint.id, self.peer_node,
                      self.checkpoint.id, extra=self.fields)
            self._end_at_cache()  # what the cache began on this BEGIN goes at once
            raise GiveUp("granted to a cache that lost it", logged=True)
        if answered.status is BeginStatus.COMPLETE and self.checkpoint.state is State.FAILED:
            log.warning("checkpoint %s is complete at %s although this proxy stopped before it recorded the capture "
                        "as complete: that copy is the only one; its restore there is granted", self.checkpoint.id,
                        self.peer_node, extra=self.fields)
        elif answered.status is BeginStatus.COMPLETE:
            self._delivered()
        elif answered.status is not BeginStatus.RUNNING:  # RUNNING: its frame comes next (_hold)
            self._continue_files(answered)
        if resume and self.reconnects == 0 and self.taken_back:
            self.reconnects += 1
            self._log_taken_back(answered)
        elif resume:
            self.reconnects += 1
            down = time.monotonic() - self.lost_at
            log.info("checkpoint %s: link to %s back after %.2f s; %s (resent so far: %d bytes, of them "
                     "acknowledged before: %d)", self.checkpoint.id, self.peer_node, down,
                     _describe_resume(answered), self.resent, self.resent_acked, extra=self.fields)
        else:
            log.info("checkpoint %s: forwarding to %s", self.checkpoint.id, self.peer_node, extra=self.fields)

    def _log_taken_back(self, answered: conv.BeginAnswered) -> None:
        if self.checkpoint.state is State.FAILED:  # a capture the restart cut: only the cache's part matters
            return
        if answered.status is BeginStatus.RESUMED or answered.status is BeginStatus.NEW:
            size = self.checkpoint.size
            log.info("checkpoint %s, kept over a restart: forwarding to %s resumes; the cache holds %d of its %d "
                     "bytes, the other %d are sent", self.checkpoint.id, self.peer_node, self.held_at_restart, size,
                     size - self.held_at_restart, extra=self.fields)
        else:
            log.info("checkpoint %s, kept over a restart: linked back to %s; %s", self.checkpoint.id,
                     self.peer_node, _describe_resume(answered), extra=self.fields)

    def _continue_files(self, answered: conv.BeginAnswered) -> None:
        """Where each file goes on from: what the cache holds, never below what it acknowledged."""
        assert self.conn is not None
        self._learn_images()  # after a restart of this proxy, the files are known only from the store
        self.active = []
        held_here = 0
        for out in self.outgoing:
            if out.file_id >= answered.files:
                self._restart_file(out, 0)
            elif out.file_id in answered.held:
                held = answered.held[out.file_id]
                if held > out.image.size:  # above `sent` is fine: a sendfile cut midway
                    raise wire.PeerProtocolError(f"the cache says it holds {held} bytes of {out.image.name}, "
                                                 f"which has {out.image.size}")
                self._restart_file(out, held)
                self.conn.continue_file(out.file_id)
                self.active.append(out)
                held_here += held
            else:
                out.ended, out.acked = True, out.image.size
                held_here += out.image.size
        self.next_to_begin = min(answered.files, len(self.outgoing))
        if self.held_at_restart < 0 and self.taken_back:
            self.held_at_restart = held_here
            self.bytes_sent = 0  # counts what this run sends

    def _restart_file(self, out: _Outgoing, offset: int) -> None:
        self.resent += max(0, out.sent - offset)
        self.resent_acked += max(0, out.acked - offset)
        self.bytes_sent -= out.sent - offset
        out.hasher = new_hasher(self.digest)
        out.image.hash(out.hasher, 0, offset)
        out.sent, out.ended = offset, False

    # ---- streaming ------------------------------------------------------------------------------
    def _stream(self) -> None:
        assert self.conn is not None
        while True:
            receiving = self.checkpoint.state is State.RECEIVING
            if not (self.wait_for_complete and receiving):
                self._begin_new()
                self._list_files()
                self._send_active()
            if self.checkpoint.state is State.FAILED:
                self._dump_failed()
            if not receiving and not self.active and self.next_to_begin == len(self.checkpoint.images):
                break
            self._drain()
            self._wait_for_work()
            if self.stop.is_set():
                raise Settled
        self.conn.checkpoint_end(True, len(self.outgoing), self.bytes_sent, time.monotonic())
        self._flush()
        delivered = self._wait_for(conv.Delivered)
        if not delivered.ok:
            raise GiveUp(f"the cache rejected the checkpoint: {delivered.message}")
        self._delivered()

    def _dump_failed(self) -> None:
        """Tell the cache (it drops its part), read its answer, and stop: capture logged why."""
        self._end_at_cache()
        raise Settled

    def _end_at_cache(self) -> None:
        """CHECKPOINT_END clean=0: the cache drops what it holds of the checkpoint."""
        assert self.conn is not None
        self.conn.checkpoint_end(False, len(self.outgoing), self.bytes_sent, time.monotonic())
        self._flush()
        deadline = time.monotonic() + LINGER_AFTER_FAILURE
        while not self.conn.closed and time.monotonic() < deadline:
            self._pump(min(LOOK_EVERY, deadline - time.monotonic()))

    def _wait_for_work(self) -> None:
        """Sleep until there is something to send (checked under the store's lock, so a
        change cannot slip between the check and the wait), or a timer is due. Costs
        O(open files), not O(files in the checkpoint)."""
        assert self.conn is not None
        deadline = self.conn.next_deadline()
        timeout = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
        checkpoint = self.checkpoint
        if not self.wait_for_complete and len(checkpoint.listed) > self.next_to_begin \
                and _may_begin(checkpoint, self.next_to_begin):
            timeout = min(timeout, SMALL_LINGER)  # small ones wait for a batch, not long
        self.store.wait_until(self._has_work, self.stop, timeout)
        self._tick()

    def _has_work(self) -> bool:
        """Checked by every thread that changes the store: a few comparisons, not a walk."""
        checkpoint = self.checkpoint
        if checkpoint.state is not State.RECEIVING:
            return True
        if self.wait_for_complete:
            return False
        listed = checkpoint.listed
        waiting = len(listed) - self.next_to_begin
        if waiting > 0 and _may_begin(checkpoint, self.next_to_begin):
            # a batch is full, or the newest is one to begin at once (large or still written)
            return waiting >= SMALL_BATCH or not _small_whole(listed[-1])
        return any(out.image.complete or out.image.size - out.sent >= SEND_STEP for out in self.active)

    def _begin_new(self) -> None:
        """FILE_BEGIN for the files that may begin; a small complete one goes whole at once."""
        assert self.conn is not None
        self._learn_images()
        small = 0
        for out in self.outgoing[self.next_to_begin:]:
            if not _may_begin(self.checkpoint, out.file_id):
                break
            self.next_to_begin += 1
            if _small_whole(out.image):
                self._frame_small(out)
                small += 1
                if small % SMALL_BATCH == 0:
                    self._flush()
                continue
            self.conn.file_begin(out.file_id, out.image.name, time.monotonic())
            self.active.append(out)
        self._flush()

    def _list_files(self) -> None:
        """FILES_LISTED once the dump ended cleanly and every file is begun, ahead of the
        page bytes still queued: a restore on the cache, which needs inventory.img (CRIU's
        last file) and the answer "absent" for images the dump never wrote, starts now and
        reads the pages as they arrive, instead of after the last of them."""
        assert self.conn is not None
        if self.conn.listed is None and self.checkpoint.state is State.COMPLETE \
                and self.next_to_begin == len(self.outgoing) == len(self.checkpoint.listed):
            self.conn.files_listed(len(self.outgoing), time.monotonic())
            self._flush()

    def _send_active(self) -> None:
        """A round of bytes for each open file: at most ROUND_BYTES each, so that files
        that complete meanwhile (the dump's last, small ones) go before a large backlog."""
        for out in self.active:
            self._send_bytes(out)
        self.active = [out for out in self.active if not out.ended]

    def _learn_images(self) -> None:
        """Images are never removed from a checkpoint and `listed` keeps them in order: the
        new ones are those past the count already known, and their file ids follow it. The
        slice copies without letting another thread run."""
        for image in self.checkpoint.listed[len(self.outgoing):]:
            self.outgoing.append(_Outgoing(image, len(self.outgoing), new_hasher(self.digest)))

    def _frame_small(self, out: _Outgoing) -> None:
        """FILE_BEGIN, one buffered FILE_DATA and FILE_END: the same frames as for a large
        file, queued to go with other small files' in one system call."""
        assert self.conn is not None
        now = time.monotonic()
        size = out.image.size
        data = os.pread(out.image.fd, size, 0) if size else b""
        if len(data) != size:
            raise OSError(f"{out.image.name}: read {len(data)} of {size} bytes from its memfd")
        out.hasher.update(data)
        self.conn.file_begin(out.file_id, out.image.name, now)
        if size:
            self.conn.file_data(out.file_id, 0, data, now)
        self.conn.file_end(out.file_id, size, out.hasher.digest(), now)
        out.sent = size
        out.ended = True
        self.bytes_sent += size

    def _send_bytes(self, out: _Outgoing) -> None:
        assert self.conn is not None and self.link is not None
        complete = out.image.complete
        size = out.image.size
        if not complete and size - out.sent < SEND_STEP:
            return
        end = min(size, out.sent + ROUND_BYTES)
        while out.sent < end:
            n = min(end - out.sent, FRAME_PAYLOAD)
            out.image.hash(out.hasher, out.sent, n)
            self.conn.file_data_header(out.file_id, out.sent, n, time.monotonic())
            self._flush()
            view = out.image.mapped(out.sent, n)  # a reused image's lasting mapping (TLS reads it)
            try:
                self.link.send_file(out.image.fd, out.sent, n, view)
            finally:
                if view is not None:
                    view.release()
            out.sent += n
            self.bytes_sent += n
            self._drain()  # an ERROR (too large, bad digest) stops the sending at once
        if complete and out.sent == size and not out.ended:
            self.conn.file_end(out.file_id, out.sent, out.hasher.digest(), time.monotonic())
            self._flush()
            out.ended = True

    # ---- after CHECKPOINT_DONE: custody -----------------------------------------------------------
    def _delivered(self) -> None:
        self.store.delivered(self.checkpoint)
        elapsed = time.monotonic() - self.started
        log.info("checkpoint %s forwarded to %s: %d files, %d bytes in %.2f s (%.0f MB/s); verified by the cache",
                 self.checkpoint.id, self.peer_node, len(self.outgoing), self.bytes_sent, elapsed,
                 self.bytes_sent / max(elapsed, 1e-6) / 1e6, extra=self.fields | {"IMGMIG_BYTES": self.bytes_sent})

    def _hold(self) -> None:
        """Until the checkpoint is restored (on the cache, or here) or the daemon stops."""
        assert self.conn is not None
        while not self.stop.is_set():
            if self.conn.closed:
                raise LinkLost("the connection was closed")
            if self.checkpoint.holder == custody.source(self.node) and not self.conn.drop_sent:
                self.conn.drop(time.monotonic())
                self._flush()
            self._pump(LOOK_EVERY)
        raise Settled

    def _used_there(self) -> None:
        """The right was used on the cache: record it (a handoff --force there took it without
        this proxy), so that a rollback here is refused; one line if a rollback here used it too."""
        before = custody.used_at_peer(self.store, self.checkpoint, self.peer_name)
        if before == custody.source(self.node):
            log.error("checkpoint %s was restored on this node (a rollback) and on %s, whose cache took the right "
                      "to restore it with `imgmig handoff --force` while this node was unreachable: the process may "
                      "run on both nodes; stop one of them", self.checkpoint.id, self.peer_node, extra=self.fields)

    def _restored_there(self) -> None:
        self._used_there()
        if self.keep_restored_for <= 0:
            self._release("reported by the cache")
            raise Settled
        log.info("checkpoint %s was restored on %s (reported by the cache); this node keeps its copy %.0f s "
                 "(proxy.keep_restored_for): whether CRIU's restore there succeeded is not known here",
                 self.checkpoint.id, self.peer_node, self.keep_restored_for, extra=self.fields)
        raise Retained

    def _release(self, how: str) -> None:
        log.info("checkpoint %s was restored on %s (%s); releasing this node's copy",
                 self.checkpoint.id, self.peer_node, how, extra=self.fields)
        self.store.drop(self.checkpoint)

    # ---- reading and the events ---------------------------------------------------------------------
    def _wait_for(self, kind: type[conv.Event]) -> conv.Event:
        while True:
            if self.stop.is_set():
                raise Settled
            for event in self._pump(LOOK_EVERY):
                if isinstance(event, kind):
                    return event

    def _drain(self) -> None:
        """Read what the cache said without waiting (ACKs, CLAIM) while sending."""
        self._pump(0.0)

    def _pump(self, timeout: float) -> list[conv.Event]:
        """Wait up to timeout for bytes, feed them, act on every event; return them."""
        assert self.conn is not None and self.link is not None
        data = receive_within(self.link, timeout) if self.pump is None else self.pump.receive_within(self.link, timeout)
        self._tunnel_out()
        if data is None:
            self._tick()
        elif not data:
            raise LinkLost("the cache closed the connection")
        else:
            self.conn.receive_data(data, time.monotonic())
        events = []
        try:
            while (event := self.conn.next_event()) is not None:
                self._on_event(event)
                events.append(event)
        except wire.PeerProtocolError as exc:
            self.conn.refuse(exc.code, str(exc))
            self._flush()
            raise GiveUp(f"the cache broke the protocol: {exc}") from None
        self._flush()
        return events

    def _tick(self) -> None:
        assert self.conn is not None
        dead = self.conn.handle_timeout(time.monotonic())
        self._flush()
        if dead is not None:
            raise LinkLost(dead.reason)

    def _on_event(self, event: conv.Event) -> None:
        if isinstance(event, conv.Acked):
            out = self.outgoing[event.file_id]
            out.acked = max(out.acked, event.size)
        elif isinstance(event, conv.ClaimRequested):
            self._on_claim()
        elif isinstance(event, conv.RestoredReported):
            assert self.conn is not None
            self.restored_at_peer = True
            self.conn.confirm_restored(time.monotonic())
            self._flush()
            self._restored_there()
        elif isinstance(event, conv.RunningReported):
            self._running_there(event.pid)
        elif isinstance(event, conv.RightReturned):
            self._right_returned()
        elif isinstance(event, conv.Confirmed):
            log.info("checkpoint %s was restored on this node (rollback); %s told to drop its copy, and it did",
                     self.checkpoint.id, self.peer_node, extra=self.fields)
            raise Settled
        elif isinstance(event, conv.PeerError):
            self._on_peer_error(event)
        elif isinstance(event, conv.TUNNEL_FRAMES):
            if self.pump is None:
                self.pump = TunnelPump(tunnel_wire.Side.ACCEPTOR, connect=self._connect_page_server)
            self.pump.on_frame(event)
            self._tunnel_out()

    def _connect_page_server(self) -> socket.socket:
        """A lazy restore on the cache wants its pages: only for the node that holds the right
        to restore the checkpoint, and only once (the dump's page server serves one client)."""
        if self.checkpoint.holder != custody.destination(self.peer_name):
            raise NotLazy(f"{self.peer_node} does not hold the right to restore {self.checkpoint.id}")
        sock, self.page_server = self.page_server, None
        if sock is None:
            raise NotLazy(f"checkpoint {self.checkpoint.id} has no page server here (none was passed, or an "
                          f"earlier lazy restore used it)")
        log.info("checkpoint %s: %s fetches its lazy pages from the page server of its dump", self.checkpoint.id,
                 self.peer_node, extra=self.fields)
        return sock

    def _tunnel_out(self) -> None:
        assert self.conn is not None
        if self.pump is not None and not self.conn.closed:
            self.conn.send_tunnel(self.pump.outgoing(), time.monotonic())

    def _on_claim(self) -> None:
        assert self.conn is not None
        granted, holder = custody.grant_to_peer(self.store, self.checkpoint, self.peer_name)
        self.conn.grant(granted, holder, time.monotonic())
        if granted:
            self.returned_by_peer = False
            log.info("checkpoint %s: the right to restore it is granted to %s", self.checkpoint.id,
                     self.peer_node, extra=self.fields)
        else:
            log.warning("checkpoint %s: %s asked for the right to restore it; refused, it is held by %s",
                        self.checkpoint.id, self.peer_node, holder, extra=self.fields)

    def _running_there(self, pid: int) -> None:
        """The restore on the cache confirmed the process runs: nothing can need this copy."""
        assert self.conn is not None
        self._used_there()
        self.running_at_peer = f"{self.peer_name} as pid {pid}"
        log.info("checkpoint %s: running on %s as pid %d, confirmed by its restore; this node's copy released",
                 self.checkpoint.id, self.peer_node, pid, extra=self.fields)
        self.store.drop(self.checkpoint)
        self.conn.confirm_running(time.monotonic())
        self._flush()
        raise Settled

    def _right_returned(self) -> None:
        """The restore on the cache failed; both copies stay. A rollback here may take the
        right now, or a retry there may claim it again; the link stays for either."""
        assert self.conn is not None
        custody.taken_back(self.store, self.checkpoint, self.peer_name)
        self.returned_by_peer = True
        if LAZY_IMAGE in self.checkpoint.images:
            log.warning("the lazy restore on %s failed; checkpoint %s is dropped here too (its memory was never in "
                        "it): the process resumes on this node once its dump fails", self.peer_node,
                        self.checkpoint.id, extra=self.fields)
            self.store.drop(self.checkpoint)
            self.conn.confirm_return(time.monotonic())
            self._flush()
            raise Settled
        log.warning("the restore on %s failed; the right to restore %s is back on this node: roll it back here, "
                    "or retry the restore there", self.peer_node, self.checkpoint.id, extra=self.fields)
        self.conn.confirm_return(time.monotonic())
        self._flush()

    def _on_peer_error(self, event: conv.PeerError) -> None:
        if event.code == ErrorCode.INTERNAL:
            raise LinkLost(f"the cache reported: {event.message}")
        if event.code == ErrorCode.TOO_LARGE:
            log.error("checkpoint %s cannot be forwarded: %s (the cache); this node keeps it, "
                      "restore it here for a rollback", self.checkpoint.id, event.message, extra=self.fields)
            raise GiveUp(event.message, logged=True)
        raise GiveUp(f"the cache reported: {event.message}")

    def _flush(self) -> None:
        assert self.conn is not None and self.link is not None
        data = self.conn.data_to_send()
        if data:
            self.link.send(data)

    def _report_failure(self, reason: str) -> None:
        if self.taken_back and self.checkpoint.state is State.FAILED and not self.stop.is_set():
            log.warning("checkpoint %s: the cache at %s could not be told to drop what it holds of it (%s); it "
                        "drops it itself after cache.resume_for", self.checkpoint.id, self.peer, reason,
                        extra=self.fields)
        if self.stop.is_set() or self.checkpoint.state in (State.RESTORED, State.FAILED):
            return
        log.error("forwarding checkpoint %s to %s failed: %s; the checkpoint stays on this node "
                  "(restore it here from the proxy's images_dir for a rollback), check the cache "
                  "and its network, then dump again", self.checkpoint.id, self.peer_node, reason,
                  extra=self.fields)


def _describe_resume(answered: conv.BeginAnswered) -> str:
    if answered.status is BeginStatus.COMPLETE:
        return "the cache holds it complete"
    if answered.status is BeginStatus.RUNNING:
        return "a restore there confirmed the process runs while the link was down"
    if answered.status is BeginStatus.NEW:
        return "the cache had none of it: sending it again"
    held = sum(answered.held.values())
    return f"resuming after {answered.files} files ({len(answered.held)} open, {held} bytes held there)"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _small_whole(image: Image) -> bool:
    return image.complete and image.size <= SMALL_IMAGE


def _may_begin(checkpoint: Checkpoint, file_id: int) -> bool:
    """Whether the file may be begun now. A small image still being written waits until it
    is complete: it then goes whole, batched with the next ones (one frame each, no
    mapping), instead of as an open file with a header, a mapping and an end of its own.
    Files begin in order, so it waits only while the ones behind it are small and few: a
    large one (pages, written beside its pagemap) or a full batch begins it as it is."""
    listed = checkpoint.listed
    image = listed[file_id]
    if image.complete or image.size > SMALL_IMAGE or checkpoint.state is not State.RECEIVING:
        return True
    if len(listed) - file_id > SMALL_BATCH:
        return True
    return any(listed[later].size > SMALL_IMAGE for later in range(file_id + 1, len(listed)))
