"""The memfd image store: images, waiting, claiming, release, sealing, the memory limit."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable

import pytest

from imgmig.datapath.store import (
    IMAGE_OVERHEAD,
    PAGE,
    CheckpointFailed,
    DuplicateImage,
    Image,
    ImageStore,
    Interrupted,
    State,
    StoreError,
    new_memfd,
)
from imgmig.protocol.peer_wire import BeginStatus

WAIT = 10.0  # bound on any wait for another thread; never reached when things work


def write(store: ImageStore, checkpoint, image, data: bytes) -> None:
    os.pwrite(image.fd, data, image.size)
    store.grew(checkpoint, image, len(data))


def complete_image(store: ImageStore, checkpoint, name: str, data: bytes):
    image = store.add_image(checkpoint, name)
    if data:
        write(store, checkpoint, image, data)
    store.finish_image(image)
    return image


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class Background:
    """Run a call in a thread; result() waits a bounded time and re-raises its exception."""

    def __init__(self, call: Callable[[], object]) -> None:
        self.value: object = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            self.value = call()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def result(self) -> object:
        assert self.done.wait(WAIT), "the call in the background did not return"
        if self.error is not None:
            raise self.error
        return self.value


@pytest.fixture
def store():
    store = ImageStore(1 << 30)
    yield store
    store.close()


@pytest.fixture
def stop():
    event = threading.Event()
    yield event
    event.set()


def test_memfd_per_image(store):
    checkpoint = store.begin("cp", "node")
    a = store.add_image(checkpoint, "a.img")
    b = store.add_image(checkpoint, "b.img")
    assert a.fd != b.fd
    assert os.readlink(f"/proc/self/fd/{a.fd}").startswith("/memfd:imgmig:a.img")
    assert os.readlink(f"/proc/self/fd/{b.fd}").startswith("/memfd:imgmig:b.img")
    assert not os.get_inheritable(a.fd), "memfds are close-on-exec"
    write(store, checkpoint, a, b"hello")
    assert os.pread(a.fd, 10, 0) == b"hello"
    assert a.size == 5 and checkpoint.size == 5 and store.held == 2 * IMAGE_OVERHEAD + PAGE


def test_duplicate_names_refused(store):
    checkpoint = store.begin("cp", "node")
    first = complete_image(store, checkpoint, "a.img", b"first")
    with pytest.raises(DuplicateImage, match=r"a\.img"):
        store.add_image(checkpoint, "a.img")
    assert checkpoint.images["a.img"] is first
    assert os.pread(first.fd, 10, 0) == b"first"


def test_duplicate_checkpoint_refused(store):
    store.begin("cp", "node")
    with pytest.raises(StoreError, match="cp"):
        store.begin("cp", "node")


def test_wait_image_blocks_until_complete(store, stop):
    checkpoint = store.begin("cp", "node")
    image = store.add_image(checkpoint, "pages-1.img")
    waiter = Background(lambda: store.wait_image(checkpoint, "pages-1.img", stop))
    write(store, checkpoint, image, b"x" * 100)
    assert not waiter.done.wait(0.2), "an image being written is not served"
    store.finish_image(image)
    assert waiter.result() is image


def test_wait_image_for_an_image_not_yet_offered(store, stop):
    checkpoint = store.begin("cp", "node")
    waiter = Background(lambda: store.wait_image(checkpoint, "inventory.img", stop))
    assert not waiter.done.wait(0.2)
    image = complete_image(store, checkpoint, "inventory.img", b"inv")
    assert waiter.result() is image


def test_absent_after_complete(store, stop):
    checkpoint = store.begin("cp", "node")
    waiter = Background(lambda: store.wait_image(checkpoint, "memfd.img", stop))
    complete_image(store, checkpoint, "inventory.img", b"inv")
    assert not waiter.done.wait(0.2), "absent only once the checkpoint is complete"
    store.complete(checkpoint, clean=True)
    assert waiter.result() is None
    assert store.wait_image(checkpoint, "other.img", stop) is None


def test_incomplete_image_in_complete_checkpoint_fails(store, stop):
    checkpoint = store.begin("cp", "node")
    store.add_image(checkpoint, "pages-1.img")
    store.complete(checkpoint, clean=True)
    with pytest.raises(CheckpointFailed, match="never completed"):
        store.wait_image(checkpoint, "pages-1.img", stop)


def test_wait_image_on_failed_checkpoint(store, stop):
    checkpoint = store.begin("cp", "node")
    complete_image(store, checkpoint, "a.img", b"a")
    waiter = Background(lambda: store.wait_image(checkpoint, "inventory.img", stop))
    store.fail(checkpoint, "CRIU died")
    with pytest.raises(CheckpointFailed, match="CRIU died"):
        waiter.result()
    with pytest.raises(CheckpointFailed):  # a failed checkpoint's complete images are not served either
        store.wait_image(checkpoint, "a.img", stop)


def test_wait_image_stops(store, stop):
    checkpoint = store.begin("cp", "node")
    waiter = Background(lambda: store.wait_image(checkpoint, "x.img", stop))
    stop.set()
    with pytest.raises(Interrupted, match=r"x\.img"):
        waiter.result()


def test_serve_only_complete_holds_images_back(stop):
    store = ImageStore(1 << 30, serve_only_complete=True)
    checkpoint = store.begin("cp", "node")
    image = complete_image(store, checkpoint, "a.img", b"a")
    waiter = Background(lambda: store.wait_image(checkpoint, "a.img", stop))
    assert not waiter.done.wait(0.2), "store-and-forward serves nothing before the checkpoint is complete"
    store.complete(checkpoint, clean=True)
    assert waiter.result() is image
    store.close()


# ---- FILES_LISTED: absent at once, an image served as it arrives -------------------------------

def test_files_listed_answers_absent_before_the_checkpoint_completes(store, stop):
    checkpoint = store.begin("cp", "node")
    store.add_image(checkpoint, "pages-1.img")
    waiter = Background(lambda: store.wait_image(checkpoint, "memfd.img", stop))
    assert not waiter.done.wait(0.2), "absent only once every file is listed"
    store.files_listed(checkpoint)
    assert waiter.result() is None
    assert checkpoint.state is State.RECEIVING


def test_files_listed_serves_an_image_still_arriving(store, stop):
    checkpoint = store.begin("cp", "node")
    image = store.add_image(checkpoint, "pages-1.img")
    waiter = Background(lambda: store.wait_image(checkpoint, "pages-1.img", stop, arriving=True))
    assert not waiter.done.wait(0.2), "an image still arriving waits until every file is listed"
    store.files_listed(checkpoint)
    assert waiter.result() is image and not image.complete


def test_files_listed_does_not_hand_out_an_incomplete_image_to_a_whole_reader(store, stop):
    """`imgmig restore` unpacks the files image onto the disk: it gets it only complete."""
    checkpoint = store.begin("cp", "node")
    image = store.add_image(checkpoint, "imgmig-files.tar")
    store.files_listed(checkpoint)
    waiter = Background(lambda: store.wait_image(checkpoint, "imgmig-files.tar", stop))
    write(store, checkpoint, image, b"x" * 100)
    assert not waiter.done.wait(0.2), "an image still arriving is not handed out whole"
    store.finish_image(image)
    assert waiter.result() is image


def test_servable_holds_the_last_byte_back_until_the_image_is_complete(store, stop):
    checkpoint = store.begin("cp", "node")
    image = store.add_image(checkpoint, "pages-1.img")
    write(store, checkpoint, image, b"x" * 1000)
    assert store.servable(checkpoint, image, 0, 1, stop) == 999
    waiter = Background(lambda: store.servable(checkpoint, image, 999, 1, stop))
    assert not waiter.done.wait(0.2), "the last byte waits for the image to complete (its digest)"
    store.finish_image(image)
    assert waiter.result() == 1000


def test_servable_waits_for_a_step_of_new_bytes(store, stop):
    checkpoint = store.begin("cp", "node")
    image = store.add_image(checkpoint, "pages-1.img")
    write(store, checkpoint, image, b"x" * 100)
    waiter = Background(lambda: store.servable(checkpoint, image, 99, 50, stop))
    write(store, checkpoint, image, b"y" * 40)
    assert not waiter.done.wait(0.2), "40 new bytes are less than the step"
    write(store, checkpoint, image, b"z" * 10)
    assert waiter.result() == 149


def test_servable_fails_with_the_checkpoint(store, stop):
    checkpoint = store.begin("cp", "node")
    image = store.add_image(checkpoint, "pages-1.img")
    waiter = Background(lambda: store.servable(checkpoint, image, 0, 1, stop))
    store.fail(checkpoint, "digest mismatch")
    with pytest.raises(CheckpointFailed, match="digest mismatch"):
        waiter.result()


def test_serve_only_complete_ignores_files_listed(stop):
    """Store-and-forward serves nothing before the checkpoint is complete, listed or not."""
    store = ImageStore(1 << 30, serve_only_complete=True)
    checkpoint = store.begin("cp", "node")
    store.add_image(checkpoint, "pages-1.img")
    store.files_listed(checkpoint)
    waiter = Background(lambda: store.wait_image(checkpoint, "memfd.img", stop))
    assert not waiter.done.wait(0.2)
    store.complete(checkpoint, clean=True)
    assert waiter.result() is None
    store.close()


def test_claim_oldest_first(store, stop):
    first = store.begin("cp-1", "node")
    second = store.begin("cp-2", "node")
    assert store.claim(stop) is first
    assert first.claimed
    assert store.claim(stop) is second


def test_claim_skips_restored_and_failed(store, stop):
    restored = store.begin("cp-1", "node")
    store.complete(restored, clean=True)
    store.restored(restored)
    failed = store.begin("cp-2", "node")
    store.fail(failed, "x")
    good = store.begin("cp-3", "node")
    assert store.claim(stop) is good


def test_claim_waits_for_next_to_arrive(store, stop):
    busy = store.begin("cp-1", "node")
    assert store.claim(stop) is busy
    waiter = Background(lambda: store.claim(stop))
    assert not waiter.done.wait(0.2)
    arrived = store.begin("cp-2", "node")
    assert waiter.result() is arrived


def test_claim_returns_none_on_stop(store, stop):
    waiter = Background(lambda: store.claim(stop))
    stop.set()
    assert waiter.result() is None


def test_unclaim_for_retry(store, stop):
    first = store.begin("cp-1", "node")
    store.begin("cp-2", "node")
    assert store.claim(stop) is first
    store.unclaim(first)
    assert not first.claimed
    assert store.claim(stop) is first, "a restore that gave up leaves the checkpoint for the next"


def test_unclaim_wakes_a_waiting_claim(store, stop):
    only = store.begin("cp-1", "node")
    assert store.claim(stop) is only
    waiter = Background(lambda: store.claim(stop))
    assert not waiter.done.wait(0.2)
    store.unclaim(only)
    assert waiter.result() is only


def test_restored_releases_memory(store):
    checkpoint = store.begin("cp", "node")
    image = complete_image(store, checkpoint, "pages-1.img", b"p" * 4096)
    fd = image.fd
    other = store.begin("cp-2", "node")
    complete_image(store, other, "a.img", b"a" * 10)
    assert store.held == 2 * IMAGE_OVERHEAD + 4096 // PAGE * PAGE + PAGE
    store.complete(checkpoint, clean=True)
    store.restored(checkpoint)
    assert checkpoint.state is State.RESTORED
    assert store.held == IMAGE_OVERHEAD + PAGE
    assert store.get("cp") is None and store.get("cp-2") is other
    assert image.fd == -1
    assert not is_memfd_of(fd, "pages-1.img")


def is_memfd_of(fd: int, name: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:imgmig:{name}")
    except OSError:
        return False


def test_restored_only_from_complete(store):
    checkpoint = store.begin("cp", "node")
    complete_image(store, checkpoint, "a.img", b"a")
    store.restored(checkpoint)
    assert checkpoint.state is State.RECEIVING and store.held == IMAGE_OVERHEAD + PAGE


def test_drop_and_fail_release_memory(store):
    dropped = store.begin("cp-1", "node")
    complete_image(store, dropped, "a.img", b"a" * 100)
    failed = store.begin("cp-2", "node")
    fd = complete_image(store, failed, "b.img", b"b" * 50).fd
    assert store.held == 2 * (IMAGE_OVERHEAD + PAGE)
    store.drop(dropped)
    assert store.held == IMAGE_OVERHEAD + PAGE
    store.fail(failed, "broken")
    assert store.held == 0
    assert failed.state is State.FAILED and failed.reason == "broken"
    assert not is_memfd_of(fd, "b.img")
    assert store.checkpoints() == []


def test_memory_limit_counts_pages_held():
    """15,000 one-byte images hold 15,000 pages in the kernel, not 15 kB: the limit sees that."""
    store = ImageStore(1 << 20)
    checkpoint = store.begin("cp", "node")
    written = 0
    while store.room() > 0:
        complete_image(store, checkpoint, f"f{written}.img", b"x")
        written += 1
    assert written == -(-(1 << 20) // (PAGE + IMAGE_OVERHEAD)), "each 1-byte image costs a page and its inode"
    assert checkpoint.size == written
    image = checkpoint.images["f0.img"]
    assert os.fstat(image.fd).st_blocks * 512 == PAGE, "the kernel does hold a whole page for one byte"
    store.fail(checkpoint, "test over")
    assert store.held == 0


def test_empty_image_costs_its_overhead_and_growth_is_counted_in_pages(store):
    checkpoint = store.begin("cp", "node")
    image = store.add_image(checkpoint, "a.img")
    assert store.held == IMAGE_OVERHEAD
    write(store, checkpoint, image, b"a" * (PAGE + 1))
    assert store.held == IMAGE_OVERHEAD + 2 * PAGE
    write(store, checkpoint, image, b"a" * (PAGE - 1))
    assert store.held == IMAGE_OVERHEAD + 2 * PAGE


def test_longest_name_gets_a_memfd_and_keeps_its_name(store):
    """memfd_create takes 249 bytes of name: the debug label is cut, the image's name is not."""
    checkpoint = store.begin("cp", "node")
    name = "é" * 120 + "x.img"  # 245 bytes, multi-byte characters across the cut
    longest = "n" * 251 + ".img"
    for each in (name, longest):
        image = store.add_image(checkpoint, each)
        assert image.name == each and checkpoint.images[each] is image
        assert os.readlink(f"/proc/self/fd/{image.fd}").startswith("/memfd:imgmig:")


