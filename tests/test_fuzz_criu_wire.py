"""Property-based fuzzing (Hypothesis) of imgmig.protocol.criu_wire's two connection decoders.

CRIU writes a request with one write() and passes each pipe end with SCM_RIGHTS on a
1-byte sendmsg() of its own. A stream here is a list of such sends ("segments": bytes
plus the fds they carry), delivered the way a Linux AF_UNIX stream socket delivers them
to recvmsg(): reads glue plain sends together, a read that reaches a send carrying fds
gets those fds and stops at the end of that send. Every fd is a real pipe end, so that
fd bookkeeping can be checked: each one passed in comes out exactly once, in an event or
in fds_to_close(), and none is closed by the codec.

The run length comes from the Hypothesis profile in tests/conftest.py (short and fixed
by default; tools/fuzz-long.sh for the long run).
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

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
# After any receive() that did not raise, at most an incomplete frame stays buffered.
MAX_PENDING = 4 + criu_wire.MAX_MESSAGE

Segment = tuple[bytes, int]  # bytes of one send, and how many fds it carries


# ---- strategies ---------------------------------------------------------------------

def _valid_name(text: str) -> bool:
    return text not in (".", "..") and 0 < len(text.encode()) <= criu_wire.MAX_NAME

NAME_CHARS = st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"),
                           blacklist_characters="/\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                                                "\u2007\u2008\u2009\u200a\u202f\u205f\u3000")
names = st.one_of(
    st.text(NAME_CHARS, min_size=1, max_size=40),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=255),
).filter(_valid_name)

read_sizes = st.lists(st.integers(1, 5000), min_size=1, max_size=8)


@st.composite
def unknown_field(draw: st.DrawFn) -> bytes:
    """A field CRIU's proto does not define: proto2 says skip it."""
    number = draw(st.integers(2, 2**29 - 1))
    wire_type = draw(st.sampled_from([0, 1, 2, 5]))
    key = criu_wire.encode_varint(number << 3 | wire_type)
    if wire_type == 0:
        return key + criu_wire.encode_varint(draw(st.integers(0, 2**64 - 1)))
    if wire_type == 1:
        return key + draw(st.binary(min_size=8, max_size=8))
    if wire_type == 5:
        return key + draw(st.binary(min_size=4, max_size=4))
    value = draw(st.binary(max_size=40))
    return key + criu_wire.encode_varint(len(value)) + value


def name_field(name: str) -> bytes:
    raw = name.encode()
    return b"\x0a" + criu_wire.encode_varint(len(raw)) + raw


