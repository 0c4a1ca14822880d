"""From consensus probabilities to the prices players see (issue 16, point 3).

A fair book (probabilities summing to 1) is turned into prices by a target
overround per market type: each probability is scaled by the overround
(proportional margin: every outcome carries the same share of it), and the
price is 1 over that, rounded DOWN onto the standard price ladder.

Why down: rounding up would offer odds better than the target overround
allows, and a book whose overround falls below target loses money to sharp
players. Rounding down keeps the published book's overround at or above the
target, and above it by no more than one ladder step per outcome (the bound
the tests check).

Every region must publish the same bytes (PROTOCOL.md section 8), so nothing
here touches a float or the global decimal context: the arithmetic runs in
`MARGIN_CONTEXT`, whose division rounds toward minus infinity. That makes
"round down onto the ladder" exact: every ladder price has two decimals and
is exactly representable, so a quotient truncated to 28 digits is at or
above a ladder price exactly when the true quotient is.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import (
    ROUND_CEILING,
    ROUND_FLOOR,
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    DivisionByZero,
    InvalidOperation,
    Overflow,
)

# Division rounds toward minus infinity (see the module docstring); Inexact is
# not trapped because 1/q is rarely exact, but anything undefined is.
MARGIN_CONTEXT = Context(
    prec=28, rounding=ROUND_FLOOR, traps=[InvalidOperation, DivisionByZero, Overflow]
)
# p * overround rounds toward plus infinity, so that 1 over it can only err
# downward too (consensus probabilities have 12 decimals, so it is exact in
# practice; the direction matters only for a caller passing longer ones).
SCALE_CONTEXT = Context(
    prec=28, rounding=ROUND_CEILING, traps=[InvalidOperation, DivisionByZero, Overflow]
)

# (from, to, step): the standard ladder. Each band starts where the previous
# one ends; a band's first price is its `from` (already in the previous band).
LADDER_BANDS: tuple[tuple[str, str, str], ...] = (
    ("1.01", "2.00", "0.01"),
    ("2.00", "3.00", "0.02"),
    ("3.00", "4.00", "0.05"),
    ("4.00", "6.00", "0.1"),
    ("6.00", "10.00", "0.2"),
    ("10.00", "20.00", "0.5"),
    ("20.00", "30.00", "1"),
    ("30.00", "50.00", "2"),
    ("50.00", "100.00", "5"),
    ("100.00", "1000.00", "10"),
)
CENT = Decimal("0.01")
MAX_OVERROUND = Decimal(2)  # a sanity bound: "106" meant as "1.06" is refused

DEFAULT_OVERROUNDS: dict[str, str] = {"1x2": "1.06", "ou": "1.05"}


def _build_ladder() -> tuple[Decimal, ...]:
    prices: list[Decimal] = []
    for low, high, step in LADDER_BANDS:
        price, end, inc = Decimal(low), Decimal(high), Decimal(step)
        while price <= end:
            if not prices or price > prices[-1]:
                prices.append(price.quantize(CENT, context=MARGIN_CONTEXT))
            price = MARGIN_CONTEXT.add(price, inc)
    return tuple(prices)


LADDER: tuple[Decimal, ...] = _build_ladder()
MIN_PRICE = LADDER[0]
MAX_PRICE = LADDER[-1]


class UnknownMarketType(ValueError):
    """A market type with no configured overround: it is never priced by guess."""


def ladder_floor(price: Decimal) -> Decimal:
    """The largest ladder price at or below `price`, clamped to [1.01, 1000].

    Below 1.01 the clamp rounds UP (the ladder has nothing lower): an outcome
    that near-certain is offered at 1.01, the shortest price there is.
    """
    if not isinstance(price, Decimal):
        raise TypeError(f"price must be a Decimal, not {type(price).__name__}")
    if not price.is_finite():
        raise ValueError(f"price {price} is not finite")
    if price <= MIN_PRICE:
        return MIN_PRICE
    return LADDER[bisect.bisect_right(LADDER, price) - 1]


def format_price(price: Decimal) -> str:
    """Two decimals, as in PROTOCOL.md's example: "3.40", "12.50", "110.00"."""
    return str(price.quantize(CENT, rounding=ROUND_HALF_EVEN, context=MARGIN_CONTEXT))


def price_for(probability: Decimal, overround: Decimal) -> Decimal:
    """One outcome's ladder price: 1 / (p * overround), rounded down.

    A probability of zero (or so small that the price passes 1000) gets the
    longest price, 1000.
    """
    if not isinstance(probability, Decimal) or not isinstance(overround, Decimal):
        raise TypeError("probability and overround must be Decimals")
    if probability < 0:
        raise ValueError(f"probability {probability} is negative")
    scaled = SCALE_CONTEXT.multiply(probability, overround)
    if SCALE_CONTEXT.multiply(scaled, MAX_PRICE) <= 1:  # no division by zero, no huge quotient
        return MAX_PRICE
    return ladder_floor(MARGIN_CONTEXT.divide(1, scaled))


def _overround(value: object, name: str) -> Decimal:
    if isinstance(value, float) or not isinstance(value, str | Decimal):
        raise TypeError(f"overround of {name!r} must be a decimal string, not {value!r}")
    try:
        parsed = Decimal(value)
    except InvalidOperation:
        raise ValueError(f"overround of {name!r} is not a decimal: {value!r}") from None
    if not parsed.is_finite() or not 1 <= parsed <= MAX_OVERROUND:
        raise ValueError(f"overround of {name!r} must be within [1, {MAX_OVERROUND}]: {value}")
    return parsed


@dataclass(frozen=True, slots=True)
class Margins:
    """The target overround of each market type (configuration).

    Given as decimal strings ({"1x2": "1.06"}); kept as Decimals. A market
    type that is not listed is not priced (`UnknownMarketType`): the engine
    refuses its messages rather than guess a margin.
    """

    overrounds: Mapping[str, Decimal] = field(
        default_factory=lambda: dict(DEFAULT_OVERROUNDS)  # type: ignore[arg-type]
    )

    def __post_init__(self) -> None:
        if not isinstance(self.overrounds, Mapping):
            raise TypeError("overrounds must map market type to a decimal string")
        parsed = {str(k): _overround(v, str(k)) for k, v in sorted(self.overrounds.items())}
        object.__setattr__(self, "overrounds", parsed)

    def knows(self, market_type: str) -> bool:
        return market_type in self.overrounds

    def overround(self, market_type: str) -> Decimal:
        try:
            return self.overrounds[market_type]
        except KeyError:
            raise UnknownMarketType(
                f"no overround configured for market type {market_type!r}"
            ) from None

    def prices(
        self, market_type: str, probabilities: tuple[tuple[str, Decimal], ...]
    ) -> tuple[tuple[str, str], ...]:
        """The published prices, sorted by outcome, as two-decimal strings."""
        overround = self.overround(market_type)
        return tuple(
            (outcome, format_price(price_for(p, overround)))
            for outcome, p in sorted(probabilities)
        )

    def to_dict(self) -> dict[str, str]:
        """The configuration as JSON-ready strings (kept in engine snapshots)."""
        return {k: str(v) for k, v in sorted(self.overrounds.items())}