def test_growth_after_drop_not_counted(store):
    checkpoint = store.begin("cp", "node")
    image = store.add_image(checkpoint, "a.img")
    write(store, checkpoint, image, b"a" * 10)
    with store.using(checkpoint):
        store.drop(checkpoint)
        write(store, checkpoint, image, b"a" * 10)
        assert store.held == 0


def test_fail_after_restored_is_ignored(store):
    checkpoint = store.begin("cp", "node")
    store.complete(checkpoint, clean=True)
    store.restored(checkpoint)
    store.fail(checkpoint, "late")
    assert checkpoint.state is State.RESTORED


def test_every_state_change_counts_a_generation(store):
    seen = [store.generation]
    a = store.begin("a", "n")
    seen.append(store.generation)
    store.complete(a, clean=True)
    seen.append(store.generation)
    store.restored(a)
    seen.append(store.generation)
    b = store.begin("b", "n")
    store.fail(b, "x")
    seen.append(store.generation)
    c = store.begin("c", "n")
    store.drop(c)
    seen.append(store.generation)
    assert seen == sorted(set(seen)), "each change moved the generation on"


def test_wait_until_wakes_on_a_change_from_another_thread(store):
    checkpoint = store.begin("cp", "node")
    threading.Timer(0.05, store.complete, (checkpoint, True)).start()
    started = time.monotonic()
    assert store.wait_until(lambda: checkpoint.state is State.COMPLETE, timeout=5)
    assert time.monotonic() - started < 0.4, "woken by the change, not by polling"


