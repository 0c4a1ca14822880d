"""Every Redis key the webhook dispatcher and `oddsgate webhooks` use, in one place.

A delivery is one event for one endpoint; its `webhook-id` is its name in
every key below, so a retry, a restart and a replay all send the same id.

Redis Cluster (redis_contract/target.py): the script that enqueues a
conversion's deliveries also XACKs its entry of `og:conversions`
(store.py), and every later step of a delivery is one MULTI over the due
set, the deliveries, bodies, dead letters and the endpoint's counters. So
every key here carries `og:conversions` as its hash tag and lives in that
stream's slot (attribution/keys.py explains the tag). The cost: the whole
delivery queue sits on the shard that holds the conversions; conversions
are a trickle beside clicks (tens a second at most), so it is small.
Before the cluster these keys were `og:hooks:<name>` (the tag is new).
"""

from __future__ import annotations

from attribution.keys import CONVERSIONS, beside

PREFIX = f"og:hooks:{beside(CONVERSIONS)}:"

ENDPOINTS = f"{PREFIX}endpoints"  # hash: endpoint id -> endpoint JSON (endpoints.py)
DELIVERIES = f"{PREFIX}deliveries"  # hash: webhook-id -> delivery JSON (endpoint, attempts)
BODIES = f"{PREFIX}bodies"  # hash: webhook-id -> the event's JSON body, kept until delivered
DUE = f"{PREFIX}due"  # sorted set: webhook-id -> when it is due (Unix ms)
DEAD = f"{PREFIX}dead"  # hash: webhook-id -> delivery JSON with its attempts (dead letters)
GROUP = "og-webhooks"  # consumer group of the dispatcher on og:conversions


def partner_seq(partner: str) -> str:
    """INCR'd once per event sent to the partner, in the step that enqueues it."""
    return f"{PREFIX}seq:{partner}"


def endpoint_stats(endpoint_id: str) -> str:
    """Hash of an endpoint's counters (delivered, failed, retrying, dead) and breaker state,
    written by the dispatcher and read by `oddsgate webhooks list`."""
    return f"{PREFIX}stats:{endpoint_id}"
