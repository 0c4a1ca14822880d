"""One connection's state (gateway/session.py): limits, topic rights, the outbox."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from gateway.counters import WorkerCounters
from gateway.errors import CloseCode, ErrorCode, ProtocolError
from gateway.fanout import Fanout
from gateway.protocol import batch
from gateway.sequencer import SeqCursor, Verdict
from gateway.session import Beat, Delivery, RateLimiter, Session, SessionStateError

TOPIC = "odds:1:39:1"
EPOCH = "r1"


def event(seq: int, topic: str = TOPIC) -> bytes:
    return orjson.dumps({"type": "odds", "topic": topic, "epoch": EPOCH, "seq": seq,
                         "market": "1:39:1"})


class RecordingScheduler:
    """Stands in for FlushScheduler: records which sessions asked to be flushed."""

    def __init__(self) -> None:
        self.scheduled: list[Session] = []

    def schedule(self, session: Session) -> None:
        self.scheduled.append(session)


def make_session(**options) -> tuple[Session, list[bytes], RecordingScheduler]:
    written: list[bytes] = []
    scheduler = RecordingScheduler()
    session = Session("c1", player="p1", write=written.append,
                      scheduler=scheduler, **options)  # type: ignore[arg-type]
    return session, written, scheduler


def following(topic: str = TOPIC, seq: int = 0, **options) -> tuple[Session, list[bytes],
                                                                  RecordingScheduler]:
    session, written, scheduler = make_session(**options)
    session.cursors[topic] = SeqCursor(EPOCH, seq)
    return session, written, scheduler


# -- RateLimiter -----------------------------------------------------------------


def test_rate_limiter_allows_the_burst_then_refuses() -> None:
    limiter = RateLimiter(rate=1.0, burst=3.0)
    assert [limiter.allow(0.0) for _ in range(5)] == [True, True, True, False, False]


def test_rate_limiter_refills_at_its_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=2.0)
    assert limiter.allow(10.0) and limiter.allow(10.0)
    assert not limiter.allow(10.0)
    assert not limiter.allow(10.25)  # half a token
    assert limiter.allow(10.5)  # a whole token after 1/rate seconds
    assert not limiter.allow(10.5)


def test_rate_limiter_refill_is_capped_at_the_burst() -> None:
    limiter = RateLimiter(rate=100.0, burst=3.0)
    assert limiter.allow(0.0)
    results = [limiter.allow(1000.0) for _ in range(5)]
    assert results == [True, True, True, False, False]


# -- admit -----------------------------------------------------------------------


def test_admit_accepts_requests_within_the_burst() -> None:
    session, _, _ = make_session(rate=1.0, burst=5.0)
    for _ in range(5):
        session.admit(0.0)


def test_admit_refuses_with_rate_limited_and_a_retry_hint() -> None:
    session, _, _ = make_session(rate=20.0, burst=1.0)
    session.admit(0.0)
    with pytest.raises(ProtocolError) as info:
        session.admit(0.0)
    exc = info.value
    assert exc.code is ErrorCode.RATE_LIMITED
    assert exc.retry_after_ms == 50
    assert exc.close_code is None


def test_admit_closes_4429_at_the_limit_of_refusals_in_a_row() -> None:
    session, _, _ = make_session(rate=1.0, burst=1.0, max_refused_in_a_row=3)
    session.admit(0.0)
    closes = []
    for _ in range(4):
        with pytest.raises(ProtocolError) as info:
            session.admit(0.0)
        closes.append(info.value.close_code)
    assert closes == [None, None, CloseCode.RATE_LIMITED, CloseCode.RATE_LIMITED]
    assert CloseCode.RATE_LIMITED == 4429


def test_an_admitted_request_resets_the_refusals_in_a_row() -> None:
    session, _, _ = make_session(rate=1.0, burst=1.0, max_refused_in_a_row=2)
    session.admit(0.0)
    with pytest.raises(ProtocolError) as first:
        session.admit(0.0)
    assert first.value.close_code is None
    session.admit(1.0)  # a token came back
    with pytest.raises(ProtocolError) as again:
        session.admit(1.0)
    assert again.value.close_code is None  # one in a row, not two


def test_waiting_retry_after_ms_gets_the_request_in_for_a_round_rate() -> None:
    session, _, _ = make_session(rate=4.0, burst=1.0)
    session.admit(0.0)
    with pytest.raises(ProtocolError) as info:
        session.admit(0.0)
    assert info.value.retry_after_ms is not None
    session.admit(info.value.retry_after_ms / 1000)


@pytest.mark.parametrize("rate", [3.0, 7.0])
def test_waiting_retry_after_ms_is_always_enough(rate: float) -> None:
    session, _, _ = make_session(rate=rate, burst=1.0)
    session.admit(0.0)
    with pytest.raises(ProtocolError) as info:
        session.admit(0.0)
    assert info.value.retry_after_ms is not None
    session.admit(info.value.retry_after_ms / 1000)


# -- count_bad_request -------------------------------------------------------------


def bad(close_code: CloseCode | None = None) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, "bad", close_code=close_code)


def test_bad_requests_close_4400_at_the_limit() -> None:
    session, _, _ = make_session(max_bad_requests=3)
    closes = [session.count_bad_request(bad()).close_code for _ in range(4)]
    assert closes == [None, None, CloseCode.REPEATED_BAD_REQUESTS,
                      CloseCode.REPEATED_BAD_REQUESTS]
    assert CloseCode.REPEATED_BAD_REQUESTS == 4400


def test_count_bad_request_returns_the_same_error() -> None:
    session, _, _ = make_session()
    exc = bad()
    assert session.count_bad_request(exc) is exc


def test_count_bad_request_keeps_a_close_code_already_set() -> None:
    session, _, _ = make_session(max_bad_requests=1)
    exc = session.count_bad_request(bad(CloseCode.TOO_BIG))
    assert exc.close_code is CloseCode.TOO_BIG


# -- topic rights and acks ---------------------------------------------------------


def test_session_without_prefixes_may_follow_every_topic() -> None:
    session, _, _ = make_session()
    assert session.allowed(TOPIC) and session.allowed("odds:5:1")


def test_prefixes_limit_the_topics() -> None:
    session, _, _ = make_session(topic_prefixes=("odds:1:", "odds:2:12:"))
    assert session.allowed("odds:1:39:1")
    assert session.allowed("odds:1:40")
    assert session.allowed("odds:2:12:7")
    assert not session.allowed("odds:2:120:7")
    assert not session.allowed("odds:5:1")


def test_empty_prefix_list_allows_nothing() -> None:
    session, _, _ = make_session(topic_prefixes=())
    assert not session.allowed(TOPIC)


def test_a_prefix_does_not_grant_a_longer_id() -> None:
    session, _, _ = make_session(topic_prefixes=("odds:1:39",))
    assert session.allowed("odds:1:39:1")
    assert not session.allowed("odds:1:390")


def test_ack_records_only_followed_topics() -> None:
    session, _, _ = following()
    session.ack({TOPIC: 12, "odds:5:1": 3})
    assert session.acked == {TOPIC: 12}


# -- deliver, enqueue, flush, send -------------------------------------------------


def test_event_of_an_unfollowed_topic_is_not_queued() -> None:
    session, written, scheduler = make_session()
    assert session.deliver(TOPIC, EPOCH, 1, event(1)) is Verdict.STALE
    assert (session.pending, scheduler.scheduled, written) == ([], [], [])


def test_one_event_alone_goes_out_as_its_own_bytes() -> None:
    session, written, scheduler = following()
    assert session.deliver(TOPIC, EPOCH, 1, event(1)) is Verdict.DELIVER
    assert written == []  # not before the end of the loop turn
    assert scheduler.scheduled == [session]
    session.flush()
    assert written == [event(1)]
    assert session.pending == []


def test_several_events_in_one_turn_go_out_as_one_batch_in_order() -> None:
    session, written, scheduler = following()
    for seq in (1, 2, 3):
        session.deliver(TOPIC, EPOCH, seq, event(seq))
    assert scheduler.scheduled == [session]  # scheduled once per turn
    session.flush()
    assert written == [batch([event(1), event(2), event(3)])]
    assert [e["seq"] for e in orjson.loads(written[0])["events"]] == [1, 2, 3]


def test_events_of_several_topics_share_the_batch_in_arrival_order() -> None:
    session, written, _ = following()
    session.cursors["odds:5:1"] = SeqCursor(EPOCH, 10)
    session.deliver(TOPIC, EPOCH, 1, event(1))
    session.deliver("odds:5:1", EPOCH, 11, event(11, "odds:5:1"))
    session.deliver(TOPIC, EPOCH, 2, event(2))
    session.flush()
    assert written == [batch([event(1), event(11, "odds:5:1"), event(2)])]


def test_a_batch_is_split_in_chunks_of_max_batch() -> None:
    session, written, _ = following(max_batch=2)
    for seq in range(1, 6):
        session.deliver(TOPIC, EPOCH, seq, event(seq))
    session.flush()
    assert written == [batch([event(1), event(2)]), batch([event(3), event(4)]), event(5)]


def test_stale_and_gapped_events_are_not_queued() -> None:
    session, written, _ = following(seq=5)
    assert session.deliver(TOPIC, EPOCH, 5, event(5)) is Verdict.STALE
    assert session.deliver(TOPIC, EPOCH, 8, event(8)) is Verdict.GAP
    assert session.deliver(TOPIC, "r2", 6, event(6)) is Verdict.EPOCH
    assert session.pending == []
    session.flush()
    assert written == []


def test_a_new_turn_is_scheduled_after_a_flush() -> None:
    session, written, scheduler = following()
    session.deliver(TOPIC, EPOCH, 1, event(1))
    session.flush()
    session.deliver(TOPIC, EPOCH, 2, event(2))
    assert scheduler.scheduled == [session, session]
    session.flush()
    assert written == [event(1), event(2)]


def test_flush_with_nothing_pending_writes_nothing() -> None:
    session, written, _ = make_session()
    session.flush()
    assert written == []
    assert session.frames_out == 0


def test_send_flushes_pending_events_first() -> None:
    session, written, _ = following()
    session.deliver(TOPIC, EPOCH, 1, event(1))
    session.deliver(TOPIC, EPOCH, 2, event(2))
    session.send(b'{"type":"pong","ts":1}')
    assert written == [batch([event(1), event(2)]), b'{"type":"pong","ts":1}']
    session.flush()  # the scheduled end-of-turn flush finds nothing left
    assert len(written) == 2


def test_send_with_nothing_pending_writes_just_the_frame() -> None:
    session, written, _ = make_session()
    session.send(b'{"type":"pong","ts":1}')
    assert written == [b'{"type":"pong","ts":1}']


def test_closed_session_writes_nothing() -> None:
    session, written, _ = following()
    session.deliver(TOPIC, EPOCH, 1, event(1))
    session.close()
    session.flush()
    session.send(b'{"type":"pong","ts":1}')
    session.deliver(TOPIC, EPOCH, 2, event(2))
    session.flush()
    assert written == []
    assert (session.frames_out, session.bytes_out) == (0, 0)


def test_counters_count_frames_bytes_and_events() -> None:
    session, written, _ = following()
    for seq in (1, 2, 3):
        session.deliver(TOPIC, EPOCH, seq, event(seq))
    session.flush()
    session.send(b"{}")
    assert session.frames_out == 2
    assert session.bytes_out == sum(len(w) for w in written)
    assert session.events_out == 3


# -- Fanout as the slow path's scheduler ------------------------------------------


async def test_flush_scheduler_flushes_each_dirty_session_once_at_the_end_of_the_turn() -> None:
    scheduler = Fanout(WorkerCounters())
    outs: list[list[bytes]] = [[], []]
    sessions = [Session(f"c{i}", player="p", write=outs[i].append, scheduler=scheduler)
                for i in range(2)]
    for session in sessions:
        session.cursors[TOPIC] = SeqCursor(EPOCH, 0)
    sessions[0].deliver(TOPIC, EPOCH, 1, event(1))
    sessions[1].deliver(TOPIC, EPOCH, 1, event(1))
    sessions[0].deliver(TOPIC, EPOCH, 2, event(2))
    assert outs == [[], []]
    await asyncio.sleep(0)
    assert outs == [[batch([event(1), event(2)])], [event(1)]]
    sessions[1].deliver(TOPIC, EPOCH, 2, event(2))  # a later turn is scheduled again
    await asyncio.sleep(0)
    assert outs[1] == [event(1), event(2)]


# -- the session's own state: delivery, heartbeat, token expiry -----------------


def test_delivery_moves_live_coalescing_live_closed() -> None:
    session, written, _ = following()
    assert session.delivery is Delivery.LIVE and session.open and not session.coalescing
    outbox = session.start_coalescing()
    assert session.coalescing and session.outbox is outbox
    outbox.start(TOPIC, 0)
    session.deliver(TOPIC, EPOCH, 1, b'{"seq":1}', "1:1:1")
    assert written == [] and session.pending == []  # kept in the outbox, not sent
    assert session.stop_coalescing() is outbox
    assert session.delivery is Delivery.LIVE and session.outbox is None
    session.close()
    assert session.delivery is Delivery.CLOSED and not session.open
    session.send(b"{}")
    assert written == []


def test_moves_the_state_does_not_allow_are_refused() -> None:
    session, _, _ = make_session()
    with pytest.raises(SessionStateError):
        session.stop_coalescing()
    session.start_coalescing()
    with pytest.raises(SessionStateError):
        session.start_coalescing()
    session.close()
    with pytest.raises(SessionStateError):
        session.start_coalescing()


def test_heartbeat_pings_every_interval_and_finds_a_peer_that_never_answers() -> None:
    session, _, _ = make_session()
    assert session.heartbeat(0.0, 1.0) is Beat.NOTHING  # the clock starts
    assert session.heartbeat(0.5, 1.0) is Beat.NOTHING
    assert session.heartbeat(1.0, 1.0) is Beat.PING and session.ping_sent_at == 1.0
    assert session.heartbeat(1.9, 1.0) is Beat.NOTHING  # waiting for the pong
    session.pong()
    assert session.ping_sent_at is None
    assert session.heartbeat(2.0, 1.0) is Beat.PING
    assert session.heartbeat(3.5, 1.0) is Beat.DEAD


def test_token_expiry_fires_once() -> None:
    session, _, _ = make_session(expires_at=100.0)
    assert not session.token_expired(99.9)
    assert session.token_expired(100.0)
    assert not session.token_expired(200.0)
    assert not make_session()[0].token_expired(1e12)  # anonymous: never


def test_a_second_topic_in_a_turn_joins_the_first_in_one_batch() -> None:
    session, _, _ = make_session()
    to_flush: list[Session] = []
    Session.add_turn([session], [(b"a", b"A", 1)], [b"a"], to_flush)
    assert to_flush == [session] and session.turn == [(b"a", b"A", 1)]
    Session.add_turn([session], [(b"b", b"B", 1)], [b"b"], to_flush)
    assert to_flush == [session]  # listed once for the turn
    assert session.turn is None and session.turn_events == [b"a", b"b"]
