"""Per market, one price view out of several providers (issue 16, point 3).

Each provider's latest view of a market is kept as implied probabilities with
that provider's own margin stripped (1/odds, normalised to sum 1), so that
providers quoting prices and providers quoting probabilities are compared on
one scale. A market's consensus is the median of each outcome across the
providers that are fresh and agree; what leaves is published only when it
changes. `ConsensusRules` holds every knob, with its default and why.

Determinism (PROTOCOL.md section 8: every region publishes the same bytes
from the same ordered inputs):
- arithmetic runs in `CONSENSUS_CONTEXT`, an explicit decimal context (28
  digits, ROUND_HALF_EVEN), never the thread's global one, which any library
  may change; probabilities are then quantized to 12 decimals, so two ways of
  quoting the same book (2.00/4.00/4.00 and 0.5/0.25/0.25) give equal views;
- no floats: inputs are decimal strings, and a float anywhere is a TypeError;
- no wall clock: "now" is the data time, the `pts` of the message being
  processed; staleness is measured in it, so a replay of yesterday's inputs
  decides exactly what was decided yesterday;
- nothing depends on dict or set iteration order: providers and outcomes are
  walked sorted.

Time-driven changes. A provider going quiet changes a market's consensus
without any message of that market, so each market is scheduled for its
earliest view expiry; the first input whose data time passes that deadline
evicts the expired views and re-decides the market, before that input itself
is applied (the expiry happened before the input). An evicted view never comes
back: a provider that returns must quote the market again to count.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import (
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DivisionByZero,
    InvalidOperation,
    Overflow,
)
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for hints: inputs does not depend on the consensus, nor it on inputs
    from aggregator.inputs import ProviderMessage

CONSENSUS_CONTEXT = Context(
    prec=28, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, DivisionByZero, Overflow]
)
PROB_QUANTUM = Decimal("1e-12")
ONE = Decimal(1)
_PLAIN_DECIMAL = re.compile(r"[0-9]{1,12}(\.[0-9]{1,18})?")
STATUSES = ("open", "suspended", "closed")
QUOTE_KINDS = ("prices", "probabilities")
SECOND_NS = 1_000_000_000

# A fair book: (outcome, probability) sorted by outcome, summing exactly to 1.
Book = tuple[tuple[str, Decimal], ...]


class InvalidView(ValueError):
    """A message whose quote cannot be read as a book; it changes nothing."""


def _plain_decimal(text: object, outcome: str) -> Decimal:
    if isinstance(text, float):
        raise TypeError(f"value of {outcome!r} is a float; decimal strings only")
    if not isinstance(text, str) or not _PLAIN_DECIMAL.fullmatch(text):
        raise InvalidView(f"value of {outcome!r} is not a plain decimal string: {text!r}")
    return Decimal(text)  # exact: construction from a string never rounds


def normalise(weights: Iterable[tuple[str, Decimal]]) -> Book:
    """Scale non-negative weights to probabilities that sum to exactly 1.

    Each share is quantized to 12 decimals (half-even); the few units of
    1e-12 left over go to the largest share (ties: the first outcome by
    name), so the book sums to 1 exactly and the margin's bound holds.
    """
    items = sorted(weights)
    total = Decimal(0)
    for _outcome, weight in items:
        total = CONSENSUS_CONTEXT.add(total, weight)
    if total <= 0:
        raise InvalidView("the quote's values sum to zero")
    shares = [
        (
            outcome,
            CONSENSUS_CONTEXT.divide(weight, total).quantize(
                PROB_QUANTUM, context=CONSENSUS_CONTEXT
            ),
        )
        for outcome, weight in items
    ]
    residual = ONE
    for _outcome, share in shares:
        residual = CONSENSUS_CONTEXT.subtract(residual, share)
    if residual:
        largest = 0  # no negation as a sort key: unary minus would round in the global context
        for i, (_outcome, share) in enumerate(shares):
            if share > shares[largest][1]:
                largest = i
        outcome, share = shares[largest]
        shares[largest] = (outcome, CONSENSUS_CONTEXT.add(share, residual))
    return tuple(shares)


def implied_probabilities(kind: str, values: tuple[tuple[str, str], ...]) -> Book:
    """A provider's quote as a fair book: its own margin stripped.

    "prices": decimal odds of at least 1, p = 1/odds, normalised (the
    provider's overround divided out proportionally, the same method the
    margin uses to put ours back). "probabilities": non-negative numbers,
    normalised likewise (a provider's book may not sum exactly to 1).
    """
    if kind not in QUOTE_KINDS:
        raise InvalidView(f"kind {kind!r} carries no quote")
    outcomes = [outcome for outcome, _ in values]
    if len(outcomes) < 2:
        raise InvalidView("an open quote needs at least two outcomes")
    if len(set(outcomes)) != len(outcomes) or not all(isinstance(o, str) and o for o in outcomes):
        raise InvalidView("outcome names must be distinct non-empty strings")
    parsed = [(outcome, _plain_decimal(text, outcome)) for outcome, text in sorted(values)]
    if kind == "prices":
        if any(price < ONE for _o, price in parsed):
            raise InvalidView("decimal odds must be at least 1")
        return normalise((o, CONSENSUS_CONTEXT.divide(ONE, price)) for o, price in parsed)
    return normalise(parsed)


def _nanoseconds(value: object, name: str) -> int:
    if type(value) is not int or value <= 0:
        raise TypeError(f"{name} must be a positive int of nanoseconds, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class StaleLimits:
    """How long, in data time, a provider may stay quiet before its views stop counting.

    `silence_ns`: no message of any kind from the provider (heartbeats count).
    Default 10 s: three missed beats of a feed that beats every 3 s; a
    provider that lost its connection must not keep voting.
    `view_ns`: no update of this market from the provider, however alive it
    is. Default 300 s: providers send changes, not repeats, and a pre-match
    market may not move for minutes; a feed frozen on one market while
    beating (a stuck book) still drops out.
    """

    silence_ns: int = 10 * SECOND_NS
    view_ns: int = 300 * SECOND_NS

    def __post_init__(self) -> None:
        _nanoseconds(self.silence_ns, "silence_ns")
        _nanoseconds(self.view_ns, "view_ns")

    def to_dict(self) -> dict[str, int]:
        return {"silence_ns": self.silence_ns, "view_ns": self.view_ns}


@dataclass(frozen=True, slots=True)
class ConsensusRules:
    """Every rule of the consensus, with its default.

    - `min_agree` (2): a price is published only when at least this many fresh
      providers agree; one provider alone can be wrong, or be the only one
      that missed a goal. Closure needs this many closers as well, because
      it is final.
    - `tolerance` ("0.03"): a provider whose implied probability of any
      outcome is further than this from the median is an outlier. 3 points
      of probability is far beyond normal disagreement between books and
      well within what a stale or mistyped price produces. With two providers
      the median is their mean, so they agree when they are at most
      2 x tolerance apart.
    - `stale` and `stale_by_provider`: `StaleLimits` for every provider, and
      overrides for the ones that beat or quote at another pace.
    - `mandatory` (none): providers whose suspension suspends the market by
      itself (the official data feed, say), majority or not, as long as
      their view is fresh; once it is stale it counts no more than any other.
    """

    min_agree: int = 2
    tolerance: Decimal = Decimal("0.03")
    stale: StaleLimits = StaleLimits()
    stale_by_provider: Mapping[str, StaleLimits] = field(default_factory=dict)
    mandatory: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if type(self.min_agree) is not int or self.min_agree < 1:
            raise ValueError("min_agree must be an int of at least 1")
        if isinstance(self.tolerance, float) or not isinstance(self.tolerance, str | Decimal):
            raise TypeError("tolerance must be a decimal string, never a float")
        tolerance = Decimal(self.tolerance)
        if not tolerance.is_finite() or not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be within [0, 1): {self.tolerance}")
        object.__setattr__(self, "tolerance", tolerance)
        if not isinstance(self.stale, StaleLimits) or not all(
            isinstance(v, StaleLimits) for v in self.stale_by_provider.values()
        ):
            raise TypeError("stale limits must be StaleLimits")
        object.__setattr__(self, "stale_by_provider", dict(sorted(self.stale_by_provider.items())))
        object.__setattr__(self, "mandatory", frozenset(self.mandatory))

    def limits(self, provider: str) -> StaleLimits:
        return self.stale_by_provider.get(provider, self.stale)

    def to_dict(self) -> dict[str, Any]:
        """The rules as JSON-ready values (kept in engine snapshots)."""
        return {
            "min_agree": self.min_agree,
            "tolerance": str(self.tolerance),
            "stale": self.stale.to_dict(),
            "stale_by_provider": {p: s.to_dict() for p, s in self.stale_by_provider.items()},
            "mandatory": sorted(self.mandatory),
        }


class Verdict(StrEnum):
    OPEN = "open"  # publish open with `probabilities`, resting on `providers`
    SUSPENDED = "suspended"  # publish suspended; `providers` are the suspending ones
    CLOSED = "closed"  # publish closed; final for the market
    UNCHANGED = "unchanged"  # same decision as last time: nothing to publish
    NO_QUORUM = "no_quorum"  # too few agreeing providers: hold the last published state


@dataclass(frozen=True, slots=True)
class Decision:
    market: str
    verdict: Verdict
    probabilities: Book = ()
    providers: tuple[str, ...] = ()

    @property
    def publishes(self) -> bool:
        return self.verdict in (Verdict.OPEN, Verdict.SUSPENDED, Verdict.CLOSED)


@dataclass(frozen=True, slots=True)
class View:
    """One provider's latest word on one market."""

    status: str
    updated: int  # data time of the update
    book: Book = ()  # empty unless open

    @classmethod
    def from_message(cls, msg: ProviderMessage) -> View:
        if msg.status not in STATUSES:
            raise InvalidView(f"status {msg.status!r} is not one of {STATUSES}")
        if msg.kind not in QUOTE_KINDS:
            raise InvalidView(f"kind {msg.kind!r} carries no quote")
        if msg.status != "open":
            return cls(msg.status, msg.pts)
        return cls("open", msg.pts, implied_probabilities(msg.kind, msg.values))


@dataclass(slots=True)
class ConsensusCounters:
    """Exclusions, counted once per view or per decision.

    `stale`: views evicted for staleness (each once); `outlier`: providers
    left out of a decision as outliers; `mismatched`: providers left out
    because they quote another set of outcomes than most; `no_quorum`:
    decisions that held the last state for want of agreeing providers.
    """

    stale: int = 0
    outlier: int = 0
    mismatched: int = 0
    no_quorum: int = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "stale": self.stale,
            "outlier": self.outlier,
            "mismatched": self.mismatched,
            "no_quorum": self.no_quorum,
        }


