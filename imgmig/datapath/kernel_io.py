"""Kernel-side byte moving: splice, sendfile, pipe sizing, and hashing through mmap.

Image bytes go pipe -> memfd -> socket -> pipe -> memfd -> pipe without entering a
Python object; the only place Python's C code reads them is the digest, through a
read-only mapping of the memfd.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import select
import threading
from typing import Protocol

CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PAGE = mmap.ALLOCATIONGRANULARITY


class Hasher(Protocol):
    def update(self, data: memoryview, /) -> None: ...


def grow_pipe(fd: int, size: int = PIPE_SIZE) -> None:
    """Larger pipes mean fewer wake-ups; the kernel may refuse (pipe-max-size), which is fine."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)


def make_pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    grow_pipe(write_end)
    return read_end, write_end


def hash_region(hasher: Hasher, fd: int, offset: int, length: int) -> None:
    """Feed bytes [offset, offset+length) of a memfd to hasher without copying them."""
    if length <= 0:
        return
    start = offset - offset % _PAGE
    with mmap.mmap(fd, length + offset - start, mmap.MAP_SHARED, mmap.PROT_READ, offset=start) as mapped:
        view = memoryview(mapped)
        try:
            hasher.update(view[offset - start:])
        finally:
            view.release()


def sendfile_all(sock_fd: int, fd: int, offset: int, count: int) -> None:
    """Send bytes [offset, offset+count) of fd on a blocking socket."""
    while count:
        sent = os.sendfile(sock_fd, fd, offset, count)
        if sent == 0:
            raise ConnectionError("peer closed the connection")
        offset += sent
        count -= sent


def splice_out(fd: int, pipe_w: int, offset: int, count: int) -> None:
    """Write bytes [offset, offset+count) of a memfd into a (blocking) pipe."""
    while count:
        moved = os.splice(fd, pipe_w, min(count, CHUNK), offset_src=offset)
        if moved == 0:
            raise BrokenPipeError("pipe closed")
        offset += moved
        count -= moved


def splice_in(src: int, pipe_r: int, pipe_w: int, fd: int, offset: int, count: int) -> int:
    """Move up to `count` bytes from a socket through a pipe into a memfd at offset.
    Returns bytes moved; 0 means the socket reached EOF."""
    moved = os.splice(src, pipe_w, min(count, PIPE_SIZE))
    left = moved
    while left:
        left -= os.splice(pipe_r, fd, left, offset_dst=offset + moved - left)
    return moved


def hung_up(fd: int) -> bool:
    """The peer of a stream socket closed or shut down its side (without reading from it).
    poll(), not select(): select fails on fd numbers >= 1024, which many memfds reach."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return bool(poller.poll(0))


class UntilHangup:
    """The stop condition of a store wait: the daemon stops, or the peer on `fd` hung up.
    A writer that waits for memory stops waiting then and drains what is left (at most a
    socket or pipe buffer), so a dead peer's checkpoint ends and frees its memory."""

    def __init__(self, stop: threading.Event, fd: int) -> None:
        self.stop, self.fd = stop, fd

    def is_set(self) -> bool:
        return self.stop.is_set() or hung_up(self.fd)
