"""Restarts and kill -9 of either daemon (issue 8): the real daemons under a fake systemd
(tests/fake_systemd.py: their notify socket and fd store), simulated CRIU.

What is checked is what a restore reads, byte for byte, and what each daemon still
holds: a restart keeps every checkpoint the proxy holds (with the right to restore it
where it was), forwarding resumes at the cache's offsets, a capture cut by the proxy's
death is never served, and the proxy's copy stays available for a rollback.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import threading

import pytest
from conftest import PYTHON, REPO, wait_until
from fake_systemd import Supervised, wait_for_stored
from test_daemons_sim import (
    IO_TIMEOUT,
    Restore,
    assert_restores,
    checkpoint_images,
    dump,
    restore,
    restore_order,
)
from test_memfd_reuse import memfds_named

from imgmig import criu_sim
from imgmig.commands.common import ControlClient, Declined
from imgmig.roles.endpoints import CONTROL_SOCKET
from imgmig.system import fdstore

FILES = 9  # images in a checkpoint_images() checkpoint
POINTS = 5  # kill -9 points per daemon
PAGES_MIB = 16


@pytest.fixture
def supervised(daemons):
    """Factory: a conftest Pair whose two daemons run under a fake systemd each."""
    made: list[Supervised] = []

    def start(**options: object):
        pair = daemons(roles=(), **options)
        nodes = {}
        for role in ("cache", "proxy"):
            nodes[role] = Supervised(role, pair.config, pair.tmp)
            made.append(nodes[role])
            pair.daemons[role] = nodes[role].start()
        return pair, nodes

    yield start
    for node in made:
        node.close()


def held(images_dir) -> list[dict]:
    """What `imgmig list` shows a daemon holds."""
    with ControlClient(images_dir / CONTROL_SOCKET, "daemon") as client:
        return client.request("list")["checkpoints"]


def meta(node: Supervised) -> dict:
    """The fd store's metadata document, as the next run would read it."""
    with node.lock:
        document = fdstore.newest_document(node.stored)
    assert document is not None, f"no whole fd-store metadata in {sorted(node.stored)}"
    return document


def pages_image(mib: int, tag: str) -> bytes:
    """Pages whose every MiB differs (a block resent at the wrong offset would show)."""
    block = hashlib.sha256(tag.encode()).digest() * (1 << 15)
    return b"".join(n.to_bytes(8, "big") + block[8:] for n in range(mib))


def with_pages(tag: str, mib: int) -> dict[str, bytes]:
    images = checkpoint_images(tag, big=0)
    images["pages-1.img"] = pages_image(mib, tag)
    return images


def digest(images: dict[str, bytes]) -> str:
    return hashlib.sha256(b"".join(images[name] for name in sorted(images))).hexdigest()[:16]


def restarted(pair, node: Supervised) -> None:
    pair.daemons[node.role] = node.restart()


# ---- restart the proxy between dump and restore ------------------------------------------

def test_proxy_restart_after_delivery_keeps_the_checkpoint_and_the_cache_restores_it(supervised):
    pair, nodes = supervised()
    images = checkpoint_images("restart-after-delivery", big=4 << 20)
    dump(pair.proxy_dir, images)
    pair.proxy_log.wait_for(r"forwarded to .*verified by the cache")
    wait_for_stored(nodes["proxy"], FILES)
    (kept,) = meta(nodes["proxy"])["checkpoints"]
    assert kept["complete"] and len(kept["images"]) == FILES and kept["holder"] == "", kept
    restarted(pair, nodes["proxy"])
    pair.proxy_log.wait_for(rf"checkpoint {kept['id']} taken back from systemd's fd store after a restart: "
                            rf"{FILES} files")
    pair.proxy_log.wait_for(rf"checkpoint {kept['id']}, kept over a restart: linked back to .*the cache holds it "
                            rf"complete")
    (listed,) = held(pair.proxy_dir)
    assert listed["id"] == kept["id"] and listed["state"] == "complete", listed
    assert listed["bytes"] == sum(map(len, images.values())) and "kept over a restart" in listed["outcome"]
    assert_restores(restore(pair.cache_dir, restore_order(images)), images)
    pair.proxy_log.wait_for(r"releasing this node's copy")
    wait_until(lambda: not held(pair.proxy_dir), 10, "the proxy to release its copy")
    assert not pair.proxy_log.errors(new=False) and not pair.cache_log.errors(new=False)


