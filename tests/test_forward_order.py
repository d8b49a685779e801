"""Which files the forwarder begins while the capture still writes them (forward._may_begin):
small ones wait to go whole in a batch, but never hold up a large one behind them."""

from __future__ import annotations

import os

import pytest

from imgmig.datapath.forward import SMALL_BATCH, _may_begin
from imgmig.datapath.store import SMALL_IMAGE, ImageStore, State


@pytest.fixture
def store():
    store = ImageStore(1 << 30)
    yield store
    store.close()


def grow(store: ImageStore, checkpoint, image, n: int) -> None:
    os.pwrite(image.fd, b"x" * n, image.size)
    store.grew(checkpoint, image, n)


def test_a_small_image_being_written_waits_until_complete(store):
    checkpoint = store.begin("cp", "node")
    image = store.add_image(checkpoint, "core-1.img")
    grow(store, checkpoint, image, 4096)
    assert not _may_begin(checkpoint, 0)
    store.finish_image(image)
    assert _may_begin(checkpoint, 0)


def test_a_small_image_with_small_ones_behind_it_still_waits(store):
    checkpoint = store.begin("cp", "node")
    store.add_image(checkpoint, "a.img")
    for n in range(3):
        store.add_image(checkpoint, f"later-{n}.img")
    assert not _may_begin(checkpoint, 0)


def test_a_large_image_behind_it_begins_it(store):
    """CRIU writes pagemap (small, open) beside pages (large): pages must not wait for pagemap."""
    checkpoint = store.begin("cp", "node")
    store.add_image(checkpoint, "pagemap-1.img")
    pages = store.add_image(checkpoint, "pages-1.img")
    assert not _may_begin(checkpoint, 0)
    grow(store, checkpoint, pages, SMALL_IMAGE + 1)
    assert _may_begin(checkpoint, 0) and _may_begin(checkpoint, 1)


def test_a_full_batch_behind_it_begins_it(store):
    checkpoint = store.begin("cp", "node")
    store.add_image(checkpoint, "open.img")
    for n in range(SMALL_BATCH):
        store.add_image(checkpoint, f"later-{n}.img")
    assert _may_begin(checkpoint, 0)


def test_an_image_over_the_small_size_or_a_checkpoint_no_longer_arriving_begins_at_once(store):
    checkpoint = store.begin("cp", "node")
    large = store.add_image(checkpoint, "large.img")
    grow(store, checkpoint, large, SMALL_IMAGE + 1)
    store.add_image(checkpoint, "small.img")
    assert _may_begin(checkpoint, 0)
    assert not _may_begin(checkpoint, 1)
    store.fail(checkpoint, "the dump failed")
    assert checkpoint.state is State.FAILED and _may_begin(checkpoint, 1)
