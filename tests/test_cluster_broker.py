"""Issue 14, points 1-2: odds on a real Redis Cluster (3 masters, a replica each).

A worker started with OG_REDIS_CLUSTER_NODES follows topics with SSUBSCRIBE on
the master of each topic's slot; the publisher's script runs on that slot and
sends with SPUBLISH. What must hold whatever the cluster does: every player
ends with exactly Redis's state of every topic (epoch, seq, every market's
newest event), and PROTOCOL.md §5 holds on every connection (the client
library checks it: `violations`). A master killed may cost a reset (its
replica can be behind); a slot moved may not. Nothing here trusts a client
library's resubscription: the broker routes topics itself, and the proof is
the players' state against Redis's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import orjson
import pytest
import redis
from redis.crc import key_slot

from client.odds import OddsClient
from feed.events import PriceUpdate
from feed.publisher import Publisher
from gateway.topics import PartitionMap
from redis_contract import latest_key, meta_key
from redis_contract.target import async_client
from tests.cluster_harness import LocalCluster
from tests.conftest import eventually, start_worker, token

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with LocalCluster(tmp_path_factory.mktemp("cluster"), masters=3, replicas=1) as running:
        yield running


@pytest.fixture
def clean(cluster: LocalCluster) -> LocalCluster:
    for port in cluster.masters_ports():
        with cluster.client(port) as c:
            c.flushall()
    return cluster


def topics_on_every_master(cluster: LocalCluster, per_master: int = 4) -> list[str]:
    """League topics of sport 1 until each master owns `per_master` of them."""
    owned: dict[int, list[str]] = {port: [] for port in cluster.masters_ports()}
    pmap = PartitionMap.load(None)
    for league in itertools.count(1):
        if pmap.is_market_level(1, league):
            continue
        topic = f"odds:1:{league}"
        port = cluster.master_of(key_slot(topic.encode()))
        if len(owned[port]) < per_master:
            owned[port].append(topic)
        if all(len(t) == per_master for t in owned.values()):
            return sorted(t for ts in owned.values() for t in ts)
    raise AssertionError("unreachable")


def update(topic: str, n: int) -> PriceUpdate:
    league = topic.split(":")[2]
    return PriceUpdate(topic, f"1:{league}:{n % 5}", f"e{n % 5}",
                       {"home": f"1.{n % 97:02d}", "away": f"2.{n % 89:02d}"})


class Feed:
    """Publishes round-robin over topics until stopped; a failed publish is
    retried (the cluster may be mid-failover), as an aggregator would."""

    def __init__(self, url: str, topics: list[str]) -> None:
        self.client = async_client(url)
        self.publisher = Publisher(self.client, PartitionMap.load(None))
        self.topics = topics
        self.published = 0
        self.failures = 0

    async def burst(self, count: int) -> None:
        for n in range(count):
            await self._publish(update(self.topics[n % len(self.topics)], self.published + n))
        self.published += count

    async def run(self, stop: asyncio.Event, pause: float = 0.005) -> None:
        n = 0
        while not stop.is_set():
            await self._publish(update(self.topics[n % len(self.topics)], n))
            n += 1
            self.published += 1
            await asyncio.sleep(pause)

    async def _publish(self, event: PriceUpdate) -> None:
        while True:
            try:
                await self.publisher.publish(event)
                return
            except (redis.RedisError, OSError):
                self.failures += 1
                await asyncio.sleep(0.05)

    def start(self) -> None:
        """Publish in the background until `finish`."""
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.run(self._stop))

    async def finish(self) -> None:
        if getattr(self, "_task", None) is not None:
            self._stop.set()
            await self._task
            self._task = None

    async def close(self) -> None:
        await self.finish()
        await self.client.aclose()


def redis_state(cluster: LocalCluster, topic: str) -> tuple[str, int, dict[str, bytes]]:
    with redis.RedisCluster(host="127.0.0.1", port=cluster.masters_ports()[0]) as c:
        meta = c.hgetall(meta_key(topic))
        latest = c.hgetall(latest_key(topic))
    return meta[b"epoch"].decode(), int(meta[b"seq"]), {
        k.decode(): v for k, v in latest.items()}


def holds_redis_state(cluster: LocalCluster, players: list[OddsClient],
                      topics: list[str]) -> bool:
    for topic in topics:
        epoch, seq, latest = redis_state(cluster, topic)
        for player in players:
            held = player.topics.get(topic)
            if held is None or (held.epoch, held.seq) != (epoch, seq):
                return False
            if {m: dict(e) for m, e in held.markets.items()} != {
                    m: orjson.loads(e) for m, e in latest.items()}:
                return False
    return True


async def settled(cluster: LocalCluster, players: list[OddsClient], topics: list[str], *,
                  resets_allowed: bool = False) -> None:
    """Every player ends with Redis's state of every topic, with §5 held throughout."""
    await eventually(lambda: holds_redis_state(cluster, players, topics), timeout=30)
    for player in players:
        assert player.violations == [], player.violations[:5]
        if not resets_allowed:
            assert player.stats.resets == 0


@contextlib.asynccontextmanager
async def players_on(worker, topics: list[str], count: int):
    players = [OddsClient(worker.url, token=token(player=f"p{i}", session=f"s{i}"))
               for i in range(count)]
    try:
        for player in players:
            await player.connect()
            await player.subscribe(topics)
        yield players
    finally:
        for player in players:
            await player.close()


