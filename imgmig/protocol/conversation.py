"""The proxy <-> cache conversation (docs/protocol.md, version 4) as two sans-IO state machines,
and a third for the proxy's probe link (`ProbeConnection`: HELLO, and PREPARE).

`ProxyConnection` and `CacheConnection` each stand for one TCP connection about one
checkpoint, seen from one side. In the style of h11 and aioquic they do no I/O: the
driver feeds them what it read (`receive_data(data, now)`) and gets back events; it
calls their methods for what its side wants to say, sends `data_to_send()`, and calls
`handle_timeout(now)` once `next_deadline()` has passed. FILE_DATA payloads never pass
through them: the proxy's driver asks for a header and sends the payload itself
(sendfile), the cache's driver reads the payload itself (splice) after asking
`payload` where it goes.

The driver loop is: `receive_data(data, now)`, then `next_event()` until it returns
None, acting on each event before asking for the next (an event that asks for a
decision, like BeginRequested, holds the following frames back until it is answered).

What they own: the handshake, checkpoint ordering (CHECKPOINT_BEGIN is answered by
BEGUN), the ACK cadence, the acknowledgements of CHECKPOINT_DONE / RESTORED / DROP /
RETURN / RUNNING (CONFIRM), the resume offsets, the handoff (CLAIM / GRANT, RETURN,
RUNNING), and keepalive: a peer
silent for `dead_after` seconds is gone, which the driver treats like a cut link.
What the drivers own: the store, the bytes, the digests, and the decisions the
machines ask for (BeginRequested, ClaimRequested, ...).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from imgmig.protocol import peer_wire as wire
from imgmig.protocol import tunnel_wire
from imgmig.protocol.peer_wire import BeginStatus, ErrorCode, FrameType, PeerProtocolError

ACK_EVERY = 16 << 20
HELLO_TIMEOUT = 10.0   # from connect to the peer's HELLO; from our BEGIN to its BEGUN
PING_EVERY = 10.0      # a side that sent nothing for this long sends PING
DEAD_AFTER = 45.0      # a side that heard nothing for this long gives the link up


# ---- events for the drivers ---------------------------------------------------------------

@dataclass(frozen=True)
class HelloReceived:
    hello: wire.Hello


@dataclass(frozen=True)
class BeginRequested:
    """Cache: the proxy wants to send (resume=False) or continue (resume=True) a checkpoint;
    answer with `begun()` or `refuse()`."""
    checkpoint: str
    resume: bool


@dataclass(frozen=True)
class BeginAnswered:
    """Proxy: the cache holds the checkpoint now. `files` known, `held` bytes of each open one."""
    status: BeginStatus
    files: int
    held: dict[int, int]


@dataclass(frozen=True)
class FileBegun:
    file_id: int
    name: str


@dataclass(frozen=True)
class DataReceived:
    """Cache: payload bytes that arrived buffered together with frames (small files)."""
    file_id: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class FileEnded:
    """Cache: check the digest, then `file_verified()` or `refuse()`."""
    file_id: int
    size: int
    digest: bytes


@dataclass(frozen=True)
class FilesListed:
    """Cache: the dump ended cleanly with these `files`; an image not among them never comes."""
    files: int


@dataclass(frozen=True)
class CheckpointEnded:
    """Cache: the proxy sent everything (clean) or says the dump failed; answer with `done()`."""
    clean: bool
    files: int
    size: int


@dataclass(frozen=True)
class Acked:
    file_id: int
    size: int


@dataclass(frozen=True)
class Delivered:
    """Proxy: CHECKPOINT_DONE; ok means every digest matched at the cache."""
    ok: bool
    message: str


@dataclass(frozen=True)
class ClaimRequested:
    """Proxy: a restore on the cache wants the checkpoint; answer with `grant()`."""


@dataclass(frozen=True)
class GrantAnswered:
    """Cache: the proxy's answer to `claim()`."""
    granted: bool
    holder: str


@dataclass(frozen=True)
class RestoredReported:
    """Proxy: a restore on the cache read the whole checkpoint; `confirm_restored()` when acted upon."""


@dataclass(frozen=True)
class RunningReported:
    """Proxy: the restore on the cache confirmed that the process runs there as `pid`;
    release this copy, then `confirm_running()`."""
    pid: int


@dataclass(frozen=True)
class DropRequested:
    """Cache: the proxy restored the checkpoint itself; drop the copy, then `confirm_drop()`."""


