"""The tunnel's I/O side (datapath/tunnel.py) on real kernel sockets: a lazy-pages end
(socketpair, as `--ps-socket` gets it) on the cache, a dump's page server on a socketpair
on the proxy (as `criu dump --ps-socket` gets it, `imgmig migrate` keeping a copy of the
proxy's end), the two pumps joined by a link. How the channel ends decides whether CRIU's
dump may count the migration done: only after lazy-pages asked its page server to close."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from imgmig.datapath.link import PlainLink
from imgmig.datapath.store import ImageStore
from imgmig.datapath.tunnel import Offer, TunnelPump, Tunnels, end_page_server
from imgmig.protocol import peer_wire as wire
from imgmig.protocol import tunnel_wire as tw
from imgmig.roles.control import ControlServer, RoleView


def iov(cmd: int, nr_pages: int = 0, vaddr: int = 0, dst_id: int = 0) -> bytes:
    return struct.pack("<IIQQ", cmd, nr_pages, vaddr, dst_id)


PS_IOV_GET = 8


class PageServer:
    """The dump's end of a page-server socketpair: records what it got and how its client
    went away. Like `imgmig migrate`, it keeps a copy of the proxy's end."""

    def __init__(self) -> None:
        self.conn, self.proxy_end = socket.socketpair()
        self.kept = self.proxy_end.dup()
        self.accepted = threading.Event()

    def connect(self) -> socket.socket:
        self.accepted.set()
        return self.proxy_end

    def read(self, n: int) -> bytes:
        assert self.accepted.wait(5)
        self.conn.settimeout(5)
        data = b""
        while len(data) < n:
            chunk = self.conn.recv(n - len(data))
            assert chunk, f"EOF after {len(data)} of {n} bytes"
            data += chunk
        return data

    def ending(self, within: float = 5.0) -> str:
        """'eof' for an end of stream at a record boundary (criu dump counts the migration
        done), 'unfinished' for one within a record (CRIU's page server fails on it: the dump
        fails), 'open' if the stream did not end."""
        self.conn.settimeout(within)
        rest = b""
        try:
            while chunk := self.conn.recv(4096):
                rest += chunk
        except TimeoutError:
            return "open"
        except ConnectionResetError:
            return "unfinished"
        return "eof" if len(rest) % tw.PS_IOV_SIZE == 0 else "unfinished"


class Tunnel:
    """A cache pump and a proxy pump on the two ends of a link, each on its own thread
    (as in the daemons, where each link's thread is the only one driving its pump)."""

    def __init__(self) -> None:
        self.server = PageServer()
        near, far = socket.socketpair()
        self.cache_link, self.proxy_link = PlainLink(near), PlainLink(far)
        self.cache = TunnelPump(tw.Side.OPENER)
        self.proxy = TunnelPump(tw.Side.ACCEPTOR, connect=self.server.connect)
        self.lazy, theirs = socket.socketpair()
        self.offer = Offer("node-a-1", theirs)
        self.cache.attach(self.offer)
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=self._drive, args=(pump, link), daemon=True)
                        for pump, link in ((self.cache, self.cache_link), (self.proxy, self.proxy_link))]
        for thread in self.threads:
            thread.start()

    def _drive(self, pump: TunnelPump, link: PlainLink) -> None:
        decoder = wire.FrameDecoder()
        link.send(pump.outgoing())
        while not self.halt.is_set():
            data = pump.receive_within(link, 0.01)
            if data:
                decoder.feed(data)
                while (frame := decoder.next_event()) is not None:
                    pump.on_frame(frame)  # type: ignore[arg-type]
            out = pump.outgoing()
            if out:
                link.send(out)

    def stop(self) -> None:
        self.halt.set()
        for thread in self.threads:
            thread.join(5)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the tunnel did not get there"
        time.sleep(0.005)


@pytest.fixture
def tunnel() -> Iterator[Tunnel]:
    pair = Tunnel()
    yield pair
    pair.stop()


