"""The agent HAProxy asks about each server: the request it parses, the line it answers.

The answers are the supervisor's (`Supervisor.agent_reply`, from the fleet
table and its own drain flags); the port is `AgentServer`, spoken to here
over real TCP the way HAProxy speaks to it: `w<index>\\n`, one line back.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from gateway.fleet import WorkerState
from supervisor.agent import AgentServer, agent_request_index
from supervisor.embedded_redis import free_port
from supervisor.node import Incarnation, Supervisor
from supervisor.settings import NodeSettings


def test_agent_request_index() -> None:
    assert agent_request_index(b"w0\n") == 0
    assert agent_request_index(b"w12\r\n") == 12
    assert agent_request_index(b" w3\n") == 3
    assert agent_request_index(b"x1\n") is None
    assert agent_request_index(b"w\n") is None
    assert agent_request_index(b"w-1\n") is None
    assert agent_request_index(b"w1234567\n") is None
    assert agent_request_index(b"") is None


async def ask(port: int, request: bytes) -> bytes:
    """One agent check as HAProxy makes it: connect, send, read until the agent closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_the_agent_answers_each_server_by_its_index() -> None:
    replies = {0: "up ready", 1: "up drain", 2: "down"}
    asked: list[int] = []

    def answer(index: int) -> str:
        asked.append(index)
        return replies[index]  # KeyError for a worker the node does not have

    agent = AgentServer("127.0.0.1", free_port(), answer)
    await agent.start()
    try:
        assert await ask(agent.port, b"w0\n") == b"up ready\n"
        assert await ask(agent.port, b"w1\n") == b"up drain\n"
        assert await ask(agent.port, b"w2\r\n") == b"down\n"
        assert asked == [0, 1, 2]
        # no such worker, or not a server name at all: "down", so HAProxy sends it no one
        assert await ask(agent.port, b"w7\n") == b"down\n"
        assert await ask(agent.port, b"hello\n") == b"down\n"
        assert asked == [0, 1, 2, 7]
    finally:
        await agent.stop()


# -- what the supervisor answers for each state of a worker ----------------------------


@pytest.fixture
def supervisor(tmp_path) -> Iterator[Supervisor]:
    made = Supervisor(NodeSettings.from_env({"OG_WORKERS": "1"}), {}, tmp_path)
    yield made
    made.table.close()
    made.table.unlink()


def incarnation_in(supervisor: Supervisor, slot: int, state: WorkerState) -> Incarnation:
    """A worker process in `slot` that has reported `state`, as its reporter would.

    The slot's writer stamps this process's pid, so the incarnation's process
    handle is this process (alive: no return code).
    """
    writer = supervisor.table.worker_writer(slot)
    writer.claim()
    writer.set_state(state)
    proc = SimpleNamespace(pid=os.getpid(), returncode=None)
    return Incarnation(slot, proc)  # type: ignore[arg-type]


@pytest.mark.parametrize(("state", "reply"), [
    (WorkerState.STARTING, "down"),
    (WorkerState.READY, "up ready"),
    (WorkerState.DRAINING, "up ready"),  # its own drain: HAProxy keeps routing its sessions
    (WorkerState.STOPPING, "down"),
])
def test_a_workers_reported_state(supervisor: Supervisor, state: WorkerState,
                                  reply: str) -> None:
    worker = supervisor.workers[0]
    worker.current = incarnation_in(supervisor, 0, state)
    assert supervisor.agent_reply(0) == reply


def test_no_process_or_another_processs_slot_is_down(supervisor: Supervisor) -> None:
    assert supervisor.agent_reply(0) == "down"  # never started
    worker = supervisor.workers[0]
    worker.current = incarnation_in(supervisor, 0, WorkerState.READY)
    worker.current.proc = SimpleNamespace(pid=os.getpid() + 1, returncode=None)  # type: ignore[assignment]
    assert supervisor.agent_reply(0) == "down"  # the slot holds someone else's report


@pytest.mark.parametrize("flag", ["operator_drain", "auto_drain", "stopping"])
def test_a_drain_of_any_origin_is_up_drain(supervisor: Supervisor, flag: str) -> None:
    worker = supervisor.workers[0]
    worker.current = incarnation_in(supervisor, 0, WorkerState.READY)
    setattr(supervisor if flag == "stopping" else worker, flag, True)
    assert supervisor.agent_reply(0) == "up drain"


def test_a_drained_worker_that_is_not_serving_is_down(supervisor: Supervisor) -> None:
    worker = supervisor.workers[0]
    worker.current = incarnation_in(supervisor, 0, WorkerState.STARTING)
    worker.operator_drain = True
    assert supervisor.agent_reply(0) == "down"


def test_during_a_reload_the_predecessor_keeps_the_server_up(supervisor: Supervisor) -> None:
    worker = supervisor.workers[0]
    old_slot, new_slot = worker.slots(supervisor.n)
    worker.predecessor = incarnation_in(supervisor, old_slot, WorkerState.READY)
    worker.current = incarnation_in(supervisor, new_slot, WorkerState.STARTING)
    assert supervisor.agent_reply(0) == "up ready"
    worker.predecessor = None  # the successor is on its own now, and not ready yet
    assert supervisor.agent_reply(0) == "down"
