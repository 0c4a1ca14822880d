"""Several nodes behind one HAProxy (issue 14, point 3).

Two `oddsgate run` supervisors on one Redis, and one HAProxy in front of
both rendered by `oddsgate haproxy-config --node ...`: every worker of both
nodes is a server on one consistent-hash ring, each asked by its own node's
agent. Players spread over both nodes; a whole node drained sends its
players to the other with no reset and no ordering violation.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from client.odds import OddsClient
from feed.events import PriceUpdate
from feed.publisher import Publisher
from gateway.topics import PartitionMap
from haproxy.settings import HAProxySettings, NodeTarget
from supervisor.embedded_redis import free_port
from supervisor.haproxy import HAProxyProcess
from tests.conftest import token
from tests.node_harness import start_node

TOPICS = [f"odds:1:39:{m}" for m in range(300, 304)]
pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy")


@contextlib.asynccontextmanager
async def _feed(redis_url: str):
    client = aioredis.Redis.from_url(redis_url)
    publisher = Publisher(client, PartitionMap.load(None))
    await publisher.publish_many([PriceUpdate(t, t.split(":", 1)[1], "m", {"home": "2.00"})
                                  for t in TOPICS])
    stop = asyncio.Event()

    async def run() -> None:
        rng = random.Random(5)
        while not stop.is_set():
            topic = rng.choice(TOPICS)
            with contextlib.suppress(aioredis.ConnectionError):
                await publisher.publish(PriceUpdate(topic, topic.split(":", 1)[1], "m",
                                                    {"home": f"{rng.uniform(1.1, 9):.2f}"}))
            await asyncio.sleep(0.01)

    task = asyncio.create_task(run())
    try:
        yield
    finally:
        stop.set()
        await task
        await client.aclose()


@pytest.mark.timeout(180)
async def test_two_nodes_behind_one_haproxy_share_players_and_one_drains_to_the_other(
        redis_server, tmp_path) -> None:
    nodes = [start_node(redis_server.url, tmp_path / name, workers=2, OG_NODE=name,
                        OG_DRAIN_SETTLE_MS="300")
             for name in ("node-a", "node-b")]
    edge_dir = Path(tempfile.mkdtemp(prefix="og-edge-"))  # short: unix socket paths
    edge = None
    players: list[OddsClient] = []
    try:
        targets = [NodeTarget(n.runtime.name, "127.0.0.1", n.base_port, n.workers,
                              n.agent_port, i + 1) for i, n in enumerate(nodes)]
        edge = HAProxyProcess(HAProxySettings.for_nodes(
            targets, bind_port=free_port(), stats_socket=str(edge_dir / "stats.sock")),
            edge_dir / "haproxy")
        await asyncio.to_thread(edge.start)
        await asyncio.to_thread(
            nodes[0].wait, lambda: set(edge.servers()) == {
                "node-a-w0", "node-a-w1", "node-b-w0", "node-b-w1"} and all(
                s["status"] == "UP" for s in edge.servers().values()), 20, "edge servers up")
        url = f"ws://127.0.0.1:{edge.settings.bind_port}/ws"
        async with _feed(redis_server.url):
            for i in range(40):
                player = OddsClient(url, token=token(f"p{i}", f"several-{i}"))
                await player.connect()
                await player.subscribe(TOPICS)
                players.append(player)
            placed = {(p.welcome["node"], p.welcome["worker"]) for p in players}
            assert placed == {("node-a", 0), ("node-a", 1), ("node-b", 0), ("node-b", 1)}
            on_a = [p for p in players if p.welcome["node"] == "node-a"]
            done = await asyncio.to_thread(nodes[0].command, cmd="drain", worker="all",
                                           wait=True, timeout=30)
            assert done["ok"], done
            for player in on_a:
                await player.wait_resumed(1, timeout=20)
                assert player.welcome["node"] == "node-b"
            await asyncio.sleep(0.5)
        for player in players:
            assert player.violations == [] and player.stats.resets == 0
    finally:
        for player in players:
            await player.close()
        if edge is not None:
            await asyncio.to_thread(edge.stop)
        shutil.rmtree(edge_dir, ignore_errors=True)
        for node in nodes:
            node.stop()


def test_the_rendered_servers_name_their_node_its_agent_and_a_fixed_id() -> None:
    from haproxy.render import server_lines

    settings = HAProxySettings.for_nodes(
        [NodeTarget.parse("eu1=10.0.0.1:8001:2:8100:1"),
         NodeTarget.parse("eu2=[fd00::2]:8001:1:8100:7")],
        bind_port=8000, stats_socket="/run/og/stats.sock")
    assert server_lines(settings) == [
        '    server eu1-w0 10.0.0.1:8001 id 1001 agent-send "w0\\n" '
        "agent-addr 10.0.0.1 agent-port 8100",
        '    server eu1-w1 10.0.0.1:8002 id 1002 agent-send "w1\\n" '
        "agent-addr 10.0.0.1 agent-port 8100",
        '    server eu2-w0 [fd00::2]:8001 id 7001 agent-send "w0\\n" '
        "agent-addr fd00::2 agent-port 8100",
    ]


@pytest.mark.parametrize(("nodes", "error"), [
    (["a=h:8001:2:8100:1", "a=h2:8001:2:8100:2"], "named twice"),
    (["a=h:8001:2:8100:1", "b=h2:8001:2:8100:1"], "number 1 taken"),
    (["a=h:8001:2:8100:1", "b=h:8002:2:8200:2"], "h:8002 used twice"),
    (["A=h:8001:2:8100:1"], "1-20 of [a-z0-9-]"),
    (["a=h:8001:0:8100:1"], "workers=0"),
    (["a=h:8001:2:8100:65"], "number=65"),
])
def test_bad_node_lists_are_refused_naming_the_problem(nodes: list[str], error: str) -> None:
    settings = HAProxySettings.for_nodes([NodeTarget.parse(n) for n in nodes], bind_port=8000,
                                         stats_socket="/run/og/stats.sock")
    with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("]", r"\]")):
        settings.validate()


def test_a_malformed_node_flag_says_its_shape() -> None:
    with pytest.raises(ValueError, match="NAME=HOST:BASE_PORT:WORKERS:AGENT_PORT:NUMBER"):
        NodeTarget.parse("a=h:8001:2")
