"""Redis keys of the attribution edge: the one place their names are spelled.

Shared by the services that write the streams (links, conversions) and the
ones that read them (statistics), so a renamed key cannot split them.
"""

from __future__ import annotations

CLICKS_STREAM = "og:clicks"  # field `c`: canonical JSON of a click record
CONVERSIONS_STREAM = "og:conversions"  # field `c`: canonical JSON of a conversion record
RECORD_FIELD = "c"

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
