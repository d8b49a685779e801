"""Byte-level tests of imgmig.protocol.peer_wire, the proxy <-> cache protocol codec.

Frames are `u32 BE length (counts type + body) | u8 type | body`, integers big-endian.
"""

from __future__ import annotations

import hashlib
import struct

import pytest

from imgmig.protocol import peer_wire as wire
from imgmig.protocol.peer_wire import (
    Ack,
    CheckpointBegin,
    CheckpointDone,
    CheckpointEnd,
    ErrorCode,
    FileBegin,
    FileData,
    FileEnd,
    FrameDecoder,
    FrameType,
    Hello,
    InboundCheckpoint,
    PeerProtocolError,
    Restored,
    Role,
)

DIGEST = hashlib.sha256(b"abc").digest()
PROXY_HELLO = Hello(wire.VERSION, Role.PROXY, "node-a")

ROUNDTRIPS = [
    (wire.encode_hello(PROXY_HELLO), PROXY_HELLO),
    (wire.encode_hello(Hello(wire.VERSION, Role.CACHE, "b" * 255, memory_limit=2**40, room=2**39)),
     Hello(wire.VERSION, Role.CACHE, "b" * 255, memory_limit=2**40, room=2**39)),
    (wire.encode_checkpoint_begin("cp-1"), CheckpointBegin("cp-1", False)),
    (wire.encode_checkpoint_begin("cp-2", resume=True), CheckpointBegin("cp-2", True)),
    (wire.encode_file_begin(0, "inventory.img"), FileBegin(0, "inventory.img")),
    (wire.encode_file_begin(0xFFFFFFFF, "été.img"), FileBegin(0xFFFFFFFF, "été.img")),
    (wire.encode_file_data(3, 2**40, b"xyz"), FileData(3, 2**40, b"xyz")),
    (wire.encode_file_end(3, 2**63, DIGEST), FileEnd(3, 2**63, DIGEST)),
    (wire.encode_file_end(3, 0, b""), FileEnd(3, 0, b"")),
    (wire.encode_checkpoint_end(True, 12, 2**33), CheckpointEnd(True, 12, 2**33)),
    (wire.encode_checkpoint_end(False, 0, 0), CheckpointEnd(False, 0, 0)),
    (wire.encode_files_listed(13), wire.FilesListed(13)),
    (wire.encode_files_listed(2**32 - 1), wire.FilesListed(2**32 - 1)),
    (wire.encode_ack(7, 123456), Ack(7, 123456)),
    (wire.encode_checkpoint_done(True, "12 files verified"), CheckpointDone(True, "12 files verified")),
    (wire.encode_checkpoint_done(False, ""), CheckpointDone(False, "")),
    (wire.encode_restored("cp-1"), Restored("cp-1")),
    (wire.encode_drop("cp-1"), wire.Drop("cp-1")),
    (wire.encode_error(ErrorCode.DIGEST_MISMATCH, "bad digest"), wire.Error(ErrorCode.DIGEST_MISMATCH, "bad digest")),
    (wire.encode_begun(wire.BeginStatus.NEW, "cp-1"), wire.Begun(wire.BeginStatus.NEW, "cp-1")),
    (wire.encode_begun(wire.BeginStatus.RESUMED, "cp-1", 7, ((2, 2**40), (6, 0))),
     wire.Begun(wire.BeginStatus.RESUMED, "cp-1", 7, ((2, 2**40), (6, 0)))),
    (wire.encode_claim("cp-1"), wire.Claim("cp-1")),
    (wire.encode_grant(True, "cp-1", "node-b"), wire.Grant(True, "cp-1", "node-b")),
    (wire.encode_grant(False, "cp-1", "node-a"), wire.Grant(False, "cp-1", "node-a")),
    (wire.encode_confirm(FrameType.RESTORED, "cp-1"), wire.Confirm(FrameType.RESTORED, "cp-1")),
    (wire.encode_ping(), wire.Ping()),
    (wire.encode_return("cp-1"), wire.Return("cp-1")),
    (wire.encode_confirm(FrameType.RETURN, "cp-1"), wire.Confirm(FrameType.RETURN, "cp-1")),
    (wire.encode_running("cp-1", 4242), wire.Running("cp-1", 4242)),
    (wire.encode_running("cp-1", 2**32 - 1), wire.Running("cp-1", 2**32 - 1)),
    (wire.encode_confirm(FrameType.RUNNING, "cp-1"), wire.Confirm(FrameType.RUNNING, "cp-1")),
    (wire.encode_begun(wire.BeginStatus.RUNNING, "cp-1"), wire.Begun(wire.BeginStatus.RUNNING, "cp-1")),
    (wire.encode_prepare(1 << 30), wire.Prepare(1 << 30)),
    (wire.encode_prepare(0), wire.Prepare(0)),
    (wire.encode_prepare(2**64 - 1), wire.Prepare(2**64 - 1)),
]


