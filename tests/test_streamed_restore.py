"""A restore on the cache that starts before the transfer ends (docs/protocol.md, FILES_LISTED).

Once the dump ended, the proxy lists the checkpoint's files ahead of the page bytes still
queued: the cache answers "absent" at once and serves the pages image as it arrives,
holding its last byte back until the digest matched. Run against the real imgmig-cache;
the proxy side is forged over real TCP so that the test decides when each byte arrives,
and the restore side is CRIU's stream protocol with a real pipe.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import time

from test_daemons_sim import (
    IO_TIMEOUT,
    earlier_checkpoint,
    fake_proxy,
    good_checkpoint,
    peer_connect,
    read_events,
    refused_in_one_line,
    wait_received_eof,
)

from imgmig import criu_sim
from imgmig.protocol import criu_wire
from imgmig.protocol import peer_wire as wire

MIB = 1 << 20
INVENTORY = b"inventory.img: CRIU writes it last and a restore reads it first"


def pattern(n: int, seed: int) -> bytes:
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * 128  # 4 KiB
    return (block * (n // len(block) + 1))[:n]


def file_data(file_id: int, offset: int, data: bytes) -> bytes:
    return b"".join(wire.encode_file_data(file_id, offset + at, data[at:at + MIB]) for at in range(0, len(data), MIB))


def whole_file(file_id: int, name: str, data: bytes) -> bytes:
    return (wire.encode_file_begin(file_id, name) + wire.encode_file_data(file_id, 0, data)
            + wire.encode_file_end(file_id, len(data), hashlib.sha256(data).digest()))


def dump_ended_with_pages_on_their_way(sock: socket.socket, first: bytes) -> None:
    """What a proxy sends when the dump ended while part of the pages is still queued."""
    sock.sendall(wire.encode_file_begin(0, "pages-1.img") + file_data(0, 0, first)
                 + whole_file(1, "inventory.img", INVENTORY) + wire.encode_files_listed(2))


class StreamRestore:
    """`criu restore --stream`, one request at a time, with a real pipe per image."""

    def __init__(self, cache_dir) -> None:
        self.client = criu_sim.RestoreClient(cache_dir)
        self.client.sock.settimeout(IO_TIMEOUT)

    def ask(self, name: str) -> None:
        self.client.sock.sendall(criu_wire.encode_request(name))

    def answer(self) -> bool:
        return self.client._reply()

    def pipe(self) -> int:
        """Pass the pipe's write end as CRIU does; the read end is ours."""
        read_end, write_end = os.pipe()
        socket.send_fds(self.client.sock, [b"\0"], [write_end])
        os.close(write_end)
        return read_end

    def close(self) -> None:
        self.client.close()


def claimed_and_granted(sock: socket.socket, checkpoint: str, restore: StreamRestore) -> None:
    """The restore's first request makes the cache ask the (forged) proxy for the right."""
    restore.ask("inventory.img")
    read_events(sock, until=lambda event: isinstance(event, wire.Claim))
    sock.sendall(wire.encode_grant(True, checkpoint, "test-node (the destination)"))
    assert restore.answer(), "inventory.img is there"


def reading_the_pages(pair, restore: StreamRestore, name: str, first: bytes) -> tuple[socket.socket, int, bytes]:
    """A forged proxy sent `first` bytes of pages-1.img, inventory.img and FILES_LISTED; the
    restore read inventory.img and reads pages-1.img. Returns the proxy's socket, the
    restore's pipe, and what came through it: all of `first` but its held-back last byte."""
    sock = fake_proxy(pair, name)
    dump_ended_with_pages_on_their_way(sock, first)
    claimed_and_granted(sock, f"fake-proxy-{name}", restore)
    assert read_to_eof(restore.pipe()) == INVENTORY
    restore.ask("pages-1.img")
    assert restore.answer()
    pages = restore.pipe()
    return sock, pages, read_exactly(pages, len(first) - 1)


def resumed(pair, checkpoint: str) -> tuple[socket.socket, wire.Begun]:
    """The forged proxy connects again and resumes `checkpoint`: its socket, and BEGUN."""
    again = peer_connect(pair)
    auth = wire.Auth.NONE if pair.pki is None else wire.Auth.TLS
    again.sendall(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, "fake-proxy", auth=auth))
                  + wire.encode_checkpoint_begin(checkpoint, resume=True))
    return again, read_events(again, until=lambda event: isinstance(event, wire.Begun))[-1]