def test_pages_flow_and_a_close_asked_for_ends_cleanly(tunnel: Tunnel):
    tunnel.offer.running.set()  # criu restore -d returned 0 on the destination
    tunnel.lazy.sendall(iov(PS_IOV_GET, 256, 0x7F0000000000, 1))
    wait_for(tunnel.server.accepted.is_set)
    assert tunnel.server.read(24) == iov(PS_IOV_GET, 256, 0x7F0000000000, 1)
    pages = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and a bit: many frames
    assert tunnel.server.conn is not None
    tunnel.server.conn.settimeout(None)  # more than the sockets on the way hold: sent while read
    sender = threading.Thread(target=tunnel.server.conn.sendall, args=(iov(7, 256, 0x7F0000000000, 1) + pages,))
    sender.start()
    received = bytearray()
    tunnel.lazy.setblocking(False)

    def all_pages() -> bool:
        with contextlib.suppress(BlockingIOError):
            received.extend(tunnel.lazy.recv(1 << 20))
        return len(received) == 24 + len(pages)

    wait_for(all_pages)
    sender.join(5)
    assert bytes(received[24:]) == pages
    tunnel.lazy.setblocking(True)
    tunnel.lazy.sendall(iov(tw.PS_IOV_FORCE_CLOSE))
    assert tunnel.server.read(24) == iov(tw.PS_IOV_FORCE_CLOSE)
    assert tunnel.proxy.watches[1].close_asked
    tunnel.server.conn.sendall(b"\0\0\0\0")  # the page server's status answer
    tunnel.lazy.shutdown(socket.SHUT_WR)
    assert tunnel.server.ending() == "eof"
    tunnel.server.conn.close()
    wait_for(tunnel.offer.done.is_set)
    assert tunnel.offer.error == "" and tunnel.offer.from_peer == 24 + len(pages) + 4
    assert tunnel.offer.to_peer == 48
    assert not tunnel.cache.mux.channels and not tunnel.proxy.mux.channels


def test_lazy_pages_that_stops_without_close_resets_the_page_server(tunnel: Tunnel):
    tunnel.lazy.sendall(iov(PS_IOV_GET, 1, 0x1000, 1))
    wait_for(tunnel.server.accepted.is_set)
    assert tunnel.server.read(24) == iov(PS_IOV_GET, 1, 0x1000, 1)
    tunnel.lazy.close()  # killed
    wait_for(lambda: not tunnel.proxy.sockets)
    assert tunnel.server.ending() == "unfinished"
    wait_for(tunnel.offer.done.is_set)
    assert "ended before its page server did" in tunnel.offer.error


def test_a_lost_link_resets_the_page_server_and_ends_the_offer(tunnel: Tunnel):
    tunnel.lazy.sendall(iov(PS_IOV_GET, 1, 0x1000, 1))
    wait_for(tunnel.server.accepted.is_set)
    assert tunnel.server.read(24) == iov(PS_IOV_GET, 1, 0x1000, 1)
    tunnel.stop()  # the links' threads end, as when a link is lost
    tunnel.proxy.close("the link to the cache ended")
    tunnel.cache.close("the link to the source ended")
    assert tunnel.server.ending() == "unfinished"
    assert tunnel.offer.done.is_set() and tunnel.offer.error == "the link to the source ended"
    assert tunnel.lazy.recv(1) == b""  # lazy-pages sees its page server gone


def test_a_proxy_killed_during_the_copy_leaves_the_page_server_waiting():
    """kill -9 (or a restart) of the proxy mid-copy: the kernel closes its end of the page
    server's socket, and that must never be the clean end that lets criu dump kill the
    process on the source. `imgmig migrate` holds a copy of that end: the stream stays open
    (and migrate, seeing the proxy gone, stops the dump, which resumes the process)."""
    server = PageServer()
    proxy = subprocess.Popen([sys.executable, "-c", (
        "import socket, time\n"
        f"sock = socket.socket(fileno={server.proxy_end.fileno()})\nsock.sendall(b'x')\ntime.sleep(60)\n")],
        pass_fds=[server.proxy_end.fileno()])
    server.connect().close()  # the proxy has it now
    try:
        assert server.read(1) == b"x"
    finally:
        proxy.send_signal(signal.SIGKILL)
        proxy.wait(10)
    assert server.ending(within=0.5) == "open"
    server.kept.close()  # migrate ends too: only then does the kernel end the stream
    assert server.ending() == "eof"


@pytest.mark.parametrize("sent", [b"", iov(PS_IOV_GET, 1, 0x1000, 1), iov(PS_IOV_GET, 1, 0x1000, 1)[:7]])
def test_an_aborted_page_server_stream_ends_within_a_record(sent: bytes):
    """Whatever the proxy had passed on (nothing, whole requests, half of one), an abort
    ends the stream within a record, despite migrate's copy of the socket."""
    server = PageServer()
    watch = tw.CloseWatch()
    watch.feed(sent)
    server.proxy_end.sendall(sent)
    end_page_server(server.proxy_end, watch.at_record_boundary, abort=True)
    assert server.ending() == "unfinished"


