"""imgmig/system/fdstore.py without a daemon: what it hands to "systemd" and takes back.

`notify` is replaced by a recorder that keeps the fds the way systemd's fd store does
(dup'd, by FDNAME); a second FdStore over a fresh ImageStore then takes them back, as
the next run of the daemon would.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import pytest

from imgmig.datapath import custody
from imgmig.datapath.store import ImageStore, State
from imgmig.system import fdstore, systemd_glue


class FakeStore:
    """systemd's fd store: FDSTORE=1 keeps a dup of each fd, FDSTOREREMOVE=1 closes it."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.lock = threading.Lock()

    def notify(self, message: str, fds=()) -> bool:
        fields = dict(line.split("=", 1) for line in message.splitlines())
        with self.lock:
            if fields.get("FDSTORE") == "1":
                self.fds.setdefault(fields["FDNAME"], os.dup(fds[0]))
            elif fields.get("FDSTOREREMOVE") == "1":
                fd = self.fds.pop(fields["FDNAME"], -1)
                if fd >= 0:
                    os.close(fd)
        return True

    def handed_back(self) -> dict[str, int]:
        """What the next run gets: its own fds, by name."""
        with self.lock:
            return {name: os.dup(fd) for name, fd in self.fds.items()}

    def meta(self) -> dict:
        """The newest whole metadata document, as the next run would read it; the daemon's
        thread may be writing the other slot meanwhile."""
        with self.lock:
            document = fdstore.newest_document(self.fds)
        assert document is not None, f"no whole metadata document in {sorted(self.fds)}"
        return document


@pytest.fixture
def systemd(monkeypatch):
    fake = FakeStore()
    monkeypatch.setattr(systemd_glue, "notify", fake.notify)
    monkeypatch.setattr(systemd_glue, "under_systemd", lambda: True)
    yield fake
    for fd in fake.fds.values():
        os.close(fd)


def write(store: ImageStore, checkpoint, name: str, data: bytes, complete: bool = True):
    image = store.add_image(checkpoint, name)
    os.pwrite(image.fd, data, 0)
    store.grew(checkpoint, image, len(data))
    if complete:
        store.finish_image(image, b"\x01" * 16)
    return image


