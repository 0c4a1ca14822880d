"""The worker's garbage-collection policy (gateway/gcpolicy.py)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
from websockets.asyncio.client import connect

from gateway.gcpolicy import NEVER, GcPolicy
from tests.conftest import eventually, token


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Node:
    """A cyclic object: only a full collection frees it once it is old."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def installed():
    policy = GcPolicy()
    policy.install()
    try:
        yield policy
    finally:
        policy.uninstall()


def test_due_after_a_share_of_the_players_closed() -> None:
    clock = Clock()
    policy = GcPolicy(closed_share=0.25, min_closed=10, interval_s=600, clock=clock)
    assert policy.due(open_connections=100) is None
    for _ in range(24):
        policy.connection_closed()
    assert policy.due(100) is None  # 24 < 25% of 100
    policy.connection_closed()
    assert policy.due(100) == "25 connections closed"
    assert policy.due(10) == "25 connections closed"
    assert policy.due(1000) is None  # a quarter of a bigger crowd has not left yet


def test_due_needs_at_least_min_closed() -> None:
    policy = GcPolicy(closed_share=0.0, min_closed=3, clock=Clock())
    policy.connection_closed()
    policy.connection_closed()
    assert policy.due(0) is None
    policy.connection_closed()
    assert policy.due(0) is not None


def test_due_after_the_interval_whatever_closed() -> None:
    clock = Clock()
    policy = GcPolicy(interval_s=600, clock=clock)
    clock.now += 599
    assert policy.due(5000) is None
    clock.now += 1
    assert policy.due(5000) == "600 s since the last"


def test_collect_counts_times_and_starts_over() -> None:
    clock = Clock()
    calls = []
    policy = GcPolicy(min_closed=1, closed_share=0.0, interval_s=600, clock=clock,
                      collect=lambda: calls.append(1) or 42)
    policy.connection_closed()
    clock.now += 300
    assert policy.collect("test") == 42
    assert calls == [1]
    assert policy.collections == 1
    assert policy.last_pause_ns > 0 and policy.pause_ns_total == policy.last_pause_ns
    assert policy.closed == 0
    clock.now += 599
    assert policy.due(0) is None  # the interval counts from this collection


def test_install_freezes_and_turns_automatic_full_collections_off(installed) -> None:
    assert gc.get_threshold()[2] == NEVER
    assert gc.get_freeze_count() > 0
    installed.uninstall()
    assert gc.get_threshold()[2] != NEVER
    assert gc.get_freeze_count() == 0


def _promote_garbage(count: int) -> list[weakref.ref]:
    """`count` cycles that die after they reached the oldest generation."""
    keep = [Node() for _ in range(count)]
    gc.collect(1)  # survivors of generation 1 move to generation 2
    refs = [weakref.ref(node) for node in keep]
    del keep
    return refs


def _grow(objects: int) -> list[list]:
    """Allocate long-lived containers: enough young collections for CPython to want a
    full one."""
    return [[] for _ in range(objects)]


def test_no_automatic_full_collection_while_installed(installed) -> None:
    before = gc.get_stats()[2]["collections"]
    held = _grow(400_000)
    assert gc.get_stats()[2]["collections"] == before
    del held


def test_cpython_collects_fully_by_itself_without_the_policy() -> None:
    """The control for the test above: the same growth triggers full collections."""
    gc.collect()
    before = gc.get_stats()[2]["collections"]
    held = _grow(400_000)
    assert gc.get_stats()[2]["collections"] > before
    del held


def test_old_cycles_wait_for_the_policy_and_are_then_freed(installed) -> None:
    refs = _promote_garbage(1000)
    _grow(50_000)  # young collections run; they do not look at generation 2
    assert sum(r() is not None for r in refs) == 1000
    assert installed.collect("test") >= 1000
    assert all(r() is None for r in refs)


async def test_a_worker_runs_a_full_collection_after_players_closed(worker_factory) -> None:
    worker = worker_factory(OG_GC_FULL_MIN_CLOSED="2", OG_GC_FULL_CLOSED_SHARE="0")
    assert "start-up heap frozen" in worker.log()
    for _ in range(2):
        async with connect(worker.url, additional_headers={"Cookie": f"og_session={token()}"}
                           ) as ws:
            await ws.recv()  # welcome
    await eventually(lambda: "full garbage collection (2 connections closed)" in worker.log())


def test_a_worker_can_leave_garbage_collection_to_cpython(worker_factory) -> None:
    worker = worker_factory(OG_GC_MANAGED="0")
    assert "start-up heap frozen" not in worker.log()


async def test_run_holds_off_while_told_to_and_collects_after() -> None:
    collected = []
    policy = GcPolicy(min_closed=1, closed_share=0.0, check_s=0.01,
                      collect=lambda: collected.append(1) or 0)
    policy.installed = True  # as if installed; the collector itself is not touched
    policy.connection_closed()
    held = [True]
    task = asyncio.create_task(policy.run(lambda: 10, hold=lambda: held[0]))
    try:
        await asyncio.sleep(0.1)
        assert collected == []  # due, but held (a drain sending players away)
        held[0] = False
        await eventually(lambda: collected == [1])
    finally:
        task.cancel()

