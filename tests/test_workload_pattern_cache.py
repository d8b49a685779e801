"""The workload's pattern cache (the benchmark's tmpfs) keeps the pattern's SHA-256 beside
it, so that a fresh workload reading the cached pattern need not hash it again; the
digest it reports must still be the one of its memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

from testbed import workload

MIB = 1 << 20


def test_the_cached_digest_is_the_patterns(tmp_path: Path) -> None:
    first, second = bytearray(2 * MIB), bytearray(2 * MIB)
    made = workload.fill_cached(first, 7, tmp_path)
    read = workload.fill_cached(second, 7, tmp_path)
    assert first == second
    assert made == read == hashlib.sha256(second).hexdigest() == workload.expected_digest(2, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"workload-pattern-7-{2 * MIB}",
                                                           f"workload-pattern-7-{2 * MIB}.sha256"]


def test_a_pattern_without_its_digest_is_made_again(tmp_path: Path) -> None:
    """A cache from before the digest was kept (or a half-written one) is not trusted."""
    (tmp_path / f"workload-pattern-7-{MIB}").write_bytes(b"\0" * MIB)
    buf = bytearray(MIB)
    assert workload.fill_cached(buf, 7, tmp_path) == workload.expected_digest(1, 7)
    assert (tmp_path / f"workload-pattern-7-{MIB}").read_bytes() == bytes(buf)
