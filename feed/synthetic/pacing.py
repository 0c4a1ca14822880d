"""The synthetic feed published at a pace: a rate, a tick, and an optional spike.

Every tick (10 ms) the feed publishes the updates that fell due since the
last one in one `Publisher.publish_many` call. What falls due is tracked as
credit (rate x elapsed), not by sleeping a fixed amount per event, so the
long-run rate stays accurate however long a round trip takes. After an outage
the credit is capped at one second of events, so a restarted Redis is not
flooded.

A spike replays the moment that hurts a fan-out most: one popular match (a
red card) suddenly updating fifty times faster. Which updates the feed
publishes is the model's (model.py) and depends only on the seed; how many
spike updates fall between two normal ones depends on the clock.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.exceptions

from feed.publisher import Publisher
from feed.synthetic.model import (
    CLOSE_PROBABILITY,
    DEFAULT_MARKETS_PER_LEAGUE,
    DEFAULT_TAIL_LEAGUES,
    SUSPEND_PROBABILITY,
    ZIPF_EXPONENT,
    MarketModel,
)
from gateway.topics import PartitionMap

DEFAULT_RATE = 1000.0
DEFAULT_TICK_S = 0.010
DEFAULT_MAX_BATCH = 10_000
MAX_BACKLOG_S = 1.0
# Spike defaults as plain constants: the argparse defaults read them, and a
# slotted dataclass's class attributes are member descriptors, not the values.
SPIKE_FACTOR = 50.0
SPIKE_AFTER_S = 10.0
SPIKE_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Spike:
    """One match updating `factor` times faster from `after` s into the run, for `seconds` s."""

    factor: float = SPIKE_FACTOR
    after: float = SPIKE_AFTER_S
    seconds: float = SPIKE_SECONDS

    def active(self, elapsed: float) -> bool:
        return self.after <= elapsed < self.after + self.seconds


@dataclass(slots=True)
class FeedReport:
    """One second of the feed, for the operator watching a benchmark."""

    elapsed_s: float
    published_total: int
    published_interval: int
    rate: float  # events/s over the interval
    rtt_p50_ms: float | None  # round trip of one publish_many, None if no batch
    rtt_max_ms: float | None
    batches: int
    errors_total: int
    spiking: bool

    def line(self) -> str:
        rtt = (
            f"rtt p50={self.rtt_p50_ms:.2f}ms max={self.rtt_max_ms:.2f}ms"
            if self.rtt_p50_ms is not None and self.rtt_max_ms is not None
            else "rtt -"
        )
        spike = " SPIKE" if self.spiking else ""
        return (
            f"feed t={self.elapsed_s:.1f}s published={self.published_total} "
            f"rate={self.rate:.0f}/s batches={self.batches} {rtt} "
            f"errors={self.errors_total}{spike}"
        )


@dataclass(slots=True)
class FeedResult:
    published: int
    spike_published: int
    errors: int
    seconds: float


@dataclass(slots=True)
class _Interval:
    started: float
    published: int = 0
    batches: int = 0
    rtts: list[float] = field(default_factory=list)


class SyntheticFeed(MarketModel):
    """The model's updates published at `rate`; `run()` paces them, `take()` only generates.

    `rate` may be changed while `run()` goes on (the bench does): the next
    tick's credit uses the new one.
    """

    def __init__(
        self,
        publisher: Publisher | None,
        pmap: PartitionMap,
        *,
        seed: int = 1,
        rate: float = DEFAULT_RATE,
        markets_per_league: int = DEFAULT_MARKETS_PER_LEAGUE,
        tail_leagues: int = DEFAULT_TAIL_LEAGUES,
        spike: Spike | bool | None = None,
        zipf_exponent: float = ZIPF_EXPONENT,
        close_probability: float = CLOSE_PROBABILITY,
        suspend_probability: float = SUSPEND_PROBABILITY,
        tick: float = DEFAULT_TICK_S,
        max_batch: int = DEFAULT_MAX_BATCH,
        on_report: Callable[[FeedReport], None] | None = None,
    ) -> None:
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a positive number, not {rate!r}")
        if not 0 < tick <= 1:
            raise ValueError("tick must be in (0, 1] seconds")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        super().__init__(
            pmap,
            seed=seed,
            markets_per_league=markets_per_league,
            tail_leagues=tail_leagues,
            zipf_exponent=zipf_exponent,
            close_probability=close_probability,
            suspend_probability=suspend_probability,
        )
        self.publisher = publisher
        self.rate = float(rate)
        self.spike: Spike | None = Spike() if spike is True else (spike or None)
        self.tick = tick
        self.max_batch = max_batch
        self.on_report = on_report
        self._stopping = False

    def stop(self) -> None:
        """Ask `run()` to return after the batch in flight; safe from a signal handler.

        A stop that arrives before `run()` starts (a signal during start-up) is kept,
        and that run returns at once.
        """
        self._stopping = True

    async def publish_opening_prices(self) -> int:
        """Publish every market's opening price, in batches of `max_batch`, before players
        follow them (a topic followed before its first publish moves its players to its
        first epoch with a `reset`). Returns how many were published."""
        if self.publisher is None:
            raise RuntimeError("publish_opening_prices() needs a Publisher")
        updates = self.opening_prices()
        for i in range(0, len(updates), self.max_batch):
            await self.publisher.publish_many(updates[i : i + self.max_batch])
        return len(updates)

    async def run(self, duration: float | None = None, count: int | None = None) -> FeedResult:
        """Publish at the configured rate until `duration` s, `count` events, or `stop()`."""
        if self.publisher is None:
            raise RuntimeError("run() needs a Publisher; take() works without one")
        if duration is not None and duration < 0:
            raise ValueError("duration must be at least 0")
        if count is not None and count < 0:
            raise ValueError("count must be at least 0")
        clock = time.monotonic
        start = last = clock()
        spike = self.spike
        spike_extra_rate = (
            self.rate * self.spike_market.share * max(spike.factor - 1.0, 0.0) if spike else 0.0
        )
        credit = spike_credit = 0.0
        published = spike_published = errors = 0
        interval = _Interval(started=start)
        next_tick = start + self.tick
        while not self._stopping:
            now = clock()
            done = duration is not None and now - start >= duration
            if done:
                now = start + duration  # type: ignore[operator]
            dt = max(now - last, 0.0)
            last = now
            credit = min(credit + self.rate * dt, self.rate * MAX_BACKLOG_S + 1.0)
            spiking = spike is not None and spike.active(now - start)
            if spiking:
                spike_credit = min(
                    spike_credit + spike_extra_rate * dt, spike_extra_rate * MAX_BACKLOG_S + 1.0
                )
            else:
                spike_credit = 0.0
            due = int(credit)
            spike_due = int(spike_credit)
            room = self.max_batch
            if count is not None:
                room = min(room, count - published)
            due = min(due, room)
            spike_due = min(spike_due, room - due)
            if due or spike_due:
                credit -= due
                spike_credit -= spike_due
                batch = self.take(due)
                if not batch and not self.open_markets:
                    break  # every market closed: nothing left to publish
                batch += self.take_spike(spike_due)
                sent = time.perf_counter()
                try:
                    await self.publisher.publish_many(batch)
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                    # Redis went away (a restart, a test killing it): these events
                    # are dropped, not queued; the next ones supersede them anyway.
                    errors += 1
                else:
                    interval.rtts.append(time.perf_counter() - sent)
                    interval.batches += 1
                    interval.published += len(batch)
                    published += len(batch)
                    spike_published += spike_due
            if done or (count is not None and published >= count):
                break
            now = clock()
            if self.on_report is not None and now - interval.started >= 1.0:
                self._report(interval, now, start, published, errors, spiking)
                interval = _Interval(started=now)
            next_tick += self.tick
            if next_tick < now:
                next_tick = now + self.tick  # fell behind: credit catches up, ticks need not
            await asyncio.sleep(next_tick - now)
        self._stopping = False  # a stop() that came before this run() ended it at once
        end = clock()
        if self.on_report is not None and interval.published:
            self._report(interval, end, start, published, errors, False)
        return FeedResult(published, spike_published, errors, end - start)

    def _report(
        self,
        interval: _Interval,
        now: float,
        start: float,
        published: int,
        errors: int,
        spiking: bool,
    ) -> None:
        span = max(now - interval.started, 1e-9)
        rtts = interval.rtts
        assert self.on_report is not None
        self.on_report(
            FeedReport(
                elapsed_s=now - start,
                published_total=published,
                published_interval=interval.published,
                rate=interval.published / span,
                rtt_p50_ms=statistics.median(rtts) * 1000 if rtts else None,
                rtt_max_ms=max(rtts) * 1000 if rtts else None,
                batches=interval.batches,
                errors_total=errors,
                spiking=spiking,
            )
        )
