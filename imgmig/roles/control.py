"""The control socket's server side, the same in both daemons: `<images_dir>/control.sock`.

One thread per connection runs a ControlSession: it decodes requests (imgmig.protocol.
control_wire), answers each with one reply, and holds what the connection owns (claims
on checkpoints, expectations of a dump): they are released when it closes, so a killed
`imgmig` never leaves a checkpoint reserved. See docs/control.md.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imgmig import __version__
from imgmig.datapath.kernel_io import UntilHangup
from imgmig.datapath.serve import ServeSession
from imgmig.datapath.store import (
    FILES_IMAGE,
    Checkpoint,
    CheckpointFailed,
    ImageStore,
    Interrupted,
    State,
    watch_checkpoints,
)
from imgmig.datapath.tunnel import end_page_server
from imgmig.protocol import control_wire as cw
from imgmig.system.systemd_glue import CHECKPOINT_RESTORED_ID

log = logging.getLogger(__name__)

JOURNAL_SIZE = 64  # ended checkpoints remembered for `imgmig status`
POLL = 0.5  # seconds between checks of the daemon's stop flag while a client is idle
MAX_FDS = 1  # a serve request passes one socket
LINGER, LINGER_BYTES = 1.0, 1 << 20  # after a protocol error: how long and how much to read before closing


class OpError(Exception):
    """A request the daemon declines; the text goes back to the client as is."""


def node_of(origin: str) -> str:
    """The node name in a checkpoint's origin (`node-a (10.0.0.1)` on a cache)."""
    return origin.split(" (", 1)[0]


EndedAs = Callable[[str, Checkpoint], "tuple[str, str] | None"]


@dataclass
class Ended:
    """A checkpoint the store no longer holds, and what became of it."""
    id: str
    origin: str
    state: str
    bytes: int
    images: int
    ended: float
    outcome: str = ""


