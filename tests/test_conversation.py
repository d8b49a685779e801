"""The proxy <-> cache conversation (imgmig.protocol.conversation), both machines wired
together in memory: every path, cuts and failures included, without a socket.

`Wire` carries bytes between a ProxyConnection and a CacheConnection; a small cache
"driver" keeps files in dicts and answers the decisions the way receive.py does.
"""

from __future__ import annotations

import hashlib

import pytest

from imgmig.protocol import conversation as conv
from imgmig.protocol import peer_wire as wire
from imgmig.protocol.peer_wire import BeginStatus, ErrorCode, FrameType, PeerProtocolError

SHA = wire.Digest.SHA256


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class CacheSide:
    """What receive.py does with the cache machine's events, on dicts instead of memfds."""

    def __init__(self, kept: dict[str, CacheSide] | None = None, ack_every: int = 1 << 30) -> None:
        self.conn = conv.CacheConnection("node-b", 0.0, ack_every=ack_every)
        self.kept = kept if kept is not None else {}  # checkpoints held, by id (survives a cut)
        self.order: wire.InboundCheckpoint | None = None
        self.files: dict[int, bytearray] = {}
        self.names: dict[int, str] = {}
        self.complete = False
        self.restored_here = False
        self.events: list[conv.Event] = []
        self.status_for: dict[str, BeginStatus] = {}

    def handle(self, now: float = 0.0) -> None:
        while True:
            payload = self.conn.payload
            if payload is not None:
                file_id, offset, left = payload
                self._splice(file_id, offset, left, now)
                continue
            event = self.conn.next_event()
            if event is None:
                return
            self.events.append(event)
            self._on(event, now)

    def _splice(self, file_id: int, offset: int, left: int, now: float) -> None:
        # the driver reads the payload from the socket itself: here, from the decoder's future bytes
        raise AssertionError("payload bytes are buffered in these tests")

    def _on(self, event: conv.Event, now: float) -> None:
        conn = self.conn
        if isinstance(event, conv.HelloReceived):
            conn.accept_hello(event.hello.digest, 1 << 30, 1 << 29, now)
        elif isinstance(event, conv.BeginRequested):
            self._begin(event, now)
        elif isinstance(event, conv.FileBegun):
            self.files[event.file_id] = bytearray()
            self.names[event.file_id] = event.name
        elif isinstance(event, conv.DataReceived):
            data = self.files[event.file_id]
            assert len(data) == event.offset
            data += event.data
            conn.stored(event.file_id, len(data), len(event.data), now)
        elif isinstance(event, conv.FileEnded):
            if sha(bytes(self.files[event.file_id])) != event.digest:
                conn.refuse(ErrorCode.DIGEST_MISMATCH, "digest mismatch")
                return
            conn.file_verified(event.file_id, event.size, now)
        elif isinstance(event, conv.CheckpointEnded):
            self.complete = event.clean
            conn.done(event.clean, "verified" if event.clean else "dump failed", now)
        elif isinstance(event, conv.DropRequested):
            self.kept.pop(conn.checkpoint, None)
            conn.confirm_drop(now)

    def _begin(self, event: conv.BeginRequested, now: float) -> None:
        known = self.kept.get(event.checkpoint)
        status = self.status_for.get(event.checkpoint)
        if status is not None:
            self.conn.begun(status, None, now)
            return
        if known is None:
            self.kept[event.checkpoint] = self
            self.conn.begun(BeginStatus.NEW, None, now)
            self.order = self.conn.order
            return
        # a resume: take over what the cut connection received
        self.files, self.names, self.order = known.files, known.names, known.order
        self.kept[event.checkpoint] = self
        if known.complete:
            self.complete = True
            self.conn.begun(BeginStatus.COMPLETE, None, now)
        else:
            self.conn.begun(BeginStatus.RESUMED, known.order, now)


class ProxySide:
    """The proxy's machine with the files it sends (fully known here)."""

    def __init__(self, files: dict[str, bytes], resume: bool = False, checkpoint: str = "cp-1") -> None:
        self.conn = conv.ProxyConnection("node-a", checkpoint, SHA, 0.0, resume=resume)
        self.files = files
        self.events: list[conv.Event] = []

    def handle(self) -> list[conv.Event]:
        new = []
        while (event := self.conn.next_event()) is not None:
            new.append(event)
        self.events += new
        return new


class Wire:
    """Moves queued bytes both ways until neither side has anything to say."""

    def __init__(self, proxy: ProxySide, cache: CacheSide) -> None:
        self.proxy, self.cache = proxy, cache
        self.to_cache = 0  # bytes carried proxy -> cache

    def pump(self, now: float = 0.0) -> None:
        while True:
            out = self.proxy.conn.data_to_send()
            if out:
                self.to_cache += len(out)
                self.cache.conn.receive_data(out, now)
                self.cache.handle(now)
            back = self.cache.conn.data_to_send()
            if back:
                self.proxy.conn.receive_data(back, now)
                self.proxy.handle()
            if not out and not back:
                return


