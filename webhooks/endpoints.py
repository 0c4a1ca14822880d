"""A partner's endpoint: a signed JSON webhook or a GET postback template, and its secrets.

Stored as JSON in the endpoints hash (keys.ENDPOINTS); the CLI writes
it, the dispatcher reads it. Every field is checked here, so a bad
`--url` or `--events` is refused with a message naming it, never stored.
"""

from __future__ import annotations

import base64
import re
import secrets
import string
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import orjson
from ulid import ULID

EVENT_TYPES = ("conversion.registration", "conversion.ftd", "conversion.deposit")
POSTBACK_MACROS = ("click_id", "event", "amount", "currency", "sub1", "sub2", "sub3", "sub4",
                   "sub5", "conversion_id")
_PARTNER = re.compile(r"[A-Za-z0-9_-]{1,32}")


class EndpointError(ValueError):
    """An endpoint field the dispatcher could not deliver to; the message names it."""


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Secret:
    secret: str
    expires_s: float | None = None  # an old secret after a rotation: signed with until then


@dataclass
class Endpoint:
    id: str
    partner: str
    kind: str  # "webhook" (signed POST) or "postback" (GET of a URL template)
    url: str
    events: list[str] = field(default_factory=list)  # empty: every event type
    secrets: list[Secret] = field(default_factory=list)  # newest first
    enabled: bool = True
    disabled_reason: str | None = None
    created_s: float = 0.0

    def wants(self, event_type: str) -> bool:
        return self.enabled and (not self.events or event_type in self.events)

    def signing_secrets(self, now_s: float) -> list[str]:
        """The newest secret, then any old one still inside its rotation overlap."""
        return [s.secret for s in self.secrets if s.expires_s is None or s.expires_s > now_s]

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Endpoint:
        value = orjson.loads(raw)
        value["secrets"] = [Secret(**s) for s in value.get("secrets", [])]
        return cls(**value)


def check_partner(partner: str) -> str:
    if not _PARTNER.fullmatch(partner):
        raise EndpointError(f"--partner: {partner!r} is not a partner id ([A-Za-z0-9_-]{{1,32}})")
    return partner


def check_url(url: str, flag: str = "--url") -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EndpointError(f"{flag}: {url!r} is not an http:// or https:// URL with a host")
    return url


def check_events(raw: str | None) -> list[str]:
    if not raw:
        return []
    events = [e.strip() for e in raw.split(",") if e.strip()]
    unknown = [e for e in events if e not in EVENT_TYPES]
    if unknown:
        raise EndpointError(f"--events: unknown {', '.join(unknown)} "
                            f"(known: {', '.join(EVENT_TYPES)})")
    return events


def check_postback(template: str) -> str:
    check_url(template, "--postback")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise EndpointError(f"--postback: {exc}") from None
    unknown = [n for n in names if n not in POSTBACK_MACROS]
    if unknown:
        raise EndpointError(f"--postback: unknown macro {{{unknown[0]}}} "
                            f"(known: {', '.join('{' + m + '}' for m in POSTBACK_MACROS)})")
    return template


def new_endpoint(partner: str, *, url: str | None = None, postback: str | None = None,
                 events: str | None = None, now_s: float) -> Endpoint:
    """A checked endpoint with a new id (and a new secret, for a webhook)."""
    check_partner(partner)
    if (url is None) == (postback is None):
        raise EndpointError("give exactly one of --url (signed webhook) or --postback (GET)")
    wanted = check_events(events)
    endpoint_id = "ep_" + str(ULID()).lower()
    if url is not None:
        return Endpoint(endpoint_id, partner, "webhook", check_url(url), wanted,
                        [Secret(new_secret())], created_s=now_s)
    return Endpoint(endpoint_id, partner, "postback", check_postback(postback or ""), wanted,
                    created_s=now_s)


def rotate(endpoint: Endpoint, overlap_s: float, now_s: float) -> str:
    """A new secret first; the current ones kept for `overlap_s` (both signatures sent)."""
    if endpoint.kind != "webhook":
        raise EndpointError(f"{endpoint.id} is a postback: it has no secret to rotate")
    kept = [Secret(s.secret, min(s.expires_s or now_s + overlap_s, now_s + overlap_s))
            for s in endpoint.secrets if s.expires_s is None or s.expires_s > now_s]
    secret = new_secret()
    endpoint.secrets = [Secret(secret), *kept]
    return secret
