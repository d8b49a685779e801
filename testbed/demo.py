"""The live-migration demo (tools/demo.sh): proxy on node A, cache on node B (two
network namespaces on this machine), a real workload migrated by a real CRIU with the
operator's commands: `imgmig restore` waiting on B, then `imgmig migrate` on A, which
shows its progress and phase times; then the proof that the process goes on where it
stopped with its memory intact."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
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
        say("")
        say("node B$ imgmig restore --from node-a        # waits for node-a's checkpoint")
        restore = subprocess.Popen(_imgmig("restore", "--from", "node-a", "--config", str(workdir / "cache.yaml"),
                                           "--criu", shlex.join(criu)),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                                   cwd=daemons.REPO_ROOT)
        say(f"node A$ imgmig migrate {proc.pid} --to node-b")
        code = subprocess.call(_imgmig("migrate", str(proc.pid), "--to", "node-b", "--config",
                                       str(workdir / "proxy.yaml"), "--criu", shlex.join(criu)),
                               env=_env(), cwd=daemons.REPO_ROOT)
        out, _ = restore.communicate(timeout=300)
        for line in out.splitlines():
            say(f"  node B: {line}")
        if code != 0 or restore.returncode != 0:
            say(f"RESULT: FAILED: imgmig migrate exited {code}, imgmig restore {restore.returncode}")
            return 1
        restored = int(out.strip().splitlines()[-1].rsplit(" ", 1)[1])
        return _report(restored, pair, state_path, before, mib)
    finally:
        for pid in {proc.pid, restored} - {None}:
            migrate.kill_and_reap(pid)  # type: ignore[arg-type]


def _imgmig(*args: str) -> list[str]:
    return [daemons.PYTHON, "-m", "imgmig", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(daemons.REPO_ROOT)}


def _report(restored: int, pair: daemons.Pair, state_path: Path, before: workload.State, mib: int) -> int:
    after = workload.wait_state(state_path, lambda s: s.pid == restored and s.counter > before.counter + 5, 30)
    fresh = workload.verify(restored, state_path)
    expected = workload.expected_digest(mib)
    say("")
    say(f"counter: {before.counter} before the migration -> {after.counter} on node B "
        f"(pid {before.pid} -> {after.pid}, token {before.token} -> {after.token})")
    say(f"memory SHA-256 recomputed on node B: {fresh.verified_digest[:16]}... "
        f"(before: {before.digest[:16]}..., expected: {expected[:16]}...)")
    say("cache:  " + pair.cache.wait_log("complete from", 10).split(": ", 1)[1])  # type: ignore[union-attr]
    say("proxy:  " + pair.proxy.wait_log("this node's copy released", 10).split(": ", 1)[1])
    ok = (after.token == before.token and after.pid == before.pid and after.counter > before.counter
          and fresh.verified_digest == before.digest == expected)
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
