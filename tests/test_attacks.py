"""Attacks on the daemons, run against the real imgmig-proxy and imgmig-cache.

Each test does what a hostile or broken peer would, then checks the refusing side logged
one line, nothing was stored or served wrongly, and the daemon still serves the next real
checkpoint. The peer link's attackers speak peer_wire over real TCP; CRIU's sockets are
driven with real pipes, files and sockets passed by SCM_RIGHTS.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import ssl
import tempfile
import time

import xxhash
from conftest import Pair, wait_until
from test_daemons_sim import (
    FORWARDER_ECHO,
    IO_TIMEOUT,
    Restore,
    assert_restores,
    checkpoint_images,
    dump,
    earlier_checkpoint,
    fake_proxy,
    good_checkpoint,
    one_error,
    peer_connect,
    read_events,
    refused_in_one_line,
    restore,
    restore_order,
    still_serving,
    wait_received_eof,
)
from test_memfd_reuse import prepared_memfds

from imgmig import criu_sim
from imgmig.protocol import criu_wire
from imgmig.protocol import peer_wire as wire


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))




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


def test_too_many_fds_in_one_message(daemons):
    """More fds than any message may carry: the kernel cuts them off; one line says so."""
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    before = open_fds(pair.proxy.process.pid)
    pipes = [os.pipe() for _ in range(20)]
    sock = criu_sim.connect(pair.proxy_dir)
    sock.settimeout(IO_TIMEOUT)
    socket.send_fds(sock, [criu_wire.encode_request("pages-1.img"), b"\0"], [r for r, _ in pipes])
    assert sock.recv(1) == b""
    sock.close()
    for pipe in pipes:
        os.close(pipe[0])
        os.close(pipe[1])
    one_error(pair.proxy_log, r"checkpoint .* failed: protocol error from CRIU: the kernel cut off the fds CRIU "
                              r"passed", ignore=FORWARDER_ECHO)
    wait_until(lambda: open_fds(pair.proxy.process.pid) <= before, 10, "the proxy to close every fd it got")
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
    capture_errors = [line for line in pair.proxy_log.errors() if not re.search(FORWARDER_ECHO, line)]
    assert len(capture_errors) == 500, "one line per refused dump connection"
    serve_errors = pair.cache_log.matching(r"ERROR restore connection", new=True)
    assert len(serve_errors) == 500, "one line per refused restore connection"
    still_serving(pair, earlier)


# ---- names: every one the protocol allows -----------------------------------------------------

def test_longest_names_end_to_end(daemons):
    """255 bytes is the longest name both protocols carry; memfd_create takes 249 with our
    prefix: capture -> forward -> receive -> serve must keep every name whole."""
    pair = daemons()
    images = checkpoint_images("long-names")
    longest = {"n" * 251 + ".img": b"two hundred and fifty-five", "\u00e9" * 125 + "x.img": b"multi-byte"}
    assert all(len(name.encode()) == 255 for name in longest)
    images = {**longest, **images}  # inventory.img stays last
    waiting = Restore(pair.cache_dir, restore_order(images))
    dump(pair.proxy_dir, images)
    assert_restores(waiting.result(), images)
    # the proxy's copy too: a second checkpoint, rolled back (the first one's right is the cache's)
    dump(pair.proxy_dir, images)
    assert_restores(restore(pair.proxy_dir, list(longest)), longest)
    assert not pair.proxy_log.errors(new=False) and not pair.cache_log.errors(new=False)


# ---- too many files in one checkpoint ---------------------------------------------------------

def test_capture_refuses_more_files_than_max_files(daemons):
    pair = daemons(max_files=20)
    earlier = earlier_checkpoint(pair)
    client = criu_sim.DumpClient(pair.proxy_dir)
    client.sock.settimeout(IO_TIMEOUT)
    try:
        for n in range(21):
            client.write_image(f"f{n}.img", b"x")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the proxy hung up on the 21st: CRIU's dump fails loudly
    assert client.sock.recv(1) == b""
    client.close()
    error = one_error(pair.proxy_log, r"checkpoint .* failed: checkpoint \S+ has more than 20 files \(max_files\)",
                      ignore=FORWARDER_ECHO)
    assert "dump again" in error
    pair.cache_log.wait_for(r"checkpoint \S+ from .* failed", new=True)
    still_serving(pair, earlier)


def test_cache_refuses_more_files_than_max_files(daemons):
    pair = daemons(max_files=20)
    earlier = earlier_checkpoint(pair)
    sock = fake_proxy(pair, "too-many")
    sock.sendall(b"".join(wire.encode_file_begin(n, f"f{n}.img") for n in range(1000)))
    events = wait_received_eof(sock)
    sock.close()
    assert isinstance(events[-1], wire.Error) and events[-1].code == wire.ErrorCode.REFUSED, events
    one_error(pair.cache_log, r"connection from fake-proxy .* refused: checkpoint fake-proxy-too-many has more "
                              r"than 20 files \(max_files\).*checkpoint fake-proxy-too-many is dropped")
    still_serving(pair, earlier)


# ---- the idle deadline --------------------------------------------------------------------------

def test_stalled_checkpoint_fails_after_idle_timeout(daemons):
    """A proxy that stops sending mid-file: after cache.idle_timeout the checkpoint has failed,
    the connection is closed, and the restore waiting on it moves on to the next checkpoint."""
    pair = daemons(cache_keys={"idle_timeout": 1.5})
    pair.set_marks()
    waiting = Restore(pair.cache_dir, restore_order(checkpoint_images("after-stall")))
    sock = fake_proxy(pair, "stalled")
    sock.sendall(wire.encode_file_begin(0, "pages-1.img") + wire.encode_file_data_header(0, 0, 100_000) + b"x" * 10)
    started = time.monotonic()
    events = wait_received_eof(sock)
    stalled_for = time.monotonic() - started
    sock.close()
    assert 1.4 < stalled_for < 10, f"closed after {stalled_for:.1f} s, not after the 1.5 s idle timeout"
    assert isinstance(events[-1], wire.Error) and "idle_timeout" in events[-1].message, events
    one_error(pair.cache_log, r"connection from fake-proxy .* refused: nothing moved for 1\.5 s "
                              r"\(cache\.idle_timeout\); checkpoint fake-proxy-stalled is dropped")
    images = checkpoint_images("after-stall")
    dump(pair.proxy_dir, images)
    assert_restores(waiting.result(), images)


def test_stall_after_a_restore_began_fails_that_restore_cleanly(daemons):
    pair = daemons(cache_keys={"idle_timeout": 1})
    pair.set_marks()
    client = criu_sim.RestoreClient(pair.cache_dir)
    client.sock.settimeout(IO_TIMEOUT)
    sock = fake_proxy(pair, "stalls-later", wire.Digest.XXH3_128)
    inventory = b"inventory of a checkpoint that stalls"
    sock.sendall(wire.encode_file_begin(0, "inventory.img") + wire.encode_file_data(0, 0, inventory)
                 + wire.encode_file_end(0, len(inventory), xxhash.xxh3_128(inventory).digest()))
    client.sock.sendall(criu_wire.encode_request("inventory.img"))
    read_events(sock, until=lambda event: isinstance(event, wire.Claim))  # the restore asks for the right
    sock.sendall(wire.encode_grant(True, "fake-proxy-stalls-later", "test-node (the destination)"))
    assert client._reply(), "inventory.img is there"
    read_end, write_end = os.pipe()
    socket.send_fds(client.sock, [b"\0"], [write_end])
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        assert pipe.read() == inventory
    client.sock.sendall(criu_wire.encode_request("pages-1.img"))
    assert client.sock.recv(1) == b"", "the restore is cut, not answered from a failed checkpoint"
    client.close()
    wait_received_eof(sock)
    sock.close()
    pair.cache_log.wait_for(r"refused: nothing moved for 1 s \(cache\.idle_timeout\)", new=True)
    pair.cache_log.wait_for(r"restore from checkpoint fake-proxy-stalls-later stopped: .*failed", new=True)
    good_checkpoint(pair, "after-the-stall")


def test_idle_timeout_does_not_cut_a_received_checkpoint(daemons):
    """Once CHECKPOINT_END is in, the link waits for the restore as long as it takes."""
    pair = daemons(cache_keys={"idle_timeout": 1})
    images = checkpoint_images("waits-for-restore")
    dump(pair.proxy_dir, images)
    pair.cache_log.wait_for(r"complete from")
    time.sleep(2.5)
    assert_restores(restore(pair.cache_dir, restore_order(images)), images)
    pair.proxy_log.wait_for(r"was restored on .*releasing this node's copy")
    assert not pair.cache_log.errors(new=False)


# ---- connection caps ------------------------------------------------------------------------------

def proxy_hello(pair: Pair) -> bytes:
    auth = wire.Auth.NONE if pair.pki is None else wire.Auth.TLS
    return wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, "fake-proxy", wire.Digest.SHA256, auth))


def hello(pair: Pair, sock: socket.socket) -> socket.socket:
    """Take a raw connection past its handshake (TLS when the pair runs it, then HELLO)."""
    if pair.pki is not None and not isinstance(sock, ssl.SSLSocket):
        sock = pair.pki.client("fake-proxy").wrap_socket(sock)
    sock.sendall(proxy_hello(pair))
    read_events(sock, until=lambda event: isinstance(event, wire.Hello))
    return sock


def refused_at_once(pair: Pair) -> None:
    sock = peer_connect(pair, tls=False)  # the cap acts before any TLS byte
    sock.settimeout(5)
    assert sock.recv(1) == b"", "a connection over the cap is closed at once"
    sock.close()


def test_connections_still_in_their_handshake_are_capped(daemons):
    pair = daemons(cache_keys={"max_handshakes": 3})
    earlier = earlier_checkpoint(pair)
    silent = [peer_connect(pair, tls=False) for _ in range(3)]  # connected, never start TLS or HELLO
    time.sleep(0.3)
    refused_at_once(pair)
    line = one_error(pair.cache_log, r"connection from 127\.0\.0\.1 refused: 3 connections are still in their "
                                     r"handshake \(cache\.max_handshakes\)")
    assert str(pair.config) in line
    silent[0] = hello(pair, silent[0])  # past its handshake: a slot is free again, for the real proxy
    still_serving(pair, earlier)
    for sock in silent:
        sock.close()


def test_connections_per_peer_are_capped(daemons):
    pair = daemons(cache_keys={"max_connections_per_peer": 3})
    earlier = earlier_checkpoint(pair)  # its link stays open until it is restored: one of the three
    held = [peer_connect(pair) for _ in range(2)]
    held = [hello(pair, sock) for sock in held]
    refused_at_once(pair)
    one_error(pair.cache_log, r"connection from 127\.0\.0\.1 refused: 127\.0\.0\.1 already holds 3 "
                              r"connections \(cache\.max_connections_per_peer\)")
    pair.set_marks()
    for _ in range(50):  # a burst of refusals is one more line, not fifty
        refused_at_once(pair)
    time.sleep(0.3)
    assert len(pair.cache_log.errors()) <= 1, pair.cache_log.errors()
    for sock in held:
        sock.close()
    time.sleep(0.3)  # the cache sees them close and gives their slots back
    still_serving(pair, earlier)


# ---- running out of file descriptors --------------------------------------------------------------

def file_begin_flood(pair: Pair, checkpoint: str, files: int) -> socket.socket:
    """HELLO, CHECKPOINT_BEGIN, then `files` FILE_BEGIN frames, without waiting for answers:
    each FILE_BEGIN asks the cache for a memfd."""
    sock = peer_connect(pair)
    frames = [proxy_hello(pair), wire.encode_checkpoint_begin(f"fake-proxy-{checkpoint}"),
              *(wire.encode_file_begin(n, f"flood-{n:06d}.img") for n in range(files))]
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before it all went out
        sock.sendall(b"".join(frames))
    return sock


def refused_for_want_of_fds(sock: socket.socket) -> None:
    events = wait_received_eof(sock)
    sock.close()
    assert isinstance(events[-1], wire.Error) and "file descriptors" in events[-1].message, events


def test_file_begin_flood_against_a_low_fd_limit(daemons):
    """About 1 MB of FILE_BEGIN frames, and a crowd of connections, against a cache allowed 100
    fds: the flood's checkpoint fails, fd exhaustion is logged once per burst, the daemon lives
    and the next real checkpoint goes through."""
    pair = daemons(cache_nofile=100)
    earlier = earlier_checkpoint(pair)
    flood = file_begin_flood(pair, "flood", 40_000)
    assert len(wire.encode_file_begin(0, "flood-000000.img")) * 40_000 > 1_000_000
    pair.cache_log.wait_for(r"out of file descriptors or kernel memory \(EMFILE\) creating a memfd", new=True)
    # they arrive while the fds are gone, and wait in the backlog
    crowd = [peer_connect(pair, tls=False) for _ in range(12)]
    refused_for_want_of_fds(flood)
    pair.cache_log.wait_for(r"connection from fake-proxy .* refused: out of file descriptors "
                            r".*checkpoint fake-proxy-flood is dropped", new=True)
    for sock in crowd:
        sock.close()
    time.sleep(0.3)
    assert pair.cache.process.poll() is None, "the cache is still running"
    exhaustion = pair.cache_log.matching(r"out of file descriptors or kernel memory", new=True)
    assert len(exhaustion) <= 3, "exhaustion is logged once per burst:\n" + "\n".join(exhaustion)
    still_serving(pair, earlier)


def test_many_floods_at_once_leave_the_cache_serving(daemons):
    pair = daemons(cache_nofile=100)
    earlier = earlier_checkpoint(pair)
    floods = [file_begin_flood(pair, f"flood-{n}", 5_000) for n in range(4)]
    for sock in floods:
        refused_for_want_of_fds(sock)
    assert pair.cache.process.poll() is None
    pair.cache_log.wait_for(r"out of file descriptors or kernel memory", new=True)
    assert not [line for line in pair.cache_log.lines() if "Traceback" in line]
    still_serving(pair, earlier)



# ---- a small file held whole at the cache (datapath/receive.py, _Held) ---------------------------

def test_a_small_file_with_a_gap_in_its_bytes_is_refused(daemons):
    """A forged proxy sends a small file's first bytes, then bytes at an offset past their
    end, in one write (so the cache holds the file whole, before the store sees it): the
    gap is refused in one line, nothing of that checkpoint is served, the cache goes on."""
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    pair.set_marks()
    sock = fake_proxy(pair, "gap")
    sock.sendall(wire.encode_file_begin(0, "core-1.img") + wire.encode_file_data(0, 0, b"a" * 100)
                 + wire.encode_file_data(0, 4096, b"b" * 100)
                 + wire.encode_file_end(0, 4196, hashlib.sha256(b"a" * 100 + b"b" * 100).digest()))
    refused_in_one_line(pair, sock, r"connection from fake-proxy .* refused: .*checkpoint fake-proxy-gap is dropped",
                        earlier)


def test_a_link_cut_inside_a_small_file_never_serves_its_bytes(daemons):
    """The link drops after a small file's first bytes (held whole at the cache, not yet in
    the store): the checkpoint is kept for its proxy to resume, the earlier one restores
    intact, and a restore that claims the cut one is refused (its source never granted it)
    without a byte of it served."""
    pair = daemons(cache_keys={"grant_timeout": 1})
    earlier = earlier_checkpoint(pair)
    sock = fake_proxy(pair, "cut-small")
    sock.sendall(wire.encode_file_begin(0, "inventory.img") + wire.encode_file_data(0, 0, b"half an inventory"))
    time.sleep(0.3)
    sock.close()
    pair.cache_log.wait_for(r"lost mid-checkpoint fake-proxy-cut-small .* kept \d+ s for the proxy to resume")
    assert_restores(restore(pair.cache_dir, restore_order(earlier)), earlier)
    pair.set_marks()
    try:
        got = Restore(pair.cache_dir, ["inventory.img"]).result()
    except ConnectionError:  # the refusal closes CRIU's connection: nothing was served
        got = {}
    assert not got, f"served from a checkpoint cut mid-file: {got}"
    one_error(pair.cache_log, r"restore of checkpoint fake-proxy-cut-small on the cache refused: its source did "
                              r"not grant the right to restore it")
    assert pair.cache.process.poll() is None


# ---- PREPARE: asking the cache for memory ------------------------------------------------------

def prepared_bytes(pid: int) -> list[int]:
    return [size for size, _ in prepared_memfds(pid).values()]


def ask_to_prepare(pair: Pair, *sizes: int) -> list[wire.Event]:
    sock = hello(pair, peer_connect(pair))
    sock.sendall(b"".join(wire.encode_prepare(size) for size in sizes))
    events = read_events(sock, until=lambda event: isinstance(event, (wire.Prepare, wire.Error)))
    sock.close()
    return events


def test_a_peer_asking_for_all_memory_gets_memory_reuse_at_most(daemons):
    pair = daemons(memory_limit="64MiB", tls=False)
    earlier = earlier_checkpoint(pair)
    (answer,) = ask_to_prepare(pair, 2**64 - 1)
    assert isinstance(answer, wire.Prepare) and 0 < answer.size <= 64 << 20
    assert prepared_bytes(pair.cache.process.pid) == [answer.size]
    for _ in range(20):  # asked again and again: the one memfd is large enough, nothing more is taken
        assert ask_to_prepare(pair, 2**64 - 1) == [wire.Prepare(answer.size)]
    assert prepared_bytes(pair.cache.process.pid) == [answer.size]
    still_serving(pair, earlier)
    assert not pair.cache_log.errors(new=False)


def test_a_peer_asking_large_then_small_again_and_again_makes_the_cache_allocate_once(daemons):
    """Each PREPARE is a few bytes; if a small ask trimmed what a large one allocated, a peer
    alternating them would have the cache free and allocate the memory for each pair."""
    pair = daemons(memory_limit="256MiB", tls=False)
    earlier = earlier_checkpoint(pair)
    assert ask_to_prepare(pair, 96 << 20) == [wire.Prepare(96 << 20)]
    (prepared,) = prepared_memfds(pair.cache.process.pid).items()
    for _ in range(10):
        assert ask_to_prepare(pair, 4 << 20) == [wire.Prepare(96 << 20)]
        assert ask_to_prepare(pair, 96 << 20) == [wire.Prepare(96 << 20)]
    assert list(prepared_memfds(pair.cache.process.pid).items()) == [prepared], "the same memfd, never cut"
    still_serving(pair, earlier)
    assert not pair.cache_log.errors(new=False)


def test_a_second_prepare_on_one_connection_is_refused_in_one_line(daemons):
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    pair.set_marks()
    sock = hello(pair, peer_connect(pair))
    sock.sendall(wire.encode_prepare(4 << 20) + wire.encode_prepare(8 << 20))
    refused_in_one_line(pair, sock, r"a second PREPARE on one connection", earlier)


def test_prepare_after_checkpoint_begin_is_refused_in_one_line(daemons):
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    pair.set_marks()
    sock = hello(pair, peer_connect(pair))
    sock.sendall(wire.encode_checkpoint_begin("fake-proxy-prepare-late"))
    read_events(sock, until=lambda event: isinstance(event, wire.Begun))
    sock.sendall(wire.encode_prepare(4 << 20))
    refused_in_one_line(pair, sock, r"PREPARE after CHECKPOINT_BEGIN", earlier)


def test_a_peer_that_leaves_while_the_cache_prepares_leaves_it_serving(daemons):
    pair = daemons(tls=False)
    earlier = earlier_checkpoint(pair)
    for _ in range(5):
        sock = hello(pair, peer_connect(pair))
        sock.sendall(wire.encode_prepare(512 << 20))
        sock.close()  # before the answer: the cache is still allocating
    still_serving(pair, earlier)
    assert not pair.cache_log.errors(new=False)
