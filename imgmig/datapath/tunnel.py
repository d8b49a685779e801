"""The I/O side of the page-server tunnel (protocol/tunnel_wire.py) of a lazy migration.

A `TunnelPump` lives on a link's own thread (forward.py on the proxy, receive.py on the
cache), which stays the only writer to its link: it waits on the link and on the local
stream sockets of its channels at once, so a page fault costs one poll wake-up per side
and no timer. Local bytes become TUNNEL_DATA frames (`outgoing()`, queued through the
conversation), frames from the peer go to the local sockets.

The local ends never listen, and no other local process can reach the pages:
- on the cache, `imgmig restore --lazy` (root) makes a socketpair, gives one end to
  `criu lazy-pages --ps-socket` and hands the other to the cache over the control
  socket (`Tunnels.offer`);
- on the proxy, `imgmig migrate --lazy` (root) does the same with `criu dump --lazy-pages
  --ps-socket` and hands its end to the proxy with the dump's ticket (`lazy_source`); a
  channel is opened only for a checkpoint whose right to restore the cache holds, and
  only once: the dump serves one client.

No flow control beyond TCP's: a local socket that does not read blocks the link's
thread in its send, and the link back-pressures. One lazy restore is one channel.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from imgmig.datapath.link import Link
from imgmig.datapath.store import Checkpoint
from imgmig.protocol import tunnel_wire as tw
from imgmig.protocol.peer_wire import PeerProtocolError

log = logging.getLogger(__name__)

LAZY_IMAGE = "imgmig-lazy.json"  # marks a lazy checkpoint (the proxy adds it, before CRIU's images)
LOCAL_READ = 256 << 10
KEPT_OFFERS = 16
POISON = b"\xff"  # an unfinished page_server_iov record: the dump's page server fails on it


class NotLazy(ValueError):
    """The checkpoint carries no usable lazy marker; the text says why."""


def lazy_marker() -> bytes:
    """The marker image's bytes. The page server is no address: its socket was passed."""
    return json.dumps({"page_server": "passed"}).encode()


def require_lazy(checkpoint: Checkpoint) -> None:
    """NotLazy unless the checkpoint carries a complete lazy marker."""
    image = checkpoint.images.get(LAZY_IMAGE)
    if image is None or not image.complete:
        raise NotLazy(f"checkpoint {checkpoint.id} is not a lazy one (no complete {LAZY_IMAGE})")


def end_page_server(sock: socket.socket, at_record_boundary: bool, abort: bool) -> None:
    """End the proxy's end of a lazy dump's page-server socket (a socketpair that `imgmig
    migrate` also holds, so only shutdown() ends it). A clean end of stream lets `criu dump`
    count the migration done and kill the process on the source, so a channel that did not
    complete ends with an unfinished request record first: the page server fails on it
    (`Can't read pagemap from socket`), the dump fails and the process resumes there."""
    with contextlib.suppress(OSError):
        if abort and at_record_boundary:
            sock.send(POISON, socket.MSG_DONTWAIT)
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


@dataclass
class Offer:
    """A local socket handed to the cache for one checkpoint's tunnel, and how it ended."""
    checkpoint: str
    sock: socket.socket
    done: threading.Event = field(default_factory=threading.Event)
    taken: bool = False
    running: threading.Event = field(default_factory=threading.Event)  # criu restore -d returned 0
    abandoned: threading.Event = field(default_factory=threading.Event)  # imgmig restore went away
    close_passed: bool = False  # lazy-pages' close request went to the source: every page arrived
    error: str = ""
    to_peer: int = 0     # bytes the local end sent (lazy-pages' requests)
    from_peer: int = 0   # bytes that came back (the pages)

    @property
    def may_close(self) -> bool:
        """lazy-pages' close request may go to the source: the restore runs here, and the
        command that confirms it is still there (else its guard kills lazy-pages)."""
        return self.running.is_set() and not self.abandoned.is_set()


