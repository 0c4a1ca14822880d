"""oddsgate's Python client: the player connection and the §5 rule checker.

A package of its own, beside `gateway/` rather than inside it, because the
gateway must never depend on its client: only the tests, the bench and the
demo use it, and the client speaks nothing but the wire (PROTOCOL.md), so it
could be shipped to bots and partners without the server.

- `client.odds`: `OddsClient`, one player connection resumed across
  disconnects and, given several region URLs, across regions (PROTOCOL.md
  §8), and its pure helpers (`backoff_delay`, `connection_target`,
  `close_info`, `moves_region`, `RegionRing`).
- `client.rules`: `RuleChecker` (PROTOCOL.md §5 as a client sees it, and the
  state a resume starts from) and `verify_coalescing` (rule 3 against the
  whole published stream, for tests).
"""

from client.odds import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    REGION_DRAIN,
    ClientClosed,
    ClientStats,
    CloseInfo,
    Disconnected,
    OddsClient,
    RegionRing,
    RequestError,
    SubscribeResult,
    backoff_delay,
    close_info,
    connection_target,
    moves_region,
)
from client.rules import RuleChecker, TopicState, Violation, verify_coalescing

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "REGION_DRAIN",
    "ClientClosed",
    "ClientStats",
    "CloseInfo",
    "Disconnected",
    "OddsClient",
    "RegionRing",
    "RequestError",
    "RuleChecker",
    "SubscribeResult",
    "TopicState",
    "Violation",
    "backoff_delay",
    "close_info",
    "connection_target",
    "moves_region",
    "verify_coalescing",
]