def test_wait_until_times_out_and_stops(store):
    assert not store.wait_until(lambda: False, timeout=0.05)
    stop = threading.Event()
    stop.set()
    assert not store.wait_until(lambda: False, stop=stop)


def test_using_keeps_fds_open_until_readers_finish(store):
    checkpoint = store.begin("cp", "node")
    image = complete_image(store, checkpoint, "a.img", b"data")
    fd = image.fd
    with store.using(checkpoint):
        with store.using(checkpoint):
            store.drop(checkpoint)
            assert store.held == 0, "memory accounting is released at once"
            assert fd_open(fd) and os.pread(fd, 4, 0) == b"data"
        assert fd_open(fd), "still one reader"
    assert not is_memfd_of(fd, "a.img")
    assert image.fd == -1


def test_sealing(store):
    checkpoint = store.begin("cp", "node")
    image = store.add_image(checkpoint, "a.img")
    write(store, checkpoint, image, b"abc")
    store.finish_image(image, b"digest")
    assert image.complete and image.digest == b"digest"
    for attempt in (lambda: os.write(image.fd, b"x"),
                    lambda: os.pwrite(image.fd, b"x", 0),
                    lambda: os.ftruncate(image.fd, 0),
                    lambda: os.ftruncate(image.fd, 100)):
        with pytest.raises(PermissionError) as info:
            attempt()
        assert info.value.errno == errno.EPERM
    assert os.pread(image.fd, 10, 0) == b"abc"
    assert os.fstat(image.fd).st_size == 3
    with pytest.raises(PermissionError):
        fcntl.fcntl(image.fd, fcntl.F_ADD_SEALS, 0)  # sealed against further sealing changes too


