"""The per-file digest: what a node can compute, and how it falls back."""

import hashlib
import mmap
import os
import platform
import random

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


@pytest.mark.parametrize("size", [0, 1, 16, 17, 128, 129, 240, 241, 1024, 65_536, (1 << 20) + 7])
def test_the_dispatched_xxh3_gives_python_xxhash_digest_in_any_chunking(size):
    data = random.Random(size).randbytes(size)
    reference = xxhash.xxh3_128(data).digest()
    for seed in range(3):
        cuts = sorted(random.Random(seed).sample(range(size + 1), min(size + 1, 5)))
        hasher = digest.DispatchedXxh3()
        for start, end in zip([0, *cuts], [*cuts, size], strict=True):
            hasher.update(memoryview(data)[start:end])
        assert hasher.digest() == reference


def test_the_dispatched_xxh3_reads_read_only_mappings_and_bytearrays():
    data = random.Random(7).randbytes(3 * mmap.PAGESIZE)
    fd = os.memfd_create("digest-test")
    try:
        os.write(fd, data)
        with mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ) as mapped:
            view = memoryview(mapped)
            hasher = digest.DispatchedXxh3()
            hasher.update(view[5:])
            view.release()
        buffered = digest.DispatchedXxh3()
        buffered.update(bytearray(data[5:]))
    finally:
        os.close(fd)
    assert hasher.digest() == buffered.digest() == xxhash.xxh3_128(data[5:]).digest()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="libxxhash has its CPU dispatch on x86-64 only")
def test_xxh3_uses_libxxhash_dispatch_on_x86_64():
    assert digest.FACTORIES[wire.Digest.XXH3_128] is digest.DispatchedXxh3


def test_xxh3_falls_back_to_python_xxhash_without_the_dispatch(monkeypatch):
    monkeypatch.setattr(digest, "_LIB", None)
    assert digest._factories()[wire.Digest.XXH3_128] is xxhash.xxh3_128


def test_usable_keeps_what_this_node_can_compute():
    assert digest.usable(wire.Digest.XXH3_128) is wire.Digest.XXH3_128
    assert digest.usable(wire.Digest.SHA256) is wire.Digest.SHA256


def test_usable_falls_back_to_sha256_without_xxhash(monkeypatch):
    monkeypatch.delitem(digest.FACTORIES, wire.Digest.XXH3_128)
    assert digest.usable(wire.Digest.XXH3_128) is wire.Digest.SHA256


def test_hello_carries_the_digest_byte_by_byte():
    frame = wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, "a", wire.Digest.XXH3_128))
    assert frame[4:] == b"\x01IMGMIG\x00\x04\x01\x02\x00\x01a\x00\x00" + b"\x00" * 16
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
