"""What the supervisor does with a worker process that exited: its slot, its restart count.

The exits are real (a child that ran and ended); the slots are written the
way a worker's reporter writes them. The whole path, kill -9 of a worker
under load, is tests/test_node.py's; these pin what /metrics then shows.
"""

from __future__ import annotations

import asyncio
import os
import sys

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.breaker import Breaker
from gateway.fleet import WorkerField, WorkerState
from supervisor.metrics import WorkerInfo, fleet_registry
from supervisor.node import Incarnation, Phase, Supervisor
from supervisor.run import worker_info
from supervisor.settings import NodeSettings


@pytest.fixture
def supervisor(tmp_path):
    made = Supervisor(NodeSettings.from_env({"OG_WORKERS": "2"}), {}, tmp_path, Breaker())
    yield made
    made.table.close()
    made.table.unlink()


async def _exited(code: int = 3) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", f"raise SystemExit({code})")
    await proc.wait()
    return proc


def _occupy(supervisor: Supervisor, slot: int, pid: int,
            state: WorkerState = WorkerState.READY) -> None:
    """The words a worker with `pid` leaves in its slot: players, a heartbeat, a state."""
    writer = supervisor.table.worker_writer(slot)
    writer.claim()
    writer.publish({WorkerField.PID: pid, WorkerField.CONNECTIONS: 5,
                    WorkerField.CONNECTIONS_BACKPRESSURE: 5})
    writer.set_state(state)


async def test_a_dead_workers_slot_is_cleared_and_its_restart_counted(supervisor) -> None:
    worker = supervisor.workers[1]
    for expected in (1, 2):
        proc = await _exited()
        worker.current = Incarnation(slot=1, proc=proc)
        _occupy(supervisor, 1, proc.pid)
        supervisor._on_exit(worker, worker.current)
        view = supervisor.table.read(1)
        assert not view.occupied, view.state  # no stale READY slot, no frozen heartbeat
        assert supervisor.table.backpressure_counts() == (0, 0)  # its players are gone
        assert worker.restarts_total == expected and worker.phase is Phase.RESTARTING
        worker.restart_times.clear()  # what a reload does: the count for /metrics stays
    assert worker_info(supervisor) == [
        WorkerInfo(0, None, 0, False, "starting"), WorkerInfo(1, None, 2, False, "restarting")]
    text = generate_latest(
        fleet_registry(supervisor.table, lambda: worker_info(supervisor), 2)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {s.labels["worker"]: s.value for s in
            families["oddsgate_worker_restarts"].samples} == {"0": 0, "1": 2}
    assert families["oddsgate_worker_heartbeat_age_seconds"].samples == []


async def test_a_slot_another_process_claimed_is_left_alone(supervisor) -> None:
    proc = await _exited()
    _occupy(supervisor, 1, os.getpid())  # a successor already took the slot
    supervisor._release(Incarnation(slot=1, proc=proc))
    assert supervisor.table.read(1).state is WorkerState.READY


async def test_the_monitor_clears_the_slot_of_a_retired_process_that_exited(supervisor) -> None:
    worker = supervisor.workers[0]
    proc = await _exited(0)
    worker.retired = [Incarnation(slot=2, proc=proc, retiring=True)]
    _occupy(supervisor, 2, proc.pid, WorkerState.STOPPING)
    await supervisor._check_workers()
    assert worker.retired == [] and not supervisor.table.read(2).occupied
    assert worker.restarts_total == 0  # a planned exit is no restart