def decode_all(data: bytes, step: int | None = None) -> list[wire.Event]:
    """Feed `data` in pieces of `step` bytes (all at once if None); merge FILE_DATA pieces."""
    decoder = FrameDecoder()
    events: list[wire.Event] = []
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        decoder.feed(piece)
        while (event := decoder.next_event()) is not None:
            events.append(event)
    assert decoder.buffered == 0
    return _merge(events)


def _merge(events: list[wire.Event]) -> list[wire.Event]:
    merged: list[wire.Event] = []
    for event in events:
        last = merged[-1] if merged else None
        if (isinstance(event, FileData) and isinstance(last, FileData) and last.file_id == event.file_id
                and last.offset + len(last.data) == event.offset):
            merged[-1] = FileData(last.file_id, last.offset, last.data + event.data)
        else:
            merged.append(event)
    return merged


def one(data: bytes) -> wire.Event:
    decoder = FrameDecoder()
    decoder.feed(data)
    event = decoder.next_event()
    assert event is not None
    return event


def raw_frame(kind: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, kind) + body


# ---- round trips and exact bytes ---------------------------------------------------

@pytest.mark.parametrize("data, event", ROUNDTRIPS, ids=[type(e).__name__ for _, e in ROUNDTRIPS])
def test_roundtrip(data, event):
    assert decode_all(data) == [event]


@pytest.mark.parametrize("data, event", ROUNDTRIPS, ids=[type(e).__name__ for _, e in ROUNDTRIPS])
def test_length_field_counts_type_and_body(data, event):
    (length,) = struct.unpack(">I", data[:4])
    assert length == len(data) - 4


def test_all_frames_one_byte_at_a_time():
    stream = b"".join(data for data, _ in ROUNDTRIPS)
    assert decode_all(stream, step=1) == [event for _, event in ROUNDTRIPS]


@pytest.mark.parametrize("step", [2, 3, 5, 7, 13, 64])
def test_all_frames_odd_splits(step):
    stream = b"".join(data for data, _ in ROUNDTRIPS)
    assert decode_all(stream, step=step) == [event for _, event in ROUNDTRIPS]


def test_exact_bytes_hello():
    assert wire.encode_hello(PROXY_HELLO) == (
        b"\x00\x00\x00\x25"        # length 37 = type 1 + body 36
        b"\x01"                    # HELLO
        b"IMGMIG"                  # magic
        b"\x00\x04"                # version 4
        b"\x01\x01\x00"            # role proxy, digest sha256, auth none
        b"\x06node-a"              # node name, u8 length
        b"\x00\x00"                # no auth data
        + b"\x00" * 8              # memory limit (u64)
        + b"\x00" * 8              # room (u64)
    )


def test_exact_bytes_v2_frames():
    assert wire.encode_begun(wire.BeginStatus.RESUMED, "cp", 3, ((1, 5),)) == (
        b"\x00\x00\x00\x17\x0c" b"\x01" b"\x02cp" b"\x00\x00\x00\x03" b"\x00\x01"
        b"\x00\x00\x00\x01" b"\x00\x00\x00\x00\x00\x00\x00\x05")
    assert wire.encode_claim("cp") == b"\x00\x00\x00\x04\x0d\x02cp"
    assert wire.encode_grant(True, "cp", "b") == b"\x00\x00\x00\x07\x0e\x01\x02cp\x01b"
    assert wire.encode_confirm(FrameType.DROP, "cp") == b"\x00\x00\x00\x05\x0f\x0b\x02cp"
    assert wire.encode_ping() == b"\x00\x00\x00\x01\x10"
    assert wire.encode_return("cp") == b"\x00\x00\x00\x04\x11\x02cp"
    assert wire.encode_confirm(FrameType.RETURN, "cp") == b"\x00\x00\x00\x05\x0f\x11\x02cp"


