"""Price updates (feed/events.py): validation before Redis, and the body the script splices."""

from __future__ import annotations

import time

import orjson
import pytest

from feed.events import STATUSES, InvalidEvent, PriceUpdate
from gateway.topics import PartitionMap

PMAP = PartitionMap.load(None)
PRICES = {"home": "1.85", "draw": "3.40", "away": "4.20"}


def update(**changes: object) -> PriceUpdate:
    fields: dict = {"topic": "odds:1:39:1", "market": "1:39:1", "event_id": "m-77812",
                    "prices": dict(PRICES), "status": "open", "ts": 1_763_800_000_123_456_789}
    fields.update(changes)
    return PriceUpdate(**fields)


def refused(bad: PriceUpdate, words: str) -> InvalidEvent:
    with pytest.raises(InvalidEvent, match=words) as info:
        bad.validate(PMAP)
    return info.value


# -- accepted ----------------------------------------------------------------------


def test_good_update_is_accepted() -> None:
    update().validate(PMAP)


@pytest.mark.parametrize("status", ["open", "suspended", "closed"])
def test_every_protocol_status_is_accepted(status: str) -> None:
    update(status=status).validate(PMAP)


def test_statuses_are_exactly_the_protocol_words() -> None:
    assert sorted(STATUSES) == ["closed", "open", "suspended"]


@pytest.mark.parametrize("market", ["1:40:1", "1:40:999", "1:40:0"])
def test_league_level_topic_accepts_any_market_of_its_league(market: str) -> None:
    update(topic="odds:1:40", market=market).validate(PMAP)


@pytest.mark.parametrize(
    "prices",
    [{}, {"home": "0"}, {"over_2.5": "123456.123456", "Team-B+1": "1.5", "x": "10"},
     {f"o{i}": "2.00" for i in range(64)}],
)
def test_price_shapes_that_are_accepted(prices: dict) -> None:
    update(prices=prices).validate(PMAP)


@pytest.mark.parametrize("ts", [0, 1, 2**63 - 1])
def test_ts_zero_or_positive_is_accepted(ts: int) -> None:
    update(ts=ts).validate(PMAP)


def test_event_id_of_64_characters_is_accepted() -> None:
    update(event_id="e" * 64).validate(PMAP)


# -- refused, naming the field -------------------------------------------------------


@pytest.mark.parametrize("topic", ["odds:1:39", "odds:1:40:1", "odds:9:1", "nope", ""])
def test_topic_outside_the_map_is_refused(topic: str) -> None:
    refused(update(topic=topic), "topic")


@pytest.mark.parametrize("market", ["1:39", "1:39:1:2", "a:b:c", "", "1:39:x", "1::1",
                                    "1:39:" + "1" * 13, " 1:39:1", "1:39:-1", 5, None])
def test_malformed_market_is_refused(market: object) -> None:
    refused(update(market=market), "market")


@pytest.mark.parametrize(
    "topic, market",
    [
        ("odds:1:39:1", "1:39:2"),  # another market of a market-level league
        ("odds:1:39:1", "1:40:1"),
        ("odds:1:39:1", "2:39:1"),
        ("odds:1:40", "1:41:1"),  # another league
        ("odds:1:40", "2:40:1"),  # another sport
    ],
)
def test_market_not_in_the_topic_is_refused(topic: str, market: str) -> None:
    error = refused(update(topic=topic, market=market), "does not belong")
    assert market in str(error) and topic in str(error)


@pytest.mark.parametrize("event_id", ["", "e" * 65, 5, None])
def test_bad_event_id_is_refused(event_id: object) -> None:
    refused(update(event_id=event_id), "event_id")


@pytest.mark.parametrize("status", ["live", "", "OPEN", "open ", None])
def test_bad_status_is_refused(status: object) -> None:
    refused(update(status=status), "status")


@pytest.mark.parametrize("prices", [["1.85"], "1.85", None, {f"o{i}": "2.00" for i in range(65)}])
def test_prices_that_are_not_a_small_object_are_refused(prices: object) -> None:
    refused(update(prices=prices), "prices")


@pytest.mark.parametrize("outcome", ["", "a b", "x" * 33, "caf\u00e9", "home/away", 1])
def test_bad_outcome_name_is_refused(outcome: object) -> None:
    refused(update(prices={outcome: "1.85"}), "outcome")


@pytest.mark.parametrize(
    "price",
    [1.85, 2, None, "", "1,85", "-1.5", "+1.5", "1.", ".5", "1e3", "1234567", "1.1234567",
     "NaN", "inf", " 1.5", "1.5 ", "\u0661.5"],
)
def test_price_that_is_not_a_decimal_string_is_refused(price: object) -> None:
    error = refused(update(prices={"home": price}), "price")
    assert "home" in str(error)


@pytest.mark.parametrize("ts", [-1, 1.5, "1763800000", None])
def test_bad_ts_is_refused(ts: object) -> None:
    refused(update(ts=ts), "ts")


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"prices": {"home": "1.85\n"}}, id="price-trailing-newline"),
        pytest.param({"prices": {"home\n": "1.85"}}, id="outcome-trailing-newline"),
        pytest.param({"market": "1:39:1\n"}, id="market-trailing-newline"),
        pytest.param({"market": "01:39:1"}, id="market-leading-zero"),
        pytest.param({"market": "1:39:01"}, id="market-id-leading-zero"),
    ],
)
def test_non_canonical_text_is_refused(changes: dict) -> None:
    with pytest.raises(InvalidEvent):
        update(**changes).validate(PMAP)


@pytest.mark.parametrize(
    "changes",
    [pytest.param({"ts": True}, id="ts-bool"),
     pytest.param({"status": ["open"]}, id="status-list")],
)
def test_wrong_types_are_invalid_events(changes: dict) -> None:
    with pytest.raises(InvalidEvent):
        update(**changes).validate(PMAP)


# -- body() --------------------------------------------------------------------------


def test_body_is_the_json_tail_without_its_leading_brace() -> None:
    body = update().body()
    assert body.startswith(b'"market":')
    assert body.endswith(b"}")
    assert orjson.loads(b"{" + body) == {
        "market": "1:39:1", "event_id": "m-77812", "ts": 1_763_800_000_123_456_789,
        "status": "open", "prices": PRICES,
    }


def test_body_spliced_after_the_script_prefix_is_the_protocol_event() -> None:
    prefix = b'{"type":"odds","topic":"odds:1:39:1","epoch":"r1-20261122","seq":1842,'
    event = orjson.loads(prefix + update().body())
    assert event == {
        "type": "odds", "topic": "odds:1:39:1", "epoch": "r1-20261122", "seq": 1842,
        "market": "1:39:1", "event_id": "m-77812", "ts": 1_763_800_000_123_456_789,
        "status": "open", "prices": PRICES,
    }
    assert all(isinstance(p, str) for p in event["prices"].values())


def test_body_sets_ts_to_now_when_zero() -> None:
    before = time.time_ns()
    ts = orjson.loads(b"{" + update(ts=0).body())["ts"]
    assert before <= ts <= time.time_ns()


def test_body_keeps_prices_in_order() -> None:
    prices = {"away": "4.20", "home": "1.85", "draw": "3.40"}
    assert list(orjson.loads(b"{" + update(prices=prices).body())["prices"]) == [
        "away", "home", "draw"
    ]
