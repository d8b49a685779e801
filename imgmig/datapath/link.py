"""One proxy <-> cache connection, as the drivers (forward, receive) see it.

A Link is the only object that reads or writes its socket. The drivers speak in frames
(bytes) and in file regions (a memfd, an offset, a count); how those regions cross the
wire is the Link's business: a plain TCP link moves them in the kernel (sendfile out,
splice in), a link that encrypts has to pass them through user space.
"""

from __future__ import annotations

import contextlib
import os
import socket

from imgmig.datapath.kernel_io import make_pipe, sendfile_all, splice_in


class PlainLink:
    """TCP without encryption: file bytes never enter Python."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._pipe: tuple[int, int] | None = None  # socket -> pipe -> memfd, made on first use

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_file(self, fd: int, offset: int, count: int) -> None:
        """Send bytes [offset, offset+count) of fd."""
        sendfile_all(self.sock.fileno(), fd, offset, count)

    def recv(self, size: int) -> bytes:
        """Up to size bytes; b"" at end of stream."""
        return self.sock.recv(size)

    def recv_nowait(self, size: int) -> bytes | None:
        """Up to size bytes without blocking; None when nothing is there, b"" at end of stream."""
        try:
            return self.sock.recv(size, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None

    def recv_into_file(self, fd: int, offset: int, count: int) -> int:
        """Move up to count bytes from the link into fd at offset; 0 at end of stream."""
        if self._pipe is None:
            self._pipe = make_pipe()
        return splice_in(self.sock.fileno(), *self._pipe, fd, offset, count)

    def shutdown(self, how: int) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(how)

    def close(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
        self.sock.close()
