"""Reused memfds (store.MemfdPool): a page image may be written into a released page
image's memfd. Its bytes must be exactly its own, its file size its own size once
complete, and the kept memory must count against the limit and leave under pressure."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time

import pytest

from imgmig.datapath import store as store_module
from imgmig.datapath.store import IMAGE_OVERHEAD, PAGE, ImageStore

MIB = 1 << 20


def pattern(tag: int, size: int) -> bytes:
    """Bytes that differ from every other tag's at every offset (tag < 251)."""
    return bytes((offset * 7 + tag) % 251 for offset in range(4096)) * (size // 4096) + bytes([tag]) * (size % 4096)


def fill(store: ImageStore, checkpoint, image, data: bytes, step: int = 300_000, after_each=None) -> None:
    """In uneven steps, as splices arrive; `after_each()` after each growth."""
    for start in range(0, len(data), step):
        chunk = data[start:start + step]
        os.pwrite(image.fd, chunk, image.size)
        store.grew(checkpoint, image, len(chunk))
        if after_each is not None:
            after_each()


def one_checkpoint(store: ImageStore, name: str, data: bytes):
    checkpoint = store.begin(name, "node")
    image = store.add_image(checkpoint, "pages-1.img")
    fill(store, checkpoint, image, data)
    store.finish_image(image, checkpoint=checkpoint)
    store.complete(checkpoint, clean=True)
    return checkpoint, image


def over_a_kept_memfd(store: ImageStore, kept: int):
    """A second checkpoint's page image, begun over the memfd the first one's (`kept`
    bytes) left in the pool."""
    first, _ = one_checkpoint(store, "cp-1", pattern(1, kept))
    store.restored(first)
    checkpoint = store.begin("cp-2", "node")
    return checkpoint, store.add_image(checkpoint, "pages-1.img")


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


class Hasher:
    def __init__(self) -> None:
        self.data = b""

    def update(self, view) -> None:
        self.data += bytes(view)


def test_a_smaller_image_in_a_reused_memfd_is_exactly_its_own_bytes():
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    first, image = one_checkpoint(store, "cp-1", pattern(1, 5 * MIB + 123))
    first_inode = inode(image.fd)
    store.restored(first)
    assert store.pool.held == 5 * MIB + 123, "the released page image's memfd is kept"
    smaller = pattern(2, 2 * MIB + 4001)  # ends mid-page: the rest of that page held pattern 1
    second, image = one_checkpoint(store, "cp-2", smaller)
    assert inode(image.fd) == first_inode, "the kept memfd was reused"
    assert store.pool.held == 0
    assert os.fstat(image.fd).st_size == len(smaller), "trimmed to its own size when complete"
    assert os.pread(image.fd, 8 * MIB, 0) == smaller, "nothing of the first image past its end"
    assert image.mapping is not None, "a reused memfd is hashed through its lasting mapping"
    mapped = Hasher()
    image.hash(mapped, 0, image.size)
    assert mapped.data == smaller
    assert image.charged == IMAGE_OVERHEAD + -(-len(smaller) // PAGE) * PAGE, "charged for its own pages"
    assert store.held == second.charged


def test_a_larger_image_and_a_third_checkpoint_reuse_too():
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    sizes = [3 * MIB + 17, 7 * MIB + 1, 1 * MIB + 2 * PAGE + 5]
    inodes = set()
    for tag, size in enumerate(sizes, start=1):
        data = pattern(tag, size)
        checkpoint, image = one_checkpoint(store, f"cp-{tag}", data)
        inodes.add(inode(image.fd))
        assert os.fstat(image.fd).st_size == size
        assert os.pread(image.fd, size + MIB, 0) == data
        seen = Hasher()  # in steps, the last ones past the lasting mapping (the image outgrew it)
        for start in range(0, size, 3 * MIB):
            image.hash(seen, start, min(3 * MIB, size - start))
        assert seen.data == data
        store.restored(checkpoint)
    assert len(inodes) == 1, "every checkpoint wrote into the same kept memfd"


def test_a_reused_image_is_written_in_place_through_its_mapping_then_spliced_past_it():
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    first, image = one_checkpoint(store, "cp-1", pattern(1, 3 * MIB + 5))
    assert image.window(0, MIB) is None, "a fresh memfd has no mapping to write through"
    store.restored(first)
    checkpoint = store.begin("cp-2", "node")
    image = store.add_image(checkpoint, "pages-1.img")
    data = pattern(2, 5 * MIB + 9)
    while image.size < len(data):
        window = image.window(image.size, 700_000)
        if window is None:  # past the kept memfd's bytes: as a splice would
            assert image.size >= 3 * MIB + 5, "a window up to the bytes the memfd held"
            written = os.pwrite(image.fd, data[image.size:image.size + 700_000], image.size)
        else:
            with window:
                assert len(window) == min(700_000, 3 * MIB + 5 - image.size), "clamped to the mapping"
                written = len(window)
                window[:] = data[image.size:image.size + written]
        store.grew(checkpoint, image, written)
    store.finish_image(image, checkpoint=checkpoint)
    assert os.fstat(image.fd).st_size == len(data)
    assert os.pread(image.fd, 8 * MIB, 0) == data, "the mapping's writes are the memfd's bytes"


def test_the_window_ends_at_the_file_not_at_a_longer_mapping_kept_from_a_larger_image():
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    for tag, size in enumerate([9 * MIB, 9 * MIB, 2 * MIB], start=1):  # the 2nd gets a 9 MiB mapping
        checkpoint, _ = one_checkpoint(store, f"cp-{tag}", pattern(tag, size))
        store.restored(checkpoint)
    checkpoint = store.begin("cp-4", "node")
    image = store.add_image(checkpoint, "pages-1.img")
    assert len(image.mapping) == 9 * MIB and os.fstat(image.fd).st_size == 2 * MIB
    with image.window(MIB, 4 * MIB) as window:
        assert len(window) == MIB, "past the file's end a write through the mapping faults"
    assert image.window(2 * MIB, MIB) is None


def test_an_unfinished_reused_image_charges_the_pages_it_holds():
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    checkpoint, image = over_a_kept_memfd(store, 8 * MIB)
    fill(store, checkpoint, image, pattern(2, MIB))
    assert store.held == IMAGE_OVERHEAD + 8 * MIB, "the old pages are still held until it completes"
    store.finish_image(image, checkpoint=checkpoint)
    assert store.held == IMAGE_OVERHEAD + MIB


def test_only_page_images_are_reused_and_the_others_stay_sealed():
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    checkpoint = store.begin("cp-1", "node")
    core = store.add_image(checkpoint, "core-1.img")
    fill(store, checkpoint, core, pattern(1, 2 * MIB))
    store.finish_image(core, checkpoint=checkpoint)
    assert fcntl.fcntl(core.fd, fcntl.F_GET_SEALS) & store_module.F_SEAL_FUTURE_WRITE, "sealed as before"
    store.complete(checkpoint, clean=True)
    store.restored(checkpoint)
    assert store.pool.held == 0, "a large image that is not a page image is freed"


def test_reuse_off_seals_page_images_and_keeps_nothing():
    store = ImageStore(64 * MIB)
    checkpoint, image = one_checkpoint(store, "cp-1", pattern(1, 2 * MIB))
    with pytest.raises(PermissionError):
        os.pwrite(image.fd, b"x", 0)
    store.restored(checkpoint)
    assert store.pool.held == 0


def test_the_pool_stays_within_its_limit_and_small_memfds_are_not_kept():
    store = ImageStore(64 * MIB, reuse=6 * MIB)
    big, _ = one_checkpoint(store, "cp-1", pattern(1, 8 * MIB))
    small, _ = one_checkpoint(store, "cp-2", pattern(2, 4096))
    fits, _ = one_checkpoint(store, "cp-3", pattern(3, 5 * MIB))
    for checkpoint in (big, small, fits):
        store.restored(checkpoint)
    assert store.pool.held == 5 * MIB, "8 MiB is over memory.reuse, 4 KiB under REUSE_MIN"


def test_kept_memfds_leave_when_images_need_the_room():
    store = ImageStore(12 * MIB, reuse=12 * MIB)
    first, _ = one_checkpoint(store, "cp-1", pattern(1, 6 * MIB))
    store.restored(first)
    assert store.pool.held == 6 * MIB
    checkpoint = store.begin("cp-2", "node")
    other = store.add_image(checkpoint, "core-1.img")  # not a page image: a fresh memfd
    fill(store, checkpoint, other, pattern(2, 8 * MIB))
    assert store.pool.held == 0, "images and the pool together never exceed memory.limit"
    assert store.room() == 12 * MIB - other.charged


def test_kept_memfds_are_freed_when_idle(monkeypatch):
    monkeypatch.setattr(store_module, "REUSE_IDLE", 0.05)
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    checkpoint, image = one_checkpoint(store, "cp-1", pattern(1, 2 * MIB))
    fd = image.fd
    store.restored(checkpoint)
    assert store.pool.held == 2 * MIB
    kept = inode(fd)
    wait_until_freed(store, fd, kept)
    assert store.pool.held == 0
    assert not is_open(fd, kept), "its memfd was closed"


def test_close_frees_the_pool():
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    checkpoint, image = one_checkpoint(store, "cp-1", pattern(1, 2 * MIB))
    fd = image.fd
    store.restored(checkpoint)
    store.close()
    assert store.pool.held == 0
    with pytest.raises(OSError):
        os.fstat(fd)


# ---- prepared before the freeze (ImageStore.prepare) ---------------------------------------

def kept_fds(store: ImageStore) -> list[int]:
    return [kept.fd for kept in store.pool._kept]


def is_open(fd: int, inode_number: int) -> bool:
    """fd still refers to that inode (the number may have gone to another file since)."""
    try:
        return inode(fd) == inode_number
    except OSError:
        return False


def wait_until_freed(store: ImageStore, fd: int, inode_number: int) -> None:
    """The expiry timer's thread takes the memfd out of the pool, then closes it: both."""
    deadline = time.monotonic() + 10
    while (store.pool.held or is_open(fd, inode_number)) and time.monotonic() < deadline:
        time.sleep(0.01)


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def test_a_prepared_memfd_is_allocated_and_taken_by_the_next_page_image():
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    assert store.prepare(8 * MIB) == 8 * MIB
    (fd,) = kept_fds(store)
    assert allocated(fd) == 8 * MIB, "every page allocated before the freeze, not as the bytes arrive"
    assert store.pool.held == 8 * MIB
    data = pattern(1, 5 * MIB + 123)
    _, image = one_checkpoint(store, "cp-1", data)
    assert inode(image.fd) == inode(fd), "the page image went into the prepared memfd"
    assert store.pool.held == 0
    assert os.fstat(image.fd).st_size == len(data), "trimmed to its own size when complete"
    assert os.pread(image.fd, 16 * MIB, 0) == data
    assert image.charged == IMAGE_OVERHEAD + -(-len(data) // PAGE) * PAGE


def test_a_prepared_memfd_is_written_in_place():
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    store.prepare(4 * MIB)
    checkpoint = store.begin("cp-1", "node")
    image = store.add_image(checkpoint, "pages-1.img")
    window = image.window(0, 4 * MIB)
    assert window is not None and len(window) == 4 * MIB, "the prepared mapping is the writer's window"
    window.release()


def test_prepare_stays_within_memory_reuse_and_the_room_images_leave():
    store = ImageStore(16 * MIB, reuse=8 * MIB)
    assert store.prepare(1 << 62) == 8 * MIB, "at most memory.reuse, whatever is asked"
    store.close()
    store = ImageStore(16 * MIB, reuse=16 * MIB)
    checkpoint = store.begin("cp-1", "node")
    other = store.add_image(checkpoint, "core-1.img")
    fill(store, checkpoint, other, pattern(2, 10 * MIB))
    prepared = store.prepare(12 * MIB)
    assert 0 < prepared <= store.room(), "only the room the images leave"
    assert store.held + store.pool.held <= 16 * MIB


def test_prepare_again_keeps_one_memfd_large_enough():
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    store.prepare(8 * MIB)
    first = inode(kept_fds(store)[0])
    assert store.prepare(8 * MIB) == 8 * MIB and store.prepare(3 * MIB) == 8 * MIB
    assert [inode(fd) for fd in kept_fds(store)] == [first], "a large enough one is there: nothing more"
    assert store.prepare(12 * MIB) == 12 * MIB
    (fd,) = kept_fds(store)
    assert inode(fd) == first and allocated(fd) == 12 * MIB, "the one there grew: its pages are not freed"
    assert store.pool.held == 12 * MIB


@pytest.mark.parametrize(("left", "asked", "written"),
                         [(5 * MIB, 9 * MIB, 7 * MIB + 5), (48 * MIB, 8 * MIB, 9 * MIB + 5)], ids=["grown", "trimmed"])
def test_prepare_resizes_the_memfd_a_released_page_image_left(left, asked, written):
    """Grown, its pages stay; trimmed (left by a larger process), its excess is freed now,
    not by the page image when it completes, inside the freeze. The next image goes into
    it byte for byte, a little past what was asked (the rest is spliced on)."""
    store = ImageStore(256 * MIB, reuse=128 * MIB)
    checkpoint, image = one_checkpoint(store, "cp-1", pattern(1, left))
    kept = inode(image.fd)
    store.restored(checkpoint)
    assert store.prepare(asked) == asked
    (fd,) = kept_fds(store)
    assert inode(fd) == kept, "the same memfd: its first pages stay"
    assert os.fstat(fd).st_size == asked and allocated(fd) == asked, "allocated or freed before the freeze"
    assert store.pool.held == asked
    assert mappings_of(kept) == 1
    data = pattern(2, written)
    _, image = one_checkpoint(store, "cp-2", data)
    assert inode(image.fd) == kept and os.pread(image.fd, 64 * MIB, 0) == data
    assert os.fstat(image.fd).st_size == len(data)


def left_by_a_page_image(store: ImageStore, size: int) -> int:
    """A released checkpoint's page image of `size` bytes kept in the pool; its fd."""
    checkpoint, _ = one_checkpoint(store, "cp-left", pattern(1, size))
    store.restored(checkpoint)
    (fd,) = kept_fds(store)
    return fd


def test_prepare_leaves_a_kept_memfd_at_most_trim_min_larger():
    store = ImageStore(256 * MIB, reuse=128 * MIB)
    fd = left_by_a_page_image(store, 8 * MIB + store_module.TRIM_MIN)
    assert store.prepare(8 * MIB) == 8 * MIB + store_module.TRIM_MIN
    assert os.fstat(fd).st_size == 8 * MIB + store_module.TRIM_MIN, "a few MiB more are freed by the image"


def test_asking_large_then_small_again_and_again_frees_and_allocates_nothing_more(monkeypatch):
    """A hostile or confused peer alternating PREPAREs: one trim of what a page image left,
    one growth, then nothing; the memory is not freed and allocated anew for each ask."""
    store = ImageStore(256 * MIB, reuse=128 * MIB)
    fd = left_by_a_page_image(store, 48 * MIB)
    assert store.prepare(8 * MIB) == 8 * MIB
    assert store.prepare(48 * MIB) == 48 * MIB
    calls: list[str] = []

    def counted(name: str):
        real = getattr(os, name)

        def call(*args):
            calls.append(name)
            return real(*args)
        return call

    for name in ("ftruncate", "posix_fallocate"):
        monkeypatch.setattr(store_module.os, name, counted(name))
    for _ in range(10):
        assert store.prepare(8 * MIB) == 48 * MIB
        assert store.prepare(48 * MIB) == 48 * MIB
    assert calls == []
    assert kept_fds(store) == [fd] and allocated(fd) == 48 * MIB


def test_a_kept_memfd_that_cannot_be_trimmed_stays_as_it_was(monkeypatch, caplog):
    store = ImageStore(256 * MIB, reuse=128 * MIB)
    fd = left_by_a_page_image(store, 48 * MIB)

    def refused(fd: int, size: int) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(store_module.os, "ftruncate", refused)
    assert store.prepare(8 * MIB) == 48 * MIB
    assert kept_fds(store) == [fd]
    assert os.fstat(fd).st_size == 48 * MIB, "still kept, for the next page image"
    assert "could not trim a kept memfd to 8.0 MiB" in caplog.text


def test_prepare_under_reuse_min_or_with_reuse_off_does_nothing():
    assert ImageStore(64 * MIB, reuse=16 * MIB).prepare(4096) == 0
    store = ImageStore(64 * MIB, reuse=0)
    assert store.prepare(8 * MIB) == 0
    assert store.pool.held == 0


def test_a_prepared_memfd_leaves_when_images_need_the_room():
    store = ImageStore(12 * MIB, reuse=12 * MIB)
    store.prepare(6 * MIB)
    checkpoint = store.begin("cp-1", "node")
    other = store.add_image(checkpoint, "core-1.img")
    fill(store, checkpoint, other, pattern(2, 8 * MIB))
    assert store.pool.held == 0, "prepared memory is the first to go"


def test_a_prepared_memfd_nobody_takes_is_freed_when_idle(monkeypatch):
    monkeypatch.setattr(store_module, "REUSE_IDLE", 0.05)
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    store.prepare(2 * MIB)
    (fd,) = kept_fds(store)
    prepared = inode(fd)
    wait_until_freed(store, fd, prepared)
    assert store.pool.held == 0
    assert not is_open(fd, prepared), "its memfd was closed"


def test_memory_that_is_not_there_prepares_nothing_and_says_so(monkeypatch, caplog):
    def no_memory(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "posix_fallocate", no_memory)
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    before = len(os.listdir("/proc/self/fd"))
    assert store.prepare(8 * MIB) == 0
    assert store.pool.held == 0
    assert len(os.listdir("/proc/self/fd")) == before, "the memfd was closed"
    assert "could not prepare 8.0 MiB" in caplog.text and "No space left" in caplog.text


def mappings_of(inode_number: int) -> int:
    """How many mappings of this process map that inode (/proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if len(fields := line.split()) > 4 and fields[4] == str(inode_number))


def test_a_kept_memfd_taken_or_grown_is_mapped_once():
    """An old mapping kept alive (by the expiry timer of a memfd taken from the pool) would
    count its pages twice and keep a closed memfd's pages for up to REUSE_IDLE."""
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    checkpoint, image = one_checkpoint(store, "cp-1", pattern(1, 5 * MIB))
    kept = inode(image.fd)
    store.restored(checkpoint)
    store.prepare(6 * MIB)
    assert mappings_of(kept) == 1
    for tag, size, prepare in ((2, 5 * MIB + 7, 9 * MIB), (3, 8 * MIB, 12 * MIB)):
        checkpoint, image = one_checkpoint(store, f"cp-{tag}", pattern(tag, size))
        assert inode(image.fd) == kept and mappings_of(kept) == 1
        store.restored(checkpoint)
        store.prepare(prepare)
        assert mappings_of(kept) == 1, "grown: the new mapping replaces the old one"


def test_no_fd_for_a_prepared_memfd_prepares_nothing_and_says_so(monkeypatch, caplog):
    """Out of fds (a flood holding them): prepare gives up in one warning, it does not raise
    into the link's or the control socket's thread."""
    def no_fds(name: str, reusable: bool = False) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(store_module, "new_memfd", no_fds)
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    assert store.prepare(8 * MIB) == 0
    assert store.pool.held == 0
    assert "could not prepare 8.0 MiB" in caplog.text and "Too many open files" in caplog.text


def test_a_kept_memfd_that_cannot_grow_stays_as_it_was(monkeypatch):
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    checkpoint, image = one_checkpoint(store, "cp-1", pattern(1, 5 * MIB))
    kept = inode(image.fd)
    store.restored(checkpoint)

    def no_memory(fd: int, offset: int, length: int) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(store_module.os, "posix_fallocate", no_memory)
    assert store.prepare(9 * MIB) == 5 * MIB
    (fd,) = kept_fds(store)
    assert inode(fd) == kept and os.fstat(fd).st_size == 5 * MIB, "still kept, for the next page image"


# ---- through the real daemons ------------------------------------------------------------

def held_images(pid: int) -> list[str]:
    return [link for fd in os.listdir(f"/proc/{pid}/fd")
            if (link := _readlink(f"/proc/{pid}/fd/{fd}")).startswith("/memfd:imgmig:")]


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def memfds_named(pid: int, prefix: str) -> dict[int, os.stat_result]:
    """The daemon's memfds whose name starts with `prefix`, by inode (fds closed meanwhile skipped)."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        if _readlink(path).startswith(f"/memfd:{prefix}"):
            with contextlib.suppress(OSError):
                info = os.stat(path)
                found[info.st_ino] = info
    return found


def kept_inodes(pid: int) -> set[int]:
    """Inodes of the daemon's reusable memfds (its page images, and those kept after them)."""
    return set(memfds_named(pid, "imgmig-reuse:"))


@pytest.mark.parametrize("tls", [False, True], ids=["tls-off", "tls-on"])
def test_checkpoints_through_reused_memfds_restore_byte_for_byte(daemons, tls):
    """Smaller, then larger page images than the one before, each into the memfd the
    previous checkpoint released, on both daemons: every restore reads exactly its own."""
    from conftest import wait_until
    from test_daemons_sim import assert_restores, checkpoint_images, dump, restore, restore_order

    pair = daemons(tls=tls)
    pids = {"proxy": pair.proxy.process.pid, "cache": pair.cache.process.pid}
    kept: dict[str, set[int]] = {}
    for n, size in enumerate([3 * MIB + 17, MIB + 5, 6 * MIB + 4097], start=1):
        images = checkpoint_images(f"reuse-{n}") | {"pages-1.img": pattern(n, size)}
        dump(pair.proxy_dir, images)
        pair.cache_log.wait_for(r"complete from", count=n)
        if kept:
            for role, pid in pids.items():
                assert kept_inodes(pid) == kept[role], f"{role}: the page image went into the kept memfd"
        assert_restores(restore(pair.cache_dir, restore_order(images)), images)
        pair.cache_log.wait_for(r"restored from the cache", count=n)
        pair.proxy_log.wait_for(r"releasing this node's copy", count=n)
        for role, pid in pids.items():
            # the checkpoint's other images are closed in the same pass that keeps pages-1.img
            wait_until(lambda pid=pid: not held_images(pid), 10, f"{role} releases the checkpoint")
            kept[role] = kept_inodes(pid)
            assert len(kept[role]) == 1, f"{role} keeps the released page image's memfd"
    assert not pair.cache_log.errors(new=False) and not pair.proxy_log.errors(new=False)


def prepared_memfds(pid: int) -> dict[int, tuple[int, int]]:
    """The daemon's memfds made ready by `prepare`: inode -> (size, bytes allocated)."""
    return {inode: (info.st_size, info.st_blocks * 512)
            for inode, info in memfds_named(pid, "imgmig-reuse:prepared").items()}


@pytest.mark.parametrize("tls", [False, True], ids=["tls-off", "tls-on"])
def test_memory_prepared_before_a_dump_takes_its_pages_on_both_daemons(daemons, tls):
    """`prepare` (what `imgmig migrate` asks before the freeze): both daemons allocate a
    memfd of the size asked, and the checkpoint that follows is written into them and
    restores byte for byte."""
    from test_daemons_sim import assert_restores, checkpoint_images, dump, restore, restore_order

    from imgmig.commands.common import ControlClient

    pair = daemons(tls=tls)
    pids = {"proxy": pair.proxy.process.pid, "cache": pair.cache.process.pid}
    with ControlClient(pair.proxy_dir / "control.sock", "proxy") as proxy:
        reply = proxy.request("prepare", bytes=8 * MIB)
        summary = proxy.request("status")["summary"]
    assert (reply["proxy"], reply["cache"]) == (8 * MIB, 8 * MIB)
    assert "8.0 MiB ready for the next pages" in summary, "the operator sees where that memory is"
    prepared = {role: prepared_memfds(pid) for role, pid in pids.items()}
    for role, memfds in prepared.items():
        assert list(memfds.values()) == [(8 * MIB, 8 * MIB)], f"{role}: one memfd, every page allocated"
    pair.cache_log.wait_for(r"8\.0 MiB of memory ready for a coming checkpoint of about 8\.0 MiB")
    images = checkpoint_images("prepared") | {"pages-1.img": pattern(1, 6 * MIB + 4097)}
    dump(pair.proxy_dir, images)
    pair.cache_log.wait_for(r"complete from")
    for role, pid in pids.items():
        assert kept_inodes(pid) == set(prepared[role]), f"{role}: the pages went into the prepared memfd"
    assert_restores(restore(pair.cache_dir, restore_order(images)), images)
    assert not pair.cache_log.errors(new=False) and not pair.proxy_log.errors(new=False)


def test_the_lasting_mapping_grows_with_the_image_it_is_kept_after():
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    small, _ = one_checkpoint(store, "cp-1", pattern(1, 2 * MIB))
    store.restored(small)
    grown, image = one_checkpoint(store, "cp-2", pattern(2, 9 * MIB))
    assert len(image.mapping) == 2 * MIB, "mapped as it was kept"
    store.restored(grown)
    _, image = one_checkpoint(store, "cp-3", pattern(3, 9 * MIB))
    assert len(image.mapping) == 9 * MIB, "the next image maps everything the memfd holds"
    seen = Hasher()
    image.hash(seen, 0, image.size)
    assert seen.data == pattern(3, 9 * MIB)


def test_a_reused_image_still_arriving_is_taken_back_at_what_was_written(monkeypatch):
    """After a restart a reused page image's file size would count the previous image's
    bytes as arrived; the fd store's record may lag behind what arrived (and was
    acknowledged). What its writer marked on the memfd before each acknowledgement counts."""
    from test_fdstore import FakeStore

    from imgmig.system import fdstore, systemd_glue

    fake = FakeStore()
    monkeypatch.setattr(systemd_glue, "notify", fake.notify)
    monkeypatch.setattr(systemd_glue, "under_systemd", lambda: True)
    store = ImageStore(64 * MIB, reuse=16 * MIB)
    fdstore.FdStore(store, "cache").take_back({})
    first, _ = one_checkpoint(store, "node-a-20261128T000000-1", pattern(1, 8 * MIB))
    store.restored(first)
    assert store.wait_durable(timeout=10), "the release reached the fd store (only then is its memfd reused)"
    checkpoint = store.begin("node-a-20261128T000000-2", "node-a")
    image = store.add_image(checkpoint, "pages-1.img")
    fill(store, checkpoint, image, pattern(2, 2 * MIB))
    assert os.fstat(image.fd).st_size == 8 * MIB, "the reused memfd (the setting of this test)"
    deadline = time.monotonic() + 10
    while not (recorded := [i["size"] for c in fake.meta()["checkpoints"] for i in c["images"]]):
        assert time.monotonic() < deadline, fake.meta()
        time.sleep(0.01)
    assert recorded[0] <= 2 * MIB  # (it may lag behind what arrived)

    again = ImageStore(64 * MIB, reuse=16 * MIB)
    taken = fdstore.FdStore(again, "cache").take_back(fake.handed_back())
    (adopted,) = taken.checkpoints
    back = adopted.images["pages-1.img"]
    assert back.size == 2 * MIB and not back.complete, "what its writer marked written, past the lagging record"
    assert again.held == IMAGE_OVERHEAD + 8 * MIB, "charged for the pages its memfd holds"
    fill(again, adopted, back, pattern(2, 3 * MIB)[back.size:])  # the resumed transfer
    again.finish_image(back, checkpoint=adopted)
    assert os.fstat(back.fd).st_size == 3 * MIB
    assert os.pread(back.fd, 8 * MIB, 0) == pattern(2, 3 * MIB)
    for fd in fake.fds.values():
        os.close(fd)


def test_an_image_not_reused_is_taken_back_at_its_file_size():
    """Bytes that arrived after the record was written count, as before reuse existed."""
    from imgmig.datapath.store import Image

    fd = os.memfd_create("imgmig:core-1.img", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.pwrite(fd, b"c" * 5000, 0)
    image = Image.taken_back("core-1.img", fd, 4096, False, None)
    assert image.size == 5000 and not image.reusable
    os.close(fd)


def test_a_fresh_page_image_still_arriving_is_taken_back_at_its_file_size():
    """Only a memfd being written over may hold old bytes: a fresh one's file size is what
    arrived, so a resume after a restart sends nothing the cache already holds."""
    from imgmig.datapath.store import REUSED_XATTR, Image

    store = ImageStore(64 * MIB, reuse=16 * MIB)
    checkpoint = store.begin("cp-1", "node")
    image = store.add_image(checkpoint, "pages-1.img")
    fill(store, checkpoint, image, pattern(1, 3 * MIB))
    back = Image.taken_back("pages-1.img", os.dup(image.fd), 0, False, None)
    assert back.size == 3 * MIB and back.reusable and not back.capacity
    os.close(back.fd)
    store.finish_image(image, checkpoint=checkpoint)
    store.complete(checkpoint, clean=True)
    store.restored(checkpoint)
    second = store.begin("cp-2", "node")
    reused = store.add_image(second, "pages-1.img")
    assert os.getxattr(reused.fd, REUSED_XATTR), "marked while written over"
    fill(store, second, reused, pattern(2, MIB))
    store.finish_image(reused, checkpoint=second)
    assert REUSED_XATTR not in os.listxattr(reused.fd), "complete: its file size is its size again"


def test_what_the_writer_marked_counts_past_a_lagging_record():
    """The cache acknowledges bytes it marked written on the memfd; the fd store's record may
    lag: after a restart the mark counts, so no acknowledged byte is sent again (a kill -9 of
    the cache mid-transfer in tests/test_system_nspawn.py resent 90 MB it had acknowledged)."""
    from imgmig.datapath.store import REUSE_LABEL, REUSED_XATTR, Image

    fd = os.memfd_create(f"{REUSE_LABEL}pages-1.img", os.MFD_CLOEXEC)
    os.ftruncate(fd, 8 * MIB)  # the previous image's size
    os.setxattr(fd, REUSED_XATTR, str(2 * MIB).encode())
    assert Image.taken_back("pages-1.img", fd, MIB, False, None).size == 2 * MIB, "the mark, past the record"
    assert Image.taken_back("pages-1.img", fd, 3 * MIB, False, None).size == 3 * MIB, "the record, past the mark"
    os.setxattr(fd, REUSED_XATTR, b"0")
    assert Image.taken_back("pages-1.img", fd, MIB, False, None).size == MIB
    os.removexattr(fd, REUSED_XATTR)
    assert Image.taken_back("pages-1.img", fd, MIB, False, None).size == 8 * MIB, "not written over: its file"
    os.close(fd)


def test_each_growth_of_an_image_written_over_a_kept_memfd_is_marked_on_it():
    from imgmig.datapath.store import REUSED_XATTR

    store = ImageStore(64 * MIB, reuse=16 * MIB)
    checkpoint, image = over_a_kept_memfd(store, 8 * MIB)
    assert image.capacity, "written over the kept memfd (the setting of this test)"
    marks = []
    fill(store, checkpoint, image, pattern(2, 2 * MIB + 5), step=MIB,
         after_each=lambda: marks.append(os.getxattr(image.fd, REUSED_XATTR)))
    assert marks == [b"1048576", b"2097152", b"2097157"]
