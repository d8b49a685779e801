"""Real CRIU 4.x migrations through imgmig-proxy (netns A) and imgmig-cache (netns B).

Needs root, network namespaces and a working CRIU (testbed.criu finds or builds one);
without them every test here is skipped with the reason in capitals.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import PYTHON, REPO

from testbed import criu as testbed_criu
from testbed import daemons, migrate, netns, workload

pytestmark = pytest.mark.realcriu

MIB = 256
WARMUP_TICKS = 20  # the counter must be well past 0 before the dump


@pytest.fixture(scope="module")
def criu() -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("REAL-CRIU TESTS SKIPPED: NOT ROOT (CRIU and network namespaces need root)")
    ok, reason = netns.available()
    if not ok:
        pytest.skip(f"REAL-CRIU TESTS SKIPPED: NO NETWORK NAMESPACES HERE: {reason}")
    try:
        prefix = testbed_criu.find_criu()
    except testbed_criu.CriuUnavailable as exc:
        pytest.skip(f"REAL-CRIU TESTS SKIPPED: NO WORKING CRIU 4.x: {exc} (run tools/ensure-criu)")
    return prefix


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short, because UNIX socket paths are limited to 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="imgmig-rc-"))
    yield path
    if os.environ.get("IMGMIG_KEEP_WORKDIR"):
        print(f"kept {path} (IMGMIG_KEEP_WORKDIR)")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def nodes(criu: list[str]) -> Iterator[netns.TwoNodes]:
    # While a test runs, restored tasks become our children, reaped at once.
    with migrate.subreaper(), netns.two_nodes("imgmig-test") as pair:
        yield pair


@dataclass
class Workload:
    proc: subprocess.Popen
    state_path: Path
    before: workload.State
    pids: set[int]

    @property
    def pid(self) -> int:
        return self.proc.pid


@pytest.fixture
def live_workload(nodes: netns.TwoNodes, workdir: Path) -> Iterator[Workload]:
    """A 256 MiB workload, a child of this process, reaped at once by a thread when the
    dump kills it (its PID must be free for the restore)."""
    state_path = workdir / "state.json"
    proc = workload.start(MIB, state_path, log_path=workdir / "workload.log")
    threading.Thread(target=proc.wait, daemon=True).start()
    pids = {proc.pid}
    try:
        before = workload.wait_state(state_path, lambda s: s.counter >= WARMUP_TICKS, 60)
        yield Workload(proc, state_path, before, pids)
    finally:
        for pid in pids:
            migrate.kill_and_reap(pid)


def _logs(pair: daemons.Pair) -> str:
    cache = pair.cache.log() if pair.cache else "(no cache)"
    return f"\n--- proxy log ---\n{pair.proxy.log()}--- cache log ---\n{cache}"


def assert_clean_stop(pair: daemons.Pair, statuses: dict[str, int], roles: tuple[str, ...]) -> None:
    """Every daemon exited 0 on SIGTERM and logged no crash."""
    assert statuses == dict.fromkeys(roles, 0), _logs(pair)
    for daemon in (pair.proxy, pair.cache):
        if daemon is not None:
            assert "Traceback" not in daemon.log() and "unexpected error" not in daemon.log(), _logs(pair)


def assert_continues(live: Workload, restored_pid: int, at_dump: workload.State | None) -> workload.State:
    """The restored task is the same process, running, counting on from its last
    pre-dump value (`at_dump`, read as soon as the dump returned), with its 256 MiB intact."""
    assert live.proc.returncode == -9 or live.proc.wait(5) == -9, "the dump did not kill the source task"
    assert at_dump is not None and at_dump.token == live.before.token
    assert at_dump.counter >= live.before.counter >= WARMUP_TICKS
    assert restored_pid == live.pid, "CRIU restored a different PID"
    process = psutil.Process(restored_pid)
    assert process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD, psutil.STATUS_STOPPED)
    first = workload.wait_state(live.state_path, lambda s: s.counter > at_dump.counter, 20)
    assert first.token == live.before.token, "a new process started from scratch, not the restored one"
    assert first.pid == live.pid
    later = workload.wait_state(live.state_path, lambda s: s.counter > first.counter + 5, 20)
    assert later.token == live.before.token
    fresh = workload.verify(restored_pid, live.state_path)
    expected = workload.expected_digest(MIB)
    assert live.before.digest == expected, "the workload filled its memory wrongly before the dump"
    assert fresh.verified_digest == expected, "the restored memory differs from the dumped memory"
    assert fresh.counter > live.before.counter
    return fresh


def test_migrate_live_workload_restore_first(criu: list[str], nodes: netns.TwoNodes, workdir: Path,
                                             live_workload: Workload) -> None:
    with daemons.proxy_and_cache(workdir, nodes.a, nodes.b) as pair:
        at_dump: list[workload.State | None] = []
        result = migrate.migrate(criu, live_workload.pid, pair.proxy_dir, pair.cache_dir, workdir,
                                 cache=pair.cache,
                                 on_dumped=lambda: at_dump.append(workload.State.read(live_workload.state_path)))
        live_workload.pids.add(result.pid)
        assert_continues(live_workload, result.pid, at_dump[0])
        complete = pair.cache.wait_log("complete from node-a", 10)
        assert "digests verified" in complete
        assert result.timings.transfer is not None, "the cache never logged the checkpoint complete" + _logs(pair)
        pair.cache.wait_log("restored from the cache", 10)
        released = pair.proxy.wait_log("releasing this node's copy", 10)
        pair.proxy.wait_released()
        pair.cache.wait_released()
        checkpoint = released.split("checkpoint ", 1)[1].split()[0]
        assert checkpoint in complete, "the proxy released a checkpoint the cache did not report" + _logs(pair)
        assert result.timings.dump <= result.timings.total
        statuses = pair.stop()
    assert_clean_stop(pair, statuses, ("proxy", "cache"))
    print(f"migration of {MIB} MiB: {result.timings.describe()}")


@pytest.mark.parametrize("cache_running", [False, True], ids=["cache-unreachable", "cache-running"])
def test_rollback_restore_from_proxy(criu: list[str], nodes: netns.TwoNodes, workdir: Path,
                                     live_workload: Workload, cache_running: bool) -> None:
    with daemons.proxy_and_cache(workdir, nodes.a, nodes.b, start_cache=cache_running) as pair:
        migrate.dump(criu, live_workload.pid, pair.proxy_dir, workdir)
        at_dump = workload.State.read(live_workload.state_path)
        assert "pages-1.img" in pair.proxy.held_images(), "the proxy holds no copy to roll back to"
        if cache_running:
            pair.cache.wait_log("complete from node-a", 10)
        else:
            failed = pair.proxy.wait_log("cannot reach the cache", 15)
            assert "stays on this node" in failed, _logs(pair)
        migrate.reap(live_workload.pid)
        proc, log, pidfile = migrate.start_restore(criu, pair.proxy_dir, workdir)
        restored = migrate.finish_restore(proc, log, pidfile)
        live_workload.pids.add(restored)
        assert_continues(live_workload, restored, at_dump)
        pair.proxy.wait_log("restored from the proxy", 10)
        pair.proxy.wait_released()
        if cache_running:
            # The cache must not keep a copy that would start the process a second time.
            pair.cache.wait_log("restored on its source", 10)
            pair.cache.wait_released()
        statuses = pair.stop()
    assert_clean_stop(pair, statuses, ("proxy", "cache") if cache_running else ("proxy",))


# ---- the operator's commands: imgmig migrate and imgmig restore -------------------------

COMMAND_TIMEOUT = 300


def imgmig_command(*args: str) -> list[str]:
    return [PYTHON, "-m", "imgmig", *args]


def imgmig_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def start_imgmig_restore(workdir: Path, criu: list[str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen(imgmig_command("restore", "--from", "node-a", "--config", str(workdir / "cache.yaml"),
                                           "--criu", shlex.join(criu), *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=imgmig_env(), cwd=REPO)


def run_migrate(live: Workload, pair: daemons.Pair, workdir: Path, criu: list[str],
                *extra: str) -> tuple[int, list[dict], workload.State | None]:
    """`imgmig migrate --json`, reading the workload's state as soon as the dump is done."""
    proc = subprocess.Popen(imgmig_command("migrate", str(live.pid), "--to", "node-b", "--json", "--config",
                                    str(workdir / "proxy.yaml"), "--criu", shlex.join(criu), *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=imgmig_env(), cwd=REPO)
    events, at_dump = [], None
    assert proc.stdout is not None
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1].get("phase") == "dump done":
            at_dump = workload.State.read(live.state_path)
    proc.wait(COMMAND_TIMEOUT)
    assert proc.stderr is not None
    assert proc.returncode in (0, 1), f"migrate exited {proc.returncode}: {proc.stderr.read()}" + _logs(pair)
    return proc.returncode, events, at_dump


