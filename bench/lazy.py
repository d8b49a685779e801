"""One lazy (post-copy) migration through imgmig, as `bench.run`'s method "lazy".

The workload runs in netns A and its own PID namespace (testbed/lazy.py says why), with
its page-reading thread on (`--touch`, TOUCH pages a second; off from UNTOUCHED_FROM_MIB
on). `criu lazy-pages` runs at nice 19 once the restore returned. imgmig-proxy in A and
imgmig-cache in B (TLS on, as shipped) carry the non-page images and then the page
server's traffic; `criu dump --lazy-pages`, `criu lazy-pages` and `criu restore
--lazy-pages -d` are driven by imgmig's own commands (commands/lazy.py). Per run:

- freeze->running: from the start of `criu dump` until `criu restore -d` returned;
- every page: from the same start until `criu lazy-pages` exited (it exits once every
  page is on the destination);
- the longest stall the process felt: its 2 ms CLOCK_REALTIME ticker, reset just before
  the dump, read from the first state line written after every page arrived (the freeze
  and every page fault after the restore count: a read of a missing page blocks its
  thread, and the interpreter's lock with it);
- the workload's throughput: pages its touch thread read per second over the background
  copy (first state line after the restore to the first after the last page), against
  the same rate over at least BASELINE seconds before the freeze;
- what crossed the tunnel: lazy-pages' requests (24-byte records) and the pages'
  bytes, and from lazy-pages' own log (-v3: one "Read ADDR N pages" line per request)
  the requests by size;
- the memory digest, re-computed by the workload after the copy, must equal its own
  from before the freeze.

From STOPPED_FROM_MIB (4 GiB) on, the run does not wait for every page (40-90 s a run,
beyond `make bench`'s 15 minutes; those sizes are there for freeze-to-running): once the
restore returned it reads the felt stall from the first state line written
FELT_READ_AFTER seconds later, then stops the copy as a failed copy ends (stop_copy).
Every page, the workload's throughput during the copy and the digest after it are then
not measured.
"""

from __future__ import annotations

import collections
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgmig.commands.common import CommandError, ControlClient
from imgmig.commands.lazy import LazyDump, LazyRestore, dump_lazy, restore_lazy
from imgmig.roles.endpoints import CONTROL_SOCKET
from testbed import daemons, lazy, migrate, workload

from .common import MIB, Laps, make_cold, prewarm

if TYPE_CHECKING:
    from testbed.netns import Node

    from .realcriu import RealBench

TOUCH = 200            # pages the workload reads a second, at random over its whole buffer
UNTOUCHED_FROM_MIB = 4096  # from this size on the workload runs without its reader (bench/README.md, "Time")
BASELINE = 1.0         # seconds of the workload's reading measured before the freeze
PS_IOV_SIZE = 24       # one lazy-pages request (struct page_server_iov), also the header of each reply
EVERY_PAGE_WAIT = 900.0
STOPPED_FROM_MIB = 4096  # from this size on the copy is stopped once the felt stall was read (time budget)
FELT_READ_AFTER = 2.0  # seconds after the restore returned: the felt stall of a stopped run is read then
READ_LINE = re.compile(r"Read [0-9a-f]+ (\d+) pages")


