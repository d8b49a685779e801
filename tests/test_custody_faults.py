"""Fault tests of custody (issue 8): the real daemons, simulated CRIU, real TCP cuts.

A cut is `ss -K` on the proxy's established connection to the cache: the kernel aborts
it on the spot and the cache's side gets a reset, as when a middlebox or a peer's
restart drops it. IMGMIG_FAULT_SIZE_MIB sets the checkpoint size (default 256; the
figures in docs/design.md were measured with 1024).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, wait_until
from test_daemons_sim import (
    IO_TIMEOUT,
    Restore,
    _digest_of_restore,
    assert_restores,
    checkpoint_images,
    dump,
    restore_order,
)
from test_operator import FAKE_CRIU, imgmig, start_victim, status

from imgmig import criu_sim
from imgmig.commands.common import ControlClient
from testbed import fake_criu

SIZE_MIB = int(os.environ.get("IMGMIG_FAULT_SIZE_MIB", "256"))
CUTS = 20


def cut(port: int) -> bool:
    """Abort the proxy's TCP connection to the cache; True if there was one to cut."""
    out = subprocess.run(["ss", "-K", "-t", "-H", "dst", "127.0.0.1", "dport", "=", str(port)],
                         capture_output=True, text=True, check=True).stdout
    return "ESTAB" in out


class PagesRestore:
    """A restore connected before the dump: inventory.img, then the digest of pages-1.img."""

    def __init__(self, images_dir) -> None:
        self.client = criu_sim.RestoreClient(images_dir)
        self.client.sock.settimeout(300)
        self.result: tuple[int, bytes] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            assert self.client.read_image("inventory.img") == b"inv"
            self.result = _digest_of_restore(self.client, "pages-1.img")
        except BaseException as exc:
            self.error = exc
        finally:
            self.client.close()


def test_link_cut_at_twenty_random_points_resumes_without_resending_acknowledged_bytes(daemons):
    pair = daemons(memory_limit=f"{SIZE_MIB * 2 + 64}MiB")
    rng = random.Random(int(os.environ.get("IMGMIG_FAULT_SEED", "8")))
    points = sorted(rng.sample(range(1, SIZE_MIB - 1), CUTS))
    restorer = PagesRestore(pair.cache_dir)
    block = os.urandom(1 << 20)
    hasher = hashlib.sha256()
    client = criu_sim.DumpClient(pair.proxy_dir)
    pages = client.open_image("pages-1.img")
    cut_at: list[float] = []
    started = time.monotonic()
    for n in range(SIZE_MIB):
        if points and n == points[0]:
            points.pop(0)
            # cut only a begun transfer (a link cut in its handshake is a first try, not a resume)
            wait_until(lambda: pair.proxy_log.matching(r"forwarding to"), 60, "the checkpoint to begin at the cache")
            wait_until(lambda: len(pair.proxy_log.matching(r"back after")) == len(cut_at), 60,
                       "the previous cut to be resumed")
            wait_until(lambda: cut(pair.port), 30, "an established link to cut")
            cut_at.append(time.monotonic())
        chunk = n.to_bytes(8, "big") + block[8:]
        hasher.update(chunk)
        criu_sim.write_all(pages, chunk)
    os.close(pages)
    client.write_image("inventory.img", b"inv")
    client.close()
    restorer.thread.join(300)
    elapsed = time.monotonic() - started
    assert restorer.error is None, restorer.error
    assert restorer.result == (SIZE_MIB << 20, hasher.digest()), "the restore read exactly what was dumped"
    backs = pair.proxy_log.wait_for(r"back after", count=CUTS)
    downs = [float(re.search(r"back after ([0-9.]+) s", line).group(1)) for line in backs]
    last = backs[-1]
    resent, resent_acked = map(int, re.search(r"resent so far: (\d+) bytes, of them acknowledged before: (\d+)",
                                              last).groups())
    print(f"\nFAULT TABLE link cuts: {SIZE_MIB} MiB checkpoint, {CUTS} cuts injected, "
          f"{len(backs)} resumed, 1/1 restored with matching digest; bytes resent: {resent} "
          f"(in flight at the cuts), of them past the acknowledged offset: {resent_acked}; "
          f"time to recover: median {sorted(downs)[len(downs) // 2]:.2f} s, max {max(downs):.2f} s; "
          f"whole transfer {elapsed:.1f} s")
    assert resent_acked == 0, "nothing the cache acknowledged was sent again"
    assert len(pair.proxy_log.matching(r"link to .* lost while it carried checkpoint")) == CUTS
    assert not pair.proxy_log.errors(new=False) and not pair.cache_log.errors(new=False)
    pair.cache_log.wait_for(r"restored from the cache: 2 files served")
    pair.proxy_log.wait_for(r"releasing this node's copy")