@dataclass(frozen=True)
class RightReturned:
    """Proxy: a restore on the cache failed; the right is back here, and the cache keeps
    its copy for a retry. `confirm_return()` once the right is taken back."""


@dataclass(frozen=True)
class Confirmed:
    """The peer acted upon our CHECKPOINT_DONE, RESTORED, DROP, RETURN or RUNNING."""
    kind: FrameType


@dataclass(frozen=True)
class PeerError:
    """The peer sent ERROR and closes the connection."""
    code: int
    message: str


@dataclass(frozen=True)
class PrepareRequested:
    """Cache: a checkpoint with about `size` bytes of pages is coming (the proxy's PREPARE,
    before CHECKPOINT_BEGIN); make memory ready, then answer with `prepared()`."""
    size: int


@dataclass(frozen=True)
class LinkDead:
    """Nothing heard from the peer in time; treat the link as cut."""
    reason: str


Event = (HelloReceived | BeginRequested | BeginAnswered | FileBegun | DataReceived | FileEnded
         | FilesListed | CheckpointEnded | Acked | Delivered | ClaimRequested | GrantAnswered | RestoredReported
         | RunningReported | DropRequested | RightReturned | Confirmed | PeerError | LinkDead
         | PrepareRequested | tunnel_wire.TunnelFrame)
TUNNEL_FRAMES = (tunnel_wire.TunnelOpen, tunnel_wire.TunnelData, tunnel_wire.TunnelEof, tunnel_wire.TunnelReset)


class Phase(enum.Enum):
    HELLO = "hello"          # waiting for the peer's HELLO
    BEGIN = "begin"          # proxy: HELLO done, BEGIN not yet (or not yet answered); cache: waiting for BEGIN
    TRANSFER = "transfer"    # files flow
    ENDED = "ended"          # CHECKPOINT_END sent/received, DONE not yet
    HOLDING = "holding"      # DONE: claims, grants, RESTORED, RUNNING, DROP, RETURN
    CLOSED = "closed"        # nothing more; the driver closes the socket


# Where a connection goes on from after BEGUN (any other status ends it). RUNNING: the
# cache sends RUNNING next, the confirmation that reached it while the link was down.
_AFTER_BEGUN = {BeginStatus.NEW: Phase.TRANSFER, BeginStatus.RESUMED: Phase.TRANSFER,
                BeginStatus.COMPLETE: Phase.HOLDING, BeginStatus.RUNNING: Phase.HOLDING}