def the_rest_after_a_resume(sock: socket.socket, whole: bytes, held: int) -> None:
    """FILES_LISTED again (every connection says it), pages-1.img from what the cache
    holds, and the ends of the file and of the checkpoint."""
    sock.sendall(wire.encode_files_listed(2) + file_data(0, held, whole[held:])
                 + wire.encode_file_end(0, len(whole), hashlib.sha256(whole).digest())
                 + wire.encode_checkpoint_end(True, 2, len(whole) + len(INVENTORY)))


def read_over_two_connections(pair, checkpoint: str, again: socket.socket, restore: StreamRestore, pages: int,
                              got: bytes, whole: bytes) -> None:
    """The restore reads the rest of the pages: exactly `whole` with what it `got` before
    the cut; the checkpoint ends well and counts as restored."""
    assert got + read_to_eof(pages) == whole, "the restore read exactly the pages sent, over two connections"
    os.close(pages)
    assert read_events(again, until=lambda event: isinstance(event, wire.CheckpointDone))[-1].ok
    restore.close()
    pair.cache_log.wait_for(rf"checkpoint {checkpoint} restored from the cache: 2 files served")
    again.close()


def read_exactly(fd: int, n: int) -> bytes:
    got = bytearray()
    deadline = time.monotonic() + IO_TIMEOUT
    while len(got) < n:
        assert readable(fd, deadline - time.monotonic()), f"{len(got)} of {n} bytes came"
        chunk = os.read(fd, n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


def read_to_eof(fd: int) -> bytes:
    got = bytearray()
    deadline = time.monotonic() + IO_TIMEOUT
    while True:
        assert readable(fd, deadline - time.monotonic()), "the pipe neither ended nor carried more"
        chunk = os.read(fd, MIB)
        if not chunk:
            return bytes(got)
        got += chunk


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], max(0.0, timeout))[0])


def test_a_restore_reads_the_pages_as_they_arrive_and_the_last_byte_once_verified(daemons):
    pair = daemons()
    restore = StreamRestore(pair.cache_dir)
    sock = fake_proxy(pair, "streamed")
    first, rest = pattern(3 * MIB, 1), pattern(2 * MIB + 5, 2)
    dump_ended_with_pages_on_their_way(sock, first)
    claimed_and_granted(sock, "fake-proxy-streamed", restore)
    assert read_to_eof(restore.pipe()) == INVENTORY
    restore.ask("memfd.img")
    assert not restore.answer(), "FILES_LISTED said the dump wrote no memfd.img: absent before the transfer ends"
    restore.ask("pages-1.img")
    assert restore.answer()
    pages = restore.pipe()
    assert read_exactly(pages, len(first) - 1) == first[:-1], "the pages that arrived are served"
    assert not readable(pages, 0.5), "the image's last byte arrived, but its digest has not: it waits"
    whole = first + rest
    sock.sendall(file_data(0, len(first), rest) + wire.encode_file_end(0, len(whole), hashlib.sha256(whole).digest())
                 + wire.encode_checkpoint_end(True, 2, len(whole) + len(INVENTORY)))
    assert first[:-1] + read_to_eof(pages) == whole, "the restore read exactly what was sent"
    os.close(pages)
    done = read_events(sock, until=lambda event: isinstance(event, wire.CheckpointDone))
    assert done[-1] == wire.CheckpointDone(True, "2 files verified")
    restore.close()
    pair.cache_log.wait_for(r"checkpoint fake-proxy-streamed restored from the cache: 2 files served")
    assert not pair.cache_log.errors(new=False)
    sock.close()


def test_a_digest_mismatch_breaks_a_restore_that_read_all_but_the_last_byte(daemons):
    """A forged (or corrupted) pages image: the restore read every byte but the last
    before the digest was checked; the mismatch fails the checkpoint and closes the
    restore's pipe, so CRIU can never resume the process; the cache serves on."""
    pair = daemons()
    pair.set_marks()
    restore = StreamRestore(pair.cache_dir)
    first, rest = pattern(2 * MIB, 3), pattern(MIB, 4)
    sock, pages, got = reading_the_pages(pair, restore, "forged-pages", first)
    sock.sendall(file_data(0, len(first), rest)
                 + wire.encode_file_end(0, len(first) + len(rest), hashlib.sha256(b"other bytes").digest()))
    events = wait_received_eof(sock)
    assert isinstance(events[-1], wire.Error) and events[-1].code == wire.ErrorCode.DIGEST_MISMATCH, events
    got += read_to_eof(pages)
    assert len(got) < len(first) + len(rest), "the restore never read the whole forged image"
    os.close(pages)
    restore.close()
    sock.close()
    pair.cache_log.wait_for(r"restore from checkpoint fake-proxy-forged-pages stopped: .*failed", new=True)
    assert len(pair.cache_log.errors()) == 2, pair.cache_log.errors()  # the refusal, and the broken restore
    good_checkpoint(pair, "after-forged-pages")


