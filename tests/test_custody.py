"""Giving the right to restore back (custody.py): a failed restore on the cache returns it
through the link driver, or, with no link, keeps the right and the copy; never both."""

from __future__ import annotations

import threading

import pytest

from imgmig.datapath import custody
from imgmig.datapath.store import ImageStore

WAIT = 10.0  # bound on any wait for another thread; never reached when things work


@pytest.fixture
def store():
    store = ImageStore(1 << 30)
    yield store
    store.close()


def held_here(store: ImageStore):
    checkpoint = store.begin("node-a-1", "node-a (10.0.0.1)")
    store.complete(checkpoint, clean=True)
    custody.answer_claim(store, checkpoint, True, custody.destination("node-b"))
    return checkpoint


def test_a_linked_cache_gives_the_right_back_once(store):
    checkpoint = held_here(store)
    taken: list[bool] = []

    def link_driver() -> None:  # what receive.py's _look_at_store does
        store.wait_until(lambda: checkpoint.return_wanted, timeout=WAIT)
        taken.append(custody.take_return(store, checkpoint))
        taken.append(custody.take_return(store, checkpoint))

    driver = threading.Thread(target=link_driver)
    driver.start()
    assert custody.give_back(store, checkpoint, WAIT, threading.Event())
    driver.join(WAIT)
    assert taken == [True, False], "RETURN is sent once"
    assert checkpoint.holder == "" and not checkpoint.return_wanted


def test_without_a_link_the_cache_keeps_the_right(store):
    checkpoint = held_here(store)
    assert not custody.give_back(store, checkpoint, 0.2, threading.Event())
    assert checkpoint.holder == custody.destination("node-b") and not checkpoint.return_wanted
    assert not custody.take_return(store, checkpoint), "a link back later must not return it behind the log line"


def test_nothing_to_give_back_without_the_right(store):
    checkpoint = store.begin("node-a-1", "node-a (10.0.0.1)")
    assert not custody.give_back(store, checkpoint, WAIT, threading.Event())
    assert not checkpoint.return_wanted


def test_the_proxy_takes_back_only_the_destinations_right_and_keeps_its_copy(store):
    checkpoint = store.begin("node-a-1", "node-a")
    store.complete(checkpoint, clean=True)
    store.delivered(checkpoint)
    assert custody.grant_to_peer(store, checkpoint, "node-b") == (True, custody.destination("node-b"))
    custody.taken_back(store, checkpoint, "node-c")
    assert checkpoint.holder == custody.destination("node-b"), "another node cannot give node-b's right back"
    custody.taken_back(store, checkpoint, "node-b")
    assert checkpoint.holder == "" and not checkpoint.delivered, "the only copy now: never evicted"
    custody.take_for_rollback(store, checkpoint, "node-a")
    assert checkpoint.holder == custody.source("node-a")