def connect(files: dict[str, bytes], kept: dict[str, CacheSide] | None = None, resume: bool = False,
            **cache_options: int) -> Wire:
    link = Wire(ProxySide(files, resume), CacheSide(kept, **cache_options))
    link.pump()
    assert isinstance(link.proxy.events[-1], conv.HelloReceived)
    link.proxy.conn.begin(0.0)
    link.pump()
    return link


def send_file(link: Wire, file_id: int, name: str, data: bytes, start: int = 0, step: int = 1000,
              end: bool = True) -> None:
    proxy = link.proxy.conn
    if start == 0 and file_id not in proxy.sent:
        proxy.file_begin(file_id, name, 0.0)
    for offset in range(start, len(data), step):
        proxy.file_data(file_id, offset, data[offset:offset + step], 0.0)
    if end:
        proxy.file_end(file_id, len(data), sha(data), 0.0)
    link.pump()


FILES = {"pages-1.img": bytes(range(256)) * 40, "inventory.img": b"inventory"}


def full_transfer(link: Wire) -> None:
    for file_id, (name, data) in enumerate(FILES.items()):
        send_file(link, file_id, name, data)
    link.proxy.conn.checkpoint_end(True, len(FILES), sum(map(len, FILES.values())), 0.0)
    link.pump()


# ---- the whole conversation -----------------------------------------------------------------

def test_handshake_states_limit_and_room():
    link = connect(FILES)
    hello = link.proxy.events[0]
    assert isinstance(hello, conv.HelloReceived)
    assert hello.hello.memory_limit == 1 << 30 and hello.hello.room == 1 << 29
    assert isinstance(link.cache.events[0], conv.HelloReceived)
    assert link.cache.events[0].hello.node == "node-a"
    answered = link.proxy.events[-1]
    assert answered == conv.BeginAnswered(BeginStatus.NEW, 0, {})


def test_checkpoint_begin_is_answered_before_any_file():
    link = Wire(ProxySide(FILES), CacheSide())
    link.pump()
    with pytest.raises(RuntimeError, match="FILE_BEGIN in phase begin"):
        link.proxy.conn.file_begin(0, "a.img", 0.0)
    link.proxy.conn.begin(0.0)
    with pytest.raises(RuntimeError, match="FILE_BEGIN in phase begin"):
        link.proxy.conn.file_begin(0, "a.img", 0.0)  # BEGUN not yet read
    link.pump()
    link.proxy.conn.file_begin(0, "a.img", 0.0)


def test_full_conversation_then_claim_grant_restored_confirmed():
    link = connect(FILES)
    full_transfer(link)
    assert [bytes(link.cache.files[i]) for i in (0, 1)] == list(FILES.values())
    assert link.proxy.events[-1] == conv.Delivered(True, "verified")
    assert link.cache.events[-1] == conv.Confirmed(FrameType.CHECKPOINT_DONE)
    link.cache.conn.claim(0.0)
    link.pump()
    assert link.proxy.events[-1] == conv.ClaimRequested()
    link.proxy.conn.grant(True, "node-b", 0.0)
    link.pump()
    assert link.cache.events[-1] == conv.GrantAnswered(True, "node-b")
    link.cache.conn.restored(0.0)
    link.pump()
    assert link.proxy.events[-1] == conv.RestoredReported()
    link.proxy.conn.confirm_restored(0.0)
    link.pump()
    assert link.cache.events[-1] == conv.Confirmed(FrameType.RESTORED)
    assert link.proxy.conn.closed and link.cache.conn.closed


def test_claim_refused_names_the_holder():
    link = connect(FILES)
    link.cache.conn.claim(0.0)  # a restore waits while the files still flow
    link.pump()
    link.proxy.conn.grant(False, "node-a (rollback)", 0.0)
    link.pump()
    assert link.cache.events[-1] == conv.GrantAnswered(False, "node-a (rollback)")
    full_transfer(link)  # the transfer goes on
    assert link.proxy.events[-1] == conv.Delivered(True, "verified")


def test_drop_is_confirmed():
    link = connect(FILES)
    full_transfer(link)
    link.proxy.conn.drop(0.0)
    link.pump()
    assert link.cache.events[-1] == conv.DropRequested()
    assert link.proxy.events[-1] == conv.Confirmed(FrameType.DROP)
    assert "cp-1" not in link.cache.kept
    assert link.proxy.conn.closed and link.cache.conn.closed


def test_drop_unconfirmed_is_a_dead_link():
    link = connect(FILES)
    full_transfer(link)
    link.proxy.conn.drop(1.0)
    link.proxy.conn.data_to_send()  # lost on the way
    assert link.proxy.conn.next_deadline() == 1.0 + conv.HELLO_TIMEOUT
    assert link.proxy.conn.handle_timeout(1.0 + conv.HELLO_TIMEOUT) == conv.LinkDead(
        "no CONFIRM of DROP within 10 s")


