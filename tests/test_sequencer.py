"""SeqCursor (gateway/sequencer.py): verdicts, the read/live merge, and its properties.

The properties model a topic publishing seqs 1..N and check that what a cursor
lets through is exactly the contiguous run after the read's base, whatever the
interleaving of live arrivals, reads and merges. The hub that owns cursors
(gap fills, resyncs, epochs) is driven for real in tests/test_hub_properties.py.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sequencer import SeqCursor, SyncResult, Verdict

EPOCH = "r1"
OTHER_EPOCH = "r2"


def ev(seq: int) -> str:
    """The item a test event carries: its seq is readable back from it."""
    return f"ev{seq}"


def seq_of(item: str) -> int:
    return int(item[2:])


# -- verdicts of a live cursor -------------------------------------------------


def test_next_seq_is_delivered_and_advances_the_cursor() -> None:
    cursor: SeqCursor[str] = SeqCursor(EPOCH, 5)
    assert cursor.offer(EPOCH, 6, ev(6)) is Verdict.DELIVER
    assert cursor.seq == 6
    assert cursor.offer(EPOCH, 7, ev(7)) is Verdict.DELIVER
    assert cursor.seq == 7


def test_seq_at_or_below_the_cursor_is_stale_and_changes_nothing() -> None:
    cursor: SeqCursor[str] = SeqCursor(EPOCH, 5)
    assert cursor.offer(EPOCH, 5, ev(5)) is Verdict.STALE
    assert cursor.offer(EPOCH, 1, ev(1)) is Verdict.STALE
    assert cursor.offer(EPOCH, 0, ev(0)) is Verdict.STALE
    assert (cursor.seq, cursor.syncing, cursor.kept) == (5, False, [])


def test_seq_past_the_next_is_a_gap_and_does_not_advance() -> None:
    cursor: SeqCursor[str] = SeqCursor(EPOCH, 5)
    assert cursor.offer(EPOCH, 7, ev(7)) is Verdict.GAP
    assert cursor.seq == 5
    assert cursor.offer(EPOCH, 6, ev(6)) is Verdict.DELIVER


def test_event_of_another_epoch_is_epoch_whatever_its_seq() -> None:
    cursor: SeqCursor[str] = SeqCursor(EPOCH, 5)
    for seq in (1, 5, 6, 100):
        assert cursor.offer(OTHER_EPOCH, seq, ev(seq)) is Verdict.EPOCH
    assert (cursor.epoch, cursor.seq) == (EPOCH, 5)


def test_fresh_cursor_without_epoch_delivers_nothing() -> None:
    cursor: SeqCursor[str] = SeqCursor()
    assert cursor.offer(EPOCH, 1, ev(1)) is Verdict.EPOCH


def test_syncing_cursor_keeps_every_event_in_arrival_order() -> None:
    cursor: SeqCursor[str] = SeqCursor(EPOCH, 5)
    cursor.begin_sync()
    offers = [(EPOCH, 3), (EPOCH, 6), (OTHER_EPOCH, 1), (EPOCH, 9), (EPOCH, 6)]
    for epoch, seq in offers:
        assert cursor.offer(epoch, seq, ev(seq)) is Verdict.KEPT
    assert cursor.kept == [(e, s, ev(s)) for e, s in offers]
    assert cursor.seq == 5


def test_cursor_created_syncing_keeps_events() -> None:
    cursor: SeqCursor[str] = SeqCursor(EPOCH, 5, syncing=True)
    assert cursor.offer(EPOCH, 6, ev(6)) is Verdict.KEPT


def test_sync_result_defaults_to_nothing_delivered_no_gap_no_epoch_change() -> None:
    result: SyncResult[str] = SyncResult()
    assert (result.deliver, result.gap, result.epoch_changed) == ([], False, False)


# -- complete_sync -------------------------------------------------------------


def test_complete_sync_merges_the_read_with_kept_events_and_goes_live() -> None:
    cursor: SeqCursor[str] = SeqCursor(EPOCH, 3)
    cursor.begin_sync()
    for seq in (5, 6, 7):
        cursor.offer(EPOCH, seq, ev(seq))
    result = cursor.complete_sync(EPOCH, 3, [(4, ev(4)), (5, ev(5))])
    assert result.deliver == [ev(4), ev(5), ev(6), ev(7)]
    assert (result.gap, result.epoch_changed) == (False, False)
    assert (cursor.seq, cursor.syncing, cursor.kept) == (7, False, [])
    assert cursor.offer(EPOCH, 8, ev(8)) is Verdict.DELIVER


def test_complete_sync_drops_read_and_kept_events_at_or_below_its_base() -> None:
    cursor: SeqCursor[str] = SeqCursor(EPOCH, 0, syncing=True)
    for seq in (8, 9, 10, 11):
        cursor.offer(EPOCH, seq, ev(seq))
    result = cursor.complete_sync(EPOCH, 10, [(9, ev(9)), (10, ev(10))])
    assert result.deliver == [ev(11)]
    assert cursor.seq == 11


def test_complete_sync_delivers_a_seq_kept_twice_once() -> None:
    cursor: SeqCursor[str] = SeqCursor(EPOCH, 2, syncing=True)
    for seq in (3, 3, 4, 4):
        cursor.offer(EPOCH, seq, ev(seq))
    assert cursor.complete_sync(EPOCH, 2, [(3, ev(3))]).deliver == [ev(3), ev(4)]


def test_complete_sync_with_nothing_new_stands_at_the_base() -> None:
    cursor: SeqCursor[str] = SeqCursor(syncing=True)
    result = cursor.complete_sync(EPOCH, 42, [])
    assert result == SyncResult([], False, False)
    assert (cursor.epoch, cursor.seq, cursor.syncing) == (EPOCH, 42, False)


def test_complete_sync_leaves_a_gap_when_kept_events_skip_seqs() -> None:
    cursor: SeqCursor[str] = SeqCursor(EPOCH, 3)
    cursor.begin_sync()
    for seq in (4, 5, 7, 8):  # 6 was lost by pub/sub
        cursor.offer(EPOCH, seq, ev(seq))
    result = cursor.complete_sync(EPOCH, 3, [(4, ev(4))])
    assert result.deliver == [ev(4), ev(5)]
    assert result.gap is True
    assert result.epoch_changed is False
    assert cursor.seq == 5  # stands before the hole
    assert cursor.syncing is True  # still syncing: the owner must fill the hole
    assert cursor.kept == [(EPOCH, 7, ev(7)), (EPOCH, 8, ev(8))]
    assert cursor.offer(EPOCH, 9, ev(9)) is Verdict.KEPT
    filled = cursor.complete_sync(EPOCH, 5, [(6, ev(6)), (7, ev(7))])
    assert filled.deliver == [ev(6), ev(7), ev(8), ev(9)]
    assert (filled.gap, cursor.seq, cursor.syncing) == (False, 9, False)


def test_complete_sync_gap_right_after_the_base_delivers_nothing() -> None:
    cursor: SeqCursor[str] = SeqCursor(EPOCH, 3, syncing=True)
    cursor.offer(EPOCH, 6, ev(6))
    result = cursor.complete_sync(EPOCH, 3, [])
    assert (result.deliver, result.gap) == ([], True)
    assert (cursor.seq, cursor.syncing, cursor.kept) == (3, True, [(EPOCH, 6, ev(6))])


def test_complete_sync_leaves_a_gap_when_the_read_itself_has_a_hole() -> None:
    cursor: SeqCursor[str] = SeqCursor(EPOCH, 0, syncing=True)
    result = cursor.complete_sync(EPOCH, 0, [(1, ev(1)), (3, ev(3))])
    assert (result.deliver, result.gap) == ([ev(1)], True)
    assert cursor.kept == [(EPOCH, 3, ev(3))]


def test_complete_sync_flags_and_drops_kept_events_of_another_epoch() -> None:
    cursor: SeqCursor[str] = SeqCursor(EPOCH, 3, syncing=True)
    cursor.offer(EPOCH, 4, ev(4))
    cursor.offer(OTHER_EPOCH, 1, "new-1")
    cursor.offer(EPOCH, 5, ev(5))
    result = cursor.complete_sync(EPOCH, 3, [])
    assert result.epoch_changed is True
    assert result.deliver == [ev(4), ev(5)]
    assert "new-1" not in result.deliver
    assert cursor.kept == []


def test_complete_sync_into_a_new_epoch_takes_its_seq_even_if_lower() -> None:
    cursor: SeqCursor[str] = SeqCursor(EPOCH, 500, syncing=True)
    cursor.offer(EPOCH, 501, ev(501))  # the old seq space, about to be reset
    cursor.offer(OTHER_EPOCH, 3, "new-3")
    result = cursor.complete_sync(OTHER_EPOCH, 2, [])
    assert result.epoch_changed is True
    assert result.deliver == ["new-3"]
    assert (cursor.epoch, cursor.seq, cursor.syncing) == (OTHER_EPOCH, 3, False)
    assert cursor.offer(EPOCH, 502, ev(502)) is Verdict.EPOCH


def test_complete_sync_prefers_the_read_item_over_a_kept_one_for_the_same_seq() -> None:
    cursor: SeqCursor[str] = SeqCursor(EPOCH, 0, syncing=True)
    cursor.offer(EPOCH, 1, "from-live")
    assert cursor.complete_sync(EPOCH, 0, [(1, "from-history")]).deliver == ["from-history"]


# -- property: the read/live merge without losses ------------------------------


@st.composite
def read_live_interleavings(draw: st.DrawFn) -> tuple[int, int, SeqCursor[str], list[int],
                                                      list[tuple[int, str]], int]:
    """A topic at N; a read (B, R]; pub/sub from `live_start` on, repeats allowed."""
    n = draw(st.integers(0, 40))
    base = draw(st.integers(0, n))
    live_start = draw(st.integers(1, n + 1))
    read_end = draw(st.integers(max(base, live_start - 1), n))  # live begins within the read
    live: list[int] = []
    for seq in range(live_start, n + 1):
        live.extend([seq] * draw(st.integers(1, 3)))
    read = [(s, ev(s)) for s in range(base + 1, read_end + 1)]
    # A channel is created syncing with no epoch; a resuming player's cursor knows both.
    if draw(st.booleans()):
        cursor: SeqCursor[str] = SeqCursor(syncing=True)
    else:
        cursor = SeqCursor(EPOCH, base, syncing=True)
    sync_after = draw(st.integers(0, len(live)))  # live arrivals before complete_sync
    return n, base, cursor, live, read, sync_after


@settings(max_examples=400, deadline=None)
@given(read_live_interleavings())
def test_replay_live_merge_never_yields_a_gap_duplicate_or_out_of_order_seq(case) -> None:
    n, base, cursor, live, read, sync_after = case
    delivered: list[str] = []
    for seq in live[:sync_after]:
        assert cursor.offer(EPOCH, seq, ev(seq)) is Verdict.KEPT
    result = cursor.complete_sync(EPOCH, base, read)
    assert (result.gap, result.epoch_changed) == (False, False)
    delivered.extend(result.deliver)
    for seq in live[sync_after:]:
        verdict = cursor.offer(EPOCH, seq, ev(seq))
        assert verdict in (Verdict.DELIVER, Verdict.STALE)
        if verdict is Verdict.DELIVER:
            delivered.append(ev(seq))
    assert [seq_of(item) for item in delivered] == list(range(base + 1, n + 1))
    assert cursor.seq == n
