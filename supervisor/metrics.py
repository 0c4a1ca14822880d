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

The per-worker series are generated from gateway/counters.py's `STATS`: a
row with a `metric` is a family here, nothing else to write. What is not a
worker's figure is written out below: the slot's state and heartbeat age,
the node-wide latency histogram, the supervisor's facts, the node's breaker
(which the supervisor writes into the table's header).

prometheus-client's own HTTP server serves it (`MetricsServer`), on a thread:
a scrape reads shared memory and psutil, nothing of the supervisor's loop.

The fan-out latency is one histogram summed over the workers. A worker that
restarts starts its buckets from zero, so the node's sum drops by what that
worker had counted; Prometheus reads any drop as a reset, and a `rate()`
across a restart overstates for that one step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import psutil
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from gateway.counters import STATS, Kind, Stat
from gateway.fleet import LATENCY_BOUNDS_S, FleetTable, SlotView, WorkerState
from supervisor.node import Phase

log = logging.getLogger("oddsgate.metrics")


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What the supervisor knows of one worker index."""

    index: int
    pid: int | None  # None while no process runs for it
    restarts: int  # restarts after unplanned exits since the node started: only grows
    draining: bool
    phase: str | None = None  # the supervisor's Phase of it (supervisor/node.py)


def _families() -> dict[str, list[Stat]]:
    """The rows of STATS with a metric, by family: rows sharing one differ by labels."""
    families: dict[str, list[Stat]] = {}
    for stat in STATS:
        if stat.metric is not None:
            families.setdefault(stat.metric, []).append(stat)
    return families


_SLOT_FAMILIES = _families()


def _family(kind: Kind, name: str, doc: str, labels: list[str]) -> Metric:
    if kind is Kind.COUNTER:
        return CounterMetricFamily(name, doc, labels=labels)
    return GaugeMetricFamily(name, doc, labels=labels)


def _process_figures(pid: int) -> tuple[int, float, int, int] | None:
    """(resident bytes, cpu seconds, open fds, fd limit) of a live pid; None if it is gone.

    The fd limit is the soft RLIMIT_NOFILE the process runs with (what its
    accept() fails at), read with prlimit(2), which needs no privilege for a
    process of our own user.
    """
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            rss = process.memory_info().rss
            cpu = process.cpu_times()
            fds = process.num_fds()
        fd_limit = process.rlimit(psutil.RLIMIT_NOFILE)[0]
    except (psutil.Error, OSError):
        return None
    return rss, cpu.user + cpu.system, fds, fd_limit


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
        workers_configured: int,
        *,
        worker_of_slot: Callable[[int], int] = lambda slot: slot,
    ) -> None:
        self.table = table
        self.worker_info = worker_info
        self.workers_configured = workers_configured
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
        yield from self._node_metrics()

    def _slot_labels(self, views: list[SlotView]) -> dict[int, list[str]]:
        return {v.index: [str(self.worker_of_slot(v.index)), str(v.index)] for v in views}

    def _slot_metrics(self, views: list[SlotView]) -> Iterator[Metric]:
        labels = self._slot_labels(views)
        live = [v for v in views if v.occupied]
        for name, stats in _SLOT_FAMILIES.items():
            first = stats[0]
            family = _family(first.kind, name, first.help,
                             ["worker", "slot", *(key for key, _ in first.labels)])
            for view in live:
                for stat in stats:
                    value = getattr(view, stat.name)
                    family.add_metric([*labels[view.index], *(v for _, v in stat.labels)],
                                      value * stat.scale if stat.scale != 1 else value)
            yield family
        age = GaugeMetricFamily("oddsgate_worker_heartbeat_age_seconds",
                                "Seconds since the worker last published its counters.",
                                labels=["worker", "slot"])
        now_ns = time.time_ns()
        for view in live:
            age.add_metric(labels[view.index], view.heartbeat_age_s(now_ns))
        state = GaugeMetricFamily("oddsgate_worker_state",
                                  "1 for the state the worker's slot is in.",
                                  labels=["worker", "slot", "state"])
        for view in views:
            for candidate in WorkerState:
                state.add_metric([*labels[view.index], candidate.name.lower()],
                                 1 if candidate is view.state else 0)
        yield from (age, state)

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
            "Time from an event's publish (its ts) to its frames written to every follower, "
            "all workers.",
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
        max_fds = GaugeMetricFamily(
            "oddsgate_worker_max_fds",
            "The worker process's file descriptor limit (soft RLIMIT_NOFILE).",
            labels=["worker"])
        phase = GaugeMetricFamily(
            "oddsgate_worker_phase",
            "1 for the supervisor's phase of the worker (failed: left down after a crash loop).",
            labels=["worker", "phase"])
        for info in workers:
            worker = str(info.index)
            restarts.add_metric([worker], info.restarts)
            draining.add_metric([worker], 1 if info.draining else 0)
            if info.phase is not None:
                for candidate in Phase:
                    phase.add_metric([worker, candidate.value],
                                     1 if candidate.value == info.phase else 0)
            figures = _process_figures(info.pid) if info.pid is not None else None
            if figures is not None:
                rss.add_metric([worker], figures[0])
                cpu.add_metric([worker], figures[1])
                fds.add_metric([worker], figures[2])
                if figures[3] != psutil.RLIM_INFINITY:
                    max_fds.add_metric([worker], figures[3])
        yield from (restarts, draining, phase, rss, cpu, fds, max_fds)

    def _node_metrics(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("oddsgate_breaker_open",
                                "1 while the node sheds new subscriptions (back-pressure).",
                                value=1 if self.table.breaker_open() else 0)
        yield CounterMetricFamily("oddsgate_breaker_trips_total",
                                  "Times the back-pressure breaker opened.",
                                  value=self.table.breaker_trips())
        yield GaugeMetricFamily("oddsgate_workers_configured", "Worker processes configured.",
                                value=self.workers_configured)


class AggregatorCollector(Collector):
    """The region's aggregator when this node hosts it (supervisor/services.py).

    Its process state from the supervisor; its progress from the status it
    writes to Redis every second (aggregator/service.py), which the service
    reads for this: a status that stops changing ages in
    `oddsgate_aggregator_status_age_seconds`. The input and publish counts
    are the aggregator process's own, so they restart from zero with it.
    """

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterable[Metric]:
        s = self.service
        status = s.status or {}
        yield GaugeMetricFamily("oddsgate_aggregator_up",
                                "1 while the region's aggregator process runs on this node.",
                                value=1 if s.pid is not None else 0)
        yield GaugeMetricFamily("oddsgate_aggregator_diverged",
                                "1 once the aggregator stopped on a late input or a corrupt "
                                "input log (exit 4): the region needs a rebuild.",
                                value=1 if s.diverged else 0)
        yield CounterMetricFamily("oddsgate_aggregator_restarts_total",
                                  "Times the supervisor restarted the aggregator.",
                                  value=s.restarts)
        yield CounterMetricFamily("oddsgate_aggregator_inputs_total",
                                  "Provider messages merged and priced (this process).",
                                  value=status.get("inputs") or 0)
        yield CounterMetricFamily("oddsgate_aggregator_published_total",
                                  "Events published (this process).",
                                  value=status.get("published") or 0)
        yield CounterMetricFamily("oddsgate_aggregator_late_inputs_total",
                                  "Inputs that arrived after their place was published.",
                                  value=sum((status.get("late") or {}).values()))
        yield GaugeMetricFamily("oddsgate_aggregator_excluded_providers",
                                "Providers the merge no longer waits for (silent too long).",
                                value=len(status.get("excluded") or ()))
        latency = GaugeMetricFamily(
            "oddsgate_aggregator_input_to_publish_seconds",
            "Input timestamp to publish acknowledged, over the last events.",
            labels=["quantile"])
        for q, key in (("0.5", "input_to_publish_ms_p50"), ("0.99", "input_to_publish_ms_p99")):
            ms = status.get(key)
            latency.add_metric([q], ms / 1000 if ms is not None else float("nan"))  # none yet
        yield latency
        yield GaugeMetricFamily("oddsgate_aggregator_status_age_seconds",
                                "Since the aggregator's status was last read (it writes it "
                                "every second).",
                                value=time.monotonic() - s.status_at if s.status_at
                                else float("inf"))


def fleet_registry(
    table: FleetTable,
    worker_info: Callable[[], list[WorkerInfo]],
    workers_configured: int,
    *,
    worker_of_slot: Callable[[int], int] = lambda slot: slot,
) -> CollectorRegistry:
    """A registry of its own holding one FleetCollector (not the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        FleetCollector(table, worker_info, workers_configured, worker_of_slot=worker_of_slot))
    return registry


class MetricsServer:
    """GET /metrics, served by prometheus-client's own HTTP server on its thread.

    A supervisor service: `start` binds (an OSError if the port is taken, before
    any worker starts), `stop` shuts the server down and frees the port.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        self._server, self._thread = start_http_server(self.port, self.host, self.registry)
        log.info("metrics on http://%s:%d/metrics", self.host, self.bound_port)

    @property
    def bound_port(self) -> int:
        """The port listened on (the one the OS chose when `port` was 0)."""
        assert self._server is not None
        return self._server.server_address[1]

    async def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        await asyncio.to_thread(server.shutdown)  # waits for serve_forever to return
        server.server_close()
        await asyncio.to_thread(thread.join)
