"""Lazy (post-copy) migration, the root-side steps of each node (docs/design.md, "Lazy migration").

Source (`dump_lazy`): `criu dump --lazy-pages` into a private directory, its page server
on one end of a socketpair (`--ps-socket`: nothing listens, not even on loopback, so no
other local process can read the process's memory); the other end goes to the proxy with
the dump's ticket (`lazy_source`), which marks the checkpoint lazy (`imgmig-lazy.json`).
Once the non-page images are written (CRIU says so on `--status-fd`), they go to the proxy
as that checkpoint. The dump exits once every page was fetched (the process is then gone
from the source), or fails and leaves the process running here.

Destination (`restore_lazy`): claim the checkpoint on the cache, take the right to
restore it, lay its images into a private tmpfs directory, start `criu lazy-pages` on one
end of a socketpair (`--ps-socket`: nothing listens, no other process can reach the
pages), hand the other end to the cache, which tunnels it to the source's page server
over the checkpoint's link, then `criu restore --lazy-pages -d`.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgmig.commands.common import CommandError, ControlClient, criu_tail
from imgmig.datapath.stream_client import DumpClient
from imgmig.roles.endpoints import CAPTURE_SOCKET

READY_WAIT = 60.0   # for the dump to write its images and serve its pages
TUNNEL_END_WAIT = 15.0  # for the cache to answer the tunnel op once lazy-pages is gone
LAZY_SOCKET = "lazy-pages.socket"
RESTORE_PIDFILE = "restore.pid"
LAST_IMAGE = "inventory.img"  # CRIU writes it last; the proxy takes a checkpoint without it as failed
PRIVATE_PARENT = Path("/run")  # tmpfs, root only


def private_dir(prefix: str, parent: Path = PRIVATE_PARENT) -> Path:
    """A fresh directory only root can enter, on tmpfs where /run is."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent if parent.is_dir() else None))


# ---- the source ---------------------------------------------------------------------------

@dataclass
class LazyDump:
    proc: subprocess.Popen[bytes]
    images_dir: Path
    checkpoint: str
    page_server: socket.socket  # our copy of the proxy's end: a proxy killed does not end the stream
    frozen_at: float
    handed_at: float = 0.0   # the checkpoint was handed to the proxy

    def wait(self, timeout: float | None = None) -> int:
        """The dump's exit status: 0 once every page went (the process is gone from here)."""
        code = self.proc.wait(timeout)
        self.page_server.close()
        return code

    def abort(self) -> int:
        """The proxy is gone mid-copy: its end of the page server's socket no longer moves
        pages, and ours keeps the stream from ending cleanly. Killing the dump releases the
        process, which runs on here with its memory untouched (CRIU's parasite is gone by
        now and the pages were only read)."""
        self.proc.kill()
        return self.wait()

    def tail(self) -> str:
        return criu_tail(self.images_dir, "dump")