def test_no_file_begins_after_files_listed(daemons):
    """FILES_LISTED lets a restore be told an image is absent: a proxy that then sends a
    new file is refused in one line, and nothing of that checkpoint is served."""
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    sock = fake_proxy(pair, "late-file")
    sock.sendall(whole_file(0, "inventory.img", INVENTORY) + wire.encode_files_listed(1)
                 + whole_file(1, "memfd.img", b"a file the restore was told was absent"))
    refused_in_one_line(pair, sock, r"connection from fake-proxy .* refused: FILE_BEGIN for memfd\.img after "
                                    r"FILES_LISTED said 1 files", earlier)


def test_files_listed_with_a_wrong_count_is_refused(daemons):
    pair = daemons()
    earlier = earlier_checkpoint(pair)
    sock = fake_proxy(pair, "miscounted")
    sock.sendall(whole_file(0, "inventory.img", INVENTORY) + wire.encode_files_listed(5))
    refused_in_one_line(pair, sock, r"connection from fake-proxy .* refused: FILES_LISTED counts 5 files, 1 were begun",
                        earlier)


def test_a_link_cut_while_a_restore_reads_the_pages_is_resumed_under_it(daemons):
    """The link drops while the restore is reading the pages: the restore keeps waiting,
    the proxy resumes from what the cache holds, and the restore reads the exact bytes."""
    pair = daemons()
    restore = StreamRestore(pair.cache_dir)
    checkpoint = "fake-proxy-cut-while-read"
    first, rest = pattern(3 * MIB, 5), pattern(MIB + 100, 6)
    sock, pages, got = reading_the_pages(pair, restore, "cut-while-read", first)
    sock.close()
    pair.cache_log.wait_for(rf"lost mid-checkpoint {checkpoint}")
    again, begun = resumed(pair, checkpoint)
    assert begun == wire.Begun(wire.BeginStatus.RESUMED, checkpoint, 2, ((0, len(first)),)), begun
    the_rest_after_a_resume(again, first + rest, len(first))
    read_over_two_connections(pair, checkpoint, again, restore, pages, got, first + rest)


