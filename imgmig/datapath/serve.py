"""The read side of both daemons: serve one `criu restore --stream` connection.

The first request claims a checkpoint (the oldest neither restored nor being restored,
else the next to arrive). Each request waits until its image is complete; once the
checkpoint is complete, an image that never came is answered exists=false.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from imgmig.datapath.kernel_io import UntilHangup, grow_pipe, largest_pipe, pipe_end_problem, splice_out
from imgmig.datapath.store import Checkpoint, CheckpointFailed, ImageStore, Interrupted
from imgmig.protocol import criu_wire
from imgmig.system.systemd_glue import CHECKPOINT_RESTORED_ID

log = logging.getLogger(__name__)

SMALL_IMAGE = 64 << 10  # fits CRIU's pipe as it is
# CRIU reads a pages image with read()s of at most what the pipe holds, one hand-off
# between it and us each: 16 MiB where fs.pipe-max-size allows (bench/README.md)
SERVE_PIPE = 16 << 20
END_GRACE = 10.0  # seconds a fully read checkpoint may wait for the sender's CHECKPOINT_END


class _Hangup(Exception):
    pass


class ServeSession:
    def __init__(self, sock: socket.socket, store: ImageStore, stop: threading.Event, role: str) -> None:
        self.sock = sock
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
                data, fds, flags, _ = socket.recv_fds(self.sock, 4096, 4)
                if flags & socket.MSG_CTRUNC:
                    for fd in fds:
                        os.close(fd)
                    raise criu_wire.CriuProtocolError(criu_wire.FDS_CUT_OFF)
                if not data:
                    for fd in fds:
                        os.close(fd)
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
        checkpoint = self._checkpoint()
        waiter = UntilHangup(self.stop, self.sock.fileno())
        while True:
            try:
                image = self.store.wait_image(checkpoint, name, waiter)
                break
            except Interrupted:
                raise _Hangup from None
            except CheckpointFailed:
                if self.answered or self.stop.is_set():
                    raise
                log.warning("checkpoint %s failed before this restore read from it; waiting for the next",
                            checkpoint.id)
                self.checkpoint = None
                checkpoint = self._checkpoint()
        self.answered.add(name)
        self.sock.sendall(self.protocol.reply(image is not None))

    def _checkpoint(self) -> Checkpoint:
        if self.checkpoint is None:
            self.checkpoint = self.store.claim(UntilHangup(self.stop, self.sock.fileno()))
            if self.checkpoint is None:
                raise _Hangup
            log.info("restore connected on the %s: serving checkpoint %s", self.role, self.checkpoint.id,
                     extra={"IMGMIG_CHECKPOINT": self.checkpoint.id})
        return self.checkpoint

    def _send_image(self, name: str, pipe_w: int) -> None:
        checkpoint = self._checkpoint()
        try:
            problem = pipe_end_problem(pipe_w, write=True)
            if problem is not None:
                raise criu_wire.CriuProtocolError(f"CRIU passed for {name} {problem}")
            with self.store.using(checkpoint):
                image = checkpoint.images[name]
                os.set_blocking(pipe_w, True)
                if image.size > SMALL_IMAGE:
                    grow_pipe(pipe_w, largest_pipe(SERVE_PIPE))  # CRIU's pipe holds 64 KiB
                splice_out(image.fd, pipe_w, 0, image.size)
        finally:
            os.close(pipe_w)
        self.served.add(name)

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

    def _finish(self) -> None:
        for fd in self.protocol.fds_to_close():
            os.close(fd)
        self.sock.close()
        checkpoint = self.checkpoint
        if checkpoint is None:
            return
        if self.served and self.served >= set(checkpoint.images):
            self._await_end_of_transfer(checkpoint)
        if self.served and self.served >= set(checkpoint.images) and checkpoint.done_receiving:
            log.info("checkpoint %s restored from the %s: %d files served; its memory is released",
                     checkpoint.id, self.role, len(self.served),
                     extra={"IMGMIG_CHECKPOINT": checkpoint.id, "MESSAGE_ID": CHECKPOINT_RESTORED_ID})
            self.store.restored(checkpoint)
        else:
            self.store.unclaim(checkpoint)
            if self.answered:
                log.warning("restore of checkpoint %s ended after %d of %d files; the checkpoint is kept "
                            "for another restore", checkpoint.id, len(self.served), len(checkpoint.images),
                            extra={"IMGMIG_CHECKPOINT": checkpoint.id})

