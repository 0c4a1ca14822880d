"""Operator API keys: what one is, how it is stored, how a request's key is matched.

An operator's back office posts conversions with `Authorization: Bearer
<key>` (PROTOCOL.md §10). Redis holds only the SHA-256 of each key under
its name (`og:keys`, attribution/keys.py), so a copy of Redis (a backup, a
replica, a debugging dump) lets nobody post conversions. A key is 32
random bytes, so a plain SHA-256 is enough: there is nothing to brute-force
that a slow hash would protect.

`KeyCache` is the worker's copy of those hashes, a plain object: it says
whether a presented key matches and when the copy should be read again;
the asyncio shell (attribution/intake.py) does the reading. Every worker
reads `og:keys` at most every REFRESH_S seconds, so a revoked key stops
working within that time, and a key the copy does not know triggers a read
at most every MISS_REFRESH_S, so a key added a moment ago works at once
while a flood of wrong keys costs Redis a few reads a second at most.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

# An operator key's name: what `oddsgate keys list` shows and `revoke` takes.
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
KEY_BYTES = 32
# How old the worker's copy of og:keys may get before it is read again.
REFRESH_S = 2.0
# How often a key the copy does not know may send the worker back to Redis.
MISS_REFRESH_S = 0.25
# The longest Authorization value looked at; a real one is "Bearer " + 43 chars.
MAX_AUTHORIZATION = 512


def new_key() -> str:
    """A fresh key: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(KEY_BYTES)


def key_hash(key: str) -> str:
    """What Redis stores of a key: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_name(name: str) -> str:
    """`name` if it can name a key; ValueError saying the rule otherwise."""
    if not NAME.fullmatch(name):
        raise ValueError(f"{name[:80]!r} is not a key name (1-64 of A-Z a-z 0-9 _ . -)")
    return name


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` value; None when there is none.

    The scheme is case-insensitive (RFC 9110 §11.1); a value of any other
    scheme, an empty key, or one too long to be a key is no key.
    """
    if not authorization or len(authorization) > MAX_AUTHORIZATION:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key or " " in key:
        return None
    return key


@dataclass
class KeyCache:
    """The worker's copy of og:keys (name -> SHA-256 hex) and when it was read."""

    hashes: dict[str, str] = field(default_factory=dict)
    loaded_at: float | None = None  # monotonic seconds; None: never read

    def match(self, key: str) -> str | None:
        """The name of the key, or None.

        Compared against every stored hash in constant time each, with no
        early exit, so the answer's timing tells nothing about which (or
        how much of a) hash matched.
        """
        presented = key_hash(key).encode()
        found: str | None = None
        for name, stored in self.hashes.items():
            if hmac.compare_digest(presented, stored.encode()) and found is None:
                found = name
        return found

    def needs_reading(self, now: float, *, matched: bool) -> bool:
        """Whether to read og:keys before answering (REFRESH_S, MISS_REFRESH_S)."""
        if self.loaded_at is None:
            return True
        age = now - self.loaded_at
        return age >= REFRESH_S or (not matched and age >= MISS_REFRESH_S)

    def replace(self, raw: dict[bytes | str, bytes | str], now: float) -> None:
        """Take a fresh HGETALL of og:keys."""
        self.hashes = {_text(name): _text(value) for name, value in raw.items()}
        self.loaded_at = now


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
