"""Tunnel frames: CRIU page-server byte streams multiplexed over a proxy<->cache link, sans-IO.

A lazy (post-copy) migration restores the process on the destination before its memory
arrives; `criu lazy-pages` there fetches the pages from `criu dump`'s page server on the
source. imgmig carries that TCP byte stream inside the checkpoint's own connection (the
same mutual TLS), as numbered channels. Frame types start at 32 so that they never
collide with the node protocol's own (docs/protocol.md, "Tunnel"):

    32 TUNNEL_OPEN   cache->proxy  u32 channel
    33 TUNNEL_DATA   both          u32 channel, payload (1..MAX_TUNNEL_PAYLOAD bytes)
    34 TUNNEL_EOF    both          u32 channel: the sender's end reached end of stream
    35 TUNNEL_RESET  both          u32 channel, str16 reason: the channel is gone

`TunnelMux` keeps the channels of one link and checks every rule (who opens, data only
on an open channel and never after the sender's EOF, at most MAX_CHANNELS at once); the
I/O layer (datapath/tunnel.py) moves the bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

TUNNEL_OPEN, TUNNEL_DATA, TUNNEL_EOF, TUNNEL_RESET = 32, 33, 34, 35
TUNNEL_TYPES = frozenset((TUNNEL_OPEN, TUNNEL_DATA, TUNNEL_EOF, TUNNEL_RESET))
MAX_TUNNEL_PAYLOAD = 60 * 1024  # a TUNNEL_DATA frame stays under the 64 KiB control-frame bound
MAX_CHANNELS = 4                # one lazy restore needs one; a few allow a retry while one drains
MAX_REASON = 1024

_HEAD = struct.Struct(">IB")
_CHANNEL = struct.Struct(">I")
_U16 = struct.Struct(">H")


class TunnelError(ValueError):
    """The peer broke a tunnel rule (a protocol violation, ERROR code 1)."""


@dataclass(frozen=True)
class TunnelOpen:
    channel: int


@dataclass(frozen=True)
class TunnelData:
    channel: int
    data: bytes


@dataclass(frozen=True)
class TunnelEof:
    channel: int


@dataclass(frozen=True)
class TunnelReset:
    channel: int
    reason: str


TunnelFrame = TunnelOpen | TunnelData | TunnelEof | TunnelReset


# ---- codec ------------------------------------------------------------------------------

def _frame(kind: int, body: bytes) -> bytes:
    return _HEAD.pack(len(body) + 1, kind) + body


def encode_open(channel: int) -> bytes:
    return _frame(TUNNEL_OPEN, _CHANNEL.pack(channel))


def encode_data(channel: int, data: bytes) -> bytes:
    if not 0 < len(data) <= MAX_TUNNEL_PAYLOAD:
        raise ValueError(f"tunnel payload of {len(data)} bytes outside 1..{MAX_TUNNEL_PAYLOAD}")
    return _frame(TUNNEL_DATA, _CHANNEL.pack(channel) + data)


def encode_eof(channel: int) -> bytes:
    return _frame(TUNNEL_EOF, _CHANNEL.pack(channel))


def encode_reset(channel: int, reason: str) -> bytes:
    text = "".join(c if c.isprintable() else " " for c in reason)
    raw = text.encode()[:MAX_REASON].decode(errors="ignore").encode()
    return _frame(TUNNEL_RESET, _CHANNEL.pack(channel) + _U16.pack(len(raw)) + raw)


def decode(kind: int, body: bytes) -> TunnelFrame:
    """One tunnel frame's body (after the u32 length and the type byte)."""
    if len(body) < _CHANNEL.size:
        raise TunnelError(f"tunnel frame type {kind} is truncated")
    channel = _CHANNEL.unpack_from(body)[0]
    rest = body[_CHANNEL.size:]
    if kind == TUNNEL_DATA:
        if not 0 < len(rest) <= MAX_TUNNEL_PAYLOAD:
            raise TunnelError(f"TUNNEL_DATA payload of {len(rest)} bytes outside 1..{MAX_TUNNEL_PAYLOAD}")
        return TunnelData(channel, rest)
    if kind == TUNNEL_RESET:
        return TunnelReset(channel, _reason(rest))
    if rest:
        raise TunnelError(f"tunnel frame type {kind} has {len(rest)} trailing bytes")
    if kind == TUNNEL_OPEN:
        return TunnelOpen(channel)
    if kind == TUNNEL_EOF:
        return TunnelEof(channel)
    raise TunnelError(f"frame type {kind} is not a tunnel frame")


def _reason(rest: bytes) -> str:
    if len(rest) < _U16.size or len(rest) != _U16.size + _U16.unpack_from(rest)[0]:
        raise TunnelError("TUNNEL_RESET reason has the wrong length")
    try:
        text = rest[_U16.size:].decode()
    except UnicodeDecodeError:
        raise TunnelError("TUNNEL_RESET reason is not UTF-8") from None
    if not text.isprintable():
        raise TunnelError("TUNNEL_RESET reason has control characters")
    return text


# ---- the channels of one link -----------------------------------------------------------

class Side(enum.Enum):
    OPENER = "opener"      # the cache: lazy-pages connects there
    ACCEPTOR = "acceptor"  # the proxy: it connects to the page server


@dataclass
class Channel:
    id: int
    sent_eof: bool = False      # this side sent TUNNEL_EOF
    got_eof: bool = False       # the peer sent TUNNEL_EOF
    sent: int = 0               # payload bytes sent
    received: int = 0           # payload bytes received

    @property
    def finished(self) -> bool:
        return self.sent_eof and self.got_eof


