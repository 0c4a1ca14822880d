"""Synthetic odds providers: a seeded truth per market, and providers that report it badly.

What the aggregator must survive is what real providers do, so each one here
has its own way of being wrong: noise around the true price, a delay (its
`pts` lags the truth by its delay plus jitter), outages (silent, heartbeats
included), stale stretches (heartbeats go on, some markets stop updating),
the occasional outlier (one wild value), suspending a market alone, and its
own quoting kind (decimal odds with its own margin, or probabilities). The
truth itself suspends markets now and then (every provider sees it, each
after its own delay) and closes them for good.

Determinism: the messages are a pure function of the seed, the configuration
and the asked window. Every random draw comes from a `random.Random` derived
from the seed and the name of what it drives (`"{seed}:provider:{name}:{market}"`),
never the global generator, never the wall clock; the arithmetic is integers
(probabilities in millionths) and `Decimal` in an explicit context, and only
`random()`, `randint()` and `randrange()` are used, which are exact on every
platform (no `gauss`/`exp`, whose last bit depends on the C library). So
`messages_between(a, b) + messages_between(b, c) == messages_between(a, c)`,
and a provider process that asks for the window up to "now" every 100 ms
sends exactly the messages a test generates offline.

How it runs: a simulation steps the truth every `tick_ms` of truth time from
`start_ns` and lets each provider observe it at that step, stamping what it
sends with its own clock (truth time + delay + jitter, never going down).
Windows are cut by `pts`; the simulation is advanced until every provider's
clock has passed the window's end (nothing sent later can be stamped
earlier), and a window that starts before what was kept restarts it from
`start_ns`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Context, Decimal

from aggregator.inputs import InvalidInput, ProviderMessage, validate

SCALE = 1_000_000  # probabilities are integers in millionths; they sum to SCALE
MIN_PROBABILITY = 20_000  # the truth never goes below 2 % or above 95 %
MAX_PROBABILITY = 950_000
MS = 1_000_000  # ns per ms

OUTCOMES: dict[str, tuple[str, ...]] = {
    "1x2": ("home", "draw", "away"),
    "ou": ("over", "under"),
}

_CONTEXT = Context(prec=28, rounding=ROUND_HALF_EVEN)  # never the thread's global context
_MIN_PRICE = Decimal("1.01")
_MAX_PRICE = Decimal("1000")
_ONE = Decimal(1)


@dataclass(frozen=True, slots=True)
class MarketSpec:
    """A market the providers quote: its key, its match, its type (which fixes its outcomes)."""

    market: str  # "sport:league:market"
    event_id: str
    market_type: str  # a key of OUTCOMES

    @property
    def sport(self) -> int:
        return int(self.market.split(":", 1)[0])

    @property
    def outcomes(self) -> tuple[str, ...]:
        return OUTCOMES[self.market_type]


@dataclass(frozen=True, slots=True)
class TruthConfig:
    """How the true probabilities move; times in ms of truth time.

    Defaults: a market moves about twice a second, suspends about every
    three minutes for 2-8 s (a goal, a VAR check) and lives 30-120 minutes.
    """

    tick_ms: int = 50  # the simulation step; providers observe the truth at it
    move_every_ms: int = 500  # mean time between two steps of a market's walk
    step_ppm: int = 8_000  # the largest step, in millionths of probability
    suspend_every_ms: int = 180_000  # mean time between market-wide suspensions
    suspend_ms: tuple[int, int] = (2_000, 8_000)
    close_after_ms: tuple[int, int] = (1_800_000, 7_200_000)  # from start_ns


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One provider's habits. Rates are mean intervals, per provider or per market, in ms.

    `sports` None covers every sport of the market list. `decimals` None
    means 2 for prices and 4 for probabilities. An `*_every_ms` of 0 turns
    that behaviour off.
    """

    name: str
    kind: str = "prices"  # "prices" (decimal odds with `margin`) or "probabilities"
    sports: frozenset[int] | None = None
    margin: str = "0.05"  # overround of its prices: implied probabilities sum to 1 + margin
    decimals: int | None = None
    delay_ms: int = 100  # how far its pts lags the truth, at least
    jitter_ms: int = 50  # plus 0..jitter_ms, drawn per step
    noise_ppm: int = 5_000  # each outcome off the truth by up to this, per update
    update_every_ms: int = 1_000  # mean time between two price updates of one market
    heartbeat_ms: int = 100
    outage_every_ms: int = 240_000  # per provider
    outage_ms: tuple[int, int] = (3_000, 15_000)
    stale_every_ms: int = 600_000  # per market
    stale_ms: tuple[int, int] = (5_000, 20_000)
    lone_suspend_every_ms: int = 900_000  # per market
    lone_suspend_ms: tuple[int, int] = (1_000, 6_000)
    outlier_every: int = 400  # one open quote in this many carries one wild value


