"""The deterministic merge (aggregator/merge.py): one input order whatever the arrival order."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.inputs import ProviderMessage
from aggregator.merge import InputDisorder, InputGap, Merger, UnknownProvider
from aggregator.providers import ProviderSet, TruthConfig, default_providers

MS = 1_000_000


def hb(provider: str, pseq: int, pts: int) -> ProviderMessage:
    return ProviderMessage(provider, pseq, pts, "heartbeat")


def quote(provider: str, pseq: int, pts: int, price: str = "2.00") -> ProviderMessage:
    return ProviderMessage(provider, pseq, pts, "prices", "1:39:1", "m-1", "ou", "open",
                           (("over", price), ("under", price)))


def keys(msgs: list[ProviderMessage]) -> list[tuple[int, str, int]]:
    return [(m.pts, m.provider, m.pseq) for m in msgs]


def canonical(streams: dict[str, list[ProviderMessage]]) -> list[ProviderMessage]:
    """Every message of every stream in (pts, provider, pseq) order: the order all regions share."""
    return sorted((m for s in streams.values() for m in s), key=lambda m: (m.pts, m.provider,
                                                                           m.pseq))


# -- order --------------------------------------------------------------------------


def test_release_is_in_pts_provider_pseq_order_below_the_watermark() -> None:
    merger = Merger(["a", "b"])
    for msg in [quote("b", 1, 10), quote("b", 2, 30), quote("a", 1, 20), quote("a", 2, 20)]:
        assert merger.offer(msg) is True
    assert merger.watermark == 20  # a's latest
    assert keys(merger.release()) == [(10, "b", 1)]  # the two at pts 20 wait: a may send more
    merger.offer(hb("a", 3, 40))
    assert merger.watermark == 30
    assert keys(merger.release()) == [(20, "a", 1), (20, "a", 2)]
    assert merger.released_watermark == 30
    assert merger.buffered == 2  # b@30 and a's heartbeat at 40


def test_a_message_at_exactly_the_watermark_waits_for_a_provider_that_sorts_first() -> None:
    merger = Merger(["a", "b"])
    merger.offer(quote("b", 1, 10))
    merger.offer(hb("a", 1, 10))
    assert merger.release() == []  # b@10 may not leave: a could still send at pts 10
    merger.offer(quote("a", 2, 10))  # and it does: it must come before b's
    merger.offer(hb("a", 3, 11))
    merger.offer(hb("b", 2, 11))
    assert keys(merger.release()) == [(10, "a", 1), (10, "a", 2), (10, "b", 1)]


def test_heartbeats_are_released_with_the_quotes() -> None:
    merger = Merger(["a", "b"])
    merger.offer(hb("a", 1, 5))
    merger.offer(hb("b", 1, 6))
    merger.offer(hb("a", 2, 7))
    assert [m.kind for m in merger.release()] == ["heartbeat"]
    assert merger.release() == []  # nothing new: the same watermark releases nothing twice


# -- duplicates, gaps, broken streams --------------------------------------------------


def test_a_duplicate_is_ignored_and_counted() -> None:
    merger = Merger(["a", "b"])
    assert merger.offer(quote("a", 1, 10)) is True
    assert merger.offer(quote("a", 1, 10)) is False
    merger.offer(hb("b", 1, 20))
    merger.offer(hb("a", 2, 20))
    assert keys(merger.release()) == [(10, "a", 1)]
    assert merger.offer(quote("a", 1, 10)) is False  # after release too
    assert merger.offer(hb("a", 2, 20)) is False
    assert merger.duplicates == {"a": 3, "b": 0}
    assert merger.late == {"a": 0, "b": 0} and not merger.diverged


def test_a_gap_raises_naming_provider_expected_and_got_and_changes_nothing() -> None:
    merger = Merger(["a"])
    merger.offer(quote("a", 1, 10))
    with pytest.raises(InputGap, match="provider 'a': expected pseq 2, got 4") as info:
        merger.offer(quote("a", 4, 12))
    assert (info.value.provider, info.value.expected, info.value.got) == ("a", 2, 4)
    assert merger.taken == {"a": 1}
    assert merger.offer(quote("a", 2, 11)) is True  # the backfill continues the stream


def test_a_first_message_that_is_not_pseq_1_is_a_gap() -> None:
    with pytest.raises(InputGap, match="expected pseq 1, got 2"):
        Merger(["a"]).offer(hb("a", 2, 0))


def test_pts_going_down_raises() -> None:
    merger = Merger(["a"])
    merger.offer(hb("a", 1, 10))
    with pytest.raises(InputDisorder, match="pseq 2 has pts 9, below its previous pts 10"):
        merger.offer(hb("a", 2, 9))
    assert merger.taken == {"a": 1}


def test_unknown_providers_are_refused() -> None:
    merger = Merger(["a"])
    with pytest.raises(UnknownProvider, match="'z' is not one of"):
        merger.offer(hb("z", 1, 0))
    with pytest.raises(UnknownProvider):
        merger.exclude("z")
    with pytest.raises(ValueError, match="at least one provider"):
        Merger([])


# -- silence, exclusion, readmission -------------------------------------------------


def test_a_provider_that_never_spoke_holds_the_watermark_until_excluded() -> None:
    merger = Merger(["a", "b", "c"])
    for pseq in range(1, 6):
        merger.offer(hb("a", pseq, pseq * 100))
        merger.offer(hb("b", pseq, pseq * 100))
    assert merger.watermark is None
    assert merger.release() == []
    merger.exclude("c")
    assert merger.excluded == ("c",)
    assert merger.watermark == 500
    assert len(merger.release()) == 8  # everything below 500


def test_a_silent_provider_holds_at_its_last_pts_then_exclusion_lets_prices_flow() -> None:
    merger = Merger(["a", "b"])
    merger.offer(hb("a", 1, 100))
    merger.offer(hb("b", 1, 100))
    for pseq in range(2, 10):
        merger.offer(quote("a", pseq, pseq * 100))
    merger.release()
    assert merger.released_watermark == 100  # b went quiet at 100
    merger.exclude("b")
    out = merger.release()
    assert keys(out)[-1] == (800, "a", 8) and merger.released_watermark == 900


def test_readmission_on_the_next_message_and_the_provider_holds_again() -> None:
    merger = Merger(["a", "b"])
    merger.offer(hb("a", 1, 100))
    merger.offer(hb("b", 1, 100))
    merger.exclude("b")
    merger.offer(hb("a", 2, 200))
    merger.release()
    assert merger.released_watermark == 200
    assert merger.offer(quote("b", 2, 250)) is True  # b is back, in time
    assert merger.excluded == () and not merger.diverged
    merger.offer(hb("a", 3, 400))
    assert merger.watermark == 250  # b holds it again
    assert keys(merger.release()) == [(200, "a", 2)]
    merger.offer(hb("b", 3, 500))
    assert keys(merger.release()) == [(250, "b", 2)]  # a's 400 is now the watermark


def test_a_late_message_is_dropped_counted_and_flags_divergence() -> None:
    merger = Merger(["a", "b"])
    merger.offer(hb("a", 1, 100))
    merger.offer(hb("b", 1, 100))
    merger.exclude("b")
    merger.offer(hb("a", 2, 300))
    merger.release()  # released up to 300 without b
    assert merger.offer(quote("b", 2, 150)) is True  # new, but below what was released
    assert merger.late == {"a": 0, "b": 1}
    assert merger.diverged
    assert merger.positions["b"] == 2  # consumed: a re-read starts after it
    assert merger.buffered == 1  # only a's heartbeat at 300
    # b is back and behind: nothing leaves until it passes the released watermark
    merger.offer(hb("a", 3, 400))
    assert merger.release() == []
    merger.offer(quote("b", 3, 350))
    merger.offer(hb("b", 4, 450))
    assert keys(merger.release()) == [(300, "a", 2), (350, "b", 3)]
    assert merger.late["b"] == 1


def test_a_message_at_the_released_watermark_is_not_late() -> None:
    merger = Merger(["a", "b"])
    merger.offer(hb("a", 1, 100))
    merger.offer(hb("b", 1, 300))
    merger.release()
    assert merger.released_watermark == 100
    merger.offer(quote("a", 2, 100))  # same pts as a's last: allowed, and sorts after the rest
    assert not merger.diverged


def test_re_excluding_keeps_the_first_exclusion_point_and_all_excluded_releases_nothing() -> None:
    merger = Merger(["a", "b"])
    merger.offer(hb("a", 1, 100))
    merger.offer(hb("b", 1, 100))
    merger.exclude("a")
    merger.exclude("b")
    merger.exclude("b")
    assert merger.watermark is None
    assert merger.release() == []  # nobody to wait for: no safe point, output pauses


# -- snapshots -------------------------------------------------------------------------


def test_snapshot_is_json_and_restore_continues_identically() -> None:
    streams = {
        "a": [hb("a", 1, 100), quote("a", 2, 150), quote("a", 3, 250), hb("a", 4, 300)],
        "b": [hb("b", 1, 100), quote("b", 2, 200), hb("b", 3, 300), quote("b", 4, 320)],
        "c": [hb("c", 1, 50), hb("c", 2, 120), hb("c", 3, 400)],
    }
    original = Merger(streams)
    for name, upto in (("a", 3), ("b", 3), ("c", 2)):
        for msg in streams[name][:upto]:
            original.offer(msg)
    first = original.release()
    assert keys(first) == [(50, "c", 1), (100, "a", 1), (100, "b", 1)]  # c holds at 120
    original.exclude("c")
    first += original.release()
    assert keys(first)[3:] == [(120, "c", 2), (150, "a", 2), (200, "b", 2)]
    snap = json.loads(json.dumps(original.snapshot()))
    assert snap["providers"]["c"]["excluded_at"] == 2
    assert snap["released_watermark"] == 250
    for msg in (streams["a"][3], streams["b"][3], streams["c"][2]):
        original.offer(msg)  # c's heartbeat at 400 readmits it
    rest = original.release()
    assert keys(rest) == [(250, "a", 3)]

    restored = Merger.restore(snap)
    assert restored.positions == {"a": 2, "b": 2, "c": 2}
    assert restored.excluded == ("c",)
    again = []
    for name in ("c", "b", "a"):  # another interleaving, from each copy's start: duplicates
        for msg in streams[name]:
            restored.offer(msg)
            again += restored.release()
    assert again == rest
    assert restored.snapshot() == original.snapshot()
    assert first + rest == canonical(streams)[: len(first) + len(rest)]


def test_restore_refuses_a_broken_snapshot() -> None:
    good = Merger(["a"]).snapshot()
    with pytest.raises(ValueError, match="version"):
        Merger.restore({**good, "version": 99})
    with pytest.raises(ValueError, match="no providers"):
        Merger.restore({**good, "providers": {}})
    with pytest.raises(ValueError, match="bad position"):
        Merger.restore({**good, "providers": {"a": {"pseq": 3, "pts": None}}})
    with pytest.raises(ValueError, match="released_watermark"):
        Merger.restore({**good, "released_watermark": "5"})


# -- properties ------------------------------------------------------------------------

# Real provider streams: ties in pts within a provider and across providers,
# heartbeats on a shared grid, outages, stale stretches, suspensions, closures,
# and one provider that covers only football.
SET = ProviderSet(
    11,
    providers=[
        replace(c, outage_every_ms=3_000, outage_ms=(300, 1_500), stale_every_ms=5_000,
                stale_ms=(500, 2_000), lone_suspend_every_ms=5_000)
        for c in default_providers()
    ],
    truth=TruthConfig(suspend_every_ms=10_000, close_after_ms=(10_000, 60_000)),
)
STREAMS = SET.streams_between(0, 30_000 * MS)
DELAY_MS = {c.name: c.delay_ms + c.jitter_ms for c in SET.providers}


def arrivals(rnd: random.Random, streams: dict[str, list[ProviderMessage]],
             start: dict[str, int] | None = None) -> list[ProviderMessage]:
    """One region's arrival order: each message at pts + a delay up to its provider's own
    delay, each copy in its own order, ties broken at random."""
    timed = []
    for name, stream in streams.items():
        arrived = 0
        for msg in stream:
            if start is not None and msg.pseq <= start[name]:
                continue
            arrived = max(arrived + 1, msg.pts + rnd.randint(0, DELAY_MS[name]) * MS)
            timed.append((arrived, rnd.random(), msg))
    timed.sort(key=lambda t: (t[0], t[1]))
    return [msg for _, _, msg in timed]


def shuffle_keeping_order(rnd: random.Random, streams: dict[str, list[ProviderMessage]],
                          start: dict[str, int] | None = None) -> list[ProviderMessage]:
    """Any interleaving at all: each copy's own order kept, nothing else."""
    queues = {n: [m for m in s if start is None or m.pseq > start[n]] for n, s in streams.items()}
    positions = dict.fromkeys(queues, 0)
    out = []
    while True:
        live = [n for n in sorted(queues) if positions[n] < len(queues[n])]
        if not live:
            return out
        name = rnd.choice(live)
        out.append(queues[name][positions[name]])
        positions[name] += 1