def test_memory_limit_wait_for_room(stop, caplog):
    store = ImageStore(1 << 20)
    checkpoint = store.begin("cp", "node")
    complete_image(store, checkpoint, "pages-1.img", b"p" * (1 << 20))
    assert store.room() == -IMAGE_OVERHEAD
    with caplog.at_level(logging.WARNING, logger="imgmig.datapath.store"):
        waiter = Background(lambda: store.wait_for_room(stop, "capture of cp-2"))
        assert not waiter.done.wait(0.2), "no room: the writer waits"
        store.complete(checkpoint, clean=True)
        store.restored(checkpoint)
        assert waiter.result() is True
    lines = [r.getMessage() for r in caplog.records if r.name == "imgmig.datapath.store"]
    assert len(lines) == 1, lines
    assert "memory limit reached" in lines[0] and "capture of cp-2" in lines[0] and "memory.limit" in lines[0]
    store.close()


def test_memory_limit_wait_ends_on_stop(stop):
    store = ImageStore(1 << 20)
    checkpoint = store.begin("cp", "node")
    complete_image(store, checkpoint, "a.img", b"p" * (1 << 20))
    waiter = Background(lambda: store.wait_for_room(stop, "x"))
    stop.set()
    assert waiter.result() is False
    store.close()


def test_memory_limit_evicts_delivered_checkpoints_first(stop, caplog):
    store = ImageStore(1 << 20)
    claimed = store.begin("cp-claimed", "node")
    complete_image(store, claimed, "a.img", b"a" * (1 << 19))
    store.complete(claimed, clean=True)
    store.delivered(claimed)
    assert store.claim(stop) is claimed
    delivered = store.begin("cp-delivered", "node")
    complete_image(store, delivered, "a.img", b"a" * (1 << 19))
    store.complete(delivered, clean=True)
    store.delivered(delivered)
    assert store.room() == -2 * IMAGE_OVERHEAD
    with caplog.at_level(logging.WARNING, logger="imgmig.datapath.store"):
        assert store.wait_for_room(stop, "capture") is True
    assert store.get("cp-delivered") is None, "a delivered checkpoint makes room"
    assert store.get("cp-claimed") is claimed, "a checkpoint being restored is never evicted"
    assert store.held == IMAGE_OVERHEAD + (1 << 19)
    assert any("evicting checkpoint cp-delivered" in r.getMessage() for r in caplog.records)
    store.close()


