"""One provider message: the aggregator's input format, its parser and canonical bytes.

A provider adapter (one per real odds provider) turns whatever the provider
speaks into these messages and appends them to that provider's stream in
every region's Redis (docs/aggregator.md, "Input format"). Everything after
the adapter is a deterministic function of these messages, so the format is
strict where looseness would let two regions read one message two ways:

- values are decimal strings with a fixed grammar, never JSON numbers (a
  float parsed in one language and printed in another is not the same value);
- the outcomes of a message are sorted, so the dataclass, its equality and
  its bytes do not depend on the order a provider happened to list them;
- unknown keys are refused, not ignored: a field one reader ignores and a
  newer reader uses would split the regions;
- `encode` writes one canonical form (fixed key order, no spaces), so the
  copy a region stores and the copy it re-reads after a restart are the same
  bytes, and `parse(encode(m)) == m`.

Every refusal is an `InvalidInput` naming the field and why, raised before a
message exists, so the merge never holds a message it could not re-encode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

import orjson

KINDS = ("prices", "probabilities", "heartbeat")
QUOTE_KINDS = ("prices", "probabilities")
STATUSES = ("open", "suspended", "closed")
MAX_OUTCOMES = 64
MAX_INPUT_BYTES = 16 * 1024  # 64 outcomes at ~60 bytes each, with room; a bigger one is junk
MAX_INT = 2**63 - 1  # pseq and pts fit a signed 64-bit integer, as in Redis and orjson

_PROVIDER = re.compile(r"[a-z0-9_\-]{1,32}")
_OUTCOME = re.compile(r"[A-Za-z0-9_.+\-]{1,32}")
_MARKET_TYPE = re.compile(r"[A-Za-z0-9_.+\-]{1,32}")
# "1.85", "0.5", "12": no sign, no exponent, no leading zero, at most 6 decimals.
_DECIMAL = re.compile(r"(?:0|[1-9][0-9]{0,5})(?:\.[0-9]{1,6})?")
_ID = r"(?:0|[1-9][0-9]{0,11})"  # the topic grammar's ids (gateway/topics.py)
_MARKET = re.compile(rf"{_ID}:{_ID}:{_ID}")

_ONE = Decimal(1)
_HEARTBEAT_KEYS = ("provider", "pseq", "pts", "kind")
_QUOTE_KEYS = (*_HEARTBEAT_KEYS, "market", "event_id", "market_type", "status", "values")


class InvalidInput(ValueError):
    """A provider message the aggregator refuses; the text names the field and why."""


@dataclass(frozen=True, slots=True)
class ProviderMessage:
    """One message of one provider, in that provider's own order (`pseq`).

    A heartbeat carries only provider, pseq, pts and kind: it says "nothing
    of mine is older than `pts` any more", which is what lets the merge move
    on while a provider has no price to send.
    """

    provider: str  # [a-z0-9_-]{1,32}
    pseq: int  # the provider's own sequence, 1, 2, 3... per provider, no gaps
    pts: int  # the provider's timestamp, Unix ns (non-decreasing per provider)
    kind: str  # "prices" | "probabilities" | "heartbeat"
    market: str = ""  # "sport:league:market" (empty only for heartbeats)
    event_id: str = ""  # the match id, 1-64 chars (empty only for heartbeats)
    market_type: str = ""  # e.g. "1x2", "ou" (empty only for heartbeats)
    status: str = "open"  # open | suspended | closed
    values: tuple[tuple[str, str], ...] = ()  # outcome -> decimal string, sorted by outcome

    @property
    def is_heartbeat(self) -> bool:
        return self.kind == "heartbeat"


def _int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass; True must not pass as pseq 1.
    if type(value) is not int:
        raise InvalidInput(f"{name}: must be an integer, got {type(value).__name__}")
    if not minimum <= value <= MAX_INT:
        raise InvalidInput(f"{name}: must be between {minimum} and 2**63-1, got {value}")
    return value


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{name}: must be a string, got {type(value).__name__}")
    return value


def check_value(kind: str, outcome: str, value: object) -> str:
    """One outcome's value: the decimal grammar, then the range of its kind.

    A price is decimal odds, 1/probability, so it lies in [1, 999999.999999];
    a probability lies in (0, 1]. Both bounds mirror each other: a price below
    1 would be a probability above 1.
    """
    where = f"values[{outcome!r}]"
    if not isinstance(value, str):
        raise InvalidInput(f"{where}: must be a decimal string like \"1.85\", got "
                           f"{type(value).__name__}")
    if not _DECIMAL.fullmatch(value):
        raise InvalidInput(f"{where}: {value!r} is not a decimal string (digits, at most "
                           "6 decimals, no sign, exponent or leading zero)")
    number = Decimal(value)  # exact: built from a string, no context involved
    if kind == "prices" and number < _ONE:
        raise InvalidInput(f"{where}: a price is decimal odds, at least 1, got {value}")
    if kind == "probabilities" and not 0 < number <= _ONE:
        raise InvalidInput(f"{where}: a probability must be in (0, 1], got {value}")
    return value


def validate(msg: ProviderMessage) -> ProviderMessage:
    """Check every field of a message built in code; the message itself, or `InvalidInput`.

    `parse` ends here, and `encode` starts here, so no message that could not
    be parsed back is ever written.
    """
    if not isinstance(msg.provider, str) or not _PROVIDER.fullmatch(msg.provider):
        raise InvalidInput(f"provider: {msg.provider!r} is not 1-32 of [a-z0-9_-]")
    _int("pseq", msg.pseq, 1)
    _int("pts", msg.pts, 0)
    if msg.kind not in KINDS:
        raise InvalidInput(f"kind: {msg.kind!r} is not one of {', '.join(KINDS)}")
    if msg.kind == "heartbeat":
        if msg.market or msg.event_id or msg.market_type or msg.values or msg.status != "open":
            raise InvalidInput("kind: a heartbeat carries no market, event_id, market_type, "
                               "status or values")
        return msg
    if not isinstance(msg.market, str) or not _MARKET.fullmatch(msg.market):
        raise InvalidInput(f"market: {msg.market!r} is not 'sport:league:market' "
                           "(decimal ids, no leading zeros)")
    if not isinstance(msg.event_id, str) or not 1 <= len(msg.event_id) <= 64:
        raise InvalidInput("event_id: must be a string of 1 to 64 characters")
    if not isinstance(msg.market_type, str) or not _MARKET_TYPE.fullmatch(msg.market_type):
        raise InvalidInput(f"market_type: {msg.market_type!r} is not 1-32 of [A-Za-z0-9_.+-]")
    if msg.status not in STATUSES:
        raise InvalidInput(f"status: {msg.status!r} is not one of {', '.join(STATUSES)}")
    values = msg.values
    if not isinstance(values, tuple):
        raise InvalidInput("values: must be a tuple of (outcome, value) pairs")
    if len(values) > MAX_OUTCOMES:
        raise InvalidInput(f"values: {len(values)} outcomes, at most {MAX_OUTCOMES}")
    if not values and msg.status == "open":
        raise InvalidInput("values: an open market needs at least one outcome")
    previous = ""
    for pair in values:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise InvalidInput("values: every entry must be an (outcome, value) pair")
        outcome, value = pair
        if not isinstance(outcome, str) or not _OUTCOME.fullmatch(outcome):
            raise InvalidInput(f"values: outcome {outcome!r} is not 1-32 of [A-Za-z0-9_.+-]")
        if outcome <= previous:
            raise InvalidInput(f"values: outcome {outcome!r} is out of order or repeated "
                               "(outcomes are sorted and unique)")
        previous = outcome
        check_value(msg.kind, outcome, value)
    return msg


def parse(raw: bytes) -> ProviderMessage:
    """The message in `raw` (one JSON object), or `InvalidInput` saying what is wrong.

    A heartbeat has exactly the keys provider, pseq, pts, kind; a quote has
    those and market, event_id, market_type, status, values. Every key is
    required and no other is allowed.
    """
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise InvalidInput(f"input: must be bytes, got {type(raw).__name__}")
    if len(raw) > MAX_INPUT_BYTES:
        raise InvalidInput(f"input: {len(raw)} bytes, at most {MAX_INPUT_BYTES}")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"input: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"input: must be a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise InvalidInput(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    expected = _HEARTBEAT_KEYS if kind == "heartbeat" else _QUOTE_KEYS
    missing = [key for key in expected if key not in data]
    if missing:
        raise InvalidInput(f"{missing[0]}: missing (a {kind} message has {', '.join(expected)})")
    extra = sorted(key for key in data if key not in expected)
    if extra:
        raise InvalidInput(f"{extra[0]}: not a field of a {kind} message")
    provider = _text("provider", data["provider"])
    pseq = _int("pseq", data["pseq"], 1)
    pts = _int("pts", data["pts"], 0)
    if kind == "heartbeat":
        return validate(ProviderMessage(provider, pseq, pts, kind))
    raw_values = data["values"]
    if not isinstance(raw_values, dict):
        raise InvalidInput(f"values: must be an object of outcome -> decimal string, got "
                           f"{type(raw_values).__name__}")
    if len(raw_values) > MAX_OUTCOMES:
        raise InvalidInput(f"values: {len(raw_values)} outcomes, at most {MAX_OUTCOMES}")
    msg = ProviderMessage(
        provider=provider,
        pseq=pseq,
        pts=pts,
        kind=kind,
        market=_text("market", data["market"]),
        event_id=_text("event_id", data["event_id"]),
        market_type=_text("market_type", data["market_type"]),
        status=_text("status", data["status"]),
        values=tuple(sorted(raw_values.items())),
    )
    return validate(msg)


def encode(msg: ProviderMessage) -> bytes:
    """The canonical bytes of a message: fixed key order, no spaces, outcomes sorted.

    Byte-stable: equal messages give equal bytes, on any machine, so a
    region's stored copy can be compared and re-read byte for byte.
    """
    validate(msg)
    if msg.kind == "heartbeat":
        obj: dict = {"provider": msg.provider, "pseq": msg.pseq, "pts": msg.pts,
                     "kind": msg.kind}
    else:
        obj = {
            "provider": msg.provider,
            "pseq": msg.pseq,
            "pts": msg.pts,
            "kind": msg.kind,
            "market": msg.market,
            "event_id": msg.event_id,
            "market_type": msg.market_type,
            "status": msg.status,
            "values": dict(msg.values),  # already sorted and unique (validate)
        }
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError as exc:  # a lone surrogate in event_id
        raise InvalidInput(f"event_id: cannot be written as UTF-8 JSON ({exc})") from None
