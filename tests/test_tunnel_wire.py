"""The tunnel that carries a lazy migration's page-server bytes (protocol/tunnel_wire.py),
byte by byte, through the node protocol's decoder and the conversation machines."""

from __future__ import annotations

import pytest
from test_conversation import connect, full_transfer

from imgmig.protocol import conversation as conv
from imgmig.protocol import peer_wire as wire
from imgmig.protocol import tunnel_wire as tw
from imgmig.protocol.peer_wire import PeerProtocolError


def decode_all(data: bytes, step: int = 1) -> list[object]:
    """Feed `data` `step` bytes at a time; every event the node decoder yields."""
    decoder = wire.FrameDecoder()
    events = []
    for start in range(0, len(data), step):
        decoder.feed(data[start:start + step])
        while (event := decoder.next_event()) is not None:
            events.append(event)
    return events


# ---- the bytes ------------------------------------------------------------------------------

def test_frames_byte_by_byte():
    assert tw.encode_open(1) == bytes.fromhex("00000005 20 00000001")
    assert tw.encode_data(2, b"ab") == bytes.fromhex("00000007 21 00000002 6162")
    assert tw.encode_eof(3) == bytes.fromhex("00000005 22 00000003")
    assert tw.encode_reset(4, "gone") == bytes.fromhex("0000000b 23 00000004 0004 676f6e65")


def test_node_decoder_yields_tunnel_frames_split_anywhere():
    stream = (tw.encode_open(1) + tw.encode_data(1, b"page" * 1000) + wire.encode_ping()
              + tw.encode_eof(1) + tw.encode_reset(2, "page server gone"))
    expected = [tw.TunnelOpen(1), tw.TunnelData(1, b"page" * 1000), wire.Ping(), tw.TunnelEof(1),
                tw.TunnelReset(2, "page server gone")]
    assert decode_all(stream, 1) == expected
    assert decode_all(stream, 7) == expected
    assert decode_all(stream, len(stream)) == expected


def test_largest_payload_fits_a_control_frame():
    data = bytes(tw.MAX_TUNNEL_PAYLOAD)
    frame = tw.encode_data(9, data)
    assert len(frame) - 4 <= wire.MAX_CONTROL_FRAME
    assert decode_all(frame, 4096) == [tw.TunnelData(9, data)]
    with pytest.raises(ValueError):
        tw.encode_data(9, data + b"x")
    with pytest.raises(ValueError):
        tw.encode_data(9, b"")


@pytest.mark.parametrize("frame, message", [
    (bytes.fromhex("00000005 21 00000001"), "payload of 0 bytes"),                  # empty DATA
    (bytes.fromhex("00000004 20 000000"), "truncated"),                             # short channel
    (bytes.fromhex("00000006 20 00000001 00"), "trailing"),                         # OPEN + a byte
    (bytes.fromhex("00000006 22 00000001 00"), "trailing"),                         # EOF + a byte
    (bytes.fromhex("00000008 23 00000001 0005 61"), "wrong length"),                # reason too short
    (bytes.fromhex("00000008 23 00000001 0001 ff"), "not UTF-8"),
    (bytes.fromhex("00000008 23 00000001 0001 07"), "control characters"),
    ((wire.MAX_CONTROL_FRAME + 1).to_bytes(4, "big") + b"\x21", "outside 1..65536"),  # before buffering
])
def test_bad_tunnel_frames_are_protocol_errors(frame: bytes, message: str):
    with pytest.raises(PeerProtocolError, match=message) as caught:
        decode_all(frame, len(frame))
    assert caught.value.code == wire.ErrorCode.PROTOCOL


def test_types_below_32_stay_unknown():
    with pytest.raises(PeerProtocolError, match="unknown frame type 31"):
        decode_all(bytes.fromhex("00000001 1f"))


def test_reset_reason_is_cut_and_cleaned_by_the_sender():
    frame = tw.encode_reset(1, "bad\nline" + "x" * 2000)
    (event,) = decode_all(frame, len(frame))
    assert isinstance(event, tw.TunnelReset)
    assert event.reason.startswith("bad line") and len(event.reason.encode()) == tw.MAX_REASON


# ---- the channels ---------------------------------------------------------------------------

def pair() -> tuple[tw.TunnelMux, tw.TunnelMux]:
    return tw.TunnelMux(tw.Side.OPENER), tw.TunnelMux(tw.Side.ACCEPTOR)