@pytest.mark.parametrize("where", ["cache", "rollback"])
def test_proxy_restart_mid_forwarding_resumes_at_the_cache_offsets(supervised, where):
    """The cache stops reading (SIGSTOP) after the first bytes; the dump ends on the proxy;
    `systemctl restart imgmig-proxy` then; the restarted proxy sends only what the cache
    lacks, and the checkpoint restores byte for byte at the cache, or from the restarted
    proxy's own copy (a rollback, after which the cache drops its copy)."""
    pair, nodes = supervised()
    images = with_pages(f"mid-forwarding-{where}", 48)
    client = criu_sim.DumpClient(pair.proxy_dir)
    for name, data in images.items():
        if name == "pages-1.img":
            pages = client.open_image(name)
            criu_sim.write_all(pages, data[:4 << 20])
            pair.cache_log.wait_for(r"begins from")
            pair.proxy_log.wait_for(r": forwarding to")  # BEGUN came: the first bytes follow it
            pair.cache.process.send_signal(signal.SIGSTOP)
            criu_sim.write_all(pages, data[4 << 20:])
            os.close(pages)
        else:
            client.write_image(name, data)
    client.close()
    pair.proxy_log.wait_for(rf"captured: {FILES} files")
    wait_for_stored(nodes["proxy"], FILES)
    try:
        restarted(pair, nodes["proxy"])
    finally:
        pair.cache.process.send_signal(signal.SIGCONT)
    line = pair.proxy_log.wait_for(r"kept over a restart: forwarding to .* resumes")[0]
    held_there, size, rest = map(int, re.search(r"the cache holds (\d+) of its (\d+) bytes, the other (\d+) are sent",
                                                line).groups())
    assert size == sum(map(len, images.values())) and 0 < held_there < size and rest == size - held_there, line
    forwarded = pair.proxy_log.wait_for(r"forwarded to .*verified by the cache")[-1]
    sent = int(re.search(r"(\d+) files, (\d+) bytes", forwarded).group(2))
    print(f"\nproxy restart mid-forwarding: the cache held {held_there} of {size} bytes; the restarted proxy sent "
          f"{sent}, resent {sent - rest}")
    assert sent == rest, "the restarted proxy sends exactly what the cache lacks"
    if where == "cache":
        assert_restores(restore(pair.cache_dir, restore_order(images)), images)
        pair.proxy_log.wait_for(r"releasing this node's copy")
    else:
        assert_restores(restore(pair.proxy_dir, restore_order(images)), images)
        pair.cache_log.wait_for(r"restored on its source .* this copy is dropped")
        wait_until(lambda: not held(pair.cache_dir), 10, "the cache to drop its copy")
    assert not pair.proxy_log.errors(new=False) and not pair.cache_log.errors(new=False)


def test_proxy_restart_mid_dump_fails_the_dump_and_the_cache_drops_its_part(supervised):
    """`systemctl restart imgmig-proxy` while CRIU dumps: the dump fails (CRIU would resume the
    process), the restarted proxy tells the cache to drop what it received, and the restore
    waiting there is served the next checkpoint, byte for byte, never the cut one."""
    pair, nodes = supervised()
    later = checkpoint_images("after-the-cut")
    waiting = Restore(pair.cache_dir, restore_order(later))
    client = criu_sim.DumpClient(pair.proxy_dir)
    pages = client.open_image("pages-1.img")
    criu_sim.write_all(pages, b"p" * (2 << 20))
    pair.cache_log.wait_for(r"begins from")
    cut = re.search(r"checkpoint (\S+) begins: criu dump connected", str(pair.proxy_log)).group(1)
    restarted(pair, nodes["proxy"])
    with pytest.raises(OSError):
        criu_sim.write_all(pages, b"p" * (4 << 20))
        client.write_image("inventory.img", b"inv")
    os.close(pages)
    client.close()
    pair.proxy_log.wait_for(rf"checkpoint {cut} failed: .*a restarted imgmig-proxy tells the cache to drop its part")
    pair.proxy_log.wait_for(rf"checkpoint {cut} was being captured when imgmig-proxy stopped")
    pair.cache_log.wait_for(rf"checkpoint {cut} from .* failed: the proxy reports the dump did not finish")
    wait_until(lambda: not held(pair.cache_dir) and not held(pair.proxy_dir), 20, "both to hold nothing of it")
    dump(pair.proxy_dir, later)
    assert_restores(waiting.result(), later)
    assert not pair.cache_log.matching(rf"checkpoint {cut} (complete|restored) from"), "the cut one is never served"


