"""Real-CRIU fault tests (issue 8): a 256 MiB live migration between two netns whose link
is cut for 5 s while the checkpoint is on its way.

`tbf` on node A's veth stretches the transfer to several seconds, so the cut lands when
the cache holds a good part of the checkpoint. The cut is what a real outage does to TCP:
the veth goes down (no packet crosses, not even a reset), the proxy's connection is aborted
(`ss -K`), and the cache's end is left half-open, as after a crash or a lost NAT entry. Five
seconds later the link comes back and the proxy resumes from the cache's acknowledged
offsets while `criu restore` keeps waiting on the cache.

Each test prints one `FAULT TABLE` line (pytest -s shows it): faults injected and survived,
bytes resent, time to recover (from the fault's end to the transfer continuing).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from test_real_criu import (  # noqa: F401 - fixtures
    MIB,
    Workload,
    _logs,
    assert_clean_stop,
    assert_continues,
    criu,
    live_workload,
    nodes,
    workdir,
)

from imgmig.commands.common import ControlClient
from testbed import daemons, migrate, netns, workload

pytestmark = pytest.mark.realcriu

RATE = "400mbit"  # 256 MiB take about 5.5 s: long enough to cut in the middle
CUT_AT = 0.4      # of the checkpoint's bytes held by the cache
CUT_FOR = 5.0     # seconds without a link


def shape(node: netns.Node, rate: str = RATE) -> None:
    """Rate-limit the node's side of the veth (this kernel has no netem; tbf works)."""
    subprocess.run(["tc", "-n", node.netns, "qdisc", "add", "dev", node.veth, "root", "tbf", "rate", rate,
                    "burst", "256kb", "latency", "50ms"], check=True)


def link(node: netns.Node, up: bool) -> None:
    subprocess.run(["ip", "-n", node.netns, "link", "set", node.veth, "up" if up else "down"], check=True)


def abort_connections(node: netns.Node, peer: netns.Node, port: int = daemons.DEFAULT_PORT) -> int:
    """`ss -K` the node's established TCP connections to peer:port; how many there were."""
    out = netns.run_in(node.netns, ["ss", "-K", "-t", "-H", "dst", peer.address, "dport", "=", str(port)],
                       capture_output=True, text=True).stdout
    return out.count("ESTAB")


def cache_holds(cache_dir: Path) -> int:
    """Bytes of the checkpoint under way at the cache, from its control socket (`imgmig status`)."""
    with ControlClient(cache_dir / "control.sock", "cache") as client:
        reply = client.request("status")
    return sum(checkpoint["bytes"] for checkpoint in reply["checkpoints"])


def wait_for(predicate, what: str, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def test_link_cut_for_five_seconds_mid_transfer(criu: list[str], nodes: netns.TwoNodes,  # noqa: F811
                                                workdir: Path, live_workload: Workload) -> None:  # noqa: F811
    shape(nodes.a)
    with daemons.proxy_and_cache(workdir, nodes.a, nodes.b) as pair:
        expected = (MIB << 20) * CUT_AT
        restore, restore_log, pidfile = migrate.start_restore(criu, pair.cache_dir, workdir)
        started = time.monotonic()
        migrate.dump(criu, live_workload.pid, pair.proxy_dir, workdir)
        at_dump = workload.State.read(live_workload.state_path)
        wait_for(lambda: cache_holds(pair.cache_dir) >= expected, f"the cache to hold {CUT_AT:.0%}", 60)
        held_at_cut = cache_holds(pair.cache_dir)
        link(nodes.a, up=False)
        cut_at = time.monotonic()
        assert abort_connections(nodes.a, nodes.b) == 1, "no established link to cut" + _logs(pair)
        time.sleep(max(0.0, CUT_FOR - (time.monotonic() - cut_at)))
        assert restore.poll() is None, "the restore gave up while the link was down" + _logs(pair)
        link(nodes.a, up=True)
        up_at = time.monotonic()
        back = pair.proxy.wait_log("back after", 60)
        recovered = time.monotonic() - up_at
        restored = migrate.finish_restore(restore, restore_log, pidfile)
        live_workload.pids.add(restored)
        total = time.monotonic() - started
        assert_continues(live_workload, restored, at_dump)
        resent, resent_acked = map(int, re.search(r"resent so far: (\d+) bytes, of them acknowledged before: (\d+)",
                                                  back).groups())
        assert resent_acked == 0, "bytes the cache acknowledged were sent again" + _logs(pair)
        # the proxy retries at least every 2 s; the cache's half-open end must not hold it off
        assert recovered < 4.0, f"the transfer went on {recovered:.1f} s after the link came back" + _logs(pair)
        assert "resuming after" in back, back
        assert len(re.findall("lost while it carried", pair.proxy.log())) == 1, _logs(pair)
        pair.cache.wait_log("restored from the cache", 10)
        pair.proxy.wait_released()
        pair.cache.wait_released()
        statuses = pair.stop()
    assert_clean_stop(pair, statuses, ("proxy", "cache"))
    print(f"\nFAULT TABLE real link cut: {MIB} MiB workload, real CRIU, 1 cut of {CUT_FOR:.0f} s at "
          f"{held_at_cut / (1 << 20):.0f} MiB held by the cache, 1/1 survived (restore waited, process runs, "
          f"digest intact); bytes resent: {resent}, past the acknowledged offset: {resent_acked}; time to "
          f"recover (link up to transfer resumed): {recovered:.2f} s; restore to running {total:.1f} s in all")