def granted_then_failed() -> Wire:
    """A restore on the cache took the right (CLAIM / GRANT) after the transfer, then CRIU failed."""
    link = connect(FILES)
    full_transfer(link)
    link.cache.conn.claim(0.0)
    link.pump()
    link.proxy.conn.grant(True, "node-b (the destination)", 0.0)
    link.pump()
    return link


def test_return_of_the_right_is_confirmed_and_the_link_stays_for_a_retry():
    link = granted_then_failed()
    link.cache.conn.give_back(0.0)
    assert link.cache.conn.data_to_send() == wire.encode_return("cp-1")
    link.proxy.conn.receive_data(wire.encode_return("cp-1"), 0.0)
    link.proxy.handle()
    assert link.proxy.events[-1] == conv.RightReturned()
    assert not link.cache.conn.closed, "the cache waits for the CONFIRM"
    link.proxy.conn.confirm_return(0.0)
    assert link.proxy.conn.data_to_send() == b"\x00\x00\x00\x07\x0f\x11\x04cp-1"  # CONFIRM of RETURN
    link.cache.conn.receive_data(wire.encode_confirm(FrameType.RETURN, "cp-1"), 0.0)
    link.cache.handle()
    assert link.cache.events[-1] == conv.Confirmed(FrameType.RETURN)
    assert not link.proxy.conn.closed and not link.cache.conn.closed
    assert link.proxy.conn.phase is link.cache.conn.phase is conv.Phase.HOLDING
    # the retry: the same CLAIM / GRANT, then the restore runs
    link.cache.conn.claim(0.0)
    link.pump()
    assert link.proxy.events[-1] == conv.ClaimRequested()
    link.proxy.conn.grant(True, "node-b (the destination)", 0.0)
    link.pump()
    assert link.cache.events[-1] == conv.GrantAnswered(True, "node-b (the destination)")
    link.cache.conn.running(77, 0.0)
    link.pump()
    assert link.proxy.events[-1] == conv.RunningReported(77)


def test_a_rollback_after_a_return_drops_the_copy_kept_on_the_cache():
    link = granted_then_failed()
    link.cache.conn.give_back(0.0)
    link.pump()
    link.proxy.conn.confirm_return(0.0)
    link.pump()
    link.proxy.conn.drop(0.0)  # the source rolls back: the right is its own again
    link.pump()
    assert link.cache.events[-1] == conv.DropRequested()
    assert link.proxy.events[-1] == conv.Confirmed(FrameType.DROP)
    assert "cp-1" not in link.cache.kept
    assert link.proxy.conn.closed and link.cache.conn.closed


def test_return_unconfirmed_is_a_dead_link():
    link = granted_then_failed()
    link.cache.conn.give_back(1.0)
    link.cache.conn.data_to_send()  # lost on the way
    assert link.cache.conn.next_deadline() == 1.0 + conv.HELLO_TIMEOUT
    assert link.cache.conn.handle_timeout(1.0 + conv.HELLO_TIMEOUT) == conv.LinkDead(
        "no CONFIRM of RETURN within 10 s")


def test_return_only_while_holding_and_not_after_restored():
    link = connect(FILES)
    with pytest.raises(RuntimeError, match="RETURN in phase transfer"):
        link.cache.conn.give_back(0.0)
    full_transfer(link)
    link.cache.conn.restored(0.0)
    with pytest.raises(RuntimeError, match="RETURN after RESTORED"):
        link.cache.conn.give_back(0.0)
    with pytest.raises(RuntimeError, match="RUNNING after RESTORED"):
        link.cache.conn.running(5, 0.0)


# ---- restored means running: RUNNING ---------------------------------------------------------

def test_running_is_reported_with_its_pid_confirmed_and_ends_the_link():
    link = granted_then_failed()  # granted; this time CRIU succeeds
    link.cache.conn.running(4242, 3.0)
    assert link.cache.conn.data_to_send() == b"\x00\x00\x00\x0a\x12\x04cp-1\x00\x00\x10\x92"
    link.proxy.conn.receive_data(wire.encode_running("cp-1", 4242), 3.0)
    link.proxy.handle()
    assert link.proxy.events[-1] == conv.RunningReported(4242)
    assert not link.proxy.conn.closed, "the proxy confirms once its copy is released"
    link.proxy.conn.confirm_running(3.0)
    assert link.proxy.conn.data_to_send() == b"\x00\x00\x00\x07\x0f\x12\x04cp-1"
    assert link.proxy.conn.closed
    link.cache.conn.receive_data(wire.encode_confirm(FrameType.RUNNING, "cp-1"), 3.0)
    link.cache.handle()
    assert link.cache.events[-1] == conv.Confirmed(FrameType.RUNNING)
    assert link.cache.conn.closed


