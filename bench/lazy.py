"""Lazy (post-copy) migration through imgmig against CRIU's own dump + restore, in one run.

    sudo PYTHONPATH=. /usr/bin/python3 -m bench.lazy --sizes 256,1024 --reps 1 --out bench/results

Per size and repetition, interleaved:
- floor: `criu dump -D` into tmpfs and `criu restore -D -d` from it, one node, no network:
  freeze->running is dump start to restore returned;
- lazy: imgmig-proxy in netns A, imgmig-cache in netns B (TLS on), `criu dump --lazy-pages`
  whose images go through the proxy, `criu lazy-pages` + `criu restore --lazy-pages -d`
  on B (commands/lazy.py): freeze->running is dump start to restore returned; then the
  time until every page arrived, the pages' bytes, and the longest stall the process
  itself felt (its 2 ms CLOCK_REALTIME ticker, reset just before the dump, read once
  every page arrived: the freeze and every fault after the restore count).
The workload runs in netns A and its own PID namespace (testbed/lazy.py says why) for
both methods. Writes lazy.md and lazy.json to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from imgmig.commands.common import ControlClient
from imgmig.commands.lazy import dump_lazy, restore_lazy
from imgmig.roles.endpoints import CONTROL_SOCKET
from testbed import criu as testbed_criu
from testbed import daemons, lazy, migrate, netns, workload

TMPFS = Path("/dev/shm")


def floor(criu: list[str], node: netns.Node, mib: int, workdir: Path) -> dict[str, Any]:
    images = Path(tempfile.mkdtemp(prefix="imgmig-lazy-floor-", dir=TMPFS))
    state = workdir / "floor-state.json"
    try:
        with lazy.ns_workload(node, mib, state) as running:
            workload.reset_gap(running.pid, state)
            started = time.monotonic()
            subprocess.run([*lazy.net_of(node), *criu, "dump", "-t", str(running.pid), "-D", str(images),
                            "-o", "dump.log"], check=True, stdin=subprocess.DEVNULL)
            dumped = time.monotonic()
            subprocess.run([*lazy.net_of(node), *criu, "restore", "-D", str(images), "-d", "--pidfile",
                            str(images / "restore.pid"), "-o", "restore.log"], check=True, stdin=subprocess.DEVNULL)
            running_at = time.monotonic()
            restored = int((images / "restore.pid").read_text())
            try:
                after = workload.wait_state(state, lambda s: s.counter > running.before.counter + 5, 30)
            finally:
                migrate.kill_and_reap(restored)
        return {"method": "floor", "mib": mib, "freeze_to_running": running_at - started,
                "dump": dumped - started, "felt_stall": after.max_gap_s}
    finally:
        shutil.rmtree(images, ignore_errors=True)


def lazy_run(criu: list[str], nodes: netns.TwoNodes, mib: int, workdir: Path) -> dict[str, Any]:
    state = workdir / "lazy-state.json"
    pair_dir = Path(tempfile.mkdtemp(prefix="imgmig-lazy-pair-", dir=workdir))
    kept: list[Path] = []
    restored = 0
    try:
        with lazy.ns_workload(nodes.a, mib, state) as running, \
                daemons.proxy_and_cache(pair_dir, nodes.a, nodes.b) as pair:
            workload.reset_gap(running.pid, state)
            with ControlClient(pair.proxy_dir / CONTROL_SOCKET, "proxy") as proxy:
                dumped = dump_lazy([*lazy.net_of(nodes.a), *criu], running.pid, proxy, pair.proxy_dir)
            kept.append(dumped.images_dir)
            with ControlClient(pair.cache_dir / CONTROL_SOCKET, "cache") as client:
                restore = restore_lazy(client, lazy.claim(client, "node-a"), [*lazy.net_of(nodes.b), *criu])
                running_at = time.monotonic()
                kept.append(restore.images_dir)
                restored = restore.pid
                moved = restore.finish(client, timeout=600)
            every_page_at = time.monotonic()
            if dumped.wait(60) != 0:
                raise RuntimeError(f"the lazy dump failed: {dumped.tail()}")
            fresh = workload.verify(restored, state, 120)
            if fresh.verified_digest != running.before.digest:
                raise RuntimeError("the memory digest differs after the lazy migration")
            pair.stop()
        return {"method": "lazy", "mib": mib, "freeze_to_running": running_at - dumped.frozen_at,
                "images_handed": dumped.handed_at - dumped.frozen_at,
                "every_page": every_page_at - dumped.frozen_at, "pages_bytes": moved["pages_bytes"],
                "felt_stall": fresh.max_gap_s}
    finally:
        if restored:
            migrate.kill_and_reap(restored)
        for path in kept:
            shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(pair_dir, ignore_errors=True)


def summary(runs: list[dict[str, Any]]) -> str:
    lines = ["| MiB | floor freeze->running (s) | lazy freeze->running (s) | lazy / floor | lazy: every page (s) "
             "| longest felt stall, floor / lazy (s) |", "|---|---|---|---|---|---|"]
    for mib in sorted({run["mib"] for run in runs}):
        def median(method: str, key: str, size: int = mib) -> float:
            return statistics.median(r[key] for r in runs if r["method"] == method and r["mib"] == size)
        ratio = median("lazy", "freeze_to_running") / median("floor", "freeze_to_running")
        lines.append(f"| {mib} | {median('floor', 'freeze_to_running'):.2f} | {median('lazy', 'freeze_to_running'):.2f}"
                     f" | {ratio:.2f} | {median('lazy', 'every_page'):.1f} | {median('floor', 'felt_stall'):.2f} / "
                     f"{median('lazy', 'felt_stall'):.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.lazy", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,1024", help="workload sizes in MiB (%(default)s)")
    parser.add_argument("--reps", type=int, default=1, help="repetitions, interleaved (%(default)s)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    criu = testbed_criu.find_criu()
    sizes = [int(size) for size in args.sizes.split(",")]
    runs: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="imgmig-lazy-bench-"))
    try:
        with migrate.subreaper(), lazy.pipe_max(), netns.two_nodes("imgmig-lazyb") as nodes:
            for _ in range(args.reps):
                for mib in sizes:
                    runs.append(floor(criu, nodes.a, mib, workdir))
                    runs.append(lazy_run(criu, nodes, mib, workdir))
                    print(json.dumps(runs[-2]), json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    table = summary(runs)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lazy.json").write_text(json.dumps(runs, indent=1) + "\n")
    stamp = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())
    (args.out / "lazy.md").write_text(f"# Lazy migration against CRIU alone ({stamp}, {args.reps} rep(s))\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
