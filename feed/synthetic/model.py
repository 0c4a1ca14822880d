"""The synthetic feed's markets and their update stream, with no clock and no Redis.

A few markets take most of the traffic (Zipf popularity), the top leagues
are market-level topics and the long tail is league-level (the partition map
decides), prices walk in small steps, markets get suspended and reopened,
and now and then one closes for good.

Determinism: the universe and the sequence of updates (which market, what
status, which prices) depend only on the seed and the options, so two models
with one seed yield the same updates in the same order. That is why this
part never looks at a clock: pacing (pacing.py) decides only *when* the next
updates are taken, never *which* they are.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass

from feed.events import PriceUpdate
from gateway.topics import PartitionMap, market_key, topic_for_market

DEFAULT_MARKETS_PER_LEAGUE = 20
DEFAULT_TAIL_LEAGUES = 10
ZIPF_EXPONENT = 1.1
TAIL_LEAGUE_BASE = 1000  # tail league ids start here, skipping any the map lists
MARGIN = 1.05  # bookmaker overround: implied probabilities sum to this
SUSPEND_PROBABILITY = 0.01  # per update of an open market
CLOSE_PROBABILITY = 2e-6  # per update; the most popular market lives minutes at 10k/s


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
class _MarketState:
    info: SyntheticMarket
    probabilities: list[float]
    status: str = "open"
    updates: int = 0


def _zipf_weights(n: int, exponent: float) -> list[float]:
    return [1.0 / (rank + 1) ** exponent for rank in range(n)]


def _price(probability: float) -> str:
    """Decimal odds with two decimals, as a string: floats never reach the wire."""
    cents = min(max(round(100.0 / probability), 101), 100_000)
    return f"{cents // 100}.{cents % 100:02d}"


class MarketModel:
    """The universe of markets and its seeded update stream; `take()` advances it.

    `spike_market` is the most popular market-level one: the market a spike
    replays at a multiple of its rate, which therefore never closes.
    """

    def __init__(
        self,
        pmap: PartitionMap,
        *,
        seed: int = 1,
        markets_per_league: int = DEFAULT_MARKETS_PER_LEAGUE,
        tail_leagues: int = DEFAULT_TAIL_LEAGUES,
        zipf_exponent: float = ZIPF_EXPONENT,
        close_probability: float = CLOSE_PROBABILITY,
        suspend_probability: float = SUSPEND_PROBABILITY,
    ) -> None:
        if markets_per_league < 1:
            raise ValueError("markets_per_league must be at least 1")
        if tail_leagues < 0:
            raise ValueError("tail_leagues must be at least 0")
        self.pmap = pmap
        self.seed = seed
        self.close_probability = close_probability
        self.suspend_probability = suspend_probability

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

    def take_spike(self, count: int) -> list[PriceUpdate]:
        """The next `count` updates of `spike_market` (the stream advances)."""
        return [self._update(self.spike_market) for _ in range(count)]
