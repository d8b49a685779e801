"""The real daemons, driven by imgmig.criu_sim over real kernel sockets and pipes.

Every test runs imgmig-proxy and imgmig-cache as subprocesses (see conftest.py) and
checks what a restore reads, byte for byte, and what the daemons log.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash
from conftest import PYTHON, REPO, Pair, wait_until

from imgmig import criu_sim
from imgmig.protocol import criu_wire
from imgmig.protocol import peer_wire as wire

IO_TIMEOUT = 30.0
LEN = struct.Struct("<I" if sys.byteorder == "little" else ">I")


# ---- helpers ---------------------------------------------------------------------------

def checkpoint_images(tag: str, pid: int = 1, big: int = 200_000) -> dict[str, bytes]:
    """A small checkpoint in the order CRIU writes it (inventory.img last); contents name the tag."""
    def blob(name: str, size: int) -> bytes:
        seed = hashlib.sha256(f"{tag}/{name}".encode()).digest()
        return (seed * (size // len(seed) + 1))[:size]

    return {
        "seccomp.img": blob("seccomp", 20),
        "files.img": blob("files", 300),
        f"ids-{pid}.img": blob("ids", 40),
        f"pagemap-{pid}.img": blob("pagemap", 1000),
        "pages-1.img": blob("pages", big),
        f"core-{pid}.img": blob("core", 700),
        f"mm-{pid}.img": blob("mm", 500),
        "pstree.img": blob("pstree", 30),
        "inventory.img": blob("inventory", 60),
    }


RESTORE_ORDER_EXTRA = ["memfd.img", "remap-fpath.img", "tty-info.img", "fifo-data.img"]


def restore_order(images: dict[str, bytes]) -> list[str]:
    """inventory.img first, as CRIU's restore asks; plus files a dump never writes."""
    return ["inventory.img", *[name for name in images if name != "inventory.img"], *RESTORE_ORDER_EXTRA]


def dump(images_dir: Path, images: dict[str, bytes]) -> None:
    criu_sim.DumpClient(images_dir).dump(images.items())


class Restore:
    """A restore client in a thread: reads `names` in order; result() waits bounded."""

    def __init__(self, images_dir: Path, names: list[str]) -> None:
        self.client = criu_sim.RestoreClient(images_dir)
        self.client.sock.settimeout(IO_TIMEOUT * 2)
        self.names = names
        self.got: dict[str, bytes | None] = {}
        self.error: BaseException | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            for name in self.names:
                self.got[name] = self.client.read_image(name)
        except BaseException as exc:
            self.error = exc
        finally:
            self.client.close()
            self.done.set()

    def result(self, timeout: float = IO_TIMEOUT) -> dict[str, bytes | None]:
        assert self.done.wait(timeout), f"restore did not finish within {timeout:.0f} s; got {list(self.got)}"
        if self.error is not None:
            raise self.error
        return self.got


def restore(images_dir: Path, names: list[str]) -> dict[str, bytes | None]:
    return Restore(images_dir, names).result()


def assert_restores(got: dict[str, bytes | None], images: dict[str, bytes]) -> None:
    for name, data in images.items():
        assert got[name] is not None, f"{name} was answered absent"
        assert len(got[name]) == len(data), f"{name}: {len(got[name])} bytes restored, {len(data)} dumped"
        assert got[name] == data, f"{name}: restored bytes differ from dumped bytes"
    for name in RESTORE_ORDER_EXTRA:
        if name in got:
            assert got[name] is None, f"{name} was never dumped but was answered exists=true"


def good_checkpoint(pair: Pair, tag: str) -> None:
    """Dump a checkpoint through the proxy and restore it from the cache, byte for byte."""
    images = checkpoint_images(tag)
    restore_thread = Restore(pair.cache_dir, restore_order(images))
    dump(pair.proxy_dir, images)
    assert_restores(restore_thread.result(), images)


