"""`cache.restore: auto`: when a checkpoint begins to arrive, ring imgmig-restore.socket.

The cache runs sandboxed as a dynamic user and may not run CRIU or start units. So it
only connects to `<cache.images_dir>/restore.sock` and writes the checkpoint's id; the
socket unit (Accept=yes) starts a root `imgmig-restore@.service` instance for the
connection, which runs `imgmig restore --doorbell`: it claims that checkpoint through
the control socket and restores it. The ring carries no authority: the restore asks the
cache itself what to restore, so a stray ring can only restore what auto mode would.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

from imgmig.datapath.store import Checkpoint, ImageStore, watch_checkpoints

log = logging.getLogger(__name__)

DOORBELL_SOCKET = "restore.sock"
RING_TIMEOUT = 5.0


class Doorbell:
    def __init__(self, path: Path, store: ImageStore) -> None:
        self.path = path
        watch_checkpoints(store, on_new=self._on_new)

    def _on_new(self, checkpoint: Checkpoint) -> None:
        # rung as it begins to arrive: the transfer and the restore overlap
        threading.Thread(target=self.ring, args=(checkpoint.id,), name=f"doorbell-{checkpoint.id}",
                         daemon=True).start()

    def ring(self, checkpoint_id: str) -> None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(RING_TIMEOUT)
                sock.connect(str(self.path))
                sock.sendall(f"{checkpoint_id}\n".encode())
        except OSError as exc:
            log.error("cache.restore is auto, but checkpoint %s could not ring %s (%s): nothing restores it; "
                      "run `systemctl enable --now imgmig-restore.socket`, or `imgmig restore --id %s`",
                      checkpoint_id, self.path, exc.strerror or exc, checkpoint_id,
                      extra={"IMGMIG_CHECKPOINT": checkpoint_id})
            return
        log.info("checkpoint %s: automatic restore requested (%s)", checkpoint_id, self.path,
                 extra={"IMGMIG_CHECKPOINT": checkpoint_id})
