"""One click as it is recorded (the shared click record) and the Redis call that records it.

Plain: `Click` holds what the route decided; `script_args()` is what
record_click.lua takes. The verdict is left to the script when it depends
on the dedupe key, so the record's JSON is built up to its last field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from attribution import keys

RECORD_CLICK_LUA = (Path(__file__).parent / "record_click.lua").read_text()


@dataclass(slots=True)
class Click:
    click_id: str
    code: str
    partner: str
    campaign: str
    creative: str
    ts: int  # Unix ns
    subs: dict[str, str]
    ip_hash: str
    ua: str
    referer: str
    bot: bool
    verdict: str = field(default="")  # set once recorded

    def record_prefix(self) -> bytes:
        """The record's canonical JSON (contract order) without its last field, verdict."""
        body = orjson.dumps({
            "click_id": self.click_id, "code": self.code, "partner": self.partner,
            "campaign": self.campaign, "creative": self.creative, "ts": self.ts,
            "subs": self.subs, "ip_hash": self.ip_hash, "ua": self.ua,
            "referer": self.referer,
        })
        return body[:-1] + b","

    def script_keys(self) -> list[str]:
        return [keys.CLICKS, keys.click_index(self.click_id),
                keys.dedupe(self.code, self.ip_hash, self.ua)]

    def script_args(self, dedupe_window_ms: int, attribution_window_ms: int) -> list:
        return [self.record_prefix(), "bot" if self.bot else "", dedupe_window_ms,
                attribution_window_ms,
                "click_id", self.click_id, "code", self.code, "partner", self.partner,
                "campaign", self.campaign, "creative", self.creative, "ts", self.ts,
                "subs", orjson.dumps(self.subs), "ip_hash", self.ip_hash, "ua", self.ua,
                "referer", self.referer]


def parse_record(raw: bytes | str) -> dict:
    """A stored click record (for readers: tests, statistics); json keeps the field order."""
    return json.loads(raw)