def test_exact_bytes_running_its_confirm_and_begun_running():
    assert wire.encode_running("cp", 0x01020304) == (
        b"\x00\x00\x00\x08"      # length 8 = type 1 + id 3 + pid 4
        b"\x12"                  # RUNNING (18)
        b"\x02cp"                # checkpoint id, u8 length
        b"\x01\x02\x03\x04")      # pid, u32 big-endian
    assert wire.encode_confirm(FrameType.RUNNING, "cp") == b"\x00\x00\x00\x05\x0f\x12\x02cp"
    assert wire.encode_begun(wire.BeginStatus.RUNNING, "cp") == (
        b"\x00\x00\x00\x0b\x0c" b"\x05" b"\x02cp" b"\x00\x00\x00\x00" b"\x00\x00")


def test_encoder_refuses_confirm_of_other_frames_and_too_many_held_files():
    with pytest.raises(ValueError, match="not confirmed"):
        wire.encode_confirm(FrameType.ACK, "cp")
    with pytest.raises(ValueError, match="open files"):
        wire.encode_begun(wire.BeginStatus.RESUMED, "cp", 1, ((0, 0),) * (wire.MAX_HELD + 1))


def test_exact_bytes_checkpoint_begin_and_file_begin():
    assert wire.encode_checkpoint_begin("cp") == b"\x00\x00\x00\x05\x02\x00\x02cp"
    assert wire.encode_checkpoint_begin("cp", resume=True) == b"\x00\x00\x00\x05\x02\x01\x02cp"
    assert wire.encode_file_begin(0x01020304, "a") == b"\x00\x00\x00\x07\x03\x01\x02\x03\x04\x01a"


def test_exact_bytes_file_data():
    assert wire.encode_file_data(1, 0x0102, b"xy") == (
        b"\x00\x00\x00\x0f"                    # 1 + 4 + 8 + 2
        b"\x04"
        b"\x00\x00\x00\x01"
        b"\x00\x00\x00\x00\x00\x00\x01\x02"
        b"xy")
    assert wire.encode_file_data_header(1, 0x0102, 2) == wire.encode_file_data(1, 0x0102, b"xy")[:-2]


def test_exact_bytes_file_end_checkpoint_end_ack():
    assert wire.encode_file_end(2, 5, b"\xaa\xbb") == (
        b"\x00\x00\x00\x10\x05" b"\x00\x00\x00\x02" b"\x00\x00\x00\x00\x00\x00\x00\x05" b"\x02\xaa\xbb")
    assert wire.encode_checkpoint_end(True, 3, 9) == (
        b"\x00\x00\x00\x0e\x06" b"\x01" b"\x00\x00\x00\x03" b"\x00\x00\x00\x00\x00\x00\x00\x09")
    assert wire.encode_ack(1, 2) == (b"\x00\x00\x00\x0d\x07" b"\x00\x00\x00\x01"
                                         + b"\x00" * 7 + b"\x02")


def test_exact_bytes_done_restored_error():
    assert wire.encode_checkpoint_done(True, "ok") == b"\x00\x00\x00\x06\x08\x01\x00\x02ok"
    assert wire.encode_restored("cp") == b"\x00\x00\x00\x04\x09\x02cp"
    assert wire.encode_drop("cp") == b"\x00\x00\x00\x04\x0b\x02cp"
    assert wire.encode_error(ErrorCode.VERSION, "v") == b"\x00\x00\x00\x06\x0a\x00\x02\x00\x01v"


def test_exact_bytes_files_listed():
    assert wire.encode_files_listed(13) == b"\x00\x00\x00\x05\x13\x00\x00\x00\x0d"


def test_exact_bytes_prepare():
    assert wire.encode_prepare(0x40000000) == b"\x00\x00\x00\x09\x14" b"\x00\x00\x00\x00\x40\x00\x00\x00"


def test_frame_type_numbers():
    assert [t.value for t in FrameType] == list(range(1, 21))
    assert [s.value for s in wire.BeginStatus] == list(range(0, 6))
    assert [c.value for c in ErrorCode] == list(range(1, 9))


def test_long_message_truncated_on_encode():
    event = one(wire.encode_error(ErrorCode.INTERNAL, "x" * 5000))
    assert event == wire.Error(ErrorCode.INTERNAL, "x" * wire.MAX_MESSAGE)


