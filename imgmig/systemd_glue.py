"""What imgmig needs from systemd: passed sockets, sd_notify and journald.

All of it degrades to nothing when the daemon is not run by systemd (no LISTEN_FDS,
no NOTIFY_SOCKET, no journal), so the same code serves the development mode.
"""

from __future__ import annotations

import logging
import os
import sys

try:
    from systemd import daemon as _sd_daemon
    from systemd import journal as _sd_journal
except ImportError:  # the Debian package depends on python3-systemd; dev runs may lack it
    _sd_daemon = None
    _sd_journal = None

CHECKPOINT_COMPLETE_ID = "8d3f1a7c6b2e4f09a5c4d3b2e1f0a9c8"
CHECKPOINT_RESTORED_ID = "5b0e3c9a2f4d4b8e9d1c7a6f3e2b1d40"
SD_LISTEN_FDS_START = 3


def listen_fds() -> list[int]:
    """The fds systemd passed (socket activation), cleared from the environment."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def notify(message: str) -> None:
    """sd_notify; a no-op outside systemd."""
    if _sd_daemon is not None and os.environ.get("NOTIFY_SOCKET"):
        _sd_daemon.notify(message)


def watchdog_interval() -> float | None:
    """Half of WatchdogSec, in seconds, when systemd asked for keep-alives."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def setup_logging(identifier: str, verbose: bool = False) -> None:
    """journald with structured fields under systemd, plain stderr lines otherwise."""
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if _sd_journal is not None and os.environ.get("JOURNAL_STREAM") and os.environ.get("INVOCATION_ID"):
        handler: logging.Handler = _sd_journal.JournalHandler(SYSLOG_IDENTIFIER=identifier)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{identifier}: %(levelname)s %(message)s"))
    root.addHandler(handler)
