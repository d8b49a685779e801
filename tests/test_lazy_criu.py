"""Lazy (post-copy) migration with real CRIU through imgmig-proxy (netns A) and
imgmig-cache (netns B), TLS on: the non-page images travel as a checkpoint, the pages
follow through the tunnel inside the checkpoint's link.

The workload runs in netns A (CRIU dumps where the process's network is, and its page
server listens on A's loopback, where the proxy reaches it) and in its own PID
namespace: on one machine the frozen source stays until its last page is served, and a
restore in the same PID namespace would find its PID taken.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import REPO
from test_real_criu import criu, workdir  # noqa: F401 - fixtures shared with the other real-CRIU tests

from imgmig.commands.common import CommandError, ControlClient
from imgmig.commands.lazy import LazyDump, LazyRestore, dump_lazy, restore_lazy
from imgmig.roles.endpoints import CONTROL_SOCKET
from testbed import daemons, lazy, migrate, netns, workload
from testbed.lazy import NsWorkload, claim, net_of

pytestmark = pytest.mark.realcriu

MIB = 256


@pytest.fixture
def nodes() -> Iterator[netns.TwoNodes]:
    with migrate.subreaper(), netns.two_nodes("imgmig-lazy") as pair:
        yield pair


@pytest.fixture
def pipe_max() -> Iterator[None]:
    with lazy.pipe_max():
        yield


@pytest.fixture
def ns_workload(nodes: netns.TwoNodes, workdir: Path) -> Iterator[NsWorkload]:  # noqa: F811
    with lazy.ns_workload(nodes.a, MIB, workdir / "state.json") as running:
        yield running


@pytest.fixture
def slow_copy_workload(nodes: netns.TwoNodes, workdir: Path) -> Iterator[NsWorkload]:  # noqa: F811
    """1 GiB, read at random while it is copied: its background copy takes well over the 3 s
    the lazy-pages guard waits after its command died (256 MiB, niced, can finish within
    them, and then rightly stays on B)."""
    with lazy.ns_workload(nodes.a, 4 * MIB, workdir / "state.json", options=["--touch", "200"]) as running:
        yield running


def lazy_dump(pair: daemons.Pair, criu_command: list[str], pid: int) -> LazyDump:
    """`dump_lazy` as `imgmig migrate --lazy` runs it, announced on the proxy's control socket."""
    with ControlClient(pair.proxy_dir / CONTROL_SOCKET, "proxy") as proxy:
        return dump_lazy(criu_command, pid, proxy, pair.proxy_dir)


def listeners(node: netns.Node) -> list[str]:
    out = netns.run_in(node.netns, ["ss", "-Hltn"], capture_output=True, text=True).stdout
    return sorted(line.split()[3] for line in out.splitlines())


