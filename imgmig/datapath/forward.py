"""The proxy's link to the cache: stream one checkpoint while CRIU is still writing it.

One TCP connection per checkpoint. Bytes go memfd -> socket with sendfile as soon as
they are in the store; the digest is taken from a mapping of the same memfd. The
connection stays open after CHECKPOINT_DONE until the cache reports the checkpoint
restored (then the proxy releases its copy) or the link closes (the copy is kept for
a rollback restore on this node).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from imgmig.config import HostPort
from imgmig.datapath.digest import Digester, new_hasher, usable
from imgmig.datapath.kernel_io import hash_region
from imgmig.datapath.link import Link, TlsLink
from imgmig.datapath.store import Checkpoint, Image, ImageStore, State
from imgmig.protocol import peer_wire as wire

log = logging.getLogger(__name__)

FRAME_PAYLOAD = 1 << 20
# An image still being written is sent in steps of at least this much: each step costs a
# mapping for the digest, a header and a sendfile, so 64 KiB dribbles from CRIU's pipe
# would cost four times the system calls and wake-ups for the same bytes.
SEND_STEP = 1 << 20
# A complete image up to this size goes as one buffered FILE_DATA frame, together with
# its FILE_BEGIN and FILE_END in a single send: small files are bound by system calls.
SMALL_FILE = 64 << 10
SMALL_BATCH = 96  # frames (32 small files) per send
CONNECT_TIMEOUT = 10.0
LINGER_AFTER_FAILURE = 2.0


class PeerGone(Exception):
    pass


class DumpFailed(Exception):
    """The capture failed; the cache has been told and the capture already logged why."""


@dataclass
class _Outgoing:
    image: Image
    file_id: int
    hasher: Digester
    sent: int = 0
    ended: bool = False


class Forwarder:
    def __init__(self, store: ImageStore, checkpoint: Checkpoint, peer: HostPort, node: str,
                 stop: threading.Event, connect: Callable[[], Link], *, wait_for_complete: bool = False,
                 after: threading.Event | None = None, digest: wire.Digest = wire.Digest.SHA256) -> None:
        self.connect = connect  # link.open_link with this proxy's peer and trust
        self.store = store
        self.checkpoint = checkpoint
        self.peer = peer
        self.node = node
        self.stop = stop
        self.wait_for_complete = wait_for_complete
        self.link: Link | None = None
        self.decoder = wire.FrameDecoder()
        self.outgoing: dict[str, _Outgoing] = {}
        self.active: list[_Outgoing] = []  # begun, not yet ended
        self.bytes_sent = 0
        self.peer_node = str(peer)
        # Checkpoints reach the cache in the order CRIU connected: this one's
        # CHECKPOINT_BEGIN waits until the cache answered the previous forwarder's (`after`)
        # with its first frame (which it sends only once that checkpoint is in its store),
        # or that forwarder ended.
        self.after = after
        self.begun = threading.Event()
        self.sending = False  # inside a blocking send of file bytes
        self.begin_sent = False
        self.restored_at_peer = False  # the cache reported RESTORED for this checkpoint
        self.digest = usable(digest)  # offered in HELLO; the cache's HELLO says which is used

    @property
    def fields(self) -> dict[str, str]:
        return {"IMGMIG_CHECKPOINT": self.checkpoint.id, "IMGMIG_PEER": self.peer_node}

    def run(self) -> None:
        started = time.monotonic()
        self.store.on_event(self._on_store_event)
        delivered = False
        try:
            with self.store.using(self.checkpoint):
                if self.wait_for_complete:
                    self._await_captured()
                self._connect()
                self._stream()
            self._await_done(started)
            delivered = True
            self._await_restored()
        except DumpFailed:
            self._linger()
        except (OSError, PeerGone, wire.PeerProtocolError) as exc:
            self._report_failure(exc)
        finally:
            self.store.off_event(self._on_store_event)
            self.begun.set()
            if self.link is not None and delivered:
                self.link.close()
            elif self.link is not None:
                # An undelivered checkpoint ends with a reset: a FIN would queue behind bytes that a
                # cache waiting for memory does not read, and it would wait on.
                self.link.abort()

    def _await_captured(self) -> None:
        """Store-and-forward connects once the dump has ended: a link opened at the start
        would carry nothing for the whole dump, and the cache fails a checkpoint whose
        link is idle for cache.idle_timeout."""
        with self.store.cond:
            while self.checkpoint.state is State.RECEIVING and not self.stop.is_set():
                self.store.cond.wait(0.5)

    def _on_store_event(self, event: str, checkpoint: Checkpoint) -> None:
        """A dump that fails while the cache back-pressures us would leave this thread
        blocked in a send, and the cache waiting for memory it would never get back: cut
        the link, which the cache takes as the checkpoint failing."""
        if event == "failed" and checkpoint is self.checkpoint and self.sending and self.link is not None:
            self.link.shutdown(socket.SHUT_RDWR)

    def _linger(self) -> None:
        """Let the cache read our last frames: closing with its ACKs unread would reset the
        connection and it would log a reset instead of the reason."""
        assert self.link is not None
        self.link.shutdown(socket.SHUT_WR)
        try:
            self.link.settimeout(LINGER_AFTER_FAILURE)
            while self.link.recv(65536):
                pass
        except OSError:
            pass

    def _report_failure(self, exc: BaseException) -> None:
        if self.stop.is_set():
            return
        if self.checkpoint.state in (State.RESTORED, State.FAILED):
            return
        log.error("forwarding checkpoint %s to %s failed: %s; the checkpoint stays on this node "
                  "(restore it here from the proxy's images_dir for a rollback), check the cache "
                  "and its network, then dump again", self.checkpoint.id, self.peer_node,
                  _describe(exc), extra=self.fields)

    def _connect(self) -> None:
        self.link = self.connect()
        auth = wire.Auth.TLS if isinstance(self.link, TlsLink) else wire.Auth.NONE
        self.link.send(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, self.node, self.digest, auth)))
        hello = self._next_event()
        if isinstance(hello, wire.Error):
            raise PeerGone(f"the cache refused us: {hello.message}")
        if not isinstance(hello, wire.Hello) or hello.role is not wire.Role.CACHE:
            raise wire.PeerProtocolError(f"expected the cache's HELLO, got {type(hello).__name__}")
        if self.link.peer_node is not None and hello.node != self.link.peer_node:
            raise PeerGone(f"the cache calls itself {hello.node!r} in HELLO but its certificate names "
                           f"{self.link.peer_node!r}")
        if hello.digest not in (self.digest, wire.Digest.SHA256):
            raise wire.PeerProtocolError(f"the cache chose digest {hello.digest.name}, which was not offered")
        self.digest = hello.digest
        self.peer_node = f"{hello.node} ({self.peer})"
        self.link.settimeout(None)
        if self.after is not None:
            self.after.wait(CONNECT_TIMEOUT)
        self.link.send(wire.encode_checkpoint_begin(self.checkpoint.id))
        self.begin_sent = True
        log.info("checkpoint %s: forwarding to %s", self.checkpoint.id, self.peer_node, extra=self.fields)

    def _stream(self) -> None:
        while True:
            receiving = self.checkpoint.state is State.RECEIVING
            if not (self.wait_for_complete and receiving):
                self._send_available()
            if self.checkpoint.state is State.FAILED:
                self._send(wire.encode_checkpoint_end(False, len(self.outgoing), self.bytes_sent))
                raise DumpFailed
            if not receiving and not self.active and len(self.outgoing) == len(self.checkpoint.images):
                break
            self._drain_acks()
            self._wait_for_work(0.5)
            if self.stop.is_set():
                raise PeerGone("the daemon is stopping")
        self._send(wire.encode_checkpoint_end(True, len(self.outgoing), self.bytes_sent))

    def _wait_for_work(self, timeout: float) -> None:
        """Sleep until there is something to send (checked under the store's lock, so a
        notification cannot slip between the check and the wait). Costs O(open files),
        not O(files in the checkpoint): 10,000 small files stay linear."""
        with self.store.cond:
            if not self._has_work():
                self.store.cond.wait(timeout)

    def _has_work(self) -> bool:
        checkpoint = self.checkpoint
        if checkpoint.state is not State.RECEIVING:
            return True
        if self.wait_for_complete:
            return False
        if len(checkpoint.images) > len(self.outgoing):
            return True
        return any(out.image.complete or out.image.size - out.sent >= SEND_STEP for out in self.active)

    def _send_available(self) -> None:
        images = self.checkpoint.images
        # Images are never removed from a checkpoint and dicts keep insertion order: the
        # new ones are those past the count already begun. list() copies without letting
        # another thread run, unlike a Python-level loop over a dict that may grow.
        fresh = list(itertools.islice(images.values(), len(self.outgoing), None))
        batch: list[bytes] = []  # frames of complete small files, sent together
        for image in fresh:
            out = self.outgoing[image.name] = _Outgoing(image, len(self.outgoing), new_hasher(self.digest))
            if image.complete and image.size <= SMALL_FILE:
                self._frame_small(out, batch)
                if len(batch) >= SMALL_BATCH:
                    self._send(b"".join(batch))
                    batch.clear()
                continue
            batch.append(wire.encode_file_begin(out.file_id, image.name))
            self._send(b"".join(batch))
            batch.clear()
            self.active.append(out)
        if batch:
            self._send(b"".join(batch))
        if self.active:
            for out in self.active:
                self._send_bytes(out)
            self.active = [out for out in self.active if not out.ended]

    def _frame_small(self, out: _Outgoing, batch: list[bytes]) -> None:
        """FILE_BEGIN, one buffered FILE_DATA and FILE_END appended to batch: the same
        frames as for a large file, sent with other small files' in one system call."""
        size = out.image.size
        data = os.pread(out.image.fd, size, 0) if size else b""
        if len(data) != size:
            raise OSError(f"{out.image.name}: read {len(data)} of {size} bytes from its memfd")
        out.hasher.update(data)
        frames = [wire.encode_file_begin(out.file_id, out.image.name)]
        if size:
            frames.append(wire.encode_file_data(out.file_id, 0, data))
        frames.append(wire.encode_file_end(out.file_id, size, out.hasher.digest()))
        batch.extend(frames)
        out.sent = size
        out.ended = True
        self.bytes_sent += size

    def _send_bytes(self, out: _Outgoing) -> None:
        complete = out.image.complete
        end = out.image.size
        if not complete and end - out.sent < SEND_STEP:
            return
        self.sending = True
        try:
            while out.sent < end:
                n = min(end - out.sent, FRAME_PAYLOAD)
                hash_region(out.hasher, out.image.fd, out.sent, n)
                self._send(wire.encode_file_data_header(out.file_id, out.sent, n))
                self.link.send_file(out.image.fd, out.sent, n)
                out.sent += n
                self.bytes_sent += n
        finally:
            self.sending = False
        if complete and not out.ended:
            self._send(wire.encode_file_end(out.file_id, out.sent, out.hasher.digest()))
            out.ended = True

    def _send(self, frame: bytes) -> None:
        assert self.link is not None
        self.link.send(frame)

    def _next_event(self) -> wire.Event:
        assert self.link is not None
        while True:
            event = self.decoder.next_event()
            if event is not None:
                self._answered()
                return event
            data = self.link.recv(65536)
            if not data:
                raise PeerGone("the cache closed the connection")
            self.decoder.feed(data)

    def _answered(self) -> None:
        """A frame from the cache after our CHECKPOINT_BEGIN: it holds our checkpoint now."""
        if self.begin_sent:
            self.begun.set()

    def _drain_acks(self) -> None:
        assert self.link is not None
        data = self.link.recv_nowait(65536)
        if data is None:
            return
        if not data:
            raise PeerGone("the cache closed the connection mid-checkpoint")
        self.decoder.feed(data)
        while (event := self.decoder.next_event()) is not None:
            self._answered()
            if isinstance(event, wire.Error):
                raise PeerGone(f"the cache reported: {event.message}")

    def _await_done(self, started: float) -> None:
        while True:
            event = self._next_event()
            if isinstance(event, wire.Error):
                raise PeerGone(f"the cache reported: {event.message}")
            if isinstance(event, wire.CheckpointDone):
                break
        if not event.ok:
            raise PeerGone(f"the cache rejected the checkpoint: {event.message}")
        self.store.delivered(self.checkpoint)
        elapsed = time.monotonic() - started
        log.info("checkpoint %s forwarded to %s: %d files, %d bytes in %.2f s (%.0f MB/s); verified by the cache",
                 self.checkpoint.id, self.peer_node, len(self.outgoing), self.bytes_sent, elapsed,
                 self.bytes_sent / max(elapsed, 1e-6) / 1e6, extra=self.fields | {"IMGMIG_BYTES": self.bytes_sent})

    def _await_restored(self) -> None:
        assert self.link is not None
        self.link.settimeout(0.5)
        while not self.stop.is_set():
            if self.checkpoint.state is State.RESTORED:
                self._send_drop()
                return
            try:
                event = self._next_event()
            except TimeoutError:
                continue
            except (OSError, PeerGone):
                log.warning("link to %s closed before it reported checkpoint %s restored; this node keeps "
                            "its copy for a rollback until it is restored here or memory is needed",
                            self.peer_node, self.checkpoint.id, extra=self.fields)
                return
            if isinstance(event, wire.Restored) and event.checkpoint == self.checkpoint.id:
                log.info("checkpoint %s was restored on %s; releasing this node's copy",
                         self.checkpoint.id, self.peer_node, extra=self.fields)
                self.restored_at_peer = True
                self.store.drop(self.checkpoint)
                return

    def _send_drop(self) -> None:
        """Restored here (a rollback): the cache's copy must not be restored as well."""
        try:
            self._send(wire.encode_drop(self.checkpoint.id))
        except OSError as exc:
            log.error("checkpoint %s was restored on this node, but %s could not be told to drop its copy "
                      "(%s): do not restore it there, or the process runs twice; restart imgmig-cache "
                      "there to discard it", self.checkpoint.id, self.peer_node, _describe(exc), extra=self.fields)
            return
        log.info("checkpoint %s was restored on this node (rollback); %s told to drop its copy",
                 self.checkpoint.id, self.peer_node, extra=self.fields)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
