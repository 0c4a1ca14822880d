"""Every Redis key of the attribution edge, in one place (the shared contract).

Writers and readers (links CLI, workers, conversions, the statistics
service) import these names instead of spelling keys, so a renamed key
cannot leave one side reading where nobody writes.

Redis Cluster (redis_contract/target.py): a script or a MULTI must keep every
key it touches in one hash slot. The keys written together are:

- a click: the stream `og:clicks`, the click's index and its dedupe key
  (record_click.lua);
- a conversion: its idempotency key and the stream `og:conversions`
  (record_conversion.lua), and the webhook dispatcher's queue, which acks
  the stream entry in the step that enqueues its deliveries (webhooks/keys.py);
- an operator key's hash in `og:keys` and when it was added (operator_key_add.lua,
  `oddsgate keys revoke`'s MULTI);
- one partner's statistics (the counting script: its seen set, day and minute
  hashes carry `{partner}`).

Each group's companion keys carry the name of the key they go with as their
hash tag: `og:click:{og:clicks}:<id>` hashes exactly like `og:clicks` (a
key without braces hashes whole, a tag hashes its content), so the long-lived
keys everything else reads (`og:clicks`, `og:conversions` and their consumer
groups, `og:keys`, `og:links`) keep their names and their data, and only the
companions are renamed. The tag comes before anything a caller supplies (an
operator's conversion id may hold braces; only the first `{...}` counts).

Why not one tag for all of attribution (`og:{attr}:...`): clicks and
conversions never meet in one step, so they need not share a shard, and the
click side is the heavy one (every click's index lives for the attribution
window). The cost that remains: each group is one slot, so one shard holds
all the clicks (stream, every index, every dedupe key) and one shard all the
conversions and webhook deliveries; a stream is one key and could not be
spread anyway. Statistics spread over shards by partner. `og:links` needs
no tag: its script touches one key and publishes with plain PUBLISH, which a
cluster delivers on every node.

Renamed for the cluster (`python -m attribution.migrate_keys` moves a
deployment's old keys to these names, and those of webhooks/keys.py and
aggregator/inputlog.py):
`og:click:<id>` -> `og:click:{og:clicks}:<id>`, `og:dedupe:<code>:<digest>`
-> `og:dedupe:{og:clicks}:<code>:<digest>`, `og:conv:<id>` ->
`og:conv:{og:conversions}:<id>`, `og:keys:added` -> `og:keys:{og:keys}:added`.
"""

from __future__ import annotations

import hashlib


def beside(key: str) -> str:
    """The hash tag that puts a key in `key`'s slot (`key` itself has no braces)."""
    return f"{{{key}}}"


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
# name -> Unix seconds the key was added, for `oddsgate keys list`; written with og:keys
OPERATOR_KEYS_ADDED = f"og:keys:{beside(OPERATOR_KEYS)}:added"
# the one field of a stream entry that holds the record
RECORD_FIELD = "c"
# what the companions' names start with (attribution/migrate_keys.py moves old ones here)
CLICK_INDEX_PREFIX = f"og:click:{beside(CLICKS)}:"
DEDUPE_PREFIX = f"og:dedupe:{beside(CLICKS)}:"
CONVERSION_PREFIX = f"og:conv:{beside(CONVERSIONS)}:"


def click_index(click_id: str) -> str:
    """Hash of one click record's fields, expiring with the attribution window."""
    return f"{CLICK_INDEX_PREFIX}{click_id}"


def dedupe(code: str, ip_hash: str, ua: str) -> str:
    """SET NX PX key of one client (address hash + user agent) on one link."""
    digest = hashlib.sha256(f"{ip_hash}|{ua}".encode()).hexdigest()[:32]
    return f"{DEDUPE_PREFIX}{code}:{digest}"


def conversion_idempotency(operator_id: str) -> str:
    """The first answer's JSON to a conversion, by the operator's own id."""
    return f"{CONVERSION_PREFIX}{operator_id}"
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