def test_running_unconfirmed_is_a_dead_link():
    link = granted_then_failed()
    link.cache.conn.running(7, 1.0)
    link.cache.conn.data_to_send()  # lost on the way
    assert link.cache.conn.next_deadline() == 1.0 + conv.HELLO_TIMEOUT
    assert link.cache.conn.handle_timeout(1.0 + conv.HELLO_TIMEOUT) == conv.LinkDead(
        "no CONFIRM of RUNNING within 10 s")


def test_running_only_while_holding_and_once():
    link = connect(FILES)
    with pytest.raises(RuntimeError, match="RUNNING in phase transfer"):
        link.cache.conn.running(7, 0.0)
    full_transfer(link)
    link.cache.conn.running(7, 0.0)
    with pytest.raises(RuntimeError, match="RUNNING after RESTORED, RUNNING"):
        link.cache.conn.running(7, 0.0)
    with pytest.raises(RuntimeError, match="RESTORED after RESTORED, RUNNING"):
        link.cache.conn.restored(0.0)


def test_running_confirmed_while_the_link_was_down_is_sent_after_the_resume():
    """The restore confirmed the process runs during a cut: the resumed connection's BEGUN
    says RUNNING, the RUNNING frame follows at once, the proxy releases and confirms."""
    kept: dict[str, CacheSide] = {}
    first = connect(FILES, kept)
    full_transfer(first)  # then the link is cut; the restore on the cache succeeds meanwhile
    link = Wire(ProxySide(FILES, resume=True), CacheSide(kept))
    link.cache.status_for["cp-1"] = BeginStatus.RUNNING
    link.pump()
    link.proxy.conn.begin(0.0)
    link.pump()
    assert link.proxy.events[-1] == conv.BeginAnswered(BeginStatus.RUNNING, 0, {})
    assert link.proxy.conn.phase is conv.Phase.HOLDING and link.cache.conn.phase is conv.Phase.HOLDING
    link.cache.conn.running(99, 0.0)
    link.pump()
    assert link.proxy.events[-1] == conv.RunningReported(99)
    link.proxy.conn.confirm_running(0.0)
    link.pump()
    assert link.cache.events[-1] == conv.Confirmed(FrameType.RUNNING)
    assert link.proxy.conn.closed and link.cache.conn.closed


def test_begun_running_for_a_first_send_is_refused():
    proxy = ProxySide(FILES)
    proxy.conn.receive_data(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.CACHE, "node-b")), 0.0)
    proxy.handle()
    proxy.conn.begin(0.0)
    proxy.conn.receive_data(wire.encode_begun(BeginStatus.RUNNING, "cp-1"), 0.0)
    with pytest.raises(PeerProtocolError, match="BEGUN says RUNNING for a checkpoint sent for the first time"):
        proxy.handle()


def test_proxy_refuses_a_return_after_its_own_drop():
    link = connect(FILES)
    full_transfer(link)
    link.proxy.conn.drop(0.0)
    link.proxy.conn.data_to_send()  # the rollback took the right; the DROP crosses a RETURN
    link.proxy.conn.receive_data(wire.encode_return("cp-1"), 0.0)
    with pytest.raises(PeerProtocolError, match="RETURN of a right this proxy took for a rollback"):
        link.proxy.handle()


def test_ack_cadence():
    link = connect(FILES, ack_every=3000)
    data = bytes(10_000)
    send_file(link, 0, "pages-1.img", data, end=False)
    acks = [e for e in link.proxy.events if isinstance(e, conv.Acked)]
    assert [a.size for a in acks] == [3000, 6000, 9000]
    link.proxy.conn.file_end(0, len(data), sha(data), 0.0)
    link.pump()
    assert link.proxy.events[-1] == conv.Acked(0, 10_000), "FILE_END is acknowledged at once"
    assert link.proxy.conn.acked[0] == 10_000


def test_unclean_end_is_answered_not_ok():
    link = connect(FILES)
    send_file(link, 0, "pages-1.img", b"x" * 100, end=False)
    link.proxy.conn.checkpoint_end(False, 1, 100, 0.0)
    link.pump()
    assert link.proxy.events[-1] == conv.Delivered(False, "dump failed")
    assert link.proxy.conn.closed and link.cache.conn.closed


def test_files_listed_before_the_last_page_bytes():
    """The dump ended: the proxy lists the files while the pages are still on their way;
    the cache learns it at once, and the rest of the transfer goes on as before."""
    link = connect(FILES)
    pages = FILES["pages-1.img"]
    send_file(link, 0, "pages-1.img", pages[:4000], end=False)
    send_file(link, 1, "inventory.img", FILES["inventory.img"])
    link.proxy.conn.files_listed(2, 0.0)
    link.pump()
    assert link.cache.events[-1] == conv.FilesListed(2)
    with pytest.raises(RuntimeError, match="FILE_BEGIN for file id 2 after FILES_LISTED"):
        link.proxy.conn.file_begin(2, "late.img", 0.0)
    with pytest.raises(RuntimeError, match="twice"):
        link.proxy.conn.files_listed(2, 0.0)
    send_file(link, 0, "pages-1.img", pages, start=4000)
    link.proxy.conn.checkpoint_end(True, 2, len(pages) + len(FILES["inventory.img"]), 0.0)
    link.pump()
    assert link.proxy.events[-1] == conv.Delivered(True, "verified")


