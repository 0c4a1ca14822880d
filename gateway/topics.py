"""Topic grammar and the partition map (PROTOCOL.md §1).

The partition map is configuration: it says which leagues are published per
market (`odds:{sport}:{league}:{market}`, the top leagues, whose markets are
followed by many players) and which per league (`odds:{sport}:{league}`, the
long tail, where one channel per market would cost more than it saves).
A string the map does not accept is not a topic, and the gateway never asks
Redis about it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

TOPIC_PREFIX = "odds"
STATS_PREFIX = "stats:"  # a partner's statistics (PROTOCOL.md §12): `stats:{partner}`
PARTNER_ID_MAX = 32
MAX_ID_DIGITS = 12  # ids are decimal integers; bound them so no topic is huge

DEFAULT_PARTITION_MAP: dict = {
    "version": 1,
    "sports": {
        # sport id -> name and its market-level (top) leagues
        "1": {"name": "football", "market_level": [2, 3, 39, 61, 78, 135, 140]},
        "2": {"name": "basketball", "market_level": [12, 120]},
        "3": {"name": "tennis", "market_level": [1, 2]},
        "4": {"name": "ice-hockey", "market_level": [57]},
        "5": {"name": "baseball", "market_level": []},
    },
    # markets that keep their subscriptions open while the node sheds load
    "high_value": ["odds:1:2:1", "odds:1:39:1"],
}


def _parse_id(text: str) -> int | None:
    """A canonical decimal id: digits only, no sign, no leading zero."""
    if not text or len(text) > MAX_ID_DIGITS or not text.isdigit() or not text.isascii():
        return None
    if len(text) > 1 and text[0] == "0":
        return None
    return int(text)


@dataclass(frozen=True, slots=True)
class Topic:
    sport: int
    league: int
    market: int | None  # None for a league-level topic

    @property
    def name(self) -> str:
        if self.market is None:
            return f"{TOPIC_PREFIX}:{self.sport}:{self.league}"
        return f"{TOPIC_PREFIX}:{self.sport}:{self.league}:{self.market}"


def parse_topic(text: str) -> Topic | None:
    """Split a topic string by the grammar alone (the map decides validity)."""
    if not isinstance(text, str) or len(text) > 64:
        return None
    parts = text.split(":")
    if len(parts) not in (3, 4) or parts[0] != TOPIC_PREFIX:
        return None
    ids = [_parse_id(p) for p in parts[1:]]
    if any(i is None for i in ids):
        return None
    market = ids[2] if len(ids) == 3 else None
    return Topic(ids[0], ids[1], market)  # type: ignore[arg-type]


def is_partner_id(text: object) -> bool:
    """A partner id as tokens and topics carry it: 1-32 of [A-Za-z0-9_-]."""
    return (isinstance(text, str) and 0 < len(text) <= PARTNER_ID_MAX and text.isascii()
            and all(c.isalnum() or c in "_-" for c in text))


def stats_partner(text: str) -> str | None:
    """The partner of a `stats:{partner}` topic, or None if `text` is not one."""
    if not isinstance(text, str) or not text.startswith(STATS_PREFIX):
        return None
    partner = text[len(STATS_PREFIX):]
    return partner if is_partner_id(partner) else None


def is_stats_topic(text: str) -> bool:
    return stats_partner(text) is not None


def stats_topic(partner: str) -> str:
    if not is_partner_id(partner):
        raise ValueError(f"partner id {partner!r}: expected 1-{PARTNER_ID_MAX} of [A-Za-z0-9_-]")
    return STATS_PREFIX + partner


def market_key(sport: int, league: int, market: int) -> str:
    """The `market` field of an event: `sport:league:market`."""
    return f"{sport}:{league}:{market}"


def topic_for_market(pmap: PartitionMap, sport: int, league: int, market: int) -> str:
    """The topic an event of this market is published on."""
    if pmap.is_market_level(sport, league):
        return f"{TOPIC_PREFIX}:{sport}:{league}:{market}"
    return f"{TOPIC_PREFIX}:{sport}:{league}"


@dataclass(frozen=True)
class PartitionMap:
    sports: dict[int, str]
    market_level: frozenset[tuple[int, int]]
    high_value: frozenset[str] = field(default_factory=frozenset)
    version: int = 1

    @classmethod
    def from_dict(cls, data: object) -> PartitionMap:
        """Build and check a map; any shape error is a ValueError naming the place."""
        if not isinstance(data, dict):
            raise ValueError("partition map: expected a JSON object")
        if not data.get("sports"):
            raise ValueError("partition map: no sports")
        if not isinstance(data["sports"], dict):
            raise ValueError("partition map: `sports` must be an object of sport id -> spec")
        sports: dict[int, str] = {}
        market_level: set[tuple[int, int]] = set()
        for sid, spec in data["sports"].items():
            sport = _parse_id(str(sid))
            if sport is None:
                raise ValueError(f"partition map: bad sport id {sid!r}")
            if not isinstance(spec, dict):
                raise ValueError(f"partition map: sport {sid} must be an object")
            sports[sport] = str(spec.get("name", sid))
            leagues = spec.get("market_level", [])
            if not isinstance(leagues, list):
                raise ValueError(f"partition map: market_level of sport {sid} must be a list")
            for league in leagues:
                parsed = _parse_id(str(league)) if type(league) is int else None
                if parsed is None:
                    raise ValueError(f"partition map: bad league id {league!r} in sport {sid}")
                market_level.add((sport, parsed))
        if not sports:
            raise ValueError("partition map: no sports")
        high_value = data.get("high_value", [])
        if not isinstance(high_value, list) or not all(isinstance(t, str) for t in high_value):
            raise ValueError("partition map: high_value must be a list of topics")
        version = data.get("version", 1)
        if type(version) is not int:
            raise ValueError("partition map: version must be an integer")
        pmap = cls(sports, frozenset(market_level), frozenset(), version)
        for topic in high_value:
            if not pmap.is_topic(topic):
                raise ValueError(f"partition map: high-value {topic!r} is not a topic")
        return cls(pmap.sports, pmap.market_level, frozenset(high_value), pmap.version)

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> PartitionMap:
        """The map from a JSON file, or the built-in default when no path is set."""
        if not path:
            return cls.from_dict(DEFAULT_PARTITION_MAP)
        return cls.from_dict(json.loads(Path(path).read_text()))

    def is_market_level(self, sport: int, league: int) -> bool:
        return (sport, league) in self.market_level

    def validate(self, text: str) -> Topic | None:
        """The parsed topic if the map accepts it, else None."""
        topic = parse_topic(text)
        if topic is None or topic.sport not in self.sports:
            return None
        if (topic.market is not None) != self.is_market_level(topic.sport, topic.league):
            return None
        return topic

    def is_topic(self, text: str) -> bool:
        """An odds topic the map accepts, or any partner's `stats:` topic (who may
        follow which is the grant rule's to say, gateway.auth.topic_granted)."""
        return self.validate(text) is not None or is_stats_topic(text)

    def to_dict(self) -> dict:
        """What `GET /v1/topics` serves."""
        return {
            "version": self.version,
            "patterns": {
                "market_level": f"{TOPIC_PREFIX}:{{sport_id}}:{{league_id}}:{{market_id}}",
                "league_level": f"{TOPIC_PREFIX}:{{sport_id}}:{{league_id}}",
                "partner_stats": f"{STATS_PREFIX}{{partner_id}}",
            },
            "sports": [
                {
                    "id": sport,
                    "name": name,
                    "market_level_leagues": sorted(
                        league for s, league in self.market_level if s == sport
                    ),
                }
                for sport, name in sorted(self.sports.items())
            ],
            "high_value": sorted(self.high_value),
        }