def test_lazy_migration_of_256_mib_through_the_tunnel(criu: list[str], nodes: netns.TwoNodes,  # noqa: F811
                                                      workdir: Path, pipe_max: None,  # noqa: F811
                                                      ns_workload: NsWorkload) -> None:
    with daemons.proxy_and_cache(workdir, nodes.a, nodes.b) as pair, _LazyRun() as run:
        dumped = run.dump(pair, [*net_of(nodes.a), *criu], ns_workload.pid)
        with ControlClient(pair.cache_dir / CONTROL_SOCKET, "cache") as client:
            checkpoint = claim(client, "node-a")
            assert checkpoint == dumped.checkpoint
            restore = run.restore(client, checkpoint, [*net_of(nodes.b), *criu])
            restored_pid = restore.pid
            running_at = time.monotonic()
            # the only listener on B is the cache's own port: lazy-pages' socket is a socketpair;
            # none on A, not even on loopback: the dump's page server is a socketpair too
            assert listeners(nodes.b) == [f"{nodes.b.address}:{daemons.DEFAULT_PORT}"]
            assert listeners(nodes.a) == [], "a local process could read the process's memory"
            with ControlClient(pair.cache_dir / CONTROL_SOCKET, "cache") as status:  # this one carries the tunnel
                info = status.request("list")["checkpoints"]
            assert [c["id"] for c in info] == [checkpoint] and "lazy" in info[0], info
            moved = restore.finish(client, timeout=300)
        copied_at = time.monotonic()
        assert dumped.wait(30) == 0, dumped.tail()  # the source's CRIU exited after the last page
        assert moved["error"] is None and moved["pages_bytes"] >= MIB << 20, moved
        process = psutil.Process(restored_pid)
        assert process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD, psutil.STATUS_STOPPED)
        at_dump = ns_workload.before
        later = workload.wait_state(ns_workload.state_path, lambda s: s.counter > at_dump.counter + 5, 20)
        assert later.token == at_dump.token, "a new process started, not the restored one"
        fresh = workload.verify(restored_pid, ns_workload.state_path)
        assert fresh.verified_digest == workload.expected_digest(MIB) == at_dump.digest
        pair.proxy.wait_log("fetches its lazy pages from the page server", 5)
        pair.cache.wait_log("tunnelled to node-a", 5)
        pair.cache.wait_released()
        # lazy_done: the cache confirmed RUNNING with the pid, so the proxy released its copy at once
        pair.proxy.wait_log(f"as pid {restored_pid}, confirmed by its restore; this node's copy released", 15)
        pair.proxy.wait_released(5)
        statuses = pair.stop()
        assert statuses == {"proxy": 0, "cache": 0}
        for daemon in (pair.proxy, pair.cache):
            assert "Traceback" not in daemon.log() and "unexpected error" not in daemon.log(), daemon.log()
        print(f"lazy {MIB} MiB: freeze->running {running_at - dumped.frozen_at:.2f} s, every page after "
              f"{copied_at - dumped.frozen_at:.2f} s, {moved['pages_bytes']} bytes of pages tunnelled")


def test_a_foreign_process_cannot_reach_the_tunnel(nodes: netns.TwoNodes, workdir: Path) -> None:  # noqa: F811
    """Nothing listens for the pages; the control socket that takes lazy-pages' socket is
    root's only, and its tunnel op serves only the connection that claimed the checkpoint."""
    with daemons.proxy_and_cache(workdir, nodes.a, nodes.b) as pair:
        path = pair.cache_dir / CONTROL_SOCKET
        assert listeners(nodes.b) == [f"{nodes.b.address}:{daemons.DEFAULT_PORT}"]
        assert path.stat().st_mode & 0o777 == 0o600 and path.stat().st_uid == 0
        probe = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
                 "try:\n s.connect(sys.argv[1])\nexcept PermissionError:\n print('refused')\n")
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                               probe, str(path)], capture_output=True, text=True, timeout=30)
        assert done.stdout.strip() == "refused", (done.stdout, done.stderr)
        ours, theirs = socket.socketpair()
        with ours, theirs, ControlClient(path, "cache") as client, \
                pytest.raises(CommandError, match="not claimed by this connection"):
            client.request("tunnel", fd=ours.fileno(), id="node-a-1")
        statuses = pair.stop()
    assert statuses == {"proxy": 0, "cache": 0}


def test_killed_lazy_pages_leaves_the_process_on_the_source(criu: list[str], nodes: netns.TwoNodes,  # noqa: F811
                                                           workdir: Path, pipe_max: None,  # noqa: F811
                                                           ns_workload: NsWorkload) -> None:
    """CRIU alone loses the process in both places here (the dump counts the migration done
    and kills the source). Through imgmig the page server is reset instead: the dump fails,
    the process resumes on the source, and the half-restored copy on the destination dies."""
    _break_the_copy_midway(criu, nodes, workdir, ns_workload, lambda restore: restore.lazy.kill(),
                           "a killed lazy-pages")


