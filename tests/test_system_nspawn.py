"""imgmig as operators run it: the .deb installed into booted systemd containers.

Two trixie containers (systemd-nspawn --ephemeral on a cached debootstrap tree) sit
on two network namespaces joined by a veth pair. Node A runs imgmig-proxy.socket,
node B imgmig-cache.socket, both from `apt install ./imgmig_*.deb`. CRIU EXECUTES ON
THE HOST (it fails inside nspawn on this kernel) and reaches each container's sockets
through /proc/<container's PID 1>/root/run/imgmig/... ; in the auto-mode test B's own
`imgmig restore` runs CRIU through testbed/criu_relay.py, which executes the host's
CRIU for it. A bookworm container proves the package installs and its units start on
systemd 252.

Needs root, network (once, for debootstrap), systemd-container, debootstrap and the
package build tools; anything missing skips the whole module with the reason in capitals.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imgmig.commands.common import ControlClient
from imgmig.commands.pki import init_ca, issue_node
from testbed import containers, criu_relay, migrate, netns, workload
from testbed import criu as testbed_criu

pytestmark = pytest.mark.system

MIB = 64
PORT = 9996
COMPLETE_ID = "8d3f1a7c6b2e4f09a5c4d3b2e1f0a9c8"
RESTORED_ID = "5b0e3c9a2f4d4b8e9d1c7a6f3e2b1d40"
UNITS = ["imgmig-cache.socket", "imgmig-cache.service", "imgmig-proxy.socket", "imgmig-proxy.service"]
RESTORE_UNITS = ["imgmig-restore.socket", "imgmig-restore@.service"]
TOOLS = ["systemd-nspawn", "debootstrap", "dpkg-buildpackage", "nsenter", "ip"]
MAX_EXPOSURE = 2.0


def _skip(reason: str) -> None:
    pytest.skip(f"SYSTEM TESTS SKIPPED: {reason}")


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="imgmig-sys-"))
    yield path
    if not os.environ.get("IMGMIG_KEEP_WORKDIR"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def deb(workdir: Path) -> Path:
    if os.geteuid() != 0:
        _skip("NOT ROOT (containers, network namespaces and CRIU need root)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        _skip(f"MISSING TOOLS {', '.join(missing)} (run tools/install-deps.sh)")
    started = time.monotonic()
    package, changes = containers.build_deb(workdir / "build")
    _lintian_clean(package, changes)
    print(f"built {package.name} in {time.monotonic() - started:.1f} s")
    return package


@pytest.fixture(scope="module")
def criu(deb: Path) -> list[str]:
    try:
        prefix = testbed_criu.find_criu()
    except testbed_criu.CriuUnavailable as exc:
        _skip(f"NO WORKING CRIU 4.x: {exc}")
    migrate.become_subreaper()
    return prefix


def _tree(suite: str) -> Path:
    started = time.monotonic()
    root = containers.tree(suite)
    print(f"{suite} tree ready in {time.monotonic() - started:.1f} s")
    return root


def _install(node: containers.Container, deb: Path) -> None:
    node.copy_in(deb, f"/root/{deb.name}")
    # apt resolves the dependencies from what the tree already holds: no network inside. The
    # recommended criu is left out: CRIU does not work inside nspawn, the host's runs instead.
    node.run("apt-get", "install", "-y", "--no-install-recommends", f"/root/{deb.name}",
             timeout=300.0)


@pytest.fixture(scope="module")
def pki(workdir: Path) -> Path:
    """The cluster CA, made on the host by `imgmig pki`'s code; certificates per test."""
    directory = workdir / "pki"
    init_ca(directory)
    return directory


