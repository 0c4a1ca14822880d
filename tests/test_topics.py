"""Topic grammar and the partition map (gateway/topics.py, PROTOCOL.md §1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.topics import (
    DEFAULT_PARTITION_MAP,
    MAX_ID_DIGITS,
    PartitionMap,
    Topic,
    market_key,
    parse_topic,
    topic_for_market,
)

PMAP = PartitionMap.load(None)


# -- grammar -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, topic",
    [
        ("odds:1:39:1", Topic(1, 39, 1)),
        ("odds:1:40", Topic(1, 40, None)),
        ("odds:0:0:0", Topic(0, 0, 0)),
        ("odds:5:0", Topic(5, 0, None)),
        ("odds:10:200:3000", Topic(10, 200, 3000)),
        ("odds:" + "9" * MAX_ID_DIGITS + ":1", Topic(10**MAX_ID_DIGITS - 1, 1, None)),
    ],
)
def test_grammar_accepts_canonical_topics(text: str, topic: Topic) -> None:
    assert parse_topic(text) == topic
    assert topic.name == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "odds",
        "odds:1",  # 2 parts
        "odds:1:39:1:2",  # 5 parts
        "odds:1:39:",
        "odds::39",
        "odds:1::1",
        "ODDS:1:39:1",
        "odd:1:39",
        "price:1:39",
        ":1:39",
        "odds:01:39:1",  # leading zero
        "odds:1:039",
        "odds:1:39:00",
        "odds:+1:39",  # sign
        "odds:-1:39",
        "odds:1:-39",
        "odds: 1:39",  # spaces
        "odds:1:39 ",
        " odds:1:39",
        "odds:1:39\n",
        "odds:1:3 9",
        "odds:\u0661:39",  # Arabic-Indic digit one: isdigit() but not ASCII
        "odds:1:\u0663\u0669",
        "odds:\uff11:39",  # fullwidth digit one
        "odds:\u00b2:39",  # superscript two: isdigit() but not a decimal
        "odds:1.0:39",
        "odds:1e3:39",
        "odds:0x1:39",
        "odds:1_000:39",
        "odds:" + "1" * (MAX_ID_DIGITS + 1) + ":39",  # too many digits
        "odds:1:39:" + "1" * (MAX_ID_DIGITS + 1),
        "odds:1;39",
        "odds/1/39",
    ],
)
def test_grammar_refuses_anything_else(text: str) -> None:
    assert parse_topic(text) is None
    assert not PMAP.is_topic(text)


@pytest.mark.parametrize("value", [None, 5, b"odds:1:39", ["odds", "1", "39"]])
def test_grammar_refuses_non_strings(value: object) -> None:
    assert parse_topic(value) is None  # type: ignore[arg-type]


def test_grammar_refuses_overlong_text() -> None:
    assert parse_topic("odds:1:" + "1" * 70) is None


@given(
    st.integers(0, 10**MAX_ID_DIGITS - 1),
    st.integers(0, 10**MAX_ID_DIGITS - 1),
    st.none() | st.integers(0, 10**MAX_ID_DIGITS - 1),
)
def test_name_and_parse_round_trip(sport: int, league: int, market: int | None) -> None:
    topic = Topic(sport, league, market)
    assert parse_topic(topic.name) == topic


# -- the partition map ---------------------------------------------------------


@pytest.mark.parametrize("text", ["odds:1:39:1", "odds:1:2:77", "odds:2:12:5", "odds:4:57:1",
                                  "odds:3:1:0"])
def test_market_level_league_takes_four_part_topics(text: str) -> None:
    assert PMAP.validate(text) == parse_topic(text)
    assert PMAP.is_topic(text)


@pytest.mark.parametrize("text", ["odds:1:39", "odds:2:12", "odds:4:57"])
def test_market_level_league_refuses_three_part_topics(text: str) -> None:
    assert PMAP.validate(text) is None


@pytest.mark.parametrize("text", ["odds:1:40", "odds:5:1", "odds:5:39", "odds:2:39"])
def test_tail_league_takes_three_part_topics(text: str) -> None:
    assert PMAP.is_topic(text)


@pytest.mark.parametrize("text", ["odds:1:40:1", "odds:5:1:1", "odds:2:39:1"])
def test_tail_league_refuses_four_part_topics(text: str) -> None:
    assert not PMAP.is_topic(text)


@pytest.mark.parametrize("text", ["odds:6:1", "odds:0:1", "odds:99:39:1", "odds:100:1"])
def test_unknown_sport_is_refused(text: str) -> None:
    assert not PMAP.is_topic(text)


def test_default_map_loads_with_its_sports_and_leagues() -> None:
    assert PMAP.sports == {1: "football", 2: "basketball", 3: "tennis", 4: "ice-hockey",
                           5: "baseball"}
    assert PMAP.is_market_level(1, 39)
    assert not PMAP.is_market_level(1, 40)
    assert not PMAP.is_market_level(2, 39)
    assert PMAP.high_value == frozenset({"odds:1:2:1", "odds:1:39:1"})
    assert PMAP.version == 1


def test_load_reads_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"version": 3, "sports": {"7": {"name": "darts",
                                                                "market_level": [4]}}}))
    pmap = PartitionMap.load(path)
    assert pmap.version == 3
    assert pmap.sports == {7: "darts"}
    assert pmap.is_topic("odds:7:4:1") and pmap.is_topic("odds:7:5")
    assert not pmap.is_topic("odds:1:39:1")


def test_from_dict_takes_integer_keys_and_defaults_the_name() -> None:
    pmap = PartitionMap.from_dict({"sports": {9: {"market_level": [1]}}})
    assert pmap.sports == {9: "9"}
    assert pmap.market_level == frozenset({(9, 1)})
    assert pmap.high_value == frozenset()
    assert pmap.version == 1


@pytest.mark.parametrize(
    "data, words",
    [
        ({}, "no sports"),
        ({"sports": {}}, "no sports"),
        ({"sports": {"01": {}}}, "bad sport id"),
        ({"sports": {"x": {}}}, "bad sport id"),
        ({"sports": {"-1": {}}}, "bad sport id"),
        ({"sports": {"": {}}}, "bad sport id"),
        ({"sports": {"1": {"market_level": ["39"]}}}, "bad league id"),
        ({"sports": {"1": {"market_level": [-1]}}}, "bad league id"),
        ({"sports": {"1": {"market_level": [1.5]}}}, "bad league id"),
        ({"sports": {"1": {"market_level": [None]}}}, "bad league id"),
        ({"sports": {"1": {"market_level": [39]}}, "high_value": ["odds:1:39"]}, "high-value"),
        ({"sports": {"1": {}}, "high_value": ["odds:1:39:1"]}, "high-value"),
        ({"sports": {"1": {}}, "high_value": ["odds:2:1"]}, "high-value"),
        ({"sports": {"1": {}}, "high_value": ["nope"]}, "high-value"),
    ],
)
def test_from_dict_refuses_a_bad_map(data: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        PartitionMap.from_dict(data)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"sports": [1, 2]}, id="sports-is-a-list"),
        pytest.param({"sports": {"1": ["football"]}}, id="sport-spec-is-a-list"),
        pytest.param({"sports": {"1": {"market_level": 39}}}, id="market-level-is-a-number"),
        pytest.param({"sports": {"1": {"market_level": [True]}}}, id="league-is-a-bool"),
        pytest.param({"sports": {"1": {"market_level": [10**MAX_ID_DIGITS]}}},
                     id="league-too-many-digits"),
    ],
)
def test_from_dict_refuses_a_map_of_the_wrong_shape_with_value_error(data: dict) -> None:
    with pytest.raises(ValueError, match="partition map"):
        PartitionMap.from_dict(data)


def test_to_dict_is_what_get_v1_topics_serves() -> None:
    assert PMAP.to_dict() == {
        "version": 1,
        "patterns": {
            "market_level": "odds:{sport_id}:{league_id}:{market_id}",
            "league_level": "odds:{sport_id}:{league_id}",
            "partner_stats": "stats:{partner_id}",
        },
        "sports": [
            {"id": 1, "name": "football", "market_level_leagues": [2, 3, 39, 61, 78, 135, 140]},
            {"id": 2, "name": "basketball", "market_level_leagues": [12, 120]},
            {"id": 3, "name": "tennis", "market_level_leagues": [1, 2]},
            {"id": 4, "name": "ice-hockey", "market_level_leagues": [57]},
            {"id": 5, "name": "baseball", "market_level_leagues": []},
        ],
        "high_value": ["odds:1:2:1", "odds:1:39:1"],
    }
    json.dumps(PMAP.to_dict())  # serves as JSON


def test_to_dict_round_trips_through_from_dict_shape() -> None:
    out = PMAP.to_dict()
    rebuilt = PartitionMap.from_dict({
        "version": out["version"],
        "sports": {str(s["id"]): {"name": s["name"], "market_level": s["market_level_leagues"]}
                   for s in out["sports"]},
        "high_value": out["high_value"],
    })
    assert rebuilt == PMAP
    assert PartitionMap.from_dict(DEFAULT_PARTITION_MAP) == PMAP


@pytest.mark.parametrize(
    "sport, league, market, topic",
    [
        (1, 39, 7, "odds:1:39:7"),
        (1, 2, 1, "odds:1:2:1"),
        (2, 120, 0, "odds:2:120:0"),
        (1, 40, 7, "odds:1:40"),
        (5, 1, 3, "odds:5:1"),
        (2, 39, 1, "odds:2:39"),  # league 39 is market-level for football only
    ],
)
def test_topic_for_market_follows_the_map(sport: int, league: int, market: int,
                                          topic: str) -> None:
    assert topic_for_market(PMAP, sport, league, market) == topic
    assert PMAP.is_topic(topic)


def test_market_key_is_sport_league_market() -> None:
    assert market_key(1, 39, 7) == "1:39:7"
