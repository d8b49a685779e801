"""Run imgmig-proxy in node A's netns and imgmig-cache in node B's, from this source
tree (`/usr/bin/python3 -m imgmig`), with a generated config and logs in files."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .netns import Node

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = "/usr/bin/python3"
DEFAULT_PORT = 9996
CAPTURE_SOCKET = "streamer-capture.sock"
SERVE_SOCKET = "streamer-serve.sock"
MEMFD_PREFIX = "/memfd:imgmig:"  # the store's image memfds, as /proc/PID/fd shows them
# Page images' memfds, which the store may keep after their checkpoint for the next one (memory.reuse)
REUSE_PREFIX = "/memfd:imgmig-reuse:"


class DaemonFailed(RuntimeError):
    """A daemon did not start, died, or did not stop cleanly; the text quotes its log."""


@dataclass
class Daemon:
    role: str
    config_path: Path
    images_dir: Path
    log_path: Path
    proc: subprocess.Popen | None = None
    returncode: int | None = field(default=None)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_log(self, text: str, timeout: float = 30.0) -> str:
        """Wait until a log line contains `text`; return that line."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log().splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise TimeoutError(f"imgmig-{self.role}: no log line with {text!r} within {timeout:.0f} s; "
                                   f"log:\n{self.log()}")
            time.sleep(0.01)

    def held_images(self, kept: bool = True) -> list[str]:
        """Names of the checkpoint images the daemon holds: its open image memfds
        ("imgmig:NAME"), read from /proc, independent of what it logs; with `kept`, also page
        images' ("imgmig-reuse:NAME"), which may be memfds kept after their checkpoint."""
        if self.proc is None:
            return []
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        names = []
        try:
            fds = list(fd_dir.iterdir())
        except OSError:
            return []
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            for prefix in (MEMFD_PREFIX, REUSE_PREFIX) if kept else (MEMFD_PREFIX,):
                if target.startswith(prefix):
                    names.append(target[len(prefix):].removesuffix(" (deleted)"))
        return sorted(names)

    def wait_released(self, timeout: float = 10.0) -> None:
        """Wait until the daemon holds no checkpoint image any more (page images' memfds
        may stay, kept for reuse: memory.reuse)."""
        deadline = time.monotonic() + timeout
        while (held := self.held_images(kept=False)) and time.monotonic() < deadline:
            time.sleep(0.02)
        if held:
            raise TimeoutError(f"imgmig-{self.role} still holds {held} after {timeout:.0f} s; log:\n{self.log()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status (SIGKILL after `timeout`, status -9)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        return self.returncode


def write_config(path: Path, *, node: str, proxy_dir: Path, cache_dir: Path, peer: str | None,
                 listen: str, allow: list[str], memory_limit: str, transfer: str,
                 tls_dir: Path | None = None, dead_peer_timeout: float | None = None,
                 restore: str = "manual") -> Path:
    """A config for `node`; with tls_dir (made by make_pki) TLS is on, else `tls: off`."""
    config: dict[str, object] = {
        "node": node,
        "transfer": transfer,
        # keep_restored_for 1: the proxy releases its copy 1 s after the cache reports a restore
        # (10 min by default, docs/config.md), so that a test sees it released
        "proxy": {"images_dir": str(proxy_dir), "keep_restored_for": 1, **({"peer": peer} if peer else {})},
        "cache": {"images_dir": str(cache_dir), "listen": listen, "allow": allow, "restore": restore},
        "memory": {"limit": memory_limit},
        "tls": "off" if tls_dir is None else {"ca": str(tls_dir / "ca.crt"), "cert": str(tls_dir / f"{node}.crt"),
                                               "key": str(tls_dir / f"{node}.key")},
    }
    if dead_peer_timeout is not None:
        config["link"] = {"dead_peer_timeout": dead_peer_timeout}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def make_pki(directory: Path, nodes: dict[str, str]) -> Path:
    """A cluster CA and a certificate per node (name -> address), with imgmig's own pki code."""
    from imgmig.commands.pki import init_ca, issue_node

    if not (directory / "ca.crt").exists():
        init_ca(directory)
    for name, address in nodes.items():
        issue_node(directory, name, ips=[address])
    return directory


def start(role: str, node: Node | None, config_path: Path, images_dir: Path, log_path: Path,
          *, verbose: bool = False, timeout: float = 20.0) -> Daemon:
    """Start `python3 -m imgmig ROLE --config F` (inside node's netns when given) and
    wait until its UNIX socket(s) exist."""
    daemon = Daemon(role, config_path, images_dir, log_path)
    argv = [PYTHON, "-m", "imgmig", role, "--config", str(config_path), *(["--verbose"] if verbose else [])]
    if node is not None:
        argv = [*node.exec_prefix(), *argv]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LISTEN_", "NOTIFY_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    with open(log_path, "ab") as log:
        daemon.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env=env, cwd=str(REPO_ROOT))
    sockets = [images_dir / SERVE_SOCKET] + ([images_dir / CAPTURE_SOCKET] if role == "proxy" else [])
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in sockets):
        if daemon.proc.poll() is not None:
            raise DaemonFailed(f"imgmig-{role} exited with {daemon.proc.returncode} at start; log:\n{daemon.log()}")
        if time.monotonic() > deadline:
            daemon.stop()
            raise DaemonFailed(f"imgmig-{role}: sockets {sockets} not there after {timeout:.0f} s; "
                               f"log:\n{daemon.log()}")
        time.sleep(0.02)
    if role == "cache":
        daemon.wait_log("listening", timeout)  # the TCP side is bound before the log line
    return daemon


