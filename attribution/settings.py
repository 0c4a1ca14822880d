"""Settings of the attribution edge (tracking links, clicks, conversions).

Same rules as every oddsgate setting (gateway/config.py): `OG_*` variables,
checked when read, so a malformed key list stops a worker at start with one
line naming the variable instead of answering 503 to every click later.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from gateway.config import ConfigError, EnvSettings, setting

# A key id travels inside every click id (attribution/clickid.py), so it is kept
# short and URL-safe: letters and digits, up to 8.
KEY_ID = re.compile(r"[A-Za-z0-9]{1,8}")
# A secret shorter than this is guessable by brute force against a click id's MAC.
MIN_SECRET_BYTES = 16


@dataclass(frozen=True)
class ClickKeys:
    """The keys of click ids: `signing` (kid, secret) mints, every one listed verifies.

    Rotation is listing the new key first and keeping the old one after it
    until the ids it signed no longer matter (the attribution window).
    """

    signing: tuple[str, bytes]
    by_kid: dict[str, bytes]

    @classmethod
    def parse(cls, raw: str) -> ClickKeys:
        """Keys from "kid:secret,kid:secret"; ValueError naming the first bad entry."""
        by_kid: dict[str, bytes] = {}
        order: list[str] = []
        for entry in raw.split(","):
            entry = entry.strip()
            if not entry:
                continue
            kid, sep, secret = entry.partition(":")
            if not sep or not KEY_ID.fullmatch(kid):
                raise ValueError(f"entry {kid[:16]!r}: expected kid:secret with kid of "
                                 "1-8 letters or digits")
            if len(secret.encode()) < MIN_SECRET_BYTES:
                raise ValueError(f"key {kid!r}: secret shorter than {MIN_SECRET_BYTES} bytes")
            if kid in by_kid:
                raise ValueError(f"key {kid!r} listed twice")
            by_kid[kid] = secret.encode()
            order.append(kid)
        if not order:
            raise ValueError("no keys")
        return cls(signing=(order[0], by_kid[order[0]]), by_kid=by_kid)


@dataclass
class AttributionSettings(EnvSettings):
    admin_key: str = setting(
        "OG_ADMIN_KEY", "",
        "key of the worker's admin HTTP API (`Authorization: Bearer <key>`, /admin/links); "
        "empty: the admin API answers 404",
    )
    click_keys: str = setting(
        "OG_CLICK_KEYS", "",
        "click-id keys, `kid:secret,kid:secret` (kid 1-8 letters or digits, secret at least "
        "16 bytes): the first signs new click ids, every one listed verifies them; empty: "
        "/t/ answers 503 and conversions cannot verify click ids (every worker must share "
        "the keys, so none is made up per process)",
    )
    client_hash_key: str = setting(
        "OG_CLIENT_HASH_KEY", "",
        "HMAC-SHA256 key of the client address hashes in click records (the address itself "
        "is never stored); empty: derived from the signing click key, so rotating that key "
        "changes the hashes (duplicates are then missed for one dedupe window)",
    )
    dedupe_window_s: int = setting(
        "OG_DEDUPE_WINDOW_S", 3600,
        "a click from the same client address and user agent on the same link within this "
        "many seconds is recorded as `duplicate`", minimum=1,
    )
    attribution_window_s: int = setting(
        "OG_ATTRIBUTION_WINDOW_S", 2_592_000,
        "how long a click can be credited with a conversion (its click index, "
        "og:click:{og:clicks}:<id>, expires then)", minimum=1,
    )

    def check(self) -> None:
        super().check()
        if self.click_keys:
            try:
                ClickKeys.parse(self.click_keys)
            except ValueError as exc:
                raise ConfigError(f"OG_CLICK_KEYS: {exc}") from None

    @property
    def keys(self) -> ClickKeys | None:
        """The click-id keys, or None when OG_CLICK_KEYS is empty (/t/ answers 503)."""
        return ClickKeys.parse(self.click_keys) if self.click_keys else None

    @property
    def dedupe_window_ms(self) -> int:
        return self.dedupe_window_s * 1000

    def client_hash_secret(self) -> bytes | None:
        """The key of client address hashes; None when there is neither it nor a click key."""
        if self.client_hash_key:
            return self.client_hash_key.encode()
        keys = self.keys
        if keys is None:
            return None
        return hmac.new(keys.signing[1], b"oddsgate client address hash",
                        hashlib.sha256).digest()
