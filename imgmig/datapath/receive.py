"""The cache's write side: the driver of one CacheConnection (protocol/conversation.py).

One proxy connection carries one checkpoint. FILE_DATA payloads go link -> memfd
(spliced on a plain link); each file's digest is computed from the memfd as it fills
and checked against FILE_END before the file may be served. This thread is the only
writer to its link: what other threads want said (a restore asking for the right to
restore, a bare restore that read everything, a restore confirmed running, a failed one
giving the right back) it finds in the store and says itself.

A cut link leaves an unfinished checkpoint in `Transfers`, with its file order and
digests so far, for `cache.resume_for` seconds: the proxy reconnects and continues
each file where this cache's memfd ends.

A small file whose frames came together (FILE_BEGIN, its bytes, FILE_END: how the proxy
sends them) enters the store once, complete and verified, instead of three times (begun,
grown, complete). It is held only while its frames are taken from bytes already read:
before the next read, a splice or a wait it enters the store as far as it came
(`_Held`), so a cut link or a resume finds what it would have found without.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from imgmig.config import DEFAULT_IDLE_TIMEOUT
from imgmig.datapath import custody
from imgmig.datapath.digest import LABELS, Digester, new_hasher, usable
from imgmig.datapath.kernel_io import UntilHangup, out_of_fds
from imgmig.datapath.link import Link
from imgmig.datapath.store import (
    REUSED_PREFIX,
    Checkpoint,
    Image,
    ImageStore,
    State,
    StoreError,
    TooManyFiles,
    new_memfd,
)
from imgmig.datapath.tunnel import LAZY_IMAGE, TunnelPump, Tunnels
from imgmig.protocol import conversation as conv
from imgmig.protocol import peer_wire as wire
from imgmig.protocol import tunnel_wire
from imgmig.protocol.peer_wire import BeginStatus, ErrorCode
from imgmig.system.systemd_glue import CHECKPOINT_COMPLETE_ID

log = logging.getLogger(__name__)

# Bytes spliced into a memfd are hashed and reported to the store in steps of at least
# this much (and at FILE_END): the socket hands over ~64 KiB per splice, and a mapping,
# a digest call and a store notification for each would cost more than the bytes.
HASH_STEP = 4 << 20
# A payload that has this much left is moved from the link into the memfd directly; less
# (a small file's, a large one's tail) comes with the next read, with the frames after it:
# one read for many small files, hashed from the bytes at hand instead of a mapping each.
DIRECT_MIN = 64 << 10
READ_SIZE = 64 << 10  # bytes asked of the link per read: a large file's bytes beyond it are spliced
# After a spliced payload the next frame is most likely the next FILE_DATA: a short read
# takes its header and leaves its payload in the socket for the splice, instead of copying
# up to 64 KiB of it through user space (decoder buffer, pwrite) per frame.
READ_AFTER_PAYLOAD = 4096
LOOK_EVERY = 0.05    # an idle link looks at the store this often (a restore may want the right)
TAKEOVER_WAIT = 5.0  # a resume waits this long for the cut connection's thread to let go
LINGER = 2.0         # after an ERROR, how long the proxy may take to read it and close
SETTLED_KEPT = 1024  # ids of restored/dropped checkpoints remembered, for a late resume


class Refused(Exception):
    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


class LinkLost(Exception):
    pass


@dataclass(eq=False)
class Inbound:
    """What the cache knows of one checkpoint's transfer, across connections."""
    checkpoint: Checkpoint
    order: wire.InboundCheckpoint
    digest: wire.Digest
    images: dict[int, Image] = field(default_factory=dict)
    hashers: dict[int, Digester] = field(default_factory=dict)
    attached: bool = False
    link: Link | None = None  # the attached connection's, for a resume to take over from
    taken_over: bool = False  # a resume from its proxy ended that connection
    force_told: bool = False  # the proxy acknowledged this node's `imgmig handoff --force` (a GRANT)


@dataclass(eq=False)
class _Held:
    """A small file begun, not yet in the store: its bytes so far and their digest."""
    file_id: int
    name: str
    hasher: Digester
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


