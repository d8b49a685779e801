"""The read side of both daemons: serve one `criu restore --stream` connection.

The first request claims a checkpoint (the oldest neither restored nor being restored,
else the next to arrive). Each request waits until its image is complete, or, once the
proxy listed every file of the checkpoint (FILES_LISTED), is served as it arrives; from
then on an image that never came is answered exists=false.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from imgmig.datapath.custody import NoRight
from imgmig.datapath.kernel_io import (
    DEFAULT_PIPE,
    UntilHangup,
    grow_pipe,
    largest_pipe,
    pipe_end_problem,
    recv_criu_message,
    splice_out,
)
from imgmig.datapath.store import FILES_IMAGE, Checkpoint, CheckpointFailed, Image, ImageStore, Interrupted
from imgmig.protocol import criu_wire
from imgmig.system.systemd_glue import CHECKPOINT_RESTORED_ID

log = logging.getLogger(__name__)

# CRIU reads a pages image with read()s of at most what the pipe holds, one hand-off
# between it and us each: 16 MiB where fs.pipe-max-size allows (bench/README.md)
SERVE_PIPE = 16 << 20
STREAM_STEP = 1 << 20  # an image still arriving is spliced on once this much more is there
END_GRACE = 10.0  # seconds a fully read checkpoint may wait for the sender's CHECKPOINT_END


class _Hangup(Exception):
    pass


class ServeSession:
    """`gate(checkpoint)` runs before the first reply from a claimed checkpoint: it raises
    NoRight when this node may not restore it (custody.py); `mine` is how this node is
    named when it holds that right."""

    def __init__(self, sock: socket.socket, store: ImageStore, stop: threading.Event, role: str,
                 gate: Callable[[Checkpoint], None] | None = None, mine: str = "") -> None:
        self.sock = sock
        self.gate = gate
        self.mine = mine
        self.store = store
        self.stop = stop
        self.role = role
        self.protocol = criu_wire.ServeConnection()
        self.checkpoint: Checkpoint | None = None
        self.served: set[str] = set()
        self.answered: set[str] = set()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                data, fds = recv_criu_message(self.sock, 4)
                if not data:
                    if self.protocol.mid_message:
                        log.error("restore connection on the %s closed by CRIU in the middle of a message; "
                                  "connection dropped, check CRIU's log", self.role)
                    break
                self._handle(self.protocol.receive(data, fds))
        except criu_wire.CriuProtocolError as exc:
            log.error("restore connection on the %s: protocol error from CRIU: %s; connection dropped",
                      self.role, exc)
        except CheckpointFailed as exc:
            log.error("restore from checkpoint %s stopped: %s; run the dump again, then the restore",
                      self.checkpoint.id if self.checkpoint else "?", exc)
        except NoRight as exc:
            log.error("restore of checkpoint %s on the %s refused: %s; CRIU's restore fails here",
                      self.checkpoint.id if self.checkpoint else "?", self.role, exc,
                      extra={"IMGMIG_CHECKPOINT": self.checkpoint.id if self.checkpoint else ""})
            self._refused()
        except (_Hangup, BrokenPipeError, ConnectionError):
            log.warning("restore connection on the %s closed by CRIU while being served", self.role)
        finally:
            self._finish()

    def _handle(self, events: list[criu_wire.ImageRequested | criu_wire.PipeGiven]) -> None:
        for event in events:
            if isinstance(event, criu_wire.ImageRequested):
                self._answer(event.name)
            else:
                self._send_image(event.name, event.fd)
        if events:
            self._handle(self.protocol.receive(b""))

    def _answer(self, name: str) -> None:
        waiter = UntilHangup(self.stop, self.sock.fileno())
        while True:
            try:
                image = self.store.wait_image(self._checkpoint(), name, waiter, arriving=True)
                break
            except Interrupted:
                raise _Hangup from None
            except CheckpointFailed:
                if self.answered or self.stop.is_set() or self.checkpoint is None:
                    raise
                if self.checkpoint.refused_by:
                    raise NoRight(f"the right to restore it is held by {self.checkpoint.refused_by}") from None
                log.warning("checkpoint %s failed before this restore read from it; waiting for the next",
                            self.checkpoint.id)
                self.checkpoint = None
        self.answered.add(name)
        self.sock.sendall(self.protocol.reply(image is not None))

    def _checkpoint(self) -> Checkpoint:
        if self.checkpoint is None:
            self.checkpoint = self.store.claim(UntilHangup(self.stop, self.sock.fileno()), self.mine)
            if self.checkpoint is None:
                raise _Hangup
            if self.gate is not None:
                self.gate(self.checkpoint)
            log.info("restore connected on the %s: serving checkpoint %s", self.role, self.checkpoint.id,
                     extra={"IMGMIG_CHECKPOINT": self.checkpoint.id})
        return self.checkpoint

    def _refused(self) -> None:
        """The checkpoint stays for whoever holds the right; this connection served nothing."""
        if self.checkpoint is not None:
            self.store.unclaim(self.checkpoint)
            self.checkpoint = None

    def _send_image(self, name: str, pipe_w: int) -> None:
        checkpoint = self._checkpoint()
        try:
            problem = pipe_end_problem(pipe_w, write=True)
            if problem is not None:
                raise criu_wire.CriuProtocolError(f"CRIU passed for {name} {problem}")
            with self.store.using(checkpoint):
                image = checkpoint.images[name]
                if image.fd < 0:
                    raise CheckpointFailed(f"checkpoint {checkpoint.id} was dropped: {checkpoint.reason or 'released'}")
                os.set_blocking(pipe_w, True)
                if image.size > DEFAULT_PIPE or not image.complete:
                    grow_pipe(pipe_w, largest_pipe(SERVE_PIPE))  # CRIU's pipe holds 64 KiB
                if image.complete:
                    splice_out(image.fd, pipe_w, 0, image.size)
                else:
                    self._stream(checkpoint, image, pipe_w)
        finally:
            os.close(pipe_w)
        self.served.add(name)

    def _stream(self, checkpoint: Checkpoint, image: Image, pipe_w: int) -> None:
        """An image still arriving (the pages, at the end of a dump): each part as it is
        stored, the last byte once its digest matched (ImageStore.servable)."""
        waiter = UntilHangup(self.stop, self.sock.fileno())
        sent = 0
        while not (image.complete and sent == image.size):
            try:
                end = self.store.servable(checkpoint, image, sent, STREAM_STEP, waiter)
            except Interrupted:
                raise _Hangup from None
            if end > sent:
                splice_out(image.fd, pipe_w, sent, end - sent)
                sent = end

    def _await_end_of_transfer(self, checkpoint: Checkpoint) -> None:
        """CRIU can read the last file (inventory.img, verified) before CHECKPOINT_END has
        been processed: give the checkpoint a moment to complete, or it would be unclaimed
        and served a second time to the next restore."""
        deadline = time.monotonic() + END_GRACE
        with self.store.cond:
            while not checkpoint.done_receiving and not self.stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.store.cond.wait(min(left, 0.5))

    def _read_everything(self, checkpoint: Checkpoint) -> bool:
        """CRIU read every image (the files image is unpacked by `imgmig restore`, not read by CRIU)."""
        return bool(self.served) and self.served >= set(checkpoint.images) - {FILES_IMAGE}

    def _read_whole(self, checkpoint: Checkpoint) -> None:
        """A bare restore read every image: that is all this node will learn of it (CRIU's
        exit status goes to whoever ran it), so the checkpoint counts as restored."""
        log.info("checkpoint %s restored from the %s: %d files served; its memory is released",
                 checkpoint.id, self.role, len(self.served),
                 extra={"IMGMIG_CHECKPOINT": checkpoint.id, "MESSAGE_ID": CHECKPOINT_RESTORED_ID})
        self.store.restored(checkpoint)

    def _finish(self) -> None:
        for fd in self.protocol.fds_to_close():
            os.close(fd)
        self.sock.close()
        checkpoint = self.checkpoint
        if checkpoint is None:
            return
        if self._read_everything(checkpoint):
            self._await_end_of_transfer(checkpoint)
        if self._read_everything(checkpoint) and checkpoint.done_receiving:
            self._read_whole(checkpoint)
        else:
            self.store.unclaim(checkpoint)
            if self.answered:
                log.warning("restore of checkpoint %s ended after %d of %d files; the checkpoint is kept "
                            "for another restore", checkpoint.id, len(self.served), len(checkpoint.images),
                            extra={"IMGMIG_CHECKPOINT": checkpoint.id})

