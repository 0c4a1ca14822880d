"""The plain counting of partner statistics (attribution/stats.py), as tables.

What each click verdict and conversion type adds, how rows come out of the
day and minute counts (windows sliding by the minute, a UTC day boundary),
which rows the board republishes, and the event's exact bytes.
"""

from __future__ import annotations

import orjson
import pytest

from attribution.stats import (
    NS_PER_MINUTE,
    SERIES_KEY,
    ZERO,
    BadRecord,
    StatsBoard,
    event_body,
    partner_rows,
    row_body,
    row_value,
    rows,
    series,
    tally_click,
    tally_conversion,
    utc_day,
)

T0 = 1_763_800_000_000_000_000  # 2025-11-22T08:26:40Z
MIN0 = T0 // NS_PER_MINUTE


def click(verdict: str = "ok", *, cid: str = "k1", ts: int = T0, creative: str | None = "cr1",
          partner: str = "42", campaign: str = "c7") -> dict:
    return {"click_id": cid, "code": "x", "partner": partner, "campaign": campaign,
            "creative": creative, "ts": ts, "subs": {}, "ip_hash": "h", "ua": "ua",
            "referer": None, "verdict": verdict}


def conversion(kind: str, amount: str | None = None, currency: str | None = None, *,
               cid: str = "v1", ts: int = T0, attributed: bool = True) -> dict:
    return {"conversion_id": cid, "id": "op-1", "click_id": "k1", "type": kind,
            "player": "p", "amount": amount, "currency": currency, "ts": 1, "received_ts": ts,
            "attributed": {"partner": "42", "campaign": "c7", "creative": "cr1"}
            if attributed else None,
            "reason": None if attributed else "unknown_click"}


def _sum(tallies) -> tuple[dict[str, int], dict[int, dict[str, int]]]:
    day: dict[str, int] = {}
    minutes: dict[int, dict[str, int]] = {}
    for t in tallies:
        for name, n in t.increments:
            day[name] = day.get(name, 0) + n
            bucket = minutes.setdefault(t.minute, {})
            bucket[name] = bucket.get(name, 0) + n
    return day, minutes


@pytest.mark.parametrize(("verdict", "expected"), [
    ("ok", {"clicks": 1, "unique_clicks": 1}),
    ("bot", {"clicks": 1, "bot_clicks": 1}),
    ("duplicate", {"clicks": 1, "duplicate_clicks": 1}),
])
def test_a_click_counts_under_its_verdict_in_its_campaign_and_creative(verdict, expected):
    t = tally_click(click(verdict))
    assert t.record_id == "click:k1" and t.partner == "42" and t.ts_ns == T0
    assert dict(t.increments) == {
        **{f"campaign:c7:{k}": v for k, v in expected.items()},
        **{f"creative:cr1:{k}": v for k, v in expected.items()},
    }


def test_a_click_without_creative_has_only_campaign_rows():
    t = tally_click(click(creative=None))
    assert {name.split(":")[0] for name, _ in t.increments} == {"campaign"}


@pytest.mark.parametrize(("kind", "amount", "currency", "expected"), [
    ("registration", None, None, {"registrations": 1}),
    ("ftd", "25.00", "EUR", {"ftds": 1, "deposits.EUR": 25_000_000}),
    ("deposit", "10.5", "EUR", {"deposits.EUR": 10_500_000}),
    ("deposit", "0.000001", "USD", {"deposits.USD": 1}),
])
def test_a_conversion_counts_by_its_type(kind, amount, currency, expected):
    t = tally_conversion(conversion(kind, amount, currency))
    assert t is not None and t.record_id == "conv:v1"
    assert {k: v for k, v in t.increments if k.startswith("campaign:")} == \
        {f"campaign:c7:{k}": v for k, v in expected.items()}


def test_an_unattributed_conversion_counts_for_nobody():
    assert tally_conversion(conversion("registration", attributed=False)) is None


