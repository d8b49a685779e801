"""The one YAML file in /etc/imgmig: parsing and validation.

Every problem becomes a ConfigError whose text is one line naming the file, the key,
the value and what is expected; the CLI prints it and exits 2.
"""

from __future__ import annotations

import ipaddress
import math
import os
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PATH = "/etc/imgmig/imgmig.yaml"
DEFAULT_PORT = 9996
TRANSFER_MODES = ("streaming", "store-and-forward")
DIGESTS = ("xxh3-128", "sha256")
DEFAULT_MAX_FILES = 100_000  # real CRIU dumps have hundreds; each file costs an fd and a page
DEFAULT_MAX_HANDSHAKES = 16
# Released page images' memfds kept, with their pages, for the next checkpoint (store.MemfdPool):
# writing into pages that exist costs about half of allocating and freeing fresh ones. 2 GiB:
# a process of 1 GiB has a page image a little over 1 GiB, which 1 GiB would not keep.
DEFAULT_MEMORY_REUSE = 2 << 30
DEFAULT_MAX_CONNECTIONS_PER_PEER = 64  # a proxy keeps one connection per held checkpoint
DEFAULT_IDLE_TIMEOUT = 60.0
TLS_DIR = Path("/etc/imgmig/tls")
HANDSHAKE_TIMEOUT = 10.0
DEAD_PEER_TIMEOUT = 60.0
# An allow entry made only of these characters is meant as an address, never a node name.
_ADDRESS_CHARS = set("0123456789abcdefABCDEF.:/")
RESTORE_MODES = ("manual", "auto")
MIGRATE_MODES = ("copy", "lazy")  # migrate.mode: full copy through the images, or post-copy (docs/design.md)

_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


class ConfigError(ValueError):
    """A configuration problem, phrased as one line for an operator."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ProxyConfig:
    images_dir: Path
    peer: HostPort | None
    peer_node: str | None = None  # `NAME@host:port`: the node the cache's certificate must name
    reconnect_for: float = 300.0
    keep_restored_for: float = 600.0


@dataclass(frozen=True)
class CacheConfig:
    images_dir: Path
    listen: HostPort
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES
    max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    grant_timeout: float = 30.0
    resume_for: float = 600.0
    allow_nodes: tuple[str, ...] = ()  # node names, matched against the proxy's certificate
    restore: str = "manual"  # auto: ring imgmig-restore.socket when a checkpoint begins


@dataclass(frozen=True)
class TlsConfig:
    """Where this node's CA, certificate and key are (read at start and on reload)."""
    ca: Path = TLS_DIR / "ca.crt"
    cert: Path = TLS_DIR / "node.crt"
    key: Path = TLS_DIR / "node.key"


@dataclass(frozen=True)
class LinkConfig:
    handshake_timeout: float = HANDSHAKE_TIMEOUT  # TLS handshake plus HELLO, in total
    dead_peer_timeout: float = DEAD_PEER_TIMEOUT  # TCP keepalive / user timeout


@dataclass(frozen=True)
class Config:
    node: str
    proxy: ProxyConfig
    cache: CacheConfig
    memory_limit: int
    memory_reuse: int = DEFAULT_MEMORY_REUSE  # bytes of released page images' memfds kept for the next
    transfer: str = "streaming"
    digest: str = "xxh3-128"
    max_files: int = DEFAULT_MAX_FILES
    tls: TlsConfig | None = TlsConfig()  # None: `tls: off` (a lab only)
    link: LinkConfig = LinkConfig()
    peers: tuple[tuple[str, HostPort], ...] = ()  # node name -> cache address, for `imgmig migrate --to`
    criu: tuple[str, ...] = ("criu",)  # the command that runs CRIU: a path, or a wrapper with arguments
    migrate_mode: str = "copy"  # `imgmig migrate` without --lazy: copy (full copy) or lazy (post-copy)
    source: str = field(default="<defaults>", compare=False)

    @property
    def store_and_forward(self) -> bool:
        return self.transfer == "store-and-forward"