def test_cut_after_delivery_keeps_the_custody_conversation(daemons):
    """Cut once the checkpoint is complete at the cache: the proxy links back, the cache
    says it holds it complete, and the restore's grant and RESTORED still flow."""
    pair = daemons()
    images = checkpoint_images("cut-after-done")
    dump(pair.proxy_dir, images)
    pair.proxy_log.wait_for(r"forwarded to .*verified by the cache")
    assert cut(pair.port)
    back = pair.proxy_log.wait_for(r"back after .*the cache holds it complete")[0]
    assert_restores(Restore(pair.cache_dir, restore_order(images)).result(IO_TIMEOUT), images)
    pair.proxy_log.wait_for(r"releasing this node's copy")
    assert not pair.proxy_log.errors(new=False) and not pair.cache_log.errors(new=False)
    print(f"\nFAULT TABLE cut after delivery: 1 cut injected, 1/1 survived (grant and RESTORED flowed on the "
          f"resumed link); {resumed_figures(back)}")


def serve_claimed(client: ControlClient, checkpoint: str, images: dict[str, bytes]) -> dict[str, bytes | None]:
    """What `imgmig restore` does with CRIU's connection: pass it to the daemon with `serve`
    (the simulated CRIU reads every image); the daemon answers once it was read whole."""
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(f"{directory}/streamer-serve.sock")
            listener.listen(1)
            reader = Restore(Path(directory), restore_order(images))
            conn, _ = listener.accept()
            with conn:
                reply = client.request("serve", fd=conn.fileno(), timeout=IO_TIMEOUT, id=checkpoint)
        finally:
            listener.close()
    assert reply["restored"] is True, reply
    return reader.result()


def test_running_confirmed_while_the_link_is_down_reaches_the_proxy_after_the_resume(daemons):
    """Restored means running: the restore read everything, the link went down (the proxy
    stalled and its connection was cut), then the restore confirmed the process runs. The
    confirmation waits for the link: on the resume BEGUN says RUNNING and RUNNING follows,
    and only then does the proxy release its copy."""
    pair = daemons()
    images = checkpoint_images("confirm-in-a-cut")
    dump(pair.proxy_dir, images)
    pair.cache_log.wait_for(r"complete from")
    with ControlClient(pair.cache_dir / "control.sock", "cache") as client:
        checkpoint = client.request("claim")["claimed"]
        assert_restores(serve_claimed(client, checkpoint, images), images)
        pair.cache_log.wait_for(rf"checkpoint {checkpoint} read whole by its restore on the cache")
        pair.proxy.process.send_signal(signal.SIGSTOP)
        try:
            assert cut(pair.port)
            pair.cache_log.wait_for(rf"link from .* closed .*checkpoint {checkpoint} stays here, complete")
            client.request("confirm", id=checkpoint, running=True, pid=4242)
            pair.cache_log.wait_for(rf"checkpoint {checkpoint} restored from the cache: running on test-node as "
                                    rf"pid 4242 \(confirmed by imgmig restore\)")
            time.sleep(0.5)
            assert not pair.proxy_log.matching("running on"), "the proxy is stopped: nothing reached it yet"
        finally:
            pair.proxy.process.send_signal(signal.SIGCONT)
    pair.cache_log.wait_for(rf"checkpoint {checkpoint} from .*: already running as pid 4242 here, nothing to resume")
    line = pair.proxy_log.wait_for(rf"checkpoint {checkpoint}: running on test-node \(.*\) as pid 4242, confirmed "
                                   rf"by its restore; this node's copy released")
    assert len(line) == 1
    with ControlClient(pair.proxy_dir / "control.sock", "proxy") as proxy:
        listed = proxy.request("list")
    assert listed["checkpoints"] == []
    (ended,) = listed["ended"]
    assert ended["state"] == "running-at-peer" and "running on test-node as pid 4242" in ended["outcome"]
    assert not pair.proxy_log.matching("keep_restored_for") and not pair.proxy_log.errors(new=False)


