"""Is the cache there? One HELLO exchange on a fresh connection, for `imgmig migrate`'s checks.

The cache answers HELLO with its own (or an ERROR if this node is not allowed) and takes
a connection that closes before CHECKPOINT_BEGIN as nothing sent, so the probe leaves no
trace but the connection.
"""

from __future__ import annotations

import socket

from imgmig.config import HostPort
from imgmig.protocol import peer_wire as wire

PROBE_TIMEOUT = 5.0


def probe_cache(address: HostPort, node: str, digest: wire.Digest) -> str:
    """The cache's node name; OSError if unreachable, ValueError if it refuses or is no cache."""
    with socket.create_connection((address.host, address.port), timeout=PROBE_TIMEOUT) as sock:
        sock.sendall(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, node, digest)))
        decoder = wire.FrameDecoder()
        while (event := decoder.next_event()) is None:
            data = sock.recv(65536)
            if not data:
                raise ValueError("it closed the connection without a HELLO")
            decoder.feed(data)
    if isinstance(event, wire.Error):
        raise ValueError(f"it refused this node: {event.message}")
    if not isinstance(event, wire.Hello) or event.role is not wire.Role.CACHE:
        raise ValueError(f"it answered {type(event).__name__}, not a cache's HELLO")
    return event.node