@pytest.mark.parametrize(("record", "field"), [
    ({**click(), "verdict": "maybe"}, "verdict"),
    ({**click(), "partner": "a b"}, "partner"),
    ({**click(), "partner": None}, "partner"),
    ({**click(), "ts": "now"}, "ts"),
    ({**click(), "click_id": None}, "click_id"),
    ({**click(), "campaign": "a:b"}, "campaign"),
    (conversion("deposit", "ten", "EUR"), "amount"),
    (conversion("deposit", "-1", "EUR"), "amount"),
    (conversion("deposit", "1.0000001", "EUR"), "amount"),
    (conversion("deposit", "1", "euro"), "currency"),
    ({**conversion("signup"), "type": "signup"}, "type"),
])
def test_a_bad_record_is_refused_naming_its_field(record, field):
    tally = tally_click if "click_id" in record and "conversion_id" not in record \
        else tally_conversion
    with pytest.raises(BadRecord, match=field):
        tally(record)


def test_rows_per_campaign_and_creative_for_each_window():
    day, minutes = _sum([tally_click(click("ok", cid="a")), tally_click(click("bot", cid="b")),
                         tally_conversion(conversion("ftd", "25.00", "EUR")),
                         tally_conversion(conversion("deposit", "5", "EUR", cid="v2"))])
    out = rows(day, minutes, MIN0)
    assert sorted(out) == sorted(f"{d}:{w}" for d in ("campaign:c7", "creative:cr1")
                                 for w in ("today", "1h", "5m"))
    assert out["campaign:c7:today"] == {
        "clicks": 2, "unique_clicks": 1, "bot_clicks": 1, "duplicate_clicks": 0,
        "registrations": 0, "ftds": 1, "deposits": "30.00", "currency": "EUR"}
    assert out["campaign:c7:5m"] == out["campaign:c7:1h"] == out["campaign:c7:today"]


@pytest.mark.parametrize(("minutes_later", "in_5m", "in_1h"), [
    (0, 1, 1), (4, 1, 1), (5, 0, 1), (59, 0, 1), (60, 0, 0),
])
def test_the_sliding_windows_drop_a_click_as_minutes_pass(minutes_later, in_5m, in_1h):
    day, minutes = _sum([tally_click(click())])
    out = rows(day, minutes, MIN0 + minutes_later)
    assert out.get("campaign:c7:5m", {}).get("clicks", 0) == in_5m
    assert out.get("campaign:c7:1h", {}).get("clicks", 0) == in_1h
    assert out["campaign:c7:today"]["clicks"] == 1  # the caller passes today's hash


def test_the_day_boundary_is_utc_midnight():
    midnight = 1_763_856_000_000_000_000  # 2025-11-23T00:00:00Z
    before, after = tally_click(click(ts=midnight - 1)), tally_click(click(ts=midnight))
    assert (before.day, after.day) == ("20251122", "20251123")
    assert utc_day(midnight - 1) == "20251122"
    assert after.minute == before.minute + 1  # and the sliding windows go on across it


def test_deposits_in_several_currencies_are_never_summed_together():
    day, minutes = _sum([tally_conversion(conversion("deposit", "5", "EUR")),
                         tally_conversion(conversion("deposit", "7.25", "USD", cid="v2"))])
    row = rows(day, minutes, MIN0)["campaign:c7:today"]
    assert (row["deposits"], row["currency"]) == ("7.25", "USD")
    assert row["deposits_by_currency"] == {"EUR": "5.00", "USD": "7.25"}


def test_the_board_publishes_changed_rows_only_and_zeroes_rows_that_emptied():
    board = StatsBoard()
    one = {"clicks": 1}
    assert board.changes("42", {"a:today": one, "a:5m": one}) == \
        [("a:5m", one), ("a:today", one)]
    assert board.changes("42", {"a:today": one, "a:5m": one}) == []
    two = {"clicks": 2}
    assert board.changes("42", {"a:today": two}) == [("a:today", two), ("a:5m", ZERO)]
    assert board.changes("42", {"a:today": two}) == []


def test_a_seeded_board_zeroes_what_the_topic_held_before_a_restart():
    board = StatsBoard()
    board.seed("42", {"a:5m": {"clicks": 3}, "a:1h": ZERO})
    assert board.changes("42", {}) == [("a:5m", ZERO)]