class Transfers:
    """Every checkpoint a proxy is sending or holds here, by id (guarded by the store's lock)."""

    def __init__(self, store: ImageStore, resume_for: float) -> None:
        self.store = store
        self.resume_for = resume_for
        self.inbound: dict[str, Inbound] = {}
        self.settled: dict[str, tuple[BeginStatus, int]] = {}  # id -> (status, pid if RUNNING)
        threading.Thread(target=self._watch_taken_back, name="taken-back", daemon=True).start()

    def _watch_taken_back(self) -> None:
        """A checkpoint still arriving that came back from the fd store after a restart has
        no connection yet: it too fails if its proxy does not resume it within resume_for."""
        watched: set[str] = set()
        seen = -1

        def unwatched() -> list[Checkpoint]:
            return [c for c in self.store.checkpoints() if c.state is State.RECEIVING
                    and c.id not in self.inbound and c.id not in watched]

        while True:
            # only a checkpoint taken back (store.adopt) is one: they are looked for when
            # the checkpoints change, not on every byte and file that arrives
            self.store.wait_until(lambda seen=seen: self.store.membership != seen)
            seen = self.store.membership
            for checkpoint in unwatched():
                watched.add(checkpoint.id)
                threading.Thread(target=self._expire_taken_back, args=(checkpoint,), daemon=True,
                                 name=f"expire-{checkpoint.id}").start()

    def _expire_taken_back(self, checkpoint: Checkpoint) -> None:
        if self.store.wait_until(lambda: checkpoint.id in self.inbound or checkpoint.state is not State.RECEIVING,
                                 timeout=self.resume_for):
            return
        log.error("checkpoint %s from %s failed: its proxy did not come back within %.0f s (cache.resume_for) "
                  "to finish it after this cache restarted; it is dropped, dump again", checkpoint.id,
                  checkpoint.origin, self.resume_for, extra={"IMGMIG_CHECKPOINT": checkpoint.id})
        self.store.fail(checkpoint, "the proxy did not come back to resume it")
        self.settle(checkpoint.id, BeginStatus.GONE)

    def settle(self, checkpoint_id: str, status: BeginStatus, pid: int = 0) -> None:
        with self.store.cond:
            self.inbound.pop(checkpoint_id, None)
            self.settled[checkpoint_id] = (status, pid)
            while len(self.settled) > SETTLED_KEPT:
                del self.settled[next(iter(self.settled))]

    def expire_later(self, inbound: Inbound) -> None:
        """A cut transfer fails if its proxy does not come back within resume_for."""
        threading.Thread(target=self._expire, args=(inbound,), name=f"expire-{inbound.checkpoint.id}",
                         daemon=True).start()

    def _expire(self, inbound: Inbound) -> None:
        checkpoint = inbound.checkpoint
        if self.store.wait_until(lambda: inbound.attached or checkpoint.state is not State.RECEIVING,
                                 timeout=self.resume_for):
            return
        with self.store.cond:
            if inbound.attached or checkpoint.state is not State.RECEIVING:
                return
            self.inbound.pop(checkpoint.id, None)
        log.error("checkpoint %s from %s failed: its proxy did not come back within %.0f s (cache.resume_for) "
                  "to finish it; it is dropped, dump again", checkpoint.id, checkpoint.origin, self.resume_for,
                  extra={"IMGMIG_CHECKPOINT": checkpoint.id})
        self.store.fail(checkpoint, "the proxy did not come back to resume it")
        self.settle(checkpoint.id, BeginStatus.GONE)