def test_a_grant_given_before_the_proxy_restart_still_holds(supervised):
    """The cache's restore holds the right when the proxy restarts: a rollback on the restarted
    proxy is refused naming the destination, and the cache's restore completes."""
    pair, nodes = supervised()
    images = checkpoint_images("grant-survives", big=2 << 20)
    dump(pair.proxy_dir, images)
    pair.proxy_log.wait_for(r"forwarded to .*verified by the cache")
    restorer = criu_sim.RestoreClient(pair.cache_dir)
    restorer.sock.settimeout(IO_TIMEOUT)
    try:
        assert restorer.read_image("inventory.img") == images["inventory.img"]
        pair.proxy_log.wait_for(r"the right to restore it is granted to")
        wait_until(lambda: meta(nodes["proxy"])["checkpoints"][0]["holder"] == "test-node (the destination)", 10,
                   "the grant to reach the fd store's metadata")
        restarted(pair, nodes["proxy"])
        pair.proxy_log.wait_for(r"taken back .*the right to restore it is held by test-node \(the destination\)")
        (listed,) = held(pair.proxy_dir)
        assert listed["right"] == "test-node (the destination)", listed
        shown = subprocess.run([PYTHON, "-m", "imgmig", "status", "--config", str(pair.config)], cwd=REPO,
                               env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                               check=True).stdout
        line = next(line for line in shown.splitlines() if listed["id"] in line and "complete" in line)
        assert "right to restore held by test-node (the destination)" in line, shown
        assert "kept over a restart of imgmig-proxy" in line, shown
        rollback = Restore(pair.proxy_dir, restore_order(images))
        assert rollback.done.wait(IO_TIMEOUT), "the rollback is refused at once"
        assert rollback.error is not None or not rollback.got.get("inventory.img"), "nothing served to the rollback"
        pair.proxy_log.wait_for(r"restore of checkpoint .* on the proxy refused: the right to restore it is held "
                                r"by test-node \(the destination\)")
        got = {name: restorer.read_image(name) for name in restore_order(images)[1:]}
    finally:
        restorer.close()
    assert_restores({"inventory.img": images["inventory.img"], **got}, images)
    pair.cache_log.wait_for(r"restored from the cache: 9 files served")
    pair.proxy_log.wait_for(r"releasing this node's copy")


# ---- kill -9 either daemon at random points ----------------------------------------------------

def describe_point(point: int) -> str:
    if point < PAGES_MIB:
        return f"mid-dump after {point} MiB"
    return "after the capture" if point == PAGES_MIB else "after delivery"


def dump_killing(pair, images: dict[str, bytes], at_mib: int, kill) -> bool:
    """Dump as CRIU does, calling kill() once at_mib MiB of pages are written; True if
    the dump went through, False if it failed as CRIU's would (its pipes or socket broke)."""
    client = criu_sim.DumpClient(pair.proxy_dir)
    try:
        for name, data in images.items():
            if name != "pages-1.img":
                client.write_image(name, data)
                continue
            pages = client.open_image(name)
            try:
                for offset in range(0, len(data), 1 << 20):
                    if offset == at_mib << 20:
                        kill()
                    criu_sim.write_all(pages, data[offset:offset + (1 << 20)])
            finally:
                os.close(pages)
        return True
    except OSError:
        return False
    finally:
        client.close()


