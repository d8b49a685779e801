"""`imgmig migrate --files PATH...`: files that travel with the process.

They are packed into one tar image (FILES_IMAGE) in a memfd, handed to the proxy with
the migration's `expect`, and sent as the checkpoint's first image over the same link.
`imgmig restore` takes that image from the cache and unpacks it, at the same absolute
paths, before CRIU starts. Bounded in size; member names are checked before anything is
written (relative, no `..`, printable), and tarfile's "data" filter refuses links out of
the tree, device files and set-uid bits.
"""

from __future__ import annotations

import fcntl
import io
import os
import tarfile
from pathlib import Path

from imgmig.commands.common import EXIT_USAGE, CommandError

FILES_LIMIT = 1 << 30  # bytes of file data one migration may carry
MAX_MEMBER_NAME = 4096
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def pack(paths: list[str], limit: int = FILES_LIMIT) -> tuple[int, int]:
    """A sealed memfd holding a tar of `paths` (absolute, stored without the leading /),
    and its size. CommandError (usage) if a path is missing or the total is too large."""
    targets = [Path(path).absolute() for path in paths]
    total = 0
    for target in targets:
        if not target.exists():
            raise CommandError(f"--files: {target} does not exist", EXIT_USAGE)
        total += _size(target)
    if total > limit:
        raise CommandError(f"--files: {total} bytes is more than the {limit}-byte limit; carry less, or "
                           f"copy the large files another way", EXIT_USAGE)
    fd = os.memfd_create("imgmig:files", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    with os.fdopen(os.dup(fd), "wb") as out, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for target in targets:
            tar.add(str(target), arcname=str(target).lstrip("/"))
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    return fd, os.fstat(fd).st_size


def _size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    return sum((Path(root) / name).lstat().st_size for root, _, names in os.walk(path) for name in names)


def unpack(fd: int, root: Path = Path("/")) -> list[str]:
    """Unpack the files image under `root`; the names unpacked. Every member is checked
    first (CommandError, nothing written): regular files and directories only, names
    relative without `..`. Modes keep their permission bits only (no set-uid)."""
    data = os.pread(fd, os.fstat(fd).st_size, 0)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        members = tar.getmembers()
        for member in members:
            _check(member)
        for member in members:
            _extract(tar, member, root / member.name)
    return [member.name for member in members]


def _check(member: tarfile.TarInfo) -> None:
    name = member.name
    parts = Path(name).parts
    if (not name or name.startswith("/") or ".." in parts or len(name) > MAX_MEMBER_NAME
            or not name.isprintable()):
        raise CommandError(f"the files image holds a refused name {name[:80]!r}; nothing restored")
    if not (member.isfile() or member.isdir()):
        raise CommandError(f"the files image holds {name!r}, which is neither a file nor a directory "
                           f"(links and devices are refused); nothing restored")


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(member)
        assert source is not None
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
    os.chown(target, member.uid, member.gid, follow_symlinks=False)
    os.chmod(target, member.mode & 0o777)
    os.utime(target, (member.mtime, member.mtime))