def _install_tls(node: containers.Container, pki: Path, name: str, address: str | None = None) -> None:
    """What an operator does: `imgmig pki issue NAME`, then copy the files to the node's
    /etc/imgmig/tls/ (the key root-only: the unit passes it to the service as a credential)."""
    issue_node(pki, name, ips=[address] if address else [])
    for source, dest, mode in ((pki / "ca.crt", "ca.crt", 0o644), (pki / f"{name}.crt", "node.crt", 0o644),
                               (pki / f"{name}.key", "node.key", 0o600)):
        node.copy_in(source, f"/etc/imgmig/tls/{dest}")
        os.chmod(node.root / "etc/imgmig/tls" / dest, mode)


def _journal(node: containers.Container, *match: str) -> list[dict[str, str]]:
    out = node.run("journalctl", "--no-pager", "-o", "json", *match, check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _wait(predicate, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def _lintian_clean(package: Path, changes: Path) -> None:
    """The package must pass lintian with no error, warning, info or pedantic tag left over."""
    done = subprocess.run(["lintian", "-EIL", "+pedantic", str(changes), str(package)],
                          capture_output=True, text=True, env={**os.environ, "LC_ALL": "C.UTF-8"})
    tags = [line for line in done.stdout.splitlines() if line[:2] in ("E:", "W:", "I:", "P:")]
    print(f"lintian: exit {done.returncode}, tags {tags}")
    assert done.returncode == 0 and not tags, done.stdout + done.stderr


def _ready(node: containers.Container, unit: str) -> dict[str, str]:
    """Type=notify: ActiveState=active only after READY=1; StatusText is the last STATUS=."""
    return node.show(unit, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")


def _check_units(node: containers.Container) -> None:
    paths = [f"/lib/systemd/system/{unit}" for unit in [*UNITS, *RESTORE_UNITS]]
    verify = node.run("systemd-analyze", "verify", "--man=no", *paths, check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    for service in ("imgmig-cache.service", "imgmig-proxy.service"):
        out = node.run("systemd-analyze", "security", "--offline=true", "--no-pager",
                       f"/lib/systemd/system/{service}", check=False).stdout
        line = next(line for line in out.splitlines() if "Overall exposure level" in line)
        exposure = float(line.split(":")[1].split()[0])
        print(f"{node.name}: {line.strip()}")
        assert exposure <= MAX_EXPOSURE, line


def _not_enabled_or_started(node: containers.Container) -> None:
    for unit in UNITS:
        enabled = node.systemctl("is-enabled", unit, check=False).stdout.strip()
        active = node.systemctl("is-active", unit, check=False).stdout.strip()
        assert enabled in ("disabled", "static", "indirect"), f"{unit} is {enabled} after install"
        assert active == "inactive", f"{unit} is {active} after install"


@pytest.fixture(scope="module")
def nodes(deb: Path, criu: list[str], workdir: Path) -> Iterator[tuple[containers.Container, containers.Container,
                                                                  netns.TwoNodes]]:
    ok, reason = netns.available()
    if not ok:
        _skip(f"NO NETWORK NAMESPACES: {reason}")
    root = _tree("trixie")
    with netns.two_nodes("imgmig-sys") as pair, \
            containers.booted(root, "imgmig-a", netns=pair.a.netns, workdir=workdir) as node_a, \
            containers.booted(root, "imgmig-b", netns=pair.b.netns, workdir=workdir) as node_b:
        for node in (node_a, node_b):
            _install(node, deb)
        yield node_a, node_b, pair


def test_install_leaves_units_off_and_they_verify(nodes, pki: Path) -> None:
    node_a, node_b, _ = nodes
    _not_enabled_or_started(node_a)
    node_a.run("test", "-f", "/etc/imgmig/imgmig.yaml")
    assert "/etc/imgmig/imgmig.yaml" in node_a.run("dpkg-query", "--control-show", "imgmig", "conffiles").stdout
    # TLS is on as shipped: without keys check-config names the missing file and what to run.
    missing = node_a.run("imgmig", "check-config", check=False)
    assert missing.returncode == 2 and "/etc/imgmig/tls/ca.crt: missing" in missing.stderr, missing
    assert "imgmig pki init" in missing.stderr
    hostname = node_a.run("python3", "-c", "import socket; print(socket.gethostname())").stdout.strip()
    _install_tls(node_a, pki, hostname)  # the shipped config's node is the hostname
    assert f"tls: on; node {hostname}" in node_a.run("imgmig", "check-config").stdout
    _check_units(node_b)


def _start_units_with_tls(nodes, pki: Path) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """Node A's proxy names node B's cache, which allows node-a by name; both socket units
    started. Returns the proxy's and the cache's images dirs as the host reaches them."""
    node_a, node_b, pair = nodes
    _install_tls(node_a, pki, "node-a", pair.a.address)
    _install_tls(node_b, pki, "node-b", pair.b.address)
    node_a.write("/etc/imgmig/imgmig.yaml", f"node: node-a\nproxy:\n  peer: node-b@{pair.b.address}:{PORT}\n")
    node_b.write("/etc/imgmig/imgmig.yaml", f"node: node-b\ncache:\n  listen: 0.0.0.0:{PORT}\n"
                                             f"  allow: [node-a]\n")
    node_b.systemctl("start", "imgmig-cache.socket")
    node_a.systemctl("start", "imgmig-proxy.socket")
    proxy_dir = node_a.root / "run/imgmig/proxy"
    cache_dir = node_b.root / "run/imgmig/cache"
    assert (proxy_dir / "streamer-capture.sock").is_socket() and (cache_dir / "streamer-serve.sock").is_socket()
    return proxy_dir, cache_dir


def test_migration_through_the_units_survives_a_cache_restart(nodes, criu: list[str], workdir: Path,
                                                              pki: Path) -> None:
    """With mutual TLS: keys made by `imgmig pki`, each node's key passed as a credential, the
    proxy naming the cache's node and the cache allowing node-a by name."""
    node_a, node_b, _ = nodes
    proxy_dir, cache_dir = _start_units_with_tls(nodes, pki)

    state = workdir / "workload.json"
    task = workload.start(MIB, state, log_path=workdir / "workload.log")
    reaper = threading.Thread(target=task.wait, daemon=True)
    reaper.start()
    before = workload.wait_state(state, lambda s: s.counter > 20)

    # Dump: the first connection socket-activates imgmig-proxy, which streams to B (activating the cache).
    migrate.dump(criu, task.pid, proxy_dir, workdir)
    reaper.join(10)
    assert task.returncode is not None, "the dumped task is still there"
    completes = lambda: _journal(node_b, "-u", "imgmig-cache", f"MESSAGE_ID={COMPLETE_ID}")  # noqa: E731
    _wait(lambda: bool(completes()), "the cache to log the checkpoint complete", 60)
    checkpoint = completes()[0]["IMGMIG_CHECKPOINT"]

    proxy = _ready(node_a, "imgmig-proxy.service")
    assert proxy["ActiveState"] == "active" and proxy["StatusText"], proxy
    print(f"proxy STATUS: {proxy['StatusText']}")
    # STATUS= is refreshed every 2 s.
    _wait(lambda: _ready(node_b, "imgmig-cache.service")["StatusText"].startswith("1 checkpoint,"),
          "the cache's STATUS to show the checkpoint", 10)
    cache = _ready(node_b, "imgmig-cache.service")
    assert cache["ActiveState"] == "active", cache
    print(f"cache STATUS: {cache['StatusText']}")

    # Restart the cache between dump and restore: the checkpoint must come back from the fd store.
    old_pid = cache["MainPID"]
    node_b.systemctl("restart", "imgmig-cache.service")
    cache = _ready(node_b, "imgmig-cache.service")
    assert cache["MainPID"] != old_pid and cache["ActiveState"] == "active", cache
    assert cache["StatusText"].startswith("1 checkpoint,"), cache
    # And the proxy: its copy (the rollback copy) comes back too, and links back to the cache.
    old_pid = proxy["MainPID"]
    node_a.systemctl("restart", "imgmig-proxy.service")
    proxy = _ready(node_a, "imgmig-proxy.service")
    assert proxy["MainPID"] != old_pid and proxy["StatusText"].startswith("1 checkpoint,"), proxy

    proc, log, pidfile = migrate.start_restore(criu, cache_dir, workdir)
    restored = migrate.finish_restore(proc, log, pidfile)
    try:
        after = workload.verify(restored, state)
        assert after.token == before.token and after.counter > before.counter
        assert after.verified_digest == before.digest == workload.expected_digest(MIB)
    finally:
        migrate.kill_and_reap(restored)

    story = _journal(node_b, "-u", "imgmig-cache", f"IMGMIG_CHECKPOINT={checkpoint}")
    messages = [entry["MESSAGE"] for entry in story]
    ids = {entry.get("MESSAGE_ID") for entry in story}
    assert COMPLETE_ID in ids and RESTORED_ID in ids, messages
    assert any("taken back from systemd's fd store" in m for m in messages), messages
    complete = next(entry for entry in story if entry.get("MESSAGE_ID") == COMPLETE_ID)
    assert int(complete["IMGMIG_BYTES"]) > MIB << 20 and "node-a" in complete["IMGMIG_PEER"], complete
    assert all(entry.get("SYSLOG_IDENTIFIER") == "imgmig-cache" for entry in story)
    _wait(lambda: _ready(node_b, "imgmig-cache.service")["StatusText"].startswith("0 checkpoints"),
          "the cache to release the restored checkpoint", 10)
    proxy_story = [entry["MESSAGE"] for entry in _journal(node_a, "-u", "imgmig-proxy",
                                                          f"IMGMIG_CHECKPOINT={checkpoint}")]
    assert any("taken back from systemd's fd store" in m for m in proxy_story), proxy_story
    assert any("kept over a restart: linked back" in m for m in proxy_story), proxy_story
    for node, unit in ((node_a, "imgmig-proxy"), (node_b, "imgmig-cache")):
        started = [entry["MESSAGE"] for entry in _journal(node, "-u", unit) if "TLS on" in entry.get("MESSAGE", "")]
        assert started and "/run/credentials/" not in started[-1], started
        assert not _journal(node, "-u", unit, "-p", "err"), f"{unit} logged errors"


FAULT_MIB = 256
FAULT_RATE = "400mbit"  # 256 MiB take about 5.5 s over the veth: time to restart the cache midway


def _cache_holds(cache_dir: Path) -> int:
    with ControlClient(cache_dir / "control.sock", "cache") as client:
        return sum(checkpoint["bytes"] for checkpoint in client.request("status")["checkpoints"])


def test_cache_restarted_mid_transfer_keeps_the_partial_checkpoint(nodes, criu: list[str], workdir: Path,
                                                                   pki: Path) -> None:
    """Issue 8: real CRIU, a 256 MiB workload, `systemctl restart imgmig-cache.service` while
    the checkpoint is on its way (tbf on the veth stretches the transfer). The partial images
    survive in systemd's fd store, the proxy resumes from the cache's offsets, and a restore
    started after the restart brings the process back with its memory intact."""
    node_a, node_b, pair = nodes
    proxy_dir, cache_dir = _start_units_with_tls(nodes, pki)
    state = workdir / "fault-workload.json"
    task = workload.start(FAULT_MIB, state, log_path=workdir / "fault-workload.log")
    reaper = threading.Thread(target=task.wait, daemon=True)
    reaper.start()
    before = workload.wait_state(state, lambda s: s.counter > 20)
    subprocess.run(["tc", "-n", pair.a.netns, "qdisc", "add", "dev", pair.a.veth, "root", "tbf", "rate", FAULT_RATE,
                    "burst", "256kb", "latency", "50ms"], check=True)
    restored = None
    try:
        migrate.dump(criu, task.pid, proxy_dir, workdir, name="fault-dump")
        reaper.join(10)
        at_dump = workload.State.read(state)
        _wait(lambda: _cache_holds(cache_dir) >= (FAULT_MIB << 20) * 0.4, "the cache to hold 40%", 60)
        held = _cache_holds(cache_dir)
        old_pid = _ready(node_b, "imgmig-cache.service")["MainPID"]
        restart_began = time.time()
        node_b.systemctl("restart", "imgmig-cache.service")  # returns once the new daemon said READY
        restart_ended = time.time()
        cache = _ready(node_b, "imgmig-cache.service")
        assert cache["MainPID"] != old_pid and cache["ActiveState"] == "active", cache
        backs = lambda: [e for e in _journal(node_a, "-u", "imgmig-proxy") if "back after" in e["MESSAGE"]  # noqa: E731
                         and int(e["__REALTIME_TIMESTAMP"]) / 1e6 >= restart_began]
        _wait(lambda: bool(backs()), "the proxy to resume", 60)
        back = backs()[-1]
        recovered = int(back["__REALTIME_TIMESTAMP"]) / 1e6 - restart_ended
        proc, log, pidfile = migrate.start_restore(criu, cache_dir, workdir, name="fault-restore")
        restored = migrate.finish_restore(proc, log, pidfile)
        after = workload.verify(restored, state)
    finally:
        subprocess.run(["tc", "-n", pair.a.netns, "qdisc", "del", "dev", pair.a.veth, "root"], check=False)
        if restored is not None:
            migrate.kill_and_reap(restored)
    assert at_dump is not None and after.token == before.token and after.counter > at_dump.counter
    assert after.verified_digest == before.digest == workload.expected_digest(FAULT_MIB)
    assert "resuming after" in back["MESSAGE"], back["MESSAGE"]  # not "the cache had none of it"
    resent, resent_acked = map(int, re.search(r"resent so far: (\d+) bytes, of them acknowledged before: (\d+)",
                                              back["MESSAGE"]).groups())
    assert resent_acked == 0, back["MESSAGE"]
    cache_story = [e["MESSAGE"] for e in _journal(node_b, "-u", "imgmig-cache", f"_PID={cache['MainPID']}")]
    assert any("taken back from systemd's fd store" in m and "still arriving" in m for m in cache_story), cache_story
    for node, unit in ((node_a, "imgmig-proxy"), (node_b, "imgmig-cache")):
        assert not _journal(node, "-u", unit, "-p", "err"), f"{unit} logged errors"
    print(f"\nFAULT TABLE real cache restart: {FAULT_MIB} MiB workload, real CRIU and systemd, 1 restart at "
          f"{held / (1 << 20):.0f} MiB held by the cache, 1/1 survived (process runs, digest intact); bytes "
          f"resent: {resent}, past the acknowledged offset: {resent_acked}; restart took "
          f"{restart_ended - restart_began:.2f} s, transfer resumed {recovered:.2f} s after it")


def test_mismatched_socket_unit_is_refused_in_one_line(nodes) -> None:
    _, node_b, _ = nodes
    node_b.write("/etc/systemd/system/imgmig-cache.socket.d/port.conf",
                 "[Socket]\nListenStream=\nListenStream=9997\nListenStream=/run/imgmig/cache/streamer-serve.sock\n")
    try:
        node_b.systemctl("daemon-reload")
        node_b.systemctl("restart", "imgmig-cache.socket")
        node_b.systemctl("start", "imgmig-cache.service", check=False)
        _wait(lambda: _ready(node_b, "imgmig-cache.service")["ActiveState"] == "failed", "the refusal", 20)
        errors = _journal(node_b, "SYSLOG_IDENTIFIER=imgmig-cache", "-p", "err")
        assert errors, "the daemon logged no error"
        assert "9996" in errors[-1]["MESSAGE"] and "9997" in errors[-1]["MESSAGE"], errors[-1]
        assert "\n" not in errors[-1]["MESSAGE"]
        print(f"refusal: {errors[-1]['MESSAGE']}")
    finally:
        node_b.run("rm", "-r", "/etc/systemd/system/imgmig-cache.socket.d")
        node_b.systemctl("daemon-reload")
        node_b.systemctl("reset-failed", "imgmig-cache.service", check=False)
        node_b.systemctl("restart", "imgmig-cache.socket")


def test_auto_restore_through_the_units_with_one_command(nodes, criu: list[str], workdir: Path, pki: Path) -> None:
    """cache.restore: auto on B, with mutual TLS, REAL CRIU on both sides, and a real
    workload: `imgmig migrate PID --to node-b` (run on the host as A's operator, against
    A's proxy) is the only command, and the process then runs with its memory intact.

    WHERE CRIU EXECUTES: ON THE HOST, BOTH SIDES. CRIU cannot run inside nspawn on this
    kernel ("Can't lookup mount ... /dev/null" on a dump, /proc/sys read-only), so:
    - the dump is `imgmig migrate` on the host with the host's CRIU, into A's proxy
      socket through A's root (/proc/<A's PID 1>/root/run/imgmig/proxy);
    - on B, everything up to CRIU is B's own: the sandboxed cache rings the doorbell,
      the root imgmig-restore@.service runs `imgmig restore`, which claims the checkpoint
      and runs B's `criu:` command. That command is testbed/criu_relay.py: it passes its
      argv, cwd and stdio (SCM_RIGHTS) to a relay this test runs on the host, which runs
      the host's CRIU with B's paths under B's root and answers CRIU's exit status.
    The restored process therefore lives in the HOST's PID namespace, under the PID it was
    dumped with; that host PID is what CRIU's pidfile holds, what `imgmig restore` reports
    and what the cache records, and this test checks it is the workload's own PID."""
    node_a, node_b, pair = nodes
    relay_file = "/usr/local/lib/imgmig-criu-relay.py"
    relay_socket = "/run/imgmig-criu-relay.sock"
    node_b.copy_in(Path(criu_relay.__file__), relay_file)
    node_b.systemctl("stop", "imgmig-cache.service")
    node_a.systemctl("stop", "imgmig-proxy.service")
    _install_tls(node_a, pki, "node-a", pair.a.address)
    _install_tls(node_b, pki, "node-b", pair.b.address)
    node_b.write("/etc/imgmig/imgmig.yaml", f"node: node-b\ncriu: /usr/bin/python3 {relay_file} {relay_socket}\n"
                                             f"cache:\n  listen: 0.0.0.0:{PORT}\n  allow: [node-a]\n"
                                             f"  restore: auto\n")
    node_a.write("/etc/imgmig/imgmig.yaml", f"node: node-a\nproxy:\n  peer: node-b@{pair.b.address}:{PORT}\n")
    node_b.systemctl("enable", "--now", "imgmig-restore.socket")
    node_b.systemctl("start", "imgmig-cache.socket")
    node_a.systemctl("start", "imgmig-proxy.socket")
    host_config = workdir / "host.yaml"
    host_config.write_text(f"node: node-a\nproxy:\n  images_dir: {node_a.root}/run/imgmig/proxy\n"
                           f"  peer: node-b@{pair.b.address}:{PORT}\n")

    state = workdir / "auto-workload.json"
    task = workload.start(MIB, state, log_path=workdir / "auto-workload.log")
    threading.Thread(target=task.wait, daemon=True).start()  # reaped at once: the restore needs its PID
    before = workload.wait_state(state, lambda s: s.counter > 20)
    repo = Path(__file__).resolve().parents[1]
    with criu_relay.serving(node_b.root / relay_socket.lstrip("/"), node_b.root, criu) as relay:
        done = subprocess.run(["/usr/bin/python3", "-m", "imgmig", "migrate", str(task.pid), "--to", "node-b",
                               "--json", "--config", str(host_config), "--criu", shlex.join(criu)],
                              capture_output=True, text=True, timeout=180, cwd=repo,
                              env={**os.environ, "PYTHONPATH": str(repo)})
        restores = _journal(node_b, "-u", "imgmig-restore@*")
        # the restore unit has ended; the restored process lives on (on the host: see above)
        _wait(lambda: node_b.run("pgrep", "-f", "imgmig restore --doorbell", check=False).returncode != 0,
              "the restore instance to end", 30)
    try:
        assert done.returncode == 0, (done.stdout[-2000:], done.stderr, [e["MESSAGE"] for e in restores])
        events = [json.loads(line) for line in done.stdout.splitlines()]
        cache_check = next(e for e in events if e["event"] == "check" and e["name"] == "cache")
        assert "authenticated" in cache_check["detail"], cache_check
        progress = [e for e in events if e["event"] == "progress"]
        assert progress and progress[-1]["captured"] == progress[-1]["forwarded"] > MIB << 20, progress
        result = events[-1]
        assert result["event"] == "result" and result["exit"] == 0, result
        print(f"auto migration: {result['outcome']}; phases {result['phases']}")
        checkpoint = result["checkpoint"]
        assert checkpoint.startswith("node-a-"), result
        assert result["phases"]["running on the destination"] > 0, result

        # B's `imgmig restore` ran CRIU exactly once, through the relay, and it succeeded
        assert [(run.argv[0], run.exit) for run in relay.runs] == [("restore", 0)], relay.runs
        assert "--stream" in relay.runs[0].argv and "-d" in relay.runs[0].argv, relay.runs[0]
        line = next(e["MESSAGE"] for e in _journal(node_b, "-u", "imgmig-restore@*")
                    if "restored: running as pid" in e["MESSAGE"])
        assert checkpoint in line, line
        restored = int(line.rsplit(" ", 1)[1])
        assert restored == task.pid, f"{line}: CRIU restores the dumped PID (a host PID here)"

        after = workload.verify(restored, state)
        assert after.pid == restored and after.token == before.token and after.counter > before.counter, after
        assert after.verified_digest == before.digest == workload.expected_digest(MIB), after

        cache_status = json.loads(node_b.run("imgmig", "status", "--json").stdout)["cache"]
        ended = next(e for e in cache_status["ended"] if e["id"] == checkpoint)
        assert ended["state"] == "running" and f"as pid {restored}" in ended["outcome"], ended
    finally:
        with contextlib.suppress(ProcessLookupError, TimeoutError):
            migrate.kill_and_reap(task.pid)
        node_b.systemctl("disable", "--now", "imgmig-restore.socket")


def test_installs_and_starts_on_bookworm(deb: Path, workdir: Path, pki: Path) -> None:
    """systemd 252: the key arrives as a credential, and `systemctl reload` takes a renewed
    certificate (same key) without a restart."""
    root = _tree("bookworm")
    with containers.booted(root, "imgmig-bookworm", workdir=workdir, extra=["--private-network"]) as node:
        _install(node, deb)
        _not_enabled_or_started(node)
        _check_units(node)
        node.write("/etc/imgmig/imgmig.yaml", "node: node-old\n")
        _install_tls(node, pki, "node-old")
        node.systemctl("start", "imgmig-cache.socket")
        # The first connection activates the service (here: a restore that finds nothing and leaves).
        import socket
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(node.root / "run/imgmig/cache/streamer-serve.sock"))
            _wait(lambda: _ready(node, "imgmig-cache.service")["ActiveState"] == "active", "READY on bookworm")
        status = _ready(node, "imgmig-cache.service")
        assert status["StatusText"].startswith("0 checkpoints"), status
        pid = status["MainPID"]
        _install_tls(node, pki, "node-old")  # renewed: `pki issue` again keeps the key
        node.systemctl("reload", "imgmig-cache.service")
        _wait(lambda: any("TLS reloaded" in entry.get("MESSAGE", "")
                          for entry in _journal(node, "-u", "imgmig-cache")), "the reload on bookworm")
        assert _ready(node, "imgmig-cache.service")["MainPID"] == pid, "reload must not restart the daemon"