def test_a_restore_gone_before_its_confirm_counts_as_restored(daemons):
    """`imgmig restore` killed after CRIU read everything, before it confirmed: CRIU may be
    running the process, so the checkpoint is not offered to another restore; it counts as
    restored, as after a bare restore (RESTORED, the proxy's keep_restored_for)."""
    pair = daemons()
    images = checkpoint_images("unconfirmed")
    dump(pair.proxy_dir, images)
    pair.cache_log.wait_for(r"complete from")
    with ControlClient(pair.cache_dir / "control.sock", "cache") as client:
        checkpoint = client.request("claim")["claimed"]
        assert_restores(serve_claimed(client, checkpoint, images), images)
    line = pair.cache_log.wait_for(rf"checkpoint {checkpoint}: imgmig restore went away before it confirmed the "
                                   rf"outcome of a restore that read it whole; it counts as restored")
    assert ": WARNING " in line[0]
    pair.proxy_log.wait_for(rf"checkpoint {checkpoint} was restored on .*\(reported by the cache\); this node keeps "
                            rf"its copy 1 s")
    with ControlClient(pair.cache_dir / "control.sock", "cache") as client:
        listed = client.request("list")
    assert listed["checkpoints"] == [] and listed["ended"][0]["state"] == "restored", listed


@pytest.mark.parametrize("seed", range(3))
def test_cut_mid_small_checkpoint_resumes(daemons, seed):
    pair = daemons()
    images = checkpoint_images(f"cut-small-{seed}", big=8 << 20)
    waiting = Restore(pair.cache_dir, restore_order(images))
    client = criu_sim.DumpClient(pair.proxy_dir)
    for name, data in images.items():
        if name == "pages-1.img":
            fd = client.open_image(name)
            criu_sim.write_all(fd, data[:4 << 20])
            pair.cache_log.wait_for(r"begins from")
            wait_until(lambda: cut(pair.port), 10, "a link to cut")
            criu_sim.write_all(fd, data[4 << 20:])
            os.close(fd)
        else:
            client.write_image(name, data)
    client.close()
    assert_restores(waiting.result(), images)
    back = pair.proxy_log.wait_for(r"back after .*resuming after")[0]
    print(f"\nFAULT TABLE cut mid small checkpoint (seed {seed}): 8 MiB checkpoint, 1 cut injected, 1/1 restored "
          f"with matching bytes; {resumed_figures(back)}")


def resumed_figures(back: str) -> str:
    """Bytes resent and time to recover, from the proxy's "back after" line."""
    down = float(re.search(r"back after ([0-9.]+) s", back).group(1))
    resent, acked = re.search(r"resent so far: (\d+) bytes, of them acknowledged before: (\d+)", back).groups()
    assert acked == "0", back
    return f"bytes resent: {resent}, past the acknowledged offset: {acked}; time to recover: {down:.2f} s"


