"""Property-based fuzzing (Hypothesis) of imgmig.protocol.peer_wire: FrameDecoder, its
payload path (`payload`/`consume_payload`, what the cache's splice uses) and the order
checks of InboundCheckpoint.

The decoder is driven the way imgmig/datapath/receive.py drives it: read a chunk, take
events until none, and inside a FILE_DATA payload with nothing buffered, sometimes move
payload bytes past the decoder ("splice") and tell it with consume_payload().

The run length comes from the Hypothesis profile in tests/conftest.py (short and fixed
by default; tools/fuzz-long.sh for the long run).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hypothesis import given
from hypothesis import strategies as st

from imgmig.protocol import peer_wire as wire
from imgmig.protocol import tunnel_wire
from imgmig.protocol.peer_wire import (
    Ack,
    Auth,
    CheckpointBegin,
    CheckpointDone,
    CheckpointEnd,
    Digest,
    Drop,
    Error,
    FileBegin,
    FileData,
    FileEnd,
    FrameDecoder,
    Hello,
    InboundCheckpoint,
    PeerProtocolError,
    Restored,
    Role,
)

# Between reads the decoder holds at most one incomplete control frame (4-byte length
# + up to 64 KiB); inside a payload it holds nothing once its events are taken.
MAX_BUFFERED = 4 + wire.MAX_CONTROL_FRAME

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)


# ---- strategies: frames with random valid fields -------------------------------------

def _valid_name(text: str) -> bool:
    return text not in (".", "..") and 0 < len(text.encode()) <= wire.MAX_NAME

PRINTABLE = st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
names = st.one_of(
    st.text(PRINTABLE.filter(lambda c: c != "/" and c.isprintable()), min_size=1, max_size=40),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=255),
).filter(_valid_name)
messages = st.text(max_size=300)  # any text: the encoder makes it printable and short
payloads = st.one_of(st.binary(min_size=1, max_size=200), st.integers(1, 70_000).map(bytes))


@st.composite
def frame(draw: st.DrawFn) -> tuple[bytes, wire.Event | tunnel_wire.TunnelFrame]:
    """One encoded frame of any type, and the event it must decode to."""
    kind = draw(st.sampled_from([*wire.FrameType, *sorted(tunnel_wire.TUNNEL_TYPES)]))
    if kind in tunnel_wire.TUNNEL_TYPES:
        return _tunnel_frame(draw, kind)
    if kind is wire.FrameType.HELLO:
        event = Hello(wire.VERSION, draw(st.sampled_from(Role)), draw(names), draw(st.sampled_from(Digest)),
                      Auth.NONE)
        return wire.encode_hello(event), event
    if kind is wire.FrameType.CHECKPOINT_BEGIN:
        event = CheckpointBegin(draw(names), draw(st.booleans()))
        return wire.encode_checkpoint_begin(event.checkpoint, event.resume), event
    if kind is wire.FrameType.FILE_BEGIN:
        event = FileBegin(draw(U32), draw(names))
        return wire.encode_file_begin(event.file_id, event.name), event
    if kind is wire.FrameType.FILE_DATA:
        event = FileData(draw(U32), draw(U64), draw(payloads))
        return wire.encode_file_data(event.file_id, event.offset, event.data), event
    if kind is wire.FrameType.FILE_END:
        event = FileEnd(draw(U32), draw(U64), draw(st.binary(max_size=255)))
        return wire.encode_file_end(event.file_id, event.size, event.digest), event
    if kind is wire.FrameType.CHECKPOINT_END:
        event = CheckpointEnd(draw(st.booleans()), draw(U32), draw(U64))
        return wire.encode_checkpoint_end(event.clean, event.files, event.size), event
    if kind is wire.FrameType.FILES_LISTED:
        event = wire.FilesListed(draw(U32))
        return wire.encode_files_listed(event.files), event
    if kind is wire.FrameType.ACK:
        event = Ack(draw(U32), draw(U64))
        return wire.encode_ack(event.file_id, event.size), event
    if kind is wire.FrameType.CHECKPOINT_DONE:
        ok, message = draw(st.booleans()), draw(messages)
        return wire.encode_checkpoint_done(ok, message), CheckpointDone(ok, message)
    if kind is wire.FrameType.RESTORED:
        event = Restored(draw(names))
        return wire.encode_restored(event.checkpoint), event
    if kind is wire.FrameType.DROP:
        event = Drop(draw(names))
        return wire.encode_drop(event.checkpoint), event
    if kind is wire.FrameType.ERROR:
        code, message = draw(st.sampled_from(wire.ErrorCode)), draw(messages)
        return wire.encode_error(code, message), Error(code, message)
    return _handoff_frame(draw, kind)


def _handoff_frame(draw: st.DrawFn, kind: wire.FrameType) -> tuple[bytes, wire.Event]:
    """The frames of version 2's ordering and handoff (BEGUN, CLAIM, GRANT, CONFIRM, PING,
    RETURN, RUNNING) and version 4's PREPARE."""
    if kind is wire.FrameType.BEGUN:
        held = tuple(draw(st.lists(st.tuples(U32, U64), max_size=5)))
        event: wire.Event = wire.Begun(draw(st.sampled_from(wire.BeginStatus)), draw(names), draw(U32), held)
        return wire.encode_begun(event.status, event.checkpoint, event.files, event.held), event
    if kind is wire.FrameType.CLAIM:
        event = wire.Claim(draw(names))
        return wire.encode_claim(event.checkpoint), event
    if kind is wire.FrameType.GRANT:
        event = wire.Grant(draw(st.booleans()), draw(names), draw(names))
        return wire.encode_grant(event.granted, event.checkpoint, event.holder), event
    if kind is wire.FrameType.CONFIRM:
        event = wire.Confirm(draw(st.sampled_from(wire.CONFIRMABLE)), draw(names))
        return wire.encode_confirm(event.kind, event.checkpoint), event
    if kind is wire.FrameType.PING:
        return wire.encode_ping(), wire.Ping()
    if kind is wire.FrameType.RETURN:
        event = wire.Return(draw(names))
        return wire.encode_return(event.checkpoint), event
    if kind is wire.FrameType.PREPARE:
        event = wire.Prepare(draw(U64))
        return wire.encode_prepare(event.size), event
    assert kind is wire.FrameType.RUNNING, kind
    event = wire.Running(draw(names), draw(U32))
    return wire.encode_running(event.checkpoint, event.pid), event


