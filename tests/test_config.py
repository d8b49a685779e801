"""The YAML config: parsing, validation, one-line errors; check-config and the daemons' refusal."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Pki

from imgmig import config
from imgmig.config import ConfigError, HostPort

REPO = Path(__file__).resolve().parents[1]
PYTHON = "/usr/bin/python3"

VALID = """\
node: node-a
transfer: store-and-forward
proxy:
  images_dir: /run/test/proxy
  peer: 10.0.0.2:9000
cache:
  images_dir: /run/test/cache
  listen: "[::]:9001"
  allow: [10.0.0.0/24, "fd00::/8", 192.168.1.7]
memory:
  limit: 2GiB
"""


def test_valid_file(tmp_path):
    path = tmp_path / "imgmig.yaml"
    path.write_text(VALID)
    cfg = config.load(path)
    assert cfg.node == "node-a"
    assert cfg.transfer == "store-and-forward" and cfg.store_and_forward
    assert cfg.proxy.images_dir == Path("/run/test/proxy")
    assert cfg.proxy.peer == HostPort("10.0.0.2", 9000)
    assert cfg.cache.images_dir == Path("/run/test/cache")
    assert cfg.cache.listen == HostPort("::", 9001)
    assert cfg.cache.allow == (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/8"),
                               ipaddress.ip_network("192.168.1.7/32"))
    assert cfg.memory_limit == 2 << 30
    assert cfg.source == str(path)


def test_defaults():
    for text in ("", "{}", "# nothing\n"):
        cfg = config.parse(text)
        assert cfg.node == socket.gethostname()
        assert cfg.transfer == "streaming" and not cfg.store_and_forward
        assert cfg.proxy.images_dir == Path("/run/imgmig/proxy")
        assert cfg.proxy.peer is None
        assert cfg.cache.images_dir == Path("/run/imgmig/cache")
        assert cfg.cache.listen == HostPort("0.0.0.0", config.DEFAULT_PORT)
        assert cfg.cache.allow == (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
        assert cfg.memory_limit == int(config.total_memory_bytes() * 0.75)
        assert cfg.memory_reuse == 2 << 30


@pytest.mark.parametrize(("text", "reuse"), [("memory: {reuse: 256MiB}", 256 << 20), ("memory: {reuse: 0}", 0),
                                             ("memory: {reuse: off}", 0), ("memory: {reuse: '0'}", 0)])
def test_memory_reuse(text, reuse):
    assert config.parse(text).memory_reuse == reuse


def test_empty_sections_take_defaults():
    cfg = config.parse("proxy:\ncache:\nmemory:\n")
    assert cfg.proxy.images_dir == Path("/run/imgmig/proxy")
    assert cfg.cache.listen.port == config.DEFAULT_PORT


def test_tls_on_by_default_and_off_for_a_lab():
    assert config.parse("").tls == config.TlsConfig(Path("/etc/imgmig/tls/ca.crt"), Path("/etc/imgmig/tls/node.crt"),
                                                    Path("/etc/imgmig/tls/node.key"))
    assert config.parse("tls: {cert: /x/n.crt}").tls == config.TlsConfig(cert=Path("/x/n.crt"))
    assert config.parse("tls: off").tls is None
    assert config.parse("tls: 'off'").tls is None
    assert config.parse("link: {handshake_timeout: 2.5}").link == config.LinkConfig(2.5, 60)


def test_peer_may_name_the_cache_node():
    cfg = config.parse("proxy: {peer: 'node-b@10.0.0.2:9996'}")
    assert cfg.proxy.peer == HostPort("10.0.0.2", 9996) and cfg.proxy.peer_node == "node-b"
    cfg = config.parse("proxy: {peer: 'node-b@[fd00::2]:9996'}")
    assert cfg.proxy.peer == HostPort("fd00::2", 9996) and cfg.proxy.peer_node == "node-b"
    assert config.parse("proxy: {peer: '10.0.0.2:9996'}").proxy.peer_node is None


def test_allow_takes_node_names_which_only_a_certificate_proves():
    cfg = config.parse("cache: {allow: [node-a, 10.0.0.0/24]}")
    assert cfg.cache.allow_nodes == ("node-a",)
    assert cfg.cache.allow == (ipaddress.ip_network("10.0.0.0/24"),)
    assert config.is_allowed(cfg, "192.168.0.1", "node-a")
    assert not config.is_allowed(cfg, "192.168.0.1")
    assert not config.is_allowed(cfg, "192.168.0.1", "node-b")
    assert config.is_allowed(cfg, "10.0.0.7", "node-b")


def test_require_proxy_peer():
    with pytest.raises(ConfigError, match=r"proxy\.peer"):
        config.require_proxy_peer(config.parse(""))
    assert config.require_proxy_peer(config.parse("proxy: {peer: 'h:1'}")) == HostPort("h", 1)


BAD_VALUES = [
    ("node: ''", "node", "''"),
    ("node: 5", "node", "5"),
    ("node: [a]", "node", "['a']"),
    (f"node: {'n' * 65}", "node", "n" * 65),
    ('node: "a\\nb"', "node", "'a\\nb'"),
    ("transfer: fast", "transfer", "'fast'"),
    ("transfer: 1", "transfer", "1"),
    ("proxy: {images_dir: relative/dir}", "proxy.images_dir", "'relative/dir'"),
    ("proxy: {images_dir: 5}", "proxy.images_dir", "5"),
    ("proxy: {peer: 10.0.0.2}", "proxy.peer", "'10.0.0.2'"),
    ("proxy: {peer: '10.0.0.2:0'}", "proxy.peer", "'10.0.0.2:0'"),
    ("proxy: {peer: '10.0.0.2:65536'}", "proxy.peer", "'10.0.0.2:65536'"),
    ("proxy: {peer: '10.0.0.2:http'}", "proxy.peer", "'10.0.0.2:http'"),
    ("proxy: {peer: ':9996'}", "proxy.peer", "':9996'"),
    ("proxy: {peer: '::1:9996'}", "proxy.peer", "'::1:9996'"),
    ("proxy: {peer: '[::1]'}", "proxy.peer", "'[::1]'"),
    ("proxy: {peer: '[::1:9996'}", "proxy.peer", "'[::1:9996'"),
    ("proxy: {peer: '[::1]x9996'}", "proxy.peer", "'[::1]x9996'"),
    ("proxy: {peer: 9996}", "proxy.peer", "9996"),
    ("cache: {images_dir: ./x}", "cache.images_dir", "'./x'"),
    ("cache: {listen: '0.0.0.0:-1'}", "cache.listen", "'0.0.0.0:-1'"),
    ("cache: {listen: 'a:b:c'}", "cache.listen", "'a:b:c'"),
    ("cache: {listen: [1]}", "cache.listen", "[1]"),
    ("cache: {allow: 10.0.0.1}", "cache.allow", "'10.0.0.1'"),
    ("cache: {allow: [10.0.0.0/33]}", "cache.allow", "'10.0.0.0/33'"),
    ("cache: {allow: [10.0.0.300]}", "cache.allow", "'10.0.0.300'"),
    ("cache: {allow: ['two words']}", "cache.allow", "'two words'"),
    ("proxy: {peer: '@10.0.0.2:9996'}", "proxy.peer", "'@10.0.0.2:9996'"),
    ("proxy: {peer: 'node-b@10.0.0.2'}", "proxy.peer", "'10.0.0.2'"),
    ("tls: {ca: relative.crt}", "tls.ca", "'relative.crt'"),
    ("tls: {key: 5}", "tls.key", "5"),
    ("tls: on", "tls", "True"),
    ("link: {handshake_timeout: 0}", "link.handshake_timeout", "0"),
    ("link: {dead_peer_timeout: soon}", "link.dead_peer_timeout", "'soon'"),
    ("memory: {limit: lots}", "memory.limit", "'lots'"),
    ("memory: {limit: 0}", "memory.limit", "0"),
    ("memory: {limit: 1000}", "memory.limit", "1000"),
    ("memory: {limit: -5GiB}", "memory.limit", "'-5GiB'"),
    ("memory: {limit: 0%}", "memory.limit", "'0%'"),
    ("memory: {limit: 101%}", "memory.limit", "'101%'"),
    ("memory: {limit: abc%}", "memory.limit", "'abc%'"),
    ("memory: {limit: 8XiB}", "memory.limit", "'8XiB'"),
    ("memory: {limit: GiB}", "memory.limit", "'GiB'"),
    ("memory: {limit: true}", "memory.limit", "True"),
    ("memory: {limit: 1.5}", "memory.limit", "1.5"),
    ("memory: {limit: [1]}", "memory.limit", "[1]"),
    ("memory: {limit: 1e999GiB}", "memory.limit", "'1e999GiB'"),
    ("memory: {limit: nan%}", "memory.limit", "'nan%'"),
    ("memory: {reuse: lots}", "memory.reuse", "'lots'"),
    ("memory: {reuse: 1000}", "memory.reuse", "1000"),
    ("memory: {reuse: true}", "memory.reuse", "True"),
    ("max_files: 0", "max_files", "0"),
    ("max_files: many", "max_files", "'many'"),
    ("max_files: 1.5", "max_files", "1.5"),
    ("cache: {max_handshakes: 0}", "cache.max_handshakes", "0"),
    ("cache: {max_handshakes: true}", "cache.max_handshakes", "True"),
    ("cache: {max_connections_per_peer: -1}", "cache.max_connections_per_peer", "-1"),
    ("cache: {idle_timeout: 0}", "cache.idle_timeout", "0"),
    ("cache: {idle_timeout: 60s}", "cache.idle_timeout", "'60s'"),
    ("cache: {idle_timeout: .inf}", "cache.idle_timeout", "inf"),
    ("proxy: 5", "proxy", "5"),
    ("cache: [a]", "cache", "['a']"),
    ("memory: 8GiB", "memory", "'8GiB'"),
    ("- a\n- b", "top level", "['a', 'b']"),
]


@pytest.mark.parametrize("text, key, value", BAD_VALUES, ids=[t for t, _, _ in BAD_VALUES])
def test_bad_value_names_key_and_value(text, key, value):
    with pytest.raises(ConfigError) as info:
        config.parse(text, "/etc/x.yaml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("/etc/x.yaml: ")
    assert f"'{key}'" in message
    assert value in message


@pytest.mark.parametrize("text, key", [
    ("colour: blue", "colour"),
    ("proxy: {images_dir: /x, port: 5}", "proxy.port"),
    ("cache: {allowed: []}", "cache.allowed"),
    ("memory: {max: 1GiB}", "memory.max"),
    ("Node: x", "Node"),
])
def test_unknown_keys_rejected(text, key):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        config.parse(text)


@pytest.mark.parametrize("text, line", [
    ("node: a\nproxy:\n  peer: [unclosed\n", 4),
    ("node: a\n\tproxy: x\n", 2),
    ("node: a\nnode: 'x\n", 3),
    ("a: b: c\n", 1),
])
def test_broken_yaml_reports_line(text, line):
    with pytest.raises(ConfigError) as info:
        config.parse(text, "f.yaml")
    assert f"f.yaml: line {line}: not valid YAML" in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_python_tags_refused():
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.parse("node: !!python/object/apply:os.system ['true']")


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        config.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot read the config file"):
        config.load(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"node: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(bad)


@pytest.mark.parametrize("value, expected", [
    (1 << 20, 1 << 20),
    (5_000_000, 5_000_000),
    ("8GiB", 8 << 30),
    ("8 GiB", 8 << 30),
    ("512MiB", 512 << 20),
    ("512mib", 512 << 20),
    ("2GB", 2 * 10**9),
    ("1.5GiB", 3 << 29),
    ("1TiB", 1 << 40),
    ("4096KiB", 4 << 20),
    ("2000000", 2_000_000),
    ("2000000b", 2_000_000),
    ("50%", 50 << 20),
    ("75%", 75 << 20),
    ("100%", 100 << 20),
    ("12.5%", int((100 << 20) * 0.125)),
])
def test_sizes(value, expected):
    assert config.parse_size(value, 100 << 20) == expected


def test_limits_defaults_and_values():
    default = config.parse("")
    assert default.max_files == 100_000
    assert (default.cache.max_handshakes, default.cache.max_connections_per_peer, default.cache.idle_timeout) == \
        (16, 64, 60.0)
    cfg = config.parse("max_files: 500\ncache: {max_handshakes: 4, max_connections_per_peer: 2, idle_timeout: 2.5}")
    assert cfg.max_files == 500
    assert (cfg.cache.max_handshakes, cfg.cache.max_connections_per_peer, cfg.cache.idle_timeout) == (4, 2, 2.5)


def test_percent_limit_in_file_uses_ram():
    cfg = config.parse("memory: {limit: 50%}")
    assert cfg.memory_limit == config.total_memory_bytes() // 2


@pytest.mark.parametrize("text, expected", [
    ("10.0.0.2:9996", HostPort("10.0.0.2", 9996)),
    ("cache.example:1", HostPort("cache.example", 1)),
    ("[::1]:9996", HostPort("::1", 9996)),
    ("[fd00::2]:65535", HostPort("fd00::2", 65535)),
    (" 10.0.0.2:9996 ", HostPort("10.0.0.2", 9996)),
])
def test_host_port_forms(text, expected):
    assert config.parse_host_port(text) == expected


def test_host_port_default_port_and_str():
    assert config.parse_host_port("[::1]", default_port=7) == HostPort("::1", 7)
    assert config.parse_host_port("h", default_port=7) == HostPort("h", 7)
    assert str(HostPort("::1", 9996)) == "[::1]:9996"
    assert str(HostPort("10.0.0.1", 1)) == "10.0.0.1:1"
    cfg = config.parse("cache: {listen: '[::1]:9996'}\nproxy: {peer: '[::1]:9996'}")
    assert cfg.cache.listen == cfg.proxy.peer == HostPort("::1", 9996)
    assert config.parse("cache: {listen: 127.0.0.1}").cache.listen == HostPort("127.0.0.1", 9996)


def test_is_allowed():
    cfg = config.parse("cache: {allow: [10.0.0.0/24, '::1']}")
    assert config.is_allowed(cfg, "10.0.0.9")
    assert config.is_allowed(cfg, "::ffff:10.0.0.9")
    assert config.is_allowed(cfg, "::1")
    assert not config.is_allowed(cfg, "10.0.1.1")
    assert not config.is_allowed(cfg, "127.0.0.1")
    assert not config.is_allowed(cfg, "local")
    assert not config.is_allowed(config.parse("cache: {allow: []}"), "127.0.0.1")


# ---- the command line ----------------------------------------------------------------

def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NOTIFY_SOCKET", None)
    env.pop("LISTEN_FDS", None)
    return subprocess.run([PYTHON, "-m", "imgmig", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def test_check_config_valid(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(VALID + "tls: off\n")
    result = run("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{path}: valid" in result.stdout
    assert "10.0.0.2:9000" in result.stdout
    assert "tls: OFF" in result.stdout, "check-config must say that TLS is off"
    assert result.stderr == ""
    path.write_text(VALID.replace("allow: [", "allow: [node-b, ") + "tls: off\n")
    result = run("check-config", str(path))
    assert result.returncode == 0 and "with tls: off these entries never match" in result.stdout


def test_check_config_checks_the_tls_files(tmp_path, pki):
    path = tmp_path / "ok.yaml"
    tls = f"tls: {{ca: {pki.ca}, cert: {pki.cert('test-node')}, key: {pki.key('test-node')}}}\n"
    path.write_text(VALID.replace("node-a", "test-node") + tls)
    result = run("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "tls: on; node test-node" in result.stdout
    path.write_text(VALID + tls)
    result = run("check-config", str(path))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "names node 'test-node' but this node is 'node-a'" in result.stderr


@pytest.mark.parametrize("text, needle", [
    ("transfer: fast\n", "'transfer'"),
    ("node: a\n  bad: [\n", "line 2"),
    ("colour: x\n", "unknown key 'colour'"),
])
def test_check_config_invalid(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run("check-config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0] and str(path) in lines[0]


def test_check_config_missing_file(tmp_path):
    result = run("check-config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "cannot read" in result.stderr


def daemon_config(tmp_path: Path, extra: str = "", peer: str | None = "127.0.0.1:1", pki: Pki | None = None) -> Path:
    """A config for one daemon (node test-node), with the session PKI's files when given."""
    proxy_dir, cache_dir = tmp_path / "proxy", tmp_path / "cache"
    text = f"node: test-node\nproxy:\n  images_dir: {proxy_dir}\n"
    if pki is not None:
        extra += f"tls: {{ca: {pki.ca}, cert: {pki.cert('test-node')}, key: {pki.key('test-node')}}}\n"
    if peer is not None:
        text += f"  peer: '{peer}'\n"
    text += f"cache:\n  images_dir: {cache_dir}\n  listen: '127.0.0.1:1'\n" + extra
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def _port_in_use() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize("role, text, needle", [
    ("proxy", "memory: {limit: lots}\n", "'memory.limit'"),
    ("cache", "memory: {limit: lots}\n", "'memory.limit'"),
    ("cache", "transfer: [\n", "not valid YAML"),
    ("proxy", "bogus: 1\n", "unknown key 'bogus'"),
])
def test_daemon_refuses_bad_config(tmp_path, role, text, needle):
    path = daemon_config(tmp_path, text)
    result = run(role, "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert not (tmp_path / "proxy").exists() and not (tmp_path / "cache").exists(), "nothing was started"


def test_proxy_refuses_without_peer(tmp_path):
    result = run("proxy", "--config", str(daemon_config(tmp_path, peer=None)))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "'proxy.peer'" in result.stderr
    assert not (tmp_path / "proxy").exists()


def test_cache_refuses_port_in_use(tmp_path, pki):
    holder, port = _port_in_use()
    with holder:
        path = daemon_config(tmp_path, pki=pki)
        path.write_text(path.read_text().replace("127.0.0.1:1'", f"127.0.0.1:{port}'"))
        result = run("cache", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0]


def test_cache_refuses_unresolvable_listen_host(tmp_path, pki):
    path = daemon_config(tmp_path, pki=pki)
    path.write_text(path.read_text().replace("listen: '127.0.0.1:1'", "listen: 'no-such-host.invalid:9996'"))
    result = run("cache", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "no-such-host.invalid" in lines[0]


def test_daemon_refuses_images_dir_under_a_file(tmp_path, pki):
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = daemon_config(tmp_path, pki=pki)
    path.write_text(path.read_text().replace(str(tmp_path / "proxy"), str(blocker / "proxy")))
    result = run("proxy", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(blocker / "proxy") in lines[0]


def test_daemon_refuses_non_socket_in_place_of_socket(tmp_path, pki):
    (tmp_path / "proxy").mkdir()
    (tmp_path / "proxy" / "streamer-capture.sock").write_text("not a socket")
    result = run("proxy", "--config", str(daemon_config(tmp_path, pki=pki)))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "exists and is not a socket" in lines[0]


def test_help_and_version():
    result = run("--version")
    assert result.returncode == 0 and "imgmig" in result.stdout
    assert sys.version_info >= (3, 11)


def test_peers_map_and_criu_command() -> None:
    cfg = config.parse("peers:\n  node-c: 10.0.0.3:9997\n  node-d: '[fd00::4]'\ncriu: /opt/criu/run --quiet criu\n")
    assert dict(cfg.peers) == {"node-c": config.HostPort("10.0.0.3", 9997), "node-d": config.HostPort("fd00::4", 9996)}
    assert config.peer_address(cfg, "node-c") == config.HostPort("10.0.0.3", 9997)
    assert config.peer_address(cfg, "node-x") is None
    assert cfg.criu == ("/opt/criu/run", "--quiet", "criu")
    assert config.parse("").criu == ("criu",)
    with pytest.raises(config.ConfigError, match=r"key 'peers\.node-c'"):
        config.parse("peers:\n  node-c: 10.0.0.3:0\n")
    with pytest.raises(config.ConfigError, match="key 'peers'"):
        config.parse("peers: [a, b]\n")
    # the key is the node name its certificate must carry; `NAME@` may only repeat it
    assert config.peer_address(config.parse("peers:\n  node-c: node-c@10.0.0.3:9997\n"), "node-c") \
        == config.HostPort("10.0.0.3", 9997)
    with pytest.raises(config.ConfigError, match=r"key 'peers\.node-c'.*must be the key"):
        config.parse("peers:\n  node-c: node-d@10.0.0.3:9997\n")
    with pytest.raises(config.ConfigError, match="key 'criu'"):
        config.parse("criu: ''\n")


def test_migrate_mode():
    assert config.parse("node: a").migrate_mode == "copy"
    assert config.parse("migrate: {mode: lazy}").migrate_mode == "lazy"
    with pytest.raises(ConfigError, match=r"migrate\.mode"):
        config.parse("migrate: {mode: postcopy}")
