"""Is the cache there, and is it who we think? One HELLO exchange on a fresh link, for
`imgmig migrate`'s checks.

The link is opened exactly as a forwarder opens it (link.open_link): with TLS on, the
cache must present a certificate from the cluster CA naming the expected node, and it
checks ours against cache.allow, so a probe that passes means a checkpoint would be taken.
The cache answers HELLO with its own (or an ERROR if this node is not allowed) and takes
a connection that closes before CHECKPOINT_BEGIN as nothing sent, so the probe leaves no
trace but the connection.
"""

from __future__ import annotations

from dataclasses import dataclass

from imgmig.config import HostPort, LinkConfig
from imgmig.datapath.link import TlsLink, open_link
from imgmig.protocol import peer_wire as wire
from imgmig.system.tls import Trust


@dataclass(frozen=True)
class CacheAnswer:
    node: str          # its node name (its certificate's, with TLS)
    memory_limit: int  # its memory.limit, from its HELLO
    room: int          # of which free when it answered


def probe_cache(address: HostPort, expected_node: str | None, trust: Trust | None, settings: LinkConfig,
                node: str, digest: wire.Digest) -> CacheAnswer:
    """Who the cache is and how much room it has; OSError if unreachable or the TLS
    handshake fails, ValueError if it refuses this node or is no cache."""
    link = open_link(address, expected_node, trust, settings)
    try:
        auth = wire.Auth.TLS if isinstance(link, TlsLink) else wire.Auth.NONE
        link.send(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, node, digest, auth)))
        decoder = wire.FrameDecoder()
        while (event := decoder.next_event()) is None:
            data = link.recv(65536)
            if not data:
                raise ValueError("it closed the connection without a HELLO")
            decoder.feed(data)
    finally:
        link.close()
    if isinstance(event, wire.Error):
        raise ValueError(f"it refused this node: {event.message}")
    if not isinstance(event, wire.Hello) or event.role is not wire.Role.CACHE:
        raise ValueError(f"it answered {type(event).__name__}, not a cache's HELLO")
    if link.peer_node is not None and event.node != link.peer_node:
        raise ValueError(f"it calls itself {event.node!r} in HELLO but its certificate names {link.peer_node!r}")
    return CacheAnswer(event.node, event.memory_limit, event.room)