def test_memory_limit_evicts_a_checkpoint_delivered_while_waiting(stop):
    store = ImageStore(1 << 20)
    forwarding = store.begin("cp-1", "node")
    complete_image(store, forwarding, "a.img", b"a" * (1 << 20))
    store.complete(forwarding, clean=True)
    waiter = Background(lambda: store.wait_for_room(stop, "capture of cp-2"))
    assert not waiter.done.wait(0.2), "nothing can be evicted yet"
    store.delivered(forwarding)  # the peer confirmed its copy: now it may go
    assert waiter.result() is True
    assert store.get("cp-1") is None and store.held == 0
    store.close()


def test_wait_for_room_under_limit_returns_at_once(store, stop, caplog):
    with caplog.at_level(logging.WARNING):
        assert store.wait_for_room(stop, "x") is True
    assert not caplog.records


def test_close_releases_everything():
    store = ImageStore(1 << 30)
    fds = []
    for n in range(3):
        checkpoint = store.begin(f"cp-{n}", "node")
        fds.append(complete_image(store, checkpoint, "a.img", b"a").fd)
    store.close()
    assert store.held == 0 and store.checkpoints() == []
    assert not any(is_memfd_of(fd, "a.img") for fd in fds)


def test_a_checkpoint_taken_back_still_arriving_expires_unless_resumed(caplog):
    """After a cache restart, a transfer nobody resumes within cache.resume_for fails."""
    from imgmig.datapath.receive import Transfers
    store = ImageStore(1 << 30)
    transfers = Transfers(store, resume_for=0.3)
    fd = os.memfd_create("part", os.MFD_CLOEXEC)
    os.write(fd, b"partial")
    checkpoint = store.adopt("cp", "node-a", [Image("pages-1.img", fd, 7, False)], complete=False)
    assert checkpoint.state is State.RECEIVING and transfers.inbound == {}
    assert store.wait_until(lambda: checkpoint.state is State.FAILED, timeout=WAIT)
    assert transfers.settled["cp"] == (BeginStatus.GONE, 0)
    assert "its proxy did not come back within 0 s (cache.resume_for)" in caplog.text