class ReceiveSession:
    def __init__(self, link: Link, address: str, store: ImageStore, node: str,
                 stop: threading.Event, transfers: Transfers, *, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 on_hello: Callable[[], None] | None = None, tunnels: Tunnels | None = None) -> None:
        self.link = link  # from link.accept_link: its peer_node is the proxy's authenticated name
        self.greeted = False  # HELLO came: a deadline now is the idle one, not the handshake's
        self.sender = ""  # the node named in HELLO (with TLS: the certificate's)
        self.idle_timeout = idle_timeout
        self.on_hello = on_hello  # the connection is past its handshake (admission counts it so)
        self.address = address
        self.store = store
        self.node = node
        self.stop = stop
        self.transfers = transfers
        self.conn = conv.CacheConnection(node, time.monotonic())
        self.inbound: Inbound | None = None
        self.digest = wire.Digest.SHA256
        self.pending: dict[int, list[int]] = {}  # file_id -> [offset, length] stored, not yet hashed
        self.held: _Held | None = None  # a small file whose frames are being taken, not yet stored
        self.read_size = READ_SIZE
        self.running_pid = 0  # a resumed checkpoint confirmed running here while the link was down
        self.peer = address
        self.started = time.monotonic()
        self.tunnels = tunnels  # a lazy restore's page-server socket, offered through the control socket
        self.pump: TunnelPump | None = None

    @property
    def checkpoint(self) -> Checkpoint | None:
        return self.inbound.checkpoint if self.inbound is not None else None

    @property
    def fields(self) -> dict[str, object]:
        fields: dict[str, object] = {"IMGMIG_PEER": self.peer}
        if self.checkpoint is not None:
            fields["IMGMIG_CHECKPOINT"] = self.checkpoint.id
        return fields

    def run(self) -> None:
        try:
            self._loop()
        except wire.PeerProtocolError as exc:
            self._refuse(str(exc), exc.code)
        except Refused as exc:
            self._refuse(str(exc), exc.code)
        except (TimeoutError, BlockingIOError):  # a deadline: see Link.set_idle_timeout
            self._on_deadline()
        except OSError as exc:
            if out_of_fds(exc):
                self._refuse(f"out of file descriptors ({exc.strerror}); raise LimitNOFILE", ErrorCode.INTERNAL)
            else:
                self._link_lost(_describe(exc))
        except LinkLost as exc:
            self._link_lost(str(exc))
        finally:
            if self.pump is not None:
                self.pump.close("the link to the source ended")
            self._detach()
            self.link.close()

    # ---- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stop.is_set():
            if self.conn.closed:
                self._flush_out()
                return
            payload = self.conn.payload
            if payload is not None and payload[2] >= DIRECT_MIN:
                self._store_held()
                self._splice_payload(*payload)
                continue
            event = self.conn.next_event()
            if event is not None:
                self._on_event(event)
                continue
            self._store_held()
            self._look_at_store()
            self._flush_out()
            self._flush_when_idle()
            self._read()

    def _flush_when_idle(self) -> None:
        """Once every file is listed (FILES_LISTED), a restore may be reading an image as it
        arrives: bytes then count in the store as soon as the link has no more for now, not
        only every HASH_STEP (before, the smaller steps would cost mappings for nothing)."""
        if self.pending and self._inbound().checkpoint.listed_final and not _readable(self.link.fileno(), 0):
            for file_id in list(self.pending):
                self._flush(file_id)

    def _read(self) -> None:
        """Wait for bytes (or a timer, or the store's news) and feed them to the machine."""
        now = time.monotonic()
        deadline = self.conn.next_deadline()
        wait = LOOK_EVERY if deadline is None else max(0.0, min(deadline - now, LOOK_EVERY))
        if self._transferring:
            wait = max(0.0, min(wait, self.conn.last_heard + self.idle_timeout - now))
        if not self.greeted:
            self.link.wait_time()  # TimeoutError once the handshake deadline (TLS and HELLO) passed
        if self.pump is None:
            data = receive_within(self.link, wait, self.read_size)
        else:
            data = self.pump.receive_within(self.link, wait)
        self.read_size = READ_SIZE
        self._tunnel_out()
        if data is None:
            if self._transferring and time.monotonic() - self.conn.last_heard >= self.idle_timeout:
                raise BlockingIOError
            dead = self.conn.handle_timeout(time.monotonic())
            if dead is not None and self.inbound is None:
                raise Refused(dead.reason)
            if dead is not None:
                raise LinkLost(dead.reason)
            return
        if not data:
            self._on_eof()
            return
        self.conn.receive_data(data, time.monotonic())

    def _on_deadline(self) -> None:
        if self.greeted:
            self._refuse(f"nothing moved for {self.idle_timeout:g} s (cache.idle_timeout)", ErrorCode.REFUSED)
        else:
            self._refuse("no HELLO within link.handshake_timeout", ErrorCode.PROTOCOL)

    @property
    def _transferring(self) -> bool:
        """Between HELLO and CHECKPOINT_END a stalled link fails the checkpoint (cache.idle_timeout);
        afterwards it waits for the restore as long as that takes."""
        return self.conn.phase in (conv.Phase.BEGIN, conv.Phase.TRANSFER)

    def _flush_out(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.link.send(data)

    def _on_eof(self) -> None:
        if self.inbound is None and self.conn.decoder.buffered:
            log.error("connection from %s closed after %d bytes of an incomplete frame; nothing was received, "
                      "check what connects to this port", self.peer, self.conn.decoder.buffered, extra=self.fields)
        raise LinkLost("the proxy closed the connection")

    def _look_at_store(self) -> None:
        """Say what the store's other users want said: a restore wants the right, or read it all."""
        checkpoint = self.checkpoint
        if checkpoint is None or self.conn.closed:
            return
        now = time.monotonic()
        if checkpoint.grant_wanted and not checkpoint.holder and not self.conn.claim_sent \
                and self.conn.phase in (conv.Phase.TRANSFER, conv.Phase.ENDED, conv.Phase.HOLDING):
            self.conn.claim(now)
        settling = self.conn.restored_sent or self.conn.running_sent or self.conn.return_sent
        if checkpoint.forced and not self._inbound().force_told and checkpoint.state is State.COMPLETE \
                and self.conn.phase is conv.Phase.HOLDING and not self.conn.claim_sent and not settling:
            self.conn.claim(now)  # fencing: the proxy must learn who holds the right before it rolls back
        if checkpoint.state is State.RESTORED and self.conn.phase is conv.Phase.HOLDING and not settling:
            if checkpoint.running_pid:
                self.conn.running(checkpoint.running_pid, now)
            else:
                self.conn.restored(now)
        elif self.conn.phase is conv.Phase.HOLDING and not settling and custody.take_return(self.store, checkpoint):
            if LAZY_IMAGE in checkpoint.images:
                self._give_back_lazy(checkpoint, now)
            else:
                log.warning("checkpoint %s: the restore here failed; the right to restore it is returned to %s, "
                            "which may roll it back; this copy stays for a retry (`imgmig restore --id %s`) "
                            "until the source rolls back", checkpoint.id, self.peer, checkpoint.id, extra=self.fields)
                self.conn.give_back(now)
        if self.tunnels is not None and self.conn.phase is conv.Phase.HOLDING:
            self._attach_tunnel(checkpoint)

    def _attach_tunnel(self, checkpoint: Checkpoint) -> None:
        """A lazy restore here offered its page-server socket: carry it to the source."""
        assert self.tunnels is not None
        offer = self.tunnels.take(checkpoint.id)
        if offer is None:
            return
        if self.pump is None:
            self.pump = TunnelPump(tunnel_wire.Side.OPENER)
        channel = self.pump.attach(offer)
        log.info("checkpoint %s: lazy restore's page traffic tunnelled to %s (channel %d)", checkpoint.id,
                 self.peer, channel, extra=self.fields)
        self._tunnel_out()

    def _tunnel_out(self) -> None:
        if self.pump is not None and not self.conn.closed:
            self.conn.send_tunnel(self.pump.outgoing(), time.monotonic())

    def _give_back_lazy(self, checkpoint: Checkpoint, now: float) -> None:
        """A lazy restore here failed: unlike a full copy, this one cannot be retried (its
        page server on the source is gone), so it goes first, then the right goes back."""
        log.warning("checkpoint %s: the lazy restore here failed; the right to restore it is returned to %s, "
                    "where the process resumes, and this copy is dropped", checkpoint.id, self.peer,
                    extra=self.fields)
        self.store.fail(checkpoint, "its lazy restore here failed; the right to restore it went back to its source")
        self.transfers.settle(checkpoint.id, BeginStatus.GONE)
        self.conn.give_back(now)

    # ---- events --------------------------------------------------------------------------
    def _on_event(self, event: conv.Event) -> None:
        now = time.monotonic()
        if self.held is not None and not self._holds(event):
            self._store_held()
        if isinstance(event, conv.HelloReceived):
            self._on_hello(event.hello, now)
        elif isinstance(event, conv.BeginRequested):
            self._on_begin(event, now)
        elif isinstance(event, conv.PrepareRequested):
            self._on_prepare(event.size)
        elif isinstance(event, conv.FileBegun):
            self._on_file_begin(event)
        elif isinstance(event, conv.DataReceived):
            self._write_buffered(event)
        elif isinstance(event, conv.FileEnded):
            self._on_file_end(event)
        elif isinstance(event, conv.FilesListed):
            self.store.files_listed(self._inbound().checkpoint)
        elif isinstance(event, conv.CheckpointEnded):
            self._on_checkpoint_end(event)
        elif isinstance(event, conv.GrantAnswered):
            self._on_grant(event)
        elif isinstance(event, conv.DropRequested):
            self._on_drop()
        elif isinstance(event, conv.Confirmed):
            self._on_confirmed(event)
        elif isinstance(event, conv.PeerError):
            raise LinkLost(f"the proxy reported error {event.code}: {event.message}")
        elif isinstance(event, conv.TUNNEL_FRAMES):
            if self.pump is None:
                raise wire.PeerProtocolError(f"{type(event).__name__} on a link that carries no tunnel")
            self.pump.on_frame(event)
            self._tunnel_out()

    def _on_hello(self, hello: wire.Hello, now: float) -> None:
        authenticated = self.link.peer_node
        if authenticated is not None and hello.auth is not wire.Auth.TLS:
            raise Refused(f"HELLO offers auth method {hello.auth.value} on a TLS link; this cache takes only "
                          f"{wire.Auth.TLS.value} (TLS), no downgrade", ErrorCode.REFUSED)
        if authenticated is not None and hello.node != authenticated:
            raise Refused(f"HELLO says node {hello.node!r} but its certificate names {authenticated!r}",
                          ErrorCode.REFUSED)
        self.peer = f"{hello.node} ({self.address})"
        self.sender = hello.node
        self.digest = usable(hello.digest)
        self.conn.accept_hello(self.digest, self.store.limit, max(0, self.store.room()), now)
        self.link.settimeout(None)
        self.link.set_idle_timeout(self.idle_timeout)
        self.greeted = True
        if self.on_hello is not None:
            self.on_hello()

    def _on_prepare(self, size: int) -> None:
        """Memory for the pages of a checkpoint the proxy is about to send, made ready before
        its process is frozen (ImageStore.prepare: within memory.reuse and the room here)."""
        started = time.monotonic()
        ready = self.store.prepare(size)
        log.info("%s of memory ready for a coming checkpoint of about %s from %s (%.2f s)", _mib(ready),
                 _mib(size), self.peer, time.monotonic() - started, extra=self.fields)
        self.conn.prepared(ready, time.monotonic())

    def _on_begin(self, event: conv.BeginRequested, now: float) -> None:
        if not event.checkpoint.startswith(f"{self.sender}-"):
            # ids are bound to the sender's (authenticated) node: none can take or block another's
            raise Refused(f"checkpoint id {event.checkpoint!r} does not start with the sender's node name "
                          f"{self.sender!r}-", ErrorCode.REFUSED)
        if event.resume:
            status, inbound = self._resume(event.checkpoint)
        else:
            status, inbound = BeginStatus.NEW, self._new(event.checkpoint)
        self.inbound = inbound
        self.conn.begun(status, inbound.order if status is BeginStatus.RESUMED else None, now)
        if status is BeginStatus.RUNNING:  # confirmed while the link was down: say it now
            self.conn.running(self.running_pid, now)
        if status is BeginStatus.NEW and inbound is not None:
            inbound.order = self.conn.order
        verb = {BeginStatus.NEW: "begins", BeginStatus.RESUMED: "resumes",
                BeginStatus.COMPLETE: "is complete here; link back"}.get(status)
        if verb is not None:
            log.info("checkpoint %s %s from %s", event.checkpoint, verb, self.peer, extra=self.fields)
        else:
            already = {BeginStatus.RESTORED: "restored", BeginStatus.RUNNING: f"running as pid {self.running_pid}"}
            log.info("checkpoint %s from %s: already %s here, nothing to resume", event.checkpoint, self.peer,
                     already.get(status, "dropped"), extra=self.fields)

    def _new(self, checkpoint_id: str) -> Inbound:
        with self.store.cond:  # begun and registered at once: no waiter sees one without the other
            try:
                checkpoint = self.store.begin(checkpoint_id, self.peer)
            except StoreError as exc:
                raise Refused(str(exc)) from None
            inbound = Inbound(checkpoint, wire.InboundCheckpoint(), self.digest, attached=True, link=self.link)
            self.transfers.inbound[checkpoint_id] = inbound
        self.started = time.monotonic()
        return inbound

    def _resume(self, checkpoint_id: str) -> tuple[BeginStatus, Inbound | None]:
        transfers = self.transfers
        with self.store.cond:
            inbound = transfers.inbound.get(checkpoint_id)
            if inbound is not None and inbound.checkpoint.state is State.RESTORED:  # told the proxy nothing yet
                checkpoint = inbound.checkpoint
                transfers.settle(checkpoint_id, BeginStatus.RUNNING if checkpoint.running_pid
                                 else BeginStatus.RESTORED, checkpoint.running_pid)
                if checkpoint.forced:
                    self._fenced_source_is_back(checkpoint_id)
            settled = transfers.settled.get(checkpoint_id)
            if settled is not None:
                status, self.running_pid = settled
                return status, None
        inbound = inbound or self._adopted(checkpoint_id)
        if inbound is None:
            return BeginStatus.NEW, self._new(checkpoint_id)
        self._take_over(inbound)
        if not self.store.wait_until(lambda: not inbound.attached, self.stop, TAKEOVER_WAIT):
            raise Refused(f"checkpoint {checkpoint_id} is still attached to its previous connection; "
                          f"the proxy retries", ErrorCode.INTERNAL)
        if inbound.digest is not self.digest:
            raise Refused(f"checkpoint {checkpoint_id} was begun with another digest", ErrorCode.PROTOCOL)
        with self.store.cond:
            inbound.attached, inbound.link, inbound.taken_over = True, self.link, False
            state = inbound.checkpoint.state
        self.started = time.monotonic()
        if state is State.RECEIVING:
            return BeginStatus.RESUMED, inbound
        if state is State.COMPLETE:
            return BeginStatus.COMPLETE, inbound
        return (BeginStatus.RESTORED if state is State.RESTORED else BeginStatus.GONE), None

    def _take_over(self, inbound: Inbound) -> None:
        """End the connection the checkpoint is still attached to. Its proxy, the only sender,
        has left it: after a cut whose reset never arrived it is half-open, and keepalive would
        take dead_peer_timeout to tell, with every resume refused meanwhile."""
        with self.store.cond:  # before that connection's _detach, so before it closes its socket
            if inbound.attached and inbound.link is not None:
                inbound.taken_over = True
                inbound.link.shutdown(socket.SHUT_RDWR)  # wakes its thread, even mid-payload

    def _adopted(self, checkpoint_id: str) -> Inbound | None:
        """A checkpoint this cache took back from the fd store after a restart: complete, or
        still arriving (its files continue where their memfds end; their digests so far are
        taken again from the memfds)."""
        checkpoint = self.store.get(checkpoint_id)
        if checkpoint is None or checkpoint.state not in (State.COMPLETE, State.RECEIVING):
            return None
        images = list(checkpoint.images.values())
        order = wire.InboundCheckpoint.taken_back(checkpoint_id, [(i.name, i.size, i.complete) for i in images])
        inbound = Inbound(checkpoint, order, self.digest, dict(enumerate(images)))
        for file_id, image in inbound.images.items():
            if not image.complete:
                inbound.hashers[file_id] = new_hasher(self.digest)
                image.hash(inbound.hashers[file_id], 0, image.size)
        with self.store.cond:
            self.transfers.inbound.setdefault(checkpoint_id, inbound)
        return inbound

    def _holds(self, event: conv.Event) -> bool:
        """The event continues the held file: its next bytes (still small) or its end."""
        held = self.held
        assert held is not None
        if isinstance(event, conv.FileEnded):
            return event.file_id == held.file_id
        return isinstance(event, conv.DataReceived) and event.file_id == held.file_id \
            and event.offset == held.size and held.size + len(event.data) <= DIRECT_MIN

    def _store_held(self) -> None:
        """The held file goes into the store as far as it came, and on as any file."""
        held, self.held = self.held, None
        if held is None:
            return
        inbound = self._inbound()
        image = self._add_held(held, complete=False)
        inbound.images[held.file_id] = image
        inbound.hashers[held.file_id] = held.hasher
        if held.size:
            self.conn.stored(held.file_id, held.size, held.size, time.monotonic())

    def _add_held(self, held: _Held, complete: bool, digest: bytes | None = None) -> Image:
        """One memfd, one write, one change of the store (sealed if complete)."""
        checkpoint = self._inbound().checkpoint
        fd = new_memfd(held.name)
        try:
            data = b"".join(held.chunks)
            written = 0
            while written < len(data):
                written += os.pwrite(fd, data[written:], written)
            image = self.store.add_arrived(checkpoint, held.name, fd, held.size, complete, digest)
        except TooManyFiles as exc:
            os.close(fd)
            raise Refused(str(exc), ErrorCode.REFUSED) from None
        except BaseException:
            os.close(fd)
            raise
        if checkpoint.charged > self.store.limit:
            self._too_large(checkpoint)
        return image

    def _on_file_begin(self, event: conv.FileBegun) -> None:
        if not event.name.startswith(REUSED_PREFIX):
            self._wait_for_room()
            self.held = _Held(event.file_id, event.name, new_hasher(self.digest))
            return
        inbound = self._inbound()  # a page image: large, and it may get a kept memfd (MemfdPool)
        try:
            inbound.images[event.file_id] = self.store.add_image(inbound.checkpoint, event.name)
        except TooManyFiles as exc:
            raise Refused(str(exc), ErrorCode.REFUSED) from None
        inbound.hashers[event.file_id] = new_hasher(self.digest)

    def _splice_payload(self, file_id: int, offset: int, left: int) -> None:
        self._wait_for_room()
        image = self._inbound().images[file_id]
        window = image.window(offset, left)
        if window is None:
            moved = self.link.recv_into_file(image.fd, offset, left)
        else:
            with window:
                moved = self.link.recv_into(window)
        self.read_size = READ_AFTER_PAYLOAD
        if not moved:
            self._on_eof()
        self.conn.consume_payload(moved, time.monotonic())
        self._stored(file_id, image, offset, moved)

    def _write_buffered(self, event: conv.DataReceived) -> None:
        held = self.held
        if held is not None:  # _on_event made sure it continues the held file
            held.chunks.append(event.data)
            held.hasher.update(event.data)
            held.size += len(event.data)
            return
        self._wait_for_room()
        inbound = self._inbound()
        image = inbound.images[event.file_id]
        written = 0
        while written < len(event.data):
            written += os.pwrite(image.fd, event.data[written:], event.offset + written)
        if event.file_id in self.pending:  # joins the range hashed from the memfd
            self._stored(event.file_id, image, event.offset, len(event.data))
        else:  # the bytes are at hand (small files): no mapping needed
            inbound.hashers[event.file_id].update(event.data)
            self._account(event.file_id, image, len(event.data))

    def _stored(self, file_id: int, image: Image, offset: int, n: int) -> None:
        pending = self.pending.get(file_id)
        if pending is not None and pending[0] + pending[1] != offset:
            self._flush(file_id)
            pending = None
        if pending is None:
            pending = self.pending[file_id] = [offset, 0]
        pending[1] += n
        if pending[1] >= HASH_STEP:
            self._flush(file_id)

    def _flush(self, file_id: int) -> None:
        """Hash and account the bytes of file_id stored since the last flush."""
        pending = self.pending.pop(file_id, None)
        if pending is None:
            return
        inbound = self._inbound()
        image = inbound.images[file_id]
        image.hash(inbound.hashers[file_id], pending[0], pending[1])
        self._account(file_id, image, pending[1])

    def _account(self, file_id: int, image: Image, n: int) -> None:
        checkpoint = self._inbound().checkpoint
        self.store.grew(checkpoint, image, n)
        if checkpoint.charged > self.store.limit:
            self._too_large(checkpoint)
        self.conn.stored(file_id, image.size, n, time.monotonic())

    def _too_large(self, checkpoint: Checkpoint) -> None:
        raise Refused(f"checkpoint {checkpoint.id} has grown to {_mib(checkpoint.size)}, over this cache's "
                      f"memory.limit of {_mib(self.store.limit)}; it cannot fit here (raise memory.limit)",
                      ErrorCode.TOO_LARGE)

    def _wait_for_room(self) -> None:
        checkpoint = self._inbound().checkpoint
        if self.store.room() > 0:
            return
        if checkpoint.charged >= self.store.limit:
            self._too_large(checkpoint)
        proxy_gone = UntilHangup(self.stop, self.link.fileno())
        if not proxy_gone.is_set():
            self.store.wait_for_room(proxy_gone, f"receiving from {self.peer}")

    def _on_file_end(self, event: conv.FileEnded) -> None:
        held, self.held = self.held, None
        inbound = self._inbound()
        if held is not None:  # _on_event made sure it is this file
            digest = held.hasher.digest()
            self._check_digest(held.name, digest, event.digest)
            image = inbound.images[event.file_id] = self._add_held(held, True, digest)
        else:
            self._flush(event.file_id)
            image = inbound.images[event.file_id]
            digest = inbound.hashers.pop(event.file_id).digest()
            self._check_digest(image.name, digest, event.digest)
            self.store.finish_image(image, digest, inbound.checkpoint)
        self.conn.file_verified(event.file_id, image.size, time.monotonic())

    def _check_digest(self, name: str, digest: bytes, sent: bytes) -> None:
        if not hmac.compare_digest(digest, sent):
            raise Refused(f"{name}: {LABELS[self.digest]} digest mismatch (got {digest.hex()[:16]}..., "
                          f"the proxy sent {sent.hex()[:16]}...)", ErrorCode.DIGEST_MISMATCH)

    def _on_checkpoint_end(self, event: conv.CheckpointEnded) -> None:
        checkpoint = self._inbound().checkpoint
        now = time.monotonic()
        self.link.set_idle_timeout(0)  # the link now waits for a restore, which may take its time
        if not event.clean:
            self._fail("the proxy reports the dump did not finish (CRIU failed or died)")
            self.conn.done(False, "dump did not finish; checkpoint dropped", now)
            return
        self.store.complete(checkpoint, clean=True)
        elapsed = now - self.started
        size = checkpoint.size
        log.info("checkpoint %s complete from %s: %d files, %d bytes in %.2f s (%.0f MB/s), %s digests verified",
                 checkpoint.id, self.peer, len(checkpoint.images), size, elapsed,
                 size / max(elapsed, 1e-6) / 1e6, LABELS[self.digest],
                 extra=self.fields | {"IMGMIG_BYTES": size, "MESSAGE_ID": CHECKPOINT_COMPLETE_ID})
        self.conn.done(True, f"{len(checkpoint.images)} files verified", now)

    def _on_grant(self, event: conv.GrantAnswered) -> None:
        checkpoint = self._inbound().checkpoint
        if checkpoint.forced:
            self._fencing_answered(checkpoint, event)
            return
        custody.answer_claim(self.store, checkpoint, event.granted, event.holder)
        if event.granted:
            log.info("checkpoint %s: %s granted this node the right to restore it", checkpoint.id, self.peer,
                     extra=self.fields)

    def _fencing_answered(self, checkpoint: Checkpoint, event: conv.GrantAnswered) -> None:
        """The source came back while this node held the right by `imgmig handoff --force`."""
        inbound = self._inbound()
        if event.granted and not inbound.force_told:
            inbound.force_told = True
            log.warning("checkpoint %s: its source %s is back and now records that this node holds the right to "
                        "restore it (taken with imgmig handoff --force): a rollback there is refused",
                        checkpoint.id, self.peer, extra=self.fields)
        elif not event.granted:
            log.error("checkpoint %s: fencing failed: its source %s is back and had restored it itself (%s) after "
                      "this node took the right with imgmig handoff --force; it is no longer restored here, and if "
                      "it already was, the process runs on both nodes: stop one", checkpoint.id, self.peer,
                      event.holder, extra=self.fields)
            custody.answer_claim(self.store, checkpoint, False, event.holder)

    def _on_drop(self) -> None:
        """The source node restored this checkpoint itself (a rollback): restoring it here
        too would run the process twice, so this copy goes, even from a restore under way."""
        checkpoint = self._inbound().checkpoint
        log.warning("checkpoint %s was restored on its source %s (a rollback); this copy is dropped so "
                    "that the process cannot run twice", checkpoint.id, self.peer, extra=self.fields)
        assert self.conn.peer is not None
        with self.store.cond:  # a restore waiting here is refused, not sent on to the next checkpoint
            checkpoint.refused_by = custody.source(self.conn.peer.node)
        self.store.fail(checkpoint, "restored on the source node (rollback)")
        self.transfers.settle(checkpoint.id, BeginStatus.GONE)
        self.conn.confirm_drop(time.monotonic())

    def _fenced_source_is_back(self, checkpoint_id: str) -> None:
        log.warning("checkpoint %s: its source %s is back and is told that this node holds the right to "
                    "restore it (taken with imgmig handoff --force) and restored it: a rollback there is "
                    "refused", checkpoint_id, self.peer, extra={"IMGMIG_CHECKPOINT": checkpoint_id})

    def _on_confirmed(self, event: conv.Confirmed) -> None:
        inbound = self.inbound
        if event.kind in (wire.FrameType.RESTORED, wire.FrameType.RUNNING) and inbound is not None \
                and inbound.checkpoint.forced and not inbound.force_told:
            # the restore here came before the fencing question was put: the source, back on
            # its old link, confirms the restore instead of answering that question
            inbound.force_told = True
            self._fenced_source_is_back(inbound.checkpoint.id)
        if event.kind is wire.FrameType.RESTORED:
            self.transfers.settle(self._inbound().checkpoint.id, BeginStatus.RESTORED)
        elif event.kind is wire.FrameType.RUNNING:
            checkpoint = self.checkpoint
            pid = checkpoint.running_pid if checkpoint is not None else self.running_pid
            self.transfers.settle(self.conn.checkpoint, BeginStatus.RUNNING, pid)

    # ---- endings ---------------------------------------------------------------------------
    def _inbound(self) -> Inbound:
        assert self.inbound is not None
        return self.inbound

    def _detach(self) -> None:
        """Leave the transfer for the next connection: everything stored is hashed and counted."""
        inbound = self.inbound
        if inbound is None:
            return
        if inbound.checkpoint.state is State.RECEIVING:
            self._store_held()
            for file_id in list(self.pending):
                self._flush(file_id)
        with self.store.cond:
            was_attached, inbound.attached, inbound.link = inbound.attached, False, None
            self.store.changed()
        if was_attached and inbound.checkpoint.state is State.RECEIVING:
            self.transfers.expire_later(inbound)

    def _link_lost(self, reason: str) -> None:
        checkpoint = self.checkpoint
        if self.stop.is_set() or checkpoint is None:
            return
        if self._inbound().taken_over:
            reason = "a new connection from the proxy resumes it"
        if checkpoint.state is State.RECEIVING:
            log.warning("link from %s lost mid-checkpoint %s (%s); it is kept %.0f s for the proxy to resume",
                        self.peer, checkpoint.id, reason, self.transfers.resume_for, extra=self.fields)
        elif checkpoint.state is State.COMPLETE:
            log.info("link from %s closed (%s); checkpoint %s stays here, complete", self.peer, reason,
                     checkpoint.id, extra=self.fields)

    def _refuse(self, reason: str, code: ErrorCode) -> None:
        dropped = ""
        checkpoint = self.checkpoint
        if checkpoint is not None and checkpoint.state is State.RECEIVING:
            self._fail(reason, log_it=False)  # one log line for both: the refusal says it
            dropped = f"; checkpoint {checkpoint.id} is dropped, dump it again"
        log.error("connection from %s refused: %s%s", self.peer, reason, dropped, extra=self.fields)
        self.conn.refuse(code, reason)
        with contextlib.suppress(OSError):
            self._flush_out()
            self._linger()

    def _linger(self) -> None:
        """Let the proxy read the ERROR: closing with its frames unread would reset the
        connection, and it would see a reset instead of the reason."""
        self.link.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER
        while time.monotonic() < deadline:
            if receive_within(self.link, deadline - time.monotonic()) == b"":
                return

    def _fail(self, reason: str, log_it: bool = True) -> None:
        checkpoint = self._inbound().checkpoint
        if checkpoint.state is not State.RECEIVING:
            return
        if log_it:
            log.error("checkpoint %s from %s failed: %s; it is dropped, dump again",
                      checkpoint.id, self.peer, reason, extra=self.fields)
        self.store.fail(checkpoint, reason)
        self.transfers.settle(checkpoint.id, BeginStatus.GONE)


def _readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLRDHUP)
    return bool(poller.poll(int(timeout * 1000)))


def receive_within(link: Link, timeout: float, size: int = READ_SIZE) -> bytes | None:
    """Up to `size` bytes of what the link has, waiting up to timeout: None if nothing came,
    b"" at end of stream. The link is asked first: a TLS link may hold decrypted bytes that
    never wake a poll()."""
    data = link.recv_nowait(size)
    if data is None and _readable(link.fileno(), timeout):
        data = link.recv_nowait(size)
    return data


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
