"""A synthetic odds feed: deterministic from a seed, paced, bounded.

It exists so the gateway can be tested and benchmarked against a feed whose
shape resembles the real one: a few markets take most of the traffic (Zipf
popularity), the top leagues are market-level topics and the long tail is
league-level (the partition map decides), prices walk in small steps, markets
get suspended and reopened, and now and then one closes for good. `--spike`
replays the moment that hurts a fan-out most: one popular match (a red card)
suddenly updating fifty times faster.

Determinism: the universe and the sequence of updates (which market, what
status, which prices) depend only on the seed and the options, never on
timing, so two runs with one seed publish the same events in the same order.
Spike events are the exception: how many of them fall between two normal
events depends on the clock.

Pacing: every tick (10 ms) the feed publishes the events that fell due since
the last one in one `Publisher.publish_many` call. What falls due is tracked as
credit (rate x elapsed), not by sleeping a fixed amount per event, so the long
run rate stays accurate however long a round trip takes. After an outage the
credit is capped at one second of events, so a restarted Redis is not flooded.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import math
import os
import random
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import redis.exceptions
import uvloop

from feed.events import PriceUpdate
from feed.publisher import DEFAULT_HISTORY_MS, MIN_HISTORY_MS, Publisher
from gateway.topics import PartitionMap, market_key, topic_for_market

DEFAULT_RATE = 1000.0
DEFAULT_MARKETS_PER_LEAGUE = 20
DEFAULT_TAIL_LEAGUES = 10
DEFAULT_TICK_S = 0.010
DEFAULT_MAX_BATCH = 10_000
ZIPF_EXPONENT = 1.1
TAIL_LEAGUE_BASE = 1000  # tail league ids start here, skipping any the map lists
MARGIN = 1.05  # bookmaker overround: implied probabilities sum to this
SUSPEND_PROBABILITY = 0.01  # per update of an open market
CLOSE_PROBABILITY = 2e-6  # per update; the most popular market lives minutes at 10k/s
MAX_BACKLOG_S = 1.0
# Spike defaults as plain constants: the argparse defaults read them, and a
# slotted dataclass's class attributes are member descriptors, not the values.
SPIKE_FACTOR = 50.0
SPIKE_AFTER_S = 10.0
SPIKE_SECONDS = 30.0
REDIS_URL_ENV = "OG_REDIS_URL"


@dataclass(frozen=True, slots=True)
class Spike:
    """One match updating `factor` times faster from `after` s into the run, for `seconds` s."""

    factor: float = SPIKE_FACTOR
    after: float = SPIKE_AFTER_S
    seconds: float = SPIKE_SECONDS

    def active(self, elapsed: float) -> bool:
        return self.after <= elapsed < self.after + self.seconds


@dataclass(frozen=True, slots=True)
class SyntheticMarket:
    sport: int
    league: int
    market: int
    topic: str
    market_key: str  # the event's `market` field, "sport:league:market"
    event_id: str
    outcomes: tuple[str, ...]
    market_level: bool
    rank: int  # 0 = most popular
    share: float  # of the normal (non-spike) rate


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
class _MarketState:
    info: SyntheticMarket
    probabilities: list[float]
    status: str = "open"
    updates: int = 0


@dataclass(slots=True)
class _Interval:
    started: float
    published: int = 0
    batches: int = 0
    rtts: list[float] = field(default_factory=list)


def _zipf_weights(n: int, exponent: float) -> list[float]:
    return [1.0 / (rank + 1) ** exponent for rank in range(n)]


def _price(probability: float) -> str:
    """Decimal odds with two decimals, as a string: floats never reach the wire."""
    cents = min(max(round(100.0 / probability), 101), 100_000)
    return f"{cents // 100}.{cents % 100:02d}"


class SyntheticFeed:
    """Generates and publishes the feed; `run()` paces it, `take()` only generates."""

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
        if markets_per_league < 1:
            raise ValueError("markets_per_league must be at least 1")
        if tail_leagues < 0:
            raise ValueError("tail_leagues must be at least 0")
        if not 0 < tick <= 1:
            raise ValueError("tick must be in (0, 1] seconds")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.publisher = publisher
        self.pmap = pmap
        self.seed = seed
        self.rate = float(rate)
        self.spike: Spike | None = Spike() if spike is True else (spike or None)
        self.close_probability = close_probability
        self.suspend_probability = suspend_probability
        self.tick = tick
        self.max_batch = max_batch
        self.on_report = on_report
        self._stopping = False

        universe_rng = random.Random(seed)
        self._markets = self._build_universe(
            universe_rng, markets_per_league, tail_leagues, zipf_exponent
        )
        self._rng = random.Random(universe_rng.getrandbits(64))  # the update stream
        self._states = {
            m.market_key: _MarketState(m, self._initial_probabilities(universe_rng, m))
            for m in self._markets
        }
        self._by_popularity = sorted(self._markets, key=lambda m: m.rank)
        self.spike_market: SyntheticMarket = next(
            (m for m in self._by_popularity if m.market_level), self._by_popularity[0]
        )
        self._rebuild_sampler()

    # -- the universe --------------------------------------------------------

    def _build_universe(
        self, rng: random.Random, per_league: int, tail_leagues: int, exponent: float
    ) -> list[SyntheticMarket]:
        slots: list[tuple[int, int, int, bool]] = []
        for sport in sorted(self.pmap.sports):
            top = sorted(league for s, league in self.pmap.market_level if s == sport)
            taken = set(top)
            tail = self._tail_ids(taken, tail_leagues)
            for league in top + tail:
                for market in range(1, per_league + 1):
                    slots.append((sport, league, market, league in taken))
        if not slots:
            raise ValueError("the partition map yields no markets")
        # Popularity: a shuffled Zipf ranking in which the top (market-level)
        # leagues tend to rank high, as they do in life, without owning every rank.
        keys = [rng.random() * (0.25 if top else 1.0) for *_, top in slots]
        order = sorted(range(len(slots)), key=keys.__getitem__)
        weights = _zipf_weights(len(slots), exponent)
        total = sum(weights)
        rank_of = {index: rank for rank, index in enumerate(order)}
        markets = []
        for index, (sport, league, market, top) in enumerate(slots):
            rank = rank_of[index]
            football = self.pmap.sports[sport].lower() in ("football", "soccer")
            markets.append(
                SyntheticMarket(
                    sport=sport,
                    league=league,
                    market=market,
                    topic=topic_for_market(self.pmap, sport, league, market),
                    market_key=market_key(sport, league, market),
                    event_id=f"m-{sport}-{league}-{market}",
                    outcomes=("home", "draw", "away") if football else ("home", "away"),
                    market_level=top,
                    rank=rank,
                    share=weights[rank] / total,
                )
            )
        return markets

    @staticmethod
    def _tail_ids(taken: set[int], count: int) -> list[int]:
        ids: list[int] = []
        league = TAIL_LEAGUE_BASE
        while len(ids) < count:
            if league not in taken:
                ids.append(league)
            league += 1
        return ids

    @staticmethod
    def _initial_probabilities(rng: random.Random, market: SyntheticMarket) -> list[float]:
        raw = [rng.uniform(0.5, 2.0) for _ in market.outcomes]
        scale = MARGIN / sum(raw)
        return [p * scale for p in raw]

    def universe(self) -> list[SyntheticMarket]:
        """Every market, in (sport, league, market) order, so callers can pick topics."""
        return list(self._markets)

    def topics(self) -> list[str]:
        return sorted({m.topic for m in self._markets})

    def topic_shares(self) -> dict[str, float]:
        """Each topic's share of the normal rate: a league-level topic sums its markets'."""
        share: dict[str, float] = {}
        for m in self._markets:
            share[m.topic] = share.get(m.topic, 0.0) + m.share
        return share

    def topics_by_popularity(self) -> list[str]:
        """Topics, busiest first, so a benchmark can follow the hot ones or the tail."""
        share = self.topic_shares()
        return sorted(share, key=lambda t: (-share[t], t))

    # -- the update stream ---------------------------------------------------

    def _rebuild_sampler(self) -> None:
        self._active = [
            m for m in self._by_popularity if self._states[m.market_key].status != "closed"
        ]
        self._cum_weights = list(itertools.accumulate(m.share for m in self._active))

    def _pick(self) -> SyntheticMarket:
        total = self._cum_weights[-1]
        index = bisect.bisect_right(self._cum_weights, self._rng.random() * total)
        return self._active[min(index, len(self._active) - 1)]

    def _update(self, market: SyntheticMarket) -> PriceUpdate:
        """The market's next state: a reopen, a suspension, a close, or a price step."""
        state = self._states[market.market_key]
        rng = self._rng
        state.updates += 1
        if state.status == "suspended":
            state.status = "open"
            self._walk(state, sigma=0.15)  # news moved the price while it was suspended
        elif market is not self.spike_market and rng.random() < self.close_probability:
            state.status = "closed"
            self._rebuild_sampler()
        elif rng.random() < self.suspend_probability:
            state.status = "suspended"
        else:
            self._walk(state, sigma=0.03)
        return self._state_of(market)

    def _state_of(self, market: SyntheticMarket) -> PriceUpdate:
        state = self._states[market.market_key]
        return PriceUpdate(
            topic=market.topic,
            market=market.market_key,
            event_id=market.event_id,
            prices={
                o: _price(p) for o, p in zip(market.outcomes, state.probabilities, strict=True)
            },
            status=state.status,
        )

    def opening_prices(self) -> list[PriceUpdate]:
        """Every market's current state, without advancing the stream: what an
        aggregator publishes when it lists a market, before a player can follow it
        (a topic followed before its first publish moves its players to its first
        epoch with a `reset`)."""
        return [self._state_of(m) for m in self._markets]

    def _walk(self, state: _MarketState, sigma: float) -> None:
        probabilities = state.probabilities
        i = self._rng.randrange(len(probabilities))
        probabilities[i] = min(
            max(probabilities[i] * math.exp(self._rng.gauss(0.0, sigma)), 0.002), 0.99
        )
        scale = MARGIN / sum(probabilities)
        for j in range(len(probabilities)):
            probabilities[j] = min(max(probabilities[j] * scale, 0.001), 0.99)

    @property
    def open_markets(self) -> int:
        return len(self._active)

    def take(self, count: int) -> list[PriceUpdate]:
        """The next `count` normal updates, without publishing them (the stream advances)."""
        updates: list[PriceUpdate] = []
        for _ in range(count):
            if not self._active:
                break
            updates.append(self._update(self._pick()))
        return updates

    def _spike_updates(self, count: int) -> list[PriceUpdate]:
        return [self._update(self.spike_market) for _ in range(count)]

    # -- pacing --------------------------------------------------------------

    def stop(self) -> None:
        """Ask `run()` to return after the batch in flight; safe from a signal handler.

        A stop that arrives before `run()` starts (a signal during start-up) is kept,
        and that run returns at once.
        """
        self._stopping = True

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
                if not batch and not self._active:
                    break  # every market closed: nothing left to publish
                batch += self._spike_updates(spike_due)
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


