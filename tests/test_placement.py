"""Placement of the two test nodes' processes on CPUs (testbed.netns): "shared" changes
nothing; "per-node" runs everything of node A on CPU 0 and of node B on CPU 1, including
the daemons, a process pinned after its start (the benchmark's workload) and the
processing of each node's received packets (RPS)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import daemons, netns


def allowed_cpus(pid: int) -> dict[int, str]:
    """Cpus_allowed_list of every thread of `pid`, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                out[int(task.name)] = line.split()[1]
    return out


def test_shared_placement_adds_no_prefix() -> None:
    assert netns.placement_cpus("shared") == (None, None)
    node = netns.Node("ns-x", "veth-x", "10.77.0.1", 24)
    assert node.exec_prefix() == ["ip", "netns", "exec", "ns-x"]
    assert node.cpu_prefix() == []
    before = os.sched_getaffinity(0)
    node.pin(os.getpid())  # a no-op: this process keeps every CPU it had
    assert os.sched_getaffinity(0) == before


def test_unknown_placement_is_refused() -> None:
    with pytest.raises(ValueError, match="use one of shared, per-node"):
        netns.placement_cpus("per-socket")


@pytest.fixture
def per_node() -> Iterator[netns.TwoNodes]:
    if os.geteuid() != 0:
        pytest.skip("PLACEMENT TEST SKIPPED: NOT ROOT (network namespaces need root)")
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("PLACEMENT TEST SKIPPED: CPUs 0 and 1 are not both usable here")
    ok, reason = netns.available()
    if not ok:
        pytest.skip(f"PLACEMENT TEST SKIPPED: NO NETWORK NAMESPACES HERE: {reason}")
    with netns.two_nodes("imgmig-place", placement="per-node") as nodes:
        yield nodes


def test_per_node_prefixes_run_commands_on_the_nodes_cpu(per_node: netns.TwoNodes) -> None:
    for node, cpu in ((per_node.a, "0"), (per_node.b, "1")):
        for prefix in (node.exec_prefix(), node.cpu_prefix()):
            done = subprocess.run([*prefix, "grep", "Cpus_allowed_list", "/proc/self/status"],
                                  capture_output=True, text=True, check=True)
            assert done.stdout.split() == ["Cpus_allowed_list:", cpu], (prefix, done.stdout)


def test_per_node_steers_each_nodes_received_packets_to_its_cpu(per_node: netns.TwoNodes) -> None:
    for node, mask in ((per_node.a, "1"), (per_node.b, "2")):
        done = netns.run_in(node.netns, ["cat", f"/sys/class/net/{node.veth}/queues/rx-0/rps_cpus"],
                            capture_output=True, text=True)
        assert done.stdout.strip() == mask, (node, done.stdout)


def test_per_node_daemons_run_on_their_nodes_cpu(per_node: netns.TwoNodes, tmp_path: Path) -> None:
    with daemons.proxy_and_cache(tmp_path, per_node.a, per_node.b, tls=False) as pair:
        assert pair.cache is not None and pair.cache.proc is not None and pair.proxy.proc is not None
        proxy, cache = allowed_cpus(pair.proxy.proc.pid), allowed_cpus(pair.cache.proc.pid)
    assert set(proxy.values()) == {"0"}, proxy
    assert set(cache.values()) == {"1"}, cache


def test_pin_moves_every_thread_of_a_running_process(per_node: netns.TwoNodes) -> None:
    code = "import threading, time; threading.Thread(target=time.sleep, args=(30,)).start(); print(flush=True); " \
           "time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()  # the second thread exists
        time.sleep(0.05)
        assert len(allowed_cpus(proc.pid)) == 2
        per_node.b.pin(proc.pid)
        assert set(allowed_cpus(proc.pid).values()) == {"1"}
    finally:
        proc.kill()
        proc.wait()
