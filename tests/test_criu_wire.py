"""Byte-level tests of imgmig.protocol.criu_wire, CRIU's `--stream` protocol codec."""

from __future__ import annotations

import contextlib
import os
import struct
import sys

import pytest

from imgmig.protocol import criu_wire
from imgmig.protocol.criu_wire import (
    CaptureConnection,
    CriuProtocolError,
    ImageOffered,
    ImageRequested,
    PipeGiven,
    ServeConnection,
)

LEN = struct.Struct("<I" if sys.byteorder == "little" else ">I")
INVENTORY_REQUEST = bytes.fromhex("0f000000") + b"\x0a\x0d" + b"inventory.img"


def frame(body: bytes) -> bytes:
    return LEN.pack(len(body)) + body


def name_field(raw: bytes) -> bytes:
    return b"\x0a" + criu_wire.encode_varint(len(raw)) + raw


@pytest.fixture
def fds():
    """Real fds (pipe ends) so that fd bookkeeping can be checked against the kernel."""
    opened: list[int] = []

    def make() -> int:
        r, w = os.pipe()
        opened.extend((r, w))
        return r

    yield make
    for fd in opened:
        with contextlib.suppress(OSError):
            os.close(fd)


# ---- the notes' exact example bytes -------------------------------------------------

@pytest.mark.skipif(sys.byteorder != "little", reason="the example bytes are x86-64 host order")
def test_request_example_bytes():
    assert criu_wire.encode_request("inventory.img") == INVENTORY_REQUEST


@pytest.mark.skipif(sys.byteorder != "little", reason="the example bytes are x86-64 host order")
def test_reply_example_bytes():
    assert criu_wire.encode_reply(True) == bytes.fromhex("020000000801")
    assert criu_wire.encode_reply(False) == bytes.fromhex("020000000800")


def test_reply_roundtrip_and_malformed_replies():
    assert criu_wire.decode_reply_body(b"\x08\x01") is True
    assert criu_wire.decode_reply_body(b"\x08\x00") is False
    for bad in (b"", b"\x08", b"\x08\x02", b"\x10\x01", b"\x08\x01\x00"):
        with pytest.raises(CriuProtocolError):
            criu_wire.decode_reply_body(bad)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 255, 300, 16383, 16384, 2**32, 2**63 - 1])
def test_varint_roundtrip(value):
    raw = criu_wire.encode_varint(value)
    assert criu_wire.decode_varint(raw + b"tail", 0) == (value, len(raw))


def test_varint_known_bytes():
    assert criu_wire.encode_varint(300) == b"\xac\x02"
    assert criu_wire.encode_varint(13) == b"\x0d"


def test_decode_request_body_of_example():
    assert criu_wire.decode_request_body(INVENTORY_REQUEST[4:]) == "inventory.img"


# ---- capture: request then fd --------------------------------------------------------

def test_capture_whole_message_with_fd(fds):
    fd = fds()
    conn = CaptureConnection()
    assert conn.receive(INVENTORY_REQUEST) == []
    assert conn.mid_message
    assert conn.receive(b"\0", [fd]) == [ImageOffered("inventory.img", fd)]
    assert not conn.mid_message
    assert conn.fds_to_close() == []


def test_capture_one_byte_at_a_time(fds):
    conn = CaptureConnection()
    events = []
    wanted = []
    for name in ("pages-1.img", "pagemap-1.img", "inventory.img"):
        fd = fds()
        wanted.append(ImageOffered(name, fd))
        for byte in criu_wire.encode_request(name):
            events += conn.receive(bytes([byte]))
        assert events == wanted[:-1], "nothing is offered before its fd arrives"
        events += conn.receive(b"\0", [fd])
    assert events == wanted
    assert not conn.mid_message


def test_capture_several_messages_in_one_read(fds):
    """recvmsg stops after an fd-carrying skb, but codec must not care how bytes are cut."""
    a, b = fds(), fds()
    conn = CaptureConnection()
    data = criu_wire.encode_request("a.img") + b"\0" + criu_wire.encode_request("b.img") + b"\0"
    assert conn.receive(data, [a, b]) == [ImageOffered("a.img", a), ImageOffered("b.img", b)]


def test_capture_plain_bytes_where_fd_expected(fds):
    conn = CaptureConnection()
    conn.receive(INVENTORY_REQUEST)
    with pytest.raises(CriuProtocolError, match="SCM_RIGHTS"):
        conn.receive(b"\0")


def test_capture_next_request_where_fd_expected():
    conn = CaptureConnection()
    conn.receive(INVENTORY_REQUEST)
    with pytest.raises(CriuProtocolError, match="SCM_RIGHTS"):
        conn.receive(criu_wire.encode_request("x.img"))


