"""The TLS link over real loopback TCP, authenticated both ways: it carries a file region
one way while frames cross the other way from another thread (as the cache's ACKs do
while its receiver reads), and ends cleanly."""

from __future__ import annotations

import hashlib
import os
import socket
import threading

from imgmig.config import HostPort, LinkConfig, TlsConfig
from imgmig.datapath import link as link_module
from imgmig.datapath.receive import receive_within
from imgmig.system.tls import Trust

FILE_BYTES = (8 << 20) + 12345  # not a multiple of a record, a page or a step
FRAMES = 2000
SETTINGS = LinkConfig(handshake_timeout=10, dead_peer_timeout=10)


def trust(pki, node: str) -> Trust:
    return Trust(TlsConfig(ca=pki.ca, cert=pki.cert(node), key=pki.key(node)), node)


def memfd_with(data: bytes) -> int:
    fd = os.memfd_create("link-test")
    os.write(fd, data)
    return fd


def connected_links(pki) -> tuple[link_module.TlsLink, link_module.TlsLink]:
    """(proxy side, cache side), authenticated both ways."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: dict[str, link_module.Link] = {}

    def accept() -> None:
        sock, _ = listener.accept()
        accepted["link"] = link_module.accept_link(sock, trust(pki, "test-node"), SETTINGS)

    thread = threading.Thread(target=accept)
    thread.start()
    port = listener.getsockname()[1]
    proxy = link_module.open_link(HostPort("127.0.0.1", port), "test-node", trust(pki, "fake-proxy"), SETTINGS)
    thread.join(10)
    listener.close()
    cache = accepted["link"]
    assert isinstance(proxy, link_module.TlsLink) and isinstance(cache, link_module.TlsLink)
    proxy.settimeout(20)
    cache.settimeout(20)
    return proxy, cache


def test_file_one_way_frames_the_other_then_a_clean_end(pki) -> None:
    proxy, cache = connected_links(pki)
    assert proxy.peer_node == "test-node" and cache.peer_node == "fake-proxy"
    payload = os.urandom(FILE_BYTES)
    source, target = memfd_with(payload), os.memfd_create("received")
    frames = [f"ack {n:05d};".encode() for n in range(FRAMES)]

    def cache_side_sends() -> None:  # as the cache's ACK thread does, while its receiver reads
        for frame in frames:
            cache.send(frame)

    sender = threading.Thread(target=cache_side_sends)
    sender.start()
    offset = 0
    received = threading.Thread(target=lambda: proxy.send_file(source, 0, FILE_BYTES))
    received.start()
    while offset < FILE_BYTES:
        got = cache.recv_into_file(target, offset, FILE_BYTES - offset)
        assert got > 0, f"end of stream after {offset} bytes"
        offset += got
    received.join(20)
    sender.join(20)
    acks = b""
    while len(acks) < sum(map(len, frames)):
        acks += proxy.recv(65536)
    assert acks == b"".join(frames)
    assert hashlib.sha256(os.pread(target, FILE_BYTES + 1, 0)).digest() == hashlib.sha256(payload).digest()

    proxy.send(b"last frame")
    proxy.close()
    tail = b""
    while (more := cache.recv(100)) != b"":
        tail += more
    assert tail == b"last frame"
    assert cache.recv_nowait(100) == b"", "after the end, the link reports the end without waiting"
    cache.close()
    for fd in (source, target):
        os.close(fd)


def test_recv_nowait_reports_nothing_then_what_came(pki) -> None:
    proxy, cache = connected_links(pki)
    assert cache.recv_nowait(100) is None
    proxy.send(b"x" * 50_000)  # more than one record
    data = b""
    while len(data) < 50_000:
        more = receive_within(cache, 5)  # asks the link first, then polls its socket
        assert more, f"nothing more within 5 s after {len(data)} bytes"
        data += more
    assert data == b"x" * 50_000
    assert cache.recv_nowait(100) is None
    proxy.close()
    cache.close()


def test_recv_nowait_gathers_every_record_at_hand(pki) -> None:
    """One SSL_read gives one record (16 KiB at most); the link takes all that is there."""
    proxy, cache = connected_links(pki)
    proxy.send(b"r" * 200_000)
    deadline = threading.Event()
    largest = 0
    data = b""
    while len(data) < 200_000 and not deadline.wait(0.05):  # let the rest arrive, then read
        more = cache.recv_nowait(256 << 10)
        if more:
            largest = max(largest, len(more))
            data += more
    assert data == b"r" * 200_000
    assert largest > 16 << 10, f"no read took more than one record ({largest} bytes)"
    proxy.close()
    cache.close()

