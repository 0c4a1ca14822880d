"""The node's back-pressure circuit breaker (PROTOCOL.md §5).

When enough of the node's connections are in back-pressure, the node is
overloaded, and every new subscription adds fan-out to a crowd that already
cannot keep up: new subscriptions are shed (error `shed`, with
`retry_after_ms`) until the share falls back under a lower recovery mark.
Two marks, not one, so the breaker does not flap around its threshold.
"""

from __future__ import annotations


class Breaker:
    __slots__ = ("open", "recover_share", "share", "trip_share", "trips")

    def __init__(self, trip_share: float = 0.05, recover_share: float = 0.03) -> None:
        if not 0 <= recover_share <= trip_share:
            raise ValueError("the recovery share must be between 0 and the trip share")
        self.trip_share = trip_share
        self.recover_share = recover_share
        self.open = False
        self.trips = 0
        self.share = 0.0

    def update(self, share: float) -> bool:
        """Feed the node's current share; True when the breaker changed state."""
        self.share = share
        if not self.open and share >= self.trip_share and share > 0:
            self.open = True
            self.trips += 1
            return True
        if self.open and share < self.recover_share:
            self.open = False
            return True
        return False