def dump_lazy(criu: list[str], pid: int, proxy: ControlClient, proxy_images_dir: Path, *, ticket: int | None = None,
              images_dir: Path | None = None, options: list[str] | None = None) -> LazyDump:
    """Dump `pid` lazily and hand its non-page images to the proxy; the dump keeps serving
    pages on a socketpair whose other end the proxy holds. `ticket`: the dump announced
    with `expect` on `proxy` (else announced here); `proxy` must stay open until the dump ends."""
    if ticket is None:
        ticket = int(proxy.request("expect")["ticket"])
    images_dir = images_dir or private_dir("imgmig-lazy-dump-")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        try:
            proxy.request("lazy_source", ticket=ticket, fd=ours.fileno())
        except CommandError:
            ours.close()
            raise
        ready, status = os.pipe()
        frozen_at = time.monotonic()
        argv = [*criu, "dump", "-t", str(pid), "-D", str(images_dir), "--lazy-pages", "--ps-socket",
                str(theirs.fileno()), "--status-fd", str(status), "-o", "dump.log", "-W", str(images_dir),
                *(options or [])]
        with open(images_dir / "dump.out", "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    pass_fds=[theirs.fileno(), status])
        os.close(status)
    dump = LazyDump(proc, images_dir, "", ours, frozen_at)
    try:
        _await_page_server(dump, ready)
    finally:
        os.close(ready)
    try:
        _hand_to_proxy(images_dir, DumpClient(proxy_images_dir / CAPTURE_SOCKET))
    except OSError as exc:
        dump.abort()
        raise CommandError(f"the lazy dump's images could not go to the proxy ({exc.strerror or exc}); the dump was "
                           f"stopped, the process runs on here") from None
    dump.handed_at = time.monotonic()
    try:
        dump.checkpoint = _checkpoint_of(proxy, ticket)
    except CommandError as exc:  # the proxy went away: the dump, serving pages, still runs
        raise DumpRunning(str(exc), dump) from None
    return dump


class DumpRunning(CommandError):
    """The proxy failed once the lazy dump was serving pages: `dump` still runs, the
    process frozen, until it is ended (it may also end by itself if its last page went)."""

    def __init__(self, message: str, dump: LazyDump) -> None:
        super().__init__(message)
        self.dump = dump


def _await_page_server(dump: LazyDump, ready: int) -> None:
    """CRIU writes one byte to --status-fd once its images are written and its page server
    serves (criu/util.c status_ready); the pipe ends without it if the dump failed."""
    readable, _, _ = select.select([ready], [], [], READY_WAIT)
    if readable and os.read(ready, 1) == b"\0" and (dump.images_dir / LAST_IMAGE).exists():
        return
    if readable:
        code = dump.wait()
        raise CommandError(f"criu dump --lazy-pages exited with {code}: {dump.tail()}; the process runs on here")
    dump.abort()
    raise CommandError(f"criu dump --lazy-pages did not start its page server within {READY_WAIT:.0f} s; it was "
                       f"killed, the process runs on here")


def _hand_to_proxy(images_dir: Path, client: DumpClient) -> None:
    """Write the images to the proxy as a CRIU stream dump would, inventory last."""
    names = sorted(p.name for p in images_dir.iterdir() if p.name.endswith(".img") and p.name != LAST_IMAGE)
    try:
        for name in [*names, LAST_IMAGE]:
            client.write_image(name, (images_dir / name).read_bytes())
    finally:
        client.close()


def _checkpoint_of(proxy: ControlClient, ticket: int) -> str:
    """The checkpoint the proxy made of the dump (it began when the images began to come)."""
    deadline = time.monotonic() + READY_WAIT
    while time.monotonic() < deadline:
        checkpoint = proxy.request("status")["tickets"].get(str(ticket))
        if checkpoint is not None:
            return str(checkpoint)
        time.sleep(0.005)
    raise CommandError(f"the proxy took no checkpoint for the lazy dump within {READY_WAIT:.0f} s")


# ---- the destination ----------------------------------------------------------------------

class GuardedLazyPages:
    """`criu lazy-pages`, run by its guard (commands/lazy_guard.py), which kills it and the
    restored process if this command dies before the background copy ended."""

    def __init__(self, criu_argv: list[str], pidfile: Path, output: Path, pass_fd: int) -> None:
        self.guard = subprocess.Popen([sys.executable, "-m", "imgmig.commands.lazy_guard", str(pidfile), str(output),
                                       str(pass_fd), "--", *criu_argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, pass_fds=[pass_fd], start_new_session=True)
        assert self.guard.stdin is not None and self.guard.stdout is not None
        self.orders, self.news = self.guard.stdin, self.guard.stdout.fileno()
        self.returncode: int | None = None
        word, _, value = self._line(READY_WAIT).partition(" ")
        if word != "pid":
            self.guard.kill()
            raise CommandError(f"the guard of criu lazy-pages did not start it (said {word!r})")
        self.pid = int(value)

    def _line(self, timeout: float | None) -> str:
        """The guard's next line, "" at its end, or TimeoutError."""
        line = b""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not line.endswith(b"\n"):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.news], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.news, 1)
            if not chunk:
                return ""
            line += chunk
        return line.decode().strip()

    def wait(self, timeout: float | None = None) -> int:
        """lazy-pages' exit status; subprocess.TimeoutExpired as Popen.wait."""
        if self.returncode is None:
            try:
                word, _, value = self._line(timeout).partition(" ")
            except TimeoutError:
                raise subprocess.TimeoutExpired("criu lazy-pages", timeout or 0) from None
            self.returncode = int(value) if word == "exit" else -1  # a guard gone: lazy-pages is too
        return self.returncode

    def poll(self) -> int | None:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def tell(self, line: str) -> None:
        with contextlib.suppress(OSError):
            self.orders.write(f"{line}\n".encode())
            self.orders.flush()

    def release(self) -> None:
        """This command dealt with the outcome: the guard has nothing more to do."""
        self.tell("done")
        with contextlib.suppress(OSError):
            self.orders.close()
        self.guard.wait()


