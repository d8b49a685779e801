"""Mutual TLS between proxy and cache: every way in that must be refused is refused.

Each refusal case asserts one ERROR line on the refusing side, nothing stored in the
cache (no image memfd open in it), and the daemons still moving the next real
checkpoint. The daemons are real subprocesses with the session PKI made by
`imgmig pki` (conftest.py); the peers misbehaving here are real TLS clients.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import PYTHON, REPO, Pair, Pki, wait_until
from test_daemons_sim import (
    assert_restores,
    checkpoint_images,
    dump,
    good_checkpoint,
    one_error,
    read_events,
    restore,
    restore_order,
)

from imgmig import criu_sim
from imgmig.commands.pki import init_ca, issue_node
from imgmig.protocol import peer_wire as wire

HANDSHAKE = 2  # link.handshake_timeout in these tests, seconds
MEMFD_PREFIX = "/memfd:imgmig:"


@pytest.fixture(scope="session")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another cluster's CA, with a certificate for a node called fake-proxy."""
    directory = tmp_path_factory.mktemp("other-ca")
    init_ca(directory)
    issue_node(directory, "fake-proxy", ips=["127.0.0.1"])
    return Pki(directory)


@pytest.fixture(scope="session")
def expired(pki: Pki) -> str:
    """A certificate from the right CA that expired yesterday."""
    issue_node(pki.dir, "old-node", days=30, not_before=datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
               - datetime.timedelta(days=31))
    return "old-node"


def held_images(pair: Pair) -> list[str]:
    """The image memfds the cache process holds, from /proc: what it stores, whatever it logs."""
    fd_dir = Path(f"/proc/{pair.cache.process.pid}/fd")
    names = []
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(MEMFD_PREFIX):
            names.append(target)
    return names


def start(daemons, **options: object) -> Pair:
    pair = daemons(handshake_timeout=HANDSHAKE, **options)
    pair.set_marks()
    return pair


def connect(pair: Pair) -> socket.socket:
    return socket.create_connection(("127.0.0.1", pair.port), timeout=30)


def tls_connect(pair: Pair, context: ssl.SSLContext) -> ssl.SSLSocket:
    return context.wrap_socket(connect(pair))


def hello(node: str, auth: wire.Auth = wire.Auth.TLS) -> bytes:
    return wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, node, wire.Digest.SHA256, auth))


def until_closed(sock: socket.socket) -> None:
    """Read until the cache drops the connection (TLS alerts and resets count as dropped)."""
    with contextlib.suppress(ssl.SSLError, OSError):
        read_events(sock)
    sock.close()


def refused_and_still_serving(pair: Pair, pattern: str, tag: str) -> str:
    line = one_error(pair.cache_log, r"connection from .* refused: " + pattern)
    assert held_images(pair) == [], "a refused peer must not get anything stored"
    good_checkpoint(pair, tag)
    assert pair.cache_log.errors() == [line], "the real checkpoint must go through without errors"
    return line


# ---- who may connect -----------------------------------------------------------------------

def test_no_client_certificate(daemons, pki):
    pair = start(daemons)
    until_closed(tls_connect(pair, pki.client(node="")))
    refused_and_still_serving(pair, r"it sent no client certificate", "after-no-cert")


def test_certificate_from_another_ca(daemons, pki, stranger):
    pair = start(daemons)
    context = stranger.client("fake-proxy", ca=pki.ca)  # trusts our cache, presents a stranger's cert
    until_closed(tls_connect(pair, context))
    refused_and_still_serving(pair, r"its certificate was refused: (unable to get local issuer|certificate verify)",
                              "after-stranger")


def test_valid_certificate_of_a_node_not_allowed(daemons, pki):
    pair = start(daemons, allow="[test-node]")  # node names only: every proxy must prove its node
    sock = tls_connect(pair, pki.client("other-node"))
    sock.sendall(hello("other-node"))
    events = read_events(sock)
    sock.close()
    assert [type(event) for event in events] == [wire.Error] and events[0].code == wire.ErrorCode.REFUSED
    line = refused_and_still_serving(pair, r"not in cache\.allow", "after-not-allowed")
    assert "node other-node (127.0.0.1)" in line


