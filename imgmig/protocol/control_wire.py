"""The control socket protocol (`imgmig` <-> a daemon's control.sock), sans-IO.

See docs/control.md. One message is one JSON object on one line (UTF-8, ending in
"\\n"). A request is `{"v": 1, "op": NAME, ...}`; the answer to each request is one
`{"v": 1, "ok": true, ...}` or `{"v": 1, "ok": false, "error": TEXT}`. Everything the
decoder accepts is bounded: line length, nesting depth, keys per object, string length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

VERSION = 1
MAX_REQUEST = 16 * 1024  # a request names an op and a few arguments
MAX_REPLY = 1 << 20  # a status listing thousands of checkpoints still fits
MAX_DEPTH = 6
MAX_KEYS = 64
MAX_ITEMS = 10_000
MAX_STRING = 4096
OPS = ("status", "list", "drop", "expect", "claim", "files", "serve", "confirm", "probe", "prepare", "handoff",
       "lazy_images", "lazy_image", "tunnel", "lazy_running", "lazy_done", "lazy_source", "lazy_check")


class ControlProtocolError(ValueError):
    """A message that breaks the protocol; the text says what, for one log line."""


@dataclass(frozen=True)
class Request:
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    ok: bool
    body: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def encode_request(op: str, **args: Any) -> bytes:
    return _line({"v": VERSION, "op": op, **args}, MAX_REQUEST)


def encode_reply(body: dict[str, Any] | None = None) -> bytes:
    return _line({"v": VERSION, "ok": True, **(body or {})}, MAX_REPLY)


def encode_error(message: str) -> bytes:
    return _line({"v": VERSION, "ok": False, "error": message[:MAX_STRING]}, MAX_REPLY)


def _line(message: dict[str, Any], limit: int) -> bytes:
    data = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode() + b"\n"
    if len(data) > limit:
        raise ControlProtocolError(f"message of {len(data)} bytes exceeds the {limit}-byte limit")
    return data


class LineDecoder:
    """Splits a byte stream into bounded JSON objects; feed() then next_message()."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data
        if b"\n" not in self.buffer and len(self.buffer) > self.limit:
            raise ControlProtocolError(f"a line longer than {self.limit} bytes")

    @property
    def buffered(self) -> int:
        return len(self.buffer)

    def next_message(self) -> dict[str, Any] | None:
        end = self.buffer.find(b"\n")
        if end < 0:
            return None
        if end + 1 > self.limit:
            raise ControlProtocolError(f"a line longer than {self.limit} bytes")
        line = bytes(self.buffer[:end])
        del self.buffer[:end + 1]
        return parse_object(line)


def parse_object(line: bytes) -> dict[str, Any]:
    """One line as a JSON object, within the bounds; ControlProtocolError otherwise."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlProtocolError("a line that is not UTF-8") from None
    depth = _max_depth(text)
    if depth > MAX_DEPTH:
        raise ControlProtocolError(f"nesting deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text, object_pairs_hook=_bounded_object, parse_constant=_no_constant)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError, as are our own bounds
        if isinstance(exc, ControlProtocolError):
            raise
        raise ControlProtocolError(f"not valid JSON ({exc.args[0].split(':')[0]})") from None
    if not isinstance(value, dict):
        raise ControlProtocolError("a message must be a JSON object")
    _check_sizes(value)
    return value


def _max_depth(text: str) -> int:
    """Nesting depth of [ and { outside strings, found before parsing: json.loads
    itself would recurse once per level."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _bounded_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > MAX_KEYS:
        raise ControlProtocolError(f"an object with more than {MAX_KEYS} keys")
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ControlProtocolError("an object with a duplicate key")
    return result


def _no_constant(name: str) -> None:
    raise ControlProtocolError(f"{name} is not a JSON number")


def _check_sizes(value: Any) -> None:
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ControlProtocolError(f"a string longer than {MAX_STRING} characters")
    elif isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise ControlProtocolError(f"a list of more than {MAX_ITEMS} items")
        for item in value:
            _check_sizes(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_sizes(key)
            _check_sizes(item)


def decode_request(message: dict[str, Any]) -> Request:
    """A request from a decoded line: its version and op checked, the rest as arguments."""
    version = message.get("v")
    if version != VERSION:
        raise ControlProtocolError(f"protocol version {version!r} is not supported (this daemon speaks {VERSION})")
    op = message.get("op")
    if op not in OPS:
        raise ControlProtocolError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    args = {key: value for key, value in message.items() if key not in ("v", "op")}
    return Request(op, args)


def decode_reply(message: dict[str, Any]) -> Reply:
    if message.get("v") != VERSION:
        raise ControlProtocolError(f"the daemon answered in protocol version {message.get('v')!r}, not {VERSION}")
    ok = message.get("ok")
    if not isinstance(ok, bool):
        raise ControlProtocolError("a reply without a boolean 'ok'")
    if not ok:
        error = message.get("error")
        return Reply(False, error=error if isinstance(error, str) else "unspecified error")
    return Reply(True, {key: value for key, value in message.items() if key not in ("v", "ok")})


def text_arg(request: Request, key: str, *, required: bool = True) -> str | None:
    value = request.args.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ControlProtocolError(f"op {request.op}: '{key}' must be a non-empty string")
    return value


def size_arg(request: Request, key: str) -> int:
    """A byte count: a JSON integer from 0 to 2**63 - 1."""
    value = request.args.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
        raise ControlProtocolError(f"op {request.op}: '{key}' must be a byte count (an integer from 0)")
    return value


def bool_arg(request: Request, key: str) -> bool:
    value = request.args.get(key, False)
    if not isinstance(value, bool):
        raise ControlProtocolError(f"op {request.op}: '{key}' must be true or false")
    return value