class _Side:
    """What both machines share: the decoder, the outbox, the timers."""

    def __init__(self, now: float, ping_every: float, dead_after: float) -> None:
        self.decoder = wire.FrameDecoder()
        self.phase = Phase.HELLO
        self.peer: wire.Hello | None = None
        self.checkpoint = ""
        self._out: list[bytes] = []
        self._ping_every, self._dead_after = ping_every, dead_after
        self._last_sent = self._last_heard = now
        self._answer_by: float | None = now + HELLO_TIMEOUT  # an answer from the peer is due by then
        self._waiting_for = "HELLO"
        self._deciding = False  # an event awaits the driver's answer; later frames wait
        self._now = now

    # ---- for the driver -----------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def last_heard(self) -> float:
        """When the peer last sent a byte (a PING counts)."""
        return self._last_heard

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes read from the link (b"" is not end of stream here: the driver handles EOF)."""
        if data:
            self._last_heard = now
        self._now = now
        self.decoder.feed(data)

    def next_event(self) -> Event | None:
        """The next event, or None until more bytes come (or a decision is made, or a
        payload is to be moved by the driver). Raises PeerProtocolError on a broken rule:
        answer it with `refuse(exc.code, str(exc))`."""
        while not self.closed and not self._deciding and self.decoder.payload is None:
            frame = self.decoder.next_event()
            if frame is None:
                return None
            if isinstance(frame, TUNNEL_FRAMES):
                return self._on_tunnel(frame)
            event = self._on_frame(frame, self._now)
            if event is not None:
                return event
        return None

    def _on_frame(self, frame: wire.Event, now: float) -> Event | None:
        raise NotImplementedError

    def send_tunnel(self, frames: bytes, now: float) -> None:
        """Queue tunnel frames (protocol/tunnel_wire.py) a lazy restore's page traffic made."""
        self._require((Phase.HOLDING,), "a tunnel frame")
        if frames:
            self._send(frames, now)

    def _on_tunnel(self, frame: tunnel_wire.TunnelFrame) -> tunnel_wire.TunnelFrame:
        """Tunnel frames carry a lazy restore's pages: only once the checkpoint is delivered."""
        if self.phase is not Phase.HOLDING:
            raise PeerProtocolError(f"{type(frame).__name__} before CHECKPOINT_DONE")
        return frame

    def data_to_send(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        return data

    def next_deadline(self) -> float | None:
        if self.closed:
            return None
        deadlines = [self._last_heard + self._dead_after]
        if self.phase is not Phase.HELLO:
            deadlines.append(self._last_sent + self._ping_every)
        if self._answer_by is not None:
            deadlines.append(self._answer_by)
        return min(deadlines)

    def handle_timeout(self, now: float) -> LinkDead | None:
        """Send a PING on an idle link; say LinkDead when the peer stayed silent too long."""
        if self.closed:
            return None
        if self._answer_by is not None and now >= self._answer_by:
            self.phase = Phase.CLOSED
            return LinkDead(f"no {self._waiting_for} within {HELLO_TIMEOUT:.0f} s")
        if now >= self._last_heard + self._dead_after:
            self.phase = Phase.CLOSED
            return LinkDead(f"nothing heard for {now - self._last_heard:.0f} s")
        if self.phase is not Phase.HELLO and now >= self._last_sent + self._ping_every:
            self._send(wire.encode_ping(), now)
        return None

    def refuse(self, code: ErrorCode, message: str) -> None:
        """Say why (one ERROR frame) and close."""
        if not self.closed:
            self._out.append(wire.encode_error(code, message))
            self.phase = Phase.CLOSED

    def close(self) -> None:
        self.phase = Phase.CLOSED

    # ---- for the subclasses --------------------------------------------------------------
    def _send(self, frame: bytes, now: float | None = None) -> None:
        self._out.append(frame)
        if now is not None:
            self._last_sent = now

    def _expect_answer(self, what: str, now: float) -> None:
        self._answer_by, self._waiting_for = now + HELLO_TIMEOUT, what

    def _answered(self) -> None:
        self._answer_by = None

    def _hello(self, frame: wire.Event, role: wire.Role) -> wire.Hello:
        if not isinstance(frame, wire.Hello):
            raise PeerProtocolError(f"expected HELLO first, got {type(frame).__name__}")
        if frame.role is not role:
            raise PeerProtocolError(f"the peer does not say it is a {role.name.lower()}")
        self.peer = frame
        self._answered()
        return frame

    def _require(self, phases: tuple[Phase, ...], what: str) -> None:
        """A driver calling out of turn is a bug in the driver, not in the peer."""
        if self.phase not in phases:
            raise RuntimeError(f"{what} in phase {self.phase.value}")

    def _for_this(self, checkpoint: str, frame: str) -> None:
        if checkpoint != self.checkpoint:
            raise PeerProtocolError(f"{frame} for checkpoint {checkpoint}, this connection carries {self.checkpoint}")


class ProxyConnection(_Side):
    """The proxy's side of one connection about one checkpoint.

    HELLO is queued at once. After the cache's HELLO (HelloReceived) the driver calls
    `begin()` once the previous checkpoint was answered; BeginAnswered says what the cache
    holds. Then files and `checkpoint_end()`; Delivered; then the connection stays for
    ClaimRequested / RightReturned (the connection goes on) / RestoredReported /
    RunningReported / `drop()` until the checkpoint is settled.
    """

    def __init__(self, node: str, checkpoint: str, digest: wire.Digest, now: float, *, resume: bool = False,
                 auth: wire.Auth = wire.Auth.NONE, memory_limit: int = 0, room: int = 0, ping_every: float = PING_EVERY,
                 dead_after: float = DEAD_AFTER) -> None:
        super().__init__(now, ping_every, dead_after)
        self.checkpoint = checkpoint
        self.resume = resume
        self.digest = digest
        self.sent: dict[int, int] = {}    # file id -> next offset on this connection
        self.acked: dict[int, int] = {}   # file id -> bytes the cache holds, by BEGUN and ACK
        self.claim_pending = False
        self.drop_sent = False
        self.listed: int | None = None  # FILES_LISTED sent on this connection, with this count
        self._send(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, node, digest, auth,
                                                memory_limit=memory_limit, room=room)), now)

    # ---- what the proxy says -----------------------------------------------------------------
    def begin(self, now: float) -> None:
        self._require((Phase.BEGIN,), "CHECKPOINT_BEGIN")
        if self._waiting_for == "BEGUN":
            raise RuntimeError("CHECKPOINT_BEGIN twice")
        self._send(wire.encode_checkpoint_begin(self.checkpoint, self.resume), now)
        self._expect_answer("BEGUN", now)

    def file_begin(self, file_id: int, name: str, now: float) -> None:
        self._require((Phase.TRANSFER,), "FILE_BEGIN")
        if self.listed is not None:
            raise RuntimeError(f"FILE_BEGIN for file id {file_id} after FILES_LISTED")
        self.sent[file_id] = 0
        self._send(wire.encode_file_begin(file_id, name), now)

    def continue_file(self, file_id: int) -> int:
        """A file the cache holds in part (BeginAnswered.held): where it continues."""
        self.sent[file_id] = self.acked[file_id]
        return self.sent[file_id]

    def file_data_header(self, file_id: int, offset: int, length: int, now: float) -> None:
        """Queue a FILE_DATA header; the driver sends `length` payload bytes right after it."""
        self._data(file_id, offset, length)
        self._send(wire.encode_file_data_header(file_id, offset, length), now)

    def file_data(self, file_id: int, offset: int, data: bytes, now: float) -> None:
        self._data(file_id, offset, len(data))
        self._send(wire.encode_file_data(file_id, offset, data), now)

    def file_end(self, file_id: int, size: int, digest: bytes, now: float) -> None:
        self._require((Phase.TRANSFER,), "FILE_END")
        if self.sent.get(file_id) != size:
            raise RuntimeError(f"FILE_END for file id {file_id} at {size}, {self.sent.get(file_id)} sent")
        self._send(wire.encode_file_end(file_id, size, digest), now)

    def files_listed(self, files: int, now: float) -> None:
        """The dump ended cleanly and all `files` are begun (the cache checks the count): no
        FILE_BEGIN may follow on this connection."""
        self._require((Phase.TRANSFER,), "FILES_LISTED")
        if self.listed is not None:
            raise RuntimeError("FILES_LISTED twice on one connection")
        self.listed = files
        self._send(wire.encode_files_listed(files), now)

    def checkpoint_end(self, clean: bool, files: int, size: int, now: float) -> None:
        self._require((Phase.TRANSFER,), "CHECKPOINT_END")
        self._send(wire.encode_checkpoint_end(clean, files, size), now)
        self.phase = Phase.ENDED

    def grant(self, granted: bool, holder: str, now: float) -> None:
        """Answer ClaimRequested: `holder` names the node that holds the right to restore."""
        if not self.claim_pending:
            raise RuntimeError("grant() answers no CLAIM")
        self.claim_pending = False
        self._send(wire.encode_grant(granted, self.checkpoint, holder), now)

    def confirm_restored(self, now: float) -> None:
        self._send(wire.encode_confirm(FrameType.RESTORED, self.checkpoint), now)
        self.phase = Phase.CLOSED

    def confirm_return(self, now: float) -> None:
        """Answer RightReturned: the right is back on this node. The connection goes on: the
        cache still holds its copy, and a retry there may CLAIM it again."""
        self._send(wire.encode_confirm(FrameType.RETURN, self.checkpoint), now)

    def confirm_running(self, now: float) -> None:
        """Answer RunningReported once this copy is released; the connection ends."""
        self._send(wire.encode_confirm(FrameType.RUNNING, self.checkpoint), now)
        self.phase = Phase.CLOSED

    def drop(self, now: float) -> None:
        """Restored on this node (a rollback): the cache must discard its copy (Confirmed)."""
        self._require((Phase.HOLDING,), "DROP")
        self.drop_sent = True
        self._send(wire.encode_drop(self.checkpoint), now)
        self._expect_answer("CONFIRM of DROP", now)

    def _data(self, file_id: int, offset: int, length: int) -> None:
        self._require((Phase.TRANSFER,), "FILE_DATA")
        if self.sent.get(file_id) != offset:
            raise RuntimeError(f"FILE_DATA for file id {file_id} at {offset}, next is {self.sent.get(file_id)}")
        self.sent[file_id] = offset + length

    # ---- what the cache says -----------------------------------------------------------------
    def _on_frame(self, frame: wire.Event, now: float) -> Event | None:
        if isinstance(frame, wire.Error):
            self.phase = Phase.CLOSED
            return PeerError(frame.code, frame.message)
        if self.phase is Phase.HELLO:
            return self._on_hello(frame)
        if isinstance(frame, wire.Ping):
            return None
        if isinstance(frame, wire.Begun):
            return self._on_begun(frame)
        if self.phase is Phase.BEGIN:
            raise PeerProtocolError(f"{type(frame).__name__} before BEGUN")
        if isinstance(frame, wire.Ack):
            return self._on_ack(frame)
        if isinstance(frame, wire.CheckpointDone):
            return self._on_done(frame, now)
        if isinstance(frame, wire.Claim):
            return self._on_claim(frame)
        if isinstance(frame, wire.Restored):
            self._for_this(frame.checkpoint, "RESTORED")
            if self.phase is not Phase.HOLDING:
                raise PeerProtocolError("RESTORED before CHECKPOINT_DONE")
            return RestoredReported()
        if isinstance(frame, wire.Running):
            self._for_this(frame.checkpoint, "RUNNING")
            if self.phase is not Phase.HOLDING:
                raise PeerProtocolError("RUNNING before CHECKPOINT_DONE")
            return RunningReported(frame.pid)
        if isinstance(frame, wire.Return):
            return self._on_return(frame)
        if isinstance(frame, wire.Confirm):
            return self._on_confirm(frame)
        raise PeerProtocolError(f"{type(frame).__name__} is not sent by a cache")

    def _on_hello(self, frame: wire.Event) -> Event:
        hello = self._hello(frame, wire.Role.CACHE)
        if hello.digest not in (self.digest, wire.Digest.SHA256):
            raise PeerProtocolError(f"the cache chose digest {hello.digest.name}, which was not offered")
        self.digest = hello.digest
        self.phase = Phase.BEGIN
        return HelloReceived(hello)

    def _on_begun(self, frame: wire.Begun) -> Event:
        self._for_this(frame.checkpoint, "BEGUN")
        if self.phase is not Phase.BEGIN or self._waiting_for != "BEGUN":
            raise PeerProtocolError("BEGUN that answers no CHECKPOINT_BEGIN")
        if frame.status is not BeginStatus.NEW and not self.resume:
            raise PeerProtocolError(f"BEGUN says {frame.status.name} for a checkpoint sent for the first time")
        self._answered()
        self._waiting_for = ""
        self.acked = dict(frame.held)
        self.phase = _AFTER_BEGUN.get(frame.status, Phase.CLOSED)
        return BeginAnswered(frame.status, frame.files, dict(frame.held))

    def _on_ack(self, frame: wire.Ack) -> Event:
        sent = self.sent.get(frame.file_id)
        if sent is None or frame.size > sent:
            raise PeerProtocolError(f"ACK of {frame.size} bytes for file id {frame.file_id}, "
                                    f"{'none' if sent is None else sent} were sent")
        self.acked[frame.file_id] = max(frame.size, self.acked.get(frame.file_id, 0))
        return Acked(frame.file_id, frame.size)

    def _on_done(self, frame: wire.CheckpointDone, now: float) -> Event:
        if self.phase is not Phase.ENDED:
            raise PeerProtocolError("CHECKPOINT_DONE before CHECKPOINT_END")
        if frame.ok:
            self.phase = Phase.HOLDING
            self._send(wire.encode_confirm(FrameType.CHECKPOINT_DONE, self.checkpoint), now)
        else:
            self.phase = Phase.CLOSED
        return Delivered(frame.ok, frame.message)

    def _on_claim(self, frame: wire.Claim) -> Event:
        self._for_this(frame.checkpoint, "CLAIM")
        if self.claim_pending:
            raise PeerProtocolError("a second CLAIM before the GRANT")
        self.claim_pending = True
        return ClaimRequested()

    def _on_return(self, frame: wire.Return) -> Event:
        self._for_this(frame.checkpoint, "RETURN")
        if self.phase is not Phase.HOLDING:
            raise PeerProtocolError("RETURN before CHECKPOINT_DONE")
        if self.drop_sent:  # the right is this node's already (a rollback): nothing to give back
            raise PeerProtocolError("RETURN of a right this proxy took for a rollback")
        return RightReturned()

    def _on_confirm(self, frame: wire.Confirm) -> Event:
        self._for_this(frame.checkpoint, "CONFIRM")
        if frame.kind is not FrameType.DROP or not self.drop_sent:
            raise PeerProtocolError(f"CONFIRM of a {frame.kind.name} this proxy never sent")
        self._answered()
        self.phase = Phase.CLOSED
        return Confirmed(FrameType.DROP)