class StateLog(threading.Thread):
    """Keep every line the workload writes (it replaces its state file every ~100 ms), so
    that the lines from just after the restore are still there once the copy ended."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.lines: list[workload.State] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            state = workload.State.read(self.path)
            if state is not None and (not self.lines or state.written != self.lines[-1].written):
                self.lines.append(state)
            self.halt.wait(0.02)

    def first_after(self, wall: float, timeout: float = 30.0) -> workload.State:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((s for s in self.lines if s.written > wall), None)
            if found is not None:
                return found
            time.sleep(0.02)
        raise TimeoutError(f"{self.path}: no workload state written after the restore within {timeout:.0f} s")


def run(bench: RealBench, mib: int, mode: str) -> dict[str, Any]:
    """One lazy migration of a fresh `mib` MiB workload; `mode` is cold or warm (warm:
    the memory the restored process will take is touched and freed first). From
    bench.lazy_stopped_from_mib on (STOPPED_FROM_MIB by default), the copy is stopped once
    the felt stall was read (stop_copy)."""
    pair = bench.pairs["lazy"]
    state = bench.workdir / f"state-lazy-{mib}.json"
    images = Path(tempfile.mkdtemp(prefix="lazy-", dir=bench.tmpfs))
    dump_dir, restore_dir = images / "a", images / "b"
    dump_dir.mkdir()
    restore_dir.mkdir()
    criu = [*bench.criu, "-v3"]  # lazy-pages logs each request's size at level 3
    restored = 0
    touch = touch_rate(mib)
    options = ["--touch", str(touch), "--pattern-cache", str(bench.tmpfs)]
    setup: dict[str, float] = {}
    clock = Laps(setup)
    try:
        with lazy.pipe_max(), lazy.ns_workload(bench.nodes.a, mib, state, warmup=1, options=options) as running:
            bench.nodes.a.pin(running.pid)
            clock.lap("workload_start")
            bench.settle()
            clock.lap("settle")
            prewarm_s = prewarm(mib * MIB) if mode == "warm" else None
            if mode == "cold":
                make_cold()
            clock.lap("prewarm" if mode == "warm" else "cold_wait")
            # the baseline after the pre-warm, which would compete with the workload for the CPUs
            warmed = time.time()
            start = workload.wait_state(state, lambda s: s.written > warmed, 30)
            if touch:
                workload.wait_state(state, lambda s: s.written >= start.written + BASELINE, 30)
            before = workload.reset_gap(running.pid, state)
            lines = StateLog(state)
            lines.start()
            clock.lap("other")
            stopped = mib >= bench.lazy_stopped_from_mib
            try:
                with ControlClient(pair.proxy_dir / CONTROL_SOCKET, "proxy") as proxy, \
                        ControlClient(pair.cache_dir / CONTROL_SOCKET, "cache") as client:
                    dumped = dump_lazy(_criu_on(bench.nodes.a, criu), running.pid, proxy, pair.proxy_dir,
                                       images_dir=dump_dir)
                    checkpoint = lazy.claim(client, "node-a")
                    claimed_at = time.monotonic()
                    restore = restore_lazy(client, checkpoint, _criu_on(bench.nodes.b, criu),
                                           images_dir=restore_dir)
                    running_at, running_wall = time.monotonic(), time.time()
                    restored = restore.pid
                    if stopped:
                        clock.lap("migration")
                        after_restore = lines.first_after(running_wall + FELT_READ_AFTER)
                        clock.lap("felt_read")
                        moved = stop_copy(pair, restore, client, dumped, mib)
                        clock.lap("stop")
                    else:
                        restore.lazy.wait(EVERY_PAGE_WAIT)
                        every_page_at, every_page_wall = time.monotonic(), time.time()
                        moved = restore.finish(client, timeout=60)
                        if dumped.wait(60) != 0:  # the proxy's control connection stays open until then
                            raise RuntimeError(f"the lazy dump failed: {dumped.tail()}")
                if not stopped:
                    after_restore = lines.first_after(running_wall)
                    after_copy = lines.first_after(every_page_wall)
                    clock.lap("migration")
            finally:
                lines.halt.set()
            requests = _requests_by_size(restore_dir / "lazy.log")
            if not stopped:
                fresh = workload.verify(restored, state, 120)
                if fresh.verified_digest != running.before.digest:
                    raise RuntimeError(f"lazy {mib} MiB: the memory digest differs after the copy")
                if moved["pages_bytes"] < mib * MIB:
                    raise RuntimeError(f"lazy {mib} MiB: only {moved['pages_bytes']} bytes of pages came through "
                                       f"the tunnel: this was no lazy migration; CRIU's logs: {_keep_logs(images)}")
                clock.lap("check")
        out: dict[str, Any] = {
            "total_s": running_at - dumped.frozen_at,
            "dump_s": dumped.handed_at - dumped.frozen_at,  # images handed to the proxy
            "claimed_s": claimed_at - dumped.frozen_at,  # the cache had them, and this restore claimed them
            "touch_per_s": touch,
            "touch_before_per_s": ((before.touched - start.touched) / (before.written - start.written)
                                   if touch else None),
            "requests_by_pages": requests,
            "prewarm_s": prewarm_s,
            "setup_s": setup,  # the migration's own time is taken out below, in finally
        }
        if stopped:
            out.update(every_page_s=None, copy_s=None, felt_gap_s=after_restore.max_gap_s, stopped=True,
                       felt_read_after_s=after_restore.written - running_wall, touch_during_copy_per_s=None,
                       pages_bytes=moved.get("pages_bytes"), requests=None)
            return out
        copy_s = after_copy.written - after_restore.written
        out.update(every_page_s=every_page_at - dumped.frozen_at, copy_s=every_page_at - running_at,
                   felt_gap_s=after_copy.max_gap_s, stopped=False,
                   touch_during_copy_per_s=((after_copy.touched - after_restore.touched) / copy_s
                                            if touch and copy_s > 0 else None),
                   pages_bytes=moved["pages_bytes"], requests=moved["requests_bytes"] // PS_IOV_SIZE)
        return out
    finally:
        if restored:
            migrate.kill_and_reap(restored)
        shutil.rmtree(images, ignore_errors=True)
        clock.lap("teardown")
        setup.pop("migration", None)


def stop_copy(pair: daemons.Pair, restore: LazyRestore, client: ControlClient, dumped: LazyDump,
              mib: int) -> dict[str, Any]:
    """End a background copy before its last page as a failed copy ends (commands/lazy.py;
    tests/test_lazy_criu.py, a killed lazy-pages): lazy-pages is killed, LazyRestore.finish
    kills the restored process (its memory is incomplete) and gives the right back, the page
    server is reset, so the dump fails and the source resumes (ns_workload's exit then kills
    it and its PID namespace). Waits until both daemons dropped the checkpoint, so that the
    next run's settle() finds them empty. Returns what the tunnel had carried (may be empty)."""
    restore.lazy.kill()
    try:
        restore.finish(client, timeout=60)
        ended = True  # every page had come already (a small size on a fast machine): nothing was stopped
    except CommandError:  # "the background copy ... failed": as asked
        ended = False
    if dumped.wait(60) == 0 and not ended:
        raise RuntimeError(f"lazy {mib} MiB: the dump ended well although its copy was stopped")
    for daemon in (pair.proxy, pair.cache):
        assert daemon is not None
        daemon.wait_released(15)
    return dict(restore.tunnel_reply)