def test_a_change_wakes_only_the_waiters_whose_predicate_holds(store, stop):
    """The changing thread checks each waiter's predicate; a waiter is woken (and checks it
    again in its own thread) only when it holds: 10,000 small files make 30,000 changes."""
    checkpoint = store.begin("cp", "node")
    image = store.add_image(checkpoint, "big.img")
    own_checks = {"image": 0, "checkpoint": 0}

    def counted(what: str, predicate: Callable[[], bool]) -> Callable[[], bool]:
        def check() -> bool:
            if threading.current_thread() is not threading.main_thread():
                own_checks[what] += 1 if threading.current_thread().name == what else 0
            return predicate()
        return check

    def waiter(what: str, predicate: Callable[[], bool]) -> Background:
        result = Background(lambda: store.wait_until(counted(what, predicate), stop, timeout=WAIT))
        result.thread.name = what
        return result

    for_image = waiter("image", lambda: image.complete)
    for_checkpoint = waiter("checkpoint", lambda: checkpoint.state is State.COMPLETE)
    assert store.wait_until(lambda: len(store._waiters) == 2, timeout=WAIT)
    before = dict(own_checks)
    for _ in range(200):
        write(store, checkpoint, image, b"x" * 100)
    assert own_checks == before, "200 changes that concern neither woke neither"
    store.finish_image(image)
    assert for_image.result() is True
    assert not for_checkpoint.done.is_set()
    store.complete(checkpoint, clean=True)
    assert for_checkpoint.result() is True
    assert not store._waiters