def test_expired_certificate(daemons, pki, expired):
    pair = start(daemons)
    until_closed(tls_connect(pair, pki.client(expired)))
    refused_and_still_serving(pair, r"its certificate was refused: certificate has expired", "after-expired")


def test_plaintext_to_a_tls_port(daemons):
    pair = start(daemons)
    with connect(pair) as sock:
        sock.sendall(hello("test-node", wire.Auth.NONE) + wire.encode_checkpoint_begin("test-node-x-1"))
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b"", "the cache must not answer a plaintext peer"
    refused_and_still_serving(pair, r"it does not speak TLS", "after-plaintext")


def test_garbage_that_starts_like_tls(daemons):
    pair = start(daemons)
    with connect(pair) as sock:
        sock.sendall(b"\x16" + b"\xff" * 64)
        with contextlib.suppress(ConnectionResetError):
            sock.recv(100)
    refused_and_still_serving(pair, r"TLS handshake failed: ", "after-garbage")


@pytest.mark.parametrize("node, auth, reason", [
    ("test-node", wire.Auth.TLS, r"HELLO says node 'test-node' but its certificate names 'fake-proxy'"),
    ("fake-proxy", wire.Auth.NONE, r"HELLO offers auth method 0 on a TLS link; .*no downgrade"),
])
def test_hello_must_match_the_certificate(daemons, pki, node, auth, reason):
    pair = start(daemons)
    sock = tls_connect(pair, pki.client("fake-proxy"))
    sock.sendall(hello(node, auth) + wire.encode_checkpoint_begin(f"{node}-20260101T000000-1"))
    events = read_events(sock)
    sock.close()
    assert [type(event) for event in events] == [wire.Error], events
    refused_and_still_serving(pair, reason, "after-hello")


def test_checkpoint_ids_belong_to_the_authenticated_node(daemons, pki):
    """fake-proxy may not take (or block) an id of test-node's."""
    pair = start(daemons)
    sock = tls_connect(pair, pki.client("fake-proxy"))
    sock.sendall(hello("fake-proxy"))
    read_events(sock, until=lambda event: isinstance(event, wire.Hello))
    sock.sendall(wire.encode_checkpoint_begin("test-node-20260101T000000-1"))
    events = read_events(sock)
    sock.close()
    assert [type(event) for event in events] == [wire.Error], events
    refused_and_still_serving(pair, r"checkpoint id 'test-node-20260101T000000-1' does not start with the "
                              r"sender's node name 'fake-proxy'", "after-id")


# ---- the proxy checks the cache ------------------------------------------------------------

def test_proxy_refuses_a_cache_that_names_another_node(daemons):
    """proxy.peer says other-node@...; the cache's certificate says test-node. The proxy
    refuses in one line, the cache stores nothing, and the checkpoint stays on the proxy,
    where a rollback restore still gets it."""
    pair = start(daemons, peer_node="other-node")
    images = checkpoint_images("wrong-cache")
    dump(pair.proxy_dir, images)
    line = one_error(pair.proxy_log, r"forwarding checkpoint .* failed: the cache at 127\.0\.0\.1:\d+ presents a "
                     r"certificate for node 'test-node', not 'other-node' as proxy\.peer says")
    assert "stays on this node" in line
    assert held_images(pair) == []
    assert pair.cache_log.errors() == []
    assert_restores(restore(pair.proxy_dir, restore_order(images)), images)
    pair.proxy_log.wait_for(r"restored from the proxy: 9 files served")


def test_proxy_names_the_cache_node_and_checkpoints_flow(daemons):
    pair = start(daemons, peer_node="test-node")
    good_checkpoint(pair, "named-peer")
    pair.proxy_log.wait_for(r"forwarded to test-node \(127\.0\.0\.1:\d+\).*verified by the cache")


# ---- slow and dead peers -----------------------------------------------------------------

def test_stalled_handshake(daemons):
    pair = start(daemons)
    with connect(pair) as sock:
        began = time.monotonic()
        assert sock.recv(1) == b"", "the cache must drop a peer that never starts the handshake"
        assert HANDSHAKE - 0.5 < time.monotonic() - began < HANDSHAKE + 5
    refused_and_still_serving(pair, rf"no TLS handshake within {HANDSHAKE} s", "after-stall")