_SCHEMA: dict[str, Any] = {
    "node": None,
    "transfer": None,
    "digest": None,
    "max_files": None,
    "proxy": {"images_dir": None, "peer": None, "reconnect_for": None, "keep_restored_for": None},
    "cache": {"images_dir": None, "listen": None, "allow": None, "max_handshakes": None,
              "max_connections_per_peer": None, "idle_timeout": None, "grant_timeout": None, "resume_for": None,
              "restore": None},
    "memory": {"limit": None, "reuse": None},
    "tls": {"ca": None, "cert": None, "key": None},
    "link": {"handshake_timeout": None, "dead_peer_timeout": None},
    "peers": None,
    "criu": None,
    "migrate": {"mode": None},
}


def parse_host_port(text: str, *, default_port: int | None = None) -> HostPort:
    """Parse `host:port`, `[v6addr]:port` or, with default_port, a bare host."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError("expected [IPv6]:port")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError("an IPv6 address needs brackets: [addr]:port")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError("the host is empty")
    if not port_text:
        if default_port is None:
            raise ValueError("the port is missing")
        return HostPort(host, default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port {port_text!r} is not 1-65535")
    return HostPort(host, int(port_text))


def parse_size(value: Any, total_memory: int) -> int:
    """A memory limit: bytes as an int, `75%` of RAM, or `8GiB` / `512MiB` / `2GB`."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if text.endswith("%"):
            percent = float(text[:-1])
            if not 0 < percent <= 100:
                raise ValueError("a percentage must be in (0, 100]")
            size = int(total_memory * percent / 100)
        else:
            digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
            unit = text[len(digits):] or "b"
            if unit not in _UNITS or not digits:
                raise ValueError("expected a size like 8GiB, 512MiB or 75%")
            number = float(digits)
            if not math.isfinite(number):
                raise ValueError("expected a size like 8GiB, 512MiB or 75%")
            size = int(number * _UNITS[unit])
    else:
        raise ValueError("expected a size like 8GiB, 512MiB or 75%")
    if size < 1 << 20:
        raise ValueError("the limit must be at least 1MiB")
    return size