def _race(pair, rng: random.Random, tag: str) -> tuple[str, str]:
    """A rollback on the source and a restore on the destination, started `offset` apart."""
    images = checkpoint_images(tag)
    dump(pair.proxy_dir, images)
    pair.proxy_log.wait_for(r"forwarded to .*verified by the cache", count=int(tag.rsplit("-", 1)[1]) + 1)
    offsets = {"proxy": rng.uniform(0, 0.1), "cache": rng.uniform(0, 0.1)}
    results: dict[str, object] = {}

    def attempt(role: str) -> None:
        time.sleep(offsets[role])
        restore_ = Restore(pair.proxy_dir if role == "proxy" else pair.cache_dir, restore_order(images))
        try:
            assert_restores(restore_.result(IO_TIMEOUT), images)
            results[role] = "restored"
        except (AssertionError, OSError) as exc:
            results[role] = f"refused ({type(exc).__name__})"

    threads = [threading.Thread(target=attempt, args=(role,)) for role in offsets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(IO_TIMEOUT * 2)
    return results["proxy"], results["cache"]  # type: ignore[return-value]


def test_rollback_and_destination_restore_race_exactly_one_wins(daemons):
    """The proxy decides: whichever takes the right first restores, the other is refused,
    including a rollback that comes after the destination's restore read everything (the
    proxy keeps its copy then, keep_restored_for, and refuses it rather than let it wait)."""
    pair = daemons(proxy_keys={"keep_restored_for": 60})
    rng = random.Random(int(os.environ.get("IMGMIG_FAULT_SEED", "8")))
    outcomes = [_race(pair, rng, f"race-{n}") for n in range(20)]
    winners = [("proxy" if proxy == "restored" else "") + ("cache" if cache == "restored" else "")
               for proxy, cache in outcomes]
    print(f"\nFAULT TABLE handoff race: 20 rounds; rollback won {winners.count('proxy')}, destination won "
          f"{winners.count('cache')}, both {winners.count('proxycache')}, neither {winners.count('')}")
    assert all(len(w) in (5, 6) and w in ("proxy", "cache") for w in winners), outcomes
    # every refusal named the holder, on both nodes
    cache_refused = pair.cache_log.matching(r"restore of checkpoint \S+ on the cache refused: the right to "
                                            r"restore it is held by test-node \(the source, rollback\)")
    proxy_refused = pair.proxy_log.matching(r"restore of checkpoint \S+ on the proxy refused: the right to "
                                            r"restore it is held by test-node \(the destination\)")
    assert len(cache_refused) == winners.count("proxy") and len(proxy_refused) == winners.count("cache")
    assert len(pair.proxy_log.matching(r"asked for the right to restore it; refused, it is held by "
                                       r"test-node \(the source, rollback\)")) <= winners.count("proxy")


def test_checkpoint_over_the_cache_limit_fails_fast_and_the_next_flows(daemons, tmp_path):
    """The cache (32 MiB) cannot hold a 48 MiB checkpoint: it refuses it within a second of
    outgrowing the limit, one line on each node gives size and limit, the proxy keeps its
    copy for a rollback, and the next checkpoint arrives and is restored."""
    pair = daemons(roles=("proxy",))
    from conftest import start_daemon, write_config
    cache_tmp = tmp_path / "small-cache"
    cache_tmp.mkdir()
    config = write_config(cache_tmp, port=pair.port, memory_limit="32MiB", pki=pair.pki)
    config.write_text(config.read_text().replace(str(cache_tmp / "cache"), str(pair.cache_dir)))
    pair.daemons["cache"] = start_daemon("cache", config, cache_tmp)
    big = checkpoint_images("too-big", big=48 << 20)
    started = time.monotonic()
    dump(pair.proxy_dir, big)
    outgrew = pair.proxy_log.wait_for(r"captured: 9 files")
    cache_line = one_line(pair.cache_log, r"refused: checkpoint \S+ has grown to 3\d\.\d MiB, over this cache's "
                                          r"memory.limit of 32\.0 MiB")
    proxy_line = one_line(pair.proxy_log, r"checkpoint \S+ cannot be forwarded: .*memory.limit of 32\.0 MiB.*"
                                          r"this node keeps it")
    assert outgrew and cache_line and proxy_line
    refused_in = time.monotonic() - started
    later = checkpoint_images("fits")
    waiting = Restore(pair.cache_dir, restore_order(later))
    dump(pair.proxy_dir, later)
    assert_restores(waiting.result(), later)
    assert_restores(Restore(pair.proxy_dir, restore_order(big)).result(), big)  # the rollback copy
    print(f"\nFAULT TABLE over the cache's limit: a 48 MiB checkpoint into a 32 MiB cache, refused with one line "
          f"on each node within {refused_in:.2f} s of the dump's start; the next checkpoint restored at the cache, "
          f"the refused one rolled back from the proxy's copy")


def test_dump_over_the_proxy_limit_fails_cleanly(daemons):
    """A dump that alone outgrows the proxy's memory.limit is refused at once (CRIU's pipes
    are closed, so CRIU fails the dump and resumes the process); the next dump flows."""
    pair = daemons(memory_limit="16MiB")
    client = criu_sim.DumpClient(pair.proxy_dir)
    pages = client.open_image("pages-1.img")
    with pytest.raises(OSError):
        criu_sim.write_all(pages, b"p" * (24 << 20))
    os.close(pages)
    client.close()
    one_line(pair.proxy_log, r"checkpoint \S+ failed: it has grown to 16\.\d MiB, which this proxy's "
                             r"memory.limit of 16\.0 MiB cannot hold; CRIU's dump is refused")
    good = checkpoint_images("after-too-big")
    waiting = Restore(pair.cache_dir, restore_order(good))
    dump(pair.proxy_dir, good)
    assert_restores(waiting.result(), good)
    print("\nFAULT TABLE over the proxy's limit: a 24 MiB dump into a 16 MiB proxy, CRIU's dump refused with one "
          "line; the next dump restored at the cache")


def one_line(log, pattern: str) -> str:
    """Exactly one ERROR line in the log, and it matches pattern."""
    log.wait_for(pattern, timeout=10)
    errors = log.errors(new=False)
    assert len(errors) == 1 and re.search(pattern, errors[0]), "\n".join(errors)
    return errors[0]


def test_with_the_link_down_a_restore_waits_grant_timeout_then_is_refused(daemons):
    """The source is gone (its proxy killed): nobody can grant the right, so after
    cache.grant_timeout the restore is refused (CRIU fails), with one line naming why."""
    pair = daemons(cache_keys={"grant_timeout": 1.5})
    images = checkpoint_images("no-grant")
    dump(pair.proxy_dir, images)
    pair.cache_log.wait_for(r"complete from")
    pair.proxy.kill()
    pair.cache_log.wait_for(r"link from .* closed .*stays here, complete")
    started = time.monotonic()
    attempt = Restore(pair.cache_dir, restore_order(images))
    with pytest.raises(OSError):
        attempt.result()
    waited = time.monotonic() - started
    assert 1.4 < waited < 5, f"refused after {waited:.1f} s, not after the 1.5 s grant_timeout"
    print(f"\nFAULT TABLE source gone before the grant: proxy killed, the restore refused after {waited:.2f} s "
          f"(cache.grant_timeout 1.5 s), one line naming why")
    one_line(pair.cache_log, r"restore of checkpoint \S+ on the cache refused: its source did not grant the "
                             r"right to restore it within 1\.5 s \(cache.grant_timeout\)")
    # fencing: the operator knows the source is dead and takes the right here
    (checkpoint,) = [c["id"] for c in status_of(pair, "cache")["checkpoints"]]
    unforced = imgmig("handoff", checkpoint, "--config", str(pair.config))
    assert unforced.returncode == 1 and unforced.stdout == "", unforced
    (line,) = unforced.stderr.splitlines()
    assert "source node is down (powered off or fenced" in line and f"imgmig handoff --force {checkpoint}" in line
    forced = imgmig("handoff", "--force", checkpoint, "--config", str(pair.config))
    assert forced.returncode == 0 and "the right to restore it is this node's now (fencing)" in forced.stdout, forced
    warned = pair.cache_log.wait_for(rf"checkpoint {checkpoint}: the right to restore it is taken on this node "
                                     rf"without its source .* \(imgmig handoff --force\): fencing")
    assert len(warned) == 1 and ": WARNING " in warned[0], warned
    assert_restores(Restore(pair.cache_dir, restore_order(images)).result(), images)
    pair.cache_log.wait_for(rf"checkpoint {checkpoint} restored from the cache")
    assert len(pair.cache_log.errors(new=False)) == 1, "the refusal before the handoff is the only error"


def status_of(pair, role: str) -> dict:
    with ControlClient((pair.proxy_dir if role == "proxy" else pair.cache_dir) / "control.sock", role) as client:
        return client.request("list")


@pytest.mark.parametrize("link", ["kept", "cut"])
def test_after_a_handoff_the_returning_source_is_told_and_its_rollback_refused(daemons, link):
    """The source stalls (SIGSTOP: a node that hung, the case fencing is for); the operator
    forces the handoff and the restore runs on the destination. The source comes back
    (SIGCONT) with its copy, on its old connection or (cut) on a resumed one: the cache
    tells it that it holds the right, and the rollback there is refused, one line on each
    node."""
    pair = daemons(cache_keys={"grant_timeout": 1.5}, proxy_keys={"keep_restored_for": 60})
    images = checkpoint_images("fenced")
    dump(pair.proxy_dir, images)
    pair.cache_log.wait_for(r"complete from")
    (checkpoint,) = [c["id"] for c in status_of(pair, "cache")["checkpoints"]]
    pair.proxy.process.send_signal(signal.SIGSTOP)
    try:
        forced = imgmig("handoff", "--force", checkpoint, "--config", str(pair.config))
        assert forced.returncode == 0, forced
        assert_restores(Restore(pair.cache_dir, restore_order(images)).result(), images)
        pair.cache_log.wait_for(rf"checkpoint {checkpoint} restored from the cache")
        if link == "cut":
            assert cut(pair.port)
    finally:
        pair.proxy.process.send_signal(signal.SIGCONT)
    told = pair.cache_log.wait_for(rf"checkpoint {checkpoint}: its source .* is back .*this node holds the right "
                                   rf"to restore it .*a rollback there is refused")
    pair.proxy_log.wait_for(rf"checkpoint {checkpoint} was restored on test-node .*keeps its copy 60 s")
    assert checkpoint in [c["id"] for c in status_of(pair, "proxy")["checkpoints"]], "the source kept its copy"
    rollback = Restore(pair.proxy_dir, restore_order(images))
    with pytest.raises(OSError):
        rollback.result()
    refused = one_line(pair.proxy_log, rf"restore of checkpoint {checkpoint} on the proxy refused: the right to "
                                       rf"restore it is held by test-node \(the destination\)")
    assert refused and len(told) == 1 and not pair.cache_log.errors(new=False)


def memfds(pid: int) -> list[str]:
    """The names of the memfds a process holds (the store's images are `imgmig:NAME`)."""
    names = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("/memfd:"):
                names.append(target.removeprefix("/memfd:").removesuffix(" (deleted)"))
    return names


def _restore_with_fake_criu(pair, checkpoint: str, env: dict[str, str]) -> tuple[int, dict, str]:
    """`imgmig restore --id` with testbed.fake_criu: exit status, what CRIU read (its
    restored.json), and stdout + stderr."""
    done = imgmig("restore", "--id", checkpoint, "--config", str(pair.config), "--criu", FAKE_CRIU, env=env)
    workdir = re.search(r"\(CRIU logs in (\S+)\)", done.stdout)
    assert workdir, (done.stdout, done.stderr)
    return done.returncode, json.loads((Path(workdir.group(1)) / "restored.json").read_text()), \
        done.stdout + done.stderr


def test_a_restore_that_fails_after_reading_everything_keeps_both_copies_and_a_retry_succeeds(daemons, tmp_path):
    """CRIU reads every image of the checkpoint, then fails (simulated CRIU, once): the
    cache keeps its copy and gives the right back, the proxy keeps its own, and
    `imgmig restore --id` again claims the right through the normal grant and succeeds,
    from the same bytes."""
    victims: list[int] = []
    try:
        _fail_once_then_retry(daemons(), victims, tmp_path)
    finally:
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _fail_once_then_retry(pair, victims: list[int], tmp_path: Path) -> None:
    pid = start_victim(victims)
    dumped = subprocess.run([*FAKE_CRIU.split(), "dump", "--stream", "-D", str(pair.proxy_dir), "-t", str(pid)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert dumped.returncode == 0
    pair.proxy_log.wait_for(r"verified by the cache")
    (checkpoint,) = [c["id"] for c in status(pair)["cache"]["checkpoints"]]
    env = {"FAKE_CRIU_FAIL_ONCE_AFTER_READ": str(tmp_path / "failed-once")}

    code, first, said = _restore_with_fake_criu(pair, checkpoint, env)
    assert code == 1 and "failed on purpose after reading every image" in said, said
    pair.cache_log.wait_for(rf"checkpoint {checkpoint} read whole by its restore on the cache")
    pair.cache_log.wait_for(rf"checkpoint {checkpoint}: its restore read every image and then failed; this cache "
                            rf"keeps its copy")
    pair.cache_log.wait_for(rf"checkpoint {checkpoint}: the restore here failed; the right to restore it is "
                            rf"returned to .*; this copy stays for a retry")
    pair.proxy_log.wait_for(rf"the right to restore {checkpoint} is back on this node")
    both = status(pair)
    (cached,) = both["cache"]["checkpoints"]
    (held,) = both["proxy"]["checkpoints"]
    assert cached["id"] == held["id"] == checkpoint, both
    assert cached["state"] == "complete" and not cached["claimed"], "the cache's copy is servable again"
    assert held["state"] == "complete" and held["returned"] and not held["delivered"], held
    for daemon in (pair.proxy, pair.cache):  # the bytes themselves: each daemon still has the memfds
        held = memfds(daemon.process.pid)  # (page images are imgmig-reuse:NAME memfds, memory.reuse)
        assert "imgmig:core-1.img" in held and "imgmig-reuse:pages-1.img" in held, \
            f"imgmig-{daemon.role} let its copy go"

    code, retry, said = _restore_with_fake_criu(pair, checkpoint, env)
    assert code == 0 and "restored: running as pid" in said, said
    victims.append(retry["pid"])
    assert retry["images"] == first["images"], "the retry read other bytes than the failed restore"
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in fake_criu.images(pid, 8)
                if name != "inventory.img"}
    assert retry["images"] == expected, "the retry's images differ from what was dumped"
    assert len(pair.proxy_log.matching(rf"checkpoint {checkpoint}: the right to restore it is granted to")) == 2
    pair.proxy_log.wait_for(rf"checkpoint {checkpoint}: running on test-node \(.*\) as pid {retry['pid']}, "
                            rf"confirmed by its restore; this node's copy released")
    after = status(pair)
    assert after["proxy"]["checkpoints"] == [] and after["cache"]["checkpoints"] == []
    assert after["proxy"]["ended"][0]["state"] == "running-at-peer"
    assert not pair.proxy_log.errors(new=False) and not pair.cache_log.errors(new=False)