def test_migrate_command_moves_a_live_workload(criu: list[str], nodes: netns.TwoNodes, workdir: Path,
                                               live_workload: Workload) -> None:
    job = workdir / "job"
    job.mkdir()
    (job / "input.txt").write_text("carried along\n")
    with daemons.proxy_and_cache(workdir, nodes.a, nodes.b) as pair:
        restore = start_imgmig_restore(workdir, criu, "--files-root", str(workdir / "b"))
        code, events, at_dump = run_migrate(live_workload, pair, workdir, criu, "--files", str(job))
        out, err = restore.communicate(timeout=COMMAND_TIMEOUT)
        assert code == 0 and restore.returncode == 0, (events[-1], out, err, _logs(pair))
        restored = int(out.strip().splitlines()[-1].rsplit(" ", 1)[1])
        live_workload.pids.add(restored)
        assert_continues(live_workload, restored, at_dump)
        phases = [e["phase"] for e in events if e["event"] == "phase"]
        assert phases == ["frozen", "dump done", "verified at the destination", "running on the destination"]
        progress = [e for e in events if e["event"] == "progress"]
        assert progress[-1]["verified"] == progress[-1]["captured"] > 256 << 20
        assert [e["forwarded"] for e in progress] == sorted(e["forwarded"] for e in progress)
        result = events[-1]
        assert result["exit"] == 0 and "running on node-b" in result["outcome"]
        (ready,) = [i for i, e in enumerate(events) if "before the freeze" in e.get("text", "")]
        assert re.fullmatch(r"memory ready before the freeze: \d+ MiB here, \d+ MiB on node-b \(\d+\.\d s\)",
                            events[ready]["text"]), events[ready]
        assert all(int(n) > 256 for n in re.findall(r"(\d+) MiB", events[ready]["text"])), "the process's size"
        assert ready < next(i for i, e in enumerate(events) if e["event"] == "phase"), "made ready before the freeze"
        assert (workdir / "b" / str(job).lstrip("/") / "input.txt").read_text() == "carried along\n"
        assert "unpacked 2 carried entries" in out
        pair.proxy.wait_released()
        pair.cache.wait_released()
        statuses = pair.stop()
    assert_clean_stop(pair, statuses, ("proxy", "cache"))
    print("imgmig migrate phases:", result["phases"])