def test_long_multibyte_message_truncated_to_valid_utf8():
    """Cutting at MAX_MESSAGE bytes must not split a character (the peer would reject it)."""
    event = one(wire.encode_checkpoint_done(False, "a" + "é" * 600))
    assert isinstance(event, CheckpointDone)
    assert event.message == "a" + "é" * ((wire.MAX_MESSAGE - 1) // 2)


def test_message_control_characters_replaced_on_encode():
    """The decoder refuses control characters, so the encoder must not send them."""
    assert one(wire.encode_error(ErrorCode.INTERNAL, "a\nb\tc")) == wire.Error(ErrorCode.INTERNAL, "a b c")


def test_encoder_refuses_long_names():
    with pytest.raises(ValueError):
        wire.encode_file_begin(0, "x" * 256)
    with pytest.raises(ValueError):
        wire.encode_hello(Hello(1, Role.PROXY, "n", auth_data=b"x" * (wire.MAX_MESSAGE + 1)))


@pytest.mark.parametrize("length", [0, wire.MAX_DATA_PAYLOAD + 1])
def test_encoder_refuses_bad_payload_length(length):
    with pytest.raises(ValueError):
        wire.encode_file_data_header(0, 0, length)


# ---- FILE_DATA payload: buffered and via payload/consume_payload -------------------

def test_payload_buffered_in_pieces():
    decoder = FrameDecoder()
    data = bytes(range(256)) * 40
    decoder.feed(wire.encode_file_data(5, 100, data)[:20])
    first = decoder.next_event()
    assert first == FileData(5, 100, data[:20 - 17])
    assert decoder.next_event() is None
    decoder.feed(wire.encode_file_data(5, 100, data)[20:] + wire.encode_ack(1, 1))
    second = decoder.next_event()
    assert second == FileData(5, 103, data[3:])
    assert decoder.next_event() == Ack(1, 1)


def test_payload_consumed_by_io_layer():
    decoder = FrameDecoder()
    assert decoder.payload is None
    decoder.feed(wire.encode_file_data_header(9, 1000, 10))
    assert decoder.next_event() is None, "no buffered payload bytes yet"
    assert decoder.payload == (9, 1000, 10)
    decoder.consume_payload(4)
    assert decoder.payload == (9, 1004, 6)
    decoder.consume_payload(6)
    assert decoder.payload is None
    decoder.feed(wire.encode_restored("cp"))
    assert decoder.next_event() == Restored("cp")


def test_payload_mixed_buffered_then_spliced():
    decoder = FrameDecoder()
    decoder.feed(wire.encode_file_data_header(1, 0, 10) + b"abc")
    assert decoder.payload is None, "buffered bytes must come out as events first"
    assert decoder.next_event() == FileData(1, 0, b"abc")
    assert decoder.payload == (1, 3, 7)
    decoder.consume_payload(7)
    assert decoder.payload is None


@pytest.mark.parametrize("n", [0, 11, -1])
def test_consume_payload_bounds(n):
    decoder = FrameDecoder()
    decoder.feed(wire.encode_file_data_header(1, 0, 10))
    decoder.next_event()
    with pytest.raises(RuntimeError):
        decoder.consume_payload(n)


def test_consume_payload_with_buffered_bytes_refused():
    decoder = FrameDecoder()
    with pytest.raises(RuntimeError):
        decoder.consume_payload(1)
    decoder.feed(wire.encode_file_data_header(1, 0, 10) + b"a")
    with pytest.raises(RuntimeError):
        decoder.consume_payload(1)


def test_max_payload_accepted():
    decoder = FrameDecoder()
    decoder.feed(wire.encode_file_data_header(1, 0, wire.MAX_DATA_PAYLOAD))
    assert decoder.next_event() is None
    assert decoder.payload == (1, 0, wire.MAX_DATA_PAYLOAD)


# ---- malformed input -----------------------------------------------------------------

def hello_body(magic=b"IMGMIG", version=4, role=1, digest=1, auth=0, node=b"\x01n", auth_data=b"\x00\x00"):
    return magic + struct.pack(">H", version) + bytes([role, digest, auth]) + node + auth_data + b"\x00" * 16


MALFORMED = {
    "bad magic": (raw_frame(1, hello_body(magic=b"HTTP/1")), "magic", ErrorCode.PROTOCOL),
    "wrong version": (raw_frame(1, hello_body(version=3)), "version 3", ErrorCode.VERSION),
    "version 2": (raw_frame(1, hello_body(version=2)), "version 2", ErrorCode.VERSION),
    "version 1": (raw_frame(1, hello_body(version=1)), "version 1", ErrorCode.VERSION),
    "version 0": (raw_frame(1, hello_body(version=0)), "version 0", ErrorCode.VERSION),
    "unknown role": (raw_frame(1, hello_body(role=3)), "HELLO", ErrorCode.PROTOCOL),
    "unknown digest": (raw_frame(1, hello_body(digest=9)), "HELLO", ErrorCode.PROTOCOL),
    "unknown auth": (raw_frame(1, hello_body(auth=5)), "HELLO", ErrorCode.PROTOCOL),
    "auth data without method": (raw_frame(1, hello_body(auth_data=b"\x00\x02xy")), "auth", ErrorCode.PROTOCOL),
    "hello truncated": (raw_frame(1, hello_body()[:-1]), "truncated", ErrorCode.PROTOCOL),
    "hello trailing": (raw_frame(1, hello_body() + b"\x00"), "trailing", ErrorCode.PROTOCOL),
    "empty node": (raw_frame(1, hello_body(node=b"\x00")), "invalid node", ErrorCode.PROTOCOL),
    "node not utf-8": (raw_frame(1, hello_body(node=b"\x02\xff\xfe")), "UTF-8", ErrorCode.PROTOCOL),
    "unknown type 0": (raw_frame(0, b""), "unknown frame type 0", ErrorCode.PROTOCOL),
    "unknown type 21": (raw_frame(21, b""), "unknown frame type 21", ErrorCode.PROTOCOL),
    "prepare without size": (raw_frame(20, b""), "truncated", ErrorCode.PROTOCOL),
    "prepare short size": (raw_frame(20, b"\x00" * 7), "truncated", ErrorCode.PROTOCOL),
    "prepare trailing": (raw_frame(20, b"\x00" * 9), "trailing", ErrorCode.PROTOCOL),
    "running without pid": (raw_frame(18, b"\x02cp"), "truncated", ErrorCode.PROTOCOL),
    "running short pid": (raw_frame(18, b"\x02cp\x00\x00\x01"), "truncated", ErrorCode.PROTOCOL),
    "running trailing": (raw_frame(18, b"\x02cp\x00\x00\x00\x01x"), "trailing", ErrorCode.PROTOCOL),
    "running bad id": (raw_frame(18, b"\x02..\x00\x00\x00\x01"), "invalid checkpoint id", ErrorCode.PROTOCOL),
    "return without id": (raw_frame(17, b""), "truncated", ErrorCode.PROTOCOL),
    "return trailing": (raw_frame(17, b"\x02cpx"), "trailing", ErrorCode.PROTOCOL),
    "begun unknown status": (raw_frame(12, b"\x06\x02cp" + b"\x00" * 6), "BEGUN", ErrorCode.PROTOCOL),
    "begun held truncated": (raw_frame(12, b"\x01\x02cp" + b"\x00" * 4 + b"\x00\x01" + b"\x00" * 11),
                             "truncated", ErrorCode.PROTOCOL),
    "grant flag 2": (raw_frame(14, b"\x02\x02cp\x01b"), "flag byte 2", ErrorCode.PROTOCOL),
    "grant no holder": (raw_frame(14, b"\x01\x02cp\x00"), "invalid holder", ErrorCode.PROTOCOL),
    "confirm of ack": (raw_frame(15, b"\x07\x02cp"), "CONFIRM of frame type 7", ErrorCode.PROTOCOL),
    "ping with body": (raw_frame(16, b"x"), "trailing", ErrorCode.PROTOCOL),
    "unknown type 255": (raw_frame(255, b"x"), "unknown frame type 255", ErrorCode.PROTOCOL),
    "control length 0": (b"\x00\x00\x00\x00\x02", "length 0", ErrorCode.PROTOCOL),
    "control too long": (struct.pack(">IB", wire.MAX_CONTROL_FRAME + 1, 2), "length", ErrorCode.PROTOCOL),
    "control huge": (struct.pack(">IB", 0xFFFFFFFF, 10), "length", ErrorCode.PROTOCOL),
    "payload 0": (struct.pack(">IBIQ", wire.DATA_HEADER, 4, 0, 0), "payload length 0", ErrorCode.PROTOCOL),
    "payload negative": (struct.pack(">IB", 1, 4), "payload length", ErrorCode.PROTOCOL),
    "payload too big": (struct.pack(">IBIQ", wire.DATA_HEADER + wire.MAX_DATA_PAYLOAD + 1, 4, 0, 0),
                        "payload length", ErrorCode.PROTOCOL),
    "begin flag 2": (raw_frame(2, b"\x02\x02cp"), "flag byte 2", ErrorCode.PROTOCOL),
    "begin empty id": (raw_frame(2, b"\x00\x00"), "invalid checkpoint id", ErrorCode.PROTOCOL),
    "begin id dotdot": (raw_frame(2, b"\x00\x02.."), "invalid", ErrorCode.PROTOCOL),
    "begin id with slash": (raw_frame(2, b"\x00\x03a/b"), "invalid", ErrorCode.PROTOCOL),
    "begin truncated": (raw_frame(2, b"\x00\x05ab"), "truncated", ErrorCode.PROTOCOL),
    "begin no body": (raw_frame(2, b""), "truncated", ErrorCode.PROTOCOL),
    "file name slash": (raw_frame(3, b"\x00\x00\x00\x01\x05a/img"), "invalid file name", ErrorCode.PROTOCOL),
    "file name '/'": (raw_frame(3, b"\x00\x00\x00\x01\x01/"), "invalid file name", ErrorCode.PROTOCOL),
    "file name '.'": (raw_frame(3, b"\x00\x00\x00\x01\x01."), "invalid file name", ErrorCode.PROTOCOL),
    "file name not utf-8": (raw_frame(3, b"\x00\x00\x00\x01\x01\xff"), "UTF-8", ErrorCode.PROTOCOL),
    "file name control char": (raw_frame(3, b"\x00\x00\x00\x01\x02a\n"), "control", ErrorCode.PROTOCOL),
    "file begin trailing": (raw_frame(3, b"\x00\x00\x00\x01\x01ax"), "trailing", ErrorCode.PROTOCOL),
    "file end truncated digest": (raw_frame(5, b"\x00" * 12 + b"\x20" + b"d" * 31), "truncated",
                                  ErrorCode.PROTOCOL),
    "file end trailing": (raw_frame(5, b"\x00" * 12 + b"\x01dd"), "trailing", ErrorCode.PROTOCOL),
    "checkpoint end flag 7": (raw_frame(6, b"\x07" + b"\x00" * 12), "flag byte 7", ErrorCode.PROTOCOL),
    "checkpoint end short": (raw_frame(6, b"\x01" + b"\x00" * 11), "truncated", ErrorCode.PROTOCOL),
    "ack short": (raw_frame(7, b"\x00" * 11), "truncated", ErrorCode.PROTOCOL),
    "ack trailing": (raw_frame(7, b"\x00" * 13), "trailing", ErrorCode.PROTOCOL),
    "done flag 2": (raw_frame(8, b"\x02\x00\x00"), "flag byte 2", ErrorCode.PROTOCOL),
    "done message not utf-8": (raw_frame(8, b"\x01\x00\x01\xc3"), "UTF-8", ErrorCode.PROTOCOL),
    "done message truncated": (raw_frame(8, b"\x01\x00\x09abc"), "truncated", ErrorCode.PROTOCOL),
    "restored bad id": (raw_frame(9, b"\x01/"), "invalid checkpoint id", ErrorCode.PROTOCOL),
    "error short": (raw_frame(10, b"\x00"), "truncated", ErrorCode.PROTOCOL),
    "error message control": (raw_frame(10, b"\x00\x01\x00\x01\x07"), "control", ErrorCode.PROTOCOL),
}


@pytest.mark.parametrize("data, match, code", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed(data, match, code):
    with pytest.raises(PeerProtocolError, match=match) as info:
        decode_all(data)
    assert info.value.code is code


@pytest.mark.parametrize("data, match, code", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_one_byte_at_a_time(data, match, code):
    """Errors are found whichever way the bytes are cut (and never before they can be)."""
    with pytest.raises(PeerProtocolError, match=match):
        decode_all(data, step=1)


def test_oversized_control_frame_rejected_before_body_arrives():
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">IB", 100 * 1024 * 1024, FrameType.CHECKPOINT_BEGIN))
    with pytest.raises(PeerProtocolError):
        decoder.next_event()


def test_incomplete_frames_wait():
    for data, _ in ROUNDTRIPS:
        decoder = FrameDecoder()
        decoder.feed(data[:-1] if data[4] != FrameType.FILE_DATA else data[:4])
        assert decoder.next_event() is None


# ---- InboundCheckpoint ordering ----------------------------------------------------------

def started(checkpoint="cp-1") -> InboundCheckpoint:
    order = InboundCheckpoint()
    order.check(PROXY_HELLO)
    order.check(CheckpointBegin(checkpoint))
    return order


def test_order_full_checkpoint():
    order = started()
    order.check(FileBegin(0, "pages-1.img"))
    order.check(FileBegin(1, "pagemap-1.img"))
    order.check(FileData(0, 0, b"abc"))
    order.check(FileData(1, 0, b"x"))
    order.check_payload(0, 3, 10)
    order.check(FileEnd(1, 1, DIGEST))
    order.check(FileEnd(0, 13, DIGEST))
    order.check(CheckpointEnd(True, 2, 14))
    assert order.ended and order.checkpoint == "cp-1"
    order.check(wire.Drop("cp-1"))


def test_order_drop_only_after_end_and_for_this_checkpoint():
    order = started()
    with pytest.raises(PeerProtocolError, match="DROP before CHECKPOINT_END"):
        order.check(wire.Drop("cp-1"))
    order.check(CheckpointEnd(True, 0, 0))
    with pytest.raises(PeerProtocolError, match="for another checkpoint"):
        order.check(wire.Drop("cp-2"))


def test_order_hello_first():
    with pytest.raises(PeerProtocolError, match="HELLO first"):
        InboundCheckpoint().check(CheckpointBegin("cp"))
    with pytest.raises(PeerProtocolError, match="HELLO first"):
        InboundCheckpoint().check(wire.Error(1, "x"))


def test_order_role_must_be_proxy():
    with pytest.raises(PeerProtocolError, match="proxy"):
        InboundCheckpoint().check(Hello(1, Role.CACHE, "n"))


def test_order_checkpoint_begin_next():
    order = InboundCheckpoint()
    order.check(PROXY_HELLO)
    with pytest.raises(PeerProtocolError, match="CHECKPOINT_BEGIN"):
        order.check(FileBegin(0, "a.img"))
    order = InboundCheckpoint()
    order.check(PROXY_HELLO)
    with pytest.raises(PeerProtocolError, match="CHECKPOINT_BEGIN"):
        order.check(PROXY_HELLO)


def test_order_error_from_peer_is_allowed_anywhere_after_hello():
    order = started()
    order.check(wire.Error(ErrorCode.INTERNAL, "x"))


def test_order_duplicate_file_name():
    order = started()
    order.check(FileBegin(0, "a.img"))
    order.check(FileEnd(0, 0, DIGEST))
    with pytest.raises(PeerProtocolError) as info:
        order.check(FileBegin(1, "a.img"))
    assert info.value.code is ErrorCode.DUPLICATE_FILE


def test_order_duplicate_file_id():
    order = started()
    order.check(FileBegin(0, "a.img"))
    with pytest.raises(PeerProtocolError, match="twice") as info:
        order.check(FileBegin(0, "b.img"))
    assert info.value.code is ErrorCode.PROTOCOL


def test_order_data_for_unopened_or_ended_file():
    order = started()
    with pytest.raises(PeerProtocolError, match="not open"):
        order.check(FileData(0, 0, b"x"))
    order.check(FileBegin(0, "a.img"))
    order.check(FileEnd(0, 0, DIGEST))
    with pytest.raises(PeerProtocolError, match="not open"):
        order.check(FileData(0, 0, b"x"))
    with pytest.raises(PeerProtocolError, match="not open"):
        order.check_payload(0, 0, 1)


def test_order_file_ids_count_up_and_held_reports_open_files():
    order = started()
    with pytest.raises(PeerProtocolError, match="file id 1, expected 0"):
        order.check(FileBegin(1, "a.img"))
    order.check(FileBegin(0, "a.img"))
    order.check(FileBegin(1, "b.img"))
    order.check(FileData(1, 0, b"xyz"))
    order.check(FileEnd(0, 0, DIGEST))
    assert order.held() == (2, ((1, 3),))


@pytest.mark.parametrize("offset", [1, 2, 100, 0])
def test_order_offset_gap_or_overlap(offset):
    order = started()
    order.check(FileBegin(0, "a.img"))
    order.check(FileData(0, 0, b"ab"))
    if offset == 2:
        order.check(FileData(0, offset, b"c"))
        return
    with pytest.raises(PeerProtocolError, match=f"offset {offset}, expected 2"):
        order.check(FileData(0, offset, b"c"))


def test_order_file_end_for_unopened():
    order = started()
    with pytest.raises(PeerProtocolError, match="not open"):
        order.check(FileEnd(0, 0, DIGEST))


@pytest.mark.parametrize("size", [0, 2, 4, 2**64 - 1])
def test_order_file_end_size_mismatch(size):
    order = started()
    order.check(FileBegin(0, "a.img"))
    order.check(FileData(0, 0, b"abc"))
    with pytest.raises(PeerProtocolError, match=f"says {size} bytes, 3 arrived"):
        order.check(FileEnd(0, size, DIGEST))


def test_order_clean_end_with_open_files():
    order = started()
    order.check(FileBegin(0, "a.img"))
    with pytest.raises(PeerProtocolError, match="still open"):
        order.check(CheckpointEnd(True, 1, 0))


def test_order_unclean_end_with_open_files_is_fine():
    order = started()
    order.check(FileBegin(0, "a.img"))
    order.check(CheckpointEnd(False, 1, 0))
    assert order.ended


def test_order_files_listed_with_files_still_open_then_data_and_end():
    """FILES_LISTED may come while files are open (the pages still arriving); their bytes follow."""
    order = started()
    order.check(FileBegin(0, "pages-1.img"))
    order.check(FileBegin(1, "inventory.img"))
    order.check(FileEnd(1, 0, DIGEST))
    order.check(wire.FilesListed(2))
    order.check(FileData(0, 0, b"abc"))
    order.check(FileEnd(0, 3, DIGEST))
    order.check(CheckpointEnd(True, 2, 3))
    assert order.listed == 2 and order.ended


@pytest.mark.parametrize("files", [0, 2, 2**32 - 1])
def test_order_files_listed_wrong_count(files):
    order = started()
    order.check(FileBegin(0, "a.img"))
    with pytest.raises(PeerProtocolError, match=f"counts {files} files, 1 were begun"):
        order.check(wire.FilesListed(files))


def test_order_no_file_begin_after_files_listed():
    """A file the cache was told would never come cannot come: a restore may already have
    been answered that it is absent."""
    order = started()
    order.check(FileBegin(0, "a.img"))
    order.check(wire.FilesListed(1))
    with pytest.raises(PeerProtocolError, match=r"FILE_BEGIN for b\.img after FILES_LISTED said 1 files"):
        order.check(FileBegin(1, "b.img"))


def test_order_files_listed_again_on_a_resumed_connection_must_agree():
    order = started()
    order.check(FileBegin(0, "a.img"))
    order.check(wire.FilesListed(1))
    order.check(wire.FilesListed(1))  # a resumed connection says it again
    with pytest.raises(PeerProtocolError, match="counts 2 files"):
        order.check(wire.FilesListed(2))


def test_order_clean_end_wrong_count():
    order = started()
    order.check(FileBegin(0, "a.img"))
    order.check(FileEnd(0, 0, DIGEST))
    with pytest.raises(PeerProtocolError, match="counts 2 files, 1 were sent"):
        order.check(CheckpointEnd(True, 2, 0))


@pytest.mark.parametrize("event", [FileBegin(9, "z.img"), FileData(0, 0, b"x"), CheckpointEnd(True, 0, 0),
                                   CheckpointBegin("cp-2")])
def test_order_frames_after_end(event):
    order = started()
    order.check(CheckpointEnd(True, 0, 0))
    with pytest.raises(PeerProtocolError, match="after CHECKPOINT_END"):
        order.check(event)


@pytest.mark.parametrize("event", [Ack(0, 0), CheckpointDone(True, ""), Restored("cp-1"), PROXY_HELLO,
                                   CheckpointBegin("cp-2"), wire.Running("cp-1", 7)])
def test_order_frames_a_proxy_never_sends(event):
    order = started()
    with pytest.raises(PeerProtocolError):
        order.check(event)
