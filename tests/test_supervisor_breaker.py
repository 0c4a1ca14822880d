"""The node's breaker: the supervisor decides it from the table; the table carries it."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.breaker import Breaker
from gateway.fleet import WorkerField, WorkerState
from supervisor.node import Supervisor
from supervisor.settings import NodeSettings
from tests.conftest import eventually


@pytest.fixture
def supervisor(tmp_path):
    made = Supervisor(NodeSettings.from_env({"OG_WORKERS": "2"}), {}, tmp_path,
                      Breaker(0.05, 0.03, min_players=2))
    yield made
    made.table.close()
    made.table.unlink()


def _report(supervisor: Supervisor, slot: int, players: int, pressured: int,
            state: WorkerState = WorkerState.READY) -> None:
    """What a worker's reporter would write into its slot."""
    writer = supervisor.table.worker_writer(slot)
    writer.claim()
    writer.publish({WorkerField.CONNECTIONS: players,
                    WorkerField.CONNECTIONS_BACKPRESSURE: pressured})
    writer.set_state(state)


def _decision(supervisor: Supervisor) -> tuple[bool, int]:
    return supervisor.table.breaker_open(), supervisor.table.breaker_trips()


def test_the_node_wide_count_trips_it_where_no_worker_alone_would(supervisor):
    _report(supervisor, 0, players=10, pressured=1)
    _report(supervisor, 1, players=10, pressured=0)
    supervisor.decide_breaker()
    assert _decision(supervisor) == (False, 0)  # one player: under min_players

    _report(supervisor, 1, players=10, pressured=1)  # 2 of 20 over the node: 10%
    supervisor.decide_breaker()
    assert _decision(supervisor) == (True, 1)
    status = supervisor.status()
    assert status["breaker_open"] and status["breaker_trips"] == 1

    supervisor.decide_breaker()  # still over: stays open, no second trip
    assert _decision(supervisor) == (True, 1)

    _report(supervisor, 0, players=10, pressured=0)  # one player left behind
    supervisor.decide_breaker()
    assert _decision(supervisor) == (False, 1)
    assert not supervisor.status()["breaker_open"]


def test_an_empty_slot_no_longer_counts(supervisor):
    _report(supervisor, 0, players=4, pressured=4)
    supervisor.decide_breaker()
    assert supervisor.table.breaker_open()
    supervisor.table.worker_writer(0).set_state(WorkerState.EMPTY)  # the worker exited
    supervisor.decide_breaker()
    assert _decision(supervisor) == (False, 1)


async def test_the_monitor_decides_on_its_tick(supervisor):
    _report(supervisor, 2, players=3, pressured=3)  # a successor's slot counts as well
    monitor = asyncio.create_task(supervisor._monitor())
    try:
        await eventually(supervisor.table.breaker_open, timeout=10)
        _report(supervisor, 2, players=3, pressured=0)
        await eventually(lambda: not supervisor.table.breaker_open(), timeout=10)
    finally:
        monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monitor
    assert supervisor.table.breaker_trips() == 1
