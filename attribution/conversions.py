"""Conversions (PROTOCOL.md §10): what the operator may post, and whom it credits.

Plain decisions, no awaits; attribution/intake.py is the asyncio shell that
reads the click index and stores the outcome.

- `Conversion.parse` checks a posted body and names the first bad field
  (`ConversionError.field`), so the operator's developer fixes the right
  thing from the 400 alone. Unknown fields are refused rather than
  ignored: a misspelt `currency` must not quietly become a conversion
  without one.
- Attribution is last-click within OG_ATTRIBUTION_WINDOW_S, decided in two
  steps so that a forged id costs no Redis read: `check_click_id` verifies
  the id's MAC and its own time (a ULID carries its millisecond), then
  `attribute` takes the click index's fields (or None: nothing there).
  The window is measured from the click to the conversion's own `ts` (a
  back office that reports late does not lose a credit it earned), never
  to a time later than the post itself (a `ts` in the future cannot stretch
  it).
- `Outcome` holds the answer the operator gets and the record appended to
  og:conversions, both as bytes, since the first answer is stored and
  returned again byte for byte to every retry of the same `id`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

import orjson

from attribution.clickid import ClickIdInfo, ForgedClickId, verify
from attribution.settings import ClickKeys

TYPES = ("registration", "ftd", "deposit")
# Money changes hands in these, so they must say how much and in what.
WITH_AMOUNT = frozenset({"ftd", "deposit"})
FIELDS = ("id", "click_id", "type", "player", "amount", "currency", "ts")
REQUIRED = ("id", "click_id", "type", "player", "ts")
# A decimal string as prices are written (PROTOCOL.md §1): no sign, no exponent,
# no leading zeros, at most 8 decimals; a float would lose cents on the way.
AMOUNT = re.compile(r"(0|[1-9][0-9]{0,17})(\.[0-9]{1,8})?")
CURRENCY = re.compile(r"[A-Z]{3}")  # ISO 4217 alphabetic code
MAX_ID = 128
MAX_PLAYER = 128
# Click ids are at most 64 characters (clickid.MAX_LENGTH); a longer string is
# refused as a bad field, anything shorter that does not verify is `forged_click`.
MAX_CLICK_ID = 128
# Unix nanoseconds: below 10**18 (2001-09-09) the value is seconds, milliseconds
# or microseconds by mistake, which would otherwise expire every click.
MIN_TS_NS = 10**18
MAX_TS_NS = 2**63 - 1


class ConversionError(ValueError):
    """A posted conversion that cannot be taken; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Reason(StrEnum):
    """Why a stored conversion credits nobody (PROTOCOL.md §10)."""

    UNKNOWN_CLICK = "unknown_click"  # a genuine id, but no click under it (or long gone)
    FORGED_CLICK = "forged_click"  # not an id this platform signed
    EXPIRED_CLICK = "expired_click"  # the click is older than the attribution window


@dataclass(frozen=True, slots=True)
class Conversion:
    id: str
    click_id: str
    type: str
    player: str
    amount: str | None
    currency: str | None
    ts: int  # Unix ns, when the player converted (the operator's clock)

    @classmethod
    def parse(cls, body: bytes) -> Conversion:
        """The conversion in a posted body; ConversionError naming the first bad field."""
        if not body:
            raise ConversionError("body", "empty; send the conversion as a JSON object")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ConversionError("body", "not JSON (UTF-8 JSON object expected)") from None
        if not isinstance(data, dict):
            raise ConversionError("body", "must be a JSON object")
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise ConversionError(unknown[0][:64], "unknown field")
        for name in REQUIRED:
            if name not in data:
                raise ConversionError(name, "required")
        conv_id = _text(data, "id", MAX_ID)
        click_id = _text(data, "click_id", MAX_CLICK_ID)
        kind = data["type"]
        if kind not in TYPES:
            raise ConversionError("type", f"must be one of {', '.join(TYPES)}")
        player = _text(data, "player", MAX_PLAYER)
        ts = data["ts"]
        if type(ts) is not int:
            raise ConversionError("ts", "must be an integer (Unix nanoseconds)")
        if not MIN_TS_NS <= ts <= MAX_TS_NS:
            raise ConversionError("ts", "out of range: Unix nanoseconds expected "
                                  "(19 digits in this century)")
        amount, currency = data.get("amount"), data.get("currency")
        if kind in WITH_AMOUNT:
            if amount is None:
                raise ConversionError("amount", f"required for {kind}")
            if currency is None:
                raise ConversionError("currency", f"required for {kind}")
        if amount is not None and (not isinstance(amount, str) or not AMOUNT.fullmatch(amount)):
            raise ConversionError("amount", 'must be a decimal string such as "25.00" '
                                  "(no sign or exponent, at most 8 decimals)")
        if currency is not None and (not isinstance(currency, str)
                                     or not CURRENCY.fullmatch(currency)):
            raise ConversionError("currency", "must be an ISO 4217 code: three upper-case "
                                  "letters such as EUR")
        if (amount is None) != (currency is None):
            missing = "currency" if currency is None else "amount"
            raise ConversionError(missing, "amount and currency go together")
        return cls(conv_id, click_id, kind, player, amount, currency, ts)


