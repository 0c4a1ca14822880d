"""Prometheus metrics of a node, read from the fleet table at scrape time.

One custom collector on its own registry, not prometheus-client's
multiprocess mode: the workers already publish everything into the fleet
table, so a scrape is one read of each slot plus a few psutil calls. Names
take the `oddsgate_` prefix, counters end in `_total`, units are seconds and
bytes. Per-worker series carry a `worker` label (the worker index). Series
read from a slot also carry `slot`: a supervisor that gives a worker index
more than one slot (a successor reporting while its predecessor drains) then
still exposes one series per process; `worker_of_slot` maps slot to worker
(identity by default).

The fan-out latency is one histogram summed over the workers. A worker that
restarts starts its buckets from zero, so the node's sum drops by what that
worker had counted; Prometheus reads any drop as a reset, and a `rate()`
across a restart overstates for that one step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import psutil
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from gateway.fleet import LATENCY_BOUNDS_S, FleetTable, SlotView, WorkerState

log = logging.getLogger("oddsgate.metrics")


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What the supervisor knows of one worker slot."""

    index: int
    pid: int | None  # None while no process runs in the slot
    restarts: int
    draining: bool


@dataclass(frozen=True, slots=True)
class NodeInfo:
    breaker_open: bool
    breaker_trips: int
    workers_configured: int


# (kind, metric name, SlotView attribute, help) of the plain per-worker series.
_SLOT_SERIES: tuple[tuple[str, str, str, str], ...] = (
    ("gauge", "oddsgate_connections", "connections", "Open player connections."),
    ("gauge", "oddsgate_connections_backpressure", "connections_backpressure",
     "Player connections above their output high-water mark."),
    ("gauge", "oddsgate_subscriptions", "subscriptions", "Player-topic subscriptions."),
    ("gauge", "oddsgate_topics", "topics", "Redis channels the worker is subscribed to."),
    ("counter", "oddsgate_connections_accepted_total", "connections_accepted",
     "Player connections accepted."),
    ("counter", "oddsgate_events_in_total", "events_in", "Events received from Redis."),
    ("counter", "oddsgate_deliveries_total", "deliveries", "Events handed to players."),
    ("counter", "oddsgate_frames_out_total", "frames_out", "WebSocket frames sent to players."),
    ("counter", "oddsgate_sent_bytes_total", "bytes_out", "Payload bytes sent to players."),
    ("counter", "oddsgate_coalesced_total", "coalesced",
     "Events superseded by a newer one of the same market while in back-pressure."),
    ("counter", "oddsgate_shed_total", "shed", "Subscriptions refused with error shed."),
    ("counter", "oddsgate_snapshots_total", "snapshots", "Snapshots sent to players."),
    ("counter", "oddsgate_gaps_filled_total", "gaps_filled",
     "Channel gaps filled from Redis history."),
    ("counter", "oddsgate_channel_resets_total", "channel_resets",
     "Channels reset because history could not fill a gap or the epoch changed."),
    ("counter", "oddsgate_redis_reconnects_total", "redis_reconnects",
     "Reconnections of the Redis pub/sub connection."),
    ("gauge", "oddsgate_redis_connected", "redis_connected",
     "1 while the worker's Redis pub/sub connection is up."),
    ("counter", "oddsgate_gc_full_collections_total", "gc_full_collections",
     "Full garbage collections the worker ran (gateway/gcpolicy.py)."),
)


def _family(kind: str, name: str, doc: str, labels: list[str]) -> Metric:
    if kind == "counter":
        return CounterMetricFamily(name, doc, labels=labels)
    return GaugeMetricFamily(name, doc, labels=labels)


