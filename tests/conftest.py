"""Shared fixtures: run the real imgmig-proxy and imgmig-cache as subprocesses.

`daemons(...)` writes a config under tmp_path, starts `python3 -m imgmig proxy|cache
--config F` with PYTHONPATH at the repo root, waits until both listen, and returns a
`Pair` with the images dirs, ports and log readers. At teardown each daemon gets
SIGTERM and must exit 0 without a traceback in its log.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from imgmig.commands.pki import init_ca, issue_node

REPO = Path(__file__).resolve().parents[1]
PYTHON = "/usr/bin/python3"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
LOG_TIMEOUT = 20.0

# Fuzz tests (tests/test_fuzz_*.py): a short run with fixed seeds by default, so the test
# command is repeatable and fast and writes no example database into the tree;
# IMGMIG_FUZZ_EXAMPLES=N (tools/fuzz-long.sh) runs N random examples per property instead.
FUZZ_EXAMPLES = int(os.environ.get("IMGMIG_FUZZ_EXAMPLES", "0"))
settings.register_profile("imgmig-short", derandomize=True, max_examples=100, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
if FUZZ_EXAMPLES:
    settings.register_profile("imgmig-long", max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                              suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("imgmig-long" if FUZZ_EXAMPLES else "imgmig-short")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll `predicate` until it is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Log:
    """A daemon's stderr, kept in a file; lines are searched by regular expression."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self.mark = 0

    def lines(self) -> list[str]:
        try:
            return self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def since_mark(self) -> list[str]:
        return self.lines()[self.mark:]

    def set_mark(self) -> None:
        """Later `wait_for(..., new=True)` and `new_lines()` only look at lines after this point."""
        self.mark = len(self.lines())

    def matching(self, pattern: str, new: bool = False) -> list[str]:
        regex = re.compile(pattern)
        return [line for line in (self.since_mark() if new else self.lines()) if regex.search(line)]

    def wait_for(self, pattern: str, timeout: float = LOG_TIMEOUT, new: bool = False, count: int = 1) -> list[str]:
        found = wait_until(lambda: len(self.matching(pattern, new)) >= count and self.matching(pattern, new),
                           timeout, f"{count} line(s) matching {pattern!r} in the {self.name} log; "
                           f"it has:\n" + "\n".join(self.lines()[-30:]))
        return found  # type: ignore[return-value]

    def errors(self, new: bool = True) -> list[str]:
        return self.matching(r": ERROR ", new)

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass
class Daemon:
    role: str
    process: subprocess.Popen[bytes]
    log: Log

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"imgmig-{self.role} did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM:\n{self.log}")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


