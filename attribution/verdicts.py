"""Who clicked: the client address hash and the `bot` verdict of a click (PROTOCOL.md §9).

`duplicate` is not decided here: it needs the dedupe key in Redis and is
checked in the same round trip that records the click (record_click.lua).

Bots are redirected like anyone; the verdict only keeps them out of the
partner's unique clicks. A click is `bot` when its user agent is a
crawler's (crawlerdetect's list, compiled once per process), when it has
no user agent at all (every browser sends one), when it is a HEAD (a link
checker; a person's browser asks with GET), or when a prefetch header
says no person asked for it yet (`Purpose: prefetch` from Chrome and
Safari, `Sec-Purpose: prefetch` from the Speculation Rules, `X-Moz:
prefetch` from Firefox).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from crawlerdetect import CrawlerDetect

from gateway.ratelimit import client_address

_CRAWLERS = CrawlerDetect()
PREFETCH_HEADERS = ("Purpose", "Sec-Purpose", "X-Moz")


def load_patterns() -> None:
    """Compile crawlerdetect's patterns now (a worker's start), not on the first click."""
    _CRAWLERS.is_crawler("Mozilla/5.0")


def is_crawler(user_agent: str) -> bool:
    """A crawler's user agent, or none at all."""
    return not user_agent.strip() or _CRAWLERS.is_crawler(user_agent)


def is_bot(method: str, user_agent: str, header: Callable[[str], str | None]) -> bool:
    """Whether a click is not a person's: HEAD, a prefetch, or a crawler's user agent."""
    if method == "HEAD":
        return True
    for name in PREFETCH_HEADERS:
        value = header(name)
        if value is not None and "prefetch" in value.lower():
            return True
    return is_crawler(user_agent)


def client_hash(secret: bytes, peer: str | None, forwarded_for: list[str]) -> str:
    """HMAC-SHA256 of the client's address (hex, 32 chars): stable across workers, and
    not reversible by trying all four billion IPv4 addresses without the key."""
    address = client_address(peer, forwarded_for)
    text = str(address) if address is not None else (peer or "unknown")
    return hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()[:32]
