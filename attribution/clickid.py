"""Click ids: a ULID signed under a key id, verifiable without a database (PROTOCOL.md §9).

Shape: `<ULID, 26 chars>.<kid>.<MAC>`, where MAC is the first 16 bytes of
HMAC-SHA256(secret[kid], "<ULID>.<kid>") in unpadded base64url (22 chars).
At most 26 + 1 + 8 + 1 + 22 = 58 characters, all URL-safe, so a click id
goes into a destination's query without escaping.

Why a ULID: it is unique without coordination between workers and carries
its own millisecond time, so a conversion can tell an expired click from
the id alone. Why the key id: keys rotate (OG_CLICK_KEYS lists the new one
first), and ids signed by an old key keep verifying while it is listed;
verify tries the key the id names, never all of them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

from ulid import ULID

from attribution.settings import ClickKeys

MAC_BYTES = 16
_SHAPE = re.compile(r"([0-9A-HJKMNP-TV-Z]{26})\.([A-Za-z0-9]{1,8})\.([A-Za-z0-9_-]{22})")
MAX_LENGTH = 64


class ForgedClickId(ValueError):
    """A click id that is malformed, names an unknown key, or whose MAC does not match."""


@dataclass(frozen=True, slots=True)
class ClickIdInfo:
    ulid: str
    kid: str
    ts_ms: int


def _mac(secret: bytes, ulid: str, kid: str) -> str:
    digest = hmac.new(secret, f"{ulid}.{kid}".encode(), hashlib.sha256).digest()[:MAC_BYTES]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def mint(keys: ClickKeys) -> str:
    """A fresh click id, signed by the signing key (the first of OG_CLICK_KEYS)."""
    kid, secret = keys.signing
    ulid = str(ULID())
    return f"{ulid}.{kid}.{_mac(secret, ulid, kid)}"


def verify(click_id: str, keys: ClickKeys) -> ClickIdInfo:
    """The id's parts once its MAC checks out under the key it names; ForgedClickId otherwise."""
    if not isinstance(click_id, str) or len(click_id) > MAX_LENGTH:
        raise ForgedClickId("not a click id")
    match = _SHAPE.fullmatch(click_id)
    if match is None:
        raise ForgedClickId("not a click id")
    ulid, kid, mac = match.groups()
    secret = keys.by_kid.get(kid)
    if secret is None:
        raise ForgedClickId(f"click id signed by unknown key {kid!r}")
    if not hmac.compare_digest(mac, _mac(secret, ulid, kid)):
        raise ForgedClickId("click id signature does not match")
    try:
        ts_ms = ULID.from_str(ulid).milliseconds
    except ValueError:  # a first character past 7 overflows 128 bits
        raise ForgedClickId("not a click id") from None
    return ClickIdInfo(ulid, kid, ts_ms)
