"""Partner statistics, the plain counting (PROTOCOL.md §12).

What one click or conversion adds to its partner's counts, how the stored
counts become rows (`campaign:{id}:{window}`, `creative:{id}:{window}` for
`today`, `1h` and `5m`, and the partner's per-minute series `minutes:1h`),
and which rows changed since they were last published. No I/O:
`attribution/stats_service.py` reads the streams, runs `COUNT_LUA` and
publishes what `StatsBoard` says.

Storage, chosen so that counting is exactly once and restart-proof: one Lua
step per record adds its id to the day's counted set and, only if it was not
there, increments the day's hash and the record's minute hash. A redelivered
or re-read record finds its id and adds nothing; the counts and the ids can
never disagree because they change together. The sliding windows are sums
of minute buckets, so they slide by the minute, and a row whose count drops
as time passes is republished.

Deposits are summed in integer millionths per currency (exact, unlike a
float), and shown as a decimal string with at least two decimals.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import orjson

from gateway.topics import is_partner_id, stats_topic

WINDOWS: tuple[tuple[str, int], ...] = (("1h", 60), ("5m", 5))  # sliding: minutes summed
COUNTERS = ("clicks", "unique_clicks", "bot_clicks", "duplicate_clicks", "registrations", "ftds")
DEPOSITS = "deposits."  # counter prefix of a currency's deposit sum: `deposits.EUR`
AMOUNT_SCALE = 1_000_000  # deposits are stored in millionths
VERDICT_COUNTER = {"ok": "unique_clicks", "bot": "bot_clicks", "duplicate": "duplicate_clicks"}
TYPE_COUNTER = {"registration": "registrations", "ftd": "ftds", "deposit": None}
DIMENSIONS = ("campaign", "creative")
NS_PER_MINUTE = 60 * 10**9
SERIES_KEY = "minutes:1h"  # the partner's per-minute series row
SERIES_MINUTES = 60  # its buckets: the minutes of the `1h` window, oldest first

# KEYS[1] counted ids of the day, KEYS[2] the day's counts, KEYS[3] the minute's
# ARGV[1] record id, ARGV[2] day keys' lifetime (ms), ARGV[3] minute key's
# lifetime (ms), then field, increment pairs.
# Returns 1 when counted, 0 when the id was counted before.
COUNT_LUA = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
for i = 4, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return 1
"""
DAY_KEYS_TTL_MS = 2 * 86_400_000  # today's counts outlive the day by one
MINUTE_KEYS_TTL_MS = 2 * 3_600_000  # the longest sliding window is an hour


class BadRecord(ValueError):
    """A stream record that is not a click or conversion of the shared contract."""


@dataclass(frozen=True, slots=True)
class Tally:
    """What one record adds: its counted id, partner, time and field increments."""

    record_id: str  # `click:{click_id}` or `conv:{conversion_id}`
    partner: str
    ts_ns: int
    increments: tuple[tuple[str, int], ...]  # (`{dim}:{id}:{counter}`, n)

    @property
    def day(self) -> str:
        return utc_day(self.ts_ns)

    @property
    def minute(self) -> int:
        return self.ts_ns // NS_PER_MINUTE