def test_files_listed_with_a_wrong_count_is_refused():
    link = connect(FILES)
    send_file(link, 0, "pages-1.img", FILES["pages-1.img"])
    link.proxy.conn.files_listed(3, 0.0)
    with pytest.raises(PeerProtocolError, match="FILES_LISTED counts 3 files, 1 were begun"):
        link.pump()


def test_digest_mismatch_refused():
    link = connect(FILES)
    proxy = link.proxy.conn
    proxy.file_begin(0, "inventory.img", 0.0)
    proxy.file_data(0, 0, b"forged", 0.0)
    proxy.file_end(0, 6, sha(b"other"), 0.0)
    link.pump()
    assert link.proxy.events[-1] == conv.PeerError(ErrorCode.DIGEST_MISMATCH, "digest mismatch")
    assert proxy.closed and link.cache.conn.closed


def test_frames_held_back_until_the_decision():
    """HELLO and CHECKPOINT_BEGIN in one read: BEGIN waits until HELLO is answered."""
    cache = conv.CacheConnection("node-b", 0.0)
    proxy = conv.ProxyConnection("node-a", "cp-1", SHA, 0.0)
    cache.receive_data(proxy.data_to_send() + wire.encode_checkpoint_begin("cp-1"), 0.0)
    assert isinstance(cache.next_event(), conv.HelloReceived)
    assert cache.next_event() is None, "nothing more until accept_hello()"
    cache.accept_hello(SHA, 1, 1, 0.0)
    assert cache.next_event() == conv.BeginRequested("cp-1", False)
    assert cache.next_event() is None


# ---- cuts and resume ------------------------------------------------------------------------

def cut_and_resume(kept: dict[str, CacheSide]) -> Wire:
    link = connect(FILES, kept=kept, resume=True)
    return link


def test_resume_mid_file_continues_from_held_offset_nothing_acked_resent():
    kept: dict[str, CacheSide] = {}
    link = connect(FILES, kept=kept, ack_every=2048)
    big = FILES["pages-1.img"]
    send_file(link, 0, "pages-1.img", big[:6000], end=False)
    acked_before = link.proxy.conn.acked[0]
    # in flight when the link is cut: sent, never read by the cache
    link.proxy.conn.file_data(0, 6000, big[6000:7000], 0.0)
    link.proxy.conn.data_to_send()
    link = cut_and_resume(kept)
    answered = link.proxy.events[-1]
    assert answered == conv.BeginAnswered(BeginStatus.RESUMED, 1, {0: 6000})
    start = link.proxy.conn.continue_file(0)
    assert start == 6000 >= acked_before
    carried = link.to_cache
    send_file(link, 0, "pages-1.img", big, start=start)
    assert link.to_cache - carried < len(big) - 6000 + 200, "only the rest of the file went again"
    send_file(link, 1, "inventory.img", FILES["inventory.img"])
    link.proxy.conn.checkpoint_end(True, 2, len(big) + 9, 0.0)
    link.pump()
    assert link.proxy.events[-1] == conv.Delivered(True, "verified")
    assert bytes(kept["cp-1"].files[0]) == big, "the resumed file is whole and in order"


def test_resume_before_a_file_began_sends_it_from_zero():
    kept: dict[str, CacheSide] = {}
    link = connect(FILES, kept=kept)
    send_file(link, 0, "pages-1.img", FILES["pages-1.img"])
    link = cut_and_resume(kept)
    assert link.proxy.events[-1] == conv.BeginAnswered(BeginStatus.RESUMED, 1, {})
    send_file(link, 1, "inventory.img", FILES["inventory.img"])
    link.proxy.conn.checkpoint_end(True, 2, 0, 0.0)
    link.pump()
    assert link.proxy.events[-1] == conv.Delivered(True, "verified")


def test_resume_after_end_before_done_sends_only_checkpoint_end():
    kept: dict[str, CacheSide] = {}
    link = connect(FILES, kept=kept)
    for file_id, (name, data) in enumerate(FILES.items()):
        send_file(link, file_id, name, data)
    link.proxy.conn.checkpoint_end(True, 2, 0, 0.0)
    link.proxy.conn.data_to_send()  # cut before the cache read it
    link = cut_and_resume(kept)
    assert link.proxy.events[-1] == conv.BeginAnswered(BeginStatus.RESUMED, 2, {})
    link.proxy.conn.checkpoint_end(True, 2, 0, 0.0)
    link.pump()
    assert link.proxy.events[-1] == conv.Delivered(True, "verified")


