"""The imgmig node-to-node protocol (proxy -> cache over TCP), sans-IO.

See docs/protocol.md. Every frame is
    u32 length (big-endian, counts type + body) | u8 type | body
with all integers big-endian. FILE_DATA bodies are `u32 file_id | u64 offset | payload`;
the decoder exposes the payload so that the I/O layer can splice it straight from the
socket into the image's memfd without Python ever holding it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import IntEnum

from imgmig.protocol import tunnel_wire

MAGIC = b"IMGMIG"
VERSION = 4
MAX_CONTROL_FRAME = 64 * 1024
MAX_DATA_PAYLOAD = 4 * 1024 * 1024
MAX_NAME = 255
MAX_MESSAGE = 1024
DATA_HEADER = 1 + 4 + 8  # type, file_id, offset


class FrameType(IntEnum):
    HELLO = 1
    CHECKPOINT_BEGIN = 2
    FILE_BEGIN = 3
    FILE_DATA = 4
    FILE_END = 5
    CHECKPOINT_END = 6
    ACK = 7
    CHECKPOINT_DONE = 8
    RESTORED = 9
    ERROR = 10
    DROP = 11
    BEGUN = 12
    CLAIM = 13
    GRANT = 14
    CONFIRM = 15
    PING = 16
    RETURN = 17
    RUNNING = 18
    FILES_LISTED = 19
    PREPARE = 20


class Role(IntEnum):
    PROXY = 1
    CACHE = 2


class Digest(IntEnum):
    SHA256 = 1
    XXH3_128 = 2


class Auth(IntEnum):
    NONE = 0
    TLS = 1  # the link is mutual TLS; the node name is the certificate's


class ErrorCode(IntEnum):
    PROTOCOL = 1
    VERSION = 2
    REFUSED = 3
    DUPLICATE_FILE = 4
    DIGEST_MISMATCH = 5
    INTERNAL = 6
    TOO_LARGE = 7
    TIMEOUT = 8


class BeginStatus(IntEnum):
    """What the cache holds of a checkpoint when it answers CHECKPOINT_BEGIN."""
    NEW = 0        # nothing: send every file from offset 0
    RESUMED = 1    # part of it: continue each file from the offsets in BEGUN
    COMPLETE = 2   # all of it, verified: nothing to send
    RESTORED = 3   # a restore here read all of it: nothing to send
    GONE = 4       # it was dropped or failed here: do not send it again
    RUNNING = 5    # a restore here confirmed the process runs: RUNNING follows, release your copy


class PeerProtocolError(ValueError):
    """The peer broke the protocol; `code` says which ERROR frame to answer with."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Hello:
    version: int
    role: Role
    node: str
    digest: Digest = Digest.SHA256
    auth: Auth = Auth.NONE
    auth_data: bytes = b""
    memory_limit: int = 0  # the sender's memory.limit in bytes
    room: int = 0          # of which free when it said HELLO


@dataclass(frozen=True)
class CheckpointBegin:
    checkpoint: str
    resume: bool = False


@dataclass(frozen=True)
class FileBegin:
    file_id: int
    name: str


@dataclass(frozen=True)
class FileData:
    file_id: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class FileEnd:
    file_id: int
    size: int
    digest: bytes


@dataclass(frozen=True)
class CheckpointEnd:
    clean: bool
    files: int
    size: int


@dataclass(frozen=True)
class FilesListed:
    """Proxy to cache: the dump ended cleanly and every file of the checkpoint is begun,
    `files` of them; no other comes. Sent before the last bytes, so that a restore there
    learns at once which images are absent."""
    files: int


@dataclass(frozen=True)
class Prepare:
    """Proxy to cache, before CHECKPOINT_BEGIN: a checkpoint with about `size` bytes of
    pages is coming; make memory ready for it. Cache to proxy: the bytes made ready."""
    size: int


@dataclass(frozen=True)
class Ack:
    file_id: int
    size: int


@dataclass(frozen=True)
class CheckpointDone:
    ok: bool
    message: str


@dataclass(frozen=True)
class Restored:
    checkpoint: str


@dataclass(frozen=True)
class Error:
    code: int
    message: str


@dataclass(frozen=True)
class Drop:
    """Proxy to cache: the source restored this checkpoint (a rollback); discard your copy."""
    checkpoint: str