def _tunnel_frame(draw: st.DrawFn, kind: int) -> tuple[bytes, tunnel_wire.TunnelFrame]:
    """A lazy migration's page-server tunnel frames (types 32-35)."""
    channel = draw(U32)
    if kind == tunnel_wire.TUNNEL_OPEN:
        return tunnel_wire.encode_open(channel), tunnel_wire.TunnelOpen(channel)
    if kind == tunnel_wire.TUNNEL_EOF:
        return tunnel_wire.encode_eof(channel), tunnel_wire.TunnelEof(channel)
    if kind == tunnel_wire.TUNNEL_RESET:
        reason = draw(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=100))
        return tunnel_wire.encode_reset(channel, reason), tunnel_wire.TunnelReset(channel, reason)
    assert kind == tunnel_wire.TUNNEL_DATA, kind
    data = draw(st.one_of(st.binary(min_size=1, max_size=200),
                          st.integers(1, tunnel_wire.MAX_TUNNEL_PAYLOAD).map(bytes)))
    return tunnel_wire.encode_data(channel, data), tunnel_wire.TunnelData(channel, data)


def matches(decoded: wire.Event, sent: wire.Event) -> bool:
    """Equal, except that a message is sent printable and cut to 1024 bytes."""
    if isinstance(sent, CheckpointDone | Error):
        text = decoded.message  # type: ignore[union-attr]
        if not (text.isprintable() and len(text.encode()) <= wire.MAX_MESSAGE):
            return False
        if sent.message.isprintable() and len(sent.message.encode()) <= wire.MAX_MESSAGE:
            return decoded == sent
        return decoded == replace(sent, message=text)
    return decoded == sent


@dataclass
class Driver:
    """How the I/O layer is simulated: read sizes, and whether to splice payload bytes."""
    reads: list[int]
    splices: list[int]  # 0: let the payload come buffered; n: splice up to n bytes