def run(merger: Merger, order: list[ProviderMessage], rnd: random.Random,
        release_every: int) -> list[ProviderMessage]:
    out: list[ProviderMessage] = []
    for msg in order:
        merger.offer(msg)
        if rnd.randrange(release_every) == 0:
            out += merger.release()
    return out + merger.release()


PROPERTY = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.integers(0, 2**32), st.booleans(), st.integers(1, 20))
def test_any_interleaving_releases_the_identical_sequence(seed: int, bounded: bool,
                                                          release_every: int) -> None:
    rnd = random.Random(seed)
    order = arrivals(rnd, STREAMS) if bounded else shuffle_keeping_order(rnd, STREAMS)
    merger = Merger(SET.names)
    out = run(merger, order, rnd, release_every)
    final = merger.watermark
    assert final is not None
    expected = [m for m in canonical(STREAMS) if m.pts < final]
    assert out == expected
    assert not merger.diverged and merger.late == dict.fromkeys(SET.names, 0)


@PROPERTY
@given(st.integers(0, 2**32), st.integers(0, 10**9), st.integers(1, 20), st.integers(1, 20))
def test_restore_at_any_point_and_re_offering_continues_identically(
    seed: int, cut: int, release_every: int, release_again: int
) -> None:
    rnd = random.Random(seed)
    order = arrivals(rnd, STREAMS)
    cut %= len(order) + 1
    original = Merger(SET.names)
    before = run(original, order[:cut], rnd, release_every)
    snap = json.loads(json.dumps(original.snapshot()))
    after = run(original, order[cut:], rnd, release_every)

    restored = Merger.restore(snap)
    # The shell re-reads each copy after its position, in this region's own order;
    # a few messages before the position come again and are ignored as duplicates.
    positions = {n: max(p - rnd.randint(0, 3), 0) for n, p in restored.positions.items()}
    again = run(restored, shuffle_keeping_order(rnd, STREAMS, positions), rnd, release_again)
    assert keys(again) == keys(after)
    assert before + after == [m for m in canonical(STREAMS) if m.pts < original.watermark]


@PROPERTY
@given(st.integers(0, 2**32), st.integers(50, 2_000))
def test_exclusion_changes_when_not_what_unless_the_region_is_flagged(
    seed: int, silence_ms: int
) -> None:
    """A shell that excludes providers silent for `silence_ms` of its own clock: what it
    releases is the canonical order's prefix, or the merge says it diverged."""
    rnd = random.Random(seed)
    merger = Merger(SET.names)
    timed = []
    for name, stream in STREAMS.items():
        arrived = 0
        for msg in stream:
            arrived = max(arrived + 1, msg.pts + rnd.randint(0, DELAY_MS[name]) * MS)
            timed.append((arrived, rnd.random(), msg))
    timed.sort(key=lambda t: (t[0], t[1]))
    heard = dict.fromkeys(SET.names, 0)
    out: list[ProviderMessage] = []
    for now, _, msg in timed:
        merger.offer(msg)
        heard[msg.provider] = now
        for name, last in heard.items():
            if now - last > silence_ms * MS:
                merger.exclude(name)
        out += merger.release()
    reference = canonical(STREAMS)
    if merger.diverged:
        assert sum(merger.late.values()) > 0  # the flag comes from a dropped message only
    else:
        assert out == reference[: len(out)]
