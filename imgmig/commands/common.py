"""What the operator's commands share: the config, the daemons' control sockets, CRIU."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from imgmig import config
from imgmig.config import Config, ConfigError
from imgmig.protocol import control_wire as cw
from imgmig.roles.endpoints import CONTROL_SOCKET

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOST = 0, 1, 2, 3
CONNECT_TIMEOUT = 10.0
ROLES = ("proxy", "cache")


class CommandError(Exception):
    """Ends a command with one line on stderr and an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


class DaemonDown(CommandError):
    pass


class Declined(CommandError):
    """The daemon answered ok=false; the text is its reason."""


def say(message: str) -> None:
    print(f"imgmig: {message}", file=sys.stderr)


def load_config(path: str) -> Config:
    try:
        return config.load(path)
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


def control_path(cfg: Config, role: str) -> Path:
    images_dir = cfg.proxy.images_dir if role == "proxy" else cfg.cache.images_dir
    return images_dir / CONTROL_SOCKET


def start_hint(role: str) -> str:
    return f"systemctl start imgmig-{role}.socket (or run imgmig-{role} --config FILE)"


class ControlClient:
    """One connection to a daemon's control socket: request() sends one line, reads one."""

    def __init__(self, path: Path, role: str, timeout: float | None = CONNECT_TIMEOUT) -> None:
        self.path = path
        self.role = role
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.decoder = cw.LineDecoder(cw.MAX_REPLY)
        self.fds: list[int] = []  # passed with replies (the files op), for take_fd()
        try:
            self.sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise DaemonDown(f"imgmig-{role} is not running here (nothing listens on {path}); "
                             f"start it: {start_hint(role)}") from None
        except PermissionError:
            self.sock.close()
            raise CommandError(f"permission denied on {path}: the control socket is root's; run as root",
                               EXIT_USAGE) from None
        except OSError as exc:
            self.sock.close()
            raise DaemonDown(f"cannot reach imgmig-{role} on {path}: {exc.strerror}") from None

    def request(self, op: str, fd: int | None = None, timeout: float | None = CONNECT_TIMEOUT,
                **args: Any) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        line = cw.encode_request(op, **args)
        try:
            if fd is None:
                self.sock.sendall(line)
            else:
                socket.send_fds(self.sock, [line], [fd])
            return self._reply()
        except TimeoutError:
            raise CommandError(f"imgmig-{self.role} did not answer '{op}' within {timeout:.0f} s") from None
        except OSError as exc:
            raise DaemonDown(f"imgmig-{self.role} closed the control connection ({exc.strerror or exc}); "
                             f"check `journalctl -u imgmig-{self.role}`") from None

    def _reply(self) -> dict[str, Any]:
        while True:
            try:
                message = self.decoder.next_message()
                if message is not None:
                    reply = cw.decode_reply(message)
                    break
            except cw.ControlProtocolError as exc:
                raise CommandError(f"imgmig-{self.role} answered something unreadable: {exc}") from None
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, 1)
            self.fds.extend(fds)
            if not data:
                raise OSError("connection closed")
            self.decoder.feed(data)
        if not reply.ok:
            raise Declined(reply.error)
        return reply.body

    def take_fd(self) -> int | None:
        return self.fds.pop(0) if self.fds else None

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def query_all(cfg: Config, op: str) -> dict[str, dict[str, Any] | None]:
    """op's reply from each daemon of this node; None for a daemon that is not running."""
    replies: dict[str, dict[str, Any] | None] = {}
    for role in ROLES:
        try:
            with ControlClient(control_path(cfg, role), role) as client:
                replies[role] = client.request(op)
        except DaemonDown:
            replies[role] = None
    return replies


def nothing_running(cfg: Config) -> CommandError:
    return CommandError(f"no imgmig daemon runs on this node (nothing listens on {control_path(cfg, 'proxy')} "
                        f"or {control_path(cfg, 'cache')}); on a source node run: systemctl start "
                        f"imgmig-proxy.socket, on a destination: systemctl start imgmig-cache.socket")


def criu_command(option: str | None, cfg: Config) -> list[str]:
    """--criu (a path, or a command with arguments), else the config's `criu:`."""
    if option is None:
        argv = list(cfg.criu)
    else:
        try:
            argv = shlex.split(option)
        except ValueError as exc:
            raise CommandError(f"--criu {option!r}: {exc}", EXIT_USAGE) from None
        if not argv:
            raise CommandError("--criu is empty; give the path of criu", EXIT_USAGE)
    if os.sep not in argv[0] and shutil.which(argv[0]) is None:
        raise CommandError(f"CRIU not found: no {argv[0]!r} on PATH; install criu, or set `criu:` in the config "
                           f"or --criu PATH")
    return argv


def criu_check(criu: list[str]) -> None:
    try:
        done = subprocess.run([*criu, "check"], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandError(f"`{shlex.join(criu)} check` could not run: {exc}") from None
    if done.returncode != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        raise CommandError(f"`{shlex.join(criu)} check` failed: {lines[-1] if lines else 'no output'}; "
                           f"this kernel or CRIU cannot checkpoint (CRIU 4.x is needed)")


def criu_tail(workdir: Path, name: str, lines: int = 3) -> str:
    """The last lines CRIU wrote for run `name`: its -o log, else its stderr."""
    for path in (workdir / f"{name}.log", workdir / f"{name}.out"):
        with contextlib.suppress(OSError):
            text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
            if text:
                return " | ".join(text[-lines:])
    return "CRIU wrote nothing"