drivers = st.builds(Driver, st.lists(st.integers(1, 70_000), min_size=1, max_size=6),
                    st.lists(st.integers(0, 100_000), min_size=1, max_size=6))


@dataclass
class Outcome:
    events: list[wire.Event]
    error: str | None
    buffered: int
    in_payload: bool


def decode(stream: bytes, driver: Driver, order: InboundCheckpoint | None = None) -> Outcome:
    """Decode `stream` as receive.py does; spliced bytes come out as FileData events too.
    With `order`, every event (and spliced piece) also goes through its checks."""
    decoder = FrameDecoder()
    events: list[wire.Event] = []
    pos = steps = 0
    try:
        while True:
            steps += 1
            payload = decoder.payload
            splice = driver.splices[steps % len(driver.splices)]
            if payload is not None and splice and pos < len(stream):
                file_id, offset, left = payload
                if order is not None:
                    order.check_payload(file_id, offset, 0)
                moved = min(left, splice, len(stream) - pos)
                events.append(FileData(file_id, offset, stream[pos:pos + moved]))
                pos += moved
                decoder.consume_payload(moved)
                if order is not None:
                    order.check_payload(file_id, offset, moved)
                continue
            event = decoder.next_event()
            if event is not None:
                if order is not None:
                    order.check(event)
                events.append(event)
                continue
            assert decoder.buffered < MAX_BUFFERED
            assert decoder.payload is None or decoder.buffered == 0
            if pos >= len(stream):
                break
            size = driver.reads[steps % len(driver.reads)]
            decoder.feed(stream[pos:pos + size])
            pos += size
    except PeerProtocolError as exc:
        return Outcome(merge(events), str(exc), decoder.buffered, decoder.payload is not None)
    return Outcome(merge(events), None, decoder.buffered, decoder.payload is not None)


def merge(events: list[wire.Event]) -> list[wire.Event]:
    """FILE_DATA pieces of one frame, however they were cut, as one event."""
    merged: list[wire.Event | list[FileData]] = []
    for event in events:
        run = merged[-1] if merged else None
        if (isinstance(event, FileData) and isinstance(run, list) and run[-1].file_id == event.file_id
                and run[-1].offset + len(run[-1].data) == event.offset):
            run.append(event)
        else:
            merged.append([event] if isinstance(event, FileData) else event)
    return [FileData(item[0].file_id, item[0].offset, b"".join(e.data for e in item)) if isinstance(item, list)
            else item for item in merged]


# ---- FrameDecoder -----------------------------------------------------------------------

@given(st.lists(frame(), max_size=8), drivers)
def test_frames_round_trip_however_cut_and_spliced(frames, driver):
    stream = b"".join(data for data, _ in frames)
    outcome = decode(stream, driver)
    assert outcome.error is None
    sent = merge([event for _, event in frames])
    assert len(outcome.events) == len(sent)
    assert all(matches(got, want) for got, want in zip(outcome.events, sent, strict=True))
    assert (outcome.buffered, outcome.in_payload) == (0, False)


@given(st.lists(st.binary(min_size=1, max_size=200), max_size=6), drivers)
def test_arbitrary_bytes_yield_events_or_protocol_error(chunks, driver):
    decode(b"".join(chunks), driver)  # bounds are asserted inside; any other exception fails


@given(st.lists(frame(), max_size=6), st.binary(max_size=40), st.integers(0, 2**32 - 1), drivers)
def test_arbitrary_header_after_valid_frames(frames, body, length, driver):
    """Random length fields: never buffered beyond the bounds, whatever they claim."""
    kind = body[:1] or b"\x04"
    stream = b"".join(data for data, _ in frames) + length.to_bytes(4, "big") + kind + body[1:]
    decode(stream, driver)


