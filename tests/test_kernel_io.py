"""kernel_io's guards: which fds count as CRIU's pipe ends, the out-of-fds back-off and its log;
splice_out through a real pipe."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from imgmig.datapath import kernel_io
from imgmig.datapath.kernel_io import BurstLog, pipe_end_problem, retry_out_of_fds

F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def test_pipe_end_problem_names_what_was_passed():
    read_end, write_end = os.pipe()
    left, right = socket.socketpair()
    with tempfile.TemporaryFile() as file:
        try:
            assert pipe_end_problem(read_end, write=False) is None
            assert pipe_end_problem(write_end, write=True) is None
            assert pipe_end_problem(write_end, write=False) == ("a pipe end open for writing, "
                                                                "not the read end of a pipe")
            assert pipe_end_problem(read_end, write=True) == "a pipe end open for reading, not the write end of a pipe"
            assert pipe_end_problem(file.fileno(), write=True) == "a regular file, not the write end of a pipe"
            assert pipe_end_problem(left.fileno(), write=False) == "a socket, not the read end of a pipe"
        finally:
            for fd in (read_end, write_end):
                os.close(fd)
            left.close()
            right.close()


def test_burst_log_says_it_once_then_counts(caplog):
    burst = BurstLog(quiet=60)
    with caplog.at_level(logging.WARNING, logger="imgmig.datapath.kernel_io"):
        for _ in range(100):
            burst.warn("out of %s", "fds")
        burst.last -= 61  # the burst is over
        burst.warn("out of %s", "fds")
    lines = [record.getMessage() for record in caplog.records]
    assert lines == ["out of fds", "out of fds (99 more since the last such line)"]


def test_retry_out_of_fds_waits_for_fds_then_gives_up(monkeypatch):
    monkeypatch.setattr(kernel_io, "fd_exhaustion", BurstLog())
    attempts = []

    def flaky() -> int:
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError(errno.EMFILE, "Too many open files")
        return 7

    assert retry_out_of_fds(flaky, "a memfd") == 7 and len(attempts) == 3

    def never() -> int:
        raise OSError(errno.ENFILE, "Too many open files in system")

    with pytest.raises(OSError) as info:
        retry_out_of_fds(never, "a pipe", patience=0.1)
    assert info.value.errno == errno.ENFILE

    def other() -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    with pytest.raises(OSError):
        retry_out_of_fds(other, "x")  # not exhaustion: no retry, raised at once


def test_largest_pipe_stays_within_pipe_max_size():
    """Asking for more than fs.pipe-max-size without CAP_SYS_RESOURCE fails outright and
    would leave CRIU's 64 KiB pipe: the request is capped, so the pipe gets the limit."""
    limit = int(Path(kernel_io.PIPE_MAX_SIZE).read_text())
    assert kernel_io.largest_pipe(4 * limit) == limit
    assert kernel_io.largest_pipe(1 << 16) == min(1 << 16, limit)
    read_end, write_end = os.pipe()
    try:
        kernel_io.grow_pipe(write_end, kernel_io.largest_pipe(4 * limit))
        assert fcntl.fcntl(write_end, F_GETPIPE_SZ) == limit
    finally:
        os.close(read_end)
        os.close(write_end)


def _memfd_with(data: bytes) -> int:
    fd = os.memfd_create("imgmig-test", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def _pattern(size: int) -> bytes:
    return hashlib.shake_128(b"splice_out").digest(size)


def _slow_reader(read_end: int, want: int, sizes: list[int], pause: float, got: bytearray) -> None:
    """read()s as CRIU's restore does: blocking, of varying sizes, with pauses between."""
    step = 0
    while len(got) < want:
        chunk = os.read(read_end, min(sizes[step % len(sizes)], want - len(got)))
        if not chunk:
            return
        got += chunk
        step += 1
        time.sleep(pause)


def _splice_through_pipe(data: bytes, offset: int, pipe_size: int, sizes: list[int], pause: float) -> bytes:
    fd = _memfd_with(data)
    read_end, write_end = os.pipe()
    kernel_io.grow_pipe(write_end, pipe_size)
    got = bytearray()
    reader = threading.Thread(target=_slow_reader, args=(read_end, len(data) - offset, sizes, pause, got))
    reader.start()
    try:
        kernel_io.splice_out(fd, write_end, offset, len(data) - offset)
    finally:
        reader.join(30)
        for end in (fd, read_end, write_end):
            os.close(end)
    return bytes(got)


def test_splice_out_is_byte_exact_through_a_slow_reader(monkeypatch):
    """Every byte arrives, in order, through a real pipe whose reader takes a pipeful, a
    page or an odd size at a time; and every refill is started by the reader's wake-up,
    not by the ROOM_WAIT fallback (made 30 s here: one missed wake-up would fail the time)."""
    monkeypatch.setattr(kernel_io, "ROOM_WAIT", 30.0)
    data = _pattern((6 << 20) + 12345)
    started = time.monotonic()
    got = _splice_through_pipe(data, 4096 + 7, 1 << 20, [1 << 20, 4096, 77777, 3 << 20], 0.002)
    assert time.monotonic() - started < 10
    assert got == data[4096 + 7:]


def test_splice_out_goes_on_when_a_splice_leaves_the_pipe_not_full(monkeypatch):
    """A splice cut short (here: asked for less than the pipe holds) gets no wake-up from
    the reader; the transfer goes on after ROOM_WAIT, bytes exact."""
    monkeypatch.setattr(kernel_io, "ROOM_WAIT", 0.01)
    monkeypatch.setattr(kernel_io, "SPLICE_MAX", 64 << 10)
    data = _pattern(1 << 20)
    assert _splice_through_pipe(data, 0, 1 << 20, [1 << 20], 0.0) == data


def test_splice_out_raises_when_the_reader_goes_away():
    fd = _memfd_with(_pattern(4 << 20))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with pytest.raises(BrokenPipeError):
            kernel_io.splice_out(fd, write_end, 0, 4 << 20)
    finally:
        os.close(fd)
        os.close(write_end)


def test_splice_out_puts_what_fits_in_the_pipe_without_waiting_for_a_reader():
    """A small image (and an empty one) goes in one splice: nobody reads the pipe here."""
    data = _pattern(60000)
    fd = _memfd_with(data)
    read_end, write_end = os.pipe()
    try:
        kernel_io.splice_out(fd, write_end, 0, 0)
        kernel_io.splice_out(fd, write_end, 100, len(data) - 100)
        assert os.read(read_end, len(data)) == data[100:]
    finally:
        for end in (fd, read_end, write_end):
            os.close(end)