_FILE_FRAMES = frozenset({wire.FileBegin, wire.FileData, wire.FileEnd, wire.CheckpointEnd})


class CacheConnection(_Side):
    """The cache's side of one connection about one checkpoint.

    HelloReceived -> `accept_hello()`; BeginRequested -> `begun()` (with the file order
    kept from a cut connection when it resumes) or `refuse()`; then FileBegun,
    DataReceived, payloads (`payload`, `consume_payload()`), FileEnded -> `file_verified()`,
    CheckpointEnded -> `done()`. Afterwards `claim()` (GrantAnswered), `restored()`
    (Confirmed), `running()` (Confirmed), `give_back()` (Confirmed; the connection goes
    on, and a retry may `claim()` again), DropRequested -> `confirm_drop()`.
    """

    def __init__(self, node: str, now: float, *, ack_every: int = ACK_EVERY, ping_every: float = PING_EVERY,
                 dead_after: float = DEAD_AFTER) -> None:
        super().__init__(now, ping_every, dead_after)
        self.node = node
        self.order: wire.InboundCheckpoint | None = None
        self.ack_every = ack_every
        self._unacked: dict[int, int] = {}
        self.claim_sent = False
        self.restored_sent = False
        self.running_sent = False
        self.return_sent = False
        self.prepare_asked = False
        self.prepare_answered = False

    # ---- the payload the driver moves itself --------------------------------------------------
    @property
    def payload(self) -> tuple[int, int, int] | None:
        """(file id, offset, bytes left) of the FILE_DATA payload next on the wire, if any."""
        payload = None if self.closed else self.decoder.payload
        if payload is not None:
            assert self.order is not None
            self.order.check_payload(payload[0], payload[1], 0)
        return payload

    def consume_payload(self, n: int, now: float) -> None:
        """The driver moved n payload bytes from the link into the file."""
        payload = self.decoder.payload
        assert payload is not None and self.order is not None
        self.order.check_payload(payload[0], payload[1], n)
        self.decoder.consume_payload(n)
        self._last_heard = now

    # ---- what the cache says ------------------------------------------------------------------
    def accept_hello(self, digest: wire.Digest, memory_limit: int, room: int, now: float) -> None:
        """Answer HelloReceived with the digest used here and this node's memory limit and room."""
        self._require((Phase.HELLO,), "HELLO")
        self._send(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.CACHE, self.node, digest,
                                                memory_limit=memory_limit, room=room)), now)
        self._deciding = False
        self.phase = Phase.BEGIN  # no timer: the proxy may wait for its previous checkpoint (PINGs meanwhile)

    def prepared(self, size: int, now: float) -> None:
        """Answer PrepareRequested with the bytes made ready (0: none)."""
        self._require((Phase.BEGIN,), "PREPARE")
        if not self.prepare_asked or self.prepare_answered:
            raise RuntimeError("prepared() answers no PREPARE")
        self._deciding = False
        self.prepare_answered = True
        self._send(wire.encode_prepare(size), now)

    def begun(self, status: BeginStatus, order: wire.InboundCheckpoint | None, now: float) -> None:
        """Answer BeginRequested. NEW: files come from 0; RESUMED: `order` is the file order
        kept from the cut connection; COMPLETE, RESTORED, GONE, RUNNING: nothing is to be
        sent (after RUNNING, say `running()` at once)."""
        self._require((Phase.BEGIN,), "BEGUN")
        if not self._deciding:
            raise RuntimeError("begun() answers no CHECKPOINT_BEGIN")
        self._deciding = False
        files, held = 0, ()
        if status is BeginStatus.NEW:
            assert self.peer is not None
            order = wire.InboundCheckpoint()
            order.check(self.peer)
            order.check(wire.CheckpointBegin(self.checkpoint))
        elif status is BeginStatus.RESUMED:
            if order is None or order.ended:
                raise RuntimeError("a resumed checkpoint needs the file order of an unfinished transfer")
            files, held = order.held()
        self.order = order
        self._send(wire.encode_begun(status, self.checkpoint, files, held), now)
        self.phase = _AFTER_BEGUN.get(status, Phase.CLOSED)

    def stored(self, file_id: int, size: int, n: int, now: float) -> None:
        """n more bytes of file_id are in the store, size in all: ACK every `ack_every` bytes."""
        self._unacked[file_id] = self._unacked.get(file_id, 0) + n
        if self._unacked[file_id] >= self.ack_every:
            self._ack(file_id, size, now)

    def file_verified(self, file_id: int, size: int, now: float) -> None:
        self._ack(file_id, size, now)

    def done(self, ok: bool, message: str, now: float) -> None:
        """Answer CheckpointEnded: ok once every file was verified and the checkpoint is complete."""
        self._require((Phase.ENDED,), "CHECKPOINT_DONE")
        self._deciding = False
        self._send(wire.encode_checkpoint_done(ok, message), now)
        self.phase = Phase.HOLDING if ok else Phase.CLOSED

    def claim(self, now: float) -> None:
        """A restore here wants the checkpoint: ask the proxy for the right (GrantAnswered)."""
        self._require((Phase.TRANSFER, Phase.ENDED, Phase.HOLDING), "CLAIM")
        if self.claim_sent:
            raise RuntimeError("a second CLAIM before the GRANT")
        self.claim_sent = True
        self._send(wire.encode_claim(self.checkpoint), now)
        self._expect_answer("GRANT", now)

    def restored(self, now: float) -> None:
        """A bare restore here read the whole checkpoint (whether it runs is not known);
        the proxy confirms (Confirmed)."""
        self._require((Phase.HOLDING,), "RESTORED")
        self._settling("RESTORED")
        self.restored_sent = True
        self._send(wire.encode_restored(self.checkpoint), now)
        self._expect_answer("CONFIRM of RESTORED", now)

    def running(self, pid: int, now: float) -> None:
        """The restore here confirmed that the process runs as `pid` and the copy here is
        released; the proxy releases its own and confirms (Confirmed)."""
        self._require((Phase.HOLDING,), "RUNNING")
        self._settling("RUNNING")
        self.running_sent = True
        self._send(wire.encode_running(self.checkpoint, pid), now)
        self._expect_answer("CONFIRM of RUNNING", now)

    def give_back(self, now: float) -> None:
        """A restore here that held the right failed: return the right (RETURN); the proxy
        confirms (Confirmed) and the connection goes on. The copy here stays, for a retry
        that claims the right again, or for the proxy's DROP after a rollback there."""
        self._require((Phase.HOLDING,), "RETURN")
        self._settling("RETURN")
        self.return_sent = True
        self._send(wire.encode_return(self.checkpoint), now)
        self._expect_answer("CONFIRM of RETURN", now)

    def confirm_drop(self, now: float) -> None:
        self._send(wire.encode_confirm(FrameType.DROP, self.checkpoint), now)
        self.phase = Phase.CLOSED

    def _settling(self, frame: str) -> None:
        """RESTORED, RUNNING and RETURN each wait for their CONFIRM; after RESTORED or
        RUNNING nothing more is said of the checkpoint."""
        if self.restored_sent or self.running_sent or self.return_sent:
            raise RuntimeError(f"{frame} after RESTORED, RUNNING or an unconfirmed RETURN")

    # ---- what the proxy says ------------------------------------------------------------------
    def _on_frame(self, frame: wire.Event, now: float) -> Event | None:
        if self.phase is Phase.TRANSFER and type(frame) in _FILE_FRAMES:  # the many; same outcome as below
            return self._on_transfer(frame)
        if isinstance(frame, wire.Error):
            self.phase = Phase.CLOSED
            return PeerError(frame.code, frame.message)
        if self.phase is Phase.HELLO:
            self._deciding = True
            return HelloReceived(self._hello(frame, wire.Role.PROXY))
        if isinstance(frame, wire.Ping):
            return None
        if self.phase is Phase.BEGIN:
            return self._on_begin(frame)
        if isinstance(frame, wire.Prepare):
            raise PeerProtocolError("PREPARE after CHECKPOINT_BEGIN")
        if isinstance(frame, wire.Grant):
            return self._on_grant(frame)
        if isinstance(frame, wire.Confirm):
            return self._on_confirm(frame)
        if isinstance(frame, wire.Drop):
            self._for_this(frame.checkpoint, "DROP")
            if self.phase is not Phase.HOLDING:
                raise PeerProtocolError("DROP before CHECKPOINT_DONE")
            return DropRequested()
        if self.phase is not Phase.TRANSFER:
            raise PeerProtocolError(f"{type(frame).__name__} after CHECKPOINT_END")
        return self._on_transfer(frame)

    def _on_begin(self, frame: wire.Event) -> Event:
        if isinstance(frame, wire.Prepare):
            if self.prepare_asked:
                raise PeerProtocolError("a second PREPARE on one connection")
            self.prepare_asked = True
            self._deciding = True
            return PrepareRequested(frame.size)
        if not isinstance(frame, wire.CheckpointBegin):
            raise PeerProtocolError(f"expected CHECKPOINT_BEGIN, got {type(frame).__name__}")
        self.checkpoint = frame.checkpoint
        self._deciding = True
        return BeginRequested(frame.checkpoint, frame.resume)

    def _on_transfer(self, frame: wire.Event) -> Event:
        assert self.order is not None
        self.order.check(frame)
        if isinstance(frame, wire.FileBegin):
            return FileBegun(frame.file_id, frame.name)
        if isinstance(frame, wire.FileData):
            return DataReceived(frame.file_id, frame.offset, frame.data)
        if isinstance(frame, wire.FileEnd):
            return FileEnded(frame.file_id, frame.size, frame.digest)
        if isinstance(frame, wire.FilesListed):
            return FilesListed(frame.files)
        assert isinstance(frame, wire.CheckpointEnd)
        self.phase = Phase.ENDED
        self._deciding = True
        return CheckpointEnded(frame.clean, frame.files, frame.size)

    def _on_grant(self, frame: wire.Grant) -> Event:
        self._for_this(frame.checkpoint, "GRANT")
        if not self.claim_sent:
            raise PeerProtocolError("GRANT without a CLAIM")
        self.claim_sent = False
        self._answered()
        return GrantAnswered(frame.granted, frame.holder)

    def _on_confirm(self, frame: wire.Confirm) -> Event:
        self._for_this(frame.checkpoint, "CONFIRM")
        if frame.kind is FrameType.CHECKPOINT_DONE and self.phase is Phase.HOLDING:
            return Confirmed(frame.kind)
        if frame.kind is FrameType.RETURN and self.return_sent:
            self._answered()
            self.return_sent = False  # the right is the proxy's again; a retry may CLAIM it
            return Confirmed(frame.kind)
        if (frame.kind is FrameType.RESTORED and self.restored_sent) \
                or (frame.kind is FrameType.RUNNING and self.running_sent):
            self._answered()
            self.phase = Phase.CLOSED
            return Confirmed(frame.kind)
        raise PeerProtocolError(f"CONFIRM of a {frame.kind.name} this cache never sent")

    def _ack(self, file_id: int, size: int, now: float) -> None:
        self._unacked[file_id] = 0
        self._send(wire.encode_ack(file_id, size), now)


