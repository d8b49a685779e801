"""Two "nodes" on one machine: network namespaces A and B joined by a veth pair.

Names carry a random token so parallel runs (tests, benchmark) never collide; the
addresses live inside the namespaces only, so every pair may reuse them. Traffic goes
only between these two addresses (and loopback).

Placement: by default ("shared") both nodes' processes share every CPU, as on one
machine. "per-node" gives node A CPU 0 and node B CPU 1 (sched affinity, inherited by
children; received packets steered by RPS), so that the source's dump and proxy never
compete with the destination's cache and restore, as on two machines (bench/README.md,
"Placement").
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

NETNS_DIR = Path("/run/netns")
PLACEMENTS = ("shared", "per-node")
PER_NODE_CPUS = ("0", "1")  # node A's, node B's


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no `ip`, no kernel support)."""


@dataclass(frozen=True)
class Node:
    netns: str
    veth: str
    address: str  # without prefix length
    prefix_len: int
    cpus: str | None = None  # this node's CPUs, comma-separated (taskset -c); None: any CPU

    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a command inside this node's network namespace (and on
        its CPUs, if it has its own)."""
        return [*self.cpu_prefix(), *ns_exec_prefix(self.netns)]

    def cpu_prefix(self) -> list[str]:
        """argv prefix that runs a command on this node's CPUs only (empty if it shares
        all): for CRIU, which runs outside the network namespace."""
        return ["taskset", "-c", self.cpus] if self.cpus else []

    def pin(self, pid: int) -> None:
        """Move a running process, every thread of it, onto this node's CPUs (nothing if
        it shares all); for a process started without the prefix, such as the workload."""
        if not self.cpus:
            return
        cpus = {int(cpu) for cpu in self.cpus.split(",")}
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that just exited
                os.sched_setaffinity(int(tid), cpus)


@dataclass(frozen=True)
class TwoNodes:
    a: Node
    b: Node


def ns_exec_prefix(netns: str) -> list[str]:
    return ["ip", "netns", "exec", netns]


def run_in(netns: str, argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess:
    """Run a command inside a network namespace (`ip netns exec`), checked by default."""
    kwargs.setdefault("check", True)
    return subprocess.run([*ns_exec_prefix(netns), *argv], **kwargs)  # type: ignore[call-overload]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


@contextlib.contextmanager
def two_nodes(prefix: str = "imgmig", address_a: str = "10.77.0.1/24",
              address_b: str = "10.77.0.2/24", shape: str | None = None,
              placement: str = "shared") -> Iterator[TwoNodes]:
    """Create netns A and B joined by veth (addresses as given, lo up in both), yield
    them, and delete both on exit, also after a failure. `shape`, e.g. "delay 5ms rate
    1gbit", adds a netem qdisc on A's side. `placement` is one of PLACEMENTS."""
    cpus_a, cpus_b = placement_cpus(placement)
    token = secrets.token_hex(3)
    name_a, name_b = f"{prefix}-{token}-a", f"{prefix}-{token}-b"
    veth_a, veth_b = f"im{token}a", f"im{token}b"  # interface names: at most 15 bytes
    created: list[str] = []
    try:
        for name in (name_a, name_b):
            _ip("netns", "add", name)
            created.append(name)
        _ip("link", "add", veth_a, "netns", name_a, "type", "veth", "peer", "name", veth_b, "netns", name_b)
        nodes = TwoNodes(_configure(name_a, veth_a, address_a, cpus_a), _configure(name_b, veth_b, address_b, cpus_b))
        if shape:
            _ip("-n", name_a, "qdisc", "add", "dev", veth_a, "root", "netem", *shape.split())
        yield nodes
    finally:
        for name in created:  # deleting a netns destroys its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def placement_cpus(placement: str) -> tuple[str | None, str | None]:
    """Node A's and node B's CPU lists for a placement; ValueError if this machine cannot
    give each node a CPU of its own."""
    if placement == "shared":
        return None, None
    if placement != "per-node":
        raise ValueError(f"placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
    usable = os.sched_getaffinity(0)
    if not {int(cpu) for cpu in PER_NODE_CPUS} <= usable:
        raise ValueError(f"placement per-node needs CPUs {' and '.join(PER_NODE_CPUS)}; "
                         f"this process may use {sorted(usable)}")
    return PER_NODE_CPUS


def _configure(netns: str, veth: str, cidr: str, cpus: str | None) -> Node:
    address, _, length = cidr.partition("/")
    _ip("-n", netns, "addr", "add", cidr, "dev", veth)
    _ip("-n", netns, "link", "set", veth, "up")
    _ip("-n", netns, "link", "set", "lo", "up")
    if cpus:
        _steer_receive(netns, veth, cpus)
    return Node(netns, veth, address, int(length or 32), cpus)


def _steer_receive(netns: str, veth: str, cpus: str) -> None:
    """Process packets arriving on this node's veth on its own CPUs (RPS). A veth hands
    a packet to its peer in the sender's context, so without this the receiving node's
    protocol work (TCP receive, ACKs) would run on the sending node's CPU; on two
    machines the receiver's NIC interrupt does it there."""
    mask = sum(1 << int(cpu) for cpu in cpus.split(","))
    run_in(netns, ["sh", "-c", f"echo {mask:x} > /sys/class/net/{veth}/queues/rx-0/rps_cpus"],
           capture_output=True)


def available() -> tuple[bool, str]:
    """Whether two_nodes() can work here; (ok, reason if not)."""
    try:
        with two_nodes("imgmig-probe"):
            pass
    except (NetnsUnavailable, OSError) as exc:
        return False, str(exc)
    return True, ""