def total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raises ConfigError with a one-line reason."""
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the config file: {exc.strerror}; "
                          f"create it or pass --config PATH") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: the config file is not UTF-8 text") from None
    return parse(text, where)


def parse(text: str, where: str = "<string>") -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}:{line}: not valid YAML ({problem}); fix the syntax") from None
    if raw is None:
        raw = {}
    return _build(raw, where)


def _fail(where: str, key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{where}: key '{key}': value {value!r} is not valid: {expected}")


def _check_keys(raw: Any, schema: dict[str, Any], prefix: str, where: str) -> None:
    if not isinstance(raw, dict):
        name = prefix.rstrip(".") or "top level"
        raise _fail(where, name, raw, "expected a mapping of keys")
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in schema:
            known = ", ".join(f"{prefix}{k}" for k in schema)
            raise ConfigError(f"{where}: unknown key '{full}'; known keys here: {known}")
        if isinstance(schema[key], dict) and value is not None and not _is_off(value):
            _check_keys(value, schema[key], f"{full}.", where)


def _is_off(value: Any) -> bool:
    """`tls: off` (YAML reads a bare off as false)."""
    return value is False or value == "off"


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    return raw.get(name) or {}


def _path(value: Any, key: str, default: str, where: str) -> Path:
    if value is None:
        return Path(default)
    if not isinstance(value, str) or not value.startswith("/"):
        raise _fail(where, key, value, "expected an absolute path")
    return Path(value)


def _build(raw: Any, where: str) -> Config:
    _check_keys(raw, _SCHEMA, "", where)
    node = raw.get("node", socket.gethostname())
    if not isinstance(node, str) or not node or len(node.encode()) > 64 or not node.isprintable():
        raise _fail(where, "node", node, "expected a printable name of 1-64 bytes")
    transfer = raw.get("transfer", "streaming")
    if transfer not in TRANSFER_MODES:
        raise _fail(where, "transfer", transfer, "expected one of " + ", ".join(TRANSFER_MODES))
    digest = raw.get("digest", "xxh3-128")
    if digest not in DIGESTS:
        raise _fail(where, "digest", digest, "expected one of " + ", ".join(DIGESTS))
    proxy_raw, cache_raw = _section(raw, "proxy"), _section(raw, "cache")
    peer_node, peer_text = _split_peer(proxy_raw.get("peer"), where)
    proxy = ProxyConfig(
        images_dir=_path(proxy_raw.get("images_dir"), "proxy.images_dir", "/run/imgmig/proxy", where),
        peer=_host_port(peer_text, "proxy.peer", where, required_port=True),
        peer_node=peer_node,
        reconnect_for=_seconds(proxy_raw.get("reconnect_for", 300), "proxy.reconnect_for", where),
        keep_restored_for=_seconds(proxy_raw.get("keep_restored_for", 600), "proxy.keep_restored_for", where,
                                   zero=True),
    )
    listen = _host_port(cache_raw.get("listen"), "cache.listen", where, required_port=False)
    networks, nodes = _allow(cache_raw.get("allow", ["127.0.0.1", "::1"]), where)
    cache = CacheConfig(
        images_dir=_path(cache_raw.get("images_dir"), "cache.images_dir", "/run/imgmig/cache", where),
        listen=listen or HostPort("0.0.0.0", DEFAULT_PORT),
        allow=networks,
        allow_nodes=nodes,
        max_handshakes=_count(cache_raw.get("max_handshakes", DEFAULT_MAX_HANDSHAKES), "cache.max_handshakes",
                              where),
        max_connections_per_peer=_count(cache_raw.get("max_connections_per_peer",
                                                      DEFAULT_MAX_CONNECTIONS_PER_PEER),
                                        "cache.max_connections_per_peer", where),
        idle_timeout=_seconds(cache_raw.get("idle_timeout", DEFAULT_IDLE_TIMEOUT), "cache.idle_timeout", where),
        grant_timeout=_seconds(cache_raw.get("grant_timeout", 30), "cache.grant_timeout", where),
        resume_for=_seconds(cache_raw.get("resume_for", 600), "cache.resume_for", where),
        restore=_choice(cache_raw.get("restore", "manual"), "cache.restore", RESTORE_MODES, where),
    )
    limit_raw = _section(raw, "memory").get("limit", "75%")
    try:
        limit = parse_size(limit_raw, total_memory_bytes())
    except ValueError as exc:
        raise _fail(where, "memory.limit", limit_raw, str(exc)) from None
    reuse_raw = _section(raw, "memory").get("reuse", DEFAULT_MEMORY_REUSE)
    try:
        reuse = 0 if reuse_raw in (0, "0", "off") else parse_size(reuse_raw, total_memory_bytes())
    except ValueError as exc:
        raise _fail(where, "memory.reuse", reuse_raw, f"{exc} (or 0 / off)") from None
    max_files = _count(raw.get("max_files", DEFAULT_MAX_FILES), "max_files", where)
    return Config(node=node, proxy=proxy, cache=cache, memory_limit=limit, memory_reuse=reuse, transfer=transfer,
                  digest=digest, max_files=max_files, tls=_tls(raw.get("tls"), where),
                  link=_link(_section(raw, "link"), where),
                  peers=_peers(raw.get("peers"), where), criu=_criu(raw.get("criu"), where),
                  migrate_mode=_choice(_section(raw, "migrate").get("mode", "copy"), "migrate.mode", MIGRATE_MODES,
                                       where),
                  source=where)


def _count(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(where, key, value, "expected a whole number of at least 1")
    return value


def _seconds(value: Any, key: str, where: str, zero: bool = False) -> float:
    """A duration; `zero` allows 0 (meaning: at once)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf \
            or (value == 0 and not zero):
        expected = "a number of seconds, 0 or more" if zero else "a number of seconds greater than 0"
        raise _fail(where, key, value, f"expected {expected}")
    return float(value)


def _valid_node_name(name: Any) -> bool:
    return isinstance(name, str) and 0 < len(name.encode()) <= 64 and name.isprintable()


def _split_peer(value: Any, where: str, key: str = "proxy.peer") -> tuple[str | None, Any]:
    """`node-b@10.0.0.2:9996` -> ("node-b", "10.0.0.2:9996"); without `NAME@`, no node."""
    if not isinstance(value, str) or "@" not in value:
        return None, value
    name, _, address = value.rpartition("@")
    if not _valid_node_name(name) or " " in name:
        raise _fail(where, key, value, "expected NODE@host:port with the cache's node name before @")
    return name, address


