"""`imgmig restore`: wait for a checkpoint on this node's cache, claim it, restore it.

How a restore picks its checkpoint: it claims one through the daemon's control socket,
`--id ID` exactly that one, `--from NODE` the oldest from that node, neither the oldest
of any node. A claimed checkpoint is reserved for this restore: a bare
`criu restore --stream -D <images_dir>` on streamer-serve.sock skips it. CRIU is then
pointed at a private socket this command listens on; its connection is handed to the
daemon (SCM_RIGHTS) with the claim, so it reads exactly the claimed checkpoint.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgmig import config
from imgmig.commands.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    CommandError,
    ControlClient,
    Declined,
    control_path,
    criu_command,
    criu_tail,
    load_config,
)
from imgmig.commands.files import unpack as unpack_files
from imgmig.commands.lazy import restore_lazy
from imgmig.roles.endpoints import SERVE_SOCKET
from imgmig.roles.status import human_bytes

CLAIM_POLL = 0.2
DOORBELL_WAIT = 30.0  # seconds for the ring's id, and then for that checkpoint to be claimable
MAX_RING = 256
CONNECT_WAIT = 30.0  # for criu restore to connect to our socket


@dataclass
class Restored:
    pid: int | None
    error: str = ""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("restore", help="wait for a checkpoint on this node and restore it with CRIU",
                                 description="Claims a checkpoint (--id, else the oldest --from NODE, else the "
                                             "oldest), runs criu restore --stream -d on it and confirms to the "
                                             "daemon that the process runs. Arguments after -- go to criu.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--from", dest="origin", metavar="NODE", help="the oldest checkpoint from this node")
    which.add_argument("--id", help="exactly this checkpoint")
    parser.add_argument("--rollback", action="store_true",
                        help="restore from this node's proxy (the source's own copy) instead of its cache")
    parser.add_argument("--config", default=config.DEFAULT_PATH, help="YAML config file (%(default)s)")
    parser.add_argument("--criu", metavar="PATH", help="CRIU command (default: `criu:` in the config, else criu)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up waiting for a checkpoint after this long (default: wait)")
    parser.add_argument("--files-root", metavar="DIR", default="/", type=Path,
                        help="unpack files carried by `migrate --files` under DIR instead of / (a chroot)")
    parser.add_argument("--lazy", action="store_true",
                        help="expect a lazy (post-copy) checkpoint: restore it at once, its memory follows from the "
                             "source; waits until every page arrived (a lazy checkpoint is restored so without it "
                             "too, as by the doorbell)")
    parser.add_argument("--doorbell", action="store_true",
                        help="for imgmig-restore@.service: restore the checkpoint whose id the cache wrote to stdin")
    parser.set_defaults(run=restore_command)


def restore_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    criu = criu_command(args.criu, cfg)
    role = "proxy" if args.rollback else "cache"
    path = control_path(cfg, role)
    if args.doorbell:
        args.id = read_doorbell()
        args.timeout = DOORBELL_WAIT if args.timeout is None else args.timeout
    with ControlClient(path, role) as client:
        try:
            checkpoint = wait_and_claim(client, path, role, args.id, args.origin, args.timeout)
        except Declined as exc:
            if not args.doorbell:
                raise
            print(f"nothing to do: {exc}")  # restored by hand already, or being restored
            return 0
        if not args.rollback:  # on the source node the files never left
            _unpack_files(client, checkpoint, args.files_root)
        if args.lazy or (not args.rollback and _is_lazy(client, checkpoint)):
            return restore_lazy_command(client, checkpoint, criu, args.criu_options)
        workdir = Path(tempfile.mkdtemp(prefix="imgmig-restore-"))
        print(f"restoring checkpoint {checkpoint} (CRIU logs in {workdir})", flush=True)
        result = restore_claimed(client, checkpoint, criu, args.criu_options, workdir)
    if result.pid is None:
        raise CommandError(f"restore of checkpoint {checkpoint} failed: {result.error}", EXIT_FAILED)
    print(f"checkpoint {checkpoint} restored: running as pid {result.pid}")
    return 0


def restore_lazy_command(client: ControlClient, checkpoint: str, criu: list[str], options: list[str]) -> int:
    """Restore a lazy checkpoint, then wait for its background copy (commands/lazy.py)."""
    started = time.monotonic()
    restore = restore_lazy(client, checkpoint, criu, options=options)
    print(f"checkpoint {checkpoint} restored lazily: running as pid {restore.pid} after "
          f"{time.monotonic() - started:.2f} s; its memory follows from the source (CRIU logs in "
          f"{restore.images_dir})", flush=True)
    moved = restore.finish(client)
    print(f"checkpoint {checkpoint}: every page arrived ({human_bytes(moved['pages_bytes'])} in "
          f"{time.monotonic() - started:.1f} s); running as pid {restore.pid}")
    return 0


def _is_lazy(client: ControlClient, checkpoint: str) -> bool:
    """A lazy checkpoint (its memory follows from the source) is restored lazily whether or
    not --lazy was given: the doorbell's restore cannot know in advance."""
    if not client.request("lazy_check", timeout=None, id=checkpoint)["lazy"]:
        return False
    print(f"checkpoint {checkpoint} is a lazy (post-copy) one: restoring it lazily", flush=True)
    return True


