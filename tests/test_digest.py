"""The per-file digest: what a node can compute, and how it falls back."""

import hashlib

import pytest
import xxhash

from imgmig import config
from imgmig.datapath import digest
from imgmig.protocol import peer_wire as wire


def test_new_hasher_computes_the_named_digest():
    for kind, reference in ((wire.Digest.SHA256, hashlib.sha256), (wire.Digest.XXH3_128, xxhash.xxh3_128)):
        hasher = digest.new_hasher(kind)
        hasher.update(b"abc")
        hasher.update(memoryview(b"def"))
        assert hasher.digest() == reference(b"abcdef").digest()


def test_usable_keeps_what_this_node_can_compute():
    assert digest.usable(wire.Digest.XXH3_128) is wire.Digest.XXH3_128
    assert digest.usable(wire.Digest.SHA256) is wire.Digest.SHA256


def test_usable_falls_back_to_sha256_without_xxhash(monkeypatch):
    monkeypatch.delitem(digest.FACTORIES, wire.Digest.XXH3_128)
    assert digest.usable(wire.Digest.XXH3_128) is wire.Digest.SHA256


def test_hello_carries_the_digest_byte_by_byte():
    frame = wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, "a", wire.Digest.XXH3_128))
    assert frame[4:] == b"\x01IMGMIG\x00\x03\x01\x02\x00\x01a\x00\x00" + b"\x00" * 16
    decoder = wire.FrameDecoder()
    decoder.feed(frame)
    assert decoder.next_event().digest is wire.Digest.XXH3_128


@pytest.mark.parametrize("value", ["md5", "XXH3", 1, ""])
def test_config_rejects_unknown_digest(value):
    with pytest.raises(config.ConfigError, match=r"key 'digest': value .* expected one of xxh3-128, sha256"):
        config.parse(f"digest: {value!r}\n" if isinstance(value, str) else f"digest: {value}\n")


def test_config_digest_default_and_choice():
    assert config.parse("").digest == "xxh3-128"
    assert config.parse("digest: sha256\n").digest == "sha256"