def test_a_link_cut_during_the_copy_leaves_the_process_on_the_source(criu: list[str],  # noqa: F811
                                                                      nodes: netns.TwoNodes,
                                                                      workdir: Path, pipe_max: None,  # noqa: F811
                                                                      ns_workload: NsWorkload) -> None:
    """The link resumes, a page stream cannot: the channel ends on both nodes, the page
    server is reset, the dump fails and the process resumes on the source; the
    half-restored copy on the destination dies."""
    def cut(_restore: object) -> None:
        killed = netns.run_in(nodes.a.netns, ["ss", "-K", "-t", "-H", "dst", nodes.b.address, "dport", "=",
                                              str(daemons.DEFAULT_PORT)], capture_output=True, text=True)
        assert killed.stdout.strip(), "no connection to cut"

    _break_the_copy_midway(criu, nodes, workdir, ns_workload, cut, "a cut link")


def _break_the_copy_midway(criu_command: list[str], nodes: netns.TwoNodes, work: Path, ns_workload: NsWorkload,
                           break_it: Callable[[Any], None], what: str) -> None:
    """Migrate lazily, then break_it(the restore) once the background copy is under way
    (copy_under_way): the copy fails on the destination, the dump fails, the process goes
    on on the source with the memory it was dumped with, the half-restored copy dies, no
    daemon crashes."""
    with daemons.proxy_and_cache(work, nodes.a, nodes.b) as pair, _LazyRun() as run:
        dumped = run.dump(pair, [*net_of(nodes.a), *criu_command], ns_workload.pid)
        with ControlClient(pair.cache_dir / CONTROL_SOCKET, "cache") as client:
            restore = run.restore(client, claim(client, "node-a"), [*net_of(nodes.b), *criu_command])
            restored_pid = restore.pid
            copy_under_way(restored_pid, ns_workload)
            break_it(restore)
            with pytest.raises(CommandError, match=r"background copy .* failed"):
                restore.finish(client, timeout=60)
        assert dumped.wait(60) != 0, f"the dump counted {what} as a finished migration"
        pair.proxy.wait_log("criu dump fails and the process resumes on this node", 5)
        pair.proxy.wait_log("the lazy restore on node-b (10.77.0.2:9996) failed", 15)
        pair.cache.wait_released()
        pair.proxy.wait_released()
        source = psutil.Process(ns_workload.pid)
        assert source.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD, psutil.STATUS_STOPPED)
        wait_for_exit(restored_pid, 30)
        at_dump = ns_workload.before
        later = workload.wait_state(ns_workload.state_path, lambda s: s.counter > at_dump.counter + 5, 20)
        assert later.token == at_dump.token
        fresh = workload.verify(ns_workload.pid, ns_workload.state_path)
        assert fresh.verified_digest == at_dump.digest, "the source's memory changed"
        statuses = pair.stop()
        assert statuses == {"proxy": 0, "cache": 0}
        for daemon in (pair.proxy, pair.cache):
            assert "Traceback" not in daemon.log() and "unexpected error" not in daemon.log(), daemon.log()


class _LazyRun:
    """What a lazy test started, cleaned up whatever happens: the restored copy, a dump
    still running, their folders."""

    def __init__(self) -> None:
        self.dumped: LazyDump | None = None
        self.restored_pid = 0
        self.kept: list[Path] = []

    def dump(self, pair: daemons.Pair, argv: list[str], pid: int) -> LazyDump:
        self.dumped = lazy_dump(pair, argv, pid)
        self.kept.append(self.dumped.images_dir)
        return self.dumped

    def restore(self, client: ControlClient, checkpoint: str, argv: list[str]) -> LazyRestore:
        restore = restore_lazy(client, checkpoint, argv)
        self.kept.append(restore.images_dir)
        self.restored_pid = restore.pid
        return restore

    def __enter__(self) -> _LazyRun:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.restored_pid:
            migrate.kill_and_reap(self.restored_pid)
        if self.dumped is not None and self.dumped.proc.poll() is None:
            self.dumped.proc.kill()
        for path in self.kept:
            if os.environ.get("IMGMIG_KEEP_WORKDIR"):
                print(f"kept {path} (IMGMIG_KEEP_WORKDIR)")
            else:
                shutil.rmtree(path, ignore_errors=True)