@dataclass(slots=True)
class MarketConsensus:
    views: dict[str, View] = field(default_factory=dict)
    last: Decision | None = None  # the last decision that published (open/suspended/closed)
    closed: bool = False


def _median(values: list[Decimal]) -> Decimal:
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return CONSENSUS_CONTEXT.divide(CONSENSUS_CONTEXT.add(ordered[mid - 1], ordered[mid]), 2)


def _medians(books: list[Book]) -> Book:
    outcomes = [outcome for outcome, _ in books[0]]
    return tuple(
        (outcome, _median([book[i][1] for book in books])) for i, outcome in enumerate(outcomes)
    )


class ConsensusBook:
    """Every market's views and last decision; fed the merged input in order."""

    def __init__(self, rules: ConsensusRules | None = None) -> None:
        self.rules = rules or ConsensusRules()
        self.counters = ConsensusCounters()
        self._markets: dict[str, MarketConsensus] = {}
        self._last_seen: dict[str, int] = {}  # provider -> data time of its last message
        self._deadline: dict[str, int] = {}  # market -> earliest expiry of its views
        self._heap: list[tuple[int, str]] = []  # (deadline, market); stale entries skipped

    # -- input --------------------------------------------------------------------

    def process(self, msg: ProviderMessage) -> list[Decision]:
        """Apply one message at data time `msg.pts`; the decisions it caused.

        A message whose quote cannot be read raises `InvalidView` (or
        TypeError for a float) before anything changes.
        """
        if msg.kind == "heartbeat":
            return self.apply(msg.provider, msg.pts)
        return self.apply(msg.provider, msg.pts, msg.market, View.from_message(msg))

    def apply(
        self, provider: str, now: int, market: str | None = None, view: View | None = None
    ) -> list[Decision]:
        """One input, already read: a heartbeat (no market) or a market update.

        Markets whose views expired before `now` are decided first (ordered by
        deadline, then market); the updated market comes last, once, after
        its update. Nothing here raises on a well-typed input.
        """
        own = market if view is not None else None
        decisions = self._expire(now, own)
        self._last_seen[provider] = max(now, self._last_seen.get(provider, now))
        if view is None or own is None:
            return decisions
        state = self._markets.setdefault(own, MarketConsensus())
        if state.closed:
            return decisions
        self._evict(state, now)
        state.views[provider] = view
        decisions.append(self._decide(own, state))
        self._schedule(own, state)
        return decisions

    def is_closed(self, market: str) -> bool:
        state = self._markets.get(market)
        return state is not None and state.closed

    def last_decision(self, market: str) -> Decision | None:
        """What the market last published (open, suspended or closed), held
        through no-quorum decisions; None before its first."""
        state = self._markets.get(market)
        return state.last if state else None

    def views(self, market: str) -> dict[str, View]:
        """The views a market's next decision would start from (a copy)."""
        state = self._markets.get(market)
        return dict(state.views) if state else {}

    # -- time ---------------------------------------------------------------------

    def _expiry(self, provider: str, view: View) -> int:
        """The data time after which the view no longer counts."""
        limits = self.rules.limits(provider)
        last_seen = self._last_seen.get(provider, view.updated)
        return min(last_seen + limits.silence_ns, view.updated + limits.view_ns)

    def _evict(self, state: MarketConsensus, now: int) -> int:
        expired = [p for p, v in sorted(state.views.items()) if now > self._expiry(p, v)]
        for provider in expired:
            del state.views[provider]
        self.counters.stale += len(expired)
        return len(expired)

    def _schedule(self, market: str, state: MarketConsensus) -> None:
        if state.closed or not state.views:
            self._deadline.pop(market, None)
            return
        deadline = min(self._expiry(p, v) for p, v in state.views.items())
        if self._deadline.get(market) == deadline:
            return
        self._deadline[market] = deadline
        heapq.heappush(self._heap, (deadline, market))
        if len(self._heap) > 2 * len(self._deadline) + 1024:
            self._heap = sorted((d, m) for m, d in self._deadline.items())

    def _expire(self, now: int, own: str | None) -> list[Decision]:
        """Evict what expired before `now`; decide the markets that lost a view.

        A deadline reached only because a heartbeat has since extended the
        provider's life evicts nothing and is just moved: no decision, no count.
        """
        decisions = []
        while self._heap and self._heap[0][0] < now:
            deadline, market = heapq.heappop(self._heap)
            if self._deadline.get(market) != deadline:
                continue  # superseded entry
            del self._deadline[market]
            state = self._markets[market]
            if self._evict(state, now) and market != own:
                decisions.append(self._decide(market, state))
            self._schedule(market, state)
        return decisions

    # -- the rules ----------------------------------------------------------------

    def _decide(self, market: str, state: MarketConsensus) -> Decision:
        decision = self._verdict(market, state.views)
        if decision.verdict is Verdict.NO_QUORUM:
            self.counters.no_quorum += 1
            return decision
        if decision == state.last:
            return Decision(market, Verdict.UNCHANGED)
        state.last = decision
        if decision.verdict is Verdict.CLOSED:
            state.closed = True
            state.views.clear()
        return decision

    def _verdict(self, market: str, fresh: Mapping[str, View]) -> Decision:
        rules = self.rules
        count = len(fresh)
        closing = tuple(p for p, v in sorted(fresh.items()) if v.status == "closed")
        if 2 * len(closing) > count and len(closing) >= rules.min_agree:
            return Decision(market, Verdict.CLOSED, providers=closing)
        not_open = tuple(p for p, v in sorted(fresh.items()) if v.status != "open")
        mandatory_down = tuple(p for p in not_open if p in rules.mandatory)
        if 2 * len(not_open) > count or mandatory_down:
            return Decision(market, Verdict.SUSPENDED, providers=not_open)
        quoting = {p: v.book for p, v in sorted(fresh.items()) if v.status == "open"}
        group = self._largest_shape(quoting)
        self.counters.mismatched += len(quoting) - len(group)
        if len(group) < rules.min_agree:
            return Decision(market, Verdict.NO_QUORUM)
        median = _medians(list(group.values()))
        agreeing = tuple(
            provider
            for provider, book in group.items()
            if all(
                CONSENSUS_CONTEXT.abs(CONSENSUS_CONTEXT.subtract(p, m)) <= rules.tolerance
                for (_o, p), (_o2, m) in zip(book, median, strict=True)
            )
        )
        self.counters.outlier += len(group) - len(agreeing)
        if len(agreeing) < rules.min_agree:
            return Decision(market, Verdict.NO_QUORUM)
        consensus = normalise(_medians([group[p] for p in agreeing]))
        return Decision(market, Verdict.OPEN, consensus, agreeing)

    @staticmethod
    def _largest_shape(quoting: Mapping[str, Book]) -> dict[str, Book]:
        """The providers quoting the most common set of outcomes (ties: first set by name)."""
        shapes: dict[tuple[str, ...], dict[str, Book]] = {}
        for provider, book in quoting.items():
            shapes.setdefault(tuple(o for o, _ in book), {})[provider] = book
        if not shapes:
            return {}
        best = min(shapes, key=lambda shape: (-len(shapes[shape]), shape))
        return shapes[best]

    # -- checkpoint ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Everything a restart needs, as JSON-ready values (Decimals as strings)."""
        return {
            "last_seen": dict(sorted(self._last_seen.items())),
            "deadlines": dict(sorted(self._deadline.items())),
            "counters": self.counters.to_dict(),
            "markets": {
                market: {
                    "closed": state.closed,
                    "views": {
                        p: {"status": v.status, "updated": v.updated, "book": _book_out(v.book)}
                        for p, v in sorted(state.views.items())
                    },
                    "last": None
                    if state.last is None
                    else {
                        "verdict": state.last.verdict.value,
                        "book": _book_out(state.last.probabilities),
                        "providers": list(state.last.providers),
                    },
                }
                for market, state in sorted(self._markets.items())
            },
        }

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], rules: ConsensusRules | None = None
    ) -> ConsensusBook:
        book = cls(rules)
        book._last_seen = {str(p): int(t) for p, t in data["last_seen"].items()}
        book._deadline = {str(m): int(d) for m, d in data["deadlines"].items()}
        book._heap = sorted((d, m) for m, d in book._deadline.items())
        book.counters = ConsensusCounters(**{k: int(v) for k, v in data["counters"].items()})
        for market, saved in data["markets"].items():
            state = MarketConsensus(closed=bool(saved["closed"]))
            for provider, view in saved["views"].items():
                state.views[provider] = View(
                    str(view["status"]), int(view["updated"]), _book_in(view["book"])
                )
            last = saved["last"]
            if last is not None:
                state.last = Decision(
                    market,
                    Verdict(last["verdict"]),
                    _book_in(last["book"]),
                    tuple(str(p) for p in last["providers"]),
                )
            book._markets[market] = state
        return book


def _book_out(book: Book) -> list[list[str]]:
    return [[outcome, str(p)] for outcome, p in book]


def _book_in(saved: list[list[str]]) -> Book:
    return tuple((str(outcome), Decimal(str(p))) for outcome, p in saved)
