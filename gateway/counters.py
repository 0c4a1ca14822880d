"""Every number a worker reports, declared once in `STATS`.

A new figure is one row here. From the table come:

- `WorkerCounters`, the object every part of the worker bumps: one plain
  attribute per counted row, incremented on the hot path with no lock (one
  event loop per process) and no shared memory;
- the fleet table's worker words and their `SlotView` attributes
  (gateway/fleet.py), in row order;
- what the reporter copies into the slot a few times a second
  (gateway/reporter.py: each row's `read`);
- the per-worker /metrics series (supervisor/metrics.py: each row's `metric`).

Why a table and not five lists: each of those used to spell every counter
again, and a counter forgotten in one of them was silently never reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, make_dataclass
from enum import StrEnum
from operator import attrgetter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.server import Worker


class Kind(StrEnum):
    COUNTER = "counter"  # only grows during a worker's life; its metric ends in `_total`
    GAUGE = "gauge"


@dataclass(frozen=True, slots=True)
class Stat:
    """One figure a worker reports: one word of its fleet-table slot."""

    name: str  # the WorkerCounters / SlotView attribute; upper-cased, the WorkerField
    kind: Kind
    read: Callable[[Worker], int]  # its value, taken by the reporter at each publish
    metric: str | None = None  # its per-worker /metrics family; None: not exported as one
    help: str = ""
    counted: bool = False  # a WorkerCounters attribute, bumped where it happens
    labels: tuple[tuple[str, str], ...] = ()  # rows sharing a family differ by these
    scale: float = 1.0  # word to metric unit (nanoseconds to seconds)
    summed: bool = True  # in FleetTable.totals(): false for identities and lags


def _counted(name: str, metric: str, help: str, **extra: Any) -> Stat:
    return Stat(name, Kind.COUNTER, attrgetter(f"counters.{name}"), metric, help,
                counted=True, **extra)


STATS: tuple[Stat, ...] = (
    Stat("port", Kind.GAUGE, lambda w: w.settings.port, summed=False),
    Stat("connections", Kind.GAUGE, lambda w: len(w.connections),
         "oddsgate_connections", "Open player connections."),
    Stat("connections_backpressure", Kind.GAUGE, lambda w: w.connections_in_backpressure(),
         "oddsgate_connections_backpressure",
         "Player connections above their output high-water mark."),
    Stat("subscriptions", Kind.GAUGE, lambda w: sum(len(s.cursors) for s in w.connections),
         "oddsgate_subscriptions", "Player-topic subscriptions."),
    Stat("topics", Kind.GAUGE, lambda w: len(w.hub.channels),
         "oddsgate_topics", "Redis channels the worker is subscribed to."),
    _counted("events_in", "oddsgate_events_in_total", "Events received from Redis."),
    _counted("deliveries", "oddsgate_deliveries_total",
             "Events handed to players."),  # one per player per event
    _counted("frames_out", "oddsgate_frames_out_total", "WebSocket frames sent to players."),
    _counted("bytes_out", "oddsgate_sent_bytes_total", "Payload bytes sent to players."),
    _counted("coalesced", "oddsgate_coalesced_total",
             "Events superseded by a newer one of the same market while in back-pressure."),
    _counted("shed", "oddsgate_shed_total", "Subscriptions refused with error shed."),
    _counted("resumes_replayed", "oddsgate_resumes_total", "Resume requests by outcome.",
             labels=(("kind", "replayed"),)),
    _counted("resumes_reset", "oddsgate_resumes_total", "Resume requests by outcome.",
             labels=(("kind", "reset"),)),
    # Ahead of this region's stream (from another region): held for it to
    # catch up (PROTOCOL.md §8), then replayed, or reset `ahead` after the wait.
    _counted("resumes_held", "oddsgate_resumes_total", "Resume requests by outcome.",
             labels=(("kind", "held"),)),
    _counted("snapshots", "oddsgate_snapshots_total", "Snapshots sent to players."),
    _counted("gaps_filled", "oddsgate_gaps_filled_total",
             "Channel gaps filled from Redis history."),
    _counted("channel_resets", "oddsgate_channel_resets_total",
             "Channels reset because history could not fill a gap or the epoch changed."),
    _counted("silent_losses", "oddsgate_pubsub_silent_losses_total",
             "Topics the audit found behind Redis with no event arriving (a subscription "
             "lost without notice): repaired from history and subscribed again."),
    Stat("redis_reconnects", Kind.COUNTER, lambda w: w.broker.reconnects,
         "oddsgate_redis_reconnects_total", "Reconnections of the Redis pub/sub connection."),
    Stat("redis_connected", Kind.GAUGE, lambda w: int(w.broker.connected.is_set()),
         "oddsgate_redis_connected", "1 while the worker's Redis pub/sub connection is up."),
    _counted("connections_accepted", "oddsgate_connections_accepted_total",
             "Player connections accepted."),
    Stat("pubsub_lag_ns", Kind.GAUGE, lambda w: w.hub.pubsub_lag_ns,
         "oddsgate_pubsub_lag_seconds", "Receipt time of the last event minus its ts.",
         scale=1e-9, summed=False),
    Stat("gc_full_collections", Kind.COUNTER, lambda w: w.gc.collections,
         "oddsgate_gc_full_collections_total",
         "Full garbage collections the worker ran (gateway/gcpolicy.py)."),
    Stat("gc_full_pause_ns", Kind.COUNTER, lambda w: w.gc.pause_ns_total,
         "oddsgate_gc_full_pause_seconds_total",
         "Time the worker stood still in full garbage collections.", scale=1e-9),
)

WorkerCounters = make_dataclass(
    "WorkerCounters",
    [(s.name, int, 0) for s in STATS if s.counted],
    slots=True,
)
WorkerCounters.__module__ = __name__
WorkerCounters.__doc__ = """The worker's running totals: one plain int per counted row of STATS.

The hub, fan-out and sessions bump them (`counters.deliveries += n`); the
reporter copies them into the worker's fleet-table slot.
"""
