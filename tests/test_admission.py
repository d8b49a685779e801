"""The accept loop's admission caps, on real sockets but without a daemon."""

from __future__ import annotations

import logging
import socket

import pytest

from imgmig.roles.admission import Admission


@pytest.fixture
def conns():
    made: list[socket.socket] = []

    def make() -> socket.socket:
        left, right = socket.socketpair()
        made.extend((left, right))
        return left

    yield make
    for sock in made:
        sock.close()


def test_handshake_cap_counts_only_connections_before_hello(conns, caplog):
    admission = Admission(max_handshakes=2, max_per_peer=100, where="/etc/imgmig/imgmig.yaml")
    a, b, c = conns(), conns(), conns()
    assert admission.admit(a, "10.0.0.1") and admission.admit(b, "10.0.0.2")
    with caplog.at_level(logging.ERROR, logger="imgmig.roles.admission"):
        assert not admission.admit(c, "10.0.0.3")
    assert "2 connections are still in their handshake (cache.max_handshakes)" in caplog.text
    assert "/etc/imgmig/imgmig.yaml" in caplog.text
    admission.established(a)
    assert admission.admit(c, "10.0.0.3"), "an established connection frees its handshake slot"


def test_per_peer_cap_and_release(conns):
    admission = Admission(max_handshakes=100, max_per_peer=2, where="f")
    first, second, third, other = conns(), conns(), conns(), conns()
    assert admission.admit(first, "10.0.0.1") and admission.admit(second, "10.0.0.1")
    admission.established(first)
    admission.established(second)
    assert not admission.admit(third, "10.0.0.1"), "established connections still count per peer"
    assert admission.admit(other, "10.0.0.2"), "another peer has its own count"
    admission.release(first)
    assert admission.admit(third, "10.0.0.1")
    for sock in (second, third, other):
        admission.release(sock)
    assert not admission.per_peer and not admission.handshaking and not admission.peer_of


def test_refusals_are_logged_once_per_burst(conns, caplog):
    admission = Admission(max_handshakes=1, max_per_peer=1, where="f")
    assert admission.admit(conns(), "10.0.0.1")
    with caplog.at_level(logging.ERROR, logger="imgmig.roles.admission"):
        for _ in range(100):
            assert not admission.admit(conns(), "10.0.0.1")
    assert len(caplog.records) == 1