def test_capture_stray_fds_handed_back(fds):
    """An fd that came with a request but no dummy byte is never lost: fds_to_close() has it."""
    fd = fds()
    conn = CaptureConnection()
    assert conn.receive(INVENTORY_REQUEST[:5], [fd]) == []
    assert conn.fds_to_close() == [fd]
    assert conn.fds_to_close() == []


def test_capture_bad_request_behind_a_good_one_hands_the_good_fd_back(fds):
    """One read brings a good request with its pipe, then garbage: the error comes, and the
    good request's pipe is not lost with the event that never got out."""
    fd = fds()
    conn = CaptureConnection()
    with pytest.raises(CriuProtocolError, match="invalid image file name"):
        conn.receive(INVENTORY_REQUEST + b"\0" + criu_wire.encode_request(".."), [fd])
    assert conn.fds_to_close() == [fd]


def test_capture_mid_message_on_partial_length():
    conn = CaptureConnection()
    assert not conn.mid_message
    conn.receive(INVENTORY_REQUEST[:3])
    assert conn.mid_message


@pytest.mark.parametrize("length", [0, criu_wire.MAX_MESSAGE + 1, 0xFFFFFFFF])
def test_bad_frame_length(length):
    conn = CaptureConnection()
    with pytest.raises(CriuProtocolError, match="frame length"):
        conn.receive(LEN.pack(length))
    serve = ServeConnection()
    with pytest.raises(CriuProtocolError, match="frame length"):
        serve.receive(LEN.pack(length))


def test_max_length_frame_is_accepted(fds):
    """A frame of exactly MAX_MESSAGE bytes is legal; one more is not (above)."""
    pad = criu_wire.MAX_MESSAGE - 7 - 1 - 2
    body = name_field(b"a.img") + b"\x12" + criu_wire.encode_varint(pad) + b"p" * pad
    assert len(body) == criu_wire.MAX_MESSAGE
    fd = fds()
    conn = CaptureConnection()
    assert conn.receive(frame(body) + b"\0", [fd]) == [ImageOffered("a.img", fd)]


# ---- malformed protobuf --------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    (b"\x0a\x80", "varint"),                                   # length varint never ends
    (b"\x0a" + b"\xff" * 11, "varint"),                          # varint longer than 64 bits
    (b"\x0a\x0d" + b"inventory", "past the end"),                 # field past end
    (b"\x0a\x7f" + b"a", "past the end"),
    (b"\x08\x01", "required filename"),                           # only an unknown varint field
    (b"\x12\x03abc", "required filename"),                        # only an unknown bytes field
    (b"\x0b", "wire type 3"),                                     # start group
    (b"\x0c", "wire type 4"),                                     # end group
    (b"\x0e", "wire type 6"),
    (b"\x0f", "wire type 7"),
    (name_field(b"a.img") + b"\x15\x00\x00", "wire type 5"),      # fixed32 cut short
    (name_field(b"a.img") + b"\x11\x00\x00\x00", "wire type 1"),  # fixed64 cut short
])
def test_malformed_protobuf(body, message):
    with pytest.raises(CriuProtocolError, match=message):
        criu_wire.decode_request_body(body)
    conn = CaptureConnection()
    with pytest.raises(CriuProtocolError):
        conn.receive(frame(body))


def test_unknown_fields_are_skipped():
    body = (b"\x10\x96\x01"                     # field 2 varint 150
            + b"\x1a\x02zz"                     # field 3 bytes
            + b"\x25\x01\x02\x03\x04"           # field 4 fixed32
            + name_field(b"core-1.img")
            + b"\x29" + b"\x00" * 8)            # field 5 fixed64
    assert criu_wire.decode_request_body(body) == "core-1.img"


def test_repeated_filename_last_wins():
    """proto2: a repeated scalar field's last occurrence wins."""
    assert criu_wire.decode_request_body(name_field(b"a.img") + name_field(b"b.img")) == "b.img"


def test_non_canonical_varint_length_accepted():
    assert criu_wire.decode_request_body(b"\x0a\x85\x00" + b"a.img") == "a.img"


# ---- file names --------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"", b"/", b"..", b".", b"a/b", b"../etc/passwd", b"/etc/passwd",
    b"\xff\xfe", b"caf\xc3", b"a\nb", b"a\x00b", b"\x1b[31m", b"x" * 256,
])
def test_bad_names(raw):
    with pytest.raises(CriuProtocolError):
        criu_wire.decode_request_body(name_field(raw))


@pytest.mark.parametrize("name", ["inventory.img", "pages-1.img", "x" * 255, "été.img", "a..b", "...", ".hidden"])
def test_good_names(name):
    assert criu_wire.decode_request_body(name_field(name.encode())) == name


def test_name_limit_is_in_bytes():
    name = "é" * 128  # 256 bytes, 128 characters
    with pytest.raises(CriuProtocolError):
        criu_wire.decode_request_body(name_field(name.encode()))