def test_a_link_cut_mid_frame_into_a_kept_memfd_is_resumed_with_the_exact_bytes(daemons):
    """The pages of a checkpoint that follows a restored one are written in place into the
    memfd that one left (its lasting mapping, Image.window), over its old bytes. The link
    drops in the middle of a frame's payload, under a reading restore: the proxy resumes
    from what the cache says it holds, and the restore reads exactly the new bytes,
    nothing of the old ones."""
    from conftest import wait_until
    from test_daemons_sim import assert_restores, checkpoint_images, dump, restore_order
    from test_daemons_sim import restore as restore_all
    from test_memfd_reuse import held_images, kept_inodes

    pair = daemons()
    cache_pid = pair.cache.process.pid
    earlier = checkpoint_images("leaves-its-memfd") | {"pages-1.img": pattern(8 * MIB, 10)}
    dump(pair.proxy_dir, earlier)
    assert_restores(restore_all(pair.cache_dir, restore_order(earlier)), earlier)
    wait_until(lambda: not held_images(cache_pid) and len(kept_inodes(cache_pid)) == 1, 10,
               "the cache keeps the restored checkpoint's page memfd")
    kept = kept_inodes(cache_pid)
    checkpoint = "fake-proxy-cut-in-place"
    restore = StreamRestore(pair.cache_dir)
    first, rest = pattern(3 * MIB, 11), pattern(2 * MIB + 100, 12)
    sock, pages, got = reading_the_pages(pair, restore, "cut-in-place", first)
    assert kept_inodes(cache_pid) == kept, "the new pages went into the kept memfd"
    half = wire.encode_file_data(0, len(first), rest[:MIB])
    sock.sendall(half[:len(half) - MIB // 2])  # the frame's header and half its payload
    time.sleep(0.2)
    sock.close()
    pair.cache_log.wait_for(rf"lost mid-checkpoint {checkpoint}")
    again, begun = resumed(pair, checkpoint)
    assert begun.status is wire.BeginStatus.RESUMED and begun.files == 2, begun
    ((file_id, held),) = begun.held
    assert file_id == 0 and len(first) <= held <= len(first) + MIB // 2, begun
    the_rest_after_a_resume(again, first + rest, held)
    read_over_two_connections(pair, checkpoint, again, restore, pages, got, first + rest)


def test_a_link_that_stalls_under_a_reading_restore_fails_it_without_the_last_byte(daemons):
    """The proxy goes silent after FILES_LISTED with the pages half sent: after
    cache.idle_timeout the checkpoint fails, the restore's pipe ends short of the image,
    and the cache serves the next checkpoint."""
    pair = daemons(cache_keys={"idle_timeout": 1})
    pair.set_marks()
    restore = StreamRestore(pair.cache_dir)
    first = pattern(2 * MIB, 7)
    sock, pages, got = reading_the_pages(pair, restore, "stalls-mid-pages", first)
    got += read_to_eof(pages)  # the stall: the cache ends the pipe once the checkpoint failed
    assert got == first[:-1], "nothing past what arrived, and not the held-back byte"
    os.close(pages)
    restore.close()
    events = wait_received_eof(sock)
    sock.close()
    assert isinstance(events[-1], wire.Error) and "idle_timeout" in events[-1].message, events
    pair.cache_log.wait_for(r"restore from checkpoint fake-proxy-stalls-mid-pages stopped: .*failed", new=True)
    good_checkpoint(pair, "after-the-stall")


def test_a_restore_that_dies_while_reading_the_pages_leaves_the_checkpoint_for_the_next(daemons):
    """CRIU dies with the pages half read: the cache lets the checkpoint go back to the
    waiting ones, the transfer ends, and the next restore reads every byte of it."""
    pair = daemons()
    checkpoint = "fake-proxy-reader-dies"
    restore = StreamRestore(pair.cache_dir)
    first, rest = pattern(2 * MIB, 8), pattern(MIB, 9)
    sock, pages, _ = reading_the_pages(pair, restore, "reader-dies", first)
    os.close(pages)
    restore.close()  # CRIU died
    pair.cache_log.wait_for(rf"restore of checkpoint {checkpoint} ended after 1 of 2 files; the checkpoint is kept")
    whole = first + rest
    sock.sendall(file_data(0, len(first), rest) + wire.encode_file_end(0, len(whole), hashlib.sha256(whole).digest())
                 + wire.encode_checkpoint_end(True, 2, len(whole) + len(INVENTORY)))
    assert read_events(sock, until=lambda event: isinstance(event, wire.CheckpointDone))[-1].ok
    again = StreamRestore(pair.cache_dir)
    again.ask("inventory.img")
    assert again.answer()
    assert read_to_eof(again.pipe()) == INVENTORY
    again.ask("pages-1.img")
    assert again.answer()
    pages = again.pipe()
    assert read_to_eof(pages) == whole, "the second restore reads the whole image"
    os.close(pages)
    again.close()
    pair.cache_log.wait_for(rf"checkpoint {checkpoint} restored from the cache: 2 files served")
    sock.close()


def test_a_checkpoint_that_outgrows_the_memory_limit_under_a_reading_restore_fails_it(daemons):
    """The pages keep coming past the cache's memory.limit while a restore reads them: the
    checkpoint is refused as too large, the restore's pipe ends without the held-back
    byte, and the cache serves the next checkpoint."""
    pair = daemons(memory_limit="8MiB")
    pair.set_marks()
    restore = StreamRestore(pair.cache_dir)
    first = pattern(3 * MIB, 10)
    sock, pages, got = reading_the_pages(pair, restore, "outgrows", first)
    sock.sendall(file_data(0, len(first), pattern(8 * MIB, 11)))
    events = wait_received_eof(sock)
    sock.close()
    assert isinstance(events[-1], wire.Error) and events[-1].code == wire.ErrorCode.TOO_LARGE, events
    got += read_to_eof(pages)
    assert len(got) < len(first) + 8 * MIB, "the restore never read the whole image"
    assert got == (first + pattern(8 * MIB, 11))[:len(got)], "what it read is what was sent"
    os.close(pages)
    restore.close()
    pair.cache_log.wait_for(r"restore from checkpoint fake-proxy-outgrows stopped: .*failed", new=True)
    good_checkpoint(pair, "after-the-oversized-one")
