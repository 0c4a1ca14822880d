"""client.rules (PROTOCOL.md §5 as a client sees it) and the client's pure helpers.

No server: streams are built by hand, or generated from a random publish
history with a delivery that §5 allows, then broken in the ways §5 forbids.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from client.odds import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    CloseInfo,
    backoff_delay,
    connection_target,
)
from client.rules import (
    ALTERED_EVENT,
    BAD_SNAPSHOT,
    EPOCH,
    FINAL_STATE,
    LOST_EVENT,
    MALFORMED,
    MARKET_REGRESSION,
    SEQ_ORDER,
    SILENT_GAP,
    UNEXPECTED,
    RuleChecker,
    verify_coalescing,
)

T = "odds:1:39:1"
U = "odds:1:40"
E1 = "r1-20261122"
E2 = "r2-20261123"


def ev(seq: int, market: str = "a", *, topic: str = T, epoch: str = E1, **extra: Any) -> dict:
    return {
        "type": "odds",
        "topic": topic,
        "epoch": epoch,
        "seq": seq,
        "market": market,
        "event_id": f"m-{market}",
        "ts": 1763800000123456789 + seq,
        "status": "open",
        "prices": {"home": f"1.{seq:02d}", "away": "2.10"},
        **extra,
    }


def welcome(n: int = 1) -> dict:
    return {"type": "welcome", "conn": f"c{n}", "node": "h", "worker": 0, "heartbeat_ms": 15000}


def subscribed(*topics: str, rid: int = 1) -> dict:
    return {"type": "subscribed", "id": rid, "topics": list(topics)}


def snapshot(seq: int, markets: list[dict], *, topic: str = T, epoch: str = E1) -> dict:
    return {"type": "snapshot", "topic": topic, "epoch": epoch, "seq": seq, "markets": markets}


def batch(*events: dict) -> dict:
    return {"type": "batch", "events": list(events)}


def reset(topic: str = T) -> dict:
    return {"type": "reset", "topic": topic, "reason": "out of window"}


def opening(seq: int = 2) -> list[dict]:
    """A connection that subscribed T and got a snapshot at `seq` (markets a, b)."""
    markets = [ev(seq - 1, "a"), ev(seq, "b")] if seq >= 2 else []
    return [welcome(), subscribed(T), snapshot(seq, markets)]


def check(stream: list[dict]) -> RuleChecker:
    checker = RuleChecker()
    checker.feed_all(stream)
    return checker


def rules_of(checker: RuleChecker) -> list[str]:
    return [v.rule for v in checker.violations]


# -- correct streams -----------------------------------------------------------


def test_snapshot_then_contiguous_events_is_ok() -> None:
    checker = check([*opening(2), ev(3, "a"), ev(4, "c"), ev(5, "b")])
    assert checker.ok, checker.violations
    held = checker.topics[T]
    assert (held.epoch, held.seq) == (E1, 5)
    assert {m: e["seq"] for m, e in held.markets.items()} == {"a": 3, "b": 5, "c": 4}


def test_batch_frames_are_unpacked_in_order() -> None:
    checker = check([*opening(2), batch(ev(3), ev(4, "b")), ev(5), batch(ev(6, "c"))])
    assert checker.ok, checker.violations
    assert checker.topics[T].seq == 6


def test_empty_topic_snapshot_at_seq_zero() -> None:
    checker = check([welcome(), subscribed(T), snapshot(0, []), ev(1)])
    assert checker.ok, checker.violations


def test_coalesced_gap_is_accepted() -> None:
    # seq 3 (market a) superseded by 5; the server skipped it and marked 4.
    checker = check([*opening(2), ev(4, "b", coalesced=True), ev(5, "a")])
    assert checker.ok, checker.violations


def test_resume_after_reconnect_continues_held_state() -> None:
    stream = [
        *opening(2),
        ev(3),
        ev(4, "b"),
        welcome(2),
        subscribed(T, rid=2),
        ev(5),
        batch(ev(7, "b", coalesced=True), ev(8)),
    ]
    checker = check(stream)
    assert checker.ok, checker.violations
    assert checker.topics[T].resume_point() == {"epoch": E1, "seq": 8}


def test_reset_then_snapshot_of_new_epoch_is_ok() -> None:
    stream = [*opening(9), reset(), snapshot(3, [ev(3, "a", epoch=E2)], epoch=E2), ev(4, epoch=E2)]
    checker = check(stream)
    assert checker.ok, checker.violations
    assert (checker.topics[T].epoch, checker.topics[T].seq) == (E2, 4)


def test_reset_allows_a_lower_seq_in_the_same_epoch() -> None:
    checker = check([*opening(9), reset(), snapshot(4, [ev(4)]), ev(5)])
    assert checker.ok, checker.violations


def test_resume_answered_with_reset_and_snapshot() -> None:
    stream = [*opening(2), welcome(2), subscribed(T, rid=2), reset(), snapshot(1, [], epoch=E2)]
    assert check(stream).ok


def test_same_epoch_snapshot_moving_forward_is_ok() -> None:
    checker = check([*opening(2), ev(3), snapshot(7, [ev(6, "a"), ev(7, "b")]), ev(8)])
    assert checker.ok, checker.violations


def test_expect_resume_from_a_point_held_elsewhere() -> None:
    checker = RuleChecker()
    checker.feed(welcome())
    checker.expect_resume(T, E1, 40)
    checker.feed_all([subscribed(T), ev(41), ev(43, "b", coalesced=True)])
    assert checker.ok, checker.violations
    checker.feed(ev(42))
    assert rules_of(checker) == [SEQ_ORDER]


def test_expect_resume_rewinds_what_is_held() -> None:
    checker = check([*opening(2), ev(3), ev(4)])
    checker.feed(welcome(2))
    checker.expect_resume(T, E1, 2)  # replay on purpose from an older point
    checker.feed_all([subscribed(T, rid=2), ev(3), ev(4)])
    assert checker.ok, checker.violations
    assert checker.topics[T].markets["a"]["seq"] == 4


def test_expect_snapshot_forgets_held_state() -> None:
    checker = check([*opening(9)])
    checker.feed(welcome(2))
    checker.expect_snapshot(T)
    checker.feed_all([subscribed(T, rid=2), snapshot(5, [ev(5)]), ev(6)])  # another worker
    assert checker.ok, checker.violations


def test_refused_topics_keep_nothing_announced() -> None:
    checker = RuleChecker()
    checker.feed(welcome())
    checker.expect_snapshot(U)
    error = {"type": "error", "id": 1, "code": "shed", "topics": [U], "message": "x"}
    checker.feed_all([error, subscribed(rid=1)])
    assert checker.ok
    assert not checker.synced(U)


def test_synced_tracks_base_and_subscription() -> None:
    checker = RuleChecker()
    checker.feed_all([welcome(), subscribed(T)])
    assert not checker.synced(T)
    checker.feed(snapshot(1, [ev(1)]))
    assert checker.synced(T)
    checker.feed(reset())
    assert not checker.synced(T)
    checker.feed(snapshot(1, [ev(1, epoch=E2)], epoch=E2))
    assert checker.synced(T)
    checker.feed(welcome(2))
    assert not checker.synced(T)
    assert checker.topics[T].resume_point() == {"epoch": E2, "seq": 1}


# -- each violation ----------------------------------------------------------------


def test_repeated_seq_is_seq_order() -> None:
    assert rules_of(check([*opening(2), ev(3), ev(3)])) == [SEQ_ORDER]


def test_seq_going_down_is_seq_order() -> None:
    assert rules_of(check([*opening(2), ev(3), ev(4, "b"), ev(3, "c")])) == [SEQ_ORDER]


def test_older_state_of_a_market_is_also_market_regression() -> None:
    checker = check([*opening(2), ev(3), ev(4), ev(3)])
    assert rules_of(checker) == [SEQ_ORDER, MARKET_REGRESSION]
    assert checker.topics[T].markets["a"]["seq"] == 4  # the newer state is kept


def test_resume_replaying_what_was_held_is_seq_order() -> None:
    stream = [*opening(2), ev(3), welcome(2), subscribed(T, rid=2), ev(3), ev(4)]
    assert rules_of(check(stream)) == [SEQ_ORDER]


def test_snapshot_with_an_older_market_state_is_market_regression() -> None:
    stream = [*opening(2), ev(3, "a"), ev(4, "b"), snapshot(4, [ev(1, "a"), ev(4, "b")])]
    checker = check(stream)
    assert rules_of(checker) == [MARKET_REGRESSION]
    assert checker.topics[T].markets["a"]["seq"] == 3


def test_same_epoch_snapshot_moving_back_is_seq_order() -> None:
    assert rules_of(check([*opening(5), ev(6), snapshot(4, [ev(4, "c")])])) == [SEQ_ORDER]


def test_gap_without_coalesced_flag_is_silent_gap() -> None:
    assert rules_of(check([*opening(2), ev(3), ev(5)])) == [SILENT_GAP]


def test_gap_right_after_snapshot_needs_the_flag_too() -> None:
    assert rules_of(check([*opening(2), ev(4)])) == [SILENT_GAP]


def test_gap_across_a_resume_needs_the_flag_too() -> None:
    stream = [*opening(2), ev(3), welcome(2), subscribed(T, rid=2), ev(6)]
    assert rules_of(check(stream)) == [SILENT_GAP]


def test_odds_for_a_topic_never_subscribed_is_unexpected() -> None:
    assert rules_of(check([*opening(2), ev(1, topic=U)])) == [UNEXPECTED]


def test_odds_before_subscribed_is_unexpected() -> None:
    assert rules_of(check([welcome(), ev(1), subscribed(T), snapshot(1, [ev(1)])])) == [
        UNEXPECTED
    ]


def test_odds_before_the_snapshot_is_unexpected() -> None:
    assert rules_of(check([welcome(), subscribed(T), ev(1), snapshot(1, [ev(1)])])) == [
        UNEXPECTED
    ]


def test_odds_on_a_new_connection_before_subscribed_is_unexpected() -> None:
    stream = [*opening(2), welcome(2), ev(3), subscribed(T, rid=2), ev(3)]
    assert rules_of(check(stream)) == [UNEXPECTED]


def test_odds_between_reset_and_snapshot_is_unexpected() -> None:
    stream = [*opening(2), reset(), ev(3), snapshot(1, [], epoch=E2)]
    assert rules_of(check(stream)) == [UNEXPECTED]


def test_odds_after_unsubscribed_is_unexpected() -> None:
    stream = [*opening(2), {"type": "unsubscribed", "id": 2, "topics": [T]}, ev(3)]
    assert rules_of(check(stream)) == [UNEXPECTED]


def test_snapshot_or_reset_for_a_topic_not_subscribed_is_unexpected() -> None:
    assert rules_of(check([welcome(), snapshot(1, [ev(1)])])) == [UNEXPECTED]
    assert rules_of(check([welcome(), reset()])) == [UNEXPECTED]


def test_odds_of_another_epoch_without_reset_is_epoch() -> None:
    checker = check([*opening(2), ev(3, epoch=E2)])
    assert rules_of(checker) == [EPOCH]
    assert checker.topics[T].epoch == E1


def test_snapshot_of_another_epoch_without_reset_is_epoch() -> None:
    stream = [*opening(2), welcome(2), subscribed(T, rid=2), snapshot(1, [], epoch=E2)]
    assert rules_of(check(stream)) == [EPOCH]


def test_snapshot_market_newer_than_the_snapshot_is_bad_snapshot() -> None:
    stream = [welcome(), subscribed(T), snapshot(3, [ev(4)])]
    assert rules_of(check(stream)) == [BAD_SNAPSHOT]


def test_event_missing_fields_is_malformed() -> None:
    broken = ev(3)
    del broken["market"]
    assert rules_of(check([*opening(2), broken])) == [MALFORMED]
    assert rules_of(check([*opening(2), ev(3) | {"seq": "3"}])) == [MALFORMED]


def test_recorded_violations_are_capped_but_all_counted() -> None:
    checker = RuleChecker(max_recorded=3)
    checker.feed_all([*opening(2), *(ev(1) for _ in range(10))])
    assert len(checker.violations) == 3
    assert checker.counts == {SEQ_ORDER: 10}
    assert not checker.ok


# -- verify_coalescing by hand -----------------------------------------------------


def test_verify_coalescing_accepts_superseded_skips() -> None:
    published = [ev(1, "a"), ev(2, "b"), ev(3, "a"), ev(4, "b")]
    received = [ev(2, "b", coalesced=True), ev(3, "a"), ev(4, "b")]
    assert verify_coalescing(received, published) == []


def test_verify_coalescing_flags_a_skip_not_superseded() -> None:
    # The flag is there, so RuleChecker is satisfied; only the truth shows the loss.
    published = [ev(1, "a"), ev(2, "b"), ev(3, "a")]
    received = [ev(1, "a"), ev(3, "a", coalesced=True)]
    assert check([*opening(0)[:2], snapshot(0, []), *received]).ok
    assert [v.rule for v in verify_coalescing(received, published)] == [
        LOST_EVENT,
        FINAL_STATE,
    ]


def test_verify_coalescing_flags_a_missing_tail_only_when_complete() -> None:
    published = [ev(1, "a"), ev(2, "b")]
    received = [ev(1, "a")]
    assert [v.rule for v in verify_coalescing(received, published)] == [LOST_EVENT, FINAL_STATE]
    assert verify_coalescing(received, published, complete=False) == []


def test_verify_coalescing_incomplete_flags_a_skip_never_superseded() -> None:
    published = [ev(1, "a"), ev(2, "b"), ev(3, "c"), ev(4, "a")]
    # 1 skipped but superseded by 4, maybe still on its way: fine. 2 never superseded.
    received = [ev(3, "c", coalesced=True)]
    assert [v.rule for v in verify_coalescing(received, published, complete=False)] == [
        LOST_EVENT
    ]


def test_verify_coalescing_flags_altered_and_stale_final_state() -> None:
    published = [ev(1, "a"), ev(2, "a")]
    changed = ev(2, "a") | {"prices": {"home": "9.99"}}
    assert [v.rule for v in verify_coalescing([ev(1), changed], published)] == [
        ALTERED_EVENT,
        LOST_EVENT,
        FINAL_STATE,
    ]
    # Swapped: every event received, but the market ends on the older state.
    assert [v.rule for v in verify_coalescing([ev(2), ev(1)], published)] == [FINAL_STATE]


def test_verify_coalescing_starts_after_the_base() -> None:
    published = [ev(1, "a"), ev(2, "c"), ev(3, "a"), ev(4, "b")]
    received = [ev(3, "a"), ev(4, "b")]
    assert verify_coalescing(received, published, after_seq=2) == []
    # From an older base, market c's only event is missing.
    assert [v.rule for v in verify_coalescing(received, published, after_seq=1)] == [
        LOST_EVENT,
        FINAL_STATE,
    ]


def test_verify_coalescing_rejects_what_it_does_not_assume() -> None:
    with pytest.raises(ValueError):
        verify_coalescing([], [ev(1), ev(3)])
    with pytest.raises(ValueError):
        verify_coalescing([], [ev(1), ev(2, epoch=E2)])
    with pytest.raises(ValueError):
        verify_coalescing([ev(1, topic=U)], [ev(1)])


# -- property: random history, delivery that §5 allows, then broken -------------------


@st.composite
def deliveries(draw: st.DrawFn) -> dict[str, Any]:
    """A publish history of one topic and a delivery of it that §5 allows.

    The client takes a snapshot at `base`; after it the server may skip any
    event that a later event of the same market supersedes (never a market's
    newest), marks the first event after each gap, packs events into frames
    at random and may drop the connection, after which the client resumes.
    """
    n_markets = draw(st.integers(1, 4))
    n = draw(st.integers(1, 40))
    markets = [f"1:39:{draw(st.integers(0, n_markets - 1))}" for _ in range(n)]
    published = [ev(i + 1, m) for i, m in enumerate(markets)]
    last_of = {m: i + 1 for i, m in enumerate(markets)}
    base = draw(st.integers(0, n - 1))

    newest_at_base: dict[str, dict] = {}
    for event in published[:base]:
        newest_at_base[event["market"]] = event
    received: list[dict] = []
    last = base
    for event in published[base:]:
        superseded = last_of[event["market"]] > event["seq"]
        if superseded and draw(st.booleans()):
            continue
        copy = dict(event)
        if event["seq"] != last + 1:
            copy["coalesced"] = True
        received.append(copy)
        last = event["seq"]

    frames: list[dict] = []
    i = 0
    while i < len(received):
        size = draw(st.integers(1, 4))
        chunk = received[i : i + size]
        frames.append(chunk[0] if len(chunk) == 1 and draw(st.booleans()) else batch(*chunk))
        i += size
    drop_at = draw(st.integers(0, len(frames)))
    if draw(st.booleans()):
        frames[drop_at:drop_at] = [welcome(2), subscribed(T, rid=2)]
    stream = [welcome(), subscribed(T), snapshot(base, list(newest_at_base.values())), *frames]
    return {"published": published, "received": received, "base": base, "stream": stream}


def build_stream(d: dict[str, Any], received: list[dict]) -> list[dict]:
    """The same opening, with `received` delivered one event per frame."""
    return [*d["stream"][:3], *received]


@settings(max_examples=300, deadline=None)
@given(deliveries())
def test_allowed_delivery_has_no_violation(d: dict[str, Any]) -> None:
    checker = check(d["stream"])
    assert checker.ok, checker.violations
    assert verify_coalescing(d["received"], d["published"], after_seq=d["base"]) == []
    newest = {e["market"]: e["seq"] for e in d["published"]}
    held = {m: e["seq"] for m, e in checker.topics[T].markets.items()}
    assert held == newest
    assert checker.topics[T].seq == d["published"][-1]["seq"]


@settings(deadline=None)
@given(deliveries(), st.data())
def test_swapped_events_are_reported(d: dict[str, Any], data: st.DataObject) -> None:
    received = list(d["received"])
    assume(len(received) >= 2)
    i = data.draw(st.integers(0, len(received) - 2))
    j = data.draw(st.integers(i + 1, len(received) - 1))
    received[i], received[j] = received[j], received[i]
    assert SEQ_ORDER in rules_of(check(build_stream(d, received)))


@settings(deadline=None)
@given(deliveries(), st.data())
def test_duplicated_event_is_reported(d: dict[str, Any], data: st.DataObject) -> None:
    received = list(d["received"])
    assume(received)
    i = data.draw(st.integers(0, len(received) - 1))
    at = data.draw(st.integers(i + 1, len(received)))
    received.insert(at, dict(received[i]))
    assert SEQ_ORDER in rules_of(check(build_stream(d, received)))


@settings(deadline=None)
@given(deliveries(), st.data())
def test_dropped_newest_event_of_a_market_is_reported(
    d: dict[str, Any], data: st.DataObject
) -> None:
    # A market's newest event is never superseded, so dropping it loses state.
    newest = {e["market"]: e["seq"] for e in d["published"]}
    droppable = [k for k, e in enumerate(d["received"]) if newest[e["market"]] == e["seq"]]
    assume(droppable)
    k = data.draw(st.sampled_from(droppable))
    received = d["received"][:k] + d["received"][k + 1 :]
    truth = verify_coalescing(received, d["published"], after_seq=d["base"])
    assert LOST_EVENT in [v.rule for v in truth]
    # When another event follows without a flag, the checker sees it alone too.
    follows = k < len(received) and not received[k].get("coalesced")
    if follows:
        assert SILENT_GAP in rules_of(check(build_stream(d, received)))


@settings(deadline=None)
@given(deliveries(), st.data())
def test_removed_coalesced_flag_is_reported(d: dict[str, Any], data: st.DataObject) -> None:
    flagged = [k for k, e in enumerate(d["received"]) if e.get("coalesced")]
    assume(flagged)
    k = data.draw(st.sampled_from(flagged))
    received = list(d["received"])
    received[k] = {key: v for key, v in received[k].items() if key != "coalesced"}
    assert rules_of(check(build_stream(d, received))) == [SILENT_GAP]


@settings(deadline=None)
@given(deliveries())
def test_untouched_stream_rebuilt_one_event_per_frame_is_ok(d: dict[str, Any]) -> None:
    # The mutation tests rebuild the stream; this keeps them honest.
    assert check(build_stream(d, d["received"])).ok


# -- the client's pure helpers --------------------------------------------------------


@given(st.integers(0, 100), st.integers(0, 2**32))
def test_backoff_is_full_jitter_under_the_cap(attempt: int, seed: int) -> None:
    delay = backoff_delay(attempt, random.Random(seed))
    assert 0.0 <= delay <= min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)


def test_backoff_grows_then_caps() -> None:
    rng = random.Random(7)
    early = max(backoff_delay(0, rng) for _ in range(200))
    late = max(backoff_delay(20, rng) for _ in range(200))
    assert early <= BACKOFF_BASE_S
    assert BACKOFF_CAP_S * 0.9 < late <= BACKOFF_CAP_S


def test_token_goes_in_the_cookie_by_default() -> None:
    assert connection_target("ws://h/ws", "tok", "cookie") == (
        "ws://h/ws",
        {"Cookie": "og_session=tok"},
    )
    assert connection_target("ws://h/ws", None, "cookie") == ("ws://h/ws", {})


def test_token_in_query_keeps_other_parameters() -> None:
    url, headers = connection_target("wss://h:8443/ws?x=1&token=old", "a.b+c", "query")
    assert headers == {}
    assert url == "wss://h:8443/ws?x=1&token=a.b%2Bc"


def test_bad_token_in_is_refused() -> None:
    with pytest.raises(ValueError):
        connection_target("ws://h/ws", "tok", "header")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("info", "terminal"),
    [
        (CloseInfo(4401), True),
        (CloseInfo(1008), True),
        (CloseInfo(4400), True),
        (CloseInfo(4429), True),
        (CloseInfo(1012), False),
        (CloseInfo(1013), False),
        (CloseInfo(1011), False),
        (CloseInfo(1006), False),
        (CloseInfo(None, http_status=401), True),
        (CloseInfo(None, http_status=403), True),
        (CloseInfo(None, http_status=503), False),
        (CloseInfo(None, http_status=429), False),
    ],
)
def test_which_closes_end_the_client(info: CloseInfo, terminal: bool) -> None:
    assert info.terminal is terminal