def utc_day(ts_ns: int) -> str:
    """Whole seconds first: a float of Unix nanoseconds rounds the day's last ones up."""
    return _dt.datetime.fromtimestamp(ts_ns // 10**9, _dt.UTC).strftime("%Y%m%d")


def _text(record: dict, name: str, *, required: bool = True) -> str | None:
    value = record.get(name)
    if value is None or value == "":
        if required:
            raise BadRecord(f"`{name}` missing")
        return None
    if not isinstance(value, str) or ":" in value or len(value) > 128:
        raise BadRecord(f"`{name}` must be a string without ':' of at most 128 characters")
    return value


def _ts(record: dict, name: str) -> int:
    value = record.get(name)
    if type(value) is not int or value <= 0:
        raise BadRecord(f"`{name}` must be a positive integer of Unix nanoseconds")
    return value


def _partner(value: object) -> str:
    if not is_partner_id(value):
        raise BadRecord("`partner` must be 1-32 of [A-Za-z0-9_-]")
    return value  # type: ignore[return-value]


def _spread(counters: dict[str, int], campaign: str | None, creative: str | None
            ) -> tuple[tuple[str, int], ...]:
    """The same counters under each dimension the record names."""
    out = []
    for dim, ident in (("campaign", campaign), ("creative", creative)):
        if ident is not None:
            out += [(f"{dim}:{ident}:{name}", n) for name, n in counters.items()]
    return tuple(out)


def tally_click(record: dict) -> Tally:
    """A click record (PROTOCOL.md §9): one click, counted apart by its verdict."""
    if not isinstance(record, dict):
        raise BadRecord("a click record must be a JSON object")
    click_id = _text(record, "click_id")
    verdict = record.get("verdict")
    if verdict not in VERDICT_COUNTER:
        raise BadRecord("`verdict` must be ok, bot or duplicate")
    counters = {"clicks": 1, VERDICT_COUNTER[verdict]: 1}
    return Tally(f"click:{click_id}", _partner(record.get("partner")), _ts(record, "ts"),
                 _spread(counters, _text(record, "campaign"),
                         _text(record, "creative", required=False)))


def tally_conversion(record: dict) -> Tally | None:
    """A conversion record (PROTOCOL.md §10), or None when it was not attributed
    (no partner to count it for; it stays in the stream all the same).

    Counted at `received_ts`, the platform's clock, as clicks are at theirs:
    an operator's late or skewed `ts` must not move it out of the windows.
    """
    if not isinstance(record, dict):
        raise BadRecord("a conversion record must be a JSON object")
    conversion_id = _text(record, "conversion_id")
    attributed = record.get("attributed")
    if attributed is None:
        return None
    if not isinstance(attributed, dict):
        raise BadRecord("`attributed` must be an object or null")
    kind = record.get("type")
    if kind not in TYPE_COUNTER:
        raise BadRecord("`type` must be registration, ftd or deposit")
    counters: dict[str, int] = {}
    if TYPE_COUNTER[kind] is not None:
        counters[TYPE_COUNTER[kind]] = 1
    if kind in ("ftd", "deposit"):
        currency = record.get("currency")
        if not (isinstance(currency, str) and len(currency) == 3 and currency.isalpha()
                and currency.isupper()):
            raise BadRecord("`currency` must be an ISO 4217 code")
        counters[DEPOSITS + currency] = _millionths(record.get("amount"))
    return Tally(f"conv:{conversion_id}", _partner(attributed.get("partner")),
                 _ts(record, "received_ts"),
                 _spread(counters, _text(attributed, "campaign"),
                         _text(attributed, "creative", required=False)))


def _millionths(amount: object) -> int:
    try:
        value = Decimal(amount) if isinstance(amount, str) else None
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite() or value < 0:
        raise BadRecord("`amount` must be a non-negative decimal string")
    scaled = value * AMOUNT_SCALE
    if scaled != scaled.to_integral_value():
        raise BadRecord("`amount` has more than 6 decimals")
    return int(scaled)


def _show_amount(millionths: int) -> str:
    value = (Decimal(millionths) / AMOUNT_SCALE).normalize()
    if value.as_tuple().exponent > -2:  # type: ignore[operator]
        value = value.quantize(Decimal("0.01"))
    return f"{value:f}"


def _counters(fields: dict[str, int]) -> dict:
    """A row's counters in PROTOCOL.md §12's order.

    `deposits` and `currency` are those of the row's one currency; a row that
    saw several shows the one with the largest sum and lists every sum under
    `deposits_by_currency` (never a sum across currencies).
    """
    out: dict = {name: fields.get(name, 0) for name in COUNTERS}
    sums = {k[len(DEPOSITS):]: v for k, v in fields.items() if k.startswith(DEPOSITS)}
    if not sums:
        out["deposits"] = _show_amount(0)
        out["currency"] = None
        return out
    currency = max(sorted(sums), key=lambda c: sums[c])
    out["deposits"] = _show_amount(sums[currency])
    out["currency"] = currency
    if len(sums) > 1:
        out["deposits_by_currency"] = {c: _show_amount(sums[c]) for c in sorted(sums)}
    return out


def _group(counts: dict[str, int], into: dict[str, dict[str, int]]) -> None:
    """`{dim}:{id}:{counter}` -> n, summed into rows by `{dim}:{id}`."""
    for name, n in counts.items():
        row, _, counter = name.rpartition(":")
        if not row:
            continue
        bucket = into.setdefault(row, {})
        bucket[counter] = bucket.get(counter, 0) + n


def rows(day: dict[str, int], minutes: dict[int, dict[str, int]], now_minute: int
         ) -> dict[str, dict]:
    """Every row with something in it, as of the minute `now_minute`.

    `day` is today's hash, `minutes` the minute hashes by minute (those
    outside a window are ignored, so the caller may pass more).
    """
    out: dict[str, dict] = {}
    today: dict[str, dict[str, int]] = {}
    _group(day, today)
    for row, fields in today.items():
        out[f"{row}:today"] = _counters(fields)
    for window, length in WINDOWS:
        summed: dict[str, dict[str, int]] = {}
        for minute, counts in minutes.items():
            if now_minute - length < minute <= now_minute:
                _group(counts, summed)
        for row, fields in summed.items():
            out[f"{row}:{window}"] = _counters(fields)
    return out


ZERO = _counters({})


def series(minutes: dict[int, dict[str, int]], now_minute: int) -> dict:
    """The value of the partner's `minutes:1h` row as of the minute `now_minute`.

    `{"counters": ..., "minutes": {"start": m, "clicks": [60 ints], ...}}`:
    bucket `i` of each list counts minute `start + i` (Unix seconds // 60),
    from `now_minute - 59` to `now_minute` (still filling), the minutes the
    `1h` rows sum. Partner-wide: every record names a campaign and creatives
    repeat their campaign's counts, so the campaign fields are the partner's.
    `counters` are the buckets' totals in a row's usual shape (deposits
    included), so the row reads like any other where a client expects them.
    Minutes outside the hour are ignored, so the caller may pass more.
    """
    start = now_minute - SERIES_MINUTES + 1
    buckets = {name: [0] * SERIES_MINUTES for name in COUNTERS}
    totals: dict[str, int] = {}
    for minute, counts in minutes.items():
        i = minute - start
        if not 0 <= i < SERIES_MINUTES:
            continue
        for name, n in counts.items():
            dim, _, rest = name.partition(":")
            if dim != "campaign":
                continue
            counter = rest.rpartition(":")[2]
            totals[counter] = totals.get(counter, 0) + n
            if counter in buckets:
                buckets[counter][i] += n
    return {"counters": _counters(totals), "minutes": {"start": start, **buckets}}


def partner_rows(day: dict[str, int], minutes: dict[int, dict[str, int]], now_minute: int
                 ) -> dict[str, dict]:
    """Every row of a partner as of `now_minute`, by key: `rows()`'s counters, and
    the series under `SERIES_KEY` (always there: its window moves even when empty)."""
    out = rows(day, minutes, now_minute)
    out[SERIES_KEY] = series(minutes, now_minute)
    return out


def event_body(key: str, ts_ns: int, counters: dict, minutes: dict | None = None) -> bytes:
    """The stats event after its seq (PROTOCOL.md §12: key, ts, counters, in that order;
    the series row adds `minutes` last)."""
    tail = b"" if minutes is None else b',"minutes":' + orjson.dumps(minutes)
    return (b'"key":' + orjson.dumps(key) + b',"ts":' + str(ts_ns).encode()
            + b',"counters":' + orjson.dumps(counters) + tail + b"}")


def row_body(key: str, ts_ns: int, value: dict) -> bytes:
    """The event body of a row's value as `partner_rows()` gives it."""
    if key == SERIES_KEY:
        return event_body(key, ts_ns, value["counters"], value["minutes"])
    return event_body(key, ts_ns, value)


def row_value(key: str, event: dict) -> dict:
    """A published event back to its row's value (what `row_body` was given).
    Raises KeyError or TypeError for an event that is not such a row."""
    if key == SERIES_KEY:
        return {"counters": event["counters"], "minutes": event["minutes"]}
    return event["counters"]


class StatsBoard:
    """What was last published per partner, and so which rows changed.

    A row that had counts and has none now (a sliding window that emptied, a
    new UTC day) is published once as zeros, then forgotten. Values are
    compared whole: the series row changes when a bucket does or its window
    moves (`start`).
    """

    def __init__(self) -> None:
        self.published: dict[str, dict[str, dict]] = {}

    def known(self, partner: str) -> bool:
        return partner in self.published

    def seed(self, partner: str, latest: dict[str, dict]) -> None:
        """Rows already in the topic's latest state (after a restart)."""
        self.published[partner] = {k: v for k, v in latest.items() if v != ZERO}

    def changes(self, partner: str, current: dict[str, dict]) -> list[tuple[str, dict]]:
        """The rows to publish now for `partner`, and they count as published."""
        before = self.published.setdefault(partner, {})
        out = [(key, counters) for key, counters in sorted(current.items())
               if before.get(key) != counters]
        out += [(key, ZERO) for key in sorted(before)
                if key not in current and key != SERIES_KEY]  # the series is never absent
        self.published[partner] = dict(current)
        return out


def topic_of(partner: str) -> str:
    return stats_topic(partner)
