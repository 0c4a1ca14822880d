"""Margin (aggregator/margin.py): the ladder, the rounding, the published book's overround.

Exact arithmetic in the checks (fractions.Fraction), never floats: the bound
on the overround is a statement about rationals, and a float would blur the
very last digit it is about.
"""

from __future__ import annotations

import decimal
from decimal import Decimal
from fractions import Fraction
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.consensus import normalise
from aggregator.margin import (
    DEFAULT_OVERROUNDS,
    LADDER,
    MAX_PRICE,
    MIN_PRICE,
    Margins,
    UnknownMarketType,
    format_price,
    ladder_floor,
    price_for,
)

D = Decimal


# -- the ladder --------------------------------------------------------------------

@pytest.mark.parametrize(
    ("price", "expected"),
    [
        pytest.param("0.5", "1.01", id="below the ladder -> 1.01 (clamp)"),
        pytest.param("1.005", "1.01", id="just below 1.01 -> 1.01 (clamp)"),
        pytest.param("1.01", "1.01", id="1.01 is on the ladder"),
        pytest.param("1.019", "1.01", id="inside the 0.01 band"),
        pytest.param("1.999", "1.99", id="just below 2.00"),
        pytest.param("2.00", "2.00", id="edge 2.00"),
        pytest.param("2.019", "2.00", id="just below 2.02: the 0.02 band"),
        pytest.param("2.02", "2.02", id="first step of the 0.02 band"),
        pytest.param("2.999", "2.98", id="just below 3.00"),
        pytest.param("3.00", "3.00", id="edge 3.00"),
        pytest.param("3.049", "3.00", id="just below 3.05: the 0.05 band"),
        pytest.param("3.999", "3.95", id="just below 4.00"),
        pytest.param("4.00", "4.00", id="edge 4.00"),
        pytest.param("4.099", "4.00", id="just below 4.10: the 0.1 band"),
        pytest.param("5.999", "5.90", id="just below 6.00"),
        pytest.param("6.00", "6.00", id="edge 6.00"),
        pytest.param("6.199", "6.00", id="just below 6.20: the 0.2 band"),
        pytest.param("9.999", "9.80", id="just below 10.00"),
        pytest.param("10.00", "10.00", id="edge 10.00"),
        pytest.param("10.499", "10.00", id="just below 10.50: the 0.5 band"),
        pytest.param("19.999", "19.50", id="just below 20.00"),
        pytest.param("20.00", "20.00", id="edge 20.00"),
        pytest.param("20.999", "20.00", id="just below 21: the 1 band"),
        pytest.param("29.999", "29.00", id="just below 30"),
        pytest.param("30.00", "30.00", id="edge 30"),
        pytest.param("31.999", "30.00", id="just below 32: the 2 band"),
        pytest.param("49.999", "48.00", id="just below 50"),
        pytest.param("50.00", "50.00", id="edge 50"),
        pytest.param("54.999", "50.00", id="just below 55: the 5 band"),
        pytest.param("99.999", "95.00", id="just below 100"),
        pytest.param("100.00", "100.00", id="edge 100"),
        pytest.param("109.999", "100.00", id="just below 110: the 10 band"),
        pytest.param("999.999", "990.00", id="just below 1000"),
        pytest.param("1000", "1000.00", id="edge 1000"),
        pytest.param("123456", "1000.00", id="above the ladder -> 1000 (clamp)"),
    ],
)
def test_ladder_floor(price: str, expected: str) -> None:
    got = ladder_floor(D(price))
    assert format_price(got) == expected
    assert type(got) is Decimal


def test_ladder_shape() -> None:
    assert len(LADDER) == 350
    assert (LADDER[0], LADDER[-1]) == (MIN_PRICE, MAX_PRICE) == (D("1.01"), D("1000"))
    assert all(a < b for a, b in pairwise(LADDER))
    steps = {}
    for low, high in pairwise(LADDER):
        steps.setdefault(high - low, []).append(low)
    assert sorted(steps) == [D(s) for s in
                             ("0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1", "2", "5", "10")]
    assert all(type(p) is Decimal and p == p.quantize(D("0.01")) for p in LADDER)