def test_the_event_body_has_the_protocol_field_order():
    body = event_body("campaign:c7:today", T0, {"clicks": 1})
    event = orjson.loads(b'{"type":"stats","topic":"stats:42","epoch":"e","seq":3,' + body)
    assert list(event) == ["type", "topic", "epoch", "seq", "key", "ts", "counters"]
    assert event["key"] == "campaign:c7:today" and event["ts"] == T0


# -- the per-minute series (`minutes:1h`) -------------------------------------------------


def test_the_series_puts_each_minute_in_its_bucket_partner_wide():
    tallies = [tally_click(click("ok", cid="a", ts=T0)),
               tally_click(click("bot", cid="b", ts=T0, campaign="c8", creative="cr2")),
               tally_click(click("duplicate", cid="c", ts=T0 - 3 * NS_PER_MINUTE)),
               tally_click(click("ok", cid="old", ts=T0 - 60 * NS_PER_MINUTE)),  # out
               tally_conversion(conversion("ftd", "25.00", "EUR", ts=T0 - 59 * NS_PER_MINUTE))]
    day, minutes = _sum(tallies)
    value = series(minutes, MIN0)
    got = value["minutes"]
    assert got["start"] == MIN0 - 59
    assert list(got) == ["start", "clicks", "unique_clicks", "bot_clicks", "duplicate_clicks",
                         "registrations", "ftds"]
    assert all(len(got[k]) == 60 for k in got if k != "start")
    # two campaigns in the last bucket, each once (their creatives are not counted again)
    assert (got["clicks"][59], got["unique_clicks"][59], got["bot_clicks"][59]) == (2, 1, 1)
    assert got["duplicate_clicks"][56] == 1 and got["ftds"][0] == 1
    assert sum(got["clicks"]) == 3  # the click of 60 minutes ago has left
    # Its counters are the hour's totals: the campaigns' 1h rows added up.
    hour = rows(day, minutes, MIN0)
    assert value["counters"]["clicks"] == sum(
        r["clicks"] for k, r in hour.items() if k.startswith("campaign:") and k.endswith(":1h"))
    assert (value["counters"]["deposits"], value["counters"]["currency"]) == ("25.00", "EUR")


def test_the_series_is_every_partners_row_even_empty():
    out = partner_rows({}, {}, MIN0)
    assert list(out) == [SERIES_KEY]
    assert out[SERIES_KEY]["counters"] == ZERO
    assert out[SERIES_KEY]["minutes"]["clicks"] == [0] * 60


def test_the_board_republishes_the_series_when_its_window_moves_and_never_zeroes_it():
    board = StatsBoard()
    _, minutes = _sum([tally_click(click(ts=T0))])
    first = partner_rows({}, minutes, MIN0)
    assert [k for k, _ in board.changes("42", first)] == ["campaign:c7:1h", "campaign:c7:5m",
                                                          "creative:cr1:1h", "creative:cr1:5m",
                                                          SERIES_KEY]
    assert board.changes("42", partner_rows({}, minutes, MIN0)) == []
    moved = dict(board.changes("42", partner_rows({}, minutes, MIN0 + 1)))
    assert list(moved) == [SERIES_KEY]
    assert moved[SERIES_KEY]["minutes"]["clicks"][58] == 1  # one bucket to the left
    assert SERIES_KEY not in dict(board.changes("42", {}))


def test_the_series_event_has_the_protocol_fields_then_minutes():
    _, minutes = _sum([tally_click(click(ts=T0))])
    value = series(minutes, MIN0)
    body = row_body(SERIES_KEY, T0, value)
    event = orjson.loads(b'{"type":"stats","topic":"stats:42","epoch":"e","seq":3,' + body)
    assert list(event) == ["type", "topic", "epoch", "seq", "key", "ts", "counters", "minutes"]
    assert event["key"] == "minutes:1h" and row_value(SERIES_KEY, event) == value
    plain = orjson.loads(b"{" + row_body("campaign:c7:today", T0, ZERO))
    assert row_value("campaign:c7:today", plain) == ZERO and "minutes" not in plain
