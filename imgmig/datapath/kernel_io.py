"""Kernel-side byte moving: splice, sendfile, pipe sizing, and hashing through mmap.

Image bytes go pipe -> memfd -> socket -> pipe -> memfd -> pipe without entering a
Python object; the only place Python's C code reads them is the digest, through a
read-only mapping of the memfd.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from imgmig.protocol.criu_wire import FDS_CUT_OFF, CriuProtocolError

log = logging.getLogger(__name__)
T = TypeVar("T")

CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
DEFAULT_PIPE = 64 << 10  # what a new pipe holds (CRIU's, until one end grows it)
SPLICE_MAX = 1 << 30  # bytes asked of one splice into a pipe: the kernel stops when the pipe is full
ROOM_WAIT = 0.05  # seconds splice_out waits for its reader's wake-up before splicing anyway
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
PIPE_MAX_SIZE = "/proc/sys/fs/pipe-max-size"
_PAGE = mmap.ALLOCATIONGRANULARITY
# Out of fds (per process, system-wide) or of the kernel memory behind them: a daemon
# under a flood of connections or files sees these; they end one checkpoint, never the daemon.
FD_EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
FD_PATIENCE = 2.0  # seconds a new memfd or pipe waits for fds to be freed before giving up


class Hasher(Protocol):
    def update(self, data: memoryview, /) -> None: ...


def grow_pipe(fd: int, size: int = PIPE_SIZE) -> None:
    """Larger pipes mean fewer wake-ups; the kernel may refuse (pipe-max-size), which is fine."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)


def largest_pipe(wanted: int) -> int:
    """`wanted`, or fs.pipe-max-size where that is lower: without CAP_SYS_RESOURCE (the
    units keep no capabilities) the kernel refuses any larger pipe outright."""
    try:
        with open(PIPE_MAX_SIZE) as f:
            return min(wanted, int(f.read()))
    except (OSError, ValueError):
        return min(wanted, PIPE_SIZE)


def make_pipe(size: int) -> tuple[int, int]:
    read_end, write_end = retry_out_of_fds(lambda: os.pipe2(os.O_CLOEXEC), "a pipe")
    grow_pipe(write_end, size)
    return read_end, write_end


def pipe_size(fd: int) -> int:
    return fcntl.fcntl(fd, F_GETPIPE_SZ)


def out_of_fds(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FD_EXHAUSTION


class BurstLog:
    """One warning per burst of the same trouble, not one per event: a flood must not
    flood the journal too. Events within `quiet` seconds of the last line are counted and
    the count goes into the next line."""

    def __init__(self, quiet: float = 10.0, logger: logging.Logger = log, level: int = logging.WARNING) -> None:
        self.quiet = quiet
        self.logger = logger
        self.level = level
        self.lock = threading.Lock()
        self.last = -quiet
        self.suppressed = 0

    def warn(self, message: str, *args: object) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.last < self.quiet:
                self.suppressed += 1
                return
            self.last, suppressed, self.suppressed = now, self.suppressed, 0
        more = f" ({suppressed} more since the last such line)" if suppressed else ""
        self.logger.log(self.level, message + more, *args)


fd_exhaustion = BurstLog()


def report_out_of_fds(exc: OSError, what: str) -> None:
    fd_exhaustion.warn("out of file descriptors or kernel memory (%s) creating %s; backing off and going "
                       "on, the connection that holds the most may fail; raise LimitNOFILE if this is load, "
                       "check cache.allow and the connection caps if it is not",
                       errno.errorcode.get(exc.errno or 0, exc.errno), what)


def retry_out_of_fds(make: Callable[[], T], what: str, patience: float = FD_PATIENCE) -> T:
    """make(), retried with a growing back-off while the process is out of fds: another
    connection may give some back (a flood's checkpoint that fails frees its memfds)."""
    deadline = time.monotonic() + patience
    delay = 0.01
    while True:
        try:
            return make()
        except OSError as exc:
            if not out_of_fds(exc):
                raise
            report_out_of_fds(exc, what)
            if time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def pipe_end_problem(fd: int, *, write: bool) -> str | None:
    """Why fd is not the pipe end CRIU must pass (None if it is): splicing into a regular
    file or a socket would write where no image belongs, or fail deep in the data path."""
    want = "write" if write else "read"
    mode = os.fstat(fd).st_mode
    if not stat.S_ISFIFO(mode):
        kind = "a regular file" if stat.S_ISREG(mode) else "a socket" if stat.S_ISSOCK(mode) else "another kind of fd"
        return f"{kind}, not the {want} end of a pipe"
    access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    if access != (os.O_WRONLY if write else os.O_RDONLY):
        return f"a pipe end open for {'reading' if write else 'writing'}, not the {want} end of a pipe"
    return None


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
    """Write bytes [offset, offset+count) of a memfd into a (blocking) pipe, a pipeful per
    splice, each made once the reader has finished its read() of the last.

    CRIU's restore read()s a whole pipeful at once and holds the pipe's mutex while it
    copies it into the restored task (faulting its pages in). A splice made meanwhile
    waits for that mutex spinning on a CPU for the whole copy (issue 11 in bench/README.md:
    a quarter of the cache's samples). The kernel wakes a writer only after such a read
    dropped the mutex, and only when the pipe was full: each splice asks for everything
    left, so it fills the pipe, and an edge-triggered epoll sees that wake-up and nothing
    earlier (poll() reports room as soon as the read has copied its first page). A small
    image goes in one splice, without the epoll.
    """
    moved = _splice_pipeful(fd, pipe_w, offset, count)
    if moved == count:
        return
    with select.epoll(1) as watch:
        watch.register(pipe_w, select.EPOLLOUT | select.EPOLLET)
        while moved < count:
            # a splice cut short (a signal) leaves the pipe not full, and its reader wakes
            # nobody: after ROOM_WAIT the blocking splice waits in the kernel instead
            watch.poll(ROOM_WAIT)
            moved += _splice_pipeful(fd, pipe_w, offset + moved, count - moved)


def _splice_pipeful(fd: int, pipe_w: int, offset: int, count: int) -> int:
    moved = os.splice(fd, pipe_w, min(count, SPLICE_MAX), offset_src=offset)
    if moved == 0 and count:
        raise BrokenPipeError("pipe closed")
    return moved


def splice_in(src: int, pipe_r: int, pipe_w: int, fd: int, offset: int, count: int, step: int) -> int:
    """Move up to `count` bytes from a socket through an empty pipe that holds `step`
    into a memfd at offset. Returns bytes moved; 0 means the socket reached EOF."""
    moved = os.splice(src, pipe_w, min(count, step))
    left = moved
    while left:
        left -= os.splice(pipe_r, fd, left, offset_dst=offset + moved - left)
    return moved


def recv_criu_message(sock: socket.socket, max_fds: int) -> tuple[bytes, list[int]]:
    """One read from a CRIU stream socket with the pipe fds passed along. Fds the kernel
    had to cut off (MSG_CTRUNC: no fd numbers left, or too many in one message) are a
    CriuProtocolError, after closing the ones that did arrive. b"" at end of stream, with
    any fds that came with it closed."""
    data, fds, flags, _ = socket.recv_fds(sock, 4096, max_fds)
    if flags & socket.MSG_CTRUNC or not data:
        for fd in fds:
            os.close(fd)
        if data:
            raise CriuProtocolError(FDS_CUT_OFF)
        return b"", []
    return data, fds


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
