"""CRIU's image-streaming protocol (`criu dump|restore --stream`), sans-IO.

Wire format (criu/img-streamer.c, images/img-streamer.proto):
  frame   = u32 length (host order) + protobuf bytes
  request = img_streamer_request_entry { required string filename = 1; }   CRIU -> us
  reply   = img_streamer_reply_entry   { required bool exists = 1; }       us -> CRIU
Each pipe end is passed with SCM_RIGHTS on a 1-byte dummy payload that follows the
request (capture) or our exists=true reply (serve). No sockets here: the I/O layer feeds
bytes and received fds in and writes out what the encoders return.
"""

from __future__ import annotations

import struct
import sys
from collections import deque
from dataclasses import dataclass

MAX_MESSAGE = 4096  # a request is a file name: anything larger is garbage
MAX_NAME = 255
MAX_QUEUED_FDS = 1  # an fd may arrive ahead of its dummy byte, but never more than one
_LEN = struct.Struct("<I" if sys.byteorder == "little" else ">I")


# recvmsg's MSG_CTRUNC: fds were passed but not all were received. Each message carries one
# pipe, so either CRIU passed more than it should, or the receiver had no fd numbers left.
FDS_CUT_OFF = ("the kernel cut off the fds CRIU passed (this daemon is out of file descriptors, "
               "or CRIU passed more than one per message)")


class CriuProtocolError(ValueError):
    """The CRIU peer sent something this protocol does not allow."""


@dataclass(frozen=True)
class ImageOffered:
    """Capture: CRIU will write `name` into the pipe whose read end is `fd`."""
    name: str
    fd: int


@dataclass(frozen=True)
class ImageRequested:
    """Serve: CRIU asks whether `name` exists; answer with reply()."""
    name: str


@dataclass(frozen=True)
class PipeGiven:
    """Serve: after exists=true, the write end `fd` CRIU reads `name` from."""
    name: str
    fd: int


Event = ImageOffered | ImageRequested | PipeGiven


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            break
    raise CriuProtocolError("malformed protobuf varint")


def encode_request(name: str) -> bytes:
    """What CRIU sends: used by the simulated CRIU client in tests and tools."""
    raw = name.encode()
    body = b"\x0a" + encode_varint(len(raw)) + raw
    return _LEN.pack(len(body)) + body


def encode_reply(exists: bool) -> bytes:
    """Our answer to a restore request; exists=false is encoded explicitly."""
    body = b"\x08" + (b"\x01" if exists else b"\x00")
    return _LEN.pack(len(body)) + body


