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

from imgmig.commands.common import ControlClient
from imgmig.commands.lazy import dump_lazy, restore_lazy
from imgmig.roles.endpoints import CONTROL_SOCKET
from testbed import lazy, migrate, workload

from .common import MIB, make_cold, prewarm

if TYPE_CHECKING:
    from testbed.netns import Node

    from .realcriu import RealBench

TOUCH = 200            # pages the workload reads a second, at random over its whole buffer
UNTOUCHED_FROM_MIB = 4096  # from this size on the workload runs without its reader (bench/README.md, "Time")
BASELINE = 1.0         # seconds of the workload's reading measured before the freeze
PS_IOV_SIZE = 24       # one lazy-pages request (struct page_server_iov), also the header of each reply
EVERY_PAGE_WAIT = 900.0
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
    the memory the restored process will take, plus 256 MiB, is touched and freed first)."""
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
    try:
        with lazy.pipe_max(), lazy.ns_workload(bench.nodes.a, mib, state, options=options) as running:
            bench.nodes.a.pin(running.pid)
            bench.settle()
            prewarm_s = prewarm(mib * MIB + (256 << 20)) if mode == "warm" else None
            if mode == "cold":
                make_cold()
            # the baseline after the pre-warm, which would compete with the workload for the CPUs
            warmed = time.time()
            start = workload.wait_state(state, lambda s: s.written > warmed, 30)
            if touch:
                workload.wait_state(state, lambda s: s.written >= start.written + BASELINE, 30)
            before = workload.reset_gap(running.pid, state)
            lines = StateLog(state)
            lines.start()
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
                    restore.lazy.wait(EVERY_PAGE_WAIT)
                    every_page_at, every_page_wall = time.monotonic(), time.time()
                    moved = restore.finish(client, timeout=60)
                    if dumped.wait(60) != 0:  # the proxy's control connection stays open until then
                        raise RuntimeError(f"the lazy dump failed: {dumped.tail()}")
                after_restore = lines.first_after(running_wall)
                after_copy = lines.first_after(every_page_wall)
            finally:
                lines.halt.set()
            fresh = workload.verify(restored, state, 120)
            if fresh.verified_digest != running.before.digest:
                raise RuntimeError(f"lazy {mib} MiB: the memory digest differs after the copy")
            requests = _requests_by_size(restore_dir / "lazy.log")
            if moved["pages_bytes"] < mib * MIB:
                raise RuntimeError(f"lazy {mib} MiB: only {moved['pages_bytes']} bytes of pages came through the "
                                   f"tunnel: this was no lazy migration; CRIU's logs: {_keep_logs(images)}")
        copy_s = after_copy.written - after_restore.written
        return {
            "total_s": running_at - dumped.frozen_at,
            "dump_s": dumped.handed_at - dumped.frozen_at,  # images handed to the proxy
            "claimed_s": claimed_at - dumped.frozen_at,  # the cache had them, and this restore claimed them
            "every_page_s": every_page_at - dumped.frozen_at,
            "copy_s": every_page_at - running_at,
            "felt_gap_s": after_copy.max_gap_s,
            "touch_per_s": touch,
            "touch_before_per_s": ((before.touched - start.touched) / (before.written - start.written)
                                   if touch else None),
            "touch_during_copy_per_s": ((after_copy.touched - after_restore.touched) / copy_s
                                        if touch and copy_s > 0 else None),
            "pages_bytes": moved["pages_bytes"],
            "requests": moved["requests_bytes"] // PS_IOV_SIZE,
            "requests_by_pages": requests,
            "prewarm_s": prewarm_s,
        }
    finally:
        if restored:
            migrate.kill_and_reap(restored)
        shutil.rmtree(images, ignore_errors=True)


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
