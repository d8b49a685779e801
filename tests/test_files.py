"""`imgmig migrate --files`: packing into a sealed memfd, and unpacking with every member
checked before anything is written."""

from __future__ import annotations

import fcntl
import io
import os
import tarfile
from pathlib import Path

import pytest

from imgmig.commands import files
from imgmig.commands.common import CommandError


def tar_fd(members: list[tuple[tarfile.TarInfo, bytes]]) -> int:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    os.write(fd, buffer.getvalue())
    return fd


def member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def test_pack_and_unpack_round_trip(tmp_path: Path) -> None:
    (tmp_path / "src" / "d").mkdir(parents=True)
    (tmp_path / "src" / "d" / "f").write_bytes(b"x" * 1000)
    fd, size = files.pack([str(tmp_path / "src")])
    try:
        assert size == os.fstat(fd).st_size > 1000
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_GROW, "the proxy refuses an unsealed image"
        names = files.unpack(fd, tmp_path / "out")
    finally:
        os.close(fd)
    relative = str(tmp_path / "src").lstrip("/")
    assert f"{relative}/d/f" in names
    assert (tmp_path / "out" / relative / "d" / "f").read_bytes() == b"x" * 1000


def test_pack_refuses_missing_paths_and_too_much(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="does not exist") as missing:
        files.pack([str(tmp_path / "nope")])
    assert missing.value.status == 2
    (tmp_path / "big").write_bytes(b"y" * 100)
    with pytest.raises(CommandError, match="more than the 10-byte limit"):
        files.pack([str(tmp_path / "big")], limit=10)


@pytest.mark.parametrize(("bad", "reason"), [
    (member("../escape"), "refused name"),
    (member("/etc/evil"), "refused name"),
    (member("a/../../b"), "refused name"),
    (member("link", tarfile.SYMTYPE, linkname="/etc/passwd"), "neither a file nor a directory"),
    (member("hard", tarfile.LNKTYPE, linkname="ok"), "neither a file nor a directory"),
    (member("dev", tarfile.CHRTYPE), "neither a file nor a directory"),
    (member("bell\x07"), "refused name"),
])
def test_unpack_refuses_bad_members_and_writes_nothing(tmp_path: Path, bad: tarfile.TarInfo, reason: str) -> None:
    fd = tar_fd([(member("ok"), b"fine"), (bad, b"bad")])
    try:
        with pytest.raises(CommandError, match=reason):
            files.unpack(fd, tmp_path / "out")
    finally:
        os.close(fd)
    assert not (tmp_path / "out").exists(), "a refused image must leave nothing behind"


def test_unpack_drops_set_uid_bits(tmp_path: Path) -> None:
    fd = tar_fd([(member("tool", mode=0o4755, uid=os.getuid(), gid=os.getgid()), b"#!/bin/sh\n")])
    try:
        files.unpack(fd, tmp_path)
    finally:
        os.close(fd)
    assert (tmp_path / "tool").stat().st_mode & 0o7777 == 0o755
