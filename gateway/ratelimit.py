"""Rate limits of `GET /v1/snapshot`: per client, and on the worker's reads from Redis.

A WebSocket limits requests per connection, but every HTTP request comes
on a new connection, so the bucket belongs to the client instead: the
token's player when the request carries a valid one (anonymous players
all share one name, so they count by address), else the peer address.
Behind HAProxy every peer is HAProxy on loopback, which appends the real
client to X-Forwarded-For (`option forwardfor`); that header is believed
only from a loopback peer, and only its last entry, the one HAProxy
wrote (anything before it came from the client). An IPv6 client counts
by its /64, the block one host usually holds, so rotating addresses
within it buys nothing.

The table of buckets is bounded (least recently seen evicted first): a
crowd of addresses can push a client's bucket out and so refill it, which
is why a second, worker-wide bucket caps the snapshot reads that miss the
worker's memory and go to Redis, whoever asks.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict

from gateway.auth import Claims
from gateway.session import RateLimiter


def retry_after_s(bucket: RateLimiter) -> int:
    """Whole seconds until a bucket that just refused holds a token again (>= 1)."""
    return max(1, math.ceil((1.0 - bucket.tokens) / bucket.rate))


class ClientBuckets:
    """A token bucket per client key, for the `capacity` most recently seen clients."""

    def __init__(self, rate: float, burst: float, capacity: int) -> None:
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        self._buckets: OrderedDict[str, RateLimiter] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, key: str, now: float) -> int | None:
        """None when `key` may go on; else the Retry-After, in seconds, of its refusal."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = RateLimiter(self.rate, self.burst)
            if len(self._buckets) > self.capacity:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        if bucket.allow(now):
            return None
        return retry_after_s(bucket)


def client_key(claims: Claims | None, peer: str | None, forwarded_for: list[str]) -> str:
    """Whom a request counts against: `player:<sub>`, else `addr:<address>`."""
    if claims is not None and not claims.anonymous:
        return "player:" + claims.player
    address = client_address(peer, forwarded_for)
    if address is None:
        return "addr:" + (peer or "unknown")
    if address.version == 6:
        return "addr:" + str(ipaddress.IPv6Network((address, 64), strict=False))
    return "addr:" + str(address)


def client_address(peer: str | None, forwarded_for: list[str]
                   ) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address: the peer, or X-Forwarded-For's last entry from a loopback
    peer (HAProxy's); None when the peer is not an address (a unix socket, say).

    One rule for every use (snapshot buckets, click records), see the module docstring.
    """
    address = _address(peer)
    if address is not None and address.is_loopback and forwarded_for:
        forwarded = _address(forwarded_for[-1].rsplit(",", 1)[-1].strip())
        if forwarded is not None:
            address = forwarded
    return address


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in `text` (IPv4-mapped IPv6 as IPv4), or None when it is not one."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
