"""Who may take a connection slot on a listening socket, decided in the accept loop.

Like sshd's MaxStartups: at most `max_handshakes` connections may be between accept and
the end of their handshake (HELLO) at once, and one peer address may hold at most
`max_per_peer` connections, so that neither a flood of half-open connections nor one
peer can take every slot, thread and fd. A refused connection is closed at once and
logged, once per burst.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter

from imgmig.datapath.kernel_io import BurstLog

log = logging.getLogger(__name__)


class Admission:
    def __init__(self, max_handshakes: int, max_per_peer: int, where: str) -> None:
        self.max_handshakes = max_handshakes
        self.max_per_peer = max_per_peer
        self.where = where  # the config file, for the log line
        self.lock = threading.Lock()
        self.handshaking: set[socket.socket] = set()
        self.peer_of: dict[socket.socket, str] = {}
        self.per_peer: Counter[str] = Counter()
        self.refusals = BurstLog(logger=log, level=logging.ERROR)

    def admit(self, conn: socket.socket, peer: str) -> bool:
        """Count `conn` in, or log why not (the caller closes it)."""
        with self.lock:
            refusal = self._refusal_locked(peer)
            if refusal is None:
                self.handshaking.add(conn)
                self.peer_of[conn] = peer
                self.per_peer[peer] += 1
                return True
        self.refusals.warn("connection from %s refused: %s; raise it in %s if this load is genuine "
                           "(refusals are logged once per burst)", peer, refusal, self.where)
        return False

    def _refusal_locked(self, peer: str) -> str | None:
        if len(self.handshaking) >= self.max_handshakes:
            return f"{len(self.handshaking)} connections are still in their handshake (cache.max_handshakes)"
        if self.per_peer[peer] >= self.max_per_peer:
            return f"{peer} already holds {self.per_peer[peer]} connections (cache.max_connections_per_peer)"
        return None

    def established(self, conn: socket.socket) -> None:
        """The handshake is over: the connection no longer counts against max_handshakes."""
        with self.lock:
            self.handshaking.discard(conn)

    def release(self, conn: socket.socket) -> None:
        with self.lock:
            self.handshaking.discard(conn)
            peer = self.peer_of.pop(conn, None)
            if peer is not None:
                self.per_peer[peer] -= 1
                if not self.per_peer[peer]:
                    del self.per_peer[peer]