@dataclass(frozen=True)
class Begun:
    """Cache to proxy, the answer to CHECKPOINT_BEGIN: from now on the checkpoint is in
    the cache's store. `files` FILE_BEGINs are known (file ids 0..files-1); those in `held`
    are still open, with the bytes held of each; every other known file is complete."""
    status: BeginStatus
    checkpoint: str
    files: int = 0
    held: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Claim:
    """Cache to proxy: a restore wants this checkpoint; may the cache serve it?"""
    checkpoint: str


@dataclass(frozen=True)
class Grant:
    """Proxy to cache: the answer to CLAIM; `holder` names the node that holds the right."""
    granted: bool
    checkpoint: str
    holder: str


@dataclass(frozen=True)
class Return:
    """Cache to proxy: a restore here that held the right failed; the right goes back to
    the proxy, and the cache keeps its copy for a retry (the proxy may grant it again)."""
    checkpoint: str


@dataclass(frozen=True)
class Running:
    """Cache to proxy: the restore here confirmed that the process runs, as `pid` (the
    restore's own report, CRIU's exit status); the cache released its copy."""
    checkpoint: str
    pid: int


@dataclass(frozen=True)
class Confirm:
    """Either way: the frame of type `kind` (CHECKPOINT_DONE, RESTORED, DROP, RETURN, RUNNING) about this
    checkpoint has been acted upon."""
    kind: FrameType
    checkpoint: str


@dataclass(frozen=True)
class Ping:
    """Either way, on an idle link: I am alive."""


Event = (Hello | CheckpointBegin | FileBegin | FileData | FileEnd | FilesListed | CheckpointEnd | Ack
         | CheckpointDone | Restored | Error | Drop | Begun | Claim | Grant | Confirm | Ping | Return | Running
         | Prepare)
CONFIRMABLE = (FrameType.CHECKPOINT_DONE, FrameType.RESTORED, FrameType.DROP, FrameType.RETURN, FrameType.RUNNING)
MAX_HELD = 4096  # open files listed in one BEGUN (13 bytes each: well under a control frame)

_U8, _U16, _U32, _U64 = (struct.Struct(f">{c}") for c in "BHIQ")
_HEAD = struct.Struct(">IB")
_DATA_HEAD = struct.Struct(">IBIQ")


def _frame(kind: FrameType, body: bytes) -> bytes:
    return _HEAD.pack(len(body) + 1, kind) + body


def _str8(text: str, limit: int = MAX_NAME) -> bytes:
    raw = text.encode()
    if len(raw) > limit:
        raise ValueError(f"{text[:32]!r}... is longer than {limit} bytes")
    return _U8.pack(len(raw)) + raw


def _str16(text: str) -> bytes:
    # The decoder refuses control characters and broken UTF-8: never send either.
    text = "".join(c if c.isprintable() else " " for c in text)
    raw = text.encode()[:MAX_MESSAGE].decode(errors="ignore").encode()
    return _U16.pack(len(raw)) + raw


def encode_hello(hello: Hello) -> bytes:
    if len(hello.auth_data) > MAX_MESSAGE:
        raise ValueError("auth data too long")
    body = (MAGIC + _U16.pack(hello.version) + bytes([hello.role, hello.digest, hello.auth])
            + _str8(hello.node) + _U16.pack(len(hello.auth_data)) + hello.auth_data
            + _U64.pack(hello.memory_limit) + _U64.pack(hello.room))
    return _frame(FrameType.HELLO, body)


def encode_checkpoint_begin(checkpoint: str, resume: bool = False) -> bytes:
    return _frame(FrameType.CHECKPOINT_BEGIN, bytes([int(resume)]) + _str8(checkpoint))


def encode_file_begin(file_id: int, name: str) -> bytes:
    return _frame(FrameType.FILE_BEGIN, _U32.pack(file_id) + _str8(name))


def encode_file_data_header(file_id: int, offset: int, length: int) -> bytes:
    """The header of a FILE_DATA frame; `length` payload bytes must follow it."""
    if not 0 < length <= MAX_DATA_PAYLOAD:
        raise ValueError(f"payload length {length} outside 1..{MAX_DATA_PAYLOAD}")
    return _DATA_HEAD.pack(DATA_HEADER + length, FrameType.FILE_DATA, file_id, offset)