def settle(fake: FakeStore, predicate, what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate(fake.meta()):
        assert time.monotonic() < deadline, f"the metadata never showed {what}: {fake.meta()}"
        time.sleep(0.01)


def test_a_proxy_checkpoint_comes_back_whole_with_its_right_and_route(systemd):
    store = ImageStore(1 << 30)
    fdstore.FdStore(store, "proxy").take_back({})
    checkpoint = store.begin("node-a-20261128T000000-7", "node-a", "node-b")
    settle(systemd, lambda m: m["checkpoints"] and not m["checkpoints"][0]["images"], "the capture under way")
    images = {f"img-{n}.img": os.urandom(100 + n) for n in range(5)}
    for name, data in images.items():
        write(store, checkpoint, name, data)
    store.complete(checkpoint, clean=True)
    with store.cond:
        checkpoint.holder = "node-b (the destination)"
        store.changed()
    settle(systemd, lambda m: m["checkpoints"][0]["holder"], "the holder")
    document = systemd.meta()
    assert fdstore.FORMAT == 4 and document["last_number"] == 7, document
    (record,) = document["checkpoints"]
    assert record["complete"] and record["route"] == "node-b" and len(record["images"]) == 5, record

    again = ImageStore(1 << 30)
    taken = fdstore.FdStore(again, "proxy").take_back(systemd.handed_back())
    (back,) = taken.checkpoints
    assert not taken.abandoned and taken.last_number == 7
    assert back.state is State.COMPLETE and back.holder == "node-b (the destination)" and back.route == "node-b"
    assert list(back.images) == list(images), "the file order is kept: file ids follow it"
    for name, data in images.items():
        assert os.pread(back.images[name].fd, len(data) + 1, 0) == data


def test_a_capture_under_way_is_abandoned_not_adopted(systemd):
    store = ImageStore(1 << 30)
    fdstore.FdStore(store, "proxy").take_back({})
    checkpoint = store.begin("node-a-20261128T000000-3", "node-a")
    write(store, checkpoint, "pages-1.img", b"p" * 4096, complete=False)
    settle(systemd, lambda m: m["checkpoints"], "the capture under way")
    assert not any(name.startswith("img-") for name in systemd.fds), "a capture's images are not kept"
    taken = fdstore.FdStore(ImageStore(1 << 30), "proxy").take_back(systemd.handed_back())
    assert not taken.checkpoints
    assert [(cut.id, cut.route) for cut in taken.abandoned] == [("node-a-20261128T000000-3", "")]


def test_a_checkpoint_with_an_image_missing_is_released_whole(systemd, caplog):
    store = ImageStore(1 << 30)
    fdstore.FdStore(store, "cache").take_back({})
    checkpoint = store.begin("node-a-20261128T000000-1", "node-a")
    for n in range(3):
        write(store, checkpoint, f"f{n}.img", b"x" * 10)
    store.complete(checkpoint, clean=True)
    settle(systemd, lambda m: m["checkpoints"] and m["checkpoints"][0]["complete"], "the checkpoint complete")
    handed = systemd.handed_back()
    os.close(handed.pop("img-2"))
    with caplog.at_level(logging.ERROR):
        taken = fdstore.FdStore(ImageStore(1 << 30), "cache").take_back(handed)
    assert not taken.checkpoints
    assert "checkpoint node-a-20261128T000000-1 cannot be taken back" in caplog.text


def test_old_metadata_is_refused_in_one_line(systemd, caplog):
    """Format 3 and older kept one document under FDNAME=imgmig-meta."""
    meta = os.memfd_create("meta")
    image = os.memfd_create("image")
    os.write(image, b"x" * 10)
    image_inode = os.fstat(image).st_ino
    os.write(meta, json.dumps({"format": 3, "role": "cache", "last_number": 0, "checkpoints": [
        {"id": "a-1", "origin": "a", "complete": True, "holder": "", "route": "",
         "images": [{"fdname": "img-1", "name": "x.img", "size": 10, "digest": None, "complete": True}]}]})
             .encode())
    store = ImageStore(1 << 30)
    with caplog.at_level(logging.WARNING):
        taken = fdstore.FdStore(store, "cache").take_back({fdstore.LEGACY_META: meta, "img-1": image})
    assert not taken.checkpoints and not store.checkpoints()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and "is format 3, this imgmig reads format 4" in errors[0], errors
    assert not _still_open(image_inode), "the image fd was not released"
    assert fdstore.LEGACY_META not in systemd.fds and set(fdstore.META_SLOTS) <= set(systemd.fds)


def _still_open(inode: int) -> bool:
    """Whether this process still has an fd on that memfd (its number may be reused)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.stat(f"/proc/self/fd/{name}").st_ino == inode:
                return True
        except OSError:
            continue
    return False


def _held_checkpoint(systemd, files: int) -> None:
    store = ImageStore(1 << 30)
    fdstore.FdStore(store, "cache").take_back({})
    checkpoint = store.begin("node-a-20261128T000000-3", "node-a")
    for n in range(files):
        write(store, checkpoint, f"f{n}.img", bytes([n]) * 100)
    store.complete(checkpoint, clean=True)
    settle(systemd, lambda m: m["checkpoints"] and m["checkpoints"][0]["complete"], "the checkpoint complete")
    with store.cond:  # one more change, for the newest document to tear
        checkpoint.holder = "node-b"
        store.changed()
    settle(systemd, lambda m: m["checkpoints"][0]["holder"] == "node-b", "the holder")


def _newest_slot(systemd) -> int:
    generations = {}
    for name in fdstore.META_SLOTS:
        fd = systemd.fds[name]
        header = os.pread(fd, 200, 0).partition(b"\n")[0].split(b" ")
        generations[name] = int(header[2])
    return systemd.fds[max(generations, key=generations.get)]


@pytest.mark.parametrize("cut_at", [0, 20, 60, -1])
def test_a_kill_in_the_middle_of_a_metadata_write_keeps_the_checkpoints(systemd, caplog, cut_at):
    """A daemon killed while it rewrites the metadata leaves that slot torn: the other slot,
    one change older, still brings the checkpoint back whole. (With one document rewritten
    in place, such a kill lost every held checkpoint.)"""
    _held_checkpoint(systemd, 3)
    newest = _newest_slot(systemd)
    whole = os.pread(newest, os.fstat(newest).st_size, 0)
    torn = whole[:cut_at] + b"\0" * 7 if cut_at >= 0 else whole[:-1] + b"X"  # cut short, or one byte wrong
    os.ftruncate(newest, 0)
    os.pwrite(newest, torn, 0)
    with caplog.at_level(logging.WARNING):
        taken = fdstore.FdStore(ImageStore(1 << 30), "cache").take_back(systemd.handed_back())
    (back,) = taken.checkpoints
    assert back.id == "node-a-20261128T000000-3" and back.holder == "", "not the document before the torn one"
    assert [os.pread(image.fd, 100, 0) for image in back.images.values()] == [bytes([n]) * 100 for n in range(3)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "the previous whole metadata (generation" in warnings[0], warnings


def test_the_next_write_goes_to_the_torn_slot_not_the_one_taken_back(systemd):
    _held_checkpoint(systemd, 2)
    newest = _newest_slot(systemd)
    os.ftruncate(newest, 5)
    handed = systemd.handed_back()
    taken_from = fdstore.newest_document(handed)["generation"]
    fdstore.FdStore(ImageStore(1 << 30), "cache").take_back(handed)
    settle(systemd, lambda m: m["generation"] > taken_from, "a newer generation")
    for name in fdstore.META_SLOTS:
        assert fdstore.decode_document(os.pread(systemd.fds[name], 1 << 20, 0))[0] in (taken_from, taken_from + 1)


def test_both_slots_torn_is_one_error_line_and_releases_the_fds(systemd, caplog):
    _held_checkpoint(systemd, 2)
    handed = systemd.handed_back()
    for name in fdstore.META_SLOTS:
        os.ftruncate(handed[name], 30)
    with caplog.at_level(logging.WARNING):
        taken = fdstore.FdStore(ImageStore(1 << 30), "cache").take_back(handed)
    assert not taken.checkpoints
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and "is unreadable" in errors[0] and "died while writing" in errors[0], errors


def test_following_the_store_costs_what_changed_not_what_is_held(systemd, monkeypatch):
    """A cache receiving many small files: each image's JSON is made about once, not once
    per later change (which would be O(n^2) in files)."""
    encoded = []
    original = fdstore._Image.encode

    def counting(self):
        if not self.text:
            encoded.append(self.name)
        return original(self)

    monkeypatch.setattr(fdstore._Image, "encode", counting)
    store = ImageStore(1 << 30)
    keeper = fdstore.FdStore(store, "cache")
    keeper.take_back({})
    checkpoint = store.begin("node-a-20261128T000000-1", "node-a")
    files = 600
    for n in range(files):
        write(store, checkpoint, f"f{n}.img", b"y" * 8)
    store.complete(checkpoint, clean=True)
    settle(systemd, lambda m: m["checkpoints"][0]["complete"] and len(m["checkpoints"][0]["images"]) == files
           and all(i["complete"] for i in m["checkpoints"][0]["images"]), "every image complete")
    # each image at most: when it began (empty), when it grew, once complete; O(n^2) would be ~n^2/2
    assert len(encoded) <= 3 * files, f"{len(encoded)} encodings for {files} images"


def test_an_image_sealed_before_a_restart_completes_again_without_error(systemd):
    """The cache's record said "still arriving", but the image completed (and was sealed) before
    the cache died: the resumed transfer ends it again, which must not fail on the seals (EPERM)."""
    store = ImageStore(1 << 30)
    checkpoint = store.begin("node-a-20261128T000000-1", "node-a")
    image = write(store, checkpoint, "seccomp.img", b"s" * 20)
    again = ImageStore(1 << 30)
    adopted = again.adopt(checkpoint.id, "node-a", [type(image)("seccomp.img", os.dup(image.fd), 20)], False)
    again.finish_image(adopted.images["seccomp.img"], b"\x02" * 16)
    assert adopted.images["seccomp.img"].complete


@pytest.fixture
def slow_writes(monkeypatch):
    """A writer slow enough that a custody decision racing it would be seen."""
    original = fdstore.FdStore._write_meta

    def slow(self):
        time.sleep(0.1)
        original(self)

    monkeypatch.setattr(fdstore.FdStore, "_write_meta", slow)


def _captured(systemd) -> tuple[ImageStore, object]:
    store = ImageStore(1 << 30)
    fdstore.FdStore(store, "proxy").take_back({})
    checkpoint = store.begin("node-a-20261128T000000-5", "node-a", "node-b")
    write(store, checkpoint, "pages-1.img", b"p" * 4096)
    store.complete(checkpoint, clean=True)
    settle(systemd, lambda m: m["checkpoints"] and m["checkpoints"][0]["complete"], "the checkpoint complete")
    return store, checkpoint


def test_a_grant_is_answered_only_once_the_fd_store_holds_it(systemd, slow_writes):
    """A proxy killed right after its GRANT went out must come back knowing the destination
    holds the right, or a rollback there would run the process on both nodes."""
    store, checkpoint = _captured(systemd)
    granted, holder = custody.grant_to_peer(store, checkpoint, "node-b")
    assert granted and holder == custody.destination("node-b")
    assert systemd.meta()["checkpoints"][0]["holder"] == holder, "GRANT answered before the fd store had it"


def test_a_rollback_starts_only_once_the_fd_store_holds_it(systemd, slow_writes):
    store, checkpoint = _captured(systemd)
    custody.take_for_rollback(store, checkpoint, "node-a")
    assert systemd.meta()["checkpoints"][0]["holder"] == custody.source("node-a")


def test_without_systemd_custody_does_not_wait():
    store = ImageStore(1 << 30)
    checkpoint = store.begin("node-a-20261128T000000-6", "node-a")
    store.complete(checkpoint, clean=True)
    started = time.monotonic()
    custody.grant_to_peer(store, checkpoint, "node-b")
    assert time.monotonic() - started < 0.5 and store.durable is None


def test_a_released_page_memfd_is_reused_only_once_the_fd_store_forgot_its_checkpoint(systemd, slow_writes):
    """Until the fd store records the release, a daemon killed now takes the released
    checkpoint back from systemd: its memfd must not hold another image's bytes by then."""
    store = ImageStore(64 << 20, reuse=16 << 20)
    fdstore.FdStore(store, "cache").take_back({})
    first = store.begin("node-a-20261128T000000-8", "node-a")
    old = write(store, first, "pages-1.img", b"o" * (2 << 20))
    store.complete(first, clean=True)
    settle(systemd, lambda m: m["checkpoints"] and m["checkpoints"][0]["complete"], "the checkpoint complete")
    old_inode = os.fstat(old.fd).st_ino
    store.restored(first)
    assert store.pool.held, "the released page image's memfd is kept for reuse"
    second = store.begin("node-a-20261128T000000-9", "node-a")
    early = store.add_image(second, "pages-1.img")
    assert os.fstat(early.fd).st_ino != old_inode, "reused before the fd store recorded the release"
    settle(systemd, lambda m: all(c["id"] != first.id for c in m["checkpoints"]), "the release")
    assert store.wait_durable(timeout=5)
    later = store.add_image(second, "pages-2.img")
    assert os.fstat(later.fd).st_ino == old_inode, "once recorded, the memfd is reused"
