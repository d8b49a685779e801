"""What imgmig needs from systemd: passed fds, sd_notify, the fd store and journald.

All of it degrades to nothing when the daemon is not run by systemd (no LISTEN_FDS,
no NOTIFY_SOCKET, no journal), so the same code serves the development mode.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass

try:
    from systemd import daemon as _sd_daemon
    from systemd import journal as _sd_journal
except ImportError:  # the Debian package depends on python3-systemd; dev runs may lack it
    _sd_daemon = None
    _sd_journal = None

log = logging.getLogger(__name__)

# journalctl MESSAGE_ID=... finds these events whatever their wording.
CHECKPOINT_COMPLETE_ID = "8d3f1a7c6b2e4f09a5c4d3b2e1f0a9c8"
CHECKPOINT_RESTORED_ID = "5b0e3c9a2f4d4b8e9d1c7a6f3e2b1d40"
CHECKPOINT_KEPT_ID = "c41d2e7a9b3f4e61a8d05c7b2f9e3a17"
SD_LISTEN_FDS_START = 3


@dataclass(frozen=True)
class PassedFds:
    """What systemd passed at start: listening sockets, and fds we put in its fd store."""
    sockets: list[int]
    stored: dict[str, int]


def passed_fds() -> PassedFds:
    """Socket activation and fd-store fds, told apart by what they are (fstat), not by order:
    systemd passes stored fds after the sockets but names only tell us which image is which."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return PassedFds([], {})
    count = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)  # not for our children
    sockets: list[int] = []
    stored: dict[str, int] = {}
    for index, fd in enumerate(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)):
        os.set_inheritable(fd, False)
        name = names[index] if index < len(names) else ""
        if stat.S_ISSOCK(os.fstat(fd).st_mode):
            sockets.append(fd)
        elif name in stored:  # the same name twice: keep one, the other is a stale duplicate
            os.close(fd)
        else:
            stored[name] = fd
    return PassedFds(sockets, stored)


def under_systemd() -> bool:
    return _sd_daemon is not None and bool(os.environ.get("NOTIFY_SOCKET"))


def notify(message: str, fds: Sequence[int] = ()) -> bool:
    """sd_notify, optionally with fds (FDSTORE=1); False when not under systemd or refused."""
    if not under_systemd():
        return False
    try:
        if fds:
            return bool(_sd_daemon.notify(message, fds=list(fds)))
        return bool(_sd_daemon.notify(message))  # python-systemd 235 rejects fds=None
    except OSError as exc:  # e.g. the notify socket vanished during shutdown
        log.debug("sd_notify failed: %s", exc)
        return False


def watchdog_interval() -> float | None:
    """Half of WatchdogSec, in seconds, when systemd asked for keep-alives."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class _JournalFields(logging.Filter):
    """Make every extra field journald-safe: UPPERCASE keys and str values."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key in [k for k in vars(record) if k.startswith("IMGMIG_")]:
            value = getattr(record, key)
            if not isinstance(value, str):
                setattr(record, key, str(value))
        return True


def journal_wanted() -> bool:
    """journald when systemd runs us with our stderr connected to the journal."""
    return (_sd_journal is not None and bool(os.environ.get("INVOCATION_ID"))
            and _stderr_is_journal(os.environ.get("JOURNAL_STREAM", "")))


def _stderr_is_journal(journal_stream: str) -> bool:
    device, _, inode = journal_stream.partition(":")
    if not device or not inode:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return str(st.st_dev) == device and str(st.st_ino) == inode


def setup_logging(identifier: str, verbose: bool = False) -> None:
    """journald with structured fields under systemd, plain stderr lines otherwise."""
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if journal_wanted():
        handler: logging.Handler = _sd_journal.JournalHandler(SYSLOG_IDENTIFIER=identifier)
        handler.addFilter(_JournalFields())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{identifier}: %(levelname)s %(message)s"))
    root.addHandler(handler)