def default_providers() -> list[ProviderConfig]:
    """Four providers, three on every sport and one football specialist; kinds alternate."""
    return [
        ProviderConfig("atlas", "prices", margin="0.05", delay_ms=40, jitter_ms=30,
                       noise_ppm=3_000, update_every_ms=700),
        ProviderConfig("beacon", "probabilities", delay_ms=150, jitter_ms=100,
                       noise_ppm=6_000, update_every_ms=1_200),
        ProviderConfig("cobalt", "prices", margin="0.08", delay_ms=300, jitter_ms=200,
                       noise_ppm=8_000, update_every_ms=2_000),
        ProviderConfig("dunmore", "probabilities", sports=frozenset({1}), delay_ms=80,
                       jitter_ms=40, noise_ppm=4_000, update_every_ms=900),
    ]


def default_markets() -> list[MarketSpec]:
    """A small board: football 1x2 and over/under, basketball and ice hockey totals."""
    return [
        MarketSpec("1:39:1", "m-1-39-1", "1x2"),
        MarketSpec("1:39:2", "m-1-39-1", "ou"),
        MarketSpec("1:140:1", "m-1-140-1", "1x2"),
        MarketSpec("2:12:1", "m-2-12-1", "ou"),
        MarketSpec("4:57:1", "m-4-57-1", "1x2"),
    ]


@dataclass(frozen=True, slots=True)
class Episode:
    """A behaviour that happened, for tests and demos; times are truth time in ns.

    kind: "outage", "stale", "lone_suspension", "outlier" (provider, market,
    the quote's pseq in `pseq`), "suspension" and "closure" (market-wide:
    provider "").
    """

    kind: str
    provider: str
    market: str
    start_ns: int
    end_ns: int
    pseq: int = 0


def _rate(tick_ms: int, every_ms: int) -> float:
    """The chance per step of something that happens every `every_ms` on average."""
    return tick_ms / every_ms if every_ms > 0 else 0.0


# -- the simulation -------------------------------------------------------------------


@dataclass(slots=True)
class _Truth:
    spec: MarketSpec
    rng: random.Random
    probabilities: list[int]
    close_at: int
    status: str = "open"
    suspended_until: int = 0


@dataclass(slots=True)
class _Quote:
    """One provider's view of one market."""

    truth: _Truth
    rng: random.Random
    sent_status: str | None = None
    closed: bool = False
    stale_until: int | None = None
    lone_until: int | None = None


@dataclass(slots=True)
class _Provider:
    config: ProviderConfig
    rng: random.Random
    quotes: list[_Quote]
    clock: int
    next_heartbeat: int
    pseq: int = 0
    outage_until: int | None = None
    fresh: bool = True  # just came up: send every market's state
    out: list[ProviderMessage] = field(default_factory=list)