@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    """Valid frames dropped, duplicated, swapped, then bits flipped, bytes inserted or cut off."""
    frames = [data for data, _ in draw(st.lists(frame(), min_size=1, max_size=6))]
    for _ in range(draw(st.integers(0, 2))):
        i, j = draw(st.integers(0, len(frames) - 1)), draw(st.integers(0, len(frames) - 1))
        op = draw(st.sampled_from(["drop", "dup", "swap"]))
        if op == "drop" and len(frames) > 1:
            del frames[i]
        elif op == "dup":
            frames.insert(j, frames[i])
        else:
            frames[i], frames[j] = frames[j], frames[i]
    stream = bytearray(b"".join(frames))
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(stream) - 1)) if stream else 0
        op = draw(st.sampled_from(["flip", "insert", "truncate"]))
        if op == "flip" and stream:
            stream[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            stream[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del stream[pos:]
    return bytes(stream)


@given(mutated_stream(), drivers, drivers)
def test_mutated_streams_decode_the_same_however_cut(stream, driver_a, driver_b):
    """Accepted or refused (with the same error after the same events), whatever the cuts
    and whatever the splicing: the bytes alone decide."""
    a, b = decode(stream, driver_a), decode(stream, driver_b)
    assert (a.events, a.error) == (b.events, b.error)
    if a.error is None:
        assert (a.buffered == 0, a.in_payload) == (b.buffered == 0, b.in_payload)


@given(st.integers(0, 2**32 - 1), st.sampled_from(list(wire.FrameType)), st.integers(1, 300))
def test_length_field_is_checked_before_the_body_arrives(length, kind, step):
    """An over-long frame is refused from its 5 header bytes, not after buffering its body."""
    decoder = FrameDecoder()
    decoder.feed(length.to_bytes(4, "big") + bytes([kind]))
    too_long = (length > wire.MAX_CONTROL_FRAME if kind is not wire.FrameType.FILE_DATA
                else not 0 < length - wire.DATA_HEADER <= wire.MAX_DATA_PAYLOAD)
    try:
        event = decoder.next_event()
    except PeerProtocolError:
        assert too_long or length <= 1  # length 1: a complete frame with an empty body
        return
    if length == 1:  # complete, and valid for a frame whose body is empty (PING)
        assert event is not None
        return
    assert event is None and not too_long
    decoder.feed(bytes(step))  # a little of the body: kept, still within bounds
    try:
        decoder.next_event()
    except PeerProtocolError:
        return
    assert decoder.buffered < MAX_BUFFERED


# ---- InboundCheckpoint ------------------------------------------------------------------

@st.composite
def conversation(draw: st.DrawFn) -> list[wire.Event]:
    """A valid proxy -> cache conversation: HELLO, CHECKPOINT_BEGIN, files interleaved in
    random order, each data piece at the right offset, maybe FILES_LISTED once every file
    is begun, then CHECKPOINT_END (and maybe DROP)."""
    checkpoint = draw(names)
    file_names = draw(st.lists(names, unique=True, max_size=5))
    file_ids = draw(st.lists(U32, unique=True, min_size=len(file_names), max_size=len(file_names)))
    pieces = {fid: draw(st.lists(st.binary(min_size=1, max_size=30), max_size=4)) for fid in file_ids}
    # Each file's frames in order; the files' sequences are then shuffled into each other.
    queues = []
    for fid, name in zip(file_ids, file_names, strict=True):
        frames: list[wire.Event] = [FileBegin(fid, name)]
        offset = 0
        for piece in pieces[fid]:
            frames.append(FileData(fid, offset, piece))
            offset += len(piece)
        frames.append(FileEnd(fid, offset, b"\x00" * 32))
        queues.append(frames)
    events: list[wire.Event] = [Hello(wire.VERSION, Role.PROXY, draw(names)), CheckpointBegin(checkpoint)]
    renumbered: dict[int, int] = {}  # file ids count up from 0 in the order files begin
    while any(queues):
        queue = draw(st.sampled_from([q for q in queues if q]))
        event = queue.pop(0)
        new_id = renumbered.setdefault(event.file_id, len(renumbered))
        events.append(type(event)(new_id, *list(event.__dict__.values())[1:]))
    if draw(st.booleans()):  # FILES_LISTED anywhere after the last FILE_BEGIN
        after = max((i for i, e in enumerate(events) if isinstance(e, FileBegin)), default=1) + 1
        events.insert(draw(st.integers(after, len(events))), wire.FilesListed(len(file_names)))
    total = sum(len(p) for ps in pieces.values() for p in ps)
    events.append(CheckpointEnd(True, len(file_names), total))
    if draw(st.booleans()):
        events.append(Drop(checkpoint))
    return events


def encode(event: wire.Event) -> bytes:
    if isinstance(event, Hello):
        return wire.encode_hello(event)
    if isinstance(event, CheckpointBegin):
        return wire.encode_checkpoint_begin(event.checkpoint, event.resume)
    if isinstance(event, FileBegin):
        return wire.encode_file_begin(event.file_id, event.name)
    if isinstance(event, FileData):
        return wire.encode_file_data(event.file_id, event.offset, event.data)
    if isinstance(event, FileEnd):
        return wire.encode_file_end(event.file_id, event.size, event.digest)
    if isinstance(event, CheckpointEnd):
        return wire.encode_checkpoint_end(event.clean, event.files, event.size)
    if isinstance(event, wire.FilesListed):
        return wire.encode_files_listed(event.files)
    if isinstance(event, Ack):
        return wire.encode_ack(event.file_id, event.size)
    if isinstance(event, CheckpointDone):
        return wire.encode_checkpoint_done(event.ok, event.message)
    if isinstance(event, Restored):
        return wire.encode_restored(event.checkpoint)
    if isinstance(event, Drop):
        return wire.encode_drop(event.checkpoint)
    if isinstance(event, wire.Running):
        return wire.encode_running(event.checkpoint, event.pid)
    return wire.encode_error(event.code, event.message)  # type: ignore[arg-type]  # any u16 goes


def first_invalid(events: list[wire.Event]) -> int | None:
    """The reference: the index of the first event the protocol (docs/protocol.md, "Order")
    forbids, or None. Written from the whole history at each step, not as a state machine."""
    for i, event in enumerate(events):
        past = [e for e in events[:i] if not isinstance(e, Error)]
        if not past:
            if not (isinstance(event, Hello) and event.role is Role.PROXY):
                return i
            continue
        if isinstance(event, Error):
            continue
        if len(past) == 1:
            if not isinstance(event, CheckpointBegin):
                return i
            continue
        ended = any(isinstance(e, CheckpointEnd) for e in past)
        if isinstance(event, Drop):
            if not ended or event.checkpoint != past[1].checkpoint:  # type: ignore[union-attr]
                return i
            continue
        if ended or not _file_event_ok(event, past[2:]):
            return i
    return None


def _file_event_ok(event: wire.Event, past: list[wire.Event]) -> bool:
    begins = {e.file_id: e.name for e in past if isinstance(e, FileBegin)}
    ended = {e.file_id for e in past if isinstance(e, FileEnd)}
    listed = any(isinstance(e, wire.FilesListed) for e in past)
    if isinstance(event, FileBegin):
        return not listed and event.file_id == len(begins) and event.name not in begins.values()
    if isinstance(event, wire.FilesListed):
        return event.files == len(begins)
    if isinstance(event, FileData | FileEnd):
        if event.file_id not in begins or event.file_id in ended:
            return False
        sent = sum(len(e.data) for e in past if isinstance(e, FileData) and e.file_id == event.file_id)
        return event.offset == sent if isinstance(event, FileData) else event.size == sent
    if isinstance(event, CheckpointEnd):
        return not event.clean or (set(begins) <= ended and event.files == len(begins))
    return False  # ACK, CHECKPOINT_DONE, RESTORED, RUNNING, HELLO, CHECKPOINT_BEGIN: not from a proxy here


def checked(events: list[wire.Event]) -> int | None:
    """The index of the event InboundCheckpoint refuses, or None."""
    order = InboundCheckpoint()
    for i, event in enumerate(events):
        try:
            order.check(event)
        except PeerProtocolError:
            return i
    return None


@given(conversation(), st.data())
def test_clean_end_accepted_only_when_every_file_ended(events, data):
    """Cut a valid conversation anywhere after CHECKPOINT_BEGIN and end it cleanly there:
    accepted exactly when every file begun so far has ended (and with the right count)."""
    end = next(i for i, event in enumerate(events) if isinstance(event, CheckpointEnd))
    cut = data.draw(st.integers(2, end))
    past = events[:cut]
    begun = [e.file_id for e in past if isinstance(e, FileBegin)]
    ended = {e.file_id for e in past if isinstance(e, FileEnd)}
    files = data.draw(st.sampled_from([len(begun), len(begun) + 1, max(len(begun) - 1, 0)]))
    refused_at = checked([*past, CheckpointEnd(True, files, 0)])
    assert (refused_at is None) == (set(begun) <= ended and files == len(begun))
    assert refused_at in (None, cut)


@given(conversation(), drivers)
def test_valid_conversations_accepted_over_the_wire(events, driver):
    order = InboundCheckpoint()
    outcome = decode(b"".join(encode(e) for e in events), driver, order)
    assert outcome.error is None
    assert outcome.events == merge(events)
    assert order.ended and first_invalid(events) is None


other_events = st.one_of(
    st.builds(Hello, st.just(wire.VERSION), st.sampled_from(Role), names),
    st.builds(CheckpointBegin, names, st.booleans()),
    st.builds(FileBegin, st.integers(0, 3), names),
    st.builds(FileData, st.integers(0, 3), st.integers(0, 40), st.binary(min_size=1, max_size=10)),
    st.builds(FileEnd, st.integers(0, 3), st.integers(0, 60), st.just(b"")),
    st.builds(CheckpointEnd, st.booleans(), st.integers(0, 5), st.integers(0, 100)),
    st.builds(wire.FilesListed, st.integers(0, 5)),
    st.builds(Ack, st.integers(0, 3), st.integers(0, 60)),
    st.builds(CheckpointDone, st.booleans(), st.just("")),
    st.builds(Restored, names),
    st.builds(wire.Running, names, U32),
    st.builds(Drop, names),
    st.builds(Error, st.integers(0, 10), st.just("x")),
)


@st.composite
def mutated_conversation(draw: st.DrawFn) -> list[wire.Event]:
    """A valid conversation with events dropped, duplicated, moved, altered or added."""
    events = draw(conversation())
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(events) - 1))
        j = draw(st.integers(0, len(events)))
        event = events[i]
        op = draw(st.sampled_from(["drop", "dup", "move", "offset", "size", "id", "count", "clean", "add"]))
        if op == "drop":
            del events[i]
        elif op == "dup":
            events.insert(j, event)
        elif op == "move":
            events.insert(j, events.pop(i))
        elif op == "offset" and isinstance(event, FileData):
            events[i] = FileData(event.file_id, draw(st.integers(0, 200)), event.data)
        elif op == "size" and isinstance(event, FileEnd):
            events[i] = FileEnd(event.file_id, draw(st.integers(0, 200)), event.digest)
        elif op == "id" and isinstance(event, FileBegin | FileData | FileEnd):
            events[i] = type(event)(draw(U32), *list(event.__dict__.values())[1:])
        elif op == "count" and isinstance(event, CheckpointEnd):
            events[i] = CheckpointEnd(event.clean, draw(st.integers(0, 6)), event.size)
        elif op == "clean" and isinstance(event, CheckpointEnd):
            events[i] = CheckpointEnd(not event.clean, event.files, event.size)
        else:
            events.insert(j, draw(other_events))
        if not events:
            events.append(draw(other_events))
    return events


@given(mutated_conversation())
def test_order_accepts_exactly_the_valid_conversations(events):
    """InboundCheckpoint refuses at exactly the first event the documented order forbids."""
    assert checked(events) == first_invalid(events)


@given(mutated_conversation(), drivers)
def test_no_file_ends_with_a_size_other_than_the_bytes_sent(events, driver):
    """Over the wire, spliced or buffered: every FILE_END the order check lets through
    names exactly the bytes that arrived for that file, at contiguous offsets."""
    order = InboundCheckpoint()
    outcome = decode(b"".join(encode(e) for e in events), driver, order)
    received: dict[int, int] = {}
    for event in outcome.events:
        if isinstance(event, FileData):
            assert event.offset == received.setdefault(event.file_id, 0)
            received[event.file_id] += len(event.data)
        elif isinstance(event, FileEnd):
            assert event.size == received.get(event.file_id, 0)
    if outcome.error is None:
        assert outcome.events == merge(events)
