"""Keep checkpoints across `systemctl restart` in systemd's fd store.

Every image of a complete checkpoint is a sealed memfd; it is handed to systemd with
FDSTORE=1 and FDNAME=img-<n>. On the cache, the images of a checkpoint still arriving
are handed over as they begin, so that its proxy can resume it after a restart: an
unfinished image's bytes are what its memfd holds (they are written in order), and the
proxy continues from there. One more memfd, FDNAME=imgmig-meta, holds the JSON that
says what the image fds are (checkpoint id, origin, image name, file id, size, digest,
whether it and its checkpoint are complete).
On start the daemon takes the fds back (LISTEN_FDNAMES), rebuilds those checkpoints
from the metadata, and only then reports READY. When a checkpoint is restored,
dropped or failed its fds leave the store (FDSTOREREMOVE=1).

The metadata memfd is written in place (systemd holds the same open file), so it is
stored once; a write is `pwrite` of the whole JSON then `ftruncate`, and a torn or
unreadable document on start only costs the held checkpoints, never a wrong image:
sizes are checked against the memfds before anything is adopted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from imgmig.datapath.store import Checkpoint, Image, ImageStore, State
from imgmig.system import systemd_glue

log = logging.getLogger(__name__)

META_NAME = "imgmig-meta"
IMAGE_PREFIX = "img-"
FORMAT = 2


@dataclass
class _Entry:
    fdname: str
    checkpoint: str
    origin: str
    image: str
    size: int
    digest: str | None
    complete: bool = True             # the image (False: still arriving, its memfd says how far)
    checkpoint_complete: bool = True  # its checkpoint (False: a transfer to resume)


class FdStore:
    """Mirror the store's complete checkpoints into systemd's fd store."""

    def __init__(self, store: ImageStore, role: str) -> None:
        self.store = store
        self.role = role
        self.enabled = systemd_glue.under_systemd()
        self.lock = threading.Lock()
        self.entries: dict[str, _Entry] = {}   # fdname -> what it is
        self.serial = 0
        self.meta_fd = -1

    # ---- start -------------------------------------------------------------------
    def take_back(self, stored: dict[str, int]) -> list[Checkpoint]:
        """Adopt the checkpoints a previous run left in the fd store; release what cannot be used."""
        meta_fd = stored.pop(META_NAME, -1)
        entries = _read_meta(meta_fd) if meta_fd >= 0 else []
        if meta_fd >= 0:
            self.meta_fd = meta_fd
        usable = [e for e in entries if e.fdname in stored and _fits(stored[e.fdname], e.size, e.complete)]
        checkpoints = self._rebuild(usable, stored)
        for name in set(stored) - {e.fdname for e in usable}:
            log.warning("fd store: %s is not described by the metadata; released", name)
            self._forget(name)
            os.close(stored[name])
        for entry in usable:
            self.entries[entry.fdname] = entry
            self.serial = max(self.serial, _serial(entry.fdname))
        if self.enabled:
            self._ensure_meta()
            self._write_meta()
            threading.Thread(target=self._follow, name="fdstore", daemon=True).start()
        return checkpoints

    def _rebuild(self, entries: list[_Entry], fds: dict[str, int]) -> list[Checkpoint]:
        grouped: dict[str, list[_Entry]] = {}
        for entry in entries:
            grouped.setdefault(entry.checkpoint, []).append(entry)
        adopted = []
        for checkpoint_id, group in grouped.items():
            images = [Image(e.image, fds[e.fdname], os.fstat(fds[e.fdname]).st_size, e.complete,
                            bytes.fromhex(e.digest) if e.digest else None) for e in group]
            complete = all(e.checkpoint_complete for e in group)
            checkpoint = self.store.adopt(checkpoint_id, group[0].origin, images, complete)
            adopted.append(checkpoint)
            log.info("checkpoint %s taken back from systemd's fd store after a restart: %d files, %d bytes%s",
                     checkpoint_id, len(images), checkpoint.size, "" if complete else ", still arriving",
                     extra={"IMGMIG_CHECKPOINT": checkpoint_id, "IMGMIG_BYTES": checkpoint.size,
                            "MESSAGE_ID": systemd_glue.CHECKPOINT_KEPT_ID})
        return adopted

    # ---- following the store ----------------------------------------------------
    def _follow(self) -> None:
        """Mirror the store for the life of the daemon: wait for a change of checkpoint
        state, then keep what became complete and release what is gone."""
        seen = -1
        while True:
            seen = self._next_change(seen)
            present = {checkpoint.id: checkpoint for checkpoint in self.store.checkpoints()}
            for checkpoint in present.values():
                if checkpoint.state is State.COMPLETE or (self.role == "cache" and checkpoint.state is State.RECEIVING):
                    self._keep(checkpoint)
            with self.lock:
                gone = {e.checkpoint for e in self.entries.values()} - set(present)
            for checkpoint_id in gone:
                self._release(checkpoint_id)

    def _next_change(self, seen: int) -> int:
        self.store.wait_until(lambda: self.store.generation != seen)
        return self.store.generation

    def _keep(self, checkpoint: Checkpoint) -> None:
        with self.lock, self.store.using(checkpoint):
            known = {(e.checkpoint, e.image): e for e in self.entries.values()}
            added = 0
            complete = checkpoint.state is State.COMPLETE
            for image in list(checkpoint.images.values()):
                entry = known.get((checkpoint.id, image.name))
                if entry is not None:
                    added += _refresh(entry, image, complete)
                    continue
                if image.fd < 0:
                    continue
                self.serial += 1
                fdname = f"{IMAGE_PREFIX}{self.serial}"
                if not systemd_glue.notify(f"FDSTORE=1\nFDNAME={fdname}", [image.fd]):
                    log.warning("checkpoint %s: systemd refused to keep %s; it will not survive a restart",
                                checkpoint.id, image.name, extra={"IMGMIG_CHECKPOINT": checkpoint.id,
                                                                  "IMGMIG_FILE": image.name})
                    continue
                log.debug("checkpoint %s: %s kept in systemd's fd store as %s", checkpoint.id, image.name, fdname,
                          extra={"IMGMIG_CHECKPOINT": checkpoint.id, "IMGMIG_FILE": image.name,
                                 "IMGMIG_BYTES": image.size})
                self.entries[fdname] = _Entry(fdname, checkpoint.id, checkpoint.origin, image.name,
                                              image.size, image.digest.hex() if image.digest else None,
                                              image.complete, complete)
                added += 1
            if added:
                self._write_meta()

    def _release(self, checkpoint_id: str) -> None:
        with self.lock:
            names = [name for name, e in self.entries.items() if e.checkpoint == checkpoint_id]
            for name in names:
                self._forget(name)
                del self.entries[name]
            if names:
                self._write_meta()

    def _forget(self, fdname: str) -> None:
        systemd_glue.notify(f"FDSTOREREMOVE=1\nFDNAME={fdname}")

    # ---- the metadata memfd ------------------------------------------------------
    def _ensure_meta(self) -> None:
        if self.meta_fd >= 0:
            return
        self.meta_fd = os.memfd_create(META_NAME, os.MFD_CLOEXEC)
        systemd_glue.notify(f"FDSTORE=1\nFDNAME={META_NAME}", [self.meta_fd])

    def _write_meta(self) -> None:
        if self.meta_fd < 0:
            return
        document = {"format": FORMAT, "role": self.role,
                    "images": [vars(entry) for entry in self.entries.values()]}
        data = json.dumps(document, separators=(",", ":")).encode()
        written = 0
        while written < len(data):
            written += os.pwrite(self.meta_fd, data[written:], written)
        os.ftruncate(self.meta_fd, len(data))


def _read_meta(fd: int) -> list[_Entry]:
    try:
        size = os.fstat(fd).st_size
        raw: Any = json.loads(os.pread(fd, size, 0)) if size else {"format": FORMAT, "images": []}
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}")
        return [_Entry(**item) for item in raw["images"]]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.error("fd store: the metadata left by the previous run is unreadable (%s); the checkpoints "
                  "it described are released", exc)
        return []


def _refresh(entry: _Entry, image: Image, checkpoint_complete: bool) -> int:
    """Bring an entry up to date with its image; 1 if it changed."""
    now = (image.size, image.digest.hex() if image.digest else None, image.complete, checkpoint_complete)
    if now == (entry.size, entry.digest, entry.complete, entry.checkpoint_complete):
        return 0
    entry.size, entry.digest, entry.complete, entry.checkpoint_complete = now
    return 1


def _fits(fd: int, size: int, complete: bool) -> bool:
    """A complete image must have its size; an unfinished one at least what was recorded."""
    try:
        actual = os.fstat(fd).st_size
    except OSError:
        return False
    return actual == size if complete else actual >= size


def _serial(fdname: str) -> int:
    digits = fdname.removeprefix(IMAGE_PREFIX)
    return int(digits) if digits.isdigit() else 0