def _client_hello(context: ssl.SSLContext) -> bytes:
    """The bytes of a real TLS ClientHello, without a socket."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _trickle(sock: socket.socket, data: bytes) -> float:
    """Send one byte a second until the peer drops us; the seconds it took."""
    began = time.monotonic()
    try:
        for byte in data:
            sock.send(bytes([byte]))
            time.sleep(1)
    except OSError:
        pass
    else:
        pytest.fail("the cache kept reading a peer that trickles one byte a second")
    return time.monotonic() - began


def test_trickled_handshake_hits_the_total_deadline(daemons, pki):
    pair = start(daemons)
    with connect(pair) as sock:
        took = _trickle(sock, _client_hello(pki.client("fake-proxy")))
    assert took < HANDSHAKE + 5, f"dropped after {took:.0f} s, not within the {HANDSHAKE} s deadline"
    refused_and_still_serving(pair, rf"no TLS handshake from the proxy within {HANDSHAKE} s", "after-trickle")


def test_trickled_hello_hits_the_same_deadline(daemons, pki):
    """The deadline covers the handshake plus HELLO in total: a byte a second keeps no
    per-read timeout from firing, the total deadline fires anyway."""
    pair = start(daemons)
    sock = tls_connect(pair, pki.client("fake-proxy"))
    took = _trickle(sock, hello("fake-proxy"))
    sock.close()
    assert took < HANDSHAKE + 5, f"dropped after {took:.0f} s, not within the {HANDSHAKE} s deadline"
    refused_and_still_serving(pair, r"no HELLO within link\.handshake_timeout", "after-slow-hello")


# ---- reload ------------------------------------------------------------------------------

def _own_pki(pki: Pki, directory: Path) -> Pki:
    """A copy of the session CA and test-node's files, which a test may renew or break."""
    directory.mkdir()
    for name in ("ca.crt", "ca.key", "test-node.crt", "test-node.key"):
        (directory / name).write_bytes((pki.dir / name).read_bytes())
        os.chmod(directory / name, 0o600 if name.endswith(".key") else 0o644)
    return Pki(directory)


def test_reload_takes_a_renewed_certificate_without_dropping_checkpoints(daemons, pki, tmp_path):
    """SIGHUP (systemctl reload): new connections use the renewed certificate; a checkpoint
    already held is still restored."""
    own = _own_pki(pki, tmp_path / "own")
    pair = start(daemons, pki=own)
    held = checkpoint_images("held-over-reload")
    dump(pair.proxy_dir, held)
    pair.cache_log.wait_for(r"complete from test-node")
    before = own.cert("test-node").read_bytes()
    issue_node(own.dir, "test-node", ips=["127.0.0.1"])  # renewed: same key, new certificate
    renewed = own.cert("test-node").read_bytes()
    assert renewed != before
    pair.cache.process.send_signal(signal.SIGHUP)
    pair.cache_log.wait_for(r"TLS reloaded: certificate .* new connections use it")
    sock = tls_connect(pair, pki.client("fake-proxy"))
    assert sock.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(renewed.decode())
    sock.close()
    assert_restores(restore(pair.cache_dir, restore_order(held)), held)
    assert pair.cache_log.errors() == []


def test_reload_with_a_broken_certificate_keeps_the_old_one(daemons, pki, stranger, tmp_path):
    own = _own_pki(pki, tmp_path / "own")
    pair = start(daemons, pki=own)
    own.cert("test-node").write_bytes(stranger.cert("fake-proxy").read_bytes())
    pair.cache.process.send_signal(signal.SIGHUP)
    line = one_error(pair.cache_log, r"TLS reload failed, new connections keep the previous certificate: .*"
                     r"test-node\.crt")
    assert "not signed by the CA" in line
    pair.set_marks()
    good_checkpoint(pair, "after-bad-reload")
    assert pair.cache_log.errors() == []


# ---- start-up refusals -------------------------------------------------------------------