def read_doorbell() -> str:
    """The checkpoint id the cache wrote on stdin (the socket imgmig-restore.socket accepted)."""
    ready, _, _ = select.select([0], [], [], DOORBELL_WAIT)
    data = os.read(0, MAX_RING + 1) if ready else b""
    text = data.decode("utf-8", "replace").strip()
    if not data.endswith(b"\n") or not text or len(data) > MAX_RING or not text.isprintable() or " " in text:
        raise CommandError(f"the doorbell on stdin did not carry one checkpoint id (got {data[:60]!r}); "
                           f"nothing restored", EXIT_USAGE)
    return text


def _unpack_files(client: ControlClient, checkpoint: str, root: Path) -> None:
    """The files that travel with the process, in place before CRIU starts."""
    reply = client.request("files", timeout=None, id=checkpoint)
    if reply["files"] is None:
        return
    fd = client.take_fd()
    if fd is None:
        raise CommandError(f"the cache announced files for checkpoint {checkpoint} but passed none")
    try:
        names = unpack_files(fd, root)
    finally:
        os.close(fd)
    print(f"unpacked {len(names)} carried entries under {root} ({reply['files']} bytes)", flush=True)


def wait_and_claim(client: ControlClient, path: Path, role: str, wanted: str | None, origin: str | None,
                   timeout: float | None) -> str:
    """Claim a matching checkpoint, printing what arrives while none matches yet."""
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = ""
    while True:
        reply = client.request("claim", **({"id": wanted} if wanted else {}), **({"from": origin} if origin else {}))
        if reply["claimed"] is not None:
            return str(reply["claimed"])
        line = _waiting_line(path, role, wanted, origin)
        if line != shown:
            print(line, flush=True)
            shown = line
        if deadline is not None and time.monotonic() > deadline:
            raise CommandError(f"no matching checkpoint arrived within {timeout:.0f} s; nothing restored")
        time.sleep(CLAIM_POLL)


def _waiting_line(path: Path, role: str, wanted: str | None, origin: str | None) -> str:
    what = f"checkpoint {wanted}" if wanted else f"a checkpoint from {origin}" if origin else "a checkpoint"
    with ControlClient(path, role) as status_client:
        held = status_client.request("list")["checkpoints"]
    arriving = [c for c in held if c["state"] == "receiving"]
    if not arriving:
        return f"waiting for {what} on the {role}"
    sizes = ", ".join(f"{c['id']} from {c['origin']}: {human_bytes(c['bytes'])}" for c in arriving)
    return f"waiting for {what} on the {role}; arriving: {sizes}"


def restore_claimed(client: ControlClient, checkpoint: str, criu: list[str], options: list[str],
                    workdir: Path) -> Restored:
    """Run `criu restore --stream -d` on a private socket and have the daemon serve the
    claimed checkpoint on it; then tell the daemon whether the process runs."""
    sockdir = Path(tempfile.mkdtemp(prefix="imgmig-r-", dir="/tmp"))  # short: sun_path is 108 bytes
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    pidfile = workdir / "restore.pid"
    try:
        listener.bind(str(sockdir / SERVE_SOCKET))
        listener.listen(1)
        argv = [*criu, "restore", "--stream", "-D", str(sockdir), "-d", "--pidfile", str(pidfile),
                "-o", "restore.log", "-W", str(workdir), *options]
        with open(workdir / "restore.out", "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        result = _serve_and_wait(client, checkpoint, proc, listener, workdir)
    finally:
        listener.close()
        (sockdir / SERVE_SOCKET).unlink(missing_ok=True)
        os.rmdir(sockdir)
    if result.pid is None:
        client.request("confirm", id=checkpoint, running=False, detail=result.error)
    else:
        client.request("confirm", id=checkpoint, running=True, pid=result.pid)
    return result


def _serve_and_wait(client: ControlClient, checkpoint: str, proc: subprocess.Popen[bytes],
                    listener: socket.socket, workdir: Path) -> Restored:
    conn = _accept(listener, proc)
    if conn is None:
        code = proc.wait()
        return Restored(None, f"criu restore exited with {code} before reading any image: "
                              f"{criu_tail(workdir, 'restore')}")
    served: dict[str, Any] = {}
    failure: list[str] = []

    def serve() -> None:
        try:
            served.update(client.request("serve", fd=conn.fileno(), timeout=None, id=checkpoint))
        except CommandError as exc:
            failure.append(str(exc))
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    code = proc.wait()
    thread.join()
    if code != 0:
        return Restored(None, f"`criu restore` exited with {code}: {criu_tail(workdir, 'restore')} "
                              f"(logs: {workdir})")
    if failure:
        return Restored(None, failure[0])
    try:
        pid = int((workdir / "restore.pid").read_text().strip())
    except (OSError, ValueError):
        return Restored(None, f"criu restore wrote no pid file in {workdir}")
    return Restored(pid)


def _accept(listener: socket.socket, proc: subprocess.Popen[bytes]) -> socket.socket | None:
    """CRIU's connection, or None if it exited (or took too long) without connecting."""
    listener.settimeout(0.1)
    deadline = time.monotonic() + CONNECT_WAIT
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.setblocking(True)
        return conn
    if proc.poll() is None:
        proc.kill()
    return None