def encode_file_data(file_id: int, offset: int, data: bytes) -> bytes:
    return encode_file_data_header(file_id, offset, len(data)) + data


def encode_file_end(file_id: int, size: int, digest: bytes) -> bytes:
    return _frame(FrameType.FILE_END, _U32.pack(file_id) + _U64.pack(size) + _U8.pack(len(digest)) + digest)


def encode_checkpoint_end(clean: bool, files: int, size: int) -> bytes:
    return _frame(FrameType.CHECKPOINT_END, bytes([int(clean)]) + _U32.pack(files) + _U64.pack(size))


def encode_files_listed(files: int) -> bytes:
    return _frame(FrameType.FILES_LISTED, _U32.pack(files))


def encode_prepare(size: int) -> bytes:
    return _frame(FrameType.PREPARE, _U64.pack(size))


def encode_ack(file_id: int, size: int) -> bytes:
    return _frame(FrameType.ACK, _U32.pack(file_id) + _U64.pack(size))


def encode_checkpoint_done(ok: bool, message: str) -> bytes:
    return _frame(FrameType.CHECKPOINT_DONE, bytes([int(ok)]) + _str16(message))


def encode_restored(checkpoint: str) -> bytes:
    return _frame(FrameType.RESTORED, _str8(checkpoint))


def encode_drop(checkpoint: str) -> bytes:
    return _frame(FrameType.DROP, _str8(checkpoint))


def encode_error(code: ErrorCode, message: str) -> bytes:
    return _frame(FrameType.ERROR, _U16.pack(code) + _str16(message))


def encode_begun(status: BeginStatus, checkpoint: str, files: int = 0,
                 held: tuple[tuple[int, int], ...] = ()) -> bytes:
    if len(held) > MAX_HELD:
        raise ValueError(f"{len(held)} open files, at most {MAX_HELD} fit in BEGUN")
    body = bytes([status]) + _str8(checkpoint) + _U32.pack(files) + _U16.pack(len(held))
    body += b"".join(_U32.pack(file_id) + _U64.pack(size) for file_id, size in held)
    return _frame(FrameType.BEGUN, body)


def encode_claim(checkpoint: str) -> bytes:
    return _frame(FrameType.CLAIM, _str8(checkpoint))


def encode_grant(granted: bool, checkpoint: str, holder: str) -> bytes:
    return _frame(FrameType.GRANT, bytes([int(granted)]) + _str8(checkpoint) + _str8(holder))


def encode_confirm(kind: FrameType, checkpoint: str) -> bytes:
    if kind not in CONFIRMABLE:
        raise ValueError(f"{kind.name} is not confirmed")
    return _frame(FrameType.CONFIRM, bytes([kind]) + _str8(checkpoint))


def encode_ping() -> bytes:
    return _frame(FrameType.PING, b"")


def encode_return(checkpoint: str) -> bytes:
    return _frame(FrameType.RETURN, _str8(checkpoint))


def encode_running(checkpoint: str, pid: int) -> bytes:
    return _frame(FrameType.RUNNING, _str8(checkpoint) + _U32.pack(pid))