def _text(data: dict, name: str, longest: int) -> str:
    value = data[name]
    if not isinstance(value, str):
        raise ConversionError(name, f"must be a string of 1-{longest} characters")
    if not 1 <= len(value) <= longest:
        raise ConversionError(name, f"must be 1-{longest} characters long")
    if not value.isprintable():
        raise ConversionError(name, "must not contain control characters")
    return value


@dataclass(frozen=True, slots=True)
class Attribution:
    """Whom a conversion credits: `credited` (partner, campaign, creative) or a `reason`."""

    credited: dict[str, str] | None
    reason: Reason | None = None


def reference_ns(conversion: Conversion, received_ns: int) -> int:
    """The moment the window is measured to: the conversion's `ts`, at most the post's time."""
    return min(conversion.ts, received_ns)


def check_click_id(click_id: str, keys: ClickKeys, reference: int,
                   window_s: int) -> ClickIdInfo | Attribution:
    """Step one, without Redis: the verified id, or the Attribution already decided.

    An id minted longer than the window before `reference` is expired from
    its own time: its index would have expired too, and `unknown_click`
    would hide why.
    """
    try:
        info = verify(click_id, keys)
    except ForgedClickId:
        return Attribution(None, Reason.FORGED_CLICK)
    if reference - info.ts_ms * 1_000_000 > window_s * 1_000_000_000:
        return Attribution(None, Reason.EXPIRED_CLICK)
    return info


def attribute(click: dict[str, str] | None, reference: int, window_s: int) -> Attribution:
    """Step two: the click index's fields (og:click:{id}), or None when it holds none.

    The record's own `ts` is checked against the window as well: it is the
    click's time as recorded, whatever the index's expiry says.
    """
    if not click:
        return Attribution(None, Reason.UNKNOWN_CLICK)
    try:
        click_ts = int(click["ts"])
        credited = {"partner": click["partner"], "campaign": click["campaign"],
                    "creative": click["creative"]}
    except (KeyError, ValueError):  # not a record this platform wrote
        return Attribution(None, Reason.UNKNOWN_CLICK)
    if reference - click_ts > window_s * 1_000_000_000:
        return Attribution(None, Reason.EXPIRED_CLICK)
    return Attribution(credited)


@dataclass(frozen=True, slots=True)
class Outcome:
    answer: bytes  # the 202's body, stored at og:conv:{id} and returned to every retry
    record: bytes  # the conversion record, appended to og:conversions


def outcome(conversion: Conversion, attribution: Attribution, conversion_id: str,
            received_ns: int) -> Outcome:
    """The answer and the record of a conversion (the shared contract's field order)."""
    answer: dict = {"conversion_id": conversion_id, "attributed": attribution.credited}
    if attribution.reason is not None:
        answer["reason"] = str(attribution.reason)
    record = {
        "conversion_id": conversion_id, "id": conversion.id, "click_id": conversion.click_id,
        "type": conversion.type, "player": conversion.player, "amount": conversion.amount,
        "currency": conversion.currency, "ts": conversion.ts, "received_ts": received_ns,
        "attributed": attribution.credited,
        "reason": None if attribution.reason is None else str(attribution.reason),
    }
    return Outcome(orjson.dumps(answer), orjson.dumps(record))
