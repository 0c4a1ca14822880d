"""From a conversion record (and its click) to the event partners receive.

One event per attributed conversion: `{"type","timestamp","data"}` with
`data` holding the conversion, its click and `partner_seq` (PROTOCOL.md
section 11). `partner_seq` must be assigned in the same Redis step that
enqueues the event (a crash between the two would leave a gap or reuse a
number), so the body is built here in two halves around it and the
enqueue script joins them with the number it INCRs.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

import orjson

from webhooks.schedule import rfc3339

CONVERSION_TYPES = ("registration", "ftd", "deposit")


class NotAnEvent(ValueError):
    """A conversion record that gives no event; the message says why.

    `expected`: an unattributed conversion, which is normal and not logged."""

    def __init__(self, message: str, expected: bool = False) -> None:
        super().__init__(message)
        self.expected = expected


@dataclass(frozen=True)
class EventParts:
    type: str  # conversion.registration|ftd|deposit
    partner: str
    head: bytes  # the body up to partner_seq's value
    tail: bytes  # what follows it
    accepted_ns: int  # when the conversion was accepted (received_ts): latency starts here

    def body(self, partner_seq: int) -> bytes:
        return self.head + str(partner_seq).encode() + self.tail


def _subs(raw: object) -> dict:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, (str, bytes)) and raw:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}
    return {}


def build_event(conversion: dict, click: dict[str, str]) -> EventParts:
    """The event of an attributed conversion; `click` is its click index hash (may be empty)."""
    attributed = conversion.get("attributed")
    if not isinstance(attributed, dict) or not attributed.get("partner"):
        raise NotAnEvent("not attributed to a partner", expected=True)
    kind = conversion.get("type")
    if kind not in CONVERSION_TYPES:
        raise NotAnEvent(f"type {kind!r} is not one of {', '.join(CONVERSION_TYPES)}")
    received = conversion.get("received_ts")
    if not isinstance(received, int):
        raise NotAnEvent("received_ts is not a Unix time in ns")
    click_id = conversion.get("click_id")
    data = {
        "conversion_id": conversion.get("conversion_id"),
        "id": conversion.get("id"),
        "type": kind,
        "player": conversion.get("player"),
        "amount": conversion.get("amount"),
        "currency": conversion.get("currency"),
        "ts": conversion.get("ts"),
        "received_ts": received,
        "click": {
            "click_id": click_id,
            "code": click.get("code"),
            "campaign": click.get("campaign", attributed.get("campaign")),
            "creative": click.get("creative", attributed.get("creative")),
            "subs": _subs(click.get("subs")),
        },
    }
    event_type = f"conversion.{kind}"
    head = orjson.dumps({"type": event_type, "timestamp": rfc3339(received / 1e9), "data": data})
    # '{"type":..,"data":{...}}' -> '{"type":..,"data":{...,"partner_seq":' N '}}'
    head = head[:-2] + b',"partner_seq":'
    return EventParts(event_type, str(attributed["partner"]), head, b"}}", received)


def render_postback(template: str, event: dict) -> str:
    """The template's macros filled in from an event, each URL-encoded (an absent one: empty)."""
    data = event["data"]
    click = data.get("click") or {}
    subs = click.get("subs") or {}
    values = {"click_id": click.get("click_id"), "event": event["type"],
              "amount": data.get("amount"), "currency": data.get("currency"),
              "conversion_id": data.get("conversion_id")}
    values.update({f"sub{i}": subs.get(f"sub{i}") for i in range(1, 6)})
    encoded = {k: quote("" if v is None else str(v), safe="") for k, v in values.items()}
    return template.format_map(encoded)