def resent_by_proxy(pair) -> tuple[int, int]:
    """(bytes sent again, of them past what the cache had acknowledged), from the proxy's log."""
    taken = pair.proxy_log.matching(r"kept over a restart: forwarding to .* resumes")
    if taken:
        rest = int(re.search(r"the other (\d+) are sent", taken[-1]).group(1))
        forwarded = pair.proxy_log.wait_for(r"forwarded to .*verified by the cache")[-1]
        return int(re.search(r"(\d+) files, (\d+) bytes", forwarded).group(2)) - rest, 0
    backs = pair.proxy_log.matching(r"back after")
    if backs:
        resent, acked = re.search(r"resent so far: (\d+) bytes, of them acknowledged before: (\d+)", backs[-1]).groups()
        return int(resent), int(acked)
    return 0, 0


def kill_at(supervised, role: str, point: int, rollback: bool) -> tuple[str, int, int]:
    """One point: kill -9 `role` there, start it again (Restart=), then restore at the cache or
    roll back on the proxy. Returns (what became of the dump, bytes resent, of them acknowledged)."""
    pair, nodes = supervised()
    victim = nodes[role]
    images = with_pages(f"kill-{role}-{point}-{rollback}", PAGES_MIB)
    # A restore waiting at the cache through a cut capture must be served the next checkpoint, never
    # the cut one; at the other points it starts after the restart (else it may be over before the kill).
    cut_capture = role == "proxy" and point < PAGES_MIB
    waiting = Restore(pair.cache_dir, restore_order(images)) if cut_capture and not rollback else None
    if point < PAGES_MIB:
        def kill() -> None:
            if role == "proxy":  # a capture is known over a restart once its fd-store record is written
                wait_until(victim.recorded, 10, "the capture's record in the proxy's fd store")
            victim.kill9()

        went_through = dump_killing(pair, images, point, kill)
        assert went_through is (role == "cache"), "CRIU's dump fails exactly when the proxy dies under it"
    else:
        dump(pair.proxy_dir, images)
        pair.proxy_log.wait_for(rf"captured: {FILES} files")
        if point > PAGES_MIB:
            pair.proxy_log.wait_for(r"forwarded to .*verified by the cache")
        if role == "proxy":  # CRIU's dump ended: from now on the proxy's copy is the one that counts
            wait_for_stored(victim, FILES)
        victim.kill9()
    pair.daemons[role] = victim.start()
    expected, outcome = images, "survived"
    if cut_capture:
        cut = re.search(r"checkpoint (\S+) begins: criu dump connected", str(pair.proxy_log)).group(1)
        pair.proxy_log.wait_for(rf"checkpoint {cut} was being captured when imgmig-proxy stopped")
        pair.cache_log.wait_for(rf"checkpoint {cut} from .* failed: the proxy reports the dump did not finish")
        wait_until(lambda: not held(pair.cache_dir) and not held(pair.proxy_dir), 20,
                   "both daemons to hold nothing of the cut capture")
        assert not pair.cache_log.matching(rf"checkpoint {cut} complete from"), "the cut capture never completed"
        expected, outcome = with_pages(f"kill-{role}-{point}-again", 4), "dump failed, dropped at the cache"
        dump(pair.proxy_dir, expected)
    if rollback:
        assert_restores(restore(pair.proxy_dir, restore_order(expected)), expected)
        wait_until(lambda: not held(pair.cache_dir), 20, "the cache to drop its copy after the rollback")
    else:
        got = waiting.result(60) if waiting is not None else Restore(pair.cache_dir, restore_order(expected)).result(60)
        assert_restores(got, expected)
        pair.proxy_log.wait_for(r"releasing this node's copy")
    resent, acked = resent_by_proxy(pair)
    if role == "proxy":  # the restarted proxy sends exactly what the cache lacks
        assert resent == 0, f"{resent} bytes sent again"
    # A cache killed with -9 may have acknowledged bytes its fd store had not recorded yet
    # (fdstore.py mirrors the store from a thread of its own): those are sent again.
    return outcome, resent, acked