class _Simulation:
    def __init__(self, owner: ProviderSet) -> None:
        self.owner = owner
        truth = owner.truth
        seed = owner.seed
        start = owner.start_ns
        self.time = start  # truth time of the next step
        self.episodes: list[Episode] = []
        self.truths: list[_Truth] = []
        for spec in owner.markets:
            rng = random.Random(f"{seed}:market:{spec.market}")
            weights = [rng.randint(2, 10) for _ in spec.outcomes]
            probabilities = [SCALE * w // sum(weights) for w in weights]
            probabilities[-1] += SCALE - sum(probabilities)
            low, high = truth.close_after_ms
            close_at = start + rng.randint(low, high) * MS
            self.truths.append(_Truth(spec, rng, probabilities, close_at))
        self.providers: list[_Provider] = []
        for config in owner.providers:
            quotes = [
                _Quote(t, random.Random(f"{seed}:provider:{config.name}:{t.spec.market}"))
                for t in self.truths
                if config.sports is None or t.spec.sport in config.sports
            ]
            self.providers.append(
                _Provider(config, random.Random(f"{seed}:provider:{config.name}"), quotes,
                          clock=start, next_heartbeat=start)
            )
        tick = truth.tick_ms
        self.tick_ns = tick * MS
        self.p_move = _rate(tick, truth.move_every_ms)
        self.p_suspend = _rate(tick, truth.suspend_every_ms)

    def min_clock(self) -> int:
        return min(p.clock for p in self.providers)

    def step(self) -> None:
        now = self.time
        for truth in self.truths:
            self._step_truth(truth, now)
        for provider in self.providers:
            self._step_provider(provider, now)
        self.time = now + self.tick_ns

    # -- truth ------------------------------------------------------------------

    def _step_truth(self, truth: _Truth, now: int) -> None:
        if truth.status == "closed":
            return
        rng = truth.rng
        config = self.owner.truth
        if now >= truth.close_at:
            truth.status = "closed"
            self.episodes.append(Episode("closure", "", truth.spec.market, now, now))
        elif truth.status == "suspended":
            if now >= truth.suspended_until:
                truth.status = "open"
                for _ in range(5):  # the news that suspended it moved the price
                    self._walk(truth, config.step_ppm * 3)
        else:
            r = rng.random()
            if r < self.p_suspend:
                low, high = config.suspend_ms
                truth.status = "suspended"
                truth.suspended_until = now + rng.randint(low, high) * MS
                self.episodes.append(
                    Episode("suspension", "", truth.spec.market, now, truth.suspended_until)
                )
            elif r < self.p_suspend + self.p_move:
                self._walk(truth, config.step_ppm)

    @staticmethod
    def _walk(truth: _Truth, step: int) -> None:
        """Move up to `step` millionths from one outcome to another, inside the bounds."""
        rng = truth.rng
        probabilities = truth.probabilities
        n = len(probabilities)
        to = rng.randrange(n)
        frm = (to + 1 + rng.randrange(n - 1)) % n
        amount = rng.randint(1, step)
        amount = min(amount, MAX_PROBABILITY - probabilities[to],
                     probabilities[frm] - MIN_PROBABILITY)
        if amount > 0:
            probabilities[to] += amount
            probabilities[frm] -= amount

    # -- providers --------------------------------------------------------------

    def _step_provider(self, provider: _Provider, now: int) -> None:
        config = provider.config
        rng = provider.rng
        lag = (config.delay_ms + rng.randint(0, config.jitter_ms)) * MS
        provider.clock = max(provider.clock, now + lag)
        r = rng.random()
        heartbeat = config.heartbeat_ms * MS
        if provider.outage_until is not None and now >= provider.outage_until:
            provider.outage_until = None
            provider.fresh = True
        elif provider.outage_until is None and r < _rate(self.owner.truth.tick_ms,
                                                         config.outage_every_ms):
            low, high = config.outage_ms
            provider.outage_until = now + rng.randint(low, high) * MS
            self.episodes.append(Episode("outage", config.name, "", now, provider.outage_until))
        if provider.outage_until is not None:
            # Silent, heartbeats included; they resume on the grid after its return.
            while provider.next_heartbeat <= provider.clock:
                provider.next_heartbeat += heartbeat
            return
        while provider.next_heartbeat <= provider.clock:
            self._emit(provider, ProviderMessage(config.name, provider.pseq + 1,
                                                 provider.next_heartbeat, "heartbeat"))
            provider.next_heartbeat += heartbeat
        for quote in provider.quotes:
            self._step_quote(provider, quote, now)
        provider.fresh = False

    def _step_quote(self, provider: _Provider, quote: _Quote, now: int) -> None:
        if quote.closed:
            return
        config = provider.config
        tick = self.owner.truth.tick_ms
        truth = quote.truth
        rng = quote.rng
        r = rng.random()
        refresh = provider.fresh
        if quote.stale_until is not None:
            if now < quote.stale_until:
                return  # stale: this market gets nothing, not even a suspension
            quote.stale_until = None
            refresh = True
        if quote.lone_until is not None and now >= quote.lone_until:
            quote.lone_until = None
        if truth.status == "closed":
            self._emit_quote(provider, quote, "closed")
            quote.closed = True
            return
        p_stale = _rate(tick, config.stale_every_ms)
        p_lone = _rate(tick, config.lone_suspend_every_ms)
        p_update = _rate(tick, config.update_every_ms)
        if not refresh and truth.status == "open" and quote.lone_until is None:
            if r < p_stale:
                low, high = config.stale_ms
                quote.stale_until = now + rng.randint(low, high) * MS
                self.episodes.append(Episode("stale", config.name, truth.spec.market, now,
                                             quote.stale_until))
                return
            if r < p_stale + p_lone:
                low, high = config.lone_suspend_ms
                quote.lone_until = now + rng.randint(low, high) * MS
                self.episodes.append(Episode("lone_suspension", config.name, truth.spec.market,
                                             now, quote.lone_until))
        suspended = truth.status == "suspended" or quote.lone_until is not None
        status = "suspended" if suspended else "open"
        due = status == "open" and p_stale + p_lone <= r < p_stale + p_lone + p_update
        if refresh or due or status != quote.sent_status:
            self._emit_quote(provider, quote, status)

    def _emit_quote(self, provider: _Provider, quote: _Quote, status: str) -> None:
        config = provider.config
        spec = quote.truth.spec
        values: tuple[tuple[str, str], ...] = ()
        if status == "open":
            values = self._values(provider, quote)
        msg = ProviderMessage(config.name, provider.pseq + 1, provider.clock, config.kind,
                              spec.market, spec.event_id, spec.market_type, status, values)
        quote.sent_status = status
        self._emit(provider, msg)

    def _values(self, provider: _Provider, quote: _Quote) -> tuple[tuple[str, str], ...]:
        """The provider's noisy view of the truth, maybe with one wild value, as decimal strings."""
        config = provider.config
        rng = quote.rng
        noise = config.noise_ppm
        view = [
            max(p + rng.randint(-noise, noise), MIN_PROBABILITY // 2)
            for p in quote.truth.probabilities
        ]
        if config.outlier_every > 0 and rng.randrange(config.outlier_every) == 0:
            wild = rng.randrange(len(view))
            view[wild] = view[wild] * 4 if rng.randrange(2) else max(view[wild] // 4, 1)
            spec = quote.truth.spec
            self.episodes.append(Episode("outlier", config.name, spec.market,
                                         self.time, self.time, provider.pseq + 1))
        total = Decimal(sum(view))
        decimals = config.decimals if config.decimals is not None else (
            2 if config.kind == "prices" else 4)
        quantum = Decimal(1).scaleb(-decimals)
        out = []
        for outcome, weight in zip(quote.truth.spec.outcomes, view, strict=True):
            if config.kind == "prices":
                book = _CONTEXT.add(_ONE, Decimal(config.margin))
                value = _CONTEXT.divide(total, _CONTEXT.multiply(Decimal(weight), book))
                value = min(max(value, _MIN_PRICE), _MAX_PRICE)
            else:
                value = min(max(_CONTEXT.divide(Decimal(weight), total), quantum), _ONE)
            value = value.quantize(quantum, context=_CONTEXT)  # also "1000" -> "1000.00"
            out.append((outcome, f"{value:f}"))
        return tuple(sorted(out))

    def _emit(self, provider: _Provider, msg: ProviderMessage) -> None:
        provider.pseq = msg.pseq
        provider.out.append(msg)


# -- the public set ---------------------------------------------------------------------


class ProviderSet:
    """The truth of every market and the providers that report it, from one seed.

    `messages_between(t0, t1)` gives every message with `t0 <= pts < t1`,
    per provider in pseq order; it may be called for any window in any order
    (going back restarts the simulation from `start_ns`, going forward
    continues it), and the answer depends only on the seed, the
    configuration and the window.
    """

    def __init__(
        self,
        seed: int | str,
        markets: Sequence[MarketSpec] | None = None,
        providers: Sequence[ProviderConfig] | None = None,
        *,
        truth: TruthConfig | None = None,
        start_ns: int = 0,
    ) -> None:
        self.seed = seed
        self.markets = tuple(markets if markets is not None else default_markets())
        self.providers = tuple(
            sorted(providers if providers is not None else default_providers(),
                   key=lambda c: c.name)
        )
        self.truth = truth or TruthConfig()
        self.start_ns = start_ns
        self._check()
        self._sim = _Simulation(self)
        self._kept_from = start_ns  # messages with pts below this were let go

    def _check(self) -> None:
        if not self.markets:
            raise ValueError("a provider set needs at least one market")
        if not self.providers:
            raise ValueError("a provider set needs at least one provider")
        if len({m.market for m in self.markets}) != len(self.markets):
            raise ValueError("markets must be unique")
        for spec in self.markets:
            if spec.market_type not in OUTCOMES:
                raise ValueError(f"market {spec.market}: type {spec.market_type!r} is not one "
                                 f"of {sorted(OUTCOMES)}")
            try:  # the input format's own grammar for market, event_id and type
                validate(ProviderMessage("check", 1, 0, "prices", spec.market, spec.event_id,
                                         spec.market_type, "closed"))
            except InvalidInput as exc:
                raise ValueError(f"market {spec.market!r}: {exc}") from None
        names = [c.name for c in self.providers]
        if len(set(names)) != len(names):
            raise ValueError("provider names must be unique")
        for config in self.providers:
            try:
                validate(ProviderMessage(config.name, 1, 0, "heartbeat"))
            except InvalidInput as exc:
                raise ValueError(f"provider {config.name!r}: {exc}") from None
            if config.kind not in ("prices", "probabilities"):
                raise ValueError(f"provider {config.name}: kind {config.kind!r} is not "
                                 "prices or probabilities")
            if config.decimals is not None and not 1 <= config.decimals <= 6:
                raise ValueError(f"provider {config.name}: decimals must be 1 to 6")
            try:
                margin_ok = Decimal(config.margin) >= 0
            except ArithmeticError:
                margin_ok = False
            if not margin_ok:
                raise ValueError(f"provider {config.name}: margin {config.margin!r} is not a "
                                 "decimal string >= 0")
            if config.heartbeat_ms < 1 or config.delay_ms < 0 or config.jitter_ms < 0:
                raise ValueError(f"provider {config.name}: heartbeat_ms must be >= 1 and "
                                 "delays >= 0")
        if self.truth.tick_ms < 1:
            raise ValueError("tick_ms must be at least 1")
        if self.start_ns < 0:
            raise ValueError("start_ns must be at least 0")

    @property
    def names(self) -> tuple[str, ...]:
        """The provider names, sorted: the set a `Merger` is built with."""
        return tuple(c.name for c in self.providers)

    def messages_between(
        self, t0_ns: int, t1_ns: int, provider: str | None = None
    ) -> list[ProviderMessage]:
        """Every message with `t0_ns <= pts < t1_ns`: of one provider, or of all of them
        one provider after the other (sorted by name), each in pseq order."""
        if t1_ns < t0_ns:
            raise ValueError("the window ends before it starts")
        if provider is not None and provider not in self.names:
            raise ValueError(f"unknown provider {provider!r}")
        if t0_ns < self._kept_from:
            self._sim = _Simulation(self)  # going back: replay from the start
            self._kept_from = self.start_ns
        sim = self._sim
        while sim.min_clock() < t1_ns:
            sim.step()
        self._kept_from = max(self._kept_from, t0_ns)
        out: list[ProviderMessage] = []
        for run in sim.providers:
            kept = [m for m in run.out if m.pts >= self._kept_from]
            run.out = kept
            if provider is None or run.config.name == provider:
                out.extend(m for m in kept if t0_ns <= m.pts < t1_ns)
        return out

    def streams_between(self, t0_ns: int, t1_ns: int) -> dict[str, list[ProviderMessage]]:
        """`messages_between` split per provider."""
        streams: dict[str, list[ProviderMessage]] = {name: [] for name in self.names}
        for msg in self.messages_between(t0_ns, t1_ns):
            streams[msg.provider].append(msg)
        return streams

    def episodes(self, until_ns: int | None = None) -> list[Episode]:
        """The behaviours simulated so far (from `start_ns`), those starting before `until_ns`.

        Kept for the life of the simulation: a few per minute, so a live
        process can run for days on it.
        """
        return [e for e in self._sim.episodes if until_ns is None or e.start_ns < until_ns]

