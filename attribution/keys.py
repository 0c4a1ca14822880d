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
CLICKS_STREAM = CLICKS  # the statistics service's spelling of the same streams
CONVERSIONS_STREAM = CONVERSIONS


# -- statistics (attribution/stats.py) ------------------------------------
# Every key of one partner's counts carries the partner in a hash tag, so the
# counting script touches one slot.
STATS_GROUP = "stats"  # the consumer group of the statistics service on both streams
STATS_PARTNERS = "og:stats:partners"  # zset: partner -> ms of its newest counted record


def stats_seen_key(partner: str, day: str) -> str:
    """Set of the record ids (`click:{id}`, `conv:{id}`) counted for a UTC day."""
    return f"og:stats:{{{partner}}}:seen:{day}"


def stats_day_key(partner: str, day: str) -> str:
    """Hash of a UTC day's counts: `{dim}:{id}:{counter}` -> integer."""
    return f"og:stats:{{{partner}}}:day:{day}"


def stats_minute_key(partner: str, minute: int) -> str:
    """Hash of one minute's counts (minute = Unix seconds // 60), for the sliding windows."""
    return f"og:stats:{{{partner}}}:min:{minute}"