# ---- serve: request, reply, fd ------------------------------------------------------

def test_serve_request_reply_fd(fds):
    conn = ServeConnection()
    assert conn.receive(INVENTORY_REQUEST) == [ImageRequested("inventory.img")]
    assert conn.reply(True) == criu_wire.encode_reply(True)
    fd = fds()
    assert conn.receive(b"\0", [fd]) == [PipeGiven("inventory.img", fd)]
    assert conn.fds_to_close() == []


def test_serve_absent_then_next_request():
    conn = ServeConnection()
    assert conn.receive(criu_wire.encode_request("memfd.img")) == [ImageRequested("memfd.img")]
    assert conn.reply(False) == criu_wire.encode_reply(False)
    # exists=false: no fd follows; the next thing is a request
    assert conn.receive(criu_wire.encode_request("files.img")) == [ImageRequested("files.img")]


def test_serve_one_byte_at_a_time(fds):
    conn = ServeConnection()
    events = []
    for byte in criu_wire.encode_request("pstree.img"):
        events += conn.receive(bytes([byte]))
    assert events == [ImageRequested("pstree.img")]
    conn.reply(True)
    fd = fds()
    assert conn.receive(b"\0", [fd]) == [PipeGiven("pstree.img", fd)]


def test_serve_data_before_reply():
    conn = ServeConnection()
    with pytest.raises(CriuProtocolError, match="before our reply"):
        conn.receive(INVENTORY_REQUEST + criu_wire.encode_request("pstree.img"))
    conn = ServeConnection()
    conn.receive(INVENTORY_REQUEST)
    with pytest.raises(CriuProtocolError, match="before our reply"):
        conn.receive(b"\0")


def test_serve_plain_bytes_where_fd_expected():
    conn = ServeConnection()
    conn.receive(INVENTORY_REQUEST)
    conn.reply(True)
    with pytest.raises(CriuProtocolError, match="SCM_RIGHTS"):
        conn.receive(b"\0")


def test_serve_reply_without_request():
    conn = ServeConnection()
    with pytest.raises(RuntimeError):
        conn.reply(True)
    conn.receive(INVENTORY_REQUEST)
    conn.reply(False)
    with pytest.raises(RuntimeError):
        conn.reply(False)


def test_serve_malformed_request():
    conn = ServeConnection()
    with pytest.raises(CriuProtocolError):
        conn.receive(frame(name_field(b"../x")))


def test_serve_stray_fds(fds):
    fd = fds()
    conn = ServeConnection()
    conn.receive(b"\x0f", [fd])
    assert conn.fds_to_close() == [fd]


def test_serve_bad_request_behind_a_good_one_hands_the_pipe_back(fds):
    fd = fds()
    conn = ServeConnection()
    assert conn.receive(INVENTORY_REQUEST) == [ImageRequested("inventory.img")]
    conn.reply(True)
    with pytest.raises(CriuProtocolError):
        conn.receive(b"\0" + criu_wire.encode_request("a/b"), [fd])
    assert conn.fds_to_close() == [fd]


# ---- regressions found by tests/test_fuzz_criu_wire.py ---------------------------------

def test_capture_fd_of_a_good_request_is_handed_back_when_the_next_one_is_bad(fds):
    """An offer decoded before a bad frame in the same read never reaches the caller:
    its fd must come out of fds_to_close(), not leak."""
    fd = fds()
    conn = CaptureConnection()
    conn.receive(INVENTORY_REQUEST)
    with pytest.raises(CriuProtocolError, match="frame length"):
        conn.receive(b"\0" + b"\xff\xff\xff\xff", [fd])
    assert conn.fds_to_close() == [fd]


def test_serve_fd_of_a_good_pipe_is_handed_back_when_the_next_request_is_bad(fds):
    fd = fds()
    conn = ServeConnection()
    conn.receive(INVENTORY_REQUEST)
    conn.reply(True)
    with pytest.raises(CriuProtocolError, match="frame length"):
        conn.receive(b"\0" + bytes(4), [fd])
    assert conn.fds_to_close() == [fd]


def test_capture_more_fds_than_requests_refused(fds):
    """A peer passing fds with no request to use them must not make us hold them all."""
    a, b = fds(), fds()
    conn = CaptureConnection()
    with pytest.raises(CriuProtocolError, match="2 pipe fds passed without"):
        conn.receive(b"\0", [a, b])
    assert conn.fds_to_close() == [a, b]


def test_serve_more_fds_than_requests_refused(fds):
    a, b = fds(), fds()
    conn = ServeConnection()
    with pytest.raises(CriuProtocolError, match="2 pipe fds passed without"):
        conn.receive(INVENTORY_REQUEST[:2], [a, b])
    assert conn.fds_to_close() == [a, b]
