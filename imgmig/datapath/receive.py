"""The cache's write side: one proxy connection delivers one checkpoint.

FILE_DATA payloads go link -> memfd (spliced on a plain link); each file's digest is
computed from the memfd as it fills and checked against FILE_END before the file
may be served.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable

from imgmig.config import DEFAULT_IDLE_TIMEOUT
from imgmig.datapath.digest import LABELS, Digester, new_hasher, usable
from imgmig.datapath.kernel_io import UntilHangup, hash_region, out_of_fds
from imgmig.datapath.link import Link
from imgmig.datapath.store import Checkpoint, Image, ImageStore, State, StoreError, TooManyFiles
from imgmig.protocol import peer_wire as wire
from imgmig.system.systemd_glue import CHECKPOINT_COMPLETE_ID

log = logging.getLogger(__name__)

ACK_EVERY = 16 << 20
# Bytes spliced into a memfd are hashed and reported to the store in steps of at least
# this much (and at FILE_END): the socket hands over ~64 KiB per splice, and a mapping,
# a digest call and a store notification for each would cost more than the bytes.
HASH_STEP = 4 << 20


class Refused(Exception):
    def __init__(self, message: str, code: wire.ErrorCode = wire.ErrorCode.PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


class ReceiveSession:
    def __init__(self, link: Link, address: str, store: ImageStore, node: str,
                 stop: threading.Event, *, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 on_hello: Callable[[], None] | None = None) -> None:
        self.link = link  # from link.accept_link: its peer_node is the proxy's authenticated name
        self.idle_timeout = idle_timeout
        self.on_hello = on_hello  # the connection is past its handshake (admission counts it so)
        self.greeted = False  # HELLO came: a deadline now is the idle one, not the handshake's
        self.address = address
        self.store = store
        self.node = node
        self.stop = stop
        self.decoder = wire.FrameDecoder()
        self.order = wire.InboundCheckpoint()
        self.checkpoint: Checkpoint | None = None
        self.images: dict[int, Image] = {}
        self.hashers: dict[int, Digester] = {}
        self.digest = wire.Digest.SHA256
        self.unacked: dict[int, int] = {}
        self.pending: dict[int, list[int]] = {}  # file_id -> [offset, length] stored, not yet hashed
        self.send_lock = threading.Lock()
        self.outbox: list[bytes] = []  # queued ACK frames (guarded by send_lock)
        self.done_sent = False  # CHECKPOINT_DONE went out (guarded by send_lock)
        self.restored_early = False  # restored before CHECKPOINT_DONE went out
        self.peer = address
        self.sender = ""  # the node named in HELLO (with TLS: the certificate's)
        self.started = time.monotonic()

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
                self._refuse(f"out of file descriptors ({exc.strerror}); raise LimitNOFILE", wire.ErrorCode.INTERNAL)
            else:
                self._fail_checkpoint(f"connection error: {exc.strerror or exc}")
        finally:
            self.store.off_event(self._notify_restored)
            self.link.close()

    def _loop(self) -> None:
        while not self.stop.is_set():
            payload = self.decoder.payload
            if payload is not None:
                if not self._splice_payload(*payload):
                    return
                continue
            event = self.decoder.next_event()
            if event is not None:
                self._on_event(event)
                continue
            self._send_queued()
            data = self.link.recv(65536)
            if not data:
                self._on_eof()
                return
            self.decoder.feed(data)

    def _on_eof(self) -> None:
        if self.checkpoint is None and self.decoder.buffered:
            log.error("connection from %s closed after %d bytes of an incomplete frame; nothing was received, "
                      "check what connects to this port", self.peer, self.decoder.buffered, extra=self.fields)
        if self.checkpoint is None or self.checkpoint.state is State.RECEIVING:
            self._fail_checkpoint("the proxy closed the connection mid-checkpoint")

    def _on_event(self, event: wire.Event) -> None:
        self.order.check(event)
        if isinstance(event, wire.Hello):
            self._on_hello(event)
        elif isinstance(event, wire.CheckpointBegin):
            self._on_begin(event)
        elif isinstance(event, wire.FileBegin):
            self._on_file_begin(event)
        elif isinstance(event, wire.FileData):
            self._write_buffered(event)
        elif isinstance(event, wire.FileEnd):
            self._on_file_end(event)
        elif isinstance(event, wire.CheckpointEnd):
            self._on_checkpoint_end(event)
        elif isinstance(event, wire.Drop):
            self._on_drop()
        elif isinstance(event, wire.Error):
            raise Refused(f"the proxy reported error {event.code}: {event.message}")

    def _on_drop(self) -> None:
        """The source node restored this checkpoint itself (a rollback): restoring it here
        too would run the process twice, so this copy goes, even from a restore under way."""
        assert self.checkpoint is not None
        log.warning("checkpoint %s was restored on its source %s (a rollback); this copy is dropped so "
                    "that the process cannot run twice", self.checkpoint.id, self.peer, extra=self.fields)
        self.store.fail(self.checkpoint, "restored on the source node (rollback)")

    def _on_hello(self, hello: wire.Hello) -> None:
        authenticated = self.link.peer_node
        if authenticated is not None and hello.auth is not wire.Auth.TLS:
            raise Refused(f"HELLO offers auth method {hello.auth.value} on a TLS link; this cache takes only "
                          f"{wire.Auth.TLS.value} (TLS), no downgrade", wire.ErrorCode.REFUSED)
        if authenticated is not None and hello.node != authenticated:
            raise Refused(f"HELLO says node {hello.node!r} but its certificate names {authenticated!r}",
                          wire.ErrorCode.REFUSED)
        self.peer = f"{hello.node} ({self.address})"
        self.sender = hello.node
        self.digest = usable(hello.digest)
        self._send(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.CACHE, self.node, self.digest)))
        self.link.settimeout(None)
        self.link.set_idle_timeout(self.idle_timeout)
        self.greeted = True
        if self.on_hello is not None:
            self.on_hello()

    def _on_deadline(self) -> None:
        if self.greeted:
            self._refuse(f"nothing moved for {self.idle_timeout:g} s (cache.idle_timeout)", wire.ErrorCode.REFUSED)
        else:
            self._refuse("no HELLO within link.handshake_timeout", wire.ErrorCode.PROTOCOL)

    def _on_begin(self, begin: wire.CheckpointBegin) -> None:
        if begin.resume:
            raise Refused("resuming a checkpoint is not supported by this cache yet; send it again")
        if not begin.checkpoint.startswith(f"{self.sender}-"):
            # ids are bound to the sender's (authenticated) node: none can take or block another's
            raise Refused(f"checkpoint id {begin.checkpoint!r} does not start with the sender's node name "
                          f"{self.sender!r}-", wire.ErrorCode.REFUSED)
        try:
            self.checkpoint = self.store.begin(begin.checkpoint, self.peer)
        except StoreError as exc:
            raise Refused(str(exc)) from None
        self.started = time.monotonic()
        log.info("checkpoint %s begins from %s", begin.checkpoint, self.peer, extra=self.fields)

    def _on_file_begin(self, event: wire.FileBegin) -> None:
        assert self.checkpoint is not None
        try:
            self.images[event.file_id] = self.store.add_image(self.checkpoint, event.name)
        except TooManyFiles as exc:
            raise Refused(str(exc), wire.ErrorCode.REFUSED) from None
        self.hashers[event.file_id] = new_hasher(self.digest)
        self.unacked[event.file_id] = 0

    def _splice_payload(self, file_id: int, offset: int, left: int) -> bool:
        self.order.check_payload(file_id, offset, 0)
        self._wait_for_room()
        image = self.images[file_id]
        moved = self.link.recv_into_file(image.fd, offset, left)
        if not moved:
            self._on_eof()
            return False
        self.order.check_payload(file_id, offset, moved)
        self.decoder.consume_payload(moved)
        self._stored(file_id, image, offset, moved)
        return True

    def _write_buffered(self, event: wire.FileData) -> None:
        self._wait_for_room()
        image = self.images[event.file_id]
        written = 0
        while written < len(event.data):
            written += os.pwrite(image.fd, event.data[written:], event.offset + written)
        if event.file_id in self.pending:  # joins the range hashed from the memfd
            self._stored(event.file_id, image, event.offset, len(event.data))
        else:  # the bytes are at hand (small files): no mapping needed
            self.hashers[event.file_id].update(event.data)
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
        image = self.images[file_id]
        hash_region(self.hashers[file_id], image.fd, pending[0], pending[1])
        self._account(file_id, image, pending[1])

    def _account(self, file_id: int, image: Image, n: int) -> None:
        assert self.checkpoint is not None
        self.store.grew(self.checkpoint, image, n)
        self.unacked[file_id] += n
        if self.unacked[file_id] >= ACK_EVERY:
            self._ack(file_id)

    def _ack(self, file_id: int) -> None:
        """Queued, sent before the next wait for data (or with the next frame): with many
        small files, one send carries the ACKs of every file one recv() brought."""
        self.unacked[file_id] = 0
        with self.send_lock:
            self.outbox.append(wire.encode_ack(file_id, self.images[file_id].size))

    def _send_queued(self) -> None:
        if self.outbox:
            self._send(b"")

    def _wait_for_room(self) -> None:
        proxy_gone = UntilHangup(self.stop, self.link.fileno())
        if self.store.room() <= 0 and not proxy_gone.is_set():
            self.store.wait_for_room(proxy_gone, f"receiving from {self.peer}")

    def _on_file_end(self, event: wire.FileEnd) -> None:
        self._flush(event.file_id)
        image = self.images[event.file_id]
        digest = self.hashers.pop(event.file_id).digest()
        if not hmac.compare_digest(digest, event.digest):
            raise Refused(f"{image.name}: {LABELS[self.digest]} digest mismatch (got {digest.hex()[:16]}..., "
                          f"the proxy sent {event.digest.hex()[:16]}...)", wire.ErrorCode.DIGEST_MISMATCH)
        self.store.finish_image(image, digest)
        self._ack(event.file_id)

    def _on_checkpoint_end(self, event: wire.CheckpointEnd) -> None:
        assert self.checkpoint is not None
        self.link.set_idle_timeout(0)  # the link now waits for a restore, which may take its time
        if not event.clean:
            self._fail_checkpoint("the proxy reports the dump did not finish (CRIU failed or died)")
            self._send(wire.encode_checkpoint_done(False, "dump did not finish; checkpoint dropped"))
            return
        # Listen before completing: a restore that already read every file finishes the
        # moment the checkpoint is complete, and its "restored" must not be missed.
        self.store.on_event(self._notify_restored)
        self.store.complete(self.checkpoint, clean=True)
        elapsed = time.monotonic() - self.started
        size = self.checkpoint.size
        log.info("checkpoint %s complete from %s: %d files, %d bytes in %.2f s (%.0f MB/s), %s digests verified",
                 self.checkpoint.id, self.peer, len(self.images), size, elapsed,
                 size / max(elapsed, 1e-6) / 1e6, LABELS[self.digest],
                 extra=self.fields | {"IMGMIG_BYTES": size, "MESSAGE_ID": CHECKPOINT_COMPLETE_ID})
        with self.send_lock:  # RESTORED may only follow CHECKPOINT_DONE on the wire
            self._send_locked(wire.encode_checkpoint_done(True, f"{len(self.images)} files verified"))
            self.done_sent = True
            restored_early, self.restored_early = self.restored_early, False
        if restored_early:
            self._notify_restored("restored", self.checkpoint)

    def _notify_restored(self, event: str, checkpoint: Checkpoint) -> None:
        if event == "restored" and checkpoint is self.checkpoint:
            with self.send_lock:
                if not self.done_sent:
                    self.restored_early = True
                    return
            with contextlib.suppress(OSError):
                self._send(wire.encode_restored(checkpoint.id))

    def _send(self, frame: bytes) -> None:
        with self.send_lock:
            self._send_locked(frame)

    def _send_locked(self, frame: bytes) -> None:
        if self.outbox:
            frame = b"".join([*self.outbox, frame])
            self.outbox.clear()
        if frame:
            self.link.send(frame)

    def _refuse(self, reason: str, code: wire.ErrorCode) -> None:
        dropped = ""
        if self.checkpoint is not None and self.checkpoint.state is State.RECEIVING:
            self.store.fail(self.checkpoint, reason)  # one log line for both: the refusal says it
            dropped = f"; checkpoint {self.checkpoint.id} is dropped, dump it again"
        log.error("connection from %s refused: %s%s", self.peer, reason, dropped, extra=self.fields)
        with contextlib.suppress(OSError):
            self._send(wire.encode_error(code, reason))

    def _fail_checkpoint(self, reason: str) -> None:
        if self.checkpoint is None or self.checkpoint.state is not State.RECEIVING:
            return
        log.error("checkpoint %s from %s failed: %s; it is dropped, dump again once the link is back",
                  self.checkpoint.id, self.peer, reason, extra=self.fields)
        self.store.fail(self.checkpoint, reason)

