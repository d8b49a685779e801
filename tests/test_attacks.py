"""Attacks on the daemons, run against the real imgmig-proxy and imgmig-cache.

Each test does what a hostile or broken peer would, then checks the refusing side logged
one line, nothing was stored or served wrongly, and the daemon still serves the next real
checkpoint. The peer link's attackers speak peer_wire over real TCP; CRIU's sockets are
driven with real pipes, files and sockets passed by SCM_RIGHTS.
"""

from __future__ import annotations

import os
import socket
import tempfile

from conftest import Pair, wait_until
from test_daemons_sim import (
    FORWARDER_ECHO,
    IO_TIMEOUT,
    assert_restores,
    checkpoint_images,
    dump,
    good_checkpoint,
    one_error,
    restore,
    restore_order,
)

from imgmig import criu_sim
from imgmig.protocol import criu_wire


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def earlier_checkpoint(pair: Pair) -> dict[str, bytes]:
    """A checkpoint on both nodes before the attack: it must come through untouched."""
    images = checkpoint_images("before-the-attack")
    dump(pair.proxy_dir, images)
    pair.cache_log.wait_for(r"complete from")
    pair.proxy_log.wait_for(r"forwarded to")
    pair.set_marks()
    return images


def still_serving(pair: Pair, earlier: dict[str, bytes]) -> None:
    assert_restores(restore(pair.cache_dir, restore_order(earlier)), earlier)
    good_checkpoint(pair, "after-the-attack")


# ---- CRIU's sockets: fds that are not pipes ------------------------------------------------

def not_a_pipe(kind: str) -> tuple[int, object]:
    """An fd of `kind` and what keeps its other end alive."""
    if kind == "file":
        file = tempfile.TemporaryFile()  # noqa: SIM115 -- the caller closes it
        return os.dup(file.fileno()), file
    left, right = socket.socketpair()
    return os.dup(left.fileno()), (left, right)


def offer_fd(images_dir, name: str, fd: int) -> socket.socket:
    sock = criu_sim.connect(images_dir)
    sock.settimeout(IO_TIMEOUT)
    sock.sendall(criu_wire.encode_request(name))
    socket.send_fds(sock, [b"\0"], [fd])
    os.close(fd)
    return sock


def test_capture_refuses_a_file_or_socket_for_a_pipe(daemons):
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    for kind in ("file", "socket", "pipe-write-end"):
        if kind == "pipe-write-end":
            read_end, write_end = os.pipe()
            fd, keep = write_end, read_end
        else:
            fd, keep = not_a_pipe(kind)
        sock = offer_fd(pair.proxy_dir, "pages-1.img", fd)
        assert sock.recv(1) == b"", "the capture connection is dropped"
        sock.close()
        error = one_error(pair.proxy_log, r"checkpoint .* failed: .*pages-1\.img.* not the read end of a pipe",
                          ignore=FORWARDER_ECHO)
        assert "dump again" in error
        pair.cache_log.wait_for(r"checkpoint \S+ from .* failed", new=True)
        pair.set_marks()
        if kind == "file":
            keep.seek(0)
            assert keep.read() == b"", "nothing was written to the file"
        if isinstance(keep, int):
            os.close(keep)
    still_serving(pair, earlier)


def test_serve_refuses_a_file_or_socket_for_a_pipe(daemons):
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    for kind in ("file", "socket"):
        fd, keep = not_a_pipe(kind)
        client = criu_sim.RestoreClient(pair.cache_dir)
        client.sock.settimeout(IO_TIMEOUT)
        client.sock.sendall(criu_wire.encode_request("inventory.img"))
        assert client._reply() is True
        socket.send_fds(client.sock, [b"\0"], [fd])
        os.close(fd)
        assert client.sock.recv(1) == b"", "the restore connection is dropped"
        client.close()
        one_error(pair.cache_log, r"restore connection on the cache: .*inventory\.img a (regular file|socket), "
                                  r"not the write end of a pipe")
        if kind == "file":
            keep.seek(0)
            assert keep.read() == b"", "nothing was written to the file"
        pair.set_marks()
    still_serving(pair, earlier)


