"""A compact latency histogram: log-linear buckets over microseconds.

Values below 64 us get a bucket each; above, every power of two is split in
32 equal buckets, so a reported percentile is within about 3% of the true
value (it reports the bucket's upper bound: never optimistic). The maximum is
kept exactly. Merging is adding counts, so each load-generator process keeps
its own and the orchestrator sums them.

`bucket_of` is written out where it is hot (the load generator's event
path); keep the two in step.
"""

from __future__ import annotations

LINEAR = 64
SUB_BITS = 5  # 32 buckets per power of two
BUCKETS = LINEAR + (64 - 6) * 32 + 32  # up to 2**64 us


def bucket_of(us: int) -> int:
    if us < LINEAR:
        return us if us > 0 else 0
    shift = us.bit_length() - 6
    return (shift << SUB_BITS) + (us >> shift)


def bucket_upper(index: int) -> int:
    """The largest value (us) that lands in bucket `index`."""
    if index < LINEAR:
        return index
    shift = (index >> SUB_BITS) - 1
    mantissa = index - (shift << SUB_BITS)
    return ((mantissa + 1) << shift) - 1


class Histogram:
    __slots__ = ("counts", "max_us")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.max_us = 0

    def record(self, us: int) -> None:
        if us < LINEAR:
            self.counts[us if us > 0 else 0] += 1
        else:
            shift = us.bit_length() - 6
            self.counts[(shift << SUB_BITS) + (us >> shift)] += 1
            if us > self.max_us:
                self.max_us = us

    @property
    def count(self) -> int:
        return sum(self.counts)

    def clear(self) -> None:
        self.counts = [0] * BUCKETS
        self.max_us = 0

    def merge(self, other: Histogram) -> None:
        counts = self.counts
        for i, c in enumerate(other.counts):
            if c:
                counts[i] += c
        self.max_us = max(self.max_us, other.max_us)

    def percentile_us(self, q: float) -> int | None:
        """The value at quantile `q` (0..1), None when empty."""
        total = self.count
        if total == 0:
            return None
        rank = max(1, int(q * total + 0.999999))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                top = bucket_upper(i)
                if i >= LINEAR:
                    return min(top, self.max_us)
                return top
        return self.max_us

    def observed_max_us(self) -> int | None:
        if self.count == 0:
            return None
        if self.max_us:
            return self.max_us
        return max(i for i, c in enumerate(self.counts) if c)

    def summary_ms(self) -> dict[str, float | int | None]:
        def ms(us: int | None) -> float | None:
            return None if us is None else round(us / 1000, 3)

        return {
            "count": self.count,
            "p50_ms": ms(self.percentile_us(0.50)),
            "p99_ms": ms(self.percentile_us(0.99)),
            "p999_ms": ms(self.percentile_us(0.999)),
            "max_ms": ms(self.observed_max_us()),
        }

    def to_sparse(self) -> dict:
        return {"max_us": self.max_us,
                "counts": {i: c for i, c in enumerate(self.counts) if c}}

    @classmethod
    def from_sparse(cls, data: dict) -> Histogram:
        hist = cls()
        hist.max_us = int(data.get("max_us", 0))
        for i, c in data.get("counts", {}).items():
            hist.counts[int(i)] += int(c)
        return hist
