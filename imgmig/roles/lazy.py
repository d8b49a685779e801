"""The cache's control ops for a lazy (post-copy) restore (docs/control.md, docs/design.md).

`imgmig restore --lazy` (root, on the destination) claims a lazy checkpoint, then:
- `lazy_images`: waits for it to be complete, takes the right to restore it (CLAIM /
  GRANT, as any restore) and lists its images;
- `lazy_image`: one image, passed back as a read-only fd (the command lays the images
  into a private tmpfs directory: `criu lazy-pages` has no stream mode);
- `tunnel`: a socket passed with the request (one end of a socketpair whose other end
  `criu lazy-pages --ps-socket` holds) is carried to the source's page server over the
  checkpoint's link; the op answers when that channel ended, with the bytes moved;
- `lazy_done`: the background copy ended and lazy-pages exited 0: the checkpoint counts
  as restored and running (the proxy is told RUNNING with the pid, both copies are released).

The cache service itself runs no CRIU and writes no file: its sandbox stays as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from imgmig.datapath import custody
from imgmig.datapath.kernel_io import UntilHangup
from imgmig.datapath.store import FILES_IMAGE, Checkpoint, ImageStore, State
from imgmig.datapath.tunnel import LAZY_IMAGE, NotLazy, Offer, Tunnels, require_lazy
from imgmig.protocol import control_wire as cw
from imgmig.roles.control import ControlSession, OpError

TAKE_WAIT = 10.0  # for the checkpoint's link to take an offered tunnel
ABANDONED_WAIT = 15.0  # for the guard of an `imgmig restore --lazy` gone away to end lazy-pages
POLL = 0.5

log = logging.getLogger(__name__)


class LazyOps:
    def __init__(self, store: ImageStore, node: str, tunnels: Tunnels, stop: threading.Event,
                 gate: Callable[[Checkpoint], None], give_back: Callable[[Checkpoint], None]) -> None:
        self.store = store
        self.mine = custody.destination(node)
        self.tunnels = tunnels
        self.stop = stop
        self.gate = gate
        self.give_back = give_back

    @property
    def ops(self) -> dict[str, Callable[[ControlSession, cw.Request], dict[str, Any]]]:
        return {"lazy_check": self._check, "lazy_images": self._images, "lazy_image": self._image,
                "tunnel": self._tunnel, "lazy_running": self._running, "lazy_done": self._done}

    def _claimed(self, session: ControlSession, request: cw.Request) -> Checkpoint:
        checkpoint_id = cw.text_arg(request, "id")
        checkpoint = session.claims.get(checkpoint_id)
        if checkpoint is None:
            raise OpError(f"checkpoint {checkpoint_id} is not claimed by this connection; claim it first")
        return checkpoint

    def _held(self, session: ControlSession, request: cw.Request) -> Checkpoint:
        checkpoint = self._claimed(session, request)
        if checkpoint.holder != self.mine or checkpoint.state is not State.COMPLETE:
            raise OpError(f"checkpoint {checkpoint.id}: ask lazy_images first (it takes the right to restore it)")
        return checkpoint

    def _check(self, session: ControlSession, request: cw.Request) -> dict[str, Any]:
        """Is a claimed checkpoint lazy? The proxy puts the marker before CRIU's first image
        (after the files image, if any), so the answer comes with the first images: a restore
        that asks (`imgmig restore`, the doorbell's too) still overlaps the transfer."""
        checkpoint = self._claimed(session, request)
        client_gone = UntilHangup(self.stop, session.conn.fileno())
        self.store.wait_until(lambda: checkpoint.state is not State.RECEIVING
                              or any(name != FILES_IMAGE for name in checkpoint.images), client_gone)
        return {"id": checkpoint.id, "lazy": LAZY_IMAGE in checkpoint.images}

    def _images(self, session: ControlSession, request: cw.Request) -> dict[str, Any]:
        checkpoint = self._claimed(session, request)
        client_gone = UntilHangup(self.stop, session.conn.fileno())
        self.store.wait_until(lambda: checkpoint.state is not State.RECEIVING, client_gone)
        if checkpoint.state is not State.COMPLETE:
            raise OpError(f"checkpoint {checkpoint.id} is {checkpoint.state.value}, not complete; nothing restored")
        try:
            require_lazy(checkpoint)
        except NotLazy as exc:
            raise OpError(f"{exc}; restore it with `imgmig restore` (without --lazy)") from None
        try:
            self.gate(checkpoint)
        except custody.NoRight as exc:
            raise OpError(f"checkpoint {checkpoint.id} may not be restored here: {exc}") from None
        images = [{"name": image.name, "size": image.size} for image in checkpoint.images.values()
                  if image.name not in (LAZY_IMAGE, FILES_IMAGE)]
        return {"id": checkpoint.id, "images": images}

    def _image(self, session: ControlSession, request: cw.Request) -> dict[str, Any]:
        checkpoint = self._held(session, request)
        name = cw.text_arg(request, "name")
        image = checkpoint.images.get(name)
        if image is None or not image.complete:
            raise OpError(f"checkpoint {checkpoint.id} has no complete image {name!r}")
        session.reply_fd = os.open(f"/proc/self/fd/{image.fd}", os.O_RDONLY | os.O_CLOEXEC)
        return {"name": name, "size": image.size}

    def _tunnel(self, session: ControlSession, request: cw.Request) -> dict[str, Any]:
        checkpoint = self._held(session, request)
        sock = session.take_unix_stream("tunnel needs lazy-pages' page-server socket")
        try:
            offer = self.tunnels.offer(checkpoint.id, sock)
        except ValueError as exc:
            sock.close()
            raise OpError(str(exc)) from None
        client_gone = UntilHangup(self.stop, session.conn.fileno())
        deadline = time.monotonic() + TAKE_WAIT
        while not offer.taken and time.monotonic() < deadline and not client_gone.is_set():
            time.sleep(0.05)
        if not offer.taken and self.tunnels.take(checkpoint.id) is offer:  # nobody took it: withdraw it
            offer.done.set()
            sock.close()
            raise OpError(f"checkpoint {checkpoint.id}: no link to its source took the tunnel within "
                          f"{TAKE_WAIT:.0f} s; is the proxy connected?")
        while not offer.done.wait(POLL) and not client_gone.is_set():
            pass
        if not offer.done.is_set():
            self._abandoned(checkpoint, offer)
        return {"id": checkpoint.id, "pages_bytes": offer.from_peer, "requests_bytes": offer.to_peer,
                "error": offer.error or None}

    def _abandoned(self, checkpoint: Checkpoint, offer: Offer) -> None:
        """`imgmig restore --lazy` went away (killed) during the background copy. From now on
        lazy-pages' close request never goes to the source; its guard kills lazy-pages and
        the restored process, unless lazy-pages had every page already. The channel then
        ends mid-copy, the source's dump fails and the process resumes there: the right to
        restore goes back. If the close request went before, the copy completed: the
        process runs here, and the checkpoint counts as restored."""
        offer.abandoned.set()
        log.warning("checkpoint %s: imgmig restore --lazy went away during the background copy; its lazy "
                    "restore here is abandoned", checkpoint.id, extra={"IMGMIG_CHECKPOINT": checkpoint.id})
        if not offer.done.wait(ABANDONED_WAIT):  # no guard ended lazy-pages: end its channel here
            with contextlib.suppress(OSError):
                offer.sock.shutdown(socket.SHUT_RDWR)
            offer.done.wait(ABANDONED_WAIT)
        if offer.close_passed and not offer.error:
            log.warning("checkpoint %s: every page had arrived before imgmig restore went away: the process runs "
                        "here (its pid is in the restore's pidfile)", checkpoint.id,
                        extra={"IMGMIG_CHECKPOINT": checkpoint.id})
            self.store.restored(checkpoint)
            return
        self.give_back(checkpoint)

    def _running(self, _session: ControlSession, request: cw.Request) -> dict[str, Any]:
        """`criu restore --lazy-pages -d` returned 0: lazy-pages' close request may go to the
        source once every page arrived. From any connection: the one that claimed the
        checkpoint is busy carrying the tunnel."""
        checkpoint_id = cw.text_arg(request, "id")
        offer = self.tunnels.get(checkpoint_id)
        if offer is None or offer.done.is_set():
            raise OpError(f"checkpoint {checkpoint_id} has no tunnel open here")
        offer.running.set()
        return {"id": checkpoint_id}

    def _done(self, session: ControlSession, request: cw.Request) -> dict[str, Any]:
        """Every page arrived and the process runs: the link driver tells the proxy RUNNING
        with its pid (docs/protocol.md), which releases the source's copy as for any restore."""
        checkpoint = self._held(session, request)
        pid = request.args.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 32:
            raise OpError("lazy_done needs the restored process's pid")
        with self.store.cond:
            checkpoint.running_pid = pid
            self.store.restored(checkpoint)
        return {"id": checkpoint.id, "restored": checkpoint.state is State.RESTORED}
