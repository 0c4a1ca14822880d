"""Regions' aggregators against real Redis: the same input log, the same bytes.

The synthetic providers run in real time into two regions' input logs (two
databases of the test Redis stand for two regions' servers), and each
region's aggregator runs on its own copy: their published streams must be
byte-identical, whatever their pace, through a restart from a checkpoint and
through a crash that lost everything since the last one; a late input makes
a region fail-stop instead of diverging.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace

import pytest
import redis.asyncio as aioredis

from aggregator.feeder import feed_regions
from aggregator.inputlog import InputLog, input_key
from aggregator.inputs import ProviderMessage
from aggregator.service import EXIT_DIVERGED, Aggregator
from aggregator.settings import AggregatorSettings
from gateway.topics import PartitionMap
from redis_contract import REGION_ALIVE_KEY, history_key, latest_key, meta_key
from redis_contract.target import async_client

SETTINGS = AggregatorSettings(checkpoint_ms=200, provider_idle_ms=1500)


def _db_url(redis_url: str, db: int) -> str:
    if redis_url.startswith("redis://"):
        return f"{redis_url.rsplit('/', 1)[0]}/{db}"
    return f"{redis_url}?db={db}"


@pytest.fixture
async def regions(redis_url: str):
    urls = {"a": _db_url(redis_url, 1), "b": _db_url(redis_url, 2)}
    clients = {name: aioredis.Redis.from_url(url) for name, url in urls.items()}
    for client in clients.values():
        await client.flushdb()
    yield urls, clients
    for client in clients.values():
        await client.flushdb()
        await client.aclose()


async def _published(client: aioredis.Redis) -> dict[str, tuple]:
    """Every topic's meta, history bytes and latest bytes in one region."""
    out = {}
    async for key in client.scan_iter("og:{odds:*}:meta"):
        topic = key.decode()[4:-6]
        meta = await client.hmget(meta_key(topic), "epoch", "seq")
        history = [f[b"e"] for _id, f in await client.xrange(history_key(topic))]
        out[topic] = (tuple(meta), history, await client.hgetall(latest_key(topic)))
    return out


