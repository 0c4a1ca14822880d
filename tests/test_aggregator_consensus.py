"""Consensus across providers (aggregator/consensus.py): the rules as a table of cases.

Each case is a short merged input (data time in seconds) and the decision the
last input must produce. No clock, no Redis: the book is a plain object.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass, field
from decimal import Decimal

import pytest

from aggregator.consensus import (
    ConsensusBook,
    ConsensusRules,
    Decision,
    InvalidView,
    StaleLimits,
    Verdict,
    implied_probabilities,
    normalise,
)
from aggregator.inputs import ProviderMessage

S = 1_000_000_000
MARKET = "1:39:1"


def quote(provider: str, t: float, home: str, draw: str, away: str,
          kind: str = "probabilities") -> ProviderMessage:
    """An open 1x2 quote at `t` seconds of data time."""
    return ProviderMessage(provider, 1, int(t * S), kind, MARKET, "m-1", "1x2", "open",
                           (("away", away), ("draw", draw), ("home", home)))


def say(provider: str, t: float, status: str) -> ProviderMessage:
    """A suspension or closure of the market, with no values."""
    return ProviderMessage(provider, 1, int(t * S), "prices", MARKET, "m-1", "1x2", status)


def beat(provider: str, t: float) -> ProviderMessage:
    return ProviderMessage(provider, 1, int(t * S), "heartbeat")


def two_way(provider: str, t: float, over: str, under: str) -> ProviderMessage:
    return ProviderMessage(provider, 1, int(t * S), "probabilities", MARKET, "m-1", "1x2",
                           "open", (("over", over), ("under", under)))


def book(**probabilities: str) -> tuple[tuple[str, Decimal], ...]:
    return tuple(sorted((o, Decimal(p)) for o, p in probabilities.items()))


OPN, SUS, CLO = Verdict.OPEN, Verdict.SUSPENDED, Verdict.CLOSED
UNCH, NOQ = Verdict.UNCHANGED, Verdict.NO_QUORUM
NOTHING = "nothing published yet"


@dataclass
class Case:
    """`verdict`: the decision of the last input. `published`: the market's
    published state after it (verdict, providers), held through no quorum."""

    inputs: list[ProviderMessage]
    verdict: Verdict
    published: tuple[Verdict, tuple[str, ...]] | str
    probabilities: tuple[tuple[str, Decimal], ...] | None = None
    counters: dict[str, int] = field(default_factory=dict)
    rules: ConsensusRules = field(default_factory=ConsensusRules)


A_B = [quote("a", 1, "0.50", "0.25", "0.25"), quote("b", 2, "0.51", "0.25", "0.24")]
A_B_C = [*A_B, quote("c", 3, "0.50", "0.26", "0.24")]
MEDIAN_A_B = book(home="0.505", draw="0.25", away="0.245")
EVEN = ("0.50", "0.25", "0.25")
MANDATORY_A = ConsensusRules(mandatory=frozenset({"a"}))

CASES = [
    # -- quorum and agreement
    pytest.param(Case(A_B[:1], NOQ, NOTHING, counters={"no_quorum": 1}),
                 id="one provider alone -> no quorum, nothing published"),
    pytest.param(Case(A_B, OPN, (OPN, ("a", "b")), MEDIAN_A_B),
                 id="two agree -> publish the median"),
    pytest.param(Case([*A_B, quote("c", 3, "0.70", "0.20", "0.10")], UNCH, (OPN, ("a", "b")),
                      MEDIAN_A_B, {"outlier": 1}),
                 id="outlier excluded: the price stays on the two that agree"),
    pytest.param(Case([quote("a", 1, *EVEN), quote("b", 2, *EVEN),
                       quote("c", 3, "0.53", "0.22", "0.25")], OPN, (OPN, ("a", "b", "c"))),
                 id="exactly the tolerance away is not an outlier"),
    pytest.param(Case([quote("a", 1, *EVEN), quote("b", 2, *EVEN),
                       quote("c", 3, "0.531", "0.219", "0.25")], UNCH, (OPN, ("a", "b")),
                      counters={"outlier": 1}),
                 id="just past the tolerance is an outlier"),
    pytest.param(Case([quote("a", 1, *EVEN), quote("b", 2, "0.57", "0.22", "0.21")], NOQ,
                      NOTHING, counters={"outlier": 2, "no_quorum": 2}),
                 id="two that disagree -> both outliers, no quorum"),
    pytest.param(Case([*A_B, quote("a", 3, *EVEN)], UNCH, (OPN, ("a", "b"))),
                 id="same quote again -> nothing changed"),
    pytest.param(Case([*A_B, quote("b", 3, "0.51", "0.24", "0.25")], OPN, (OPN, ("a", "b")),
                      book(home="0.505", draw="0.245", away="0.25")),
                 id="a provider moves -> new consensus"),
    pytest.param(Case([quote("a", 1, *EVEN, kind="probabilities"),
                       quote("b", 2, "1.90", "3.80", "3.80", kind="prices")],
                      OPN, (OPN, ("a", "b")), book(home="0.5", draw="0.25", away="0.25")),
                 id="prices and probabilities quoting one book agree exactly"),
    pytest.param(Case([*A_B_C, two_way("c", 4, "0.5", "0.5")], OPN, (OPN, ("a", "b")),
                      counters={"mismatched": 1}),
                 id="a provider quoting other outcomes is left out"),
    # -- staleness, in data time
    pytest.param(Case([*A_B_C, beat("b", 9), beat("c", 9), quote("c", 12, "0.50", "0.26", "0.24")],
                      OPN, (OPN, ("b", "c")), counters={"stale": 1}),
                 id="silent provider excluded after its limit"),
    pytest.param(Case([*A_B_C, beat("b", 9), beat("c", 9), quote("c", 11, "0.50", "0.26", "0.24")],
                      UNCH, (OPN, ("a", "b", "c")), counters={"stale": 0}),
                 id="silent for exactly its limit still counts"),
    pytest.param(Case([*A_B_C, beat("a", 8), beat("b", 8), beat("a", 14)], OPN, (OPN, ("a", "b")),
                      MEDIAN_A_B, {"stale": 1}),
                 id="another provider's heartbeat is the input that drops the quiet one"),
    pytest.param(Case([*A_B_C, beat("a", 5), beat("b", 5), beat("c", 5), beat("a", 10),
                       beat("b", 10), beat("c", 10), quote("b", 25, "0.51", "0.25", "0.24"),
                       quote("c", 26, "0.50", "0.26", "0.24")], OPN, (OPN, ("b", "c")),
                      counters={"stale": 3},
                      rules=ConsensusRules(stale=StaleLimits(silence_ns=30 * S, view_ns=20 * S))),
                 id="views not updated past their limit excluded though providers beat"),
    pytest.param(Case([*A_B, beat("a", 9), quote("a", 14, "0.52", "0.24", "0.24")], NOQ,
                      (OPN, ("a", "b")), MEDIAN_A_B, {"stale": 1, "no_quorum": 2}),
                 id="only one provider fresh -> no quorum: hold the last published"),
    # -- suspension
    pytest.param(Case([*A_B_C, say("b", 4, "suspended"), say("c", 5, "suspended")], SUS,
                      (SUS, ("b", "c"))),
                 id="majority suspends -> suspended"),
    pytest.param(Case([*A_B_C, say("c", 4, "suspended")], OPN, (OPN, ("a", "b"))),
                 id="lone provider suspension ignored"),
    pytest.param(Case([*A_B, say("a", 3, "suspended")], NOQ, (OPN, ("a", "b"))),
                 id="one of two suspends: no majority, no quorum -> hold"),
    pytest.param(Case([*A_B, say("a", 3, "suspended")], OPN, (OPN, ("b",)),
                      rules=ConsensusRules(min_agree=1)),
                 id="one of two suspends with min_agree 1 -> the other prices"),
    pytest.param(Case([*A_B_C, say("a", 4, "suspended")], SUS, (SUS, ("a",)), rules=MANDATORY_A),
                 id="mandatory provider suspends -> suspended"),
    pytest.param(Case([*A_B, say("a", 4, "suspended"), quote("a", 5, *EVEN)], OPN,
                      (OPN, ("a", "b")), rules=MANDATORY_A),
                 id="mandatory provider reopens -> open again"),
    # -- closure
    pytest.param(Case([*A_B_C, say("a", 4, "closed"), say("b", 5, "closed")], CLO,
                      (CLO, ("a", "b"))),
                 id="majority closes -> closed"),
    pytest.param(Case([*A_B_C, say("a", 4, "closed"), say("b", 5, "closed"),
                       quote("a", 6, *EVEN), quote("c", 7, *EVEN)], CLO, (CLO, ("a", "b"))),
                 id="closed is final: later quotes change nothing"),
    pytest.param(Case([*A_B_C, say("a", 4, "closed")], OPN, (OPN, ("b", "c"))),
                 id="one closer among three is ignored"),
    pytest.param(Case([*A_B, say("a", 14, "closed")], SUS, (SUS, ("a",))),
                 id="a lone fresh closer suspends but never closes"),
]


def run(case: Case) -> tuple[ConsensusBook, list[list[Decision]]]:
    consensus = ConsensusBook(case.rules)
    return consensus, [consensus.process(msg) for msg in case.inputs]


@pytest.mark.parametrize("case", CASES)
def test_rule(case: Case) -> None:
    consensus, decisions = run(case)
    assert [d for step in decisions for d in step][-1].verdict is case.verdict
    published = consensus.last_decision(MARKET)
    if case.published == NOTHING:
        assert published is None
    else:
        assert published is not None
        assert (published.verdict, published.providers) == case.published
    if case.probabilities is not None:
        assert published is not None and published.probabilities == case.probabilities
    for name, value in case.counters.items():
        assert getattr(consensus.counters, name) == value, name


def test_hold_keeps_the_last_published_decision() -> None:
    """No quorum publishes nothing; the same consensus after it is 'unchanged'."""
    consensus = ConsensusBook()
    for msg in A_B:
        consensus.process(msg)
    held = consensus.process(quote("a", 14, "0.50", "0.25", "0.25"))
    assert held[-1].verdict is Verdict.NO_QUORUM
    back = consensus.process(quote("b", 15, "0.51", "0.25", "0.24"))
    assert [d.verdict for d in back] == [Verdict.UNCHANGED]


def test_an_expired_market_is_decided_once_per_input() -> None:
    consensus = ConsensusBook()
    other = ProviderMessage("c", 1, 3 * S, "probabilities", "1:39:2", "m-1", "1x2", "open",
                            (("away", "0.3"), ("draw", "0.3"), ("home", "0.4")))
    for msg in [*A_B, other, quote("c", 4, "0.5", "0.25", "0.25")]:
        consensus.process(msg)
    decisions = consensus.process(quote("c", 12.5, "0.5", "0.25", "0.25"))
    # a (last seen at 1 s) expired at 11 s and b at 12 s: market 1:39:1 is
    # decided once, after the update of c, and nothing else changed.
    assert [(d.market, d.verdict) for d in decisions] == [(MARKET, Verdict.NO_QUORUM)]
    assert consensus.counters.stale == 2
    # 1:39:2 was due at 13 s (c last seen at 3 s), but c has been heard of
    # since: its deadline passes without a decision or a count.
    assert consensus.process(beat("c", 14)) == []
    assert consensus.counters.stale == 2
    assert set(consensus.views("1:39:2")) == {"c"}


def test_a_returning_provider_must_quote_again() -> None:
    consensus = ConsensusBook()
    for msg in [*A_B_C, beat("b", 9), beat("c", 9)]:
        consensus.process(msg)
    returned = consensus.process(beat("a", 12))  # a was silent from 1 s to 12 s
    assert [(d.verdict, d.providers) for d in returned] == [(Verdict.OPEN, ("b", "c"))]
    assert set(consensus.views(MARKET)) == {"b", "c"}
    again = consensus.process(quote("a", 13, "0.50", "0.25", "0.25"))
    assert [(d.verdict, d.providers) for d in again] == [(Verdict.OPEN, ("a", "b", "c"))]


# -- reading a quote --------------------------------------------------------------

@pytest.mark.parametrize(
    ("kind", "values", "expected"),
    [
        pytest.param("prices", (("away", "4.00"), ("draw", "4.00"), ("home", "2.00")),
                     book(away="0.25", draw="0.25", home="0.5"), id="fair prices"),
        pytest.param("prices", (("away", "3.80"), ("draw", "3.80"), ("home", "1.90")),
                     book(away="0.25", draw="0.25", home="0.5"), id="prices with margin stripped"),
        pytest.param("probabilities", (("away", "0.25"), ("draw", "0.25"), ("home", "0.5")),
                     book(away="0.25", draw="0.25", home="0.5"), id="probabilities"),
        pytest.param("probabilities", (("away", "0.26"), ("draw", "0.26"), ("home", "0.52")),
                     book(away="0.25", draw="0.25", home="0.5"), id="probabilities over 1"),
        pytest.param("prices", (("a", "3"), ("b", "3"), ("c", "3")),
                     book(a="0.333333333334", b="0.333333333333", c="0.333333333333"),
                     id="thirds: the residual goes to the first largest"),
        pytest.param("prices", (("over", "1"), ("under", "1000")),
                     book(over="0.999000999001", under="0.000999000999"), id="price of 1"),
    ],
)
def test_implied_probabilities(kind: str, values: tuple, expected: tuple) -> None:
    got = implied_probabilities(kind, values)
    assert got == expected
    assert sum(p for _o, p in got) == 1
    assert all(type(p) is Decimal for _o, p in got)


@pytest.mark.parametrize(
    ("kind", "values", "error"),
    [
        pytest.param("prices", (("home", "2.0"),), InvalidView, id="one outcome"),
        pytest.param("prices", (("away", "0.9"), ("home", "2.0")), InvalidView, id="odds below 1"),
        pytest.param("prices", (("away", "1e3"), ("home", "2.0")), InvalidView, id="exponent"),
        pytest.param("prices", (("away", "NaN"), ("home", "2.0")), InvalidView, id="nan"),
        pytest.param("probabilities", (("away", "0"), ("home", "0")), InvalidView,
                     id="all zero"),
        pytest.param("prices", (("away", 2.5), ("home", "2.0")), TypeError, id="a float"),
        pytest.param("prices", (("home", "2.0"), ("home", "2.0")), InvalidView, id="repeated"),
        pytest.param("heartbeat", (("away", "2"), ("home", "2")), InvalidView, id="no quote kind"),
    ],
)
def test_unreadable_quotes_are_refused(kind: str, values: tuple, error: type) -> None:
    with pytest.raises(error):
        implied_probabilities(kind, values)


def test_a_refused_quote_changes_nothing() -> None:
    consensus = ConsensusBook()
    for msg in A_B:
        consensus.process(msg)
    before = consensus.to_dict()
    with pytest.raises(InvalidView):
        consensus.process(ProviderMessage("a", 2, 20 * S, "prices", MARKET, "m-1", "1x2",
                                          "open", (("home", "2"),)))
    assert consensus.to_dict() == before


# -- determinism --------------------------------------------------------------------

ALL_CASES = [p.values[0] for p in CASES]


@pytest.mark.parametrize("rounding", [decimal.ROUND_UP, decimal.ROUND_FLOOR])
def test_global_decimal_context_changes_nothing(rounding: str) -> None:
    expected = [run(case)[1] for case in ALL_CASES]
    with decimal.localcontext() as ctx:
        ctx.prec = 4
        ctx.rounding = rounding
        assert [run(case)[1] for case in ALL_CASES] == expected
        assert normalise([("a", Decimal(1)), ("b", Decimal(2))]) == book(
            a="0.333333333333", b="0.666666666667")


def test_no_floats_anywhere() -> None:
    for case in ALL_CASES:
        consensus, decisions = run(case)
        for decision in (d for step in decisions for d in step):
            assert all(type(p) is Decimal for _o, p in decision.probabilities)
            assert all(type(o) is str for o, _p in decision.probabilities)
        for saved in consensus.to_dict()["markets"].values():
            for view in saved["views"].values():
                assert all(type(p) is str for _o, p in view["book"])
    with pytest.raises(TypeError):
        ConsensusRules(tolerance=0.03)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        StaleLimits(silence_ns=1.5e9)  # type: ignore[arg-type]
    assert type(ConsensusRules().tolerance) is Decimal


def test_rules_defaults_are_the_documented_ones() -> None:
    rules = ConsensusRules()
    assert rules.min_agree == 2
    assert rules.tolerance == Decimal("0.03")
    assert rules.stale == StaleLimits(silence_ns=10 * S, view_ns=300 * S)
    assert rules.mandatory == frozenset()
    fast = StaleLimits(silence_ns=2 * S, view_ns=60 * S)
    assert ConsensusRules(stale_by_provider={"x": fast}).limits("x") == fast


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param({"min_agree": 0}, id="min_agree 0"),
        pytest.param({"tolerance": "1"}, id="tolerance 1"),
        pytest.param({"tolerance": "-0.01"}, id="negative tolerance"),
    ],
)
def test_bad_rules_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        ConsensusRules(**bad)


def test_checkpoint_round_trip_continues_identically() -> None:
    inputs = [*A_B_C, beat("a", 8), beat("b", 8), say("b", 9, "suspended"),
              quote("b", 10, "0.5", "0.25", "0.25"), beat("a", 14),
              quote("c", 15, "0.5", "0.3", "0.2")]
    whole = ConsensusBook()
    expected = [whole.process(m) for m in inputs]
    for cut in range(len(inputs) + 1):
        first = ConsensusBook()
        got = [first.process(m) for m in inputs[:cut]]
        second = ConsensusBook.from_dict(first.to_dict())
        assert second.to_dict() == first.to_dict()
        got += [second.process(m) for m in inputs[cut:]]
        assert got == expected, cut