def _process_figures(pid: int) -> tuple[int, float, int] | None:
    """(resident bytes, cpu seconds, open fds) of a live pid; None if it is gone."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            rss = process.memory_info().rss
            cpu = process.cpu_times()
            fds = process.num_fds()
    except (psutil.Error, OSError):
        return None
    return rss, cpu.user + cpu.system, fds


class FleetCollector(Collector):
    """Turns the fleet table and the supervisor's own facts into metric families.

    `collect()` never raises: a failing callback is logged and its series are
    left out, and a pid that vanished between the callback and psutil is
    skipped.
    """

    def __init__(
        self,
        table: FleetTable,
        worker_info: Callable[[], list[WorkerInfo]],
        node_info: Callable[[], NodeInfo],
        *,
        worker_of_slot: Callable[[int], int] = lambda slot: slot,
    ) -> None:
        self.table = table
        self.worker_info = worker_info
        self.node_info = node_info
        self.worker_of_slot = worker_of_slot

    def collect(self) -> Iterable[Metric]:
        try:
            views = self.table.read_all()
        except Exception:
            log.exception("cannot read the fleet table")
            views = []
        yield from self._slot_metrics(views)
        yield self._latency(views)
        try:
            workers = self.worker_info()
        except Exception:
            log.exception("worker_info failed; its series are left out")
            workers = []
        yield from self._worker_metrics(workers)
        try:
            node = self.node_info()
        except Exception:
            log.exception("node_info failed; its series are left out")
            return
        yield from self._node_metrics(node)

    def _slot_labels(self, views: list[SlotView]) -> dict[int, list[str]]:
        return {v.index: [str(self.worker_of_slot(v.index)), str(v.index)] for v in views}

    def _slot_metrics(self, views: list[SlotView]) -> Iterator[Metric]:
        labels = self._slot_labels(views)
        live = [v for v in views if v.occupied]
        for kind, name, attribute, doc in _SLOT_SERIES:
            family = _family(kind, name, doc, ["worker", "slot"])
            for view in live:
                family.add_metric(labels[view.index], getattr(view, attribute))
            yield family
        resumes = CounterMetricFamily("oddsgate_resumes_total", "Resume requests by outcome.",
                                      labels=["worker", "slot", "kind"])
        lag = GaugeMetricFamily("oddsgate_pubsub_lag_seconds",
                                "Receipt time of the last event minus its ts.",
                                labels=["worker", "slot"])
        age = GaugeMetricFamily("oddsgate_worker_heartbeat_age_seconds",
                                "Seconds since the worker last published its counters.",
                                labels=["worker", "slot"])
        gc_pause = CounterMetricFamily("oddsgate_gc_full_pause_seconds_total",
                                       "Time the worker stood still in full garbage collections.",
                                       labels=["worker", "slot"])
        now_ns = time.time_ns()
        for view in live:
            gc_pause.add_metric(labels[view.index], view.gc_full_pause_ns / 1e9)
            resumes.add_metric([*labels[view.index], "replayed"], view.resumes_replayed)
            resumes.add_metric([*labels[view.index], "reset"], view.resumes_reset)
            lag.add_metric(labels[view.index], view.pubsub_lag_ns / 1e9)
            age.add_metric(labels[view.index], view.heartbeat_age_s(now_ns))
        state = GaugeMetricFamily("oddsgate_worker_state",
                                  "1 for the state the worker's slot is in.",
                                  labels=["worker", "slot", "state"])
        for view in views:
            for candidate in WorkerState:
                state.add_metric([*labels[view.index], candidate.name.lower()],
                                 1 if candidate is view.state else 0)
        yield from (resumes, lag, age, state, gc_pause)

    def _latency(self, views: list[SlotView]) -> Metric:
        counts = [0] * len(LATENCY_BOUNDS_S)
        sum_ns = 0
        for view in views:
            if view.occupied:
                counts = [a + b for a, b in zip(counts, view.latency_buckets, strict=True)]
                sum_ns += view.latency_sum_ns
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip(LATENCY_BOUNDS_S, counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        # _count is the +Inf bucket, so it always agrees with the buckets even
        # when a slot was read mid-observation.
        family = HistogramMetricFamily(
            "oddsgate_fanout_latency_seconds",
            "Time from an event's receipt to its hand-off to every follower, all workers.",
        )
        family.add_metric([], buckets, sum_value=sum_ns / 1e9)
        return family

    def _worker_metrics(self, workers: list[WorkerInfo]) -> Iterator[Metric]:
        restarts = CounterMetricFamily("oddsgate_worker_restarts_total",
                                       "Times the supervisor replaced the worker of a slot.",
                                       labels=["worker"])
        draining = GaugeMetricFamily("oddsgate_worker_draining",
                                     "1 while the supervisor drains the worker.",
                                     labels=["worker"])
        rss = GaugeMetricFamily("oddsgate_worker_resident_memory_bytes",
                                "Resident memory of the worker process.", labels=["worker"])
        cpu = CounterMetricFamily("oddsgate_worker_cpu_seconds_total",
                                  "User and system CPU time of the worker process.",
                                  labels=["worker"])
        fds = GaugeMetricFamily("oddsgate_worker_open_fds",
                                "Open file descriptors of the worker process.", labels=["worker"])
        for info in workers:
            worker = str(info.index)
            restarts.add_metric([worker], info.restarts)
            draining.add_metric([worker], 1 if info.draining else 0)
            figures = _process_figures(info.pid) if info.pid is not None else None
            if figures is not None:
                rss.add_metric([worker], figures[0])
                cpu.add_metric([worker], figures[1])
                fds.add_metric([worker], figures[2])
        yield from (restarts, draining, rss, cpu, fds)

    def _node_metrics(self, node: NodeInfo) -> Iterator[Metric]:
        yield GaugeMetricFamily("oddsgate_breaker_open",
                                "1 while the node sheds new subscriptions (back-pressure).",
                                value=1 if node.breaker_open else 0)
        yield CounterMetricFamily("oddsgate_breaker_trips_total",
                                  "Times the back-pressure breaker opened.",
                                  value=node.breaker_trips)
        yield GaugeMetricFamily("oddsgate_workers_configured", "Worker processes configured.",
                                value=node.workers_configured)


def fleet_registry(
    table: FleetTable,
    worker_info: Callable[[], list[WorkerInfo]],
    node_info: Callable[[], NodeInfo],
    *,
    worker_of_slot: Callable[[int], int] = lambda slot: slot,
) -> CollectorRegistry:
    """A registry of its own holding one FleetCollector (not the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        FleetCollector(table, worker_info, node_info, worker_of_slot=worker_of_slot))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format, for GET /metrics."""
    return generate_latest(registry)