class Running:
    """An aggregator task on one region's Redis."""

    def __init__(self, url: str, region: str, **settings: int) -> None:
        self.redis = async_client(url)  # a server's URL or a cluster's (test_cluster_broker)
        self.stop = asyncio.Event()
        self.aggregator = Aggregator(self.redis, replace(SETTINGS, **settings),
                                     PartitionMap.load(None), region)
        self.task = asyncio.create_task(self.aggregator.run(self.stop))

    async def finish(self) -> int:
        self.stop.set()
        code = await asyncio.wait_for(self.task, 10)
        await self.redis.aclose()
        return code

    async def crash(self) -> None:
        """Gone at once: nothing since the last checkpoint is saved."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.redis.aclose()


async def test_two_regions_publish_byte_identical_streams(regions) -> None:
    urls, clients = regions
    stop_feed = asyncio.Event()
    feed = asyncio.create_task(feed_regions(urls, 11, stop_feed))
    a = Running(urls["a"], "a")
    await asyncio.sleep(1.0)
    b = Running(urls["b"], "b")  # a second later: its own pace
    await asyncio.sleep(3.0)
    stop_feed.set()
    await feed
    await asyncio.sleep(1.5)  # both drain what was written (idle providers are excluded)
    assert await a.finish() == 0 and await b.finish() == 0
    pub_a, pub_b = await _published(clients["a"]), await _published(clients["b"])
    assert pub_a, "nothing was published"
    assert sum(len(h) for _m, h, _l in pub_a.values()) >= 10
    assert pub_a == pub_b
    for (epoch, seq), history, _latest in pub_a.values():
        assert epoch == b"main-g1" and int(seq) == len(history)


async def test_restarts_keep_the_epoch_reuse_no_seq_and_give_the_same_bytes(regions) -> None:
    urls, clients = regions
    stop_feed = asyncio.Event()
    feed = asyncio.create_task(feed_regions(urls, 12, stop_feed))
    steady = Running(urls["b"], "b")
    first = Running(urls["a"], "a")
    await asyncio.sleep(1.5)
    assert await first.finish() == 0  # a clean stop: checkpoint saved
    second = Running(urls["a"], "a")
    await asyncio.sleep(1.5)
    await second.crash()  # a crash: what followed the last checkpoint is redone
    await asyncio.sleep(0.5)
    third = Running(urls["a"], "a")
    await asyncio.sleep(1.0)
    stop_feed.set()
    await feed
    await asyncio.sleep(1.5)
    assert await third.finish() == 0 and await steady.finish() == 0
    assert await _published(clients["a"]) == await _published(clients["b"])
    assert third.aggregator.progress.restarts_from_checkpoint == 0


async def test_a_late_input_stops_the_region_instead_of_diverging(regions) -> None:
    urls, clients = regions
    log = InputLog(clients["a"])
    first, *others = SETTINGS.provider_names()
    # Every provider speaks at t=1000; then all but the first go on speaking
    # (t=3000, 4000, ...). The first falls silent: once it is excluded, the merge
    # releases past 2500.
    await log.append([ProviderMessage(p, 1, 1000, "heartbeat") for p in (first, *others)])
    stop = asyncio.Event()

    async def others_speak() -> None:
        seq = 1
        while not stop.is_set():
            seq += 1
            await log.append([ProviderMessage(p, seq, 1000 * (seq + 1), "heartbeat")
                              for p in others])
            await asyncio.sleep(0.05)

    speaking = asyncio.create_task(others_speak())
    running = Running(urls["a"], "a", provider_idle_ms=200)
    await asyncio.sleep(0.8)
    assert await clients["a"].exists(REGION_ALIVE_KEY) == 1  # progress: the region serves
    # The first's copy then brings a message from before that point (its copy
    # lagged here; a region that had it in time released it in its place).
    await log.append([ProviderMessage(first, 2, 2500, "heartbeat")])
    assert await asyncio.wait_for(running.task, 5) == EXIT_DIVERGED
    assert await clients["a"].exists(REGION_ALIVE_KEY) == 0  # its workers fail /healthz
    stop.set()
    await speaking
    await running.redis.aclose()


async def test_a_corrupt_input_log_entry_stops_the_region_with_a_clear_error(regions) -> None:
    urls, clients = regions
    await clients["a"].xadd(input_key(SETTINGS.provider_names()[0]), {"m": b"not json"},
                            id="1-0")
    running = Running(urls["a"], "a")
    assert await asyncio.wait_for(running.task, 5) == EXIT_DIVERGED
    await running.redis.aclose()


async def test_a_provider_with_unread_messages_is_never_excluded(regions) -> None:
    """Regression: a read answered with only one provider's entries (the aggregator
    stood still while blocked in XREAD: SIGSTOP, a paused VM) made every other
    provider look silent; excluded, their backlog then came in late and the region
    stopped as diverged. Silence is judged on the copy, not on this process's reads."""
    urls, clients = regions
    log = InputLog(clients["a"])
    first, *others = SETTINGS.provider_names()
    await log.append([ProviderMessage(p, 1, 1000, "heartbeat") for p in (first, *others)])
    redis = aioredis.Redis.from_url(urls["a"])
    aggregator = Aggregator(redis, replace(SETTINGS, provider_idle_ms=100),
                            PartitionMap.load(None), "a")
    await aggregator.restore()
    await aggregator.step(block_ms=10)
    # Every provider goes on writing; this process stands still for a while...
    await log.append([ProviderMessage(p, seq, 1000 * seq, "heartbeat")
                      for p in (first, *others) for seq in range(2, 6)])
    await asyncio.sleep(0.3)
    real_read = aggregator.log.read

    async def first_only(after, count=2000, block_ms=None):  # ...and wakes to one entry
        return [m for m in await real_read(after, count, block_ms) if m.provider == first][:1]

    aggregator.log.read = first_only  # type: ignore[method-assign]
    await aggregator.step(block_ms=10)
    assert aggregator.merger.excluded == ()
    aggregator.log.read = real_read  # type: ignore[method-assign]
    for _ in range(3):  # the backlog comes in: nothing of it is late
        await aggregator.step(block_ms=10)
    assert not aggregator.merger.diverged
    assert sum(aggregator.merger.late.values()) == 0
    await redis.aclose()
