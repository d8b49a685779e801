"""The proxy's write side: one `criu dump --stream` connection becomes one checkpoint.

CRIU opens several pipes at once (pages and pagemap together), so every open pipe
and the control socket are watched with one epoll; each readable pipe is spliced
straight into its image's memfd. A small image (most of a dump's files) enters the
store only once it is whole, in one change; one that outgrows SMALL_IMAGE, or a page
image, is in the store from its first byte.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass

from imgmig.datapath.kernel_io import (
    CHUNK,
    DEFAULT_PIPE,
    UntilHangup,
    grow_pipe,
    out_of_fds,
    pipe_end_problem,
    recv_criu_message,
)
from imgmig.datapath.store import (
    REUSED_PREFIX,
    SMALL_IMAGE,
    Checkpoint,
    DuplicateImage,
    Image,
    ImageStore,
    TooManyFiles,
    new_memfd,
)
from imgmig.protocol import criu_wire

log = logging.getLogger(__name__)

INVENTORY = "inventory.img"
_SPLICE_FLAGS = getattr(os, "SPLICE_F_NONBLOCK", 2) | getattr(os, "SPLICE_F_MOVE", 1)


@dataclass(eq=False)
class _Arriving:
    """An image whose bytes are being taken into `fd` (a memfd, made at its first byte)
    before it is in the store."""
    name: str
    fd: int = -1
    size: int = 0


class CaptureSession:
    def __init__(self, sock: socket.socket, store: ImageStore, checkpoint: Checkpoint,
                 stop: threading.Event) -> None:
        self.sock = sock
        self.store = store
        self.checkpoint = checkpoint
        self.stop = stop
        self.protocol = criu_wire.CaptureConnection()
        self.pipes: dict[int, Image | _Arriving] = {}
        self.grown: set[int] = set()
        self.epoll = select.epoll()
        self.control_open = True
        self.error: str | None = None
        self.criu_gone = UntilHangup(stop, sock.fileno())

    def run(self) -> None:
        """Drain the connection and every pipe; then complete or fail the checkpoint."""
        log.info("checkpoint %s begins: criu dump connected", self.checkpoint.id,
                 extra={"IMGMIG_CHECKPOINT": self.checkpoint.id})
        self.epoll.register(self.sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        try:
            while (self.control_open or self.pipes) and not self.stop.is_set():
                if self.checkpoint.charged >= self.store.limit:
                    # It alone fills the store: waiting for room would wait forever. Closing
                    # CRIU's pipes fails the dump, and CRIU resumes the process on this node.
                    self.error = (f"it has grown to {_mib(self.checkpoint.size)}, which this proxy's "
                                  f"memory.limit of {_mib(self.store.limit)} cannot hold; CRIU's dump is "
                                  f"refused and the process goes on running here (raise memory.limit)")
                    break
                if self.store.room() <= 0 and not self.criu_gone.is_set():
                    self.store.wait_for_room(self.criu_gone, f"checkpoint {self.checkpoint.id} capture")
                for fd, _ in self.epoll.poll(0.5):
                    if fd == self.sock.fileno():
                        self._on_control()
                    else:
                        self._on_pipe(fd)
        except criu_wire.CriuProtocolError as exc:
            self.error = f"protocol error from CRIU: {exc}"
        except TooManyFiles as exc:
            self.error = str(exc)
        except OSError as exc:
            if not out_of_fds(exc):
                raise
            self.error = f"out of file descriptors ({exc.strerror}) for its images; raise LimitNOFILE"
        finally:
            self._finish()

    def _on_control(self) -> None:
        try:
            data, fds = recv_criu_message(self.sock, 16)
        except OSError as exc:
            data, fds = b"", []
            self.error = f"capture connection error: {exc.strerror}"
        if not data:
            self._close_control()
            return
        offers = self.protocol.receive(data, fds)
        for n, offer in enumerate(offers):
            try:
                self._accept_image(offer)
            except BaseException:
                for later in offers[n + 1:]:
                    os.close(later.fd)
                raise

    def _accept_image(self, offer: criu_wire.ImageOffered) -> None:
        """Take the pipe CRIU will write `offer.name` into; the fd is closed on any refusal."""
        problem = pipe_end_problem(offer.fd, write=False)
        if problem is not None:
            os.close(offer.fd)
            raise criu_wire.CriuProtocolError(f"CRIU passed for {offer.name} {problem}")
        try:
            if offer.name.startswith(REUSED_PREFIX):  # large, and may get a kept memfd (MemfdPool)
                image: Image | _Arriving = self.store.add_image(self.checkpoint, offer.name)
                os.set_blocking(offer.fd, False)
            else:  # refused now as add_image would; SPLICE_F_NONBLOCK keeps the splices from blocking
                self.store.check_new_image(self.checkpoint, offer.name)
                image = _Arriving(offer.name)
        except (TooManyFiles, OSError):
            os.close(offer.fd)
            raise
        except DuplicateImage as exc:
            log.error("checkpoint %s: %s; CRIU's pipe is closed so that its dump fails loudly",
                      self.checkpoint.id, exc, extra={"IMGMIG_CHECKPOINT": self.checkpoint.id,
                                                      "IMGMIG_FILE": offer.name})
            os.close(offer.fd)
            return
        self.pipes[offer.fd] = image
        self.epoll.register(offer.fd, select.EPOLLIN)

    def _on_pipe(self, fd: int) -> None:
        image = self.pipes[fd]
        if isinstance(image, _Arriving):
            self._take_arriving(fd, image)
            return
        try:
            moved = _take_from_pipe(fd, image)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return
            raise
        if moved:
            if moved >= DEFAULT_PIPE and fd not in self.grown:
                # CRIU's pipe was full: a large image. A larger pipe means fewer wake-ups per
                # byte; small images never pay for the resize.
                grow_pipe(fd)
                self.grown.add(fd)
            self.store.grew(self.checkpoint, image, moved)
            return
        self._close_pipe(fd)
        self.store.finish_image(image, checkpoint=self.checkpoint)

    def _take_arriving(self, fd: int, arriving: _Arriving) -> None:
        """Splice what the pipe holds; at its end the image goes into the store whole (one
        change); past SMALL_IMAGE it goes in as far as it came and continues as any image."""
        if arriving.fd < 0:
            arriving.fd = new_memfd(arriving.name)
        while arriving.size <= SMALL_IMAGE:
            try:
                moved = os.splice(fd, arriving.fd, CHUNK, offset_dst=arriving.size, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return  # CRIU is still writing it
            if not moved:
                self._close_pipe(fd)
                self._add_arrived(arriving, complete=True)
                return
            arriving.size += moved
        self.pipes[fd] = self._add_arrived(arriving, complete=False)

    def _add_arrived(self, arriving: _Arriving, complete: bool) -> Image:
        try:
            return self.store.add_arrived(self.checkpoint, arriving.name, arriving.fd, arriving.size, complete)
        except BaseException:
            os.close(arriving.fd)
            arriving.fd = -1  # _finish closes what is left: not this again
            raise

    def _close_pipe(self, fd: int) -> None:
        self.grown.discard(fd)
        self.epoll.unregister(fd)
        os.close(fd)
        del self.pipes[fd]

    def _close_control(self) -> None:
        if self.control_open:
            self.epoll.unregister(self.sock.fileno())
            self.control_open = False

    def _finish(self) -> None:
        if self.control_open:
            self.epoll.unregister(self.sock.fileno())
        arriving = [image.fd for image in self.pipes.values() if isinstance(image, _Arriving) and image.fd >= 0]
        for fd in [*self.pipes, *arriving, *self.protocol.fds_to_close()]:
            os.close(fd)
        unfinished = sorted(image.name for image in self.pipes.values())
        self.pipes.clear()
        self.epoll.close()
        self.sock.close()
        inventory = self.checkpoint.images.get(INVENTORY)
        if self.error is None and unfinished:
            self.error = f"pipes still open when the daemon stopped: {', '.join(unfinished)}"
        if self.error is None and self.protocol.mid_message:
            self.error = "CRIU closed the connection in the middle of a message"
        if self.error is None and (inventory is None or not inventory.complete):
            self.error = "the dump ended without inventory.img: CRIU failed or died mid-dump"
        fields = {"IMGMIG_CHECKPOINT": self.checkpoint.id, "IMGMIG_BYTES": self.checkpoint.size}
        if self.error is None:
            elapsed = time.monotonic() - self.checkpoint.started
            log.info("checkpoint %s captured: %d files, %d bytes in %.2f s (%.0f MB/s)", self.checkpoint.id,
                     len(self.checkpoint.images), self.checkpoint.size, elapsed,
                     self.checkpoint.size / max(elapsed, 1e-6) / 1e6, extra=fields)
            self.store.complete(self.checkpoint, clean=True)
        elif self.stop.is_set():
            # Left as it is: systemd's fd store keeps it as a capture under way, and the next
            # run tells the cache to drop its part (fdstore.py); failing it here would forget that.
            log.error("checkpoint %s failed: %s; CRIU's dump fails and the process goes on running here; a "
                      "restarted imgmig-proxy tells the cache to drop its part", self.checkpoint.id, self.error,
                      extra=fields)
        else:
            log.error("checkpoint %s failed: %s; it cannot be restored and is dropped; check CRIU's log "
                      "and dump again", self.checkpoint.id, self.error, extra=fields)
            self.store.fail(self.checkpoint, self.error)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _take_from_pipe(fd: int, image: Image) -> int:
    """Move what CRIU's (non-blocking) pipe holds into the image: read into the pages of a
    reused memfd's mapping where it covers them, else spliced. 0 at the pipe's end."""
    window = image.window(image.size, CHUNK)
    if window is None:
        return os.splice(fd, image.fd, CHUNK, offset_dst=image.size, flags=_SPLICE_FLAGS)
    with window:
        return os.readv(fd, [window])
