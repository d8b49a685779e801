"""A resume takes over from a connection the cache still thinks alive (issue 8).

When a cut loses the reset too (the link was down, a NAT entry expired), the cache's end
of the old connection stays half-open until keepalive notices, link.dead_peer_timeout
later. The proxy, the transfer's only sender, has left it and links back with a resume:
the cache must end the old connection and resume at once, not refuse every resume until
keepalive tells. Here a fake proxy keeps its first connection open, silent, and resumes on
a second one: from the cache's side exactly that half-open state.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time

from test_systemd_units import _frames_until

from imgmig import criu_sim
from imgmig.datapath.link import reset_on_close
from imgmig.protocol import peer_wire as wire

CHECKPOINT = "fake-proxy-takeover"
FIRST = 3 << 20


def _connect(pki, port: int) -> socket.socket:  # type: ignore[no-untyped-def]
    sock = pki.client("fake-proxy").wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    sock.sendall(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, "fake-proxy", auth=wire.Auth.TLS)))
    return sock


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer ends the connection within timeout (EOF or reset; frames it sent first are skipped)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionError, OSError):
        return True
    return False


def test_resume_takes_over_from_a_half_open_connection(daemons, pki):
    pair = daemons(roles=("cache",))
    pages = os.urandom(8 << 20)
    old = _connect(pki, pair.port)
    old.sendall(wire.encode_checkpoint_begin(CHECKPOINT) + wire.encode_file_begin(0, "pages-1.img"))
    for offset in range(0, FIRST, 1 << 20):
        old.sendall(wire.encode_file_data(0, offset, pages[offset:offset + (1 << 20)]))
    _frames_until(old, wire.FrameDecoder(), wire.Begun)
    pair.cache_log.wait_for(r"begins from")
    with _connect(pki, pair.port) as new:
        started = time.monotonic()
        new.sendall(wire.encode_checkpoint_begin(CHECKPOINT, resume=True))
        decoder = wire.FrameDecoder()
        begun = _frames_until(new, decoder, wire.Begun)
        took = time.monotonic() - started
        assert begun.status is wire.BeginStatus.RESUMED and begun.files == 1, begun
        (file_id, held), = begun.held
        assert file_id == 0 and 0 < held <= FIRST, begun
        # without the takeover: refused after 5 s (still attached), then again until keepalive tells
        assert took < 2.0, f"the resume waited {took:.1f} s for the old connection to let go"
        assert _closed_by_peer(old, 5.0), "the cache kept the connection it was resumed from"
        for offset in range(held, len(pages), 1 << 20):
            new.sendall(wire.encode_file_data(0, offset, pages[offset:min(len(pages), offset + (1 << 20))]))
        new.sendall(wire.encode_file_end(0, len(pages), hashlib.sha256(pages).digest())
                    + wire.encode_checkpoint_end(True, 1, len(pages)))
        done = _frames_until(new, decoder, wire.CheckpointDone)
        assert done.ok, done  # the cache verified the file's digest over both connections' bytes
    old.close()
    pair.cache_log.wait_for(r"lost mid-checkpoint \S+ \(a new connection from the proxy resumes it\)")
    pair.cache_log.wait_for(r"complete from fake-proxy")
    assert not pair.cache_log.errors(new=False), "\n".join(pair.cache_log.errors(new=False))


def _fake_cache_hears_begin(listener: socket.socket) -> tuple[socket.socket, wire.CheckpointBegin]:
    """Accept the proxy, say HELLO as a cache (TLS off), and read up to its CHECKPOINT_BEGIN."""
    conn, _ = listener.accept()
    conn.settimeout(20)
    decoder = wire.FrameDecoder()
    _frames_until(conn, decoder, wire.Hello)
    conn.sendall(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.CACHE, "test-node", wire.Digest.XXH3_128,
                                              memory_limit=1 << 30, room=1 << 30)))
    return conn, _frames_until(conn, decoder, wire.CheckpointBegin)


def test_a_begin_never_answered_is_resumed_on_the_next_connection(daemons):
    """A cache that dies after CHECKPOINT_BEGIN but before its BEGUN may have kept the
    checkpoint's start in its fd store (found by kill -9 at random points: the fresh BEGIN
    that followed was refused as a duplicate, and the checkpoint never went through). Every
    connection after one that sent BEGIN resumes; a cache with none of it answers NEW."""
    pair = daemons(roles=("proxy",), tls=False)
    with socket.create_server(("127.0.0.1", pair.port)) as listener:
        listener.settimeout(20)
        client = criu_sim.DumpClient(pair.proxy_dir)
        client.write_image("core-1.img", b"core")
        first, begin = _fake_cache_hears_begin(listener)
        assert not begin.resume
        reset_on_close(first)
        first.close()  # dies before BEGUN
        second, again = _fake_cache_hears_begin(listener)
        assert again.checkpoint == begin.checkpoint and again.resume, again
        second.close()
        client.close()