async def test_players_on_every_shard_get_every_event_in_order(clean, tmp_path) -> None:
    topics = topics_on_every_master(clean)
    worker = start_worker("", tmp_path, OG_REDIS_CLUSTER_NODES=clean.seeds)
    feed = Feed(clean.url, topics)
    try:
        await feed.burst(len(topics))  # every topic has its epoch before the players come
        async with players_on(worker, topics, 5) as players:
            await feed.burst(600)
            await eventually(lambda: holds_redis_state(clean, players, topics), timeout=20)
            for player in players:
                assert player.violations == [], player.violations[:5]
                assert player.stats.resets == 0
                # Every event came live or in a gap fill, none lost: 600 after the snapshots.
                assert sum(player.topics[t].seq for t in topics) == feed.published
    finally:
        await feed.close()
        worker.stop()


async def test_a_slot_moved_under_load_loses_nothing_and_resets_nobody(clean, tmp_path) -> None:
    topics = topics_on_every_master(clean, per_master=2)
    moved = topics[0]
    slot = key_slot(moved.encode())
    # No audit: the broker's own routing (Redis's sunsubscribe when the slot
    # leaves) must keep the topic live, not the audit's repair seconds later.
    worker = start_worker("", tmp_path, OG_REDIS_CLUSTER_NODES=clean.seeds, OG_AUDIT_S="0")
    feed = Feed(clean.url, topics)
    try:
        await feed.burst(len(topics))
        async with players_on(worker, topics, 4) as players:
            feed.start()
            await asyncio.sleep(0.5)
            target = next(p for p in clean.masters_ports() if p != clean.master_of(slot))
            await asyncio.to_thread(clean.move_slot, slot, target)
            assert clean.master_of(slot) == target
            before = feed.published
            await eventually(lambda: feed.published > before + 200, timeout=20)
            # The moved topic keeps flowing live after the move, on its new master.
            seq_then = players[0].topics[moved].seq
            await eventually(lambda: players[0].topics[moved].seq > seq_then + 10, timeout=10)
            assert f"redis dropped {moved}" in worker.log()  # its slot left: routed again
            await feed.finish()
            await settled(clean, players, topics)
    finally:
        await feed.close()
        worker.stop()


async def test_a_node_on_the_cluster_resumes_the_players_of_a_killed_worker(clean,
                                                                            tmp_path) -> None:
    """`oddsgate run --haproxy` with OG_REDIS_CLUSTER_NODES: every worker and the
    supervisor use the cluster. A worker SIGKILLed mid-feed: its players
    reconnect through HAProxy and resume from their seqs, with no reset."""
    import os
    import signal

    from tests.node_harness import start_node

    topics = topics_on_every_master(clean, per_master=2)
    node = start_node("", tmp_path / "node", workers=2, OG_REDIS_CLUSTER_NODES=clean.seeds)
    feed = Feed(clean.url, topics)
    try:
        await feed.burst(len(topics))
        async with players_on(node, topics, 6) as players:
            feed.start()
            await asyncio.sleep(0.5)
            victim = node.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            await eventually(lambda: sum(p.stats.resumes for p in players) >= 1, timeout=20)
            before = feed.published
            await eventually(lambda: feed.published > before + 100, timeout=20)
            await feed.finish()
            await settled(clean, players, topics)
    finally:
        await feed.close()
        node.stop()


async def test_an_aggregator_on_the_cluster_publishes_the_bytes_of_one_on_a_single_server(
        clean, redis_url) -> None:
    """Regions (PROTOCOL.md §8) may differ in their Redis: region a on the cluster
    (input log, checkpoints, every topic's publish on its own master), region b on
    one server, fed the same providers, publish byte-identical streams."""
    from aggregator.feeder import feed_regions
    from tests.test_aggregator_regions import Running, _published

    urls = {"a": clean.url, "b": redis_url}
    stop_feed = asyncio.Event()
    feed = asyncio.create_task(feed_regions(urls, 21, stop_feed))
    a, b = Running(urls["a"], "a"), Running(urls["b"], "b")
    await asyncio.sleep(3.0)
    stop_feed.set()
    await feed
    await asyncio.sleep(1.5)  # both drain what was written
    assert await a.finish() == 0 and await b.finish() == 0
    on_cluster, single = async_client(urls["a"]), async_client(urls["b"])
    try:
        published_a, published_b = await _published(on_cluster), await _published(single)
    finally:
        await on_cluster.aclose()
        await single.aclose()
    assert published_a and published_a == published_b
    slots = {clean.master_of(key_slot(topic.encode())) for topic in published_a}
    assert len(slots) > 1  # the topics really are spread over masters


async def test_a_master_killed_mid_feed_gives_resumes_or_resets_never_a_silent_gap(
        clean, tmp_path) -> None:
    """Last in the module: the killed master stays dead (its replica serves)."""
    topics = topics_on_every_master(clean, per_master=3)
    worker = start_worker("", tmp_path, OG_REDIS_CLUSTER_NODES=clean.seeds, OG_AUDIT_S="0")
    feed = Feed(clean.url, topics)
    try:
        await feed.burst(len(topics))
        async with players_on(worker, topics, 4) as players:
            feed.start()
            await asyncio.sleep(0.5)
            victim = clean.master_of(key_slot(topics[0].encode()))
            promoted = await asyncio.to_thread(clean.kill_master, victim, 20.0, False)
            assert clean.master_of(key_slot(topics[0].encode())) == promoted
            before = feed.published
            await eventually(lambda: feed.published > before + 200, timeout=30)
            await feed.finish()
            await settled(clean, players, topics, resets_allowed=True)
    finally:
        await feed.close()
        worker.stop()