def decode_request_body(body: bytes) -> str:
    """Parse img_streamer_request_entry; unknown fields are skipped as proto2 allows."""
    name: str | None = None
    pos = 0
    while pos < len(body):
        key, pos = decode_varint(body, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = decode_varint(body, pos)
        elif wire_type == 2:
            length, pos = decode_varint(body, pos)
            if pos + length > len(body):
                raise CriuProtocolError("protobuf field runs past the end of the message")
            if field == 1:
                name = _checked_name(body[pos:pos + length])
            pos += length
        elif wire_type == 5 and pos + 4 <= len(body):
            pos += 4
        elif wire_type == 1 and pos + 8 <= len(body):
            pos += 8
        else:
            raise CriuProtocolError(f"unsupported protobuf wire type {wire_type}")
    if name is None:
        raise CriuProtocolError("request without the required filename field")
    return name


def decode_reply_body(body: bytes) -> bool:
    """Parse img_streamer_reply_entry (used by the simulated CRIU client)."""
    if len(body) == 2 and body[0] == 0x08 and body[1] in (0, 1):
        return bool(body[1])
    raise CriuProtocolError(f"malformed reply {body.hex()}")


def _checked_name(raw: bytes) -> str:
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        raise CriuProtocolError("file name is not UTF-8") from None
    if not name or len(raw) > MAX_NAME or "/" in name or name in (".", "..") or not name.isprintable():
        raise CriuProtocolError(f"invalid image file name {name[:64]!r}")
    return name


class _FrameReader:
    """Accumulates bytes and fds; yields complete frames and fd-carrying dummy bytes."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: deque[int] = deque()

    def feed(self, data: bytes, fds: list[int]) -> None:
        self._buf += data
        self._fds.extend(fds)

    def frame(self) -> bytes | None:
        if len(self._buf) < 4:
            return None
        (length,) = _LEN.unpack_from(self._buf)
        if length == 0 or length > MAX_MESSAGE:
            raise CriuProtocolError(f"frame length {length} outside 1..{MAX_MESSAGE}")
        if len(self._buf) < 4 + length:
            return None
        body = bytes(self._buf[4:4 + length])
        del self._buf[:4 + length]
        return body

    def passed_fd(self) -> int | None:
        """The dummy byte and its fd, once both are in."""
        if not self._buf:
            return None
        if not self._fds:
            raise CriuProtocolError("expected a pipe fd with SCM_RIGHTS, got plain bytes")
        del self._buf[:1]
        return self._fds.popleft()

    def check_queued_fds(self) -> None:
        """Unmatched fds would pile up (a peer can pass 16 per message): refuse them."""
        if len(self._fds) > MAX_QUEUED_FDS:
            raise CriuProtocolError(f"{len(self._fds)} pipe fds passed without the requests they belong to")

    def give_back(self, fds: list[int]) -> None:
        """Fds of events a failed receive() never returned: fds_to_close() must hand them out."""
        self._fds.extendleft(reversed(fds))

    def stray_fds(self) -> list[int]:
        fds = list(self._fds)
        self._fds.clear()
        return fds

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    @property
    def pending_fds(self) -> int:
        return len(self._fds)


class CaptureConnection:
    """State of one `criu dump --stream` connection: request, then fd, repeated."""

    def __init__(self) -> None:
        self._reader = _FrameReader()
        self._pending_name: str | None = None

    def receive(self, data: bytes, fds: list[int] | None = None) -> list[ImageOffered]:
        self._reader.feed(data, fds or [])
        events: list[ImageOffered] = []
        try:
            self._decode(events)
            self._reader.check_queued_fds()
        except CriuProtocolError:
            self._reader.give_back([event.fd for event in events])
            raise
        return events

    def _decode(self, events: list[ImageOffered]) -> None:
        while True:
            if self._pending_name is None:
                body = self._reader.frame()
                if body is None:
                    return
                self._pending_name = decode_request_body(body)
            else:
                fd = self._reader.passed_fd()
                if fd is None:
                    return
                events.append(ImageOffered(self._pending_name, fd))
                self._pending_name = None

    def fds_to_close(self) -> list[int]:
        """Fds received but not handed out in an event (on error or close)."""
        return self._reader.stray_fds()

    @property
    def mid_message(self) -> bool:
        return self._pending_name is not None or self._reader.pending_bytes > 0


class ServeConnection:
    """State of one `criu restore --stream` connection: request, reply, maybe fd."""

    def __init__(self) -> None:
        self._reader = _FrameReader()
        self._awaiting_reply: str | None = None
        self._awaiting_fd: str | None = None

    def receive(self, data: bytes, fds: list[int] | None = None) -> list[ImageRequested | PipeGiven]:
        self._reader.feed(data, fds or [])
        events: list[ImageRequested | PipeGiven] = []
        try:
            self._decode(events)
            self._reader.check_queued_fds()
        except CriuProtocolError:
            self._reader.give_back([event.fd for event in events if isinstance(event, PipeGiven)])
            raise
        return events

    def _decode(self, events: list[ImageRequested | PipeGiven]) -> None:
        while self._awaiting_reply is None:
            if self._awaiting_fd is not None:
                fd = self._reader.passed_fd()
                if fd is None:
                    break
                events.append(PipeGiven(self._awaiting_fd, fd))
                self._awaiting_fd = None
                continue
            body = self._reader.frame()
            if body is None:
                break
            name = decode_request_body(body)
            self._awaiting_reply = name
            events.append(ImageRequested(name))
        if self._awaiting_reply is not None and self._reader.pending_bytes:
            raise CriuProtocolError("CRIU sent data before our reply")

    def reply(self, exists: bool) -> bytes:
        if self._awaiting_reply is None:
            raise RuntimeError("reply() without a pending request")
        if exists:
            self._awaiting_fd = self._awaiting_reply
        self._awaiting_reply = None
        return encode_reply(exists)

    def fds_to_close(self) -> list[int]:
        return self._reader.stray_fds()

    @property
    def mid_message(self) -> bool:
        """Part of a request (or of the fd's dummy byte) arrived, not all of it."""
        return self._reader.pending_bytes > 0