@st.composite
def request(draw: st.DrawFn) -> tuple[bytes, str]:
    """A request frame with random valid fields (unknown ones, the name repeated: the
    last one counts) and the name it carries."""
    name = draw(names)
    before = draw(st.lists(st.one_of(unknown_field(), names.map(name_field)), max_size=3))
    after = draw(st.lists(unknown_field(), max_size=2))
    body = b"".join(before) + name_field(name) + b"".join(after)
    if len(body) > criu_wire.MAX_MESSAGE:
        body = name_field(name)
    return LEN.pack(len(body)) + body, name


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` as several sends: CRIU uses one, but nothing may depend on that."""
    points = sorted({c % len(data) for c in cuts if c % len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@st.composite
def capture_stream(draw: st.DrawFn) -> tuple[list[Segment], list[str]]:
    """A valid `criu dump --stream` conversation: request, then an fd on a dummy byte, repeated."""
    segments: list[Segment] = []
    wanted: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        frame, name = draw(request())
        segments += [(part, 0) for part in split(frame, draw(st.lists(st.integers(0, 5000), max_size=2)))]
        segments.append((b"\0", 1))
        wanted.append(name)
    return segments, wanted


@st.composite
def junk_segments(draw: st.DrawFn) -> list[Segment]:
    """Arbitrary bytes, some sends carrying fds."""
    return draw(st.lists(st.tuples(st.binary(min_size=1, max_size=300), st.integers(0, 3)), max_size=8))


@st.composite
def mutated(draw: st.DrawFn, segments: list[Segment]) -> list[Segment]:
    """Valid sends with sends dropped, duplicated, swapped, fds moved, and bytes flipped,
    inserted or cut off."""
    segments = list(segments)
    for _ in range(draw(st.integers(1, 4))):
        if not segments:
            segments.append((draw(st.binary(min_size=1, max_size=20)), 0))
            continue
        i = draw(st.integers(0, len(segments) - 1))
        j = draw(st.integers(0, len(segments) - 1))
        data, nfds = segments[i]
        op = draw(st.sampled_from(["drop", "dup", "swap", "fds", "flip", "insert", "truncate"]))
        if op == "drop":
            del segments[i]
        elif op == "dup":
            segments.insert(j, segments[i])
        elif op == "swap":
            segments[i], segments[j] = segments[j], segments[i]
        elif op == "fds":
            segments[i] = (data, draw(st.integers(0, 3)))
        elif op == "flip":
            pos = draw(st.integers(0, len(data) - 1))
            segments[i] = (data[:pos] + bytes([data[pos] ^ 1 << draw(st.integers(0, 7))]) + data[pos + 1:], nfds)
        elif op == "insert":
            pos = draw(st.integers(0, len(data)))
            segments[i] = (data[:pos] + draw(st.binary(min_size=1, max_size=8)) + data[pos:], nfds)
        else:
            segments = [*segments[:i], (data[:draw(st.integers(1, len(data)))], nfds)]
    return segments


# ---- the kernel's side: real fds, recvmsg()'s cuts ------------------------------------

@dataclass
class Fds:
    """Real pipe read ends handed to the codec; all closed at the end of the example."""
    made: list[int] = field(default_factory=list)
    others: list[int] = field(default_factory=list)

    def make(self) -> int:
        r, w = os.pipe()
        self.made.append(r)
        self.others.append(w)
        return r

    def assert_all_open(self) -> None:
        for fd in self.made:
            os.fstat(fd)  # raises EBADF if the codec closed an fd it does not own


@contextmanager
def pipe_fds() -> Iterator[Fds]:
    fds = Fds()
    try:
        yield fds
    finally:
        for fd in fds.made + fds.others:
            os.close(fd)


def recvmsg_reads(segments: list[Segment], sizes: list[int], fds: Fds) -> list[tuple[bytes, list[int]]]:
    """What successive recvmsg(size) calls return for these sends (Linux unix_stream_read_generic):
    plain sends are glued; the first read that touches a send carrying fds gets them and
    stops at that send's end (or at `size`)."""
    with_fds = [(data, [fds.make() for _ in range(n)]) for data, n in segments]
    reads: list[tuple[bytes, list[int]]] = []
    index = offset = 0
    while index < len(with_fds):
        size = sizes[len(reads) % len(sizes)]
        data, got = bytearray(), []
        while index < len(with_fds) and len(data) < size:
            raw, passed = with_fds[index]
            take = min(size - len(data), len(raw) - offset)
            if offset == 0 and passed:
                got = passed
            data += raw[offset:offset + take]
            offset += take
            if offset == len(raw):
                index, offset = index + 1, 0
            if got:
                break
        reads.append((bytes(data), got))
    return reads


# ---- drivers ------------------------------------------------------------------------

@dataclass
class Outcome:
    events: list[object]
    error: str | None
    fds_given: list[int]
    fds_back: list[int]
    mid_message: bool


def assert_bounded(conn: CaptureConnection | ServeConnection) -> None:
    """What a connection holds between reads: at most one incomplete frame and one early fd."""
    assert conn._reader.pending_bytes < MAX_PENDING
    assert conn._reader.pending_fds <= criu_wire.MAX_QUEUED_FDS


def run_capture(reads: list[tuple[bytes, list[int]]]) -> Outcome:
    conn = CaptureConnection()
    events: list[object] = []
    given: list[int] = []
    error = None
    try:
        for data, fds in reads:
            given += fds
            events += conn.receive(data, fds)
            assert_bounded(conn)
    except CriuProtocolError as exc:
        error = str(exc)
    return Outcome(events, error, given, conn.fds_to_close(), conn.mid_message)


def run_serve(turns: list[list[tuple[bytes, list[int]]]], answers: list[bool]) -> Outcome:
    """Feed each turn's reads; after each request, answer (exists or not) before the next read."""
    conn = ServeConnection()
    events: list[object] = []
    given: list[int] = []
    error = None
    asked = 0
    try:
        for data, fds in (read for turn in turns for read in turn):
            given += fds
            new = conn.receive(data, fds)
            while new:
                events += new
                assert_bounded(conn)
                if isinstance(new[-1], ImageRequested):
                    conn.reply(answers[asked % len(answers)])
                    asked += 1
                new = conn.receive(b"")
    except CriuProtocolError as exc:
        error = str(exc)
    return Outcome(events, error, given, conn.fds_to_close(), conn.mid_message)


def assert_fds_accounted(outcome: Outcome, fds: Fds) -> None:
    """Every fd passed in comes out exactly once: in an event or from fds_to_close()."""
    handed = [event.fd for event in outcome.events if isinstance(event, ImageOffered | PipeGiven)]
    assert sorted(handed + outcome.fds_back) == sorted(outcome.fds_given)
    fds.assert_all_open()


# ---- capture --------------------------------------------------------------------------

@given(capture_stream(), read_sizes)
def test_capture_valid_streams_round_trip(stream, sizes):
    segments, wanted = stream
    with pipe_fds() as fds:
        reads = recvmsg_reads(segments, sizes, fds)
        outcome = run_capture(reads)
        assert outcome.error is None
        assert [(e.name, e.fd) for e in outcome.events] == list(zip(wanted, outcome.fds_given, strict=True))
        assert not outcome.mid_message
        assert outcome.fds_back == []
        fds.assert_all_open()


@given(junk_segments(), read_sizes)
def test_capture_arbitrary_input_yields_events_or_protocol_error(segments, sizes):
    with pipe_fds() as fds:
        outcome = run_capture(recvmsg_reads(segments, sizes, fds))
        assert all(isinstance(event, ImageOffered) for event in outcome.events)
        assert_fds_accounted(outcome, fds)


@given(st.data(), capture_stream(), read_sizes, read_sizes)
def test_capture_mutated_streams_consistent_or_refused(data, stream, sizes_a, sizes_b):
    segments = data.draw(mutated(stream[0]))
    with pipe_fds() as fds:
        a = run_capture(recvmsg_reads(segments, sizes_a, fds))
        b = run_capture(recvmsg_reads(segments, sizes_b, fds))
        assert_fds_accounted(a, fds)
        assert_fds_accounted(b, fds)
    if a.error is None and b.error is None:
        # Cut differently, the same sends give the same images, the k-th with the k-th fd.
        assert [(e.name, a.fds_given.index(e.fd)) for e in a.events] == \
               [(e.name, b.fds_given.index(e.fd)) for e in b.events]
        assert a.mid_message == b.mid_message


@given(st.binary(max_size=600), st.lists(st.integers(1, 600), min_size=1, max_size=8))
def test_capture_chunking_invariance_without_fds(data, sizes):
    """Bytes alone (no fd ever) are refused or kept at the same point however they are cut."""
    with pipe_fds() as fds:
        whole = run_capture(recvmsg_reads([(data, 0)] if data else [], [len(data) or 1], fds))
        cut = run_capture(recvmsg_reads([(data, 0)] if data else [], sizes, fds))
    assert (whole.error, whole.events, whole.mid_message) == (cut.error, cut.events, cut.mid_message)


# ---- serve ----------------------------------------------------------------------------

@st.composite
def serve_conversation(draw: st.DrawFn) -> tuple[list[list[Segment]], list[bool], list[str]]:
    """A valid `criu restore --stream` conversation: request; our reply; the fd if it exists."""
    turns: list[list[Segment]] = []
    answers: list[bool] = []
    wanted: list[str] = []
    exists = False
    for _ in range(draw(st.integers(0, 6))):
        frame, name = draw(request())
        turn = [(b"\0", 1)] if exists else []
        turns.append(turn + [(part, 0) for part in split(frame, draw(st.lists(st.integers(0, 5000), max_size=2)))])
        exists = draw(st.booleans())
        answers.append(exists)
        wanted.append(name)
    if exists:
        turns.append([(b"\0", 1)])
    return turns, answers, wanted


def expected_serve_events(wanted: list[str], answers: list[bool]) -> list[tuple[str, str]]:
    events = []
    for name, exists in zip(wanted, answers, strict=True):
        events.append(("requested", name))
        if exists:
            events.append(("pipe", name))
    return events


def serve_events(outcome: Outcome) -> list[tuple[str, str]]:
    return [("requested" if isinstance(e, ImageRequested) else "pipe", e.name) for e in outcome.events]


@given(serve_conversation(), read_sizes)
def test_serve_valid_conversations_round_trip(conversation, sizes):
    turns, answers, wanted = conversation
    with pipe_fds() as fds:
        outcome = run_serve([recvmsg_reads(turn, sizes, fds) for turn in turns], answers)
        assert outcome.error is None
        assert serve_events(outcome) == expected_serve_events(wanted, answers)
        assert [e.fd for e in outcome.events if isinstance(e, PipeGiven)] == outcome.fds_given
        assert not outcome.mid_message
        assert outcome.fds_back == []
        fds.assert_all_open()


@given(st.lists(junk_segments(), max_size=4), st.lists(st.booleans(), min_size=1, max_size=4), read_sizes)
def test_serve_arbitrary_input_yields_events_or_protocol_error(turns, answers, sizes):
    with pipe_fds() as fds:
        outcome = run_serve([recvmsg_reads(turn, sizes, fds) for turn in turns], answers)
        assert all(isinstance(event, ImageRequested | PipeGiven) for event in outcome.events)
        assert_fds_accounted(outcome, fds)


@given(st.data(), serve_conversation(), read_sizes, read_sizes)
def test_serve_mutated_conversations_consistent_or_refused(data, conversation, sizes_a, sizes_b):
    turns, answers, _ = conversation
    turns = [data.draw(mutated(turn)) for turn in turns] if turns else [data.draw(mutated([]))]
    with pipe_fds() as fds:
        a = run_serve([recvmsg_reads(turn, sizes_a, fds) for turn in turns], answers or [True])
        b = run_serve([recvmsg_reads(turn, sizes_b, fds) for turn in turns], answers or [True])
        assert_fds_accounted(a, fds)
        assert_fds_accounted(b, fds)
    if a.error is None and b.error is None:
        assert serve_events(a) == serve_events(b)
        assert [a.fds_given.index(e.fd) for e in a.events if isinstance(e, PipeGiven)] == \
               [b.fds_given.index(e.fd) for e in b.events if isinstance(e, PipeGiven)]


@given(st.data(), serve_conversation(), st.lists(st.booleans(), min_size=1, max_size=4), read_sizes)
def test_serve_pipes_only_for_images_answered_present(data, conversation, answers, sizes):
    """Whatever CRIU sends, a pipe is handed out only right after we said its image exists."""
    turns = [data.draw(mutated(turn)) for turn in conversation[0]] or [data.draw(mutated([]))]
    with pipe_fds() as fds:
        outcome = run_serve([recvmsg_reads(turn, sizes, fds) for turn in turns], answers)
        assert_fds_accounted(outcome, fds)
    asked = 0
    for i, event in enumerate(outcome.events):
        if isinstance(event, ImageRequested):
            asked += 1
        else:
            assert i > 0 and outcome.events[i - 1] == ImageRequested(event.name)
            assert answers[(asked - 1) % len(answers)], "a pipe for an image we said was absent"


# ---- the body decoder alone -------------------------------------------------------------

@given(request())
def test_request_body_round_trip(frame_and_name):
    frame, name = frame_and_name
    assert criu_wire.decode_request_body(frame[4:]) == name


@given(st.binary(max_size=300))
def test_request_body_arbitrary_bytes(body):
    try:
        name = criu_wire.decode_request_body(body)
    except CriuProtocolError:
        return
    assert name.isprintable() and "/" not in name and name not in (".", "..")
    assert 0 < len(name.encode()) <= criu_wire.MAX_NAME