@pytest.mark.parametrize("role", ["proxy", "cache"])
def test_kill_9_at_random_points_never_serves_anything_incomplete(supervised, role):
    seed = int(os.environ.get("IMGMIG_FAULT_SEED", "8"))
    rng = random.Random(f"{seed}-{role}")
    points = [rng.randrange(1, PAGES_MIB + 2) for _ in range(POINTS)]
    print(f"\nkill -9 imgmig-{role}, seed {seed}: " + ", ".join(map(describe_point, points)))
    table = []
    for n, point in enumerate(points):
        rollback = n % 2 == 1
        outcome, resent, acked = kill_at(supervised, role, point, rollback)
        table.append((point, rollback, outcome, resent, acked))
        print(f"  {describe_point(point)}, then {'a rollback on the proxy' if rollback else 'a restore at the cache'}: "
              f"{outcome}, restored byte for byte; bytes resent {resent} (past the acknowledged offset {acked})")
    print(f"FAULT TABLE kill -9 imgmig-{role}: {len(points)} points, {len(table)} survived with matching images, "
          f"bytes resent {sum(row[3] for row in table)}, past the acknowledged offset {sum(row[4] for row in table)}")


def test_a_checkpoint_granted_to_a_cache_that_lost_it_is_not_sent_again(supervised):
    """The cache's restore held the right when the cache was stopped and started (its fd store
    emptied): the process may run there, so the proxy neither sends the checkpoint again nor
    lets a rollback take it; the empty one the cache began on the resume goes at once."""
    pair, nodes = supervised()
    images = checkpoint_images("granted-then-lost", big=1 << 20)
    dump(pair.proxy_dir, images)
    pair.proxy_log.wait_for(r"forwarded to .*verified by the cache")
    restorer = criu_sim.RestoreClient(pair.cache_dir)
    restorer.sock.settimeout(IO_TIMEOUT)
    try:
        assert restorer.read_image("inventory.img") == images["inventory.img"]
        pair.proxy_log.wait_for(r"the right to restore it is granted to")
        nodes["cache"].kill9()
    finally:
        restorer.close()
    nodes["cache"].forget()
    pair.daemons["cache"] = nodes["cache"].start()
    pair.proxy_log.wait_for(r"no longer knows it, yet it was granted the right to restore it")
    pair.cache_log.wait_for(r"failed: the proxy reports the dump did not finish")
    wait_until(lambda: not held(pair.cache_dir), 10, "the cache to drop what it began on the resume")
    rollback = Restore(pair.proxy_dir, restore_order(images))
    assert rollback.done.wait(IO_TIMEOUT) and not rollback.got.get("inventory.img"), "nothing served to a rollback"
    pair.proxy_log.wait_for(r"on the proxy refused: the right to restore it is held by test-node \(the destination\)")
    (kept,) = held(pair.proxy_dir)
    assert kept["right"] == "test-node (the destination)", kept


def test_a_cache_killed_while_it_prepares_memory_is_declined_and_serves_after_its_restart(supervised):
    """kill -9 of the cache in the middle of allocating what PREPARE asked: the proxy's
    `prepare` is declined in one answer (the proxy's own memory stays ready), the cache starts
    again with nothing of it, and the next checkpoint goes through byte for byte."""
    pair, nodes = supervised(memory_limit="2GiB")
    answers: list[object] = []

    def ask() -> None:
        with ControlClient(pair.proxy_dir / CONTROL_SOCKET, "proxy") as proxy:
            try:
                answers.append(proxy.request("prepare", bytes=1 << 30, timeout=90))
            except Declined as exc:
                answers.append(exc)

    asking = threading.Thread(target=ask)
    asking.start()
    cache = pair.cache.process.pid
    wait_until(lambda: any(info.st_blocks for info in memfds_named(cache, "imgmig-reuse:prepared").values()), 30,
               "the cache to be allocating")
    nodes["cache"].kill9()
    asking.join(90)
    (answer,) = answers
    assert isinstance(answer, Declined) and "did not make memory ready" in str(answer), answer
    pair.daemons["cache"] = nodes["cache"].start()
    assert not memfds_named(pair.cache.process.pid, "imgmig-reuse:prepared"), "nothing prepared survives"
    images = with_pages("after-a-killed-prepare", 4)
    dump(pair.proxy_dir, images)
    assert_restores(restore(pair.cache_dir, restore_order(images)), images)
    assert pair.proxy.process.poll() is None and not [line for line in pair.proxy_log.lines() if "Traceback" in line]