def test_resume_after_done_holds_and_claims_continue():
    kept: dict[str, CacheSide] = {}
    link = connect(FILES, kept=kept)
    full_transfer(link)
    link = cut_and_resume(kept)
    assert link.proxy.events[-1] == conv.BeginAnswered(BeginStatus.COMPLETE, 0, {})
    assert link.proxy.conn.phase is conv.Phase.HOLDING
    link.cache.conn.claim(0.0)
    link.pump()
    assert link.proxy.events[-1] == conv.ClaimRequested()


@pytest.mark.parametrize("status", [BeginStatus.RESTORED, BeginStatus.GONE])
def test_resume_of_a_settled_checkpoint_closes(status):
    cache = CacheSide()
    cache.status_for["cp-1"] = status
    link = Wire(ProxySide(FILES, resume=True), cache)
    link.pump()
    link.proxy.conn.begin(0.0)
    link.pump()
    assert link.proxy.events[-1] == conv.BeginAnswered(status, 0, {})
    assert link.proxy.conn.closed and link.cache.conn.closed


def test_resumed_status_for_a_first_send_is_a_violation():
    proxy = conv.ProxyConnection("node-a", "cp-1", SHA, 0.0)
    proxy.receive_data(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.CACHE, "b", SHA)), 0.0)
    proxy.next_event()
    proxy.begin(0.0)
    proxy.receive_data(wire.encode_begun(BeginStatus.RESUMED, "cp-1", 1, ((0, 5),)), 0.0)
    with pytest.raises(PeerProtocolError, match="RESUMED for a checkpoint sent for the first time"):
        proxy.next_event()


# ---- timers -----------------------------------------------------------------------------------

def test_cache_waits_ten_seconds_for_hello():
    cache = conv.CacheConnection("node-b", 100.0)
    assert cache.next_deadline() == 110.0
    assert cache.handle_timeout(109.9) is None
    assert cache.handle_timeout(110.0) == conv.LinkDead("no HELLO within 10 s")
    assert cache.closed


def test_proxy_waits_for_begun():
    link = Wire(ProxySide(FILES), CacheSide())
    link.pump()
    link.proxy.conn.begin(5.0)
    link.proxy.conn.data_to_send()  # the cache never answers
    assert link.proxy.conn.handle_timeout(15.0) == conv.LinkDead("no BEGUN within 10 s")


def test_idle_link_pings_and_silent_peer_is_dead():
    link = connect(FILES)
    proxy, cache = link.proxy.conn, link.cache.conn
    assert proxy.next_deadline() == conv.PING_EVERY
    assert proxy.handle_timeout(conv.PING_EVERY) is None
    ping = proxy.data_to_send()
    assert ping == wire.encode_ping()
    cache.receive_data(ping, conv.PING_EVERY)
    assert cache.next_event() is None
    assert cache.handle_timeout(conv.PING_EVERY) is None
    assert cache.data_to_send() == wire.encode_ping(), "the cache had been quiet as long"
    # from now on the cache hears nothing
    assert cache.handle_timeout(conv.PING_EVERY + conv.DEAD_AFTER - 1) is None
    dead = cache.handle_timeout(conv.PING_EVERY + conv.DEAD_AFTER)
    assert dead == conv.LinkDead(f"nothing heard for {conv.DEAD_AFTER:.0f} s")


def test_grant_unanswered_is_a_dead_link():
    link = connect(FILES)
    link.cache.conn.claim(3.0)
    link.cache.conn.data_to_send()
    assert link.cache.conn.handle_timeout(13.0) == conv.LinkDead("no GRANT within 10 s")


# ---- rules the peer must keep -----------------------------------------------------------------

def hello_done_proxy() -> conv.ProxyConnection:
    proxy = conv.ProxyConnection("node-a", "cp-1", SHA, 0.0)
    proxy.receive_data(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.CACHE, "b", SHA)), 0.0)
    proxy.next_event()
    proxy.begin(0.0)
    proxy.receive_data(wire.encode_begun(BeginStatus.NEW, "cp-1"), 0.0)
    proxy.next_event()
    return proxy


@pytest.mark.parametrize("frame, match", [
    (wire.encode_restored("cp-1"), "RESTORED before CHECKPOINT_DONE"),
    (wire.encode_checkpoint_done(True, ""), "CHECKPOINT_DONE before CHECKPOINT_END"),
    (wire.encode_confirm(FrameType.DROP, "cp-1"), "CONFIRM of a DROP this proxy never sent"),
    (wire.encode_ack(0, 1), "ACK of 1 bytes for file id 0, none were sent"),
    (wire.encode_claim("cp-2"), "CLAIM for checkpoint cp-2"),
    (wire.encode_claim("cp-1") * 2, "a second CLAIM"),
    (wire.encode_drop("cp-1"), "Drop is not sent by a cache"),
    (wire.encode_return("cp-1"), "RETURN before CHECKPOINT_DONE"),
    (wire.encode_return("cp-2"), "RETURN for checkpoint cp-2"),
    (wire.encode_confirm(FrameType.RETURN, "cp-1"), "CONFIRM of a RETURN this proxy never sent"),
    (wire.encode_running("cp-1", 5), "RUNNING before CHECKPOINT_DONE"),
    (wire.encode_running("cp-2", 5), "RUNNING for checkpoint cp-2"),
    (wire.encode_confirm(FrameType.RUNNING, "cp-1"), "CONFIRM of a RUNNING this proxy never sent"),
    (wire.encode_begun(BeginStatus.NEW, "cp-1"), "BEGUN that answers no CHECKPOINT_BEGIN"),
    (wire.encode_prepare(1 << 30), "Prepare is not sent by a cache"),
])
def test_proxy_refuses_what_a_cache_must_not_say(frame, match):
    proxy = hello_done_proxy()
    proxy.receive_data(frame, 0.0)
    with pytest.raises(PeerProtocolError, match=match):
        while proxy.next_event() is not None:
            pass


