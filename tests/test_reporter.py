"""gateway/reporter.py: a worker's figures land in its own slot words; the breaker it obeys."""

from __future__ import annotations

import asyncio
from dataclasses import fields
from types import SimpleNamespace

import pytest

from gateway.breaker import Breaker
from gateway.counters import STATS, WorkerCounters
from gateway.fleet import FleetTable, WorkerState
from gateway.reporter import FleetReporter


@pytest.fixture
def table():
    table = FleetTable.create(3)
    yield table
    table.close()
    table.unlink()


class FakeSession:
    def __init__(self, *topics: str) -> None:
        self.cursors = dict.fromkeys(topics, 0)


class FakeWorker(SimpleNamespace):
    """The parts of gateway.server.Worker the reporter reads, each a distinct number."""

    def connections_in_backpressure(self) -> int:
        return 6


def _fake_worker() -> FakeWorker:
    counters = WorkerCounters()
    for i, field in enumerate(fields(counters)):
        setattr(counters, field.name, 1000 + 10 * i)
    connected = asyncio.Event()
    connected.set()
    sessions = {FakeSession("a", "b"): None, FakeSession("c"): None}
    breaker = Breaker(min_players=1)
    return FakeWorker(
        settings=SimpleNamespace(port=8123),
        counters=counters,
        connections=sessions,
        hub=SimpleNamespace(channels={"t1": None, "t2": None, "t3": None, "t4": None},
                            pubsub_lag_ns=1_500_000, latency_sink=None),
        broker=SimpleNamespace(reconnects=7, connected=connected),
        gc=SimpleNamespace(collections=3, pause_ns_total=250_000_000),
        stopping=False, draining=False, started=True,
        breaker=breaker, breaker_open=lambda: breaker.open,
    )


def test_every_figure_lands_in_its_own_slot_word(table):
    worker = _fake_worker()
    reporter = FleetReporter(worker, table.worker_writer(1))
    reporter.start()
    assert worker.hub.latency_sink is not None  # the histogram goes straight to the slot
    reporter.publish()

    view = table.read(1)
    c = worker.counters
    expected = {
        "port": 8123,
        "connections": 2,
        "connections_backpressure": 6,
        "subscriptions": 3,
        "topics": 4,
        "redis_reconnects": 7,
        "redis_connected": 1,
        "pubsub_lag_ns": 1_500_000,
        "gc_full_collections": 3,
        "gc_full_pause_ns": 250_000_000,
        **{f.name: getattr(c, f.name) for f in fields(c)},
    }
    assert set(expected) == {s.name for s in STATS}, "a new row needs its expected value here"
    assert {name: getattr(view, name) for name in expected} == expected
    assert view.state is WorkerState.READY and view.heartbeat_age_s() < 60
    for other in (0, 2):  # nothing spills into a neighbour's slot
        assert table.read(other).state is WorkerState.EMPTY
        assert table.read(other).events_in == 0


def test_the_slot_follows_the_counters(table):
    worker = _fake_worker()
    reporter = FleetReporter(worker, table.worker_writer(0))
    reporter.start()
    reporter.publish()
    worker.counters.deliveries += 5
    worker.draining = True
    reporter.publish()
    view = table.read(0)
    assert view.deliveries == worker.counters.deliveries
    assert view.state is WorkerState.DRAINING
    worker.stopping = True
    reporter.publish()
    assert table.read(0).state is WorkerState.STOPPING


def test_alone_a_worker_keeps_its_own_breaker(table):
    worker = _fake_worker()
    FleetReporter(worker, table.worker_writer(0))  # no table: no node decision to follow
    worker.breaker.update(1, 1)
    assert worker.breaker is not None and worker.breaker_open()


def test_under_a_supervisor_the_worker_reads_the_nodes_decision(table):
    worker = _fake_worker()
    worker.breaker.update(1, 1)  # its own players alone would shed
    FleetReporter(worker, table.worker_writer(0), table=table)
    assert worker.breaker is None  # its own breaker stands down
    assert not worker.breaker_open()
    table.publish_breaker(True, 1)
    assert worker.breaker_open()
    table.publish_breaker(False, 1)
    assert not worker.breaker_open()
