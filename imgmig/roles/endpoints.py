"""Listening sockets: bound by the daemon itself, or passed in by systemd and matched
to the config by what they are (getsockname), never by their order."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from imgmig.config import ConfigError, HostPort

CAPTURE_SOCKET = "streamer-capture.sock"
SERVE_SOCKET = "streamer-serve.sock"
CONTROL_SOCKET = "control.sock"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """One socket a role listens on: `kind` is capture, serve or peer."""
    kind: str
    path: Path | None = None
    tcp: HostPort | None = None
    optional: bool = False  # a .socket unit from before it existed may not pass it (the control socket)

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"tcp {self.tcp}"


def bind(endpoint: Endpoint) -> socket.socket:
    if endpoint.path is not None:
        return _bind_unix(endpoint.path)
    assert endpoint.tcp is not None
    return _bind_tcp(endpoint.tcp)


def _bind_unix(path: Path) -> socket.socket:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ConfigError(f"{path} exists and is not a socket; remove it or change images_dir")
            path.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}; fix images_dir or its parent "
                          f"directories") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {path}: {exc.strerror}; fix images_dir") from None
    sock.listen(16)
    return sock


def _bind_tcp(address: HostPort) -> socket.socket:
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}; use an address of this node "
                          f"in cache.listen") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}; is another cache running "
                          f"there, or is the address not on this node?") from None
    sock.listen(64)
    return sock


def match_passed(endpoints: list[Endpoint], fds: list[int]) -> dict[str, socket.socket]:
    """Pair each expected endpoint with a passed listening socket, by address."""
    sockets = [socket.socket(fileno=fd) for fd in fds]
    matched: dict[str, socket.socket] = {}
    for endpoint in endpoints:
        found = next((s for s in sockets if _same_address(endpoint, s)), None)
        if found is None and endpoint.optional:
            log.warning("systemd passed no socket for %s (%s side): that side is off; add "
                        "ListenStream=%s to the .socket unit", endpoint, endpoint.kind, endpoint)
            continue
        if found is None:
            have = ", ".join(_describe(s) for s in sockets) or "none"
            raise ConfigError(f"systemd passed no socket for {endpoint} ({endpoint.kind} side); passed: "
                              f"{have}; make the .socket unit's Listen lines match the config")
        sockets.remove(found)
        matched[endpoint.kind] = found
    if sockets:
        extra = ", ".join(_describe(s) for s in sockets)
        raise ConfigError(f"systemd passed sockets the config does not name: {extra}; "
                          f"make the .socket unit's Listen lines match the config")
    return matched


def _same_address(endpoint: Endpoint, sock: socket.socket) -> bool:
    name = sock.getsockname()
    if endpoint.path is not None:
        return sock.family == socket.AF_UNIX and name == str(endpoint.path)
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or endpoint.tcp is None:
        return False
    if name[1] != endpoint.tcp.port:
        return False
    wanted = _ip(endpoint.tcp.host)
    bound = ipaddress.ip_address(name[0])
    if wanted is None:
        return True
    if wanted.is_unspecified:
        return bound.is_unspecified
    return bound == wanted or bound.is_unspecified


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return str(name) or "unnamed unix socket"
    return f"tcp {HostPort(name[0], name[1])}"