def test_proxy_refuses_ack_beyond_what_was_sent():
    proxy = hello_done_proxy()
    proxy.file_begin(0, "a.img", 0.0)
    proxy.file_data(0, 0, b"abc", 0.0)
    proxy.receive_data(wire.encode_ack(0, 4), 0.0)
    with pytest.raises(PeerProtocolError, match="ACK of 4 bytes for file id 0, 3 were sent"):
        proxy.next_event()


def started_cache() -> conv.CacheConnection:
    cache = conv.CacheConnection("node-b", 0.0)
    cache.receive_data(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, "a", SHA))
                       + wire.encode_checkpoint_begin("cp-1"), 0.0)
    cache.next_event()
    cache.accept_hello(SHA, 1, 1, 0.0)
    cache.next_event()
    cache.begun(BeginStatus.NEW, None, 0.0)
    return cache


@pytest.mark.parametrize("frame, match", [
    (wire.encode_grant(True, "cp-1", "b"), "GRANT without a CLAIM"),
    (wire.encode_drop("cp-1"), "DROP before CHECKPOINT_DONE"),
    (wire.encode_confirm(FrameType.RESTORED, "cp-1"), "CONFIRM of a RESTORED this cache never sent"),
    (wire.encode_confirm(FrameType.RETURN, "cp-1"), "CONFIRM of a RETURN this cache never sent"),
    (wire.encode_return("cp-1"), "Return is not sent by a proxy"),
    (wire.encode_confirm(FrameType.RUNNING, "cp-1"), "CONFIRM of a RUNNING this cache never sent"),
    (wire.encode_running("cp-1", 5), "Running is not sent by a proxy"),
    (wire.encode_file_begin(1, "a.img"), "file id 1, expected 0"),
    (wire.encode_checkpoint_begin("cp-1"), "CheckpointBegin is not sent by a proxy"),
    (wire.encode_checkpoint_end(True, 0, 0) + wire.encode_file_begin(0, "a.img"), "after CHECKPOINT_END"),
    (wire.encode_prepare(1 << 30), "PREPARE after CHECKPOINT_BEGIN"),
])
def test_cache_refuses_what_a_proxy_must_not_say(frame, match):
    cache = started_cache()
    cache.receive_data(frame, 0.0)
    with pytest.raises(PeerProtocolError, match=match):
        while (event := cache.next_event()) is not None:
            if isinstance(event, conv.CheckpointEnded):
                cache.done(True, "", 0.0)


# ---- PREPARE: memory made ready before the freeze ----------------------------------------------

def greeted_cache(*frames: bytes) -> conv.CacheConnection:
    cache = conv.CacheConnection("node-b", 0.0)
    cache.receive_data(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, "a", SHA)) + b"".join(frames), 0.0)
    assert isinstance(cache.next_event(), conv.HelloReceived)
    cache.accept_hello(SHA, 1 << 30, 1 << 29, 0.0)
    cache.data_to_send()
    return cache


def test_prepare_is_asked_answered_and_a_checkpoint_may_follow():
    cache = greeted_cache(wire.encode_prepare(1 << 30), wire.encode_checkpoint_begin("cp-1"))
    assert cache.next_event() == conv.PrepareRequested(1 << 30)
    assert cache.next_event() is None, "the BEGIN waits for the answer"
    cache.prepared(512 << 20, 0.0)
    assert cache.data_to_send() == wire.encode_prepare(512 << 20)
    assert cache.next_event() == conv.BeginRequested("cp-1", False)


def test_a_second_prepare_on_one_connection_is_refused():
    cache = greeted_cache(wire.encode_prepare(1), wire.encode_prepare(1 << 40))
    cache.next_event()
    cache.prepared(0, 0.0)
    with pytest.raises(PeerProtocolError, match="a second PREPARE"):
        cache.next_event()


def test_prepare_before_hello_is_refused():
    cache = conv.CacheConnection("node-b", 0.0)
    cache.receive_data(wire.encode_prepare(1 << 30), 0.0)
    with pytest.raises(PeerProtocolError, match="expected HELLO first, got Prepare"):
        cache.next_event()