@pytest.mark.parametrize(
    ("price", "text"),
    [
        pytest.param("3.4", "3.40", id="3.40"),
        pytest.param("12.5", "12.50", id="12.50"),
        pytest.param("110", "110.00", id="110.00"),
        pytest.param("1000", "1000.00", id="1000.00"),
        pytest.param("1.01", "1.01", id="1.01"),
    ],
)
def test_prices_have_two_decimals(price: str, text: str) -> None:
    assert format_price(D(price)) == text


# -- one outcome ---------------------------------------------------------------------

@pytest.mark.parametrize(
    ("probability", "overround", "expected"),
    [
        pytest.param("0.5", "1.06", "1.88", id="evens at 6%: 1/0.53 = 1.8867 -> 1.88"),
        pytest.param("0.25", "1.06", "3.75", id="1/0.265 = 3.7735 -> 3.75"),
        pytest.param("0.5", "1", "2.00", id="no margin: exactly on the ladder stays"),
        pytest.param("0.25", "1", "4.00", id="4.00 exactly"),
        pytest.param("0.1", "1", "10.00", id="10.00 exactly"),
        pytest.param("0.5", "1.05", "1.90", id="1/0.525 = 1.9047 -> 1.90"),
        pytest.param("0.95", "1.06", "1.01", id="1/1.007 = 0.993 -> clamped up to 1.01"),
        pytest.param("0.0005", "1.06", "1000.00", id="1/0.00053 = 1886 -> clamped to 1000"),
        pytest.param("0", "1.06", "1000.00", id="zero probability -> 1000"),
        pytest.param("0.000943396226", "1.06", "1000.00",
                     id="just above 1/1060: price 1000.0000004 -> 1000"),
        pytest.param("0.000943396227", "1.06", "990.00",
                     id="just above it: price 999.99999 -> 990"),
    ],
)
def test_price_for(probability: str, overround: str, expected: str) -> None:
    assert format_price(price_for(D(probability), D(overround))) == expected


# -- the published book's overround --------------------------------------------------

def next_rung(price: Decimal) -> Decimal | None:
    index = LADDER.index(price)
    return LADDER[index + 1] if index + 1 < len(LADDER) else None


def check_overround(market_type: str, book: tuple[tuple[str, Decimal], ...]) -> None:
    """sum(1/price) in [target, target + the ladder's rounding of each outcome].

    Rounding an outcome down from its true price t to the rung L below
    (L <= t < next rung U) adds 1/L - 1/t < 1/L - 1/U to its share.
    """
    margins = Margins()
    target = Fraction(margins.overround(market_type))
    prices = [D(p) for _o, p in margins.prices(market_type, book)]
    published = sum(Fraction(1) / Fraction(p) for p in prices)
    slack = sum(Fraction(1) / Fraction(p) - Fraction(1) / Fraction(next_rung(p)) for p in prices)
    assert target <= published < target + slack


BOOKS = [
    pytest.param("1x2", (("away", "0.25"), ("draw", "0.25"), ("home", "0.5")), id="1x2 even"),
    pytest.param("1x2", (("away", "0.45"), ("draw", "0.30"), ("home", "0.25")), id="1x2 away fav"),
    pytest.param("1x2", (("away", "0.05"), ("draw", "0.15"), ("home", "0.80")), id="1x2 long shot"),
    pytest.param("1x2", (("away", "0.333333333333"), ("draw", "0.333333333333"),
                         ("home", "0.333333333334")), id="1x2 thirds"),
    pytest.param("ou", (("over", "0.5"), ("under", "0.5")), id="ou even"),
    pytest.param("ou", (("over", "0.62"), ("under", "0.38")), id="ou 62/38"),
    pytest.param("ou", (("over", "0.9"), ("under", "0.1")), id="ou 90/10"),
]