def test_a_predicate_that_raises_is_raised_in_its_waiter_not_in_the_changer(store, stop):
    checkpoint = store.begin("cp", "node")

    def broken() -> bool:
        if checkpoint.state is State.COMPLETE:
            raise KeyError("gone")
        return False

    waiting = Background(lambda: store.wait_until(broken, stop, timeout=WAIT))
    assert store.wait_until(lambda: len(store._waiters) == 1, timeout=WAIT)
    store.complete(checkpoint, clean=True)  # the changer evaluates it, and goes on
    with pytest.raises(KeyError):
        waiting.result()


def test_checkpoint_watchers_follow_checkpoints_begun_and_gone_only(store):
    seen = store.membership
    checkpoint = store.begin("cp", "node")
    assert store.membership == seen + 1
    image = complete_image(store, checkpoint, "a.img", b"abc")
    store.complete(checkpoint, clean=True)
    assert store.membership == seen + 1, "files and states are not membership changes"
    store.restored(checkpoint)
    assert store.membership == seen + 2
    assert image.fd == -1


def test_listed_keeps_the_images_in_their_order(store):
    checkpoint = store.begin("cp", "node")
    for name in ("b.img", "a.img", "c.img"):
        store.add_image(checkpoint, name)
    files = os.memfd_create("files", os.MFD_ALLOW_SEALING)
    store.add_complete_image(checkpoint, "files.tar", files)
    assert [image.name for image in checkpoint.listed] == ["b.img", "a.img", "c.img", "files.tar"]
    again = store.adopt("back", "node", [Image("x.img", os.memfd_create("x")), Image("y.img", os.memfd_create("y"))])
    assert [image.name for image in again.listed] == ["x.img", "y.img"] == list(again.images)


def test_sealing_an_image_sealed_already_is_no_error(store):
    """An image that completed in the run before a restart comes back sealed (fd store)."""
    checkpoint = store.begin("cp", "node")
    image = complete_image(store, checkpoint, "a.img", b"abc")
    image.seal()
    assert fcntl.fcntl(image.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SEAL


def test_an_image_that_arrived_whole_is_one_change_complete_sealed_and_charged(store):
    checkpoint = store.begin("cp", "node")
    fd = new_memfd("small.img")
    os.pwrite(fd, b"x" * 5000, 0)
    before = store.generation
    image = store.add_arrived(checkpoint, "small.img", fd, 5000, complete=True, digest=b"d")
    assert store.generation == before + 1, "one change, where add/grow/finish made three"
    assert image.complete and image.digest == b"d" and image.size == 5000
    assert checkpoint.listed == [image] and checkpoint.images["small.img"] is image
    assert store.held == IMAGE_OVERHEAD + 2 * PAGE and store.bytes_in == 5000
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"y", 0)  # sealed: what is served is what arrived
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:imgmig:small.img")


def test_an_image_that_arrived_in_part_goes_on_growing(store):
    checkpoint = store.begin("cp", "node")
    fd = new_memfd("big.img")
    os.pwrite(fd, b"a" * 100, 0)
    image = store.add_arrived(checkpoint, "big.img", fd, 100, complete=False)
    write(store, checkpoint, image, b"b" * 50)
    store.finish_image(image)
    assert image.complete and image.size == 150 and os.pread(fd, 200, 0) == b"a" * 100 + b"b" * 50


def test_an_arrived_image_is_refused_like_an_added_one_and_its_fd_left_to_the_caller(store):
    checkpoint = store.begin("cp", "node")
    complete_image(store, checkpoint, "a.img", b"first")
    fd = new_memfd("a.img")
    with pytest.raises(DuplicateImage):
        store.check_new_image(checkpoint, "a.img")
    with pytest.raises(DuplicateImage):
        store.add_arrived(checkpoint, "a.img", fd, 0, complete=False)
    os.fstat(fd)  # still open: the caller closes it
    os.close(fd)