def carry(sender: tw.TunnelMux, receiver: tw.TunnelMux) -> list[tw.TunnelFrame | None]:
    return [receiver.receive(frame) for frame in decode_all(sender.data_to_send(), 1 << 20)]  # type: ignore[arg-type]


def test_a_channel_carries_both_ways_and_ends_after_both_eofs():
    cache, proxy = pair()
    channel = cache.open()
    assert carry(cache, proxy) == [tw.TunnelOpen(channel)]
    cache.send(channel, b"PS_IOV_GET")
    assert carry(cache, proxy) == [tw.TunnelData(channel, b"PS_IOV_GET")]
    big = bytes(range(256)) * 1000  # 256000 bytes: five frames
    proxy.send(channel, big)
    frames = carry(proxy, cache)
    assert len(frames) == 5 and b"".join(f.data for f in frames) == big  # type: ignore[union-attr]
    assert cache.channels[channel].received == len(big) == proxy.channels[channel].sent
    proxy.eof(channel)
    assert carry(proxy, cache) == [tw.TunnelEof(channel)]
    assert channel in cache.channels and channel in proxy.channels  # half closed
    cache.eof(channel)
    carry(cache, proxy)
    assert not cache.channels and not proxy.channels


def test_only_the_cache_opens_and_ids_only_grow():
    cache, proxy = pair()
    with pytest.raises(RuntimeError, match="only the cache"):
        proxy.open()
    with pytest.raises(tw.TunnelError, match="sent by a proxy"):
        cache.receive(tw.TunnelOpen(1))
    proxy.receive(tw.TunnelOpen(5))
    with pytest.raises(tw.TunnelError, match="not above"):
        proxy.receive(tw.TunnelOpen(5))


def test_data_on_a_channel_never_opened_or_after_eof_is_refused():
    cache, proxy = pair()
    with pytest.raises(tw.TunnelError, match="never opened"):
        proxy.receive(tw.TunnelData(3, b"x"))
    channel = cache.open()
    carry(cache, proxy)
    cache.eof(channel)
    carry(cache, proxy)
    with pytest.raises(tw.TunnelError, match="after its EOF"):
        proxy.receive(tw.TunnelData(channel, b"x"))
    with pytest.raises(RuntimeError, match="after its EOF"):
        cache.send(channel, b"x")


def test_reset_drops_the_channel_and_what_was_in_flight():
    cache, proxy = pair()
    channel = cache.open()
    carry(cache, proxy)
    proxy.send(channel, b"in flight")
    cache.reset(channel, "lazy-pages exited")
    assert carry(proxy, cache) == [None]  # arrived after the reset: dropped, no error
    assert carry(cache, proxy) == [tw.TunnelReset(channel, "lazy-pages exited")]
    assert not proxy.channels
    assert proxy.receive(tw.TunnelReset(channel, "again")) is None


def test_at_most_max_channels():
    cache, proxy = pair()
    for _ in range(tw.MAX_CHANNELS):
        cache.open()
    with pytest.raises(RuntimeError, match="open already"):
        cache.open()
    for channel in range(1, tw.MAX_CHANNELS + 1):
        proxy.receive(tw.TunnelOpen(channel))
    with pytest.raises(tw.TunnelError, match="beyond"):
        proxy.receive(tw.TunnelOpen(tw.MAX_CHANNELS + 1))


# ---- inside the conversation ----------------------------------------------------------------

def test_tunnel_frames_pass_only_after_checkpoint_done():
    link = connect({"inventory.img": b"inv"})
    link.cache.conn.receive_data(tw.encode_open(1), 0.0)
    with pytest.raises(PeerProtocolError, match="TunnelOpen before CHECKPOINT_DONE"):
        link.cache.conn.next_event()
    with pytest.raises(RuntimeError, match="tunnel frame in phase"):
        link.proxy.conn.send_tunnel(tw.encode_data(1, b"x"), 0.0)


def test_tunnel_frames_interleave_with_the_handoff():
    link = connect({"inventory.img": b"inv"})
    full_transfer(link)
    assert link.proxy.conn.phase is conv.Phase.HOLDING
    link.cache.conn.send_tunnel(tw.encode_open(1) + tw.encode_data(1, b"GET"), 1.0)
    link.cache.conn.claim(1.0)
    link.proxy.conn.receive_data(link.cache.conn.data_to_send(), 1.0)
    events = link.proxy.handle()
    assert events == [tw.TunnelOpen(1), tw.TunnelData(1, b"GET"), conv.ClaimRequested()]