def test_a_page_server_no_restore_reached_is_ended_within_a_record(tmp_path):
    """A dump announced with its page server, whose capture never began (migrate went away):
    forgetting the expectation ends the stream so that the dump fails."""
    server = PageServer()
    control = ControlServer("proxy", "node-a", ImageStore(1 << 20), threading.Event(),
                            RoleView(lambda c: {}, list, str, lambda c: None))
    expectation = control.expect(None)
    expectation.page_server = server.proxy_end
    control.forget(expectation)
    assert expectation.page_server is None and server.ending() == "unfinished"


def test_a_page_server_that_cannot_be_reached_resets_the_channel():
    pump = TunnelPump(tw.Side.ACCEPTOR, connect=lambda: socket.create_connection(("127.0.0.1", 1), 1))
    pump.on_frame(tw.TunnelOpen(1))
    (frame,) = [tw.decode(data[4], data[5:]) for data in [pump.outgoing()]]
    assert isinstance(frame, tw.TunnelReset) and "cannot reach the page server" in frame.reason
    assert not pump.sockets


def test_close_watch_reads_records_split_anywhere():
    stream = iov(PS_IOV_GET, 1, 2, 3) * 3 + iov(tw.PS_IOV_CLOSE | (1 << 16))
    for step in (1, 5, 24, len(stream)):
        watch = tw.CloseWatch()
        for start in range(0, len(stream), step):
            assert not watch.close_asked
            watch.feed(stream[start:start + step])
        assert watch.close_asked
    watch = tw.CloseWatch()
    watch.feed(iov(PS_IOV_GET, tw.PS_IOV_CLOSE, tw.PS_IOV_FORCE_CLOSE, tw.PS_IOV_CLOSE))
    assert not watch.close_asked  # the numbers elsewhere in a record are not commands


def test_close_watch_says_where_the_close_request_begins():
    watch = tw.CloseWatch()
    assert watch.feed(iov(PS_IOV_GET)[:10]) is None
    assert watch.feed(iov(PS_IOV_GET)[10:] + iov(tw.PS_IOV_FORCE_CLOSE)[:5]) is None
    assert watch.feed(iov(tw.PS_IOV_FORCE_CLOSE)[5:]) == 0  # it began in the chunk before
    watch = tw.CloseWatch()
    assert watch.feed(iov(PS_IOV_GET) * 2 + iov(tw.PS_IOV_CLOSE)) == 48
    assert watch.feed(iov(tw.PS_IOV_CLOSE)) is None  # only the first counts


def test_one_tunnel_per_checkpoint_taken_once_with_its_progress():
    tunnels = Tunnels()
    first, second = socket.socketpair()
    with first, second:
        offer = tunnels.offer("node-a-1", first)
        with pytest.raises(ValueError, match="has a tunnel already"):
            tunnels.offer("node-a-1", second)
        assert tunnels.take("node-a-2") is None
        assert tunnels.take("node-a-1") is offer and tunnels.take("node-a-1") is None
        offer.from_peer, offer.to_peer = 8192, 48
        assert tunnels.progress("node-a-1") == {"pages_bytes": 8192, "requests_bytes": 48, "done": False}
        offer.error = "reset by the peer: gone"
        offer.done.set()
        assert tunnels.progress("node-a-1")["error"] == "reset by the peer: gone"  # type: ignore[index]
        assert tunnels.offer("node-a-1", second) is not offer  # a retry after the first ended


def test_the_close_request_waits_until_the_restore_runs(tunnel: Tunnel):
    tunnel.lazy.sendall(iov(PS_IOV_GET, 1, 0x1000, 1) + iov(tw.PS_IOV_FORCE_CLOSE))
    wait_for(tunnel.server.accepted.is_set)
    assert tunnel.server.read(24) == iov(PS_IOV_GET, 1, 0x1000, 1)
    time.sleep(0.2)
    assert tunnel.cache.held == {1: iov(tw.PS_IOV_FORCE_CLOSE)}  # held: the restore has not said it runs
    tunnel.offer.running.set()
    assert tunnel.server.read(24) == iov(tw.PS_IOV_FORCE_CLOSE)


def test_a_held_close_request_is_dropped_when_lazy_pages_ends(tunnel: Tunnel):
    """The restore never ran (it failed late, after lazy-pages had everything): the source
    must not see the close request, or its dump would kill the process there."""
    tunnel.lazy.sendall(iov(PS_IOV_GET, 1, 0x1000, 1) + iov(tw.PS_IOV_FORCE_CLOSE))
    wait_for(tunnel.server.accepted.is_set)
    assert tunnel.server.read(24) == iov(PS_IOV_GET, 1, 0x1000, 1)
    wait_for(lambda: bool(tunnel.cache.held))
    tunnel.lazy.close()
    assert tunnel.server.ending() == "unfinished"
