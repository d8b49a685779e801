"""Is the cache there, and is it who we think? One HELLO exchange on a fresh link, for
`imgmig migrate`'s checks; with a size, also memory made ready there for the checkpoint
that follows (PREPARE, before the process is frozen).

The link is opened exactly as a forwarder opens it (link.open_link): with TLS on, the
cache must present a certificate from the cluster CA naming the expected node, and it
checks ours against cache.allow, so a probe that passes means a checkpoint would be taken.
The cache answers HELLO with its own (or an ERROR if this node is not allowed) and takes
a connection that closes before CHECKPOINT_BEGIN as nothing sent, so the probe leaves no
trace but the connection (and, with PREPARE, a kept memfd that is freed if unused).
"""

from __future__ import annotations

from dataclasses import dataclass

from imgmig.config import HostPort, LinkConfig
from imgmig.datapath.link import TlsLink, open_link
from imgmig.protocol import peer_wire as wire
from imgmig.protocol.conversation import ProbeConnection
from imgmig.system.tls import Trust

PREPARE_TIMEOUT = 60.0  # for the cache to allocate what PREPARE asked (about 1 s a GiB here)


@dataclass(frozen=True)
class CacheAnswer:
    node: str          # its node name (its certificate's, with TLS)
    memory_limit: int  # its memory.limit, from its HELLO
    room: int          # of which free when it answered
    prepared: int = 0  # bytes it made ready for the coming checkpoint's pages


def probe_cache(address: HostPort, expected_node: str | None, trust: Trust | None, settings: LinkConfig,
                node: str, digest: wire.Digest, prepare: int = 0) -> CacheAnswer:
    """Who the cache is and how much room it has, and with `prepare` bytes the memory it made
    ready for them; OSError if unreachable or the TLS handshake fails (or the cache did
    not answer in time), ValueError if it refuses this node or is no cache."""
    link = open_link(address, expected_node, trust, settings)
    try:
        auth = wire.Auth.TLS if isinstance(link, TlsLink) else wire.Auth.NONE
        probe = ProbeConnection(wire.Hello(wire.VERSION, wire.Role.PROXY, node, digest, auth), prepare)
        link.send(probe.data_to_send())
        while not probe.done:
            if probe.hello is not None:
                link.settimeout(PREPARE_TIMEOUT)
            data = link.recv(65536)
            if not data:
                raise ValueError("it closed the connection without a " + ("PREPARE" if probe.hello else "HELLO"))
            try:
                probe.receive_data(data)
            except wire.PeerProtocolError as exc:
                raise ValueError(str(exc)) from None
    finally:
        link.close()
    hello = probe.hello
    assert hello is not None
    if link.peer_node is not None and hello.node != link.peer_node:
        raise ValueError(f"it calls itself {hello.node!r} in HELLO but its certificate names {link.peer_node!r}")
    return CacheAnswer(hello.node, hello.memory_limit, hello.room, probe.prepared or 0)