# forward.py logs a second, misleading ERROR line when a dump fails (see
# test_failed_dump_is_one_error_line_on_the_proxy); other tests look past it.
FORWARDER_ECHO = r"forwarding checkpoint .* failed: the dump failed"


def one_error(log, pattern: str, ignore: str | None = None) -> str:
    """Exactly one ERROR line since the mark (besides lines matching `ignore`), matching pattern."""
    log.wait_for(pattern, new=True)
    errors = [line for line in log.errors() if ignore is None or not re.search(ignore, line)]
    assert len(errors) == 1, f"expected one ERROR line in the {log.name} log, got:\n" + "\n".join(errors)
    return errors[0]


def peer_connect(pair: Pair, source: str = "127.0.0.1", tls: bool = True) -> socket.socket:
    """A connection to the cache as node fake-proxy (TLS when the pair runs it, unless tls=False)."""
    sock = socket.socket()
    sock.settimeout(IO_TIMEOUT)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", pair.port))
    if pair.pki is None or not tls:
        return sock
    return pair.pki.client("fake-proxy").wrap_socket(sock)


def read_events(sock: socket.socket, until: Callable[[wire.Event], bool] | None = None) -> list[wire.Event]:
    """Read peer frames until `until(event)` or EOF."""
    decoder = wire.FrameDecoder()
    events: list[wire.Event] = []
    while True:
        while (event := decoder.next_event()) is not None:
            events.append(event)
            if until is not None and until(event):
                return events
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            return events
        decoder.feed(data)


def fake_proxy(pair: Pair, checkpoint: str, digest: wire.Digest = wire.Digest.SHA256) -> socket.socket:
    """Node fake-proxy, past HELLO, has begun checkpoint `fake-proxy-<checkpoint>`."""
    sock = peer_connect(pair)
    auth = wire.Auth.NONE if pair.pki is None else wire.Auth.TLS
    sock.sendall(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, "fake-proxy", digest, auth)))
    events = read_events(sock, until=lambda e: isinstance(e, wire.Hello))
    assert isinstance(events[-1], wire.Hello) and events[-1].role is wire.Role.CACHE
    assert events[-1].digest is digest, "the cache must verify with the digest the proxy offers"
    sock.sendall(wire.encode_checkpoint_begin(f"fake-proxy-{checkpoint}"))
    return sock


def wait_received_eof(sock: socket.socket) -> list[wire.Event]:
    """The daemon must drop the connection: read until EOF (bounded by the socket timeout)."""
    return read_events(sock)


# ---- the normal paths --------------------------------------------------------------------

def test_interleaved_files(daemons):
    pair = daemons()
    client = criu_sim.DumpClient(pair.proxy_dir)
    images = checkpoint_images("interleaved", big=3_000_000)
    open_now = ["pagemap-1.img", "pages-1.img", "core-1.img", "mm-1.img"]
    fds = {name: client.open_image(name) for name in open_now}
    offsets = dict.fromkeys(open_now, 0)
    step = 4096
    while any(offsets[name] < len(images[name]) for name in open_now):
        for name in open_now:  # a little of each, in turn, with all pipes open
            chunk = images[name][offsets[name]:offsets[name] + step]
            criu_sim.write_all(fds[name], chunk)
            offsets[name] += len(chunk)
    for name in reversed(open_now):
        os.close(fds[name])
    for name, data in images.items():
        if name not in open_now:
            client.write_image(name, data)
    client.close()
    pair.proxy_log.wait_for(r"captured: 9 files")
    pair.cache_log.wait_for(r"complete from .*9 files.*xxh3-128 digests verified")
    assert_restores(restore(pair.cache_dir, restore_order(images)), images)
    pair.cache_log.wait_for(r"restored from the cache: 9 files served; its memory is released")
    pair.proxy_log.wait_for(r"releasing this node's copy")
    assert not pair.proxy_log.errors(new=False) and not pair.cache_log.errors(new=False)


