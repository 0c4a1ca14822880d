"""/metrics from a real fleet table, parsed back with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import math
import os
import resource
import socket
import subprocess
import urllib.request

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.counters import STATS
from gateway.fleet import LATENCY_BOUNDS_S, FleetTable, WorkerField, WorkerState
from supervisor.metrics import FleetCollector, MetricsServer, WorkerInfo, fleet_registry
from supervisor.node import Phase


@pytest.fixture
def table():
    table = FleetTable.create(3)
    yield table
    table.close()
    table.unlink()


def _vanished_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _fill(table: FleetTable) -> None:
    """Slot 0 ready, slot 1 gone (EMPTY, stale words), slot 2 draining."""
    for index in range(3):
        worker = table.worker_writer(index)
        worker.claim()
        worker.publish({
            WorkerField.CONNECTIONS: 100 * (index + 1),
            WorkerField.CONNECTIONS_BACKPRESSURE: index,
            WorkerField.EVENTS_IN: 1000 + index,
            WorkerField.BYTES_OUT: 10**9 + index,
            WorkerField.RESUMES_REPLAYED: 7,
            WorkerField.RESUMES_RESET: 2,
            WorkerField.REDIS_CONNECTED: 1,
            WorkerField.PUBSUB_LAG_NS: 1_500_000,
            WorkerField.GC_FULL_COLLECTIONS: 3,
            WorkerField.GC_FULL_PAUSE_NS: 250_000_000,
        })
        for ns in (100_000, 500_000, 700_000, 30_000_000, 2 * 10**9):
            worker.observe_latency_ns(ns)
    table.worker_writer(0).set_state(WorkerState.READY)
    table.worker_writer(1).set_state(WorkerState.EMPTY)
    table.worker_writer(2).set_state(WorkerState.DRAINING)
    table.publish_breaker(True, 4)  # the supervisor's decision for the node


def _scrape(registry) -> dict:
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _slot(index: int, worker: int | None = None) -> tuple:
    """Labels of a series read from slot `index` (worker = slot unless mapped)."""
    return (("slot", str(index)), ("worker", str(index if worker is None else worker)))


def _samples(family, name: str | None = None) -> dict[tuple, float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for s in family.samples
        if name is None or s.name == name
    }


@pytest.fixture
def registry(table):
    _fill(table)
    workers = [
        WorkerInfo(0, os.getpid(), restarts=0, draining=False, phase="ready"),
        WorkerInfo(1, None, restarts=3, draining=False, phase="failed"),
        WorkerInfo(2, _vanished_pid(), restarts=1, draining=True, phase="draining"),
    ]
    return fleet_registry(table, lambda: workers, 3)


def test_names_types_and_labels(registry):
    families = _scrape(registry)
    expected = {
        "oddsgate_connections": "gauge",
        "oddsgate_connections_backpressure": "gauge",
        "oddsgate_subscriptions": "gauge",
        "oddsgate_topics": "gauge",
        "oddsgate_connections_accepted": "counter",
        "oddsgate_events_in": "counter",
        "oddsgate_deliveries": "counter",
        "oddsgate_frames_out": "counter",
        "oddsgate_sent_bytes": "counter",
        "oddsgate_coalesced": "counter",
        "oddsgate_shed": "counter",
        "oddsgate_resumes": "counter",
        "oddsgate_snapshots": "counter",
        "oddsgate_gaps_filled": "counter",
        "oddsgate_channel_resets": "counter",
        "oddsgate_pubsub_silent_losses": "counter",
        "oddsgate_redis_reconnects": "counter",
        "oddsgate_redis_connected": "gauge",
        "oddsgate_worker_state": "gauge",
        "oddsgate_worker_heartbeat_age_seconds": "gauge",
        "oddsgate_worker_restarts": "counter",
        "oddsgate_worker_draining": "gauge",
        "oddsgate_pubsub_lag_seconds": "gauge",
        "oddsgate_fanout_latency_seconds": "histogram",
        "oddsgate_worker_resident_memory_bytes": "gauge",
        "oddsgate_worker_cpu_seconds": "counter",
        "oddsgate_worker_open_fds": "gauge",
        "oddsgate_worker_max_fds": "gauge",
        "oddsgate_worker_phase": "gauge",
        "oddsgate_breaker_open": "gauge",
        "oddsgate_breaker_trips": "counter",
        "oddsgate_workers_configured": "gauge",
        "oddsgate_gc_full_collections": "counter",
        "oddsgate_gc_full_pause_seconds": "counter",
    }
    assert {name: f.type for name, f in families.items()} == expected
    for family in families.values():
        if family.type == "counter":
            assert all(s.name == family.name + "_total" for s in family.samples)


def test_values(registry):
    families = _scrape(registry)
    live = {_slot(0), _slot(2)}  # the EMPTY slot is left out
    assert _samples(families["oddsgate_connections"]) == {_slot(0): 100, _slot(2): 300}
    assert _samples(families["oddsgate_connections_backpressure"]) == {_slot(0): 0, _slot(2): 2}
    assert _samples(families["oddsgate_sent_bytes"]) == {
        _slot(0): 10**9, _slot(2): 10**9 + 2}
    assert set(_samples(families["oddsgate_events_in"])) == live
    resumes = _samples(families["oddsgate_resumes"])
    assert resumes[(("kind", "reset"), *_slot(2))] == 2
    assert resumes[(("kind", "replayed"), *_slot(0))] == 7
    assert set(_samples(families["oddsgate_pubsub_lag_seconds"]).values()) == {0.0015}
    assert _samples(families["oddsgate_gc_full_collections"]) == {_slot(0): 3, _slot(2): 3}
    assert set(_samples(families["oddsgate_gc_full_pause_seconds"]).values()) == {0.25}
    ages = _samples(families["oddsgate_worker_heartbeat_age_seconds"])
    assert set(ages) == live and all(0 <= age < 60 for age in ages.values())

    states = _samples(families["oddsgate_worker_state"])
    assert len(states) == 3 * len(WorkerState)
    current = {labels for labels, value in states.items() if value == 1}
    assert current == {
        (("slot", "0"), ("state", "ready"), ("worker", "0")),
        (("slot", "1"), ("state", "empty"), ("worker", "1")),
        (("slot", "2"), ("state", "draining"), ("worker", "2")),
    }

    assert _samples(families["oddsgate_worker_restarts"]) == {
        (("worker", "0"),): 0, (("worker", "1"),): 3, (("worker", "2"),): 1}
    assert _samples(families["oddsgate_worker_draining"]) == {
        (("worker", "0"),): 0, (("worker", "1"),): 0, (("worker", "2"),): 1}
    phases = _samples(families["oddsgate_worker_phase"])
    assert len(phases) == 3 * len(Phase)
    assert {labels for labels, value in phases.items() if value == 1} == {
        (("phase", "ready"), ("worker", "0")), (("phase", "failed"), ("worker", "1")),
        (("phase", "draining"), ("worker", "2"))}
    assert _samples(families["oddsgate_breaker_open"]) == {(): 1}
    assert _samples(families["oddsgate_breaker_trips"]) == {(): 4}
    assert _samples(families["oddsgate_workers_configured"]) == {(): 3}


def test_process_figures_skip_a_vanished_pid(registry):
    families = _scrape(registry)
    for name in ("oddsgate_worker_resident_memory_bytes", "oddsgate_worker_cpu_seconds",
                 "oddsgate_worker_open_fds", "oddsgate_worker_max_fds"):
        samples = _samples(families[name])
        assert set(samples) == {(("worker", "0"),)}, name  # no pid, vanished pid: left out
        assert samples[(("worker", "0"),)] > 0


def test_fd_limit_is_the_processs_own_soft_limit(registry):
    """What `FD usage near the limit` divides by (deploy/prometheus/alerts.yml)."""
    families = _scrape(registry)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert _samples(families["oddsgate_worker_max_fds"]) == {(("worker", "0"),): soft}
    assert _samples(families["oddsgate_worker_open_fds"])[(("worker", "0"),)] < soft


def test_fanout_latency_histogram(registry):
    family = _scrape(registry)["oddsgate_fanout_latency_seconds"]
    buckets = {float(s.labels["le"]): s.value for s in family.samples
               if s.name.endswith("_bucket")}
    assert list(buckets) == list(LATENCY_BOUNDS_S)
    values = list(buckets.values())
    assert values == sorted(values)  # cumulative, so monotonic
    # Two live slots, five observations each: 100us and 500us (le inclusive),
    # 700us, 30ms, 2s.
    assert buckets[0.0005] == 4 and buckets[0.001] == 6 and buckets[0.05] == 8
    assert buckets[1.0] == 8 and buckets[math.inf] == 10
    count = _samples(family, "oddsgate_fanout_latency_seconds_count")[()]
    total = _samples(family, "oddsgate_fanout_latency_seconds_sum")[()]
    assert count == buckets[math.inf] == 10
    assert total == pytest.approx(2 * (0.0001 + 0.0005 + 0.0007 + 0.03 + 2.0))


def test_counters_move_when_the_table_changes(table, registry):
    before = _scrape(registry)
    worker = table.worker_writer(0)
    worker.publish({WorkerField.EVENTS_IN: 5000, WorkerField.CONNECTIONS: 42})
    worker.observe_latency_ns(3_000_000)
    after = _scrape(registry)
    key = _slot(0)
    assert _samples(before["oddsgate_events_in"])[key] == 1000
    assert _samples(after["oddsgate_events_in"])[key] == 5000
    assert _samples(after["oddsgate_connections"])[key] == 42
    count = "oddsgate_fanout_latency_seconds_count"
    assert _samples(after["oddsgate_fanout_latency_seconds"], count)[()] == 11


def test_collect_survives_a_failing_callback(table):
    _fill(table)

    def broken() -> list[WorkerInfo]:
        raise RuntimeError("supervisor state unavailable")

    collector = FleetCollector(table, broken, 3)
    names = {family.name for family in collector.collect()}
    assert "oddsgate_connections" in names and "oddsgate_fanout_latency_seconds" in names
    assert "oddsgate_breaker_open" in names
    assert "oddsgate_worker_restarts" in names  # declared, with no series


def test_every_declared_stat_is_a_series_of_its_slot_word(table):
    """A row of gateway/counters.py with a metric needs nothing else to be scraped."""
    writer = table.worker_writer(0)
    writer.claim()
    writer.publish({WorkerField[s.name.upper()]: 1000 + i for i, s in enumerate(STATS)})
    writer.set_state(WorkerState.READY)
    families = _scrape(fleet_registry(table, list, 1))
    for i, stat in enumerate(STATS):
        if stat.metric is None:
            continue
        family = families[stat.metric.removesuffix("_total")]
        assert family.type == stat.kind.value, stat.name
        assert family.documentation == stat.help
        labels = tuple(sorted((*_slot(0), *stat.labels)))
        assert _samples(family)[labels] == pytest.approx((1000 + i) * stat.scale), stat.name


def test_an_empty_table_renders(table):
    registry = fleet_registry(table, list, 3)
    families = _scrape(registry)
    family = families["oddsgate_fanout_latency_seconds"]
    assert _samples(family, "oddsgate_fanout_latency_seconds_count")[()] == 0
    assert _samples(families["oddsgate_connections"]) == {}
    assert _samples(families["oddsgate_breaker_open"]) == {(): 0}
    assert _samples(families["oddsgate_breaker_trips"]) == {(): 0}


def test_slots_map_to_workers(table):
    """Two slots of one worker index (a successor beside its predecessor)."""
    _fill(table)
    table.worker_writer(1).set_state(WorkerState.READY)
    registry = fleet_registry(table, list, 1, worker_of_slot=lambda slot: slot % 2)
    families = _scrape(registry)
    assert _samples(families["oddsgate_connections"]) == {
        _slot(0, 0): 100, _slot(1, 1): 200, _slot(2, 0): 300}


async def test_the_server_serves_the_registry_and_frees_its_port(registry):
    server = MetricsServer("127.0.0.1", 0, registry)
    await server.start()
    port = server.bound_port
    url = f"http://127.0.0.1:{port}/metrics"

    def get() -> tuple[int, str, str]:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()

    status, content_type, body = await asyncio.to_thread(get)
    assert status == 200 and content_type.startswith("text/plain")
    families = {f.name for f in text_string_to_metric_families(body)}
    assert {"oddsgate_connections", "oddsgate_breaker_open"} <= families
    await server.stop()
    await server.stop()  # idempotent
    with socket.socket() as again:  # the port is free once stopped
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def test_the_aggregator_collector_reports_its_process_and_its_status() -> None:
    import math
    import time as _time
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from supervisor.metrics import AggregatorCollector

    service = SimpleNamespace(pid=1234, diverged=False, restarts=2, status_at=_time.monotonic(),
                              status={"inputs": 500, "published": 40,
                                      "late": {"atlas": 1, "beacon": 2},
                                      "excluded": ["cobalt"], "input_to_publish_ms_p50": 80.0,
                                      "input_to_publish_ms_p99": None})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AggregatorCollector(service))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode())
               for s in f.samples}
    assert samples[("oddsgate_aggregator_up", ())] == 1
    assert samples[("oddsgate_aggregator_diverged", ())] == 0
    assert samples[("oddsgate_aggregator_restarts_total", ())] == 2
    assert samples[("oddsgate_aggregator_inputs_total", ())] == 500
    assert samples[("oddsgate_aggregator_late_inputs_total", ())] == 3
    assert samples[("oddsgate_aggregator_excluded_providers", ())] == 1
    assert samples[("oddsgate_aggregator_input_to_publish_seconds", (("quantile", "0.5"),))] \
        == 0.08
    assert math.isnan(
        samples[("oddsgate_aggregator_input_to_publish_seconds", (("quantile", "0.99"),))])
    assert samples[("oddsgate_aggregator_status_age_seconds", ())] < 5
    service.pid, service.diverged, service.status_at = None, True, 0.0
    text = generate_latest(registry).decode()
    assert "oddsgate_aggregator_up 0.0" in text and "oddsgate_aggregator_diverged 1.0" in text
    assert "oddsgate_aggregator_status_age_seconds +Inf" in text