class Journal:
    """What became of recent checkpoints, as they leave the store."""

    def __init__(self, store: ImageStore, ended_as: EndedAs | None = None) -> None:
        self.lock = threading.Lock()
        self.ended: OrderedDict[str, Ended] = OrderedDict()
        self.outcomes: dict[str, str] = {}
        self.states: dict[str, str] = {}  # noted before the checkpoint left the store (`running`)
        self.ended_as = ended_as
        watch_checkpoints(store, on_gone=self._on_gone)

    def _on_gone(self, checkpoint: Checkpoint) -> None:
        event = checkpoint.state.value if checkpoint.state in (State.FAILED, State.RESTORED) else "dropped"
        state, outcome = event, ""
        # The role may know better, at this very moment (the proxy: RESTORED from the peer).
        known = self.ended_as(event, checkpoint) if self.ended_as is not None else None
        if known is not None:
            state, outcome = known
        with self.lock:  # each text once: the role may know what a note already said
            state = state if known is not None else self.states.pop(checkpoint.id, state)
            outcome = "; ".join(dict.fromkeys(text for text in (checkpoint.reason, self.outcomes.get(checkpoint.id),
                                                                outcome) if text))
            self.ended[checkpoint.id] = Ended(checkpoint.id, checkpoint.origin, state, checkpoint.size,
                                              len(checkpoint.images), time.monotonic(), outcome)
            self.ended.move_to_end(checkpoint.id)
            while len(self.ended) > JOURNAL_SIZE:
                old, _ = self.ended.popitem(last=False)
                self.outcomes.pop(old, None)

    def note(self, checkpoint_id: str, outcome: str, state: str | None = None) -> None:
        with self.lock:
            self.outcomes[checkpoint_id] = outcome
            entry = self.ended.get(checkpoint_id)
            if entry is not None:
                entry.outcome = outcome
                entry.state = state or entry.state
            elif state is not None:
                self.states[checkpoint_id] = state

    def outcome(self, checkpoint_id: str) -> str:
        with self.lock:
            return self.outcomes.get(checkpoint_id, "")

    def get(self, checkpoint_id: str) -> Ended | None:
        with self.lock:
            return self.ended.get(checkpoint_id)

    def entries(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self.lock:
            return [{"id": e.id, "origin": e.origin, "state": e.state, "bytes": e.bytes, "images": e.images,
                     "ended_ago": round(now - e.ended, 1), "outcome": e.outcome} for e in self.ended.values()]


class LastError(logging.Handler):
    """The daemon's most recent ERROR log line, for `imgmig status`."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message: str | None = None
        self.at = 0.0
        logging.getLogger("imgmig").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.message = record.getMessage()
            self.at = time.monotonic()

    def describe(self) -> dict[str, Any] | None:
        if self.message is None:
            return None
        return {"message": self.message, "ago": round(time.monotonic() - self.at, 1)}

    def detach(self) -> None:
        logging.getLogger("imgmig").removeHandler(self)


@dataclass
class Expectation:
    """A dump announced by `imgmig migrate`: the next capture is its checkpoint."""
    ticket: int
    to: str | None
    checkpoint: str | None = None
    files: int | None = None  # a sealed memfd: the files image, owned here until the capture takes it
    page_server: socket.socket | None = None  # a lazy dump's page-server socket, until the capture takes it


@dataclass
class RoleView:
    """What the role adds to the common control ops."""
    checkpoint_info: Callable[[Checkpoint], dict[str, Any]]
    peers: Callable[[], list[dict[str, Any]]]
    summary: Callable[[], str]
    may_drop: Callable[[Checkpoint], str | None]  # why not, or None
    extra_ops: dict[str, Callable[[ControlSession, cw.Request], dict[str, Any]]] = field(default_factory=dict)
    ended_as: EndedAs | None = None  # (state, outcome) of a checkpoint leaving the store, if the role knows
    gate: Callable[[Checkpoint], None] | None = None  # takes the right to restore, or raises NoRight
    restore_failed: Callable[[Checkpoint], None] | None = None  # imgmig restore confirmed a failed restore


class ControlServer:
    def __init__(self, role: str, node: str, store: ImageStore, stop: threading.Event, view: RoleView) -> None:
        self.role = role
        self.node = node
        self.store = store
        self.stop = stop
        self.view = view
        self.journal = Journal(store, view.ended_as)
        self.last_error = LastError()
        self.started = time.monotonic()
        self.tickets = itertools.count(1)
        self.expectations: list[Expectation] = []  # open, oldest first
        self.lock = threading.Lock()
        self.ops: dict[str, Callable[[ControlSession, cw.Request], dict[str, Any]]] = {
            "status": self._status, "list": self._list, "drop": self._drop, "claim": self._claim,
            "files": self._files, "serve": self._serve, "confirm": self._confirm, **view.extra_ops,
        }

    def handle(self, conn: socket.socket, _peer: str) -> None:
        ControlSession(self, conn).run()

    # ---- expectations (proxy) --------------------------------------------------------
    def expect(self, to: str | None) -> Expectation:
        with self.lock:
            expectation = Expectation(next(self.tickets), to)
            self.expectations.append(expectation)
            return expectation

    def take_expectation(self) -> Expectation | None:
        """For a new capture: the oldest announced dump not yet begun."""
        with self.lock:
            return self.expectations.pop(0) if self.expectations else None

    def forget(self, expectation: Expectation) -> None:
        with self.lock:
            if expectation not in self.expectations:
                return  # a capture took it, with what it carries
            self.expectations.remove(expectation)
            if expectation.files is not None:
                os.close(expectation.files)
                expectation.files = None
            if expectation.page_server is not None:  # never captured: the lazy dump must fail
                end_page_server(expectation.page_server, at_record_boundary=True, abort=True)
                expectation.page_server = None

    # ---- ops ------------------------------------------------------------------------
    def _status(self, session: ControlSession, request: cw.Request) -> dict[str, Any]:
        body = self._list(session, request)
        body |= {
            "role": self.role, "node": self.node, "version": __version__, "pid": os.getpid(),
            "uptime": round(time.monotonic() - self.started, 1), "summary": self.view.summary(),
            "held": self.store.held, "limit": self.store.limit, "peers": self.view.peers(),
            "last_error": self.last_error.describe(),
            "tickets": {str(e.ticket): e.checkpoint for e in session.expectations},
        }
        return body

    def _list(self, _session: ControlSession, _request: cw.Request) -> dict[str, Any]:
        now = time.monotonic()
        held = []
        for checkpoint in self.store.checkpoints():
            info = {"id": checkpoint.id, "origin": checkpoint.origin, "state": checkpoint.state.value,
                    "bytes": checkpoint.size, "images": len(checkpoint.images),
                    "age": round(now - checkpoint.started, 1), "claimed": checkpoint.claimed,
                    "right": checkpoint.holder, "outcome": self.journal.outcome(checkpoint.id)}
            held.append(info | self.view.checkpoint_info(checkpoint))
        return {"checkpoints": held, "ended": self.journal.entries()}

    def _drop(self, _session: ControlSession, request: cw.Request) -> dict[str, Any]:
        checkpoint_id = cw.text_arg(request, "id")
        force = cw.bool_arg(request, "force")
        checkpoint = self.store.get(checkpoint_id)
        if checkpoint is None:
            raise OpError(f"this {self.role} holds no checkpoint {checkpoint_id}; `imgmig list` shows what it holds")
        reason = self.view.may_drop(checkpoint)
        if reason is not None and not force:
            raise OpError(f"checkpoint {checkpoint_id} not dropped: {reason}")
        log.warning("checkpoint %s dropped by the operator%s", checkpoint_id, " (--force)" if force else "",
                    extra={"IMGMIG_CHECKPOINT": checkpoint_id})
        if checkpoint.state is State.RECEIVING:
            self.store.fail(checkpoint, "dropped by the operator")  # the reason is its outcome
        else:
            self.journal.note(checkpoint_id, "dropped by the operator")
            self.store.drop(checkpoint)
        return {"id": checkpoint_id, "dropped": True}

    def _claim(self, session: ControlSession, request: cw.Request) -> dict[str, Any]:
        """Reserve a checkpoint for this connection's restore, so that no other restore
        takes it; `claimed` is null while none matches yet (the client asks again)."""
        wanted = cw.text_arg(request, "id", required=False)
        origin = cw.text_arg(request, "from", required=False)
        if session.claims:
            raise OpError("this connection holds a claim already; one restore per connection")
        if wanted is not None and (ended := self.journal.get(wanted)) is not None:
            raise OpError(f"checkpoint {wanted} is gone from this {self.role}: {ended.state}"
                          f"{', ' + ended.outcome if ended.outcome else ''}")
        with self.store.cond:
            for checkpoint in self.store.checkpoints():
                if wanted is not None and checkpoint.id != wanted:
                    continue
                if origin is not None and node_of(checkpoint.origin) != origin:
                    continue
                if checkpoint.state not in (State.RECEIVING, State.COMPLETE):
                    continue
                if checkpoint.claimed:
                    if wanted is not None:
                        raise OpError(f"checkpoint {wanted} is being restored by another restore")
                    continue
                checkpoint.claimed = True
                session.claims[checkpoint.id] = checkpoint
                log.info("checkpoint %s claimed for a restore through the control socket", checkpoint.id,
                         extra={"IMGMIG_CHECKPOINT": checkpoint.id})
                return {"claimed": checkpoint.id, "origin": checkpoint.origin, "state": checkpoint.state.value}
        return {"claimed": None}

    def _files(self, session: ControlSession, request: cw.Request) -> dict[str, Any]:
        """The files image of a claimed checkpoint, passed back as a read-only fd; null if
        it has none. It is the first image when there is one, so the wait is short."""
        checkpoint_id = cw.text_arg(request, "id")
        checkpoint = session.claims.get(checkpoint_id)
        if checkpoint is None:
            raise OpError(f"checkpoint {checkpoint_id} is not claimed by this connection; claim it first")
        client_gone = UntilHangup(self.stop, session.conn.fileno())
        with self.store.cond:
            while not checkpoint.images and checkpoint.state is State.RECEIVING and not client_gone.is_set():
                self.store.cond.wait(POLL)
            first = next(iter(checkpoint.images), None)
        if first != FILES_IMAGE:
            return {"files": None}
        try:
            with self.store.using(checkpoint):
                image = self.store.wait_image(checkpoint, FILES_IMAGE, client_gone)
                if image is None:
                    return {"files": None}
                session.reply_fd = os.open(f"/proc/self/fd/{image.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except (CheckpointFailed, Interrupted) as exc:
            raise OpError(f"the files of checkpoint {checkpoint_id} cannot be read: {exc}") from None
        return {"files": image.size}

    def _serve(self, session: ControlSession, request: cw.Request) -> dict[str, Any]:
        """Serve a claimed checkpoint on the restore connection passed with the request."""
        checkpoint_id = cw.text_arg(request, "id")
        checkpoint = session.claims.get(checkpoint_id)
        if checkpoint is None:
            raise OpError(f"checkpoint {checkpoint_id} is not claimed by this connection; claim it first")
        conn = session.take_unix_stream("serve needs CRIU's restore connection")
        conn.setblocking(True)
        log.info("restore connected through the control socket on the %s: serving checkpoint %s",
                 self.role, checkpoint_id, extra={"IMGMIG_CHECKPOINT": checkpoint_id})
        serving = PinnedServe(conn, self.store, self.stop, self.role, checkpoint, self.view.gate)
        serving.run()
        del session.claims[checkpoint_id]
        if serving.read_whole:  # still claimed: the copy waits for `confirm`
            session.unconfirmed[checkpoint_id] = checkpoint
        return {"id": checkpoint_id, "served": len(serving.served), "restored": serving.read_whole}

    def _confirm(self, session: ControlSession, request: cw.Request) -> dict[str, Any]:
        checkpoint_id = cw.text_arg(request, "id")
        running = cw.bool_arg(request, "running")
        pid = request.args.get("pid")
        if running and (not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 32):
            raise OpError("confirm with running=true needs the restored process's pid")
        if running:
            outcome = f"running on {self.node} as pid {pid}"
        else:
            detail = request.args.get("detail")
            outcome = "restore failed" + (f": {detail}" if isinstance(detail, str) else "")
        self.journal.note(checkpoint_id, outcome, "running" if running else None)
        read_whole = session.unconfirmed.pop(checkpoint_id, None)
        if read_whole is not None and running:
            log.info("checkpoint %s restored from the %s: %s (confirmed by imgmig restore); its memory is released",
                     checkpoint_id, self.role, outcome,
                     extra={"IMGMIG_CHECKPOINT": checkpoint_id, "MESSAGE_ID": CHECKPOINT_RESTORED_ID})
            with self.store.cond:  # the link driver says RUNNING, not RESTORED (cache)
                read_whole.running_pid = pid
                self.store.restored(read_whole)
            return {"id": checkpoint_id}
        log.info("checkpoint %s: %s (confirmed by imgmig restore)", checkpoint_id, outcome,
                 extra={"IMGMIG_CHECKPOINT": checkpoint_id})
        if read_whole is not None:
            log.warning("checkpoint %s: its restore read every image and then failed; this %s keeps its copy, "
                        "a retry may restore it", checkpoint_id, self.role, extra={"IMGMIG_CHECKPOINT": checkpoint_id})
            self.store.unclaim(read_whole)
        checkpoint = self.store.get(checkpoint_id)
        if not running and checkpoint is not None and self.view.restore_failed is not None:
            self.view.restore_failed(checkpoint)
        return {"id": checkpoint_id}


class PinnedServe(ServeSession):
    """A restore of one claimed checkpoint: if it fails, no other checkpoint is served
    in its place (a bare restore would take the next one). Once CRIU has read it whole,
    the copy stays (claimed) until `imgmig restore` confirms what became of the process:
    running, and it is released; failed, and it is kept for a retry."""

    def __init__(self, sock: socket.socket, store: ImageStore, stop: threading.Event, role: str,
                 checkpoint: Checkpoint, gate: Callable[[Checkpoint], None] | None) -> None:
        super().__init__(sock, store, stop, role, gate=gate)
        self.checkpoint = checkpoint
        self.gated = False
        self.read_whole = False

    def _read_whole(self, checkpoint: Checkpoint) -> None:
        log.info("checkpoint %s read whole by its restore on the %s (%d files); its copy is kept until "
                 "imgmig restore confirms the process runs", checkpoint.id, self.role, len(self.served),
                 extra={"IMGMIG_CHECKPOINT": checkpoint.id})
        self.read_whole = True

    def _checkpoint(self) -> Checkpoint:
        if self.checkpoint is None:
            raise CheckpointFailed("the claimed checkpoint failed; not serving another in its place")
        if not self.gated:  # the right to restore it, exactly as for a bare restore (custody.py)
            self.gated = True
            if self.gate is not None:
                self.gate(self.checkpoint)
        return self.checkpoint


class ControlSession:
    def __init__(self, server: ControlServer, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.decoder = cw.LineDecoder(cw.MAX_REQUEST)
        self.fds: list[int] = []
        self.claims: dict[str, Checkpoint] = {}
        self.unconfirmed: dict[str, Checkpoint] = {}  # read whole by this connection's restore, outcome not told
        self.expectations: list[Expectation] = []
        self.reply_fd: int | None = None  # passed with the next reply, then closed here

    def take_fd(self) -> int | None:
        return self.fds.pop(0) if self.fds else None

    def take_unix_stream(self, needed: str) -> socket.socket:
        """The UNIX stream socket passed with the request (SCM_RIGHTS); OpError saying that
        `needed` ("serve needs CRIU's restore connection") if none, or another kind, came."""
        fd = self.take_fd()
        if fd is None:
            raise OpError(f"{needed} passed with it (SCM_RIGHTS)")
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise OpError("the passed fd is not a UNIX stream socket")
        return sock

    def run(self) -> None:
        self.conn.settimeout(POLL)
        try:
            self._loop()
        except cw.ControlProtocolError as exc:
            log.error("control connection on the %s refused: %s; connection closed (a client must speak "
                      "docs/control.md, as `imgmig status` does)", self.server.role, exc)
            with contextlib.suppress(OSError):
                self.conn.sendall(cw.encode_error(f"protocol error: {exc}"))
                self._linger()
        except OSError:
            pass  # the client went away; what it held is released below
        finally:
            self._release()

    def _loop(self) -> None:
        while not self.server.stop.is_set():
            message = self.decoder.next_message()
            if message is None:
                if not self._receive():
                    return
                continue
            self.conn.settimeout(None)
            reply = self._dispatch(cw.decode_request(message))
            if self.reply_fd is None:
                self.conn.sendall(reply)
            else:
                fd, self.reply_fd = self.reply_fd, None
                try:
                    _send_with_fd(self.conn, reply, fd)
                finally:
                    os.close(fd)
            self.conn.settimeout(POLL)

    def _receive(self) -> bool:
        try:
            data, fds, _, _ = socket.recv_fds(self.conn, 65536, MAX_FDS + 1)
        except TimeoutError:
            return True
        self.fds.extend(fds)
        if len(self.fds) > MAX_FDS:
            raise cw.ControlProtocolError(f"more than {MAX_FDS} file descriptor passed")
        if not data:
            if self.decoder.buffered:
                raise cw.ControlProtocolError(f"closed after {self.decoder.buffered} bytes of an unfinished line")
            return False
        self.decoder.feed(data)
        return True

    def _linger(self) -> None:
        """Read what the client still sends, briefly: closing with unread bytes would
        reset the connection, and the client would lose the error reply."""
        self.conn.shutdown(socket.SHUT_WR)
        self.conn.settimeout(LINGER)
        left = LINGER_BYTES
        while left > 0 and (data := self.conn.recv(65536)):
            left -= len(data)

    def _dispatch(self, request: cw.Request) -> bytes:
        op = self.server.ops.get(request.op)
        if op is None:  # an op of the other role
            return cw.encode_error(f"the {self.server.role} has no op {request.op!r}; it is the other daemon's")
        try:
            return cw.encode_reply(op(self, request))
        except OpError as exc:
            return cw.encode_error(str(exc))

    def _release(self) -> None:
        for fd in self.fds:
            os.close(fd)
        for checkpoint in self.claims.values():
            if checkpoint.state is not State.RESTORED:
                self.server.store.unclaim(checkpoint)
        for checkpoint in self.unconfirmed.values():
            # CRIU may be running the process now: it counts as restored, as after a bare restore
            log.warning("checkpoint %s: imgmig restore went away before it confirmed the outcome of a restore that "
                        "read it whole; it counts as restored (whether the process runs is not known here)",
                        checkpoint.id, extra={"IMGMIG_CHECKPOINT": checkpoint.id})
            self.server.store.restored(checkpoint)
        for expectation in self.expectations:
            self.server.forget(expectation)
        self.conn.close()


def _send_with_fd(conn: socket.socket, data: bytes, fd: int) -> None:
    sent = socket.send_fds(conn, [data], [fd])
    if sent < len(data):
        conn.sendall(data[sent:])