class ProbeConnection:
    """The proxy's side of a probe link (roles/probe.py): who the cache is and its room,
    and, with `prepare` bytes, memory made ready there for a coming checkpoint. Sends
    HELLO (and PREPARE) at once; `done` once the cache answered each. Raises
    PeerProtocolError on anything else, ValueError when the cache refused (ERROR)."""

    def __init__(self, hello: wire.Hello, prepare: int = 0) -> None:
        self.decoder = wire.FrameDecoder()
        self.asked = prepare > 0
        self._out = [wire.encode_hello(hello)] + ([wire.encode_prepare(prepare)] if self.asked else [])
        self.hello: wire.Hello | None = None
        self.prepared: int | None = None

    @property
    def done(self) -> bool:
        return self.hello is not None and (self.prepared is not None or not self.asked)

    def data_to_send(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        return data

    def receive_data(self, data: bytes) -> None:
        self.decoder.feed(data)
        while not self.done and (frame := self.decoder.next_event()) is not None:
            self._on_frame(frame)

    def _on_frame(self, frame: wire.Event | tunnel_wire.TunnelFrame) -> None:
        if isinstance(frame, wire.Error):
            raise ValueError(f"it refused this node: {frame.message}")
        if self.hello is None:
            if not isinstance(frame, wire.Hello) or frame.role is not wire.Role.CACHE:
                raise PeerProtocolError(f"it answered {type(frame).__name__}, not a cache's HELLO")
            self.hello = frame
        elif isinstance(frame, wire.Prepare):
            self.prepared = frame.size
        elif not isinstance(frame, wire.Ping):
            raise PeerProtocolError(f"it answered PREPARE with {type(frame).__name__}")
