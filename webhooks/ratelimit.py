"""Per-endpoint rate limit: a token bucket, so a partner's server gets at most `rate_per_s`
requests a second (bursts of `burst`), however many conversions arrive at once."""

from __future__ import annotations


class TokenBucket:
    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.updated_s: float | None = None

    def wait_s(self, now_s: float) -> float:
        """0 and a token taken if one is there; else the seconds until one will be."""
        if self.rate_per_s <= 0:
            return 0.0
        if self.updated_s is not None:
            self.tokens = min(self.burst, self.tokens + (now_s - self.updated_s) * self.rate_per_s)
        self.updated_s = now_s
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate_per_s