def test_prepared_answers_only_a_prepare():
    cache = greeted_cache()
    with pytest.raises(RuntimeError, match="answers no PREPARE"):
        cache.prepared(1, 0.0)
    begun = greeted_cache(wire.encode_checkpoint_begin("cp-1"))
    begun.next_event()
    with pytest.raises(RuntimeError, match="answers no PREPARE"):
        begun.prepared(1, 0.0)


CACHE_HELLO = wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.CACHE, "node-b", SHA, memory_limit=8, room=4))


def test_probe_sends_hello_and_prepare_at_once_and_is_done_after_both_answers():
    hello = wire.Hello(wire.VERSION, wire.Role.PROXY, "node-a", SHA)
    probe = conv.ProbeConnection(hello, prepare=1 << 30)
    assert probe.data_to_send() == wire.encode_hello(hello) + wire.encode_prepare(1 << 30)
    probe.receive_data(CACHE_HELLO + wire.encode_ping())
    assert not probe.done and probe.hello is not None and probe.hello.room == 4
    probe.receive_data(wire.encode_prepare(1 << 29)[:5])
    assert not probe.done
    probe.receive_data(wire.encode_prepare(1 << 29)[5:])
    assert probe.done and probe.prepared == 1 << 29


def test_probe_without_prepare_is_done_at_hello():
    hello = wire.Hello(wire.VERSION, wire.Role.PROXY, "node-a", SHA)
    probe = conv.ProbeConnection(hello)
    assert probe.data_to_send() == wire.encode_hello(hello)
    probe.receive_data(CACHE_HELLO)
    assert probe.done and probe.prepared is None


@pytest.mark.parametrize("answer, error, match", [
    (wire.encode_error(ErrorCode.REFUSED, "not allowed"), ValueError, "refused this node: not allowed"),
    (wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.PROXY, "x")), PeerProtocolError, "not a cache's HELLO"),
    (wire.encode_begun(BeginStatus.NEW, "cp"), PeerProtocolError, "answered Begun, not a cache's HELLO"),
    (CACHE_HELLO + wire.encode_claim("cp"), PeerProtocolError, "answered PREPARE with Claim"),
    (CACHE_HELLO + wire.encode_error(ErrorCode.INTERNAL, "no"), ValueError, "refused this node: no"),
])
def test_probe_refuses_every_other_answer(answer, error, match):
    probe = conv.ProbeConnection(wire.Hello(wire.VERSION, wire.Role.PROXY, "node-a", SHA), prepare=1)
    with pytest.raises(error, match=match):
        probe.receive_data(answer)


def test_cache_refuses_a_cache_and_old_versions():
    cache = conv.CacheConnection("node-b", 0.0)
    cache.receive_data(wire.encode_hello(wire.Hello(wire.VERSION, wire.Role.CACHE, "x")), 0.0)
    with pytest.raises(PeerProtocolError, match="does not say it is a proxy"):
        cache.next_event()
    old = conv.CacheConnection("node-b", 0.0)
    old.receive_data(wire.encode_hello(wire.Hello(1, wire.Role.PROXY, "x")), 0.0)
    with pytest.raises(PeerProtocolError, match="version 1 is not supported") as info:
        old.next_event()
    assert info.value.code is ErrorCode.VERSION


def test_refuse_sends_one_error_and_closes():
    cache = started_cache()
    cache.data_to_send()
    cache.refuse(ErrorCode.TOO_LARGE, "checkpoint cp-1 outgrew the memory limit")
    assert cache.data_to_send() == wire.encode_error(ErrorCode.TOO_LARGE, "checkpoint cp-1 outgrew the memory limit")
    assert cache.closed and cache.next_deadline() is None
    cache.refuse(ErrorCode.INTERNAL, "twice")
    assert cache.data_to_send() == b"", "one ERROR only"


def test_error_from_the_peer_is_an_event_and_closes():
    link = connect(FILES)
    link.cache.conn.refuse(ErrorCode.TOO_LARGE, "too large: 2.0 GiB, limit 1.0 GiB")
    link.pump()
    assert link.proxy.events[-1] == conv.PeerError(ErrorCode.TOO_LARGE, "too large: 2.0 GiB, limit 1.0 GiB")
    assert link.proxy.conn.closed


def test_payload_moved_by_the_driver():
    """The cache's driver splices FILE_DATA payloads: the machine says where they go."""
    cache = started_cache()
    cache.receive_data(wire.encode_file_begin(0, "pages.img") + wire.encode_file_data_header(0, 0, 10), 0.0)
    assert cache.next_event() == conv.FileBegun(0, "pages.img")
    assert cache.next_event() is None
    assert cache.payload == (0, 0, 10)
    cache.consume_payload(4, 1.0)
    assert cache.payload == (0, 4, 6)
    cache.consume_payload(6, 1.0)
    assert cache.payload is None
    cache.receive_data(wire.encode_file_end(0, 10, b"d"), 1.0)
    assert cache.next_event() == conv.FileEnded(0, 10, b"d")