def copy_under_way(restored_pid: int, ns_workload: NsWorkload) -> None:
    """Until a quarter of the workload's memory is on B: the background copy has begun
    (a fixed sleep was, under CI's load, sometimes before it began and sometimes after it
    ended). The interpreter's own pages come first, by fault: the threshold is past them."""
    quarter = (ns_workload.before.mib << 20) // 4
    wait_until(lambda: psutil.Process(restored_pid).memory_info().rss >= quarter, 30, "background copy under way")


def lazy_pages_under(command_pid: int) -> int:
    """The `criu lazy-pages` that `imgmig restore --lazy` (command_pid) runs under its guard."""
    for child in psutil.Process(command_pid).children(recursive=True):
        argv = child.cmdline()
        if "lazy-pages" in argv and "imgmig.commands.lazy_guard" not in argv:
            return child.pid
    raise AssertionError(f"no criu lazy-pages under pid {command_pid}")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.05)


def wait_for_exit(pid: int, timeout: float) -> None:
    """The process is gone (or a zombie: the subreaper reaps it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)
    raise AssertionError(f"the half-restored process {pid} still runs on the destination")


def test_a_failed_lazy_restore_leaves_the_process_on_the_source(criu: list[str], nodes: netns.TwoNodes,  # noqa: F811
                                                                workdir: Path, pipe_max: None,  # noqa: F811
                                                                ns_workload: NsWorkload) -> None:
    dumped: LazyDump | None = None
    with daemons.proxy_and_cache(workdir, nodes.a, nodes.b) as pair:
        try:
            (workdir / "b").mkdir()
            dumped = lazy_dump(pair, [*net_of(nodes.a), *criu], ns_workload.pid)
            with ControlClient(pair.cache_dir / CONTROL_SOCKET, "cache") as client, \
                    pytest.raises(CommandError, match="criu restore --lazy-pages exited with"):
                # CRIU refuses an unknown option: the restore fails on purpose
                restore_lazy(client, claim(client, "node-a"), [*net_of(nodes.b), *criu], workdir / "b",
                             options=["--no-such"])
            assert dumped.wait(60) != 0, "the dump counted a failed restore as a finished migration"
            pair.proxy.wait_log("criu dump fails and the process resumes on this node", 5)
            pair.proxy.wait_log("the lazy restore on node-b (10.77.0.2:9996) failed", 10)
            pair.cache.wait_released()
            pair.proxy.wait_released()
            at_dump = ns_workload.before
            later = workload.wait_state(ns_workload.state_path, lambda s: s.counter > at_dump.counter + 5, 20)
            assert later.token == at_dump.token
            assert workload.verify(ns_workload.pid, ns_workload.state_path).verified_digest == at_dump.digest
            statuses = pair.stop()
            assert statuses == {"proxy": 0, "cache": 0}
        finally:
            if dumped is not None:
                if dumped.proc.poll() is None:
                    dumped.proc.kill()
                shutil.rmtree(dumped.images_dir, ignore_errors=True)


def _restore_lazy_argv(work: Path, nodes: netns.TwoNodes, criu_command: list[str]) -> list[str]:
    """`imgmig restore --lazy` on node B, as an operator runs it."""
    return [sys.executable, "-m", "imgmig", "restore", "--from", "node-a", "--lazy", "--config",
            str(work / "cache.yaml"), "--criu", shlex.join([*net_of(nodes.b), *criu_command])]


def _migrate_lazy_argv(work: Path, nodes: netns.TwoNodes, criu_command: list[str], pid: int) -> list[str]:
    """`imgmig migrate PID --to node-b --lazy --json` on node A."""
    return [sys.executable, "-m", "imgmig", "migrate", str(pid), "--to", "node-b", "--lazy", "--json", "--config",
            str(work / "proxy.yaml"), "--criu", shlex.join([*net_of(nodes.a), *criu_command])]


def test_migrate_lazy_and_restore_lazy_commands(criu: list[str], nodes: netns.TwoNodes,  # noqa: F811
                                                workdir: Path, pipe_max: None,  # noqa: F811
                                                ns_workload: NsWorkload) -> None:
    """The operator's commands: `imgmig restore --lazy` on B, `imgmig migrate --lazy` on A."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with daemons.proxy_and_cache(workdir, nodes.a, nodes.b) as pair:
        restore = subprocess.Popen(_restore_lazy_argv(workdir, nodes, criu),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        migrate_run = subprocess.run(_migrate_lazy_argv(workdir, nodes, criu, ns_workload.pid),
                                     capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        out, err = restore.communicate(timeout=300)
        events = [json.loads(line) for line in migrate_run.stdout.splitlines()]
        assert migrate_run.returncode == 0 and restore.returncode == 0, (events[-1:], migrate_run.stderr, out, err)
        result = events[-1]
        assert "post-copy" in result["outcome"] and result["exit"] == 0
        assert [e["phase"] for e in events if e["event"] == "phase"] == [
            "frozen", "dump done", "verified at the destination", "every page sent", "running on the destination"]
        assert "restored lazily: running as pid" in out and "every page arrived" in out, out
        copied = [int(e["text"].split(": ")[1].split(" MiB")[0]) for e in events
                  if e["event"] == "message" and e["text"].startswith("background copy: ")]
        assert copied and copied == sorted(copied) and copied[-1] > 0, events
        restored_pid = int(out.split("running as pid ")[1].split()[0])
        assert f"running on node-b as pid {restored_pid}, confirmed by its restore" in result["outcome"], result
        try:
            at_dump = ns_workload.before
            later = workload.wait_state(ns_workload.state_path, lambda s: s.counter > at_dump.counter + 5, 20)
            assert later.token == at_dump.token
            assert workload.verify(restored_pid, ns_workload.state_path).verified_digest == at_dump.digest
        finally:
            migrate.kill_and_reap(restored_pid)
        pair.cache.wait_released()
        statuses = pair.stop()
    assert statuses == {"proxy": 0, "cache": 0}
    shutil.rmtree(result["workdir"], ignore_errors=True)
    shutil.rmtree(out.split("CRIU logs in ")[1].split(")")[0], ignore_errors=True)


def test_cache_restore_auto_restores_a_lazy_checkpoint_lazily(criu: list[str], nodes: netns.TwoNodes,  # noqa: F811
                                                              workdir: Path, pipe_max: None,  # noqa: F811
                                                              ns_workload: NsWorkload) -> None:
    """`cache.restore: auto`: the doorbell's `imgmig restore --doorbell` (no --lazy; what
    imgmig-restore@.service runs, systemd-socket-activate --accept standing in for
    imgmig-restore.socket) sees the checkpoint is lazy and restores it lazily, instead of
    a stream restore the cache refuses."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = workdir / "doorbell.log"
    with daemons.proxy_and_cache(workdir, nodes.a, nodes.b, restore="auto") as pair:
        restore = (f"exec {shlex.quote(sys.executable)} -m imgmig restore --doorbell --config "
                   f"{workdir / 'cache.yaml'} --criu {shlex.quote(shlex.join([*net_of(nodes.b), *criu]))} >>{log} 2>&1")
        bell = subprocess.Popen(["systemd-socket-activate", "--accept", "--inetd", "-E", "PYTHONPATH", "-l",
                                 str(pair.cache_dir / "restore.sock"), "sh", "-c", restore],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        restored_pid = 0
        try:
            wait_until(lambda: (pair.cache_dir / "restore.sock").exists(), 10, "the doorbell socket")
            done = subprocess.run(_migrate_lazy_argv(workdir, nodes, criu, ns_workload.pid), capture_output=True,
                                  text=True, env=env, cwd=REPO, timeout=300)
            result = json.loads(done.stdout.splitlines()[-1])
            assert done.returncode == 0 and "post-copy" in result["outcome"], (result, done.stderr,
                                                                                log.read_text())
            wait_until(lambda: "every page arrived" in log.read_text(), 30, "the automatic lazy restore")
            text = log.read_text()
            assert f"checkpoint {result['checkpoint']} is a lazy (post-copy) one: restoring it lazily" in text, text
            restored_pid = int(text.split("running as pid ")[1].split()[0])
            at_dump = ns_workload.before
            later = workload.wait_state(ns_workload.state_path, lambda s: s.counter > at_dump.counter + 5, 20)
            assert later.token == at_dump.token
            assert workload.verify(restored_pid, ns_workload.state_path).verified_digest == at_dump.digest
            pair.cache.wait_log(f"checkpoint {result['checkpoint']}: automatic restore requested", 5)
            pair.cache.wait_released()
            statuses = pair.stop()
            assert statuses == {"proxy": 0, "cache": 0}
        finally:
            bell.terminate()
            bell.wait(10)
            if restored_pid:
                migrate.kill_and_reap(restored_pid)
                shutil.rmtree(text.split("CRIU logs in ")[1].split(")")[0], ignore_errors=True)


def test_a_killed_restore_command_leaves_the_process_on_the_source(criu: list[str], nodes: netns.TwoNodes,  # noqa: F811
                                                                   workdir: Path, pipe_max: None,  # noqa: F811
                                                                   slow_copy_workload: NsWorkload) -> None:
    """kill -9 of `imgmig restore --lazy` once the process runs on B, mid-copy: its guard
    kills lazy-pages and the restored process (whose memory is incomplete), the cache
    gives the right back, the source's dump fails and the process resumes on A only."""
    def kill_restore(_pair: daemons.Pair, restore: subprocess.Popen[str]) -> None:
        restore.kill()
        restore.wait(10)

    pair = _kill_mid_copy(criu, nodes, workdir, slow_copy_workload, kill_restore)
    pair.cache.wait_log("imgmig restore --lazy went away during the background copy", 5)


def test_a_proxy_killed_mid_copy_leaves_the_process_on_the_source(criu: list[str], nodes: netns.TwoNodes,  # noqa: F811
                                                                  workdir: Path, pipe_max: None,  # noqa: F811
                                                                  ns_workload: NsWorkload) -> None:
    """kill -9 of imgmig-proxy mid-copy: the kernel closes its end of the page server's
    socketpair, but migrate's copy keeps the dump from seeing a clean end (which would let
    it kill the process on A); migrate sees the proxy gone and stops the dump, the process
    resumes on A; on B the tunnel fails and the restore kills its copy."""
    def kill_proxy(pair: daemons.Pair, _restore: subprocess.Popen[str]) -> None:
        assert pair.proxy.proc is not None
        pair.proxy.proc.kill()

    _kill_mid_copy(criu, nodes, workdir, ns_workload, kill_proxy, proxy_killed=True)


def _kill_mid_copy(criu_command: list[str], nodes: netns.TwoNodes, work: Path, ns_workload: NsWorkload,
                   kill: Callable[[daemons.Pair, subprocess.Popen[str]], None],
                   proxy_killed: bool = False) -> daemons.Pair:
    """`imgmig restore --lazy` on B and `imgmig migrate --lazy` on A; kill(pair, restore)
    0.2 s after the process runs on B: migrate exits 1 (the process runs on A again), the
    copy on B dies, the source's memory is intact, no daemon crashes."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with daemons.proxy_and_cache(work, nodes.a, nodes.b) as pair:
        restore = subprocess.Popen(_restore_lazy_argv(work, nodes, criu_command),
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
        migrate_run = subprocess.Popen(_migrate_lazy_argv(work, nodes, criu_command, ns_workload.pid),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        restored_pid = 0
        try:
            assert restore.stdout is not None
            for line in restore.stdout:
                if "restored lazily: running as pid" in line:
                    restored_pid = int(line.split("running as pid ")[1].split()[0])
                    break
            assert restored_pid, "the lazy restore never ran"
            copy_under_way(restored_pid, ns_workload)
            # lazy-pages is held while the kill lands, so that the copy cannot end first
            # (256 MiB can take a quarter of a second)
            lazy_pages = lazy_pages_under(restore.pid)
            os.kill(lazy_pages, signal.SIGSTOP)
            try:
                kill(pair, restore)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(lazy_pages, signal.SIGCONT)
            out, err = migrate_run.communicate(timeout=120)
            result = json.loads(out.splitlines()[-1])
            assert migrate_run.returncode == 1 and "runs here" in result["outcome"], (result, err)
            wait_for_exit(restored_pid, 30)
            if not proxy_killed:
                pair.proxy.wait_log("the lazy restore on node-b (10.77.0.2:9996) failed", 30)
                pair.proxy.wait_released()
            pair.cache.wait_released(30)
            source = psutil.Process(ns_workload.pid)
            assert source.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD, psutil.STATUS_STOPPED)
            at_dump = ns_workload.before
            later = workload.wait_state(ns_workload.state_path, lambda s: s.counter > at_dump.counter + 5, 20)
            assert later.token == at_dump.token
            assert workload.verify(ns_workload.pid, ns_workload.state_path).verified_digest == at_dump.digest
            statuses = pair.stop()
            assert statuses["cache"] == 0 and statuses["proxy"] == (-9 if proxy_killed else 0), statuses
            for daemon in (pair.proxy, pair.cache):
                assert "Traceback" not in daemon.log() and "unexpected error" not in daemon.log(), daemon.log()
        finally:
            for proc in (restore, migrate_run):
                if proc.poll() is None:
                    proc.kill()
            if restored_pid:
                migrate.kill_and_reap(restored_pid)
    return pair


def test_a_source_node_lost_mid_copy_loses_the_process_on_both(criu: list[str], nodes: netns.TwoNodes,  # noqa: F811
                                                               workdir: Path, pipe_max: None,  # noqa: F811
                                                               ns_workload: NsWorkload) -> None:
    """Node A dies during the background copy: its link goes down for good (no FIN, no RST
    reaches B), then everything on it dies: the process, its dump (page server) and the
    proxy. The process on B must die rather than run with missing memory; the restore and
    the cache's status say it runs nowhere unless A comes back up (it cannot: the price of
    post-copy)."""
    with daemons.proxy_and_cache(workdir, nodes.a, nodes.b, dead_peer_timeout=2) as pair, _LazyRun() as run:
        dumped = run.dump(pair, [*net_of(nodes.a), *criu], ns_workload.pid)
        with ControlClient(pair.cache_dir / CONTROL_SOCKET, "cache") as client:
            restore = run.restore(client, claim(client, "node-a"), [*net_of(nodes.b), *criu])
            restored_pid = restore.pid
            copy_under_way(restored_pid, ns_workload)
            # lazy-pages is held while node A goes down, so that the copy cannot end first
            # (256 MiB can take a quarter of a second)
            os.kill(restore.lazy.pid, signal.SIGSTOP)
            netns.run_in(nodes.a.netns, ["ip", "link", "set", nodes.a.veth, "down"], check=True)
            assert pair.proxy.proc is not None
            for pid in (ns_workload.pid, dumped.proc.pid, pair.proxy.proc.pid):
                os.kill(pid, signal.SIGKILL)
            os.kill(restore.lazy.pid, signal.SIGCONT)
            with pytest.raises(CommandError, match=r"background copy .* failed.* else nowhere"):
                restore.finish(client, timeout=60)
        wait_for_exit(restored_pid, 30)

        def ended_there() -> list[dict[str, object]]:
            with ControlClient(pair.cache_dir / CONTROL_SOCKET, "cache") as status:
                return [e for e in status.request("status")["ended"] if e["id"] == restore.checkpoint]

        # the cache's journal notes a checkpoint that left its store from another thread
        wait_until(lambda: bool(ended_there()), 10, f"checkpoint {restore.checkpoint} in the cache's ended list")
        (entry,) = ended_there()
        assert entry["state"] == "failed" and "runs on node-a if that node is up" in entry["outcome"], entry
        assert "else nowhere" in entry["outcome"], entry
        pair.cache.wait_released()
        assert pair.stop()["cache"] == 0
        assert "Traceback" not in pair.cache.log() and "unexpected error" not in pair.cache.log()
