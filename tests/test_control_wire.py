"""The control socket codec (imgmig.protocol.control_wire), byte by byte, and fuzzed."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgmig.protocol import control_wire as cw


def decode_all(data: bytes, limit: int = cw.MAX_REQUEST) -> list[dict]:
    decoder = cw.LineDecoder(limit)
    decoder.feed(data)
    messages = []
    while (message := decoder.next_message()) is not None:
        messages.append(message)
    return messages


def test_request_round_trip_and_exact_bytes() -> None:
    line = cw.encode_request("drop", id="node-a-1", force=True)
    assert line == b'{"v":1,"op":"drop","id":"node-a-1","force":true}\n'
    request = cw.decode_request(decode_all(line)[0])
    assert request == cw.Request("drop", {"id": "node-a-1", "force": True})
    assert cw.text_arg(request, "id") == "node-a-1" and cw.bool_arg(request, "force") is True


def test_replies_ok_and_error() -> None:
    assert cw.decode_reply(decode_all(cw.encode_reply({"n": 1}), cw.MAX_REPLY)[0]) == cw.Reply(True, {"n": 1})
    assert cw.decode_reply(decode_all(cw.encode_error("no"), cw.MAX_REPLY)[0]) == cw.Reply(False, error="no")


def test_fed_one_byte_at_a_time() -> None:
    data = cw.encode_request("status") + cw.encode_request("list")
    decoder = cw.LineDecoder(cw.MAX_REQUEST)
    ops = []
    for byte in data:
        decoder.feed(bytes([byte]))
        while (message := decoder.next_message()) is not None:
            ops.append(cw.decode_request(message).op)
    assert ops == ["status", "list"] and decoder.buffered == 0


@pytest.mark.parametrize(("data", "reason"), [
    (b"garbage\n", "not valid JSON"),
    (b"\xff\xfe\n", "not UTF-8"),
    (b"[1, 2]\n", "must be a JSON object"),
    (b'{"v": 1, "op": "status", "x": NaN}\n', "not a JSON number"),
    (b'{"v": 1, "v": 1}\n', "duplicate key"),
    (b'{"a":' * 7 + b"1" + b"}" * 7 + b"\n", "nesting deeper"),
    (b"[" * 100_000 + b"\n", "a line longer"),
    (json.dumps({f"k{i}": i for i in range(cw.MAX_KEYS + 1)}).encode() + b"\n", "more than 64 keys"),
    (json.dumps({"s": "x" * (cw.MAX_STRING + 1)}).encode() + b"\n", "a string longer"),
])
def test_bad_lines_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(cw.ControlProtocolError, match=reason):
        decode_all(data)


def test_a_long_line_is_refused_before_its_newline_arrives() -> None:
    decoder = cw.LineDecoder(100)
    with pytest.raises(cw.ControlProtocolError, match="longer than 100"):
        decoder.feed(b"x" * 101)


def test_version_and_op_are_checked() -> None:
    with pytest.raises(cw.ControlProtocolError, match="version 2 is not supported"):
        cw.decode_request({"v": 2, "op": "status"})
    with pytest.raises(cw.ControlProtocolError, match="unknown op 'reboot'"):
        cw.decode_request({"v": 1, "op": "reboot"})
    with pytest.raises(cw.ControlProtocolError, match="'id' must be a non-empty string"):
        cw.text_arg(cw.Request("drop", {"id": 5}), "id")


@pytest.mark.parametrize("value", [0, 1 << 30, 2**63 - 1])
def test_a_byte_count_is_a_non_negative_integer(value) -> None:
    assert cw.size_arg(cw.decode_request({"v": 1, "op": "prepare", "bytes": value}), "bytes") == value


@pytest.mark.parametrize("value", [-1, 2**63, True, 1.5, "1024", None, [1]])
def test_anything_else_is_no_byte_count(value) -> None:
    with pytest.raises(cw.ControlProtocolError, match="op prepare: 'bytes' must be a byte count"):
        cw.size_arg(cw.Request("prepare", {"bytes": value}), "bytes")


def test_braces_inside_strings_do_not_count_as_depth() -> None:
    message = decode_all(cw.encode_request("claim", id="{[{[{[{[{[x"))[0]
    assert message["id"] == "{[{[{[{[{[x"


def test_an_oversized_reply_is_not_encoded() -> None:
    with pytest.raises(cw.ControlProtocolError, match="exceeds"):
        cw.encode_reply({"blob": "x" * cw.MAX_REPLY})


@settings(deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    try:
        for message in decode_all(data):
            cw.decode_request(message)
    except cw.ControlProtocolError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in ("v", "op")), json_values,
                       max_size=8))
def test_fuzz_requests_round_trip(args: dict) -> None:
    line = cw.encode_request("status", **args)
    try:
        (message,) = decode_all(line)
    except cw.ControlProtocolError as exc:  # only the depth bound may refuse what we encoded
        assert "nesting" in str(exc)
        return
    assert cw.decode_request(message) == cw.Request("status", args)