@dataclass(frozen=True)
class Pki:
    """A cluster CA made with imgmig's own `pki` code, and certificates for test nodes."""
    dir: Path

    def cert(self, node: str) -> Path:
        return self.dir / f"{node}.crt"

    def key(self, node: str) -> Path:
        return self.dir / f"{node}.key"

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def client(self, node: str = "fake-proxy", *, ca: Path | None = None) -> ssl.SSLContext:
        """A TLS 1.3 client context presenting node's certificate; trusts `ca` (default this CA)
        without checking the cache's name (tests of the cache side)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False
        context.load_verify_locations(ca or self.ca)
        if node:
            context.load_cert_chain(self.cert(node), self.key(node))
        return context


TEST_NODES = ("test-node", "fake-proxy", "other-node")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    init_ca(directory)
    for node in TEST_NODES:
        issue_node(directory, node, ips=["127.0.0.1"])
    return Pki(directory)


@dataclass
class Pair:
    tmp: Path
    config: Path
    proxy_dir: Path
    cache_dir: Path
    port: int
    pki: Pki | None = None  # None: the pair runs with tls: off
    daemons: dict[str, Daemon] = field(default_factory=dict)

    @property
    def proxy(self) -> Daemon:
        return self.daemons["proxy"]

    @property
    def cache(self) -> Daemon:
        return self.daemons["cache"]

    @property
    def proxy_log(self) -> Log:
        return self.proxy.log

    @property
    def cache_log(self) -> Log:
        return self.cache.log

    def set_marks(self) -> None:
        for daemon in self.daemons.values():
            daemon.log.set_mark()


def write_config(tmp: Path, *, port: int, memory_limit: str = "1GiB", allow: str = "[127.0.0.1]",
                 transfer: str = "streaming", cache_host: str = "127.0.0.1", peer_port: int | None = None,
                 digest: str = "xxh3-128", pki: Pki | None = None, node: str = "test-node",
                 peer_node: str | None = None, handshake_timeout: float = 10, dead_peer_timeout: float = 60,
                 max_files: int | None = None, cache_keys: dict[str, object] | None = None,
                 proxy_keys: dict[str, object] | None = None) -> Path:
    """`cache_keys` / `proxy_keys` add keys to those sections, e.g. {"idle_timeout": 2}. The proxy
    keeps a copy restored on the cache 1 s (keep_restored_for; 10 min by default) unless told otherwise."""
    path = tmp / "imgmig.yaml"
    tls = "tls: off\n" if pki is None else f"tls:\n  ca: {pki.ca}\n  cert: {pki.cert(node)}\n  key: {pki.key(node)}\n"
    peer = f"{peer_node}@" if peer_node else ""
    more_cache = "".join(f"  {key}: {value}\n" for key, value in (cache_keys or {}).items())
    proxy_keys = {"keep_restored_for": 1} | (proxy_keys or {})
    more_proxy = "".join(f"  {key}: {value}\n" for key, value in proxy_keys.items())
    path.write_text(
        (f"max_files: {max_files}\n" if max_files is not None else "")
        + f"node: {node}\n"
        f"transfer: {transfer}\n"
        f"digest: {digest}\n"
        f"proxy:\n  images_dir: {tmp / 'proxy'}\n  peer: '{peer}{cache_host}:{peer_port or port}'\n"
        + more_proxy
        + f"cache:\n  images_dir: {tmp / 'cache'}\n  listen: '{cache_host}:{port}'\n  allow: {allow}\n"
        + more_cache
        + f"memory:\n  limit: {memory_limit}\n"
        f"link:\n  handshake_timeout: {handshake_timeout}\n  dead_peer_timeout: {dead_peer_timeout}\n"
        f"{tls}")
    return path


def start_daemon(role: str, config: Path, tmp: Path, nofile: int | None = None) -> Daemon:
    """`nofile`: the daemon's RLIMIT_NOFILE (soft and hard), to run it out of fds on purpose."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "JOURNAL_STREAM",
                          "INVOCATION_ID", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env["PYTHONPATH"] = str(REPO)
    log_path = tmp / f"{role}.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen([PYTHON, "-m", "imgmig", role, "--config", str(config)], cwd=REPO, env=env,
                                   stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                   preexec_fn=None if nofile is None else lambda: resource.setrlimit(
                                       resource.RLIMIT_NOFILE, (nofile, nofile)))
    daemon = Daemon(role, process, Log(log_path, f"imgmig-{role}"))
    wait_until(lambda: process.poll() is not None or daemon.log.matching(r"listening"), START_TIMEOUT,
               f"imgmig-{role} to listen")
    if process.poll() is not None:
        pytest.fail(f"imgmig-{role} exited with {process.returncode} at start:\n{daemon.log}")
    return daemon


@pytest.fixture
def daemons(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., Pair]]:
    """Factory: daemons(memory_limit="64MiB", roles=("cache", "proxy"), tls=True, cache_nofile=100, ...) -> Pair.
    TLS is on by default, with the session's PKI (both daemons are node test-node)."""
    pairs: list[Pair] = []

    def start(roles: tuple[str, ...] = ("cache", "proxy"), tls: bool = True, cache_nofile: int | None = None,
              **options: object) -> Pair:
        tmp = tmp_path / f"pair{len(pairs)}"
        tmp.mkdir()
        port = free_port()
        used = options.pop("pki", pki) if tls else None  # type: ignore[assignment]
        config = write_config(tmp, port=port, pki=used, **options)  # type: ignore[arg-type]
        pair = Pair(tmp, config, tmp / "proxy", tmp / "cache", port, used)
        pairs.append(pair)
        for role in roles:
            pair.daemons[role] = start_daemon(role, config, tmp, cache_nofile if role == "cache" else None)
        return pair

    yield start

    problems = []
    for pair in pairs:
        # the proxy first: its links close, so the cache's receivers end at once
        for role in ("proxy", "cache"):
            daemon = pair.daemons.get(role)
            if daemon is None:
                continue
            was_killed = daemon.process.poll() is not None
            code = daemon.stop()
            if not was_killed and code != 0:
                problems.append(f"imgmig-{role} exited {code} on SIGTERM:\n{daemon.log}")
            crash = [line for line in daemon.log.lines() if "Traceback" in line or "unexpected error" in line]
            if crash:
                problems.append(f"imgmig-{role} logged an unexpected error:\n{daemon.log}")
    if problems:
        pytest.fail("\n\n".join(problems))