# -- CLI -----------------------------------------------------------------------


def _number(kind: type, minimum: float, *, inclusive: bool) -> Callable[[str], float]:
    """An argparse type: a finite `kind` at least (or above) `minimum`."""
    noun = "an integer" if kind is int else "a number"
    bound = f"at least {minimum:g}" if inclusive else f"above {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not math.isfinite(value) or not (value >= minimum if inclusive else value > minimum):
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        return value

    return parse


_positive_float = _number(float, 0, inclusive=False)
_non_negative_float = _number(float, 0, inclusive=True)
_positive_int = _number(int, 1, inclusive=True)
_non_negative_int = _number(int, 0, inclusive=True)


def default_redis_url() -> str:
    """OG_REDIS_URL, else the socket of the node's embedded Redis.

    The path follows supervisor/runtime.py (OG_RUNTIME_DIR, else
    $XDG_RUNTIME_DIR/oddsgate, else /tmp/oddsgate-$UID, then redis/redis.sock),
    so a feed started beside a node finds its Redis with no flags.
    """
    url = os.environ.get(REDIS_URL_ENV, "")
    if url:
        return url
    if os.environ.get("OG_RUNTIME_DIR"):
        runtime = os.environ["OG_RUNTIME_DIR"]
    elif os.environ.get("XDG_RUNTIME_DIR"):
        runtime = os.path.join(os.environ["XDG_RUNTIME_DIR"], "oddsgate")
    else:
        runtime = f"/tmp/oddsgate-{os.getuid()}"
    return f"unix://{os.path.abspath(runtime)}/redis/redis.sock"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oddsgate feed",
        description="Publish a synthetic, seeded odds feed into Redis through the "
        "atomic publish contract, at a paced rate, until a duration or count is reached.",
    )
    parser.add_argument(
        "--redis-url",
        default=default_redis_url(),
        help=f"redis:// or unix:// URL (default: ${REDIS_URL_ENV}, else the embedded "
        "Redis's socket in the node's runtime dir)",
    )
    parser.add_argument("--rate", type=_positive_float, default=DEFAULT_RATE, help="events/s")
    parser.add_argument("--seed", type=int, default=1, help="the universe and stream seed")
    parser.add_argument("--duration", type=_positive_float, help="stop after this many seconds")
    parser.add_argument("--count", type=_positive_int, help="stop after this many events")
    parser.add_argument(
        "--spike", action="store_true", help="one popular match at x50 rate for a while"
    )
    parser.add_argument(
        "--spike-after", type=_non_negative_float, default=SPIKE_AFTER_S, help="s before the spike"
    )
    parser.add_argument(
        "--spike-seconds", type=_positive_float, default=SPIKE_SECONDS, help="spike length in s"
    )
    parser.add_argument(
        "--spike-factor", type=_positive_float, default=SPIKE_FACTOR, help=argparse.SUPPRESS
    )
    parser.add_argument("--partition-map", metavar="FILE", help="JSON partition map")
    parser.add_argument(
        "--history-seconds",
        type=_positive_float,
        default=DEFAULT_HISTORY_MS / 1000,
        help=f"history each topic keeps (at least {MIN_HISTORY_MS // 1000})",
    )
    parser.add_argument(
        "--markets-per-league", type=_positive_int, default=DEFAULT_MARKETS_PER_LEAGUE
    )
    parser.add_argument("--tail-leagues", type=_non_negative_int, default=DEFAULT_TAIL_LEAGUES)
    parser.add_argument("--quiet", action="store_true", help="no per-second report")
    return parser


