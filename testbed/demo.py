"""The live-migration demo (tools/demo.sh): proxy on node A, cache on node B (two
network namespaces on this machine), a real workload migrated by a real CRIU with the
restore started before the dump; prints each phase's time and the proof that the
process goes on where it stopped with its memory intact."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import daemons, migrate, netns, workload
from .criu import CriuUnavailable, find_criu


def say(text: str) -> None:
    print(text, flush=True)


def run(mib: int, transfer: str, keep: bool) -> int:
    criu = find_criu()
    say(f"CRIU: {' '.join(criu)}")
    migrate.become_subreaper()
    workdir = Path(tempfile.mkdtemp(prefix="imgmig-demo-"))
    try:
        with netns.two_nodes("imgmig-demo") as nodes, \
                daemons.proxy_and_cache(workdir, nodes.a, nodes.b, transfer=transfer) as pair:
            say(f"node A: netns {nodes.a.netns} {nodes.a.address} runs imgmig-proxy ({pair.proxy_dir})")
            say(f"node B: netns {nodes.b.netns} {nodes.b.address} runs imgmig-cache ({pair.cache_dir}), "
                f"transfer {transfer}")
            say(f"link: mutual TLS 1.3, keys made by `imgmig pki` in {workdir / 'pki'}; the proxy expects "
                f"node-b, the cache allows node-a")
            return _migrate_once(criu, pair, workdir, mib)
    finally:
        if keep:
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _migrate_once(criu: list[str], pair: daemons.Pair, workdir: Path, mib: int) -> int:
    state_path = workdir / "state.json"
    say(f"starting a workload holding {mib} MiB of incompressible data ...")
    proc = workload.start(mib, state_path, log_path=workdir / "workload.log")
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it the moment the dump kills it
    restored = None
    try:
        before = workload.wait_state(state_path, lambda s: s.counter >= 20, 120)
        say(f"workload pid {before.pid} running: counter {before.counter}, memory SHA-256 {before.digest[:16]}...")
        at_dump: list[workload.State | None] = []
        say("starting criu restore on node B (it waits for the images), then criu dump on node A ...")
        result = migrate.migrate(criu, proc.pid, pair.proxy_dir, pair.cache_dir, workdir, cache=pair.cache,
                                 on_dumped=lambda: at_dump.append(workload.State.read(state_path)))
        restored = result.pid
        return _report(result, pair, state_path, before, at_dump[0], mib)
    finally:
        for pid in {proc.pid, restored} - {None}:
            migrate.kill_and_reap(pid)  # type: ignore[arg-type]


def _report(result: migrate.Result, pair: daemons.Pair, state_path: Path, before: workload.State,
            at_dump: workload.State | None, mib: int) -> int:
    t = result.timings
    transfer = f"{t.transfer:7.3f} s" if t.transfer is not None else "    n/a"
    say("")
    say("phase timings (seconds from the freeze, i.e. the start of criu dump):")
    say(f"  dump      criu dump returned              {t.dump:7.3f} s")
    say(f"  transfer  cache has every image, verified {transfer}")
    say(f"  restore   criu restore -d returned        {t.restore:7.3f} s"
        f"  ({t.restore_after_dump:.3f} s after the dump)")
    say(f"  total     freeze-to-running               {t.total:7.3f} s")
    after = workload.wait_state(state_path, lambda s: at_dump is not None and s.counter > at_dump.counter + 5, 30)
    fresh = workload.verify(result.pid, state_path)
    expected = workload.expected_digest(mib)
    say("")
    say(f"counter: {at_dump.counter if at_dump else '?'} when frozen -> {after.counter} after restore "
        f"(pid {before.pid} -> {after.pid}, token {before.token} -> {after.token})")
    say(f"memory SHA-256 recomputed after restore: {fresh.verified_digest[:16]}... "
        f"(before: {before.digest[:16]}..., expected: {expected[:16]}...)")
    say("cache:  " + pair.cache.wait_log("complete from", 10).split(": ", 1)[1])  # type: ignore[union-attr]
    say("proxy:  " + pair.proxy.wait_log("releasing this node's copy", 10).split(": ", 1)[1])
    ok = (at_dump is not None and after.token == before.token == at_dump.token and after.pid == before.pid
          and after.counter > at_dump.counter and fresh.verified_digest == before.digest == expected)
    statuses = pair.stop()
    say(f"daemons stopped: {statuses}")
    ok = ok and all(code == 0 for code in statuses.values())
    say("RESULT: " + ("the process continues on node B where it stopped, memory intact" if ok
                      else "FAILED: see above"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m testbed.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="memory the workload holds (default 512)")
    parser.add_argument("--transfer", choices=("streaming", "store-and-forward"), default="streaming")
    parser.add_argument("--keep", action="store_true", help="keep the work folder with all logs")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        code = run(args.mib, args.transfer, args.keep)
    except (CriuUnavailable, netns.NetnsUnavailable, daemons.DaemonFailed, migrate.MigrationFailed,
            TimeoutError) as exc:
        say(f"demo failed: {exc}")
        return 1
    say(f"(demo took {time.monotonic() - started:.1f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
