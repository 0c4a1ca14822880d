"""Every Redis key the webhook dispatcher and `oddsgate webhooks` use, in one place.

A delivery is one event for one endpoint; its `webhook-id` is its name in
every key below, so a retry, a restart and a replay all send the same id.
"""

from __future__ import annotations

ENDPOINTS = "og:hooks:endpoints"  # hash: endpoint id -> endpoint JSON (endpoints.py)
DELIVERIES = "og:hooks:deliveries"  # hash: webhook-id -> delivery JSON (endpoint, attempts)
BODIES = "og:hooks:bodies"  # hash: webhook-id -> the event's JSON body, kept until delivered
DUE = "og:hooks:due"  # sorted set: webhook-id -> when it is due (Unix ms)
DEAD = "og:hooks:dead"  # hash: webhook-id -> delivery JSON with its attempts (dead letters)
GROUP = "og-webhooks"  # consumer group of the dispatcher on og:conversions


def partner_seq(partner: str) -> str:
    """INCR'd once per event sent to the partner, in the step that enqueues it."""
    return f"og:hooks:seq:{partner}"


def endpoint_stats(endpoint_id: str) -> str:
    """Hash of an endpoint's counters (delivered, failed, retrying, dead) and breaker state,
    written by the dispatcher and read by `oddsgate webhooks list`."""
    return f"og:hooks:stats:{endpoint_id}"