def _print_report(report: FeedReport) -> None:
    print(report.line(), file=sys.stderr, flush=True)


async def _main_async(args: argparse.Namespace, pmap: PartitionMap) -> int:
    client = aioredis.Redis.from_url(
        args.redis_url, socket_connect_timeout=2.0, socket_timeout=10.0
    )
    try:
        try:
            await client.ping()
        except (redis.exceptions.RedisError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(
                f"oddsgate feed: cannot reach Redis at {args.redis_url}: {reason}",
                file=sys.stderr,
            )
            return 1
        publisher = Publisher(client, pmap, history_ms=int(args.history_seconds * 1000))
        spike = (
            Spike(factor=args.spike_factor, after=args.spike_after, seconds=args.spike_seconds)
            if args.spike
            else None
        )
        feed = SyntheticFeed(
            publisher,
            pmap,
            seed=args.seed,
            rate=args.rate,
            markets_per_league=args.markets_per_league,
            tail_leagues=args.tail_leagues,
            spike=spike,
            on_report=None if args.quiet else _print_report,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, feed.stop)
        if not args.quiet:
            print(
                f"oddsgate feed: {len(feed.universe())} markets on {len(feed.topics())} topics, "
                f"rate {args.rate:g}/s, seed {args.seed}"
                + (f", spike on {feed.spike_market.topic}" if spike else ""),
                file=sys.stderr,
                flush=True,
            )
        try:
            result = await feed.run(duration=args.duration, count=args.count)
        except redis.exceptions.RedisError as exc:
            print(f"oddsgate feed: Redis refused a publish: {exc}", file=sys.stderr)
            return 1
        if not args.quiet:
            print(
                f"oddsgate feed: done, {result.published} events in {result.seconds:.1f}s, "
                f"{result.errors} failed batches",
                file=sys.stderr,
            )
        return 0
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


def main(argv: list[str] | None = None) -> int:
    """`oddsgate feed`: exit 0 when done or stopped, 1 if Redis is unreachable, 2 on bad usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.history_seconds * 1000 < MIN_HISTORY_MS:
        parser.error(f"--history-seconds must be at least {MIN_HISTORY_MS // 1000}")
    try:
        pmap = PartitionMap.load(args.partition_map)
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        parser.error(f"--partition-map: {exc}")
    try:
        aioredis.Redis.from_url(args.redis_url)
    except ValueError as exc:
        parser.error(f"--redis-url: {exc}")
    try:
        return uvloop.run(_main_async(args, pmap))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