class _Body:
    """A cursor over one frame body that raises PeerProtocolError on any short read."""

    def __init__(self, kind: FrameType, data: bytes) -> None:
        self.kind, self.data, self.pos = kind, data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise PeerProtocolError(f"{self.kind.name} frame is truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return _U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack(self.take(8))[0]

    def flag(self) -> bool:
        value = self.u8()
        if value > 1:
            raise PeerProtocolError(f"{self.kind.name} frame has flag byte {value}, expected 0 or 1")
        return bool(value)

    def text(self, size: int, what: str) -> str:
        raw = self.take(size)
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise PeerProtocolError(f"{self.kind.name} frame: {what} is not UTF-8") from None
        if not text.isprintable():
            raise PeerProtocolError(f"{self.kind.name} frame: {what} has control characters")
        return text

    def name(self, what: str) -> str:
        size = self.u8()
        text = self.text(size, what)
        if not text or "/" in text or text in (".", ".."):
            raise PeerProtocolError(f"{self.kind.name} frame: invalid {what} {text!r}")
        return text

    def message(self) -> str:
        return self.text(self.u16(), "message")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise PeerProtocolError(f"{self.kind.name} frame has {len(self.data) - self.pos} trailing bytes")


def _decode_hello(body: _Body) -> Hello:
    if body.take(len(MAGIC)) != MAGIC:
        raise PeerProtocolError("not an imgmig peer (bad magic in HELLO)")
    version = body.u16()
    if version != VERSION:
        raise PeerProtocolError(f"protocol version {version} is not supported (this node speaks {VERSION})",
                                ErrorCode.VERSION)
    role, digest, auth = body.u8(), body.u8(), body.u8()
    node = body.name("node name")
    auth_data = body.take(body.u16())
    try:
        hello = Hello(version, Role(role), node, Digest(digest), Auth(auth), auth_data)
    except ValueError as exc:
        raise PeerProtocolError(f"HELLO: {exc}") from None
    if hello.auth is Auth.NONE and auth_data:
        raise PeerProtocolError("HELLO: auth data present without an auth method")
    return replace(hello, memory_limit=body.u64(), room=body.u64())


def _decode_begun(body: _Body) -> Begun:
    try:
        status = BeginStatus(body.u8())
    except ValueError as exc:
        raise PeerProtocolError(f"BEGUN: {exc}") from None
    checkpoint, files = body.name("checkpoint id"), body.u32()
    held = tuple((body.u32(), body.u64()) for _ in range(body.u16()))
    return Begun(status, checkpoint, files, held)


def _decode_confirm(body: _Body) -> Confirm:
    kind = body.u8()
    if kind not in CONFIRMABLE:
        raise PeerProtocolError(f"CONFIRM of frame type {kind}, which is never confirmed")
    return Confirm(FrameType(kind), body.name("checkpoint id"))


def _decode_control(kind: FrameType, data: bytes) -> Event:
    body = _Body(kind, data)
    event: Event
    if kind is FrameType.HELLO:
        event = _decode_hello(body)
    elif kind is FrameType.CHECKPOINT_BEGIN:
        resume = body.flag()
        event = CheckpointBegin(body.name("checkpoint id"), resume)
    elif kind is FrameType.FILE_BEGIN:
        event = FileBegin(body.u32(), body.name("file name"))
    elif kind is FrameType.FILE_END:
        file_id, size = body.u32(), body.u64()
        event = FileEnd(file_id, size, body.take(body.u8()))
    elif kind is FrameType.CHECKPOINT_END:
        event = CheckpointEnd(body.flag(), body.u32(), body.u64())
    elif kind is FrameType.FILES_LISTED:
        event = FilesListed(body.u32())
    elif kind is FrameType.ACK:
        event = Ack(body.u32(), body.u64())
    elif kind is FrameType.CHECKPOINT_DONE:
        event = CheckpointDone(body.flag(), body.message())
    elif kind is FrameType.RESTORED:
        event = Restored(body.name("checkpoint id"))
    elif kind is FrameType.DROP:
        event = Drop(body.name("checkpoint id"))
    elif kind is FrameType.BEGUN:
        event = _decode_begun(body)
    elif kind is FrameType.CLAIM:
        event = Claim(body.name("checkpoint id"))
    elif kind is FrameType.GRANT:
        granted = body.flag()
        event = Grant(granted, body.name("checkpoint id"), body.name("holder"))
    elif kind is FrameType.CONFIRM:
        event = _decode_confirm(body)
    elif kind is FrameType.PING:
        event = Ping()
    elif kind is FrameType.RETURN:
        event = Return(body.name("checkpoint id"))
    elif kind is FrameType.RUNNING:
        event = Running(body.name("checkpoint id"), body.u32())
    elif kind is FrameType.PREPARE:
        event = Prepare(body.u64())
    else:
        event = Error(body.u16(), body.message())
    body.end()
    return event


class FrameDecoder:
    """Turns a byte stream into events. FILE_DATA payloads come out as FileData events
    from buffered bytes, or are skipped by the I/O layer with `consume_payload()` after it
    moved them itself (splice)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._payload_left = 0
        self._payload_file = 0
        self._payload_offset = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def payload(self) -> tuple[int, int, int] | None:
        """(file_id, offset, bytes left) while inside a FILE_DATA payload with nothing buffered."""
        if self._payload_left and not self._buf:
            return self._payload_file, self._payload_offset, self._payload_left
        return None

    def consume_payload(self, n: int) -> None:
        if not 0 < n <= self._payload_left or self._buf:
            raise RuntimeError("consume_payload outside an unbuffered payload")
        self._payload_left -= n
        self._payload_offset += n

    def next_event(self) -> Event | tunnel_wire.TunnelFrame | None:
        if self._payload_left:
            return self._buffered_payload()
        if len(self._buf) < _HEAD.size:
            return None
        length, kind_value = _HEAD.unpack_from(self._buf)
        if kind_value in tunnel_wire.TUNNEL_TYPES:
            return self._tunnel_frame(length, kind_value)
        try:
            kind = FrameType(kind_value)
        except ValueError:
            raise PeerProtocolError(f"unknown frame type {kind_value}") from None
        if kind is FrameType.FILE_DATA:
            return self._data_header(length)
        if not 1 <= length <= MAX_CONTROL_FRAME:
            raise PeerProtocolError(f"{kind.name} frame length {length} outside 1..{MAX_CONTROL_FRAME}")
        if len(self._buf) < 4 + length:
            return None
        body = bytes(self._buf[_HEAD.size:4 + length])
        del self._buf[:4 + length]
        return _decode_control(kind, body)

    def _tunnel_frame(self, length: int, kind: int) -> tunnel_wire.TunnelFrame | None:
        """A lazy migration's page-server bytes (protocol/tunnel_wire.py), bounded like a control frame."""
        if not 1 <= length <= MAX_CONTROL_FRAME:
            raise PeerProtocolError(f"tunnel frame length {length} outside 1..{MAX_CONTROL_FRAME}")
        if len(self._buf) < 4 + length:
            return None
        body = bytes(self._buf[_HEAD.size:4 + length])
        del self._buf[:4 + length]
        try:
            return tunnel_wire.decode(kind, body)
        except tunnel_wire.TunnelError as exc:
            raise PeerProtocolError(str(exc)) from None

    def _data_header(self, length: int) -> Event | None:
        payload = length - DATA_HEADER
        if not 0 < payload <= MAX_DATA_PAYLOAD:
            raise PeerProtocolError(f"FILE_DATA payload length {payload} outside 1..{MAX_DATA_PAYLOAD}")
        if len(self._buf) < _DATA_HEAD.size:
            return None
        _, _, file_id, offset = _DATA_HEAD.unpack_from(self._buf)
        del self._buf[:_DATA_HEAD.size]
        self._payload_file, self._payload_offset, self._payload_left = file_id, offset, payload
        return self._buffered_payload()

    def _buffered_payload(self) -> FileData | None:
        n = min(len(self._buf), self._payload_left)
        if not n:
            return None
        data = bytes(self._buf[:n])
        del self._buf[:n]
        event = FileData(self._payload_file, self._payload_offset, data)
        self._payload_left -= n
        self._payload_offset += n
        return event


class InboundCheckpoint:
    """The cache's view of one proxy connection: checks that frames come in a legal order.

    HELLO, CHECKPOINT_BEGIN, then FILE_BEGIN/FILE_DATA/FILE_END in any interleaving,
    FILES_LISTED once every file is begun (no FILE_BEGIN after it), then CHECKPOINT_END.
    File ids count up from 0, offsets are contiguous, a name may appear once. The cache
    keeps this object across connections: a resumed checkpoint continues from what it
    says was received (`held()`).
    """

    def __init__(self) -> None:
        self.hello: Hello | None = None
        self.checkpoint: str | None = None
        self.ended = False
        self.listed: int | None = None  # FILES_LISTED's count, on any connection
        self._names: dict[int, str] = {}
        self._name_set: set[str] = set()  # the values of _names: a duplicate check in O(1), not O(files)
        self._received: dict[int, int] = {}
        self._open: set[int] = set()

    def check(self, event: Event) -> None:
        if self.hello is None:
            if not isinstance(event, Hello):
                raise PeerProtocolError(f"expected HELLO first, got {type(event).__name__}")
            if event.role is not Role.PROXY:
                raise PeerProtocolError("the connecting peer does not say it is a proxy")
            self.hello = event
            return
        if isinstance(event, Error):
            return
        if self.checkpoint is None:
            if not isinstance(event, CheckpointBegin):
                raise PeerProtocolError(f"expected CHECKPOINT_BEGIN, got {type(event).__name__}")
            self.checkpoint = event.checkpoint
            return
        if isinstance(event, Drop):
            if not self.ended or event.checkpoint != self.checkpoint:
                raise PeerProtocolError("DROP before CHECKPOINT_END or for another checkpoint")
            return
        if self.ended:
            raise PeerProtocolError(f"{type(event).__name__} after CHECKPOINT_END")
        if isinstance(event, FileBegin):
            self._file_begin(event)
        elif isinstance(event, FileData):
            self.check_payload(event.file_id, event.offset, len(event.data))
        elif isinstance(event, FileEnd):
            self._file_end(event)
        elif isinstance(event, FilesListed):
            self._files_listed(event)
        elif isinstance(event, CheckpointEnd):
            self._checkpoint_end(event)
        else:
            raise PeerProtocolError(f"{type(event).__name__} is not sent by a proxy")

    def check_payload(self, file_id: int, offset: int, length: int) -> None:
        if file_id not in self._open:
            raise PeerProtocolError(f"FILE_DATA for file id {file_id}, which is not open")
        if offset != self._received[file_id]:
            raise PeerProtocolError(f"FILE_DATA for {self._names[file_id]} at offset {offset}, "
                                    f"expected {self._received[file_id]}")
        self._received[file_id] += length

    @classmethod
    def taken_back(cls, checkpoint: str, files: list[tuple[str, int, bool]]) -> InboundCheckpoint:
        """The order of a transfer kept over a restart: files by id as (name, bytes held, ended)."""
        order = cls()
        order.hello = Hello(VERSION, Role.PROXY, checkpoint)  # the handshake happened on an earlier connection
        order.checkpoint = checkpoint
        for file_id, (name, size, ended) in enumerate(files):
            order._names[file_id] = name
            order._name_set.add(name)
            order._received[file_id] = size
            if not ended:
                order._open.add(file_id)
        return order

    def held(self) -> tuple[int, tuple[tuple[int, int], ...]]:
        """What BEGUN reports on a resume: files known, and the bytes received of each open one."""
        return len(self._names), tuple(sorted((file_id, self._received[file_id]) for file_id in self._open))

    def _file_begin(self, event: FileBegin) -> None:
        if self.listed is not None:
            raise PeerProtocolError(f"FILE_BEGIN for {event.name} after FILES_LISTED said {self.listed} files")
        if event.file_id in self._names:
            raise PeerProtocolError(f"file id {event.file_id} used twice")
        if event.file_id != len(self._names):
            raise PeerProtocolError(f"FILE_BEGIN with file id {event.file_id}, expected {len(self._names)}")
        if event.name in self._name_set:
            raise PeerProtocolError(f"file {event.name} sent twice in checkpoint {self.checkpoint}",
                                    ErrorCode.DUPLICATE_FILE)
        self._names[event.file_id] = event.name
        self._name_set.add(event.name)
        self._received[event.file_id] = 0
        self._open.add(event.file_id)

    def _file_end(self, event: FileEnd) -> None:
        if event.file_id not in self._open:
            raise PeerProtocolError(f"FILE_END for file id {event.file_id}, which is not open")
        if event.size != self._received[event.file_id]:
            raise PeerProtocolError(f"FILE_END for {self._names[event.file_id]} says {event.size} bytes, "
                                    f"{self._received[event.file_id]} arrived")
        self._open.discard(event.file_id)

    def _files_listed(self, event: FilesListed) -> None:
        """Also on every resumed connection: the count never changes."""
        if event.files != len(self._names):
            raise PeerProtocolError(f"FILES_LISTED counts {event.files} files, {len(self._names)} were begun")
        self.listed = event.files

    def _checkpoint_end(self, event: CheckpointEnd) -> None:
        if event.clean and self._open:
            raise PeerProtocolError(f"clean CHECKPOINT_END with {len(self._open)} files still open")
        if event.clean and event.files != len(self._names):
            raise PeerProtocolError(f"CHECKPOINT_END counts {event.files} files, {len(self._names)} were sent")
        self.ended = True