def _criu_on(node: Node, criu: list[str]) -> list[str]:
    """CRIU's argv run in `node`'s network namespace and on its CPUs."""
    return [*node.cpu_prefix(), *lazy.net_of(node), *criu]


def touch_rate(mib: int) -> int:
    """The reader's pages a second at this size. At 4 GiB it is off: each of its faults
    resets lazy-pages' background request to 64 KiB, which made the copy about a fifth
    slower, and the 4 GiB targets are about freeze-to-running only."""
    return TOUCH if mib < UNTOUCHED_FROM_MIB else 0


def _requests_by_size(log: Path) -> dict[str, int]:
    """lazy-pages' requests to the page server, counted by their size in pages."""
    counts: collections.Counter[int] = collections.Counter()
    for line in log.read_text(errors="replace").splitlines():
        if match := READ_LINE.search(line):
            counts[int(match.group(1))] += 1
    return {str(pages): counts[pages] for pages in sorted(counts)}


def _keep_logs(images: Path) -> Path:
    """Copy CRIU's logs of a failed run out of the directory about to be removed."""
    kept = Path(tempfile.mkdtemp(prefix="imgmig-lazy-logs-"))
    for log in images.glob("*/*.log"):
        shutil.copy(log, kept / f"{log.parent.name}-{log.name}")
    return kept