def test_migrate_command_rolls_back_when_the_restore_fails(criu: list[str], nodes: netns.TwoNodes, workdir: Path,
                                                          live_workload: Workload) -> None:
    with daemons.proxy_and_cache(workdir, nodes.a, nodes.b) as pair:
        # CRIU refuses an unknown option: the restore on B fails on purpose
        restore = start_imgmig_restore(workdir, criu, "--", "--no-such-option")
        code, events, at_dump = run_migrate(live_workload, pair, workdir, criu, "--timeout", "5")
        _, err = restore.communicate(timeout=COMMAND_TIMEOUT)
        assert restore.returncode == 1 and "restore of checkpoint" in err, err
        result = events[-1]
        assert code == 1 and result["exit"] == 1 and "rolled back" in result["outcome"], (result, _logs(pair))
        rolled = int(result["outcome"].split("as pid ")[1].split(";")[0])
        live_workload.pids.add(rolled)
        assert_continues(live_workload, rolled, at_dump)
        pair.cache.wait_log("restored on its source", 10)
        pair.cache.wait_released()
        pair.proxy.wait_released()
        statuses = pair.stop()
    assert_clean_stop(pair, statuses, ("proxy", "cache"))


def test_the_readme_demo_migrates_a_live_process(criu: list[str]) -> None:
    """The README's first command (tools/demo.sh, which installs what is missing and then
    runs this): a real migration between two network namespaces through both daemons, with
    TLS, `imgmig migrate` and `imgmig restore`, ending with the memory checked on node B."""
    done = subprocess.run([daemons.PYTHON, "-m", "testbed.demo", "--mib", "64"], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT * 2, cwd=daemons.REPO_ROOT, env=imgmig_env())
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert "RESULT: the process continues on node B where it stopped, memory intact" in done.stdout
    assert "confirmed by its restore; this node's copy released" in done.stdout
