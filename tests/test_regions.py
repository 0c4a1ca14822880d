"""A player following topics across regions (PROTOCOL.md §8), against real nodes.

Two regions, each a whole node (supervisor, worker, HAProxy) with its own
Redis, fed the same events by `TwinFeed` (one epoch, one body per event, so
both regions hold the same bytes). An `OddsClient` given both URLs follows
topics while prices flow; then a region dies (every process of its node
killed at once) and the player must carry on in the other one: resumed from
its last seq, no ``reset``, no §5 violation, nothing lost but what coalescing
allows (`verify_coalescing` against everything published), new prices still
arriving. Scripted regions (tests/test_client_regions.py) cover what the real
server does not do yet (``region_drain``, naming its region in ``welcome``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from client.odds import OddsClient
from client.rules import verify_coalescing
from feed.events import PriceUpdate
from supervisor.embedded_redis import EmbeddedRedis, free_port
from tests.conftest import eventually, token
from tests.node_harness import Node, start_node
from tests.region_harness import TwinFeed, kill_node

TOPICS = ["odds:1:39:1", "odds:1:39:2", "odds:5:8"]  # two market-level, one league-level


def _update(topic: str, rng: random.Random) -> PriceUpdate:
    sport, league, *own = topic.split(":")[1:]
    market = own[0] if own else str(rng.randrange(1, 6))
    prices = {outcome: f"{rng.uniform(1.01, 9):.2f}" for outcome in ("home", "away")}
    return PriceUpdate(topic, f"{sport}:{league}:{market}", f"m-{market}", prices)


@pytest.fixture(scope="module")
def region_redis(tmp_path_factory) -> Iterator[dict[str, EmbeddedRedis]]:
    servers = {name: EmbeddedRedis(tmp_path_factory.mktemp(f"redis-{name}"), port=0).start()
               for name in ("a", "b")}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def regions(region_redis, tmp_path_factory) -> Iterator[Any]:
    """start(name, port=None) -> a node of region `name` on its own (emptied) Redis."""
    for server in region_redis.values():
        client = redis.Redis.from_url(server.url)
        client.flushall()
        client.close()
    started: list[Node] = []

    def start(name: str, frontend_port: int | None = None) -> Node:
        runtime = tmp_path_factory.mktemp(f"r{name}")  # short: HAProxy's socket paths
        node = start_node(region_redis[name].url, runtime, workers=1,
                          frontend_port=frontend_port, OG_REGION=name)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


class Flow:
    """Prices to every topic in both regions, ~200 a second, until `halt`."""

    def __init__(self, twin: TwinFeed) -> None:
        self.twin = twin
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Flow:
        rng = random.Random(5)
        # Every market exists before a player follows it, as an aggregator's do.
        await self.twin.publish_many([_update(t, rng) for t in TOPICS for _ in range(5)])
        self.task = asyncio.create_task(self._run(rng))
        return self

    async def _run(self, rng: random.Random) -> None:
        while not self.stop.is_set():
            await self.twin.publish_many([_update(rng.choice(TOPICS), rng) for _ in range(4)])
            await asyncio.sleep(0.02)

    def heads(self) -> dict[str, int]:
        return {t: self.twin.published[t][-1]["seq"] for t in TOPICS}

    async def halt(self) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task


@pytest.fixture
async def flow(region_redis) -> Any:
    twin = TwinFeed([region_redis["a"].url, region_redis["b"].url])
    flows: list[Flow] = []

    async def make() -> Flow:
        flows.append(await Flow(twin).start())
        return flows[-1]

    yield make
    for each in flows:
        with contextlib.suppress(Exception):
            await each.halt()
    await twin.aclose()


class Player:
    """An OddsClient over several regions, and what it received per topic since
    its snapshot (for `verify_coalescing`)."""

    def __init__(self, urls: list[str]) -> None:
        self.received: dict[str, list[dict]] = defaultdict(list)
        self.base: dict[str, int] = {}
        self.client = OddsClient(urls, token=token(), on_message=self._on_message,
                                 ws_options={"open_timeout": 3})

    def _on_message(self, msg: dict) -> None:
        if msg.get("type") == "odds":
            self.received[msg["topic"]].append(msg)
        elif msg.get("type") == "snapshot":
            self.base[msg["topic"]] = msg["seq"]
            self.received[msg["topic"]] = []

    async def follow(self) -> None:
        welcome = await self.client.connect()
        assert self.client.region == welcome.get("region")  # once the server names one
        assert (await self.client.subscribe(TOPICS)).accepted == TOPICS
        await self.client.wait_synced(TOPICS)

    async def new_prices_after(self, heads: dict[str, int]) -> None:
        """Wait until every topic holds an event published after `heads`."""
        await eventually(lambda: all(self.client.topics[t].seq > heads[t] for t in TOPICS),
                         timeout=15)

    async def assert_whole(self, flow: Flow) -> None:
        """After the feed stopped: the newest state of every topic, every rule kept,
        resumed without reset or second snapshot, nothing lost but superseded."""
        await flow.halt()
        heads = flow.heads()
        await eventually(lambda: all(self.client.topics[t].seq == heads[t] for t in TOPICS),
                         timeout=15)
        client = self.client
        assert client.violations == [], client.violations[:3]
        assert (client.stats.resets, client.stats.snapshots) == (0, len(TOPICS))
        for topic in TOPICS:
            assert verify_coalescing(self.received[topic], flow.twin.published[topic],
                                     after_seq=self.base[topic]) == [], topic


async def test_a_killed_region_fails_over_with_no_reset_and_no_loss(regions, flow) -> None:
    a, b = regions("a"), regions("b")
    prices = await flow()
    player = Player([a.url, b.url])
    await player.follow()
    client = player.client
    assert client.region_url == a.url
    await player.new_prices_after(prices.heads())  # live in A

    kill_node(a)
    await client.wait_resumed(1, timeout=30)
    assert client.region_url == b.url
    assert (client.stats.failovers, client.stats.reconnects) == (1, 1)
    await player.new_prices_after(prices.heads())  # live in B
    await player.assert_whole(prices)
    # What made it seamless: both regions store the very same bytes.
    for topic in TOPICS:
        history_a, history_b = await prices.twin.histories(topic)
        assert history_a == history_b and history_a
    await client.close()


async def test_a_region_refusing_at_start_is_passed_over(regions, flow) -> None:
    b = regions("b")
    prices = await flow()
    down = f"ws://127.0.0.1:{free_port()}/ws"  # region A: nothing listens
    player = Player([down, b.url])
    await player.follow()
    client = player.client
    assert client.region_url == b.url
    assert (client.stats.connect_failures, client.stats.failovers) == (1, 0)
    await player.new_prices_after(prices.heads())
    await player.assert_whole(prices)
    await client.close()


async def test_every_region_down_backs_off_then_recovers_in_the_first_back(
        regions, flow) -> None:
    a, b = regions("a"), regions("b")
    prices = await flow()
    player = Player([a.url, b.url])
    await player.follow()
    client = player.client
    await player.new_prices_after(prices.heads())

    kill_node(a)
    kill_node(b)
    await eventually(lambda: client.stats.backoffs >= 2, timeout=15)
    stats = client.stats
    # Each pass tries both regions at once, then backs off: never a hot loop.
    assert 2 * stats.backoffs <= stats.connect_failures <= 2 * (stats.backoffs + 1)
    assert client.region_url == a.url and not client.connected.is_set()

    regions("b", frontend_port=b.frontend_port)  # B comes back where players knew it
    await client.wait_resumed(1, timeout=30)
    assert client.region_url == b.url
    assert client.stats.failovers == 1
    await player.new_prices_after(prices.heads())
    await player.assert_whole(prices)
    await client.close()

