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
        with self.lock:
            fd = self.fds[fdstore.META_NAME]
            return json.loads(os.pread(fd, os.fstat(fd).st_size, 0))


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
    assert document["format"] == fdstore.FORMAT == 3 and document["last_number"] == 7, document
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
    meta = os.memfd_create("meta")
    image = os.memfd_create("image")
    os.write(image, b"x" * 10)
    os.write(meta, json.dumps({"format": 2, "role": "cache", "images": [
        {"fdname": "img-1", "checkpoint": "a-1", "origin": "a", "image": "x.img", "size": 10, "digest": None}]})
             .encode())
    store = ImageStore(1 << 30)
    with caplog.at_level(logging.WARNING):
        taken = fdstore.FdStore(store, "cache").take_back({fdstore.META_NAME: meta, "img-1": image})
    assert not taken.checkpoints and not store.checkpoints()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and "is format 2, this imgmig reads format 3" in errors[0], errors
    with pytest.raises(OSError):
        os.fstat(image)  # released


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
