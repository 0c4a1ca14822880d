"""One circuit breaker per endpoint: a dead endpoint stops taking attempts, then is probed.

After `failures_to_open` failed attempts in a row the breaker opens: the
endpoint's due deliveries are pushed back to when it may be probed, costing
no attempt and no connection. After `open_s` one attempt (the probe) goes
through; its success closes the breaker, its failure opens it again for
another `open_s`. Each endpoint has its own, so a partner whose server is
down never holds the dispatcher's time away from the others.
"""

from __future__ import annotations

import enum


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class EndpointBreaker:
    def __init__(self, failures_to_open: int = 5, open_s: float = 30.0) -> None:
        self.failures_to_open = failures_to_open
        self.open_s = open_s
        self.state = BreakerState.CLOSED
        self.failures_in_row = 0
        self.opened_at = 0.0
        self.probe_in_flight = False

    def allow(self, now_s: float) -> bool:
        """May an attempt start now? In HALF_OPEN only one (the probe) at a time."""
        if self.state is BreakerState.OPEN:
            if now_s - self.opened_at < self.open_s:
                return False
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN:
            if self.probe_in_flight:
                return False
            self.probe_in_flight = True
        return True

    def retry_at(self, now_s: float) -> float:
        """When a delivery refused by `allow` should be tried again."""
        if self.state is BreakerState.OPEN:
            return self.opened_at + self.open_s
        return now_s + min(1.0, self.open_s)

    def record(self, success: bool, now_s: float) -> None:
        """The result of an attempt `allow` let through."""
        self.probe_in_flight = False
        if success:
            self.state = BreakerState.CLOSED
            self.failures_in_row = 0
            return
        self.failures_in_row += 1
        if self.state is BreakerState.HALF_OPEN or self.failures_in_row >= self.failures_to_open:
            self.state = BreakerState.OPEN
            self.opened_at = now_s
