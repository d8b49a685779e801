"""What lazy-migration tests and the lazy benchmark share: a workload in node A's network
namespace and in its own PID namespace, and commands run in one netns only.

On one machine the frozen source of a lazy migration stays until its last page was
served, so a restore in the same PID namespace would find the PID taken: the workload is
the init of its own PID namespace (`unshare -p -f`, then `setsid`: CRIU wants the session
leader inside). It runs in netns A because CRIU dumps where the process's network is, and
its page server then listens on A's loopback, where the proxy reaches it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imgmig.commands.common import ControlClient
from testbed import migrate, netns, workload

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPE_MAX = 4 << 20  # CRIU's page server tees its pages through pipes of this size
PIPE_MAX_PATH = Path("/proc/sys/fs/pipe-max-size")


def net_of(node: netns.Node) -> list[str]:
    """Run in the node's network namespace only: `ip netns exec` also makes a mount
    namespace, which CRIU would then have to dump."""
    return ["nsenter", f"--net={netns.NETNS_DIR / node.netns}"]


@contextlib.contextmanager
def pipe_max() -> Iterator[None]:
    """CRIU's page server needs fs.pipe-max-size >= 4 MiB (root here lacks CAP_SYS_RESOURCE)."""
    before = int(PIPE_MAX_PATH.read_text())
    if before < PIPE_MAX:
        PIPE_MAX_PATH.write_text(str(PIPE_MAX))
    try:
        yield
    finally:
        if before < PIPE_MAX:
            PIPE_MAX_PATH.write_text(str(before))


@dataclass
class NsWorkload:
    launcher: subprocess.Popen
    pid: int            # the workload, seen from here (PID 1 in its own namespace)
    state_path: Path
    before: workload.State


@contextlib.contextmanager
def ns_workload(node: netns.Node, mib: int, state_path: Path, warmup: int = 20,
                options: Sequence[str] = ()) -> Iterator[NsWorkload]:
    """`options`: more of testbed.workload's (the benchmark's --touch, --pattern-cache)."""
    state_path.unlink(missing_ok=True)  # a state left by an earlier workload would pass for this one's
    launcher = subprocess.Popen([*net_of(node), "unshare", "-p", "-f", "setsid", sys.executable, "-m",
                                 "testbed.workload", "--mib", str(mib), "--state", str(state_path), *options],
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    threading.Thread(target=launcher.wait, daemon=True).start()
    pid = 0
    try:
        before = workload.wait_state(state_path, lambda s: s.counter >= warmup, 60 + mib / 32)
        pid = int(Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()[0])
        yield NsWorkload(launcher, pid, state_path, before)
    finally:
        if pid:
            migrate.kill_and_reap(pid)
        with contextlib.suppress(ProcessLookupError):
            launcher.kill()


def claim(client: ControlClient, origin: str, timeout: float = 30.0) -> str:
    """Claim the oldest checkpoint from `origin` on a control connection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        claimed = client.request("claim", **{"from": origin})["claimed"]
        if claimed is not None:
            return str(claimed)
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint from {origin} on the cache within {timeout:.0f} s")
