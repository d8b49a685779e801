"""Keep checkpoints across `systemctl restart` (or a crash with Restart=) in systemd's fd store.

Every image of a checkpoint is a memfd; it is handed to systemd with FDSTORE=1 and
FDNAME=img-<n>. On the proxy that happens when the checkpoint is complete (captured);
on the cache as each image begins, so that its proxy can resume a transfer after a
restart: an unfinished image's bytes are what its memfd holds (they are written in
order), and the proxy continues from there. One more memfd, FDNAME=imgmig-meta, holds
the JSON that says what the image fds are: per checkpoint its id, origin, whether it is
complete, who holds the right to restore it (custody.py) and, on the proxy, where it is
forwarded; per image its fd name, name, size, digest and whether it is complete. The
proxy also records each checkpoint it is still capturing, without images: CRIU's dump
fails when the proxy dies, so such a checkpoint is never adopted, and the restarted
proxy tells the cache to drop its part of it.
On start the daemon takes the fds back (LISTEN_FDNAMES), rebuilds those checkpoints
from the metadata, and only then reports READY. When a checkpoint is restored,
dropped or failed its fds leave the store (FDSTOREREMOVE=1).

The metadata is written in place (systemd holds the same open files), in two memfds,
FDNAME=imgmig-meta-a and imgmig-meta-b, in turn: a daemon killed in the middle of a write
leaves that slot torn and the other one whole, one change older. Each document starts
with a line naming its format, its generation, its length and a BLAKE2b digest of it; on
start the newest whole document is used. (A single document rewritten in place, format 3,
lost every held checkpoint to a kill -9 that landed mid-write.) A checkpoint is adopted
whole or not at all, and sizes are checked against the memfds, so an older document never
yields a wrong image.
Following the store costs O(images that changed) per change, not O(images held): each
checkpoint's record remembers how many of its images it has seen and which are open,
and each image's JSON is made once it can no longer change.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from imgmig.datapath.store import Checkpoint, Image, ImageStore, State
from imgmig.system import systemd_glue

log = logging.getLogger(__name__)

META_SLOTS = ("imgmig-meta-a", "imgmig-meta-b")
LEGACY_META = "imgmig-meta"  # format 3 and older: one document, rewritten in place
MAGIC = b"imgmig-fdstore"
IMAGE_PREFIX = "img-"
FORMAT = 4
COALESCE_FACTOR = 4  # after a write that took t, the next waits 4 t: at most a fifth of the time writing
COALESCE_MAX = 0.05  # seconds; a custody decision waits for the write (ImageStore.wait_durable)


@dataclass
class _Image:
    fdname: str
    name: str
    size: int
    digest: str | None
    complete: bool  # False: still arriving (cache), its memfd says how far
    text: str = field(default="", repr=False)  # its JSON, made once and again after a change

    def encode(self) -> str:
        if not self.text:
            self.text = json.dumps({"fdname": self.fdname, "name": self.name, "size": self.size,
                                    "digest": self.digest, "complete": self.complete}, separators=(",", ":"))
        return self.text

    def refresh(self, image: Image) -> bool:
        """Bring it up to date with its image; True if it changed."""
        now = (image.size, image.digest.hex() if image.digest else None, image.complete)
        if now == (self.size, self.digest, self.complete):
            return False
        self.size, self.digest, self.complete = now
        self.text = ""
        return True


@dataclass
class _Record:
    """One checkpoint in the fd store."""
    id: str
    origin: str
    complete: bool  # False: cache, a transfer to resume; proxy, a capture a restart abandons
    holder: str = ""
    route: str = ""
    images: list[_Image] = field(default_factory=list)
    seen: int = 0  # the checkpoint's images looked at so far, in the order they were added
    open: set[int] = field(default_factory=set)  # indexes in `images` of those not yet complete
    broken: bool = False  # an image could not be kept: left out of the store for good

    def encode(self) -> str:
        head = json.dumps({"id": self.id, "origin": self.origin, "complete": self.complete,
                           "holder": self.holder, "route": self.route}, separators=(",", ":"))
        return f'{head[:-1]},"images":[{",".join(image.encode() for image in self.images)}]}}'

    def refresh(self, checkpoint: Checkpoint) -> bool:
        now = (checkpoint.state is State.COMPLETE, checkpoint.holder, checkpoint.route)
        if now == (self.complete, self.holder, self.route):
            return False
        self.complete, self.holder, self.route = now
        return True


@dataclass(frozen=True)
class Abandoned:
    """Proxy: a checkpoint that was being captured when the previous run ended."""
    id: str
    origin: str
    route: str


@dataclass
class TakenBack:
    checkpoints: list[Checkpoint] = field(default_factory=list)
    abandoned: list[Abandoned] = field(default_factory=list)
    last_number: int = 0  # the highest number that ended a checkpoint id of the previous run


class FdStore:
    """Mirror the store's checkpoints into systemd's fd store."""

    def __init__(self, store: ImageStore, role: str) -> None:
        self.store = store
        self.role = role
        self.enabled = systemd_glue.under_systemd()
        self.lock = threading.Lock()
        self.records: dict[str, _Record] = {}
        self.serial = 0
        # The proxy numbers its checkpoint ids (node-time-N): its next run goes on after the
        # highest N recorded, so that no id repeats, even within the same second.
        self.last_number = 0
        self.meta_fds = [-1] * len(META_SLOTS)
        self.generation = 0  # of the newest metadata document written

    # ---- start -------------------------------------------------------------------
    def take_back(self, stored: dict[str, int]) -> TakenBack:
        """Adopt the checkpoints a previous run left in the fd store; release what cannot be used."""
        slots = {name: stored.pop(name) for name in (*META_SLOTS, LEGACY_META) if name in stored}
        meta = _read_meta(slots, len(stored)) if slots else _Meta([], 0, 0)
        usable = meta or _Meta([], 0, 0)
        records, self.last_number, self.generation = usable.records, usable.last_number, usable.generation
        self.meta_fds = [slots.pop(name, -1) for name in META_SLOTS]
        for name, fd in slots.items():  # a legacy document, reported already
            self._forget(name)
            os.close(fd)
        taken = TakenBack()
        used: set[str] = set()
        for record in records:
            if not all(i.fdname in stored and _fits(stored[i.fdname], i.size, i.complete) for i in record.images):
                log.error("fd store: checkpoint %s cannot be taken back: some of its %d image fds are missing or "
                          "not the size recorded; it is released", record.id, len(record.images),
                          extra={"IMGMIG_CHECKPOINT": record.id})
                continue
            if self.role == "proxy" and not record.complete:
                taken.abandoned.append(Abandoned(record.id, record.origin, record.route))
                continue
            taken.checkpoints.append(self._rebuild(record, stored))
            used.update(image.fdname for image in record.images)
            self.records[record.id] = record
            self.serial = max([self.serial, *(_serial(image.fdname) for image in record.images)])
        taken.last_number = self.last_number = max([self.last_number, *(_number(r.id) for r in records)])
        unused = sorted(set(stored) - used)
        if unused and meta is not None:  # (an unusable document was reported already)
            log.warning("fd store: %d fds left by the previous run are not part of a checkpoint taken back (%s); "
                        "released", len(unused), ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else ""))
        for name in unused:
            self._forget(name)
            os.close(stored[name])
        if self.enabled:
            self._ensure_meta()
            self._write_meta()
            self.store.persisted(self.store.generation)
            threading.Thread(target=self._follow, name="fdstore", daemon=True).start()
        return taken

    def _rebuild(self, record: _Record, fds: dict[str, int]) -> Checkpoint:
        images = [Image.taken_back(i.name, fds[i.fdname], i.size, i.complete,
                                   bytes.fromhex(i.digest) if i.digest else None) for i in record.images]
        checkpoint = self.store.adopt(record.id, record.origin, images, record.complete,
                                      holder=record.holder, route=record.route)
        record.seen = len(images)
        record.open = {index for index, image in enumerate(record.images) if not image.complete}
        log.info("checkpoint %s taken back from systemd's fd store after a restart: %d files, %d bytes%s%s",
                 record.id, len(images), checkpoint.size, "" if record.complete else ", still arriving",
                 f"; the right to restore it is held by {record.holder}" if record.holder else "",
                 extra={"IMGMIG_CHECKPOINT": record.id, "IMGMIG_BYTES": checkpoint.size,
                        "MESSAGE_ID": systemd_glue.CHECKPOINT_KEPT_ID})
        return checkpoint

    # ---- following the store ----------------------------------------------------
    def _follow(self) -> None:
        """Mirror the store for the life of the daemon: wait for a change, then keep what
        was added or changed and release what is gone. Writes are spaced by a few times
        what the last one took, so that a burst of small files costs O(files), not one
        whole document per file (O(files^2))."""
        seen = -1
        while True:
            seen = self._next_change(seen)
            present = {checkpoint.id: checkpoint for checkpoint in self.store.checkpoints()}
            changed = False
            for checkpoint in present.values():
                if checkpoint.state in (State.RECEIVING, State.COMPLETE):
                    changed |= self._keep(checkpoint)
            with self.lock:
                for checkpoint_id in set(self.records) - set(present):
                    self._release(checkpoint_id)
                    changed = True
                took = self._timed_write() if changed else 0.0
            self.store.persisted(seen)
            time.sleep(min(COALESCE_MAX, COALESCE_FACTOR * took))

    def _timed_write(self) -> float:
        started = time.monotonic()
        self._write_meta()
        return time.monotonic() - started

    def _next_change(self, seen: int) -> int:
        self.store.wait_until(lambda: self.store.generation != seen)
        return self.store.generation

    def _keep(self, checkpoint: Checkpoint) -> bool:
        """Record what changed in one checkpoint; True if the metadata must be written."""
        with self.lock, self.store.using(checkpoint):
            record = self.records.get(checkpoint.id)
            if record is not None and record.broken:
                return False
            changed = record is None
            if record is None:
                record = self.records[checkpoint.id] = _Record(checkpoint.id, checkpoint.origin, False)
                self.last_number = max(self.last_number, _number(checkpoint.id))
            changed |= record.refresh(checkpoint)
            for index in sorted(record.open):
                entry = record.images[index]
                changed |= entry.refresh(checkpoint.images[entry.name])
                if entry.complete:
                    record.open.discard(index)
            # The proxy's images go in once captured: a capture cut by a restart is never resumed.
            if self.role == "cache" or record.complete:
                new = list(itertools.islice(checkpoint.images.values(), record.seen, None))
                record.seen += len(new)
                for image in new:
                    if not self._store_image(record, image):
                        self._give_up(record)
                        return True
                    changed = True
            return changed

    def _store_image(self, record: _Record, image: Image) -> bool:
        self.serial += 1
        fdname = f"{IMAGE_PREFIX}{self.serial}"
        if image.fd < 0 or not systemd_glue.notify(f"FDSTORE=1\nFDNAME={fdname}", [image.fd]):
            log.warning("checkpoint %s: systemd refused to keep %s; the checkpoint will not survive a restart",
                        record.id, image.name, extra={"IMGMIG_CHECKPOINT": record.id, "IMGMIG_FILE": image.name})
            return False
        log.debug("checkpoint %s: %s kept in systemd's fd store as %s", record.id, image.name, fdname,
                  extra={"IMGMIG_CHECKPOINT": record.id, "IMGMIG_FILE": image.name, "IMGMIG_BYTES": image.size})
        entry = _Image(fdname, image.name, image.size, image.digest.hex() if image.digest else None, image.complete)
        if not entry.complete:
            record.open.add(len(record.images))
        record.images.append(entry)
        return True

    def _release(self, checkpoint_id: str) -> None:
        record = self.records.pop(checkpoint_id, None)
        for image in record.images if record is not None else ():
            self._forget(image.fdname)

    def _give_up(self, record: _Record) -> None:
        """A checkpoint is kept whole or not at all: one missing image would be answered absent."""
        for image in record.images:
            self._forget(image.fdname)
        record.images, record.open, record.broken = [], set(), True

    def _forget(self, fdname: str) -> None:
        systemd_glue.notify(f"FDSTOREREMOVE=1\nFDNAME={fdname}")

    # ---- the metadata memfd ------------------------------------------------------
    def _ensure_meta(self) -> None:
        for index, name in enumerate(META_SLOTS):
            if self.meta_fds[index] < 0:
                self.meta_fds[index] = os.memfd_create(name, os.MFD_CLOEXEC)
                systemd_glue.notify(f"FDSTORE=1\nFDNAME={name}", [self.meta_fds[index]])

    def _write_meta(self) -> None:
        """Write the next generation into the slot that does not hold the newest one."""
        if min(self.meta_fds) < 0:
            return
        records = ",".join(record.encode() for record in self.records.values() if not record.broken)
        body = (f'{{"role":"{self.role}","last_number":{self.last_number},'
                f'"checkpoints":[{records}]}}').encode()
        self.generation += 1
        fd = self.meta_fds[self.generation % len(META_SLOTS)]
        data = encode_document(self.generation, body)
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], written)
        os.ftruncate(fd, len(data))


class MetaFormatError(ValueError):
    def __init__(self, found: object) -> None:
        super().__init__(f"format {found!r}")
        self.found = found


def encode_document(generation: int, body: bytes) -> bytes:
    digest = hashlib.blake2b(body, digest_size=16).hexdigest()
    return b"%s %d %d %d %s\n" % (MAGIC, FORMAT, generation, len(body), digest.encode()) + body


def decode_document(raw: bytes) -> tuple[int, dict[str, Any]]:
    """(generation, document) of one slot; ValueError if it is not one whole document of
    this format (MetaFormatError if it is another format)."""
    header, _, rest = raw.partition(b"\n")
    fields = header.split(b" ")
    if len(fields) != 5 or fields[0] != MAGIC:
        raise ValueError("not an imgmig fd-store document")
    if fields[1] != str(FORMAT).encode():
        raise MetaFormatError(fields[1].decode(errors="replace"))
    generation, length = int(fields[2]), int(fields[3])
    body = rest[:length]
    if len(body) != length or hashlib.blake2b(body, digest_size=16).hexdigest().encode() != fields[4]:
        raise ValueError(f"generation {generation} is incomplete (the daemon died while writing it)")
    document = json.loads(body)
    if not isinstance(document, dict):
        raise ValueError("the document is not an object")
    return generation, document


def newest_document(slots: dict[str, int]) -> dict[str, Any] | None:
    """The newest whole document among the metadata slots, with its generation; None if none is."""
    found = []
    for name in META_SLOTS:
        try:
            found.append(decode_document(_read_all(slots[name])))
        except (KeyError, OSError, ValueError):
            continue
    if not found:
        return None
    generation, document = max(found, key=lambda pair: pair[0])
    return {**document, "generation": generation}


@dataclass
class _Meta:
    records: list[_Record]
    last_number: int
    generation: int


def _read_all(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


def _read_meta(slots: dict[str, int], fds: int) -> _Meta | None:
    """The records of the previous run's newest whole metadata, its last_number and
    generation; None (with one line saying why) if none is usable."""
    found: list[tuple[int, dict[str, Any]]] = []
    problems: list[str] = []
    formats: list[object] = []
    for name, fd in slots.items():
        try:
            raw = _read_all(fd)
            if name == LEGACY_META:
                legacy = json.loads(raw) if raw else {}
                formats.append(legacy.get("format") if isinstance(legacy, dict) else None)
            elif raw:
                found.append(decode_document(raw))
        except MetaFormatError as exc:
            formats.append(exc.found)
        except (OSError, ValueError) as exc:
            problems.append(f"{name}: {exc}")
    if not found and formats:
        log.error("fd store: the metadata left by the previous run is format %s, this imgmig reads format %d "
                  "(imgmig was changed between the two runs); its %d image fds are released, and the "
                  "checkpoints they held do not survive this restart", formats[0], FORMAT, fds)
        return None
    if not found and problems:
        log.error("fd store: the metadata left by the previous run is unreadable (%s); its %d image fds are "
                  "released, and the checkpoints they held do not survive this restart", "; ".join(problems), fds)
        return None
    if not found:
        return _Meta([], 0, 0)
    generation, raw_document = max(found, key=lambda pair: pair[0])
    if problems:
        log.warning("fd store: %s; the previous whole metadata (generation %d) is used", "; ".join(problems),
                    generation)
    try:
        return _Meta([_record(item) for item in raw_document["checkpoints"]], int(raw_document["last_number"]),
                     generation)
    except (TypeError, KeyError, ValueError) as exc:
        log.error("fd store: the metadata left by the previous run is malformed (%s); its %d image fds are "
                  "released, and the checkpoints they held do not survive this restart", exc, fds)
        return None


def _record(item: dict[str, Any]) -> _Record:
    images = [_Image(str(i["fdname"]), str(i["name"]), int(i["size"]), i["digest"], bool(i["complete"]))
              for i in item["images"]]
    return _Record(str(item["id"]), str(item["origin"]), bool(item["complete"]), str(item["holder"]),
                   str(item["route"]), images)


def _fits(fd: int, size: int, complete: bool) -> bool:
    """A complete image must have its size; an unfinished one at least what was recorded."""
    try:
        actual = os.fstat(fd).st_size
    except OSError:
        return False
    return actual == size if complete else actual >= size


def _number(checkpoint_id: str) -> int:
    digits = checkpoint_id.rpartition("-")[2]
    return int(digits) if digits.isdigit() else 0


def _serial(fdname: str) -> int:
    digits = fdname.removeprefix(IMAGE_PREFIX)
    return int(digits) if digits.isdigit() else 0