def _daemon(role: str, config: Path, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env["PYTHONPATH"] = str(REPO)
    prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if as_nobody else []
    return subprocess.run([*prefix, PYTHON, "-m", "imgmig", role, "--config", str(config)], capture_output=True,
                          text=True, env=env, timeout=30, cwd="/")


@pytest.mark.parametrize("problem, needle", [
    ("missing key", r"node.key: missing: this node's private key"),
    ("unreadable key", r"node.key: cannot read it \(Permission denied\)"),
    ("expired certificate", r"node.crt: the certificate expired on"),
    ("key of another node", r"node.key: this key does not match the certificate"),
    ("certificate of another node", r"node.crt: the certificate names node 'fake-proxy' but this node is"),
    ("certificate of another CA", r"node.crt: not signed by the CA in"),
])
def test_bad_key_material_is_one_line_and_exit_2(tmp_path, pki, stranger, expired, problem, needle):
    if problem == "unreadable key":
        # root reads anything: the daemon runs as nobody (as a DynamicUser service would), in a
        # directory nobody may enter, with a key only root may read
        tmp_path = Path(tempfile.mkdtemp(prefix="imgmig-tls-"))
        os.chmod(tmp_path, 0o755)
    try:
        _bad_key_material(tmp_path, pki, stranger, expired, problem, needle)
    finally:
        if problem == "unreadable key":
            shutil.rmtree(tmp_path)


def _bad_key_material(tmp_path: Path, pki: Pki, stranger: Pki, expired: str, problem: str, needle: str) -> None:
    tls = tmp_path / "tls"
    tls.mkdir(mode=0o755)
    cert, key = {"expired certificate": (pki.cert(expired), pki.key(expired)),
                 "key of another node": (pki.cert("test-node"), pki.key("fake-proxy")),
                 "certificate of another node": (pki.cert("fake-proxy"), pki.key("fake-proxy")),
                 "certificate of another CA": (stranger.cert("fake-proxy"), stranger.key("fake-proxy")),
                 }.get(problem, (pki.cert("test-node"), pki.key("test-node")))
    (tls / "ca.crt").write_bytes(pki.ca.read_bytes())
    (tls / "node.crt").write_bytes(cert.read_bytes())
    if problem != "missing key":
        (tls / "node.key").write_bytes(key.read_bytes())
        os.chmod(tls / "node.key", 0o600)
    config = tmp_path / "imgmig.yaml"
    config.write_text(f"node: {'fake-proxy' if problem == 'certificate of another CA' else 'test-node'}\n"
                      f"proxy: {{images_dir: {tmp_path}/proxy, peer: '127.0.0.1:1'}}\n"
                      f"cache: {{images_dir: {tmp_path}/cache, listen: '127.0.0.1:1'}}\n"
                      f"tls: {{ca: {tls / 'ca.crt'}, cert: {tls / 'node.crt'}, key: {tls / 'node.key'}}}\n")
    for role in ("cache", "proxy"):
        result = _daemon(role, config, as_nobody=problem == "unreadable key")
        assert result.returncode == 2, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert re.search(needle, lines[0]), lines[0]
        assert not (tmp_path / role).exists(), "nothing was started"


def test_key_is_read_from_the_systemd_credential(tmp_path, pki):
    """With $CREDENTIALS_DIRECTORY/node.key (LoadCredential=), the configured key path is
    never read: check-config reports the credential."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "node.key").write_bytes(pki.key("test-node").read_bytes())
    config = tmp_path / "imgmig.yaml"
    config.write_text(f"node: test-node\ntls: {{ca: {pki.ca}, cert: {pki.cert('test-node')}, "
                      f"key: {tmp_path / 'absent.key'}}}\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), CREDENTIALS_DIRECTORY=str(credentials))
    result = subprocess.run([PYTHON, "-m", "imgmig", "check-config", str(config)], capture_output=True, text=True,
                            env=env, timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert f"key {credentials / 'node.key'}" in result.stdout


def test_tls_off_warns_at_every_start(daemons):
    pair = daemons(tls=False)
    for daemon in pair.daemons.values():
        daemon.log.wait_for(r"WARNING TLS is off \(tls: off in .*\): any process .* only in a lab")
    good_checkpoint(pair, "lab")


# ---- pki ---------------------------------------------------------------------------------

def test_pki_writes_keys_0600_and_a_verifiable_chain(tmp_path):
    directory = tmp_path / "pki"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for argv in (["init", "--dir", str(directory)],
                 ["issue", "node-a", "--dir", str(directory), "--ip", "10.0.0.1", "--dns", "a.example"]):
        result = subprocess.run([PYTHON, "-m", "imgmig", "pki", *argv], capture_output=True, text=True, env=env,
                                timeout=60, cwd=REPO)
        assert result.returncode == 0, result.stderr
    for key in ("ca.key", "node-a.key"):
        assert (directory / key).stat().st_mode & 0o777 == 0o600
    context = ssl.create_default_context(cafile=str(directory / "ca.crt"))
    cert = ssl._ssl._test_decode_cert(str(directory / "node-a.crt"))  # type: ignore[attr-defined]
    assert cert["subjectAltName"] == (("DNS", "node-a"), ("DNS", "a.example"), ("IP Address", "10.0.0.1"))
    context.load_cert_chain(directory / "node-a.crt", directory / "node-a.key")  # key matches the cert
    again = subprocess.run([PYTHON, "-m", "imgmig", "pki", "init", "--dir", str(directory)], capture_output=True,
                           text=True, env=env, timeout=60, cwd=REPO)
    assert again.returncode == 2 and "already holds a CA" in again.stderr


# ---- a dead peer (two network namespaces, veth down) ---------------------------------------

DEAD_PEER = 4  # link.dead_peer_timeout in this test, seconds


def test_dead_peer_is_noticed_by_keepalive(tmp_path):
    from testbed import daemons as testbed_daemons
    from testbed import netns

    ok, reason = netns.available()
    if not ok:
        pytest.fail(f"network namespaces are needed for the dead-peer test: {reason}")
    with netns.two_nodes("imgmig-dead") as nodes, \
            testbed_daemons.proxy_and_cache(tmp_path, nodes.a, nodes.b, memory_limit="256MiB",
                                            dead_peer_timeout=DEAD_PEER) as pair:
        client = criu_sim.DumpClient(pair.proxy_dir)
        pages = client.open_image("pages-1.img")
        criu_sim.write_all(pages, os.urandom(4 << 20))
        pair.cache.wait_log("begins from node-a")
        wait_until(lambda: pair.cache.held_images(), 20, "the cache to hold the first bytes")
        netns.run_in(nodes.b.netns, ["ip", "link", "set", nodes.b.veth, "down"])
        began = time.monotonic()
        line = pair.cache.wait_log("lost mid-checkpoint", timeout=DEAD_PEER + 20)
        took = time.monotonic() - began
        assert took < DEAD_PEER + 6, f"the dead proxy was noticed after {took:.0f} s"
        assert "the link broke: no answer within link.dead_peer_timeout" in line
        assert "kept" in line and "for the proxy to resume" in line, line
        errors = [text for text in pair.cache.log().splitlines() if ": ERROR " in text]
        assert errors == [], errors
        # the proxy's end notices too, keeps the checkpoint and tries to resume it
        proxy_line = pair.proxy.wait_log("lost while it carried checkpoint", timeout=DEAD_PEER + 20)
        assert "reconnecting" in proxy_line
        os.close(pages)  # the dump fails meanwhile (no inventory.img)
        client.close()
        netns.run_in(nodes.b.netns, ["ip", "link", "set", nodes.b.veth, "up"])
        netns.run_in(nodes.a.netns, ["ip", "neigh", "flush", "dev", nodes.a.veth])  # forget the failed lookups
        wait_until(lambda: _reachable(nodes.a.netns, nodes.b.address), 30, "node B to be reachable again")
        # back, the proxy resumes only to say the dump failed; the cache drops its part
        pair.cache.wait_log("the proxy reports the dump did not finish", timeout=30)
        pair.cache.wait_released()
        images = checkpoint_images("after-dead-peer")
        result: dict[str, object] = {}
        reader = threading.Thread(target=lambda: result.update(got=restore(pair.cache_dir, restore_order(images))))
        reader.start()
        dump(pair.proxy_dir, images)
        reader.join(60)
        assert_restores(result["got"], images)  # type: ignore[arg-type]


def _reachable(netns_name: str, address: str) -> bool:
    """A TCP connection from node A to the cache's port opens (and closes at once: the
    cache takes it for a port probe)."""
    probe = f"import socket; socket.create_connection(({address!r}, 9996), timeout=1).close()"
    from testbed import netns
    return netns.run_in(netns_name, [PYTHON, "-c", probe], check=False, capture_output=True).returncode == 0
