"""The proxy's link to the cache: stream one checkpoint while CRIU is still writing it.

One TCP connection per checkpoint. Bytes go memfd -> socket with sendfile as soon as
they are in the store; the digest is taken from a mapping of the same memfd. The
connection stays open after CHECKPOINT_DONE until the cache reports the checkpoint
restored (then the proxy releases its copy) or the link closes (the copy is kept for
a rollback restore on this node).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

from . import peer_wire as wire
from .config import HostPort
from .kernel_io import hash_region, sendfile_all
from .store import Checkpoint, Image, ImageStore, State

log = logging.getLogger(__name__)

FRAME_PAYLOAD = 1 << 20
CONNECT_TIMEOUT = 10.0


class PeerGone(Exception):
    pass


@dataclass
class _Outgoing:
    image: Image
    file_id: int
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)
    sent: int = 0
    ended: bool = False


class Forwarder:
    def __init__(self, store: ImageStore, checkpoint: Checkpoint, peer: HostPort, node: str,
                 stop: threading.Event, *, wait_for_complete: bool = False) -> None:
        self.store = store
        self.checkpoint = checkpoint
        self.peer = peer
        self.node = node
        self.stop = stop
        self.wait_for_complete = wait_for_complete
        self.sock: socket.socket | None = None
        self.decoder = wire.FrameDecoder()
        self.outgoing: dict[str, _Outgoing] = {}
        self.bytes_sent = 0
        self.peer_node = str(peer)

    @property
    def fields(self) -> dict[str, str]:
        return {"IMGMIG_CHECKPOINT": self.checkpoint.id, "IMGMIG_PEER": self.peer_node}

    def run(self) -> None:
        started = time.monotonic()
        try:
            with self.store.using(self.checkpoint):
                self._connect()
                self._stream()
            self._await_done(started)
            self._await_restored()
        except (OSError, PeerGone, wire.PeerProtocolError) as exc:
            self._report_failure(exc)
        finally:
            if self.sock is not None:
                self.sock.close()

    def _report_failure(self, exc: BaseException) -> None:
        if self.stop.is_set():
            return
        state = self.checkpoint.state
        if state is State.RESTORED or (state is State.FAILED and self.sock is None):
            return
        log.error("forwarding checkpoint %s to %s failed: %s; the checkpoint stays on this node "
                  "(restore it here from the proxy's images_dir for a rollback), check the cache "
                  "and its network, then dump again", self.checkpoint.id, self.peer_node,
                  _describe(exc), extra=self.fields)

    def _connect(self) -> None:
        host, port = self.peer.host, self.peer.port
        self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, self.node)))
        hello = self._next_event()
        if isinstance(hello, wire.Error):
            raise PeerGone(f"the cache refused us: {hello.message}")
        if not isinstance(hello, wire.Hello) or hello.role is not wire.Role.CACHE:
            raise wire.PeerProtocolError(f"expected the cache's HELLO, got {type(hello).__name__}")
        self.peer_node = f"{hello.node} ({self.peer})"
        self.sock.settimeout(None)
        self.sock.sendall(wire.encode_checkpoint_begin(self.checkpoint.id))
        log.info("checkpoint %s: forwarding to %s", self.checkpoint.id, self.peer_node, extra=self.fields)

    def _stream(self) -> None:
        while True:
            mark = self.store.progress_mark(self.checkpoint)
            receiving = self.checkpoint.state is State.RECEIVING
            if not (self.wait_for_complete and receiving):
                self._send_available()
            if self.checkpoint.state is State.FAILED:
                self._send(wire.encode_checkpoint_end(False, len(self.outgoing), self.bytes_sent))
                raise PeerGone(f"the dump failed ({self.checkpoint.reason})")
            if not receiving and all(out.ended for out in self.outgoing.values()):
                break
            self._drain_acks()
            self.store.wait_progress(self.checkpoint, mark, 0.5)
            if self.stop.is_set():
                raise PeerGone("the daemon is stopping")
        self._send(wire.encode_checkpoint_end(True, len(self.outgoing), self.bytes_sent))

    def _send_available(self) -> None:
        for name, image in list(self.checkpoint.images.items()):
            out = self.outgoing.get(name)
            if out is None:
                out = self.outgoing[name] = _Outgoing(image, len(self.outgoing))
                self._send(wire.encode_file_begin(out.file_id, name))
            self._send_bytes(out)

    def _send_bytes(self, out: _Outgoing) -> None:
        complete = out.image.complete
        end = out.image.size
        while out.sent < end:
            n = min(end - out.sent, FRAME_PAYLOAD)
            hash_region(out.hasher, out.image.fd, out.sent, n)
            self._send(wire.encode_file_data_header(out.file_id, out.sent, n))
            sendfile_all(self.sock.fileno(), out.image.fd, out.sent, n)
            out.sent += n
            self.bytes_sent += n
        if complete and not out.ended:
            self._send(wire.encode_file_end(out.file_id, out.sent, out.hasher.digest()))
            out.ended = True

    def _send(self, frame: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(frame)

    def _next_event(self) -> wire.Event:
        assert self.sock is not None
        while True:
            event = self.decoder.next_event()
            if event is not None:
                return event
            data = self.sock.recv(65536)
            if not data:
                raise PeerGone("the cache closed the connection")
            self.decoder.feed(data)

    def _drain_acks(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if not data:
            raise PeerGone("the cache closed the connection mid-checkpoint")
        self.decoder.feed(data)
        while (event := self.decoder.next_event()) is not None:
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
        assert self.sock is not None
        self.sock.settimeout(0.5)
        while not self.stop.is_set() and self.checkpoint.state is not State.RESTORED:
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
                self.store.drop(self.checkpoint)
                return


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