@dataclass
class Pair:
    """Proxy on node A, cache on node B, and where everything lives."""
    workdir: Path
    proxy: Daemon
    cache: Daemon | None
    proxy_dir: Path
    cache_dir: Path

    def stop(self) -> dict[str, int]:
        """Stop both (cache last, so the proxy's link closes first); exit statuses by role."""
        statuses = {"proxy": self.proxy.stop()}
        if self.cache is not None:
            statuses["cache"] = self.cache.stop()
        return statuses


@contextlib.contextmanager
def proxy_and_cache(workdir: Path, node_a: Node, node_b: Node, *, port: int = DEFAULT_PORT,
                    transfer: str = "streaming", memory_limit: str = "50%", start_cache: bool = True,
                    verbose: bool = False, tls: bool = True, dead_peer_timeout: float | None = None,
                    restore: str = "manual") -> Iterator[Pair]:
    """Start imgmig-cache on node B (unless start_cache is False: an unreachable cache)
    and imgmig-proxy on node A, forwarding to B; stop both on exit (SIGTERM). The caller
    checks pair.stop()'s statuses when it wants clean exits asserted. With tls (the
    default) both run mutual TLS with a PKI made under workdir; the proxy names its peer
    `node-b@address:port` and the cache allows node-a by name."""
    workdir.mkdir(parents=True, exist_ok=True)
    proxy_dir, cache_dir = workdir / "proxy", workdir / "cache"
    tls_dir = make_pki(workdir / "pki", {"node-a": node_a.address, "node-b": node_b.address}) if tls else None
    peer = f"node-b@{node_b.address}:{port}" if tls else f"{node_b.address}:{port}"
    common = {"proxy_dir": proxy_dir, "cache_dir": cache_dir, "memory_limit": memory_limit,
              "transfer": transfer, "peer": peer, "tls_dir": tls_dir, "dead_peer_timeout": dead_peer_timeout}
    cache_conf = write_config(workdir / "cache.yaml", node="node-b", listen=f"{node_b.address}:{port}",
                              allow=["node-a"] if tls else [f"{node_a.address}/32"], restore=restore, **common)
    proxy_conf = write_config(workdir / "proxy.yaml", node="node-a", listen=f"127.0.0.1:{port}",
                              allow=["127.0.0.1"], **common)
    cache = proxy = None
    try:
        if start_cache:
            cache = start("cache", node_b, cache_conf, cache_dir, workdir / "cache.log", verbose=verbose)
        proxy = start("proxy", node_a, proxy_conf, proxy_dir, workdir / "proxy.log", verbose=verbose)
        pair = Pair(workdir, proxy, cache, proxy_dir, cache_dir)
        yield pair
    finally:
        for daemon in (proxy, cache):
            if daemon is not None:
                daemon.stop()