def test_empty_files_never_opened_and_empty_image(daemons):
    pair = daemons()
    images = checkpoint_images("empty")
    client = criu_sim.DumpClient(pair.proxy_dir)
    client.write_image("empty-but-opened.img", b"")
    for name, data in images.items():
        client.write_image(name, data)
    client.close()
    got = restore(pair.cache_dir, [*restore_order(images), "empty-but-opened.img"])
    assert_restores(got, images)
    assert got["empty-but-opened.img"] == b"", "an image opened and closed empty exists, with no bytes"
    for name in RESTORE_ORDER_EXTRA:
        assert got[name] is None


def test_restore_connected_before_dump_and_absent_file_answered_once_complete(daemons):
    pair = daemons()
    images = checkpoint_images("early")
    waiting = Restore(pair.cache_dir, restore_order(images))
    pair.cache_log.wait_for(r"restore connected|listening")  # the restore is connected (accepted)
    assert not waiting.done.wait(0.3), "a restore waits for a checkpoint to arrive"
    dump(pair.proxy_dir, images)
    got = waiting.result()
    assert_restores(got, images)
    assert all(got[name] is None for name in RESTORE_ORDER_EXTRA)


def test_two_checkpoints_back_to_back(daemons):
    pair = daemons()
    first, second = checkpoint_images("first"), checkpoint_images("second")
    dump(pair.proxy_dir, first)
    dump(pair.proxy_dir, second)
    pair.cache_log.wait_for(r"complete from", count=2)
    assert_restores(restore(pair.cache_dir, restore_order(first)), first)
    pair.cache_log.wait_for(r"restored from the cache")
    assert_restores(restore(pair.cache_dir, restore_order(second)), second)
    pair.cache_log.wait_for(r"restored from the cache", count=2)
    assert not pair.cache_log.errors(new=False)


def test_back_to_back_dumps_keep_their_order(daemons):
    pair = daemons()
    tags = [f"order-{n}" for n in range(8)]
    for tag in tags:
        dump(pair.proxy_dir, checkpoint_images(tag))
    pair.cache_log.wait_for(r"complete from", count=len(tags))
    for tag in tags:
        images = checkpoint_images(tag)
        assert_restores(restore(pair.cache_dir, restore_order(images)), images)


def test_ten_thousand_small_files(daemons):
    pair = daemons()
    images = {f"file-{n}.img": f"small file {n}\n".encode() * (n % 7 + 1) for n in range(10_000)}
    images["inventory.img"] = b"inventory of 10000"
    dump(pair.proxy_dir, images)
    pair.cache_log.wait_for(r"complete from .*10001 files.*digests verified", timeout=60)
    got = restore(pair.cache_dir, ["inventory.img", *images, "missing.img"])
    assert got["missing.img"] is None
    del got["missing.img"]
    assert got == images


def _digest_of_restore(client: criu_sim.RestoreClient, name: str) -> tuple[int, bytes]:
    """read_image without holding the bytes: size and SHA-256 of what the pipe delivers."""
    client.sock.sendall(criu_wire.encode_request(name))
    assert client._reply(), f"{name} answered absent"
    read_end, write_end = os.pipe()
    socket.send_fds(client.sock, [b"\0"], [write_end])
    os.close(write_end)
    hasher, size = hashlib.sha256(), 0
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(1 << 20):
            hasher.update(chunk)
            size += len(chunk)
    return size, hasher.digest()


def test_one_gib_file(daemons):
    pair = daemons(memory_limit="3GiB")
    block = os.urandom(1 << 20)
    hasher = hashlib.sha256()
    client = criu_sim.DumpClient(pair.proxy_dir)
    fd = client.open_image("pages-1.img")
    for n in range(1024):
        chunk = n.to_bytes(8, "big") + block[8:]
        hasher.update(chunk)
        criu_sim.write_all(fd, chunk)
    os.close(fd)
    client.write_image("inventory.img", b"inv")
    client.close()
    restorer = criu_sim.RestoreClient(pair.cache_dir)
    restorer.sock.settimeout(IO_TIMEOUT * 2)
    try:
        assert restorer.read_image("inventory.img") == b"inv"
        assert _digest_of_restore(restorer, "pages-1.img") == (1 << 30, hasher.digest())
    finally:
        restorer.close()
    pair.cache_log.wait_for(r"restored from the cache: 2 files served")