class TunnelMux:
    """The tunnel channels of one link, seen from one side. `open()` / `send()` / `eof()`
    / `reset()` queue frames (`data_to_send()`); `receive(frame)` checks a peer frame and
    returns it. A channel is gone once both sides sent EOF, or after a RESET either way."""

    def __init__(self, side: Side) -> None:
        self.side = side
        self.channels: dict[int, Channel] = {}
        self._next_id = 1
        self._last_peer_id = 0
        self._out: list[bytes] = []

    # ---- this side ----------------------------------------------------------------------
    def open(self) -> int:
        if self.side is not Side.OPENER:
            raise RuntimeError("only the cache opens tunnel channels")
        if len(self.channels) >= MAX_CHANNELS:
            raise RuntimeError(f"{MAX_CHANNELS} tunnel channels open already")
        channel = self._next_id
        self._next_id += 1
        self.channels[channel] = Channel(channel)
        self._out.append(encode_open(channel))
        return channel

    def send(self, channel: int, data: bytes) -> None:
        state = self._mine(channel)
        if state.sent_eof:
            raise RuntimeError(f"data on tunnel channel {channel} after its EOF")
        view = memoryview(data)
        for start in range(0, len(view), MAX_TUNNEL_PAYLOAD):
            self._out.append(encode_data(channel, bytes(view[start:start + MAX_TUNNEL_PAYLOAD])))
        state.sent += len(data)

    def eof(self, channel: int) -> None:
        state = self._mine(channel)
        if not state.sent_eof:
            state.sent_eof = True
            self._out.append(encode_eof(channel))
            self._forget_if_finished(state)

    def reset(self, channel: int, reason: str) -> None:
        if self.channels.pop(channel, None) is not None:
            self._out.append(encode_reset(channel, reason))

    def data_to_send(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        return data

    # ---- the peer -----------------------------------------------------------------------
    def receive(self, frame: TunnelFrame) -> TunnelFrame | None:
        """Check a frame from the peer; the frame to act on, or None if it needs no action
        (a RESET or EOF of a channel this side already dropped)."""
        if isinstance(frame, TunnelOpen):
            return self._on_open(frame)
        if isinstance(frame, TunnelReset):
            return frame if self.channels.pop(frame.channel, None) is not None else None
        state = self.channels.get(frame.channel)
        if state is None:
            if frame.channel < self._next_id or frame.channel <= self._last_peer_id:
                return None  # this side reset it; frames already in flight are dropped
            raise TunnelError(f"{type(frame).__name__} on tunnel channel {frame.channel}, which was never opened")
        if state.got_eof:
            raise TunnelError(f"{type(frame).__name__} on tunnel channel {frame.channel} after its EOF")
        if isinstance(frame, TunnelEof):
            state.got_eof = True
            self._forget_if_finished(state)
        else:
            state.received += len(frame.data)
        return frame

    def _on_open(self, frame: TunnelOpen) -> TunnelOpen:
        if self.side is not Side.ACCEPTOR:
            raise TunnelError("TUNNEL_OPEN sent by a proxy; only the cache opens tunnel channels")
        if frame.channel <= self._last_peer_id:
            raise TunnelError(f"TUNNEL_OPEN of channel {frame.channel}, not above the last ({self._last_peer_id})")
        if len(self.channels) >= MAX_CHANNELS:
            raise TunnelError(f"TUNNEL_OPEN beyond {MAX_CHANNELS} open channels")
        self._last_peer_id = frame.channel
        self.channels[frame.channel] = Channel(frame.channel)
        return frame

    def _mine(self, channel: int) -> Channel:
        state = self.channels.get(channel)
        if state is None:
            raise RuntimeError(f"tunnel channel {channel} is not open")
        return state

    def _forget_if_finished(self, state: Channel) -> None:
        if state.finished:
            del self.channels[state.id]


# ---- how a page-server conversation ends ----------------------------------------------------

PS_IOV_SIZE = 24                      # struct page_server_iov: u32 cmd, u32 nr_pages, u64 vaddr, u64 dst_id
PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE = 0x1023, 0x1024
_PS_CMD_MASK = 0xFFFF                 # the high half of cmd carries flags


class CloseWatch:
    """Reads what `criu lazy-pages` sends its page server (native-endian page_server_iov
    records, 24 bytes, no payload: PS_IOV_GET requests, then one close command) and says
    whether it asked the page server to close. Only then was the copy complete: a
    lazy-pages that stops without it failed or was killed."""

    def __init__(self) -> None:
        self._partial = b""
        self.close_asked = False

    @property
    def at_record_boundary(self) -> bool:
        """No record begun and unfinished: the stream could end here cleanly."""
        return not self._partial

    def feed(self, data: bytes) -> int | None:
        """Read more of the stream; where in `data` the first close request begins (it may
        begin in an earlier chunk: then 0), or None."""
        carried = len(self._partial)
        data = self._partial + data
        whole = len(data) - len(data) % PS_IOV_SIZE
        found = None
        for start in range(0, whole, PS_IOV_SIZE):
            cmd = int.from_bytes(data[start:start + 4], "little") & _PS_CMD_MASK
            if cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE) and not self.close_asked:
                self.close_asked = True
                found = max(0, start - carried)
        self._partial = data[whole:]
        return found