class Tunnels:
    """The cache's offers by checkpoint: the control socket offers, the checkpoint's link
    takes. Progress is read by status from the same objects."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.offers: dict[str, Offer] = {}

    def offer(self, checkpoint: str, sock: socket.socket) -> Offer:
        with self.lock:
            if checkpoint in self.offers and not self.offers[checkpoint].done.is_set():
                raise ValueError(f"checkpoint {checkpoint} has a tunnel already")
            for ended in [key for key, old in self.offers.items() if old.done.is_set()][:-KEPT_OFFERS]:
                del self.offers[ended]  # the last few stay, for status to show how they ended
            offer = self.offers[checkpoint] = Offer(checkpoint, sock)
            return offer

    def take(self, checkpoint: str) -> Offer | None:
        with self.lock:
            offer = self.offers.get(checkpoint)
            if offer is None or offer.taken or offer.done.is_set():
                return None
            offer.taken = True
            return offer

    def get(self, checkpoint: str) -> Offer | None:
        with self.lock:
            return self.offers.get(checkpoint)

    def progress(self, checkpoint: str) -> dict[str, object] | None:
        with self.lock:
            offer = self.offers.get(checkpoint)
        if offer is None:
            return None
        return {"pages_bytes": offer.from_peer, "requests_bytes": offer.to_peer, "done": offer.done.is_set(),
                **({"error": offer.error} if offer.error else {})}


class TunnelPump:
    """The channels of one link: local sockets <-> TunnelMux, driven from the link's thread."""

    def __init__(self, side: tw.Side, connect: Callable[[], socket.socket] | None = None) -> None:
        self.mux = tw.TunnelMux(side)
        self.connect = connect          # the proxy: a new connection to the page server
        self.sockets: dict[int, socket.socket] = {}
        self.reading: set[int] = set()  # channels whose local end has not reached EOF
        self.offers: dict[int, Offer] = {}
        self.watches: dict[int, tw.CloseWatch] = {}  # the proxy: did lazy-pages ask to close?
        self.moved_out = 0  # bytes from the local sockets to the peer (on the proxy: the pages)
        self.requests: dict[int, tw.CloseWatch] = {}  # the cache: lazy-pages' requests, for its close
        self.held: dict[int, bytes] = {}  # the cache: a close request held until the restore runs

    @property
    def active(self) -> bool:
        return bool(self.sockets)

    def attach(self, offer: Offer) -> int:
        """The cache: carry a local socket over a new channel."""
        channel = self.mux.open()
        offer.sock.setblocking(True)
        self.sockets[channel] = offer.sock
        self.reading.add(channel)
        self.offers[channel] = offer
        self.requests[channel] = tw.CloseWatch()
        return channel

    def outgoing(self) -> bytes:
        return self.mux.data_to_send()

    # ---- waiting --------------------------------------------------------------------------
    def receive_within(self, link: Link, timeout: float) -> bytes | None:
        """Like receive.receive_within, and meanwhile move what the local sockets say into
        frames: None if the link said nothing, b"" at its end of stream."""
        self._release_held()
        data = link.recv_nowait(65536)
        if data is not None:
            return data
        poller = select.poll()
        poller.register(link.fileno(), select.POLLIN | select.POLLRDHUP)
        by_fd = {self.sockets[channel].fileno(): channel for channel in self.reading}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        link_ready = False
        for fd, _ in poller.poll(int(timeout * 1000)):
            if fd == link.fileno():
                link_ready = True
            else:
                self._read_local(by_fd[fd])
        return link.recv_nowait(65536) if link_ready else None

    def _read_local(self, channel: int) -> None:
        sock = self.sockets[channel]
        try:
            data = sock.recv(LOCAL_READ, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self._reset(channel, f"local end failed: {exc.strerror or exc}")
            return
        if not data:
            self._local_eof(channel)
            return
        data = self._hold_close(channel, data)
        if not data:
            return
        self.mux.send(channel, data)
        self.moved_out += len(data)
        if channel in self.offers:
            self.offers[channel].to_peer += len(data)

    def _hold_close(self, channel: int, data: bytes) -> bytes:
        """The cache: lazy-pages' close request (every page arrived) goes to the source only
        once `criu restore -d` returned 0 here; before, the source's dump would take it for a
        finished migration and kill the process there, whatever became of the restore."""
        if channel in self.held:
            self.held[channel] += data
            return b""
        watch = self.requests.get(channel)
        start = watch.feed(data) if watch is not None else None
        if start is None:
            return data
        offer = self.offers[channel]
        if offer.may_close:
            offer.close_passed = True
            return data
        self.held[channel] = data[start:]
        return data[:start]

    def _release_held(self) -> None:
        for channel in [c for c in self.held if self.offers[c].may_close]:
            self.offers[channel].close_passed = True
            self.mux.send(channel, self.held.pop(channel))

    def _local_eof(self, channel: int) -> None:
        if self.held.pop(channel, None) is not None:
            log.warning("lazy restore: lazy-pages ended without the restore having run here; its close request "
                        "is not passed on, so the source's dump fails and the process resumes there")
        self.reading.discard(channel)
        self.mux.eof(channel)
        self._close_if_finished(channel)

    # ---- the peer's frames ------------------------------------------------------------------
    def on_frame(self, frame: tw.TunnelFrame) -> None:
        try:
            checked = self.mux.receive(frame)
        except tw.TunnelError as exc:
            raise PeerProtocolError(str(exc)) from None
        if isinstance(checked, tw.TunnelOpen):
            self._open(checked.channel)
        elif isinstance(checked, tw.TunnelData):
            self._write_local(checked.channel, checked.data)
        elif isinstance(checked, tw.TunnelEof):
            self._shutdown_local(checked.channel)
        elif isinstance(checked, tw.TunnelReset):
            self._finish(checked.channel, f"reset by the peer: {checked.reason}", abort=True)

    def _open(self, channel: int) -> None:
        assert self.connect is not None
        try:
            sock = self.connect()
        except (OSError, NotLazy) as exc:
            self.mux.reset(channel, f"cannot reach the page server: {exc}")
            log.error("lazy restore: cannot reach the source's page server (%s); the destination's "
                      "restore will fail and this node keeps the process", exc)
            return
        self.sockets[channel] = sock
        self.reading.add(channel)
        self.watches[channel] = tw.CloseWatch()

    def _write_local(self, channel: int, data: bytes) -> None:
        sock = self.sockets.get(channel)
        if sock is None:
            return
        if channel in self.watches:
            self.watches[channel].feed(data)
        try:
            sock.sendall(data)
        except OSError as exc:
            self._reset(channel, f"local end failed: {exc.strerror or exc}")
            return
        if channel in self.offers:
            self.offers[channel].from_peer += len(data)

    def _shutdown_local(self, channel: int) -> None:
        """The peer's end reached end of stream. When every page went, lazy-pages asked the
        page server to close first; a lazy-pages that stops without asking failed or was
        killed, and a clean end of stream would let `criu dump` count the migration done
        and kill the process on the source: the page server's connection is reset
        instead, the dump fails and the process resumes there."""
        sock = self.sockets.get(channel)
        if sock is None:
            return
        watch = self.watches.get(channel)
        if watch is not None and not watch.close_asked:
            self._reset(channel, "the lazy restore on the destination ended before its page server did")
            return
        with contextlib.suppress(OSError):  # the local end is gone: its read side says so
            sock.shutdown(socket.SHUT_WR)
        self._close_if_finished(channel)

    # ---- endings ------------------------------------------------------------------------------
    def _reset(self, channel: int, reason: str) -> None:
        self.mux.reset(channel, reason)
        self._finish(channel, reason, abort=True)

    def _close_if_finished(self, channel: int) -> None:
        if channel not in self.mux.channels:
            self._finish(channel, "")

    def _finish(self, channel: int, error: str, abort: bool = False) -> None:
        """Close a channel's local socket; `abort` ends a page server's so that CRIU's dump
        fails (end_page_server), never counts the migration done, when the copy did not complete."""
        self.reading.discard(channel)
        watch = self.watches.pop(channel, None)
        self.requests.pop(channel, None)
        self.held.pop(channel, None)
        sock = self.sockets.pop(channel, None)
        if sock is not None and self.mux.side is tw.Side.ACCEPTOR:
            if abort:
                log.warning("lazy restore: %s; the page server's connection is ended mid-record, so criu dump "
                            "fails and the process resumes on this node", error)
            end_page_server(sock, watch is None or watch.at_record_boundary, abort)
        elif sock is not None:
            # no shutdown: imgmig restore's copy keeps lazy-pages' stream open until it killed
            # the restored process, whose missing pages then never read as zeros
            sock.close()
        offer = self.offers.pop(channel, None)
        if offer is not None:
            offer.error = error
            offer.done.set()

    def close(self, reason: str) -> None:
        """The link ends: every channel ends with it (the peer learns it from the link)."""
        for channel in list(self.sockets):
            self.mux.channels.pop(channel, None)
            self._finish(channel, reason, abort=True)