@pytest.mark.parametrize(("market_type", "book"), BOOKS)
def test_published_overround_within_bounds(market_type: str, book: tuple) -> None:
    check_overround(market_type, tuple((o, D(p)) for o, p in book))


@settings(max_examples=300, deadline=None)
@given(
    market_type=st.sampled_from(sorted(DEFAULT_OVERROUNDS)),
    weights=st.lists(st.integers(min_value=1, max_value=10_000), min_size=2, max_size=12),
)
def test_published_overround_within_bounds_for_any_book(market_type: str, weights: list) -> None:
    book = normalise((f"o{i:02d}", D(w)) for i, w in enumerate(weights))
    overround = Margins().overround(market_type)
    # Outside the ladder the clamps decide, not the rounding (tested above).
    for _o, p in book:
        if not D(1) / D(1000) < p * overround < D(100) / D(101):
            return
    check_overround(market_type, book)


def test_rounding_is_down_never_better_than_target() -> None:
    margins = Margins()
    for weights in ([1, 1, 1], [5, 3, 2], [90, 7, 3], [1, 2, 3, 4, 5]):  # no clamp
        book = normalise((f"o{i}", D(w)) for i, w in enumerate(weights))
        overround = margins.overround("1x2")
        for (_o, p), (_o2, price) in zip(book, margins.prices("1x2", book), strict=True):
            fair_with_margin = Fraction(1) / (Fraction(p) * Fraction(overround))
            assert Fraction(D(price)) <= fair_with_margin


# -- configuration ---------------------------------------------------------------------

def test_defaults() -> None:
    assert Margins().to_dict() == {"1x2": "1.06", "ou": "1.05"}
    assert Margins({"ah": "1.04"}).overround("ah") == D("1.04")


@pytest.mark.parametrize(
    ("overrounds", "error"),
    [
        pytest.param({"1x2": 1.06}, TypeError, id="a float"),
        pytest.param({"1x2": 1}, TypeError, id="an int"),
        pytest.param({"1x2": "0.99"}, ValueError, id="below 1 pays out more than it takes"),
        pytest.param({"1x2": "106"}, ValueError, id="a percentage typed as a ratio"),
        pytest.param({"1x2": "x"}, ValueError, id="not a number"),
        pytest.param({"1x2": "NaN"}, ValueError, id="nan"),
    ],
)
def test_bad_overrounds_are_refused(overrounds: dict, error: type) -> None:
    with pytest.raises(error):
        Margins(overrounds)


def test_unknown_market_type_is_never_priced_by_guess() -> None:
    with pytest.raises(UnknownMarketType):
        Margins().prices("ah", (("a", D("0.5")), ("b", D("0.5"))))
    assert not Margins().knows("ah")


def test_no_floats_anywhere() -> None:
    book = normalise([("away", D(3)), ("draw", D(3)), ("home", D(4))])
    prices = Margins().prices("1x2", book)
    assert prices == (("away", "3.10"), ("draw", "3.10"), ("home", "2.34"))  # by hand
    assert all(type(o) is str and type(p) is str for o, p in prices)
    assert all(type(v) is Decimal for v in Margins().overrounds.values())
    with pytest.raises(TypeError):
        price_for(0.5, D("1.06"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ladder_floor(2.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("rounding", [decimal.ROUND_UP, decimal.ROUND_HALF_UP, decimal.ROUND_FLOOR])
def test_global_decimal_context_changes_nothing(rounding: str) -> None:
    books = [tuple((o, D(p)) for o, p in param.values[1]) for param in BOOKS]
    types = [param.values[0] for param in BOOKS]
    expected = [Margins().prices(t, b) for t, b in zip(types, books, strict=True)]
    with decimal.localcontext() as ctx:
        ctx.prec = 3
        ctx.rounding = rounding
        assert [Margins().prices(t, b) for t, b in zip(types, books, strict=True)] == expected