@dataclass
class LazyRestore:
    checkpoint: str
    pid: int
    images_dir: Path
    lazy: GuardedLazyPages
    tunnel: threading.Thread
    tunnel_reply: dict[str, Any] = field(default_factory=dict)
    tunnel_error: list[str] = field(default_factory=list)

    def finish(self, client: ControlClient, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the background copy to end (lazy-pages exits once every page arrived);
        then tell the cache, which releases both copies. The tunnel's figures."""
        code = self.lazy.wait(timeout)
        self.tunnel.join(timeout)
        if code != 0 or self.tunnel_error:
            detail = self.tunnel_error[0] if self.tunnel_error else criu_tail(self.images_dir, "lazy")
            failure = f"the background copy of checkpoint {self.checkpoint} failed (lazy-pages exited {code}): {detail}"
            self.kill_restored()
            self.give_back(client, failure)
            raise CommandError(f"{failure}; the process restored here (pid {self.pid}) was killed, its memory being "
                               f"incomplete: it runs on its source if that node is up (its dump failed there, which "
                               f"resumes it), else nowhere (logs in {self.images_dir})")
        client.request("lazy_done", id=self.checkpoint, pid=self.pid)
        self.lazy.release()
        client.request("confirm", id=self.checkpoint, running=True, pid=self.pid)
        for image in self.images_dir.glob("*.img"):  # tmpfs is memory; the logs stay
            image.unlink()
        return self.tunnel_reply

    def kill_restored(self) -> None:
        """Without lazy-pages the kernel fills the pages that never came with zeros: the process
        would run on here with corrupt memory while it resumes on the source. It dies instead."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def give_back(self, client: ControlClient, failure: str) -> None:
        """The copy here is useless now (its page server is gone): drop it, and give the right
        to restore back to the source (confirm running=false, as a failed restore does)."""
        self.lazy.kill()
        self.lazy.wait()
        self.lazy.release()
        self.tunnel.join(TUNNEL_END_WAIT)
        if not self.tunnel.is_alive():  # the control connection is free again
            client.request("confirm", id=self.checkpoint, running=False, detail=failure)



def restore_lazy(client: ControlClient, checkpoint: str, criu: list[str], images_dir: Path | None = None,
                 options: list[str] | None = None) -> LazyRestore:
    """Restore a claimed lazy checkpoint; returns once `criu restore -d` returned (the process runs)."""
    images_dir = images_dir or private_dir("imgmig-lazy-restore-")
    listed = client.request("lazy_images", timeout=None, id=checkpoint)["images"]
    for image in listed:
        _lay_image(client, checkpoint, image["name"], images_dir)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs:
        lazy = GuardedLazyPages([*criu, "lazy-pages", "--page-server", "--ps-socket", str(theirs.fileno()),
                                 "-D", str(images_dir), "-o", "lazy.log", "-W", str(images_dir)],
                                images_dir / RESTORE_PIDFILE, images_dir / "lazy.out", theirs.fileno())
    restore = LazyRestore(checkpoint, 0, images_dir, lazy, threading.Thread())
    restore.tunnel = threading.Thread(target=_carry, args=(client, restore, ours), daemon=True)
    restore.tunnel.start()
    try:
        restore.pid = _restore(criu, images_dir, lazy, options or [])
    except CommandError as exc:
        restore.give_back(client, str(exc))
        raise
    with contextlib.suppress(ProcessLookupError):  # a copy that already ended
        # From here lazy-pages' loop polls without sleeping (criu/uffd.c): on a busy node it
        # took a core from the daemons that carry its pages (bench/README.md: -35 % to the
        # last page at 1 GiB at nice 19).
        os.setpriority(os.PRIO_PROCESS, lazy.pid, 19)
    with ControlClient(client.path, client.role) as other:  # `client` is busy carrying the tunnel
        other.request("lazy_running", id=checkpoint)
    return restore


def _lay_image(client: ControlClient, checkpoint: str, name: str, images_dir: Path) -> None:
    client.request("lazy_image", id=checkpoint, name=name)
    fd = client.take_fd()
    if fd is None:
        raise CommandError(f"the cache passed no fd for image {name} of checkpoint {checkpoint}")
    with os.fdopen(fd, "rb") as source, open(images_dir / name, "wb") as target:
        shutil.copyfileobj(source, target, 1 << 20)


def _carry(client: ControlClient, restore: LazyRestore, ours: socket.socket) -> None:
    """Hand our end of lazy-pages' socketpair to the cache; answered when the channel ended."""
    with ours:
        try:
            reply = client.request("tunnel", fd=ours.fileno(), timeout=None, id=restore.checkpoint)
        except CommandError as exc:
            restore.tunnel_error.append(str(exc))
            reply = {"error": str(exc)}
        restore.tunnel_reply.update(reply)
        if reply.get("error"):
            restore.tunnel_error.append(f"the tunnel ended: {reply['error']}")
            # before lazy-pages sees its stream end (when `ours` closes) and lets the kernel
            # fill the missing pages with zeros
            restore.kill_restored()


def _restore(criu: list[str], images_dir: Path, lazy: GuardedLazyPages, options: list[str]) -> int:
    deadline = time.monotonic() + READY_WAIT
    while not (images_dir / LAZY_SOCKET).exists():
        if lazy.poll() is not None or time.monotonic() > deadline:
            raise CommandError(f"criu lazy-pages did not start (exit {lazy.poll()}): {criu_tail(images_dir, 'lazy')}")
        time.sleep(0.005)
    pidfile = images_dir / RESTORE_PIDFILE
    with open(images_dir / "restore.out", "wb") as out:
        proc = subprocess.Popen([*criu, "restore", "-D", str(images_dir), "--lazy-pages", "-d", "--pidfile",
                                 str(pidfile), "-o", "restore.log", "-W", str(images_dir), *options],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    lazy.tell(f"restore {proc.pid}")  # should this command die now, the guard waits for it, then kills its process
    code = proc.wait()
    if code != 0:
        raise CommandError(f"criu restore --lazy-pages exited with {code}: {criu_tail(images_dir, 'restore')} "
                           f"(logs in {images_dir}); the process resumes on its source")
    return int(pidfile.read_text().strip())
