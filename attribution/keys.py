"""Every Redis key of the attribution edge, in one place (the shared contract).

Writers and readers (links CLI, workers, conversions, the statistics
service) import these names instead of spelling keys, so a renamed key
cannot leave one side reading where nobody writes.
"""

from __future__ import annotations

import hashlib

# code -> canonical JSON of the link (attribution/links.py)
LINKS = "og:links"
# a link's code is published here after every change; workers reload it
LINKS_CHANGED = "og:links:changed"
# every click, field `c` = canonical JSON of the click record
CLICKS = "og:clicks"
# every conversion, field `c` = canonical JSON of the conversion record
CONVERSIONS = "og:conversions"
# operator API keys: name -> sha256 hex of the key
OPERATOR_KEYS = "og:keys"
# the one field of a stream entry that holds the record
RECORD_FIELD = "c"


def click_index(click_id: str) -> str:
    """Hash of one click record's fields, expiring with the attribution window."""
    return f"og:click:{click_id}"


def dedupe(code: str, ip_hash: str, ua: str) -> str:
    """SET NX PX key of one client (address hash + user agent) on one link."""
    digest = hashlib.sha256(f"{ip_hash}|{ua}".encode()).hexdigest()[:32]
    return f"og:dedupe:{code}:{digest}"


def conversion_idempotency(operator_id: str) -> str:
    """The first answer's JSON to a conversion, by the operator's own id."""
    return f"og:conv:{operator_id}"