def _tls(value: Any, where: str) -> TlsConfig | None:
    if _is_off(value):
        return None
    raw = value or {}
    default = TlsConfig()
    return TlsConfig(ca=_path(raw.get("ca"), "tls.ca", str(default.ca), where),
                     cert=_path(raw.get("cert"), "tls.cert", str(default.cert), where),
                     key=_path(raw.get("key"), "tls.key", str(default.key), where))


def _link(raw: dict[str, Any], where: str) -> LinkConfig:
    return LinkConfig(
        handshake_timeout=_seconds(raw.get("handshake_timeout", HANDSHAKE_TIMEOUT), "link.handshake_timeout", where),
        dead_peer_timeout=_seconds(raw.get("dead_peer_timeout", DEAD_PEER_TIMEOUT), "link.dead_peer_timeout", where),
    )


def _peers(value: Any, where: str) -> tuple[tuple[str, HostPort], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _fail(where, "peers", value, "expected a mapping of node names to host:port")
    peers = []
    for name, address in value.items():
        if not _valid_node_name(name):
            raise _fail(where, "peers", name, "expected node names of 1-64 printable bytes")
        # The key is the node its cache's certificate must name; `NAME@` may repeat it.
        named, address = _split_peer(address, where, f"peers.{name}")
        if named not in (None, name):
            raise _fail(where, f"peers.{name}", value[name], f"the node before @ must be the key, {name}")
        found = _host_port(address, f"peers.{name}", where, required_port=False)
        if found is None:
            raise _fail(where, f"peers.{name}", address, "expected host:port, e.g. 10.0.0.2:9996")
        peers.append((name, found))
    return tuple(peers)


def _criu(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ("criu",)
    try:
        argv = tuple(shlex.split(value)) if isinstance(value, str) else ()
    except ValueError:
        argv = ()
    if not argv:
        raise _fail(where, "criu", value, "expected a command, e.g. /usr/sbin/criu or '/opt/criu/run criu'")
    return argv


def peer_address(config: Config, name: str) -> HostPort | None:
    """The cache address of node `name` from the peers map, or None if it is not there."""
    return dict(config.peers).get(name)


def _choice(value: Any, key: str, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise _fail(where, key, value, "expected one of " + ", ".join(choices))
    return value


def _host_port(value: Any, key: str, where: str, *, required_port: bool) -> HostPort | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(where, key, value, "expected host:port, e.g. 10.0.0.2:9996 or [fd00::2]:9996")
    try:
        return parse_host_port(value, default_port=None if required_port else DEFAULT_PORT)
    except ValueError as exc:
        raise _fail(where, key, value, f"{exc}; expected host:port, e.g. 10.0.0.2:9996") from None


def _allow(value: Any, where: str) -> tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
                                              tuple[str, ...]]:
    """Addresses and CIDRs, and node names (which only a TLS certificate can prove)."""
    if not isinstance(value, list):
        raise _fail(where, "cache.allow", value, "expected a list of addresses, CIDRs or node names")
    networks, nodes = [], []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
            continue
        except ValueError:
            pass
        if set(str(item)) <= _ADDRESS_CHARS or not _valid_node_name(item) or " " in item:
            raise _fail(where, "cache.allow", item, "expected an IP address, a CIDR like 10.0.0.0/24 "
                        "or a node name") from None
        nodes.append(item)
    return tuple(networks), tuple(nodes)


def require_proxy_peer(config: Config) -> HostPort:
    if config.proxy.peer is None:
        raise ConfigError(f"{config.source}: key 'proxy.peer' is missing: the proxy needs the "
                          f"cache's address as host:port, e.g. 10.0.0.2:9996")
    return config.proxy.peer


def is_allowed(config: Config, address: str, node: str | None = None) -> bool:
    """May this proxy send checkpoints? `node` is the name its certificate proves (None
    before the handshake, or with TLS off: node names then never match)."""
    if node is not None and node in config.cache.allow_nodes:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in config.cache.allow)