# ---- CRIU's sockets: a bad request right behind a good one -----------------------------------

def test_capture_bad_request_behind_a_good_one(daemons):
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    read_end, write_end = os.pipe()
    sock = criu_sim.connect(pair.proxy_dir)
    sock.settimeout(IO_TIMEOUT)
    socket.send_fds(sock, [criu_wire.encode_request("pages-1.img") + b"\0" + criu_wire.encode_request("../x")],
                    [read_end])
    os.close(read_end)
    assert sock.recv(1) == b"", "the capture connection is dropped"
    sock.close()
    os.close(write_end)
    one_error(pair.proxy_log, r"checkpoint .* failed: protocol error from CRIU: invalid image file name",
              ignore=FORWARDER_ECHO)
    still_serving(pair, earlier)


def test_serve_bad_request_behind_a_good_one(daemons):
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    sock = criu_sim.connect(pair.cache_dir, serve=True)
    sock.settimeout(IO_TIMEOUT)
    sock.sendall(criu_wire.encode_request("inventory.img") + criu_wire.encode_request("../x"))
    while sock.recv(4096):
        pass
    sock.close()
    one_error(pair.cache_log, r"restore connection on the cache: protocol error from CRIU")
    still_serving(pair, earlier)


# ---- CRIU's sockets: no fd leaks -------------------------------------------------------------

def bad_capture(pair: Pair, n: int) -> None:
    """Alternately a file where a pipe belongs, and a good request + pipe with a bad one behind."""
    sock = criu_sim.connect(pair.proxy_dir)
    sock.settimeout(IO_TIMEOUT)
    if n % 2:
        fd, keep = not_a_pipe("file")
        socket.send_fds(sock, [criu_wire.encode_request("pages-1.img"), b"\0"], [fd])
        os.close(fd)
        keep.close()
    else:
        read_end, write_end = os.pipe()
        socket.send_fds(sock, [criu_wire.encode_request("a.img"), b"\0", criu_wire.encode_request("..")],
                        [read_end])
        os.close(read_end)
        os.close(write_end)
    assert sock.recv(1) == b""
    sock.close()


def bad_restore(pair: Pair, n: int) -> None:
    """Alternately a socket where a pipe belongs, and a good request with a bad one behind."""
    client = criu_sim.RestoreClient(pair.cache_dir)
    client.sock.settimeout(IO_TIMEOUT)
    if n % 2:
        fd, keep = not_a_pipe("socket")
        client.sock.sendall(criu_wire.encode_request("inventory.img"))
        assert client._reply() is True
        socket.send_fds(client.sock, [b"\0"], [fd])
        os.close(fd)
        for end in keep:
            end.close()
    else:
        client.sock.sendall(criu_wire.encode_request("inventory.img") + criu_wire.encode_request("a/b"))
    while client.sock.recv(4096):
        pass
    client.close()


def test_a_thousand_bad_criu_connections_leak_no_fd(daemons):
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    before = {role: open_fds(pair.daemons[role].process.pid) for role in ("proxy", "cache")}
    for n in range(500):
        bad_capture(pair, n)
        bad_restore(pair, n)
    pair.proxy_log.wait_for(r"checkpoint .* failed: protocol error from CRIU", new=True, count=500)
    pair.cache_log.wait_for(r"restore connection on the cache: protocol error from CRIU", new=True, count=500)
    for role in ("proxy", "cache"):
        pid = pair.daemons[role].process.pid
        wait_until(lambda pid=pid, role=role: open_fds(pid) <= before[role], 30,
                   f"imgmig-{role} to hold no more fds than before the 1,000 connections ({before[role]})")
    assert not [line for line in pair.proxy_log.lines() + pair.cache_log.lines() if "Traceback" in line]
    still_serving(pair, earlier)
