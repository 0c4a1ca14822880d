"""The price update an aggregator hands to the publisher, and its checks.

Validation happens here, before Redis, because a bad event that reaches the
channel reaches every player of the topic: prices must be decimal strings,
status one of three words, and the market must belong to the topic.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import orjson

from gateway.topics import PartitionMap

STATUSES = frozenset({"open", "suspended", "closed"})
_DECIMAL = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")
_ID = r"(?:0|[1-9][0-9]{0,11})"
_MARKET = re.compile(rf"{_ID}:{_ID}:{_ID}")
_OUTCOME = re.compile(r"[A-Za-z0-9_.+\-]{1,32}")


class InvalidEvent(ValueError):
    """An update the publisher refuses; the message says which field and why."""


@dataclass(slots=True)
class PriceUpdate:
    topic: str
    market: str
    event_id: str
    prices: dict[str, str]
    status: str = "open"
    ts: int = field(default=0)  # Unix ns; 0 means "now", set when published

    def validate(self, pmap: PartitionMap) -> None:
        topic = pmap.validate(self.topic)
        if topic is None:
            raise InvalidEvent(f"topic {self.topic!r} is not a topic of the partition map")
        if not isinstance(self.market, str) or not _MARKET.fullmatch(self.market):
            raise InvalidEvent(f"market {self.market!r} is not 'sport:league:market'")
        sport, league, market = (int(x) for x in self.market.split(":"))
        if (sport, league) != (topic.sport, topic.league) or (
            topic.market is not None and topic.market != market
        ):
            raise InvalidEvent(f"market {self.market} does not belong to topic {self.topic}")
        if not isinstance(self.event_id, str) or not 0 < len(self.event_id) <= 64:
            raise InvalidEvent("event_id must be a string of 1 to 64 characters")
        if not isinstance(self.status, str) or self.status not in STATUSES:
            raise InvalidEvent(f"status {self.status!r} is not one of {sorted(STATUSES)}")
        if not isinstance(self.prices, dict) or len(self.prices) > 64:
            raise InvalidEvent("prices must be an object of at most 64 outcomes")
        for outcome, price in self.prices.items():
            if not isinstance(outcome, str) or not _OUTCOME.fullmatch(outcome):
                raise InvalidEvent(f"outcome name {outcome!r} is not allowed")
            if not isinstance(price, str) or not _DECIMAL.fullmatch(price):
                raise InvalidEvent(f"price {outcome}={price!r} is not a decimal string")
        if type(self.ts) is not int or self.ts < 0:
            raise InvalidEvent("ts must be Unix nanoseconds")

    def body(self) -> bytes:
        """The event JSON after the fields the publish script fills in.

        The script prefixes `{"type":"odds","topic":..,"epoch":..,"seq":N,`;
        this is the rest, its leading brace removed.
        """
        ts = self.ts or time.time_ns()
        return orjson.dumps(
            {
                "market": self.market,
                "event_id": self.event_id,
                "ts": ts,
                "status": self.status,
                "prices": self.prices,
            }
        )[1:]