def test_rollback_restore_from_the_proxy(daemons):
    pair = daemons()
    images = checkpoint_images("rollback")
    dump(pair.proxy_dir, images)
    pair.proxy_log.wait_for(r"forwarded to .*verified by the cache")
    assert_restores(restore(pair.proxy_dir, restore_order(images)), images)
    pair.proxy_log.wait_for(r"restored from the proxy: 9 files served")
    pair.proxy_log.wait_for(r"restored on this node \(rollback\); .* told to drop its copy")
    pair.cache_log.wait_for(r"restored on its source .* this copy is dropped")
    later = checkpoint_images("after-rollback")
    dump(pair.proxy_dir, later)
    # The next restore on the cache gets the next checkpoint, never the rolled-back one.
    assert_restores(restore(pair.cache_dir, restore_order(later)), later)


# ---- a dump that dies ----------------------------------------------------------------------

DYING_DUMP = textwrap.dedent("""
    import os, sys
    from imgmig import criu_sim
    client = criu_sim.DumpClient(sys.argv[1])
    client.write_image("seccomp.img", b"s" * 100)
    pages = client.open_image("pages-1.img")
    pagemap = client.open_image("pagemap-1.img")
    criu_sim.write_all(pages, b"garbage-to-be" * 100_000)
    criu_sim.write_all(pagemap, b"m" * 1000)
    print("ready", flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("how", ["killed", "closed-without-inventory"])
def test_dump_dying_midway(daemons, how):
    pair = daemons()
    earlier = checkpoint_images("earlier")
    dump(pair.proxy_dir, earlier)
    pair.cache_log.wait_for(r"complete from")
    pair.set_marks()
    # a restore that already has the earlier checkpoint is not involved; a second restore waits
    if how == "killed":
        child = subprocess.Popen([PYTHON, "-c", DYING_DUMP, str(pair.proxy_dir)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert child.stdout.readline() == b"ready\n"
        pair.cache_log.wait_for(r"begins from", new=True)
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()
    else:
        client = criu_sim.DumpClient(pair.proxy_dir)
        client.write_image("seccomp.img", b"s" * 100)
        client.write_image("pages-1.img", b"p" * 100_000)
        client.close()
    proxy_error = one_error(pair.proxy_log, r"checkpoint .* failed: the dump ended without inventory.img",
                            ignore=FORWARDER_ECHO)
    assert "dump again" in proxy_error
    # the reason is "did not finish" (CHECKPOINT_END clean=0) or, when the proxy closes with unread
    # ACKs and the kernel sends RST, "connection reset": either way the checkpoint fails here too
    cache_error = one_error(pair.cache_log, r"checkpoint \S+ from .* failed: .*dump again")
    assert "dump again" in cache_error
    # the earlier checkpoint is untouched; the failed one is never served; the next good one is
    assert_restores(restore(pair.cache_dir, restore_order(earlier)), earlier)
    later = checkpoint_images("later")
    waiting = Restore(pair.cache_dir, restore_order(later))
    dump(pair.proxy_dir, later)
    assert_restores(waiting.result(), later)


def test_dump_dies_while_a_restore_waits(daemons):
    pair = daemons()
    images = checkpoint_images("after-failure")
    waiting = Restore(pair.cache_dir, restore_order(images))
    client = criu_sim.DumpClient(pair.proxy_dir)
    client.write_image("pages-1.img", b"garbage" * 10_000)
    client.close()
    pair.cache_log.wait_for(r"checkpoint \S+ from .* failed: .*dump again")
    assert not waiting.done.wait(0.3), "a waiting restore is not answered from a failed checkpoint"
    dump(pair.proxy_dir, images)
    assert_restores(waiting.result(), images)


# ---- the peer link breaks --------------------------------------------------------------------

def test_fake_proxy_drops_mid_file(daemons):
    """A proxy that never comes back: its part is kept cache.resume_for seconds, then dropped,
    and a restore that waited on it goes on to the next checkpoint."""
    pair = daemons(cache_keys={"resume_for": 1})
    waiting = Restore(pair.cache_dir, restore_order(checkpoint_images("good")))
    pair.set_marks()
    sock = fake_proxy(pair, "fake-1")
    sock.sendall(wire.encode_file_begin(0, "pages-1.img"))
    sock.sendall(wire.encode_file_data_header(0, 0, 100_000) + b"x" * 5000)
    pair.cache_log.wait_for(r"checkpoint fake-proxy-fake-1 begins from fake-proxy")
    sock.close()
    pair.cache_log.wait_for(r"link from fake-proxy .* lost mid-checkpoint fake-proxy-fake-1 "
                            r".*kept 1 s for the proxy to resume")
    error = one_error(pair.cache_log, r"checkpoint fake-proxy-fake-1 from fake-proxy .* failed: its proxy did not "
                                      r"come back within 1 s \(cache.resume_for\)")
    assert "dump again" in error
    images = checkpoint_images("good")
    dump(pair.proxy_dir, images)
    assert_restores(waiting.result(), images)


def test_cache_killed_mid_transfer_keeps_checkpoint_for_rollback(daemons):
    pair = daemons(proxy_keys={"reconnect_for": 1})
    pair.set_marks()
    images = checkpoint_images("rollback-after-cache-death", big=64 << 20)
    client = criu_sim.DumpClient(pair.proxy_dir)
    pages = client.open_image("pages-1.img")
    criu_sim.write_all(pages, images["pages-1.img"][:8 << 20])
    pair.cache_log.wait_for(r"begins from test-node")
    # the cache logs "begins" as it queues BEGUN: the proxy has it once it says it forwards
    pair.proxy_log.wait_for(r"checkpoint test-node-\S+: forwarding to")
    pair.cache.kill()
    criu_sim.write_all(pages, images["pages-1.img"][8 << 20:])
    os.close(pages)
    for name, data in images.items():
        if name != "pages-1.img":
            client.write_image(name, data)
    client.close()
    pair.proxy_log.wait_for(r"captured: 9 files")
    pair.proxy_log.wait_for(r"link to .* lost while it carried checkpoint .*reconnecting for up to 1 s")
    error = one_error(pair.proxy_log, r"forwarding checkpoint .* failed: .*no working link for 1 s; "
                                      r"the checkpoint stays on this node")
    assert "rollback" in error
    assert_restores(restore(pair.proxy_dir, restore_order(images)), images)


# ---- bad input on each socket -------------------------------------------------------------------

GARBAGE = {
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "oversized-length": LEN.pack(0x7FFFFFFF) + b"x" * 16,
    "bad-protobuf": LEN.pack(3) + b"\x0a\x05a",
    "bad-name": criu_wire.encode_request("../../etc/passwd"),
}


def earlier_checkpoint(pair: Pair) -> dict[str, bytes]:
    """A checkpoint on both nodes before the bad input: it must come through untouched."""
    earlier = checkpoint_images("untouched")
    dump(pair.proxy_dir, earlier)
    pair.cache_log.wait_for(r"complete from")
    pair.proxy_log.wait_for(r"forwarded to")
    pair.set_marks()
    return earlier


def still_serving(pair: Pair, earlier: dict[str, bytes]) -> None:
    """The earlier checkpoint restores intact, and a new one goes through."""
    assert_restores(restore(pair.cache_dir, restore_order(earlier)), earlier)
    good_checkpoint(pair, "after-bad-input")


def refused_in_one_line(pair: Pair, sock: socket.socket, pattern: str, earlier: dict[str, bytes]) -> None:
    """The cache answered a forged proxy with ERROR and closed the connection, logged one
    ERROR line matching `pattern`, and still serves."""
    events = wait_received_eof(sock)
    sock.close()
    assert isinstance(events[-1], wire.Error), events
    one_error(pair.cache_log, pattern)
    still_serving(pair, earlier)


@pytest.mark.parametrize("kind", GARBAGE)
def test_garbage_on_capture_socket(daemons, kind):
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    sock = criu_sim.connect(pair.proxy_dir)
    sock.settimeout(IO_TIMEOUT)
    sock.sendall(GARBAGE[kind])
    assert sock.recv(1) == b"", "the capture connection is dropped"
    sock.close()
    error = one_error(pair.proxy_log, r"checkpoint .* failed: protocol error from CRIU", ignore=FORWARDER_ECHO)
    assert "dump again" in error
    still_serving(pair, earlier)


def test_more_fds_than_requests_on_capture_socket(daemons):
    """Pipe fds passed without requests: one refusal line, every one of them closed."""
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    fd_dir = Path(f"/proc/{pair.proxy.process.pid}/fd")
    before = len(list(fd_dir.iterdir()))
    pipes = [os.pipe() for _ in range(3)]
    sock = criu_sim.connect(pair.proxy_dir)
    sock.settimeout(IO_TIMEOUT)
    socket.send_fds(sock, [b"\0"], [r for r, _ in pipes])
    assert sock.recv(1) == b"", "the capture connection is dropped"
    sock.close()
    one_error(pair.proxy_log, r"protocol error from CRIU: 3 pipe fds passed without the requests",
              ignore=FORWARDER_ECHO)
    for r, w in pipes:
        os.close(r)
        os.close(w)
    wait_until(lambda: len(list(fd_dir.iterdir())) <= before, 10, "the proxy to close the fds CRIU passed")
    still_serving(pair, earlier)


@pytest.mark.parametrize("kind", GARBAGE)
def test_garbage_on_serve_socket(daemons, kind):
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    for images_dir, log in ((pair.cache_dir, pair.cache_log), (pair.proxy_dir, pair.proxy_log)):
        sock = criu_sim.connect(images_dir, serve=True)
        sock.settimeout(IO_TIMEOUT)
        sock.sendall(GARBAGE[kind])
        assert sock.recv(1) == b"", "the restore connection is dropped"
        sock.close()
        one_error(log, r"restore connection on the (cache|proxy): protocol error from CRIU: .*connection dropped")
    still_serving(pair, earlier)


@pytest.mark.parametrize("data, reason", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", r"unknown frame type|length"),
    (struct.pack(">IB", 0x7FFFFFFF, wire.FrameType.HELLO), r"length"),
    (struct.pack(">IB", 0x7FFFFFFF, wire.FrameType.FILE_DATA), r"payload length"),
    (wire.encode_checkpoint_begin("no-hello"), r"expected HELLO first"),
    (wire.encode_hello(wire.Hello(5, wire.Role.PROXY, "future")), r"version 5"),
    (wire.encode_hello(wire.Hello(1, wire.Role.PROXY, "past")), r"version 1"),
])
def test_garbage_on_cache_tcp(daemons, data, reason):
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    sock = peer_connect(pair)
    sock.sendall(data)
    events = wait_received_eof(sock)
    sock.close()
    assert [type(e) for e in events] == [wire.Error], events
    error = one_error(pair.cache_log, r"connection from 127\.0\.0\.1 refused: .*" + f"({reason})")
    assert error
    still_serving(pair, earlier)


@pytest.mark.parametrize("where", ["capture", "serve", "cache-tcp"])
def test_fewer_than_four_bytes_then_gone(daemons, where):
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    if where == "cache-tcp":
        sock = peer_connect(pair)
        log = pair.cache_log
    else:
        sock = criu_sim.connect(pair.proxy_dir, serve=where == "serve")
        log = pair.proxy_log
    sock.sendall(b"\x0f\x00")
    sock.close()
    one_error(log, {"capture": r"checkpoint .* failed: CRIU closed the connection in the middle of a message",
                    "serve": r"restore connection .* closed .*in the middle of a message",
                    "cache-tcp": r"connection from 127\.0\.0\.1 .*closed .*incomplete frame"}[where],
              ignore=FORWARDER_ECHO)
    still_serving(pair, earlier)


def test_address_not_allowed(daemons):
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    sock = peer_connect(pair, source="127.0.0.2", tls=False)  # refused before any handshake
    sock.sendall(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, "intruder")))
    events = wait_received_eof(sock)
    sock.close()
    assert len(events) == 1 and isinstance(events[0], wire.Error), events
    assert events[0].code == wire.ErrorCode.REFUSED
    error = one_error(pair.cache_log, r"connection from 127\.0\.0\.2 refused: not in cache\.allow")
    assert str(pair.config) in error
    still_serving(pair, earlier)


def test_digest_mismatch_never_served(daemons):
    pair = daemons()
    good = checkpoint_images("after-bad-digest")
    waiting = Restore(pair.cache_dir, restore_order(good))
    pair.set_marks()
    sock = fake_proxy(pair, "bad-digest")
    bad_inventory = b"forged inventory"
    sock.sendall(wire.encode_file_begin(0, "inventory.img")
                 + wire.encode_file_data(0, 0, bad_inventory)
                 + wire.encode_file_end(0, len(bad_inventory), hashlib.sha256(b"something else").digest()))
    events = wait_received_eof(sock)
    sock.close()
    assert isinstance(events[-1], wire.Error) and events[-1].code == wire.ErrorCode.DIGEST_MISMATCH, events
    one_error(pair.cache_log,
              r"refused: inventory\.img: sha256 digest mismatch.*checkpoint fake-proxy-bad-digest is dropped")
    dump(pair.proxy_dir, good)
    got = waiting.result()
    assert got["inventory.img"] != bad_inventory
    assert_restores(got, good)


def test_fake_proxy_duplicate_file(daemons):
    pair = daemons()
    pair.set_marks()
    sock = fake_proxy(pair, "dup")
    sock.sendall(wire.encode_file_begin(0, "a.img") + wire.encode_file_begin(1, "a.img"))
    events = wait_received_eof(sock)
    sock.close()
    assert isinstance(events[-1], wire.Error) and events[-1].code == wire.ErrorCode.DUPLICATE_FILE, events
    one_error(pair.cache_log, r"refused: file a\.img sent twice")
    good_checkpoint(pair, "after-duplicate")


# ---- the memory limit ----------------------------------------------------------------------------

def test_memory_limit_back_pressure_loses_nothing(daemons):
    """Two 40 MiB checkpoints through a 64 MiB limit: the second waits (and says so) until the
    first is restored, then arrives whole."""
    pair = daemons(memory_limit="64MiB")
    first = checkpoint_images("limit-1", big=40 << 20)
    second = checkpoint_images("limit-2", big=40 << 20)
    dump(pair.proxy_dir, first)
    pair.cache_log.wait_for(r"complete from")
    dumping = threading.Thread(target=dump, args=(pair.proxy_dir, second), daemon=True)
    dumping.start()
    pair.cache_log.wait_for(r"memory limit reached: .* of 64\.0 MiB; receiving from .* waits")
    assert not pair.cache_log.matching(r"complete from", new=False)[1:], "the second cannot be complete yet"
    assert_restores(restore(pair.cache_dir, restore_order(first)), first)
    dumping.join(IO_TIMEOUT)
    assert not dumping.is_alive(), "the dump went on once memory was released"
    assert_restores(restore(pair.cache_dir, restore_order(second)), second)


def test_failed_dump_is_one_error_line_on_the_proxy(daemons):
    pair = daemons()
    pair.set_marks()
    client = criu_sim.DumpClient(pair.proxy_dir)
    client.write_image("pages-1.img", b"p" * 100_000)
    pair.cache_log.wait_for(r"begins from")
    client.close()
    pair.cache_log.wait_for(r"checkpoint \S+ from .* failed: .*dump again")
    one_error(pair.proxy_log, r"checkpoint .* failed: the dump ended without inventory.img")
    assert not pair.proxy_log.matching(r"stays on this node", new=True), "a dropped checkpoint is not kept"


def test_sigterm_stops_daemons_mid_checkpoint(daemons):
    pair = daemons()
    client = criu_sim.DumpClient(pair.proxy_dir)
    pages = client.open_image("pages-1.img")
    criu_sim.write_all(pages, b"p" * 100_000)
    pair.cache_log.wait_for(r"begins from")
    for daemon in (pair.proxy, pair.cache):
        daemon.process.send_signal(signal.SIGTERM)
    wait_until(lambda: pair.proxy.process.poll() is not None and pair.cache.process.poll() is not None,
               30, "both daemons to exit on SIGTERM")
    assert pair.proxy.process.returncode == 0 and pair.cache.process.returncode == 0
    os.close(pages)
    client.close()
    assert not (pair.proxy_dir / "streamer-capture.sock").exists(), "socket files are removed on exit"


WEDGED_DUMP = textwrap.dedent("""
    import os, sys
    from imgmig import criu_sim
    client = criu_sim.DumpClient(sys.argv[1])
    pages = client.open_image("pages-1.img")
    print("ready", flush=True)
    criu_sim.write_all(pages, b"w" * (12 << 20))
""")


def test_dump_dying_while_waiting_for_memory_frees_it(daemons):
    """A dump blocked by the proxy's memory limit (an earlier checkpoint, not yet delivered,
    holds most of it) that then dies must not hold that memory forever: the capture notices
    CRIU is gone, fails the checkpoint and releases it."""
    pair = daemons(memory_limit="16MiB", roles=("proxy",))
    dump(pair.proxy_dir, checkpoint_images("held", big=10 << 20))
    pair.proxy_log.wait_for(r"captured: 9 files")
    child = subprocess.Popen([PYTHON, "-c", WEDGED_DUMP, str(pair.proxy_dir)], stdout=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert child.stdout.readline() == b"ready\n"
        pair.proxy_log.wait_for(r"memory limit reached: .* of 16\.0 MiB; checkpoint \S+ capture waits")
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    pair.proxy_log.wait_for(r"checkpoint .* failed: the dump ended without inventory.img")
    after = checkpoint_images("after-wedge", big=1000)
    dump(pair.proxy_dir, after)
    pair.proxy_log.wait_for(r"captured: 9 files", count=2)


def test_sha256_digest_when_configured(daemons):
    pair = daemons(digest="sha256")
    images = checkpoint_images("sha256")
    dump(pair.proxy_dir, images)
    pair.cache_log.wait_for(r"complete from .*sha256 digests verified")
    assert_restores(restore(pair.cache_dir, restore_order(images)), images)


def test_xxh3_digest_mismatch_never_served(daemons):
    """The faster digest is checked as strictly as SHA-256: a forged file is refused."""
    pair = daemons()
    pair.set_marks()
    sock = fake_proxy(pair, "bad-xxh3", wire.Digest.XXH3_128)
    forged = b"forged inventory"
    sock.sendall(wire.encode_file_begin(0, "inventory.img") + wire.encode_file_data(0, 0, forged)
                 + wire.encode_file_end(0, len(forged), xxhash.xxh3_128(b"something else").digest()))
    events = wait_received_eof(sock)
    sock.close()
    assert isinstance(events[-1], wire.Error) and events[-1].code == wire.ErrorCode.DIGEST_MISMATCH, events
    one_error(pair.cache_log, r"refused: inventory\.img: xxh3-128 digest mismatch")
