"""The node's back-pressure circuit breaker (PROTOCOL.md §5).

When enough of the node's connections are in back-pressure, the node is
overloaded, and every new subscription adds fan-out to a crowd that already
cannot keep up: new subscriptions are shed (error `shed`, with
`retry_after_ms`) until the share falls back under a lower recovery mark.
Two marks, not one, so the breaker does not flap around its threshold.

It counts players, not only their share: with few players on a node, one
connection that stops reading (or a client that floods pings and never reads
the pongs) was a third of the node and shed every newcomer. The breaker trips
only when at least `min_players` players are in back-pressure as well.
"""

from __future__ import annotations

import math


class Breaker:
    __slots__ = ("min_players", "open", "recover_players", "recover_share", "share",
                 "trip_share", "trips")

    def __init__(self, trip_share: float = 0.05, recover_share: float = 0.03,
                 min_players: int = 10) -> None:
        if not 0 <= recover_share <= trip_share:
            raise ValueError("the recovery share must be between 0 and the trip share")
        self.trip_share = trip_share
        self.recover_share = recover_share
        self.min_players = max(1, min_players)
        # The count recovers like the share: below the same fraction of its mark.
        ratio = recover_share / trip_share if trip_share > 0 else 1.0
        self.recover_players = max(1, math.ceil(self.min_players * ratio))
        self.open = False
        self.trips = 0
        self.share = 0.0

    def update(self, pressured: int, players: int) -> bool:
        """Feed the node's players in back-pressure and all its players; True when the
        breaker changed state."""
        share = pressured / players if players > 0 else 0.0
        self.share = share
        if not self.open and share >= self.trip_share and pressured >= self.min_players:
            self.open = True
            self.trips += 1
            return True
        if self.open and (share < self.recover_share or pressured < self.recover_players):
            self.open = False
            return True
        return False
