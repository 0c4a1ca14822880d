"""The Redis contract of a topic (feed/contract.py) against a real Redis.

Reads never write: asking about never-published topics, over HTTP or by
subscribing, leaves Redis without a single new key. One lifetime for a
topic's keys: every publish renews all three, so a live topic keeps its seq
space however long ago its first subscriber came, and a topic nobody
publishes to is forgotten whole. Time is fast-forwarded by lowering the keys'
expiry with PEXPIRE, as that much time passing would.
"""

from __future__ import annotations

import asyncio

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from client.odds import OddsClient
from feed.events import PriceUpdate
from feed.publisher import Publisher
from redis_contract import (
    DEFAULT_TOPIC_TTL_MS,
    UNPUBLISHED_EPOCH,
    history_key,
    latest_key,
    meta_key,
    topic_keys,
)
from tests.conftest import eventually, http_get, token

DAY_MS = 86_400_000


async def _keys(redis_url: str) -> list[bytes]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return [key async for key in client.scan_iter("og:*")]
    finally:
        await client.aclose()


async def fast_forward(redis_url: str, topic: str, ms: int) -> None:
    """What `ms` of wall time does to the topic's keys: expiries run down, or fire."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        for key in topic_keys(topic):
            left = await client.pttl(key)
            if left == -1:  # no expiry: time changes nothing
                continue
            if left >= 0 and left - ms > 0:
                await client.pexpire(key, left - ms)
            elif left >= 0:
                await client.delete(key)
    finally:
        await client.aclose()


def _update(topic: str, price: str) -> PriceUpdate:
    market = topic.removeprefix("odds:")
    return PriceUpdate(topic, market, "m-1", {"home": price})


async def _recv(ws) -> dict:
    return orjson.loads(await asyncio.wait_for(ws.recv(), 5))


async def test_reading_never_published_topics_writes_nothing(worker, redis_url) -> None:
    auth = {"Cookie": f"og_session={token()}"}
    answered = []
    for market in range(30):
        status, _, body = http_get(worker.http + f"/v1/snapshot?topic=odds:1:39:{10**11 + market}",
                                   auth)
        assert status in (200, 429), body
        if status == 200:
            answered.append(orjson.loads(body))
    assert answered, "every snapshot request was rate limited: nothing was read"
    assert all((s["epoch"], s["seq"], s["markets"]) == (UNPUBLISHED_EPOCH, 0, [])
               for s in answered)
    async with connect(worker.url, additional_headers=auth) as ws:
        assert (await _recv(ws))["type"] == "welcome"
        for market in range(20):
            topic = f"odds:1:39:{2 * 10**11 + market}"
            await ws.send(orjson.dumps({"op": "subscribe", "topics": {topic: None}}).decode())
            assert (await _recv(ws))["type"] == "subscribed"
            snapshot = await _recv(ws)
            assert (snapshot["type"], snapshot["epoch"], snapshot["seq"]) == \
                ("snapshot", UNPUBLISHED_EPOCH, 0)
            await ws.send(orjson.dumps({"op": "unsubscribe", "topics": [topic]}).decode())
            assert (await _recv(ws))["type"] == "unsubscribed"
    assert await _keys(redis_url) == []


async def test_every_publish_renews_all_three_keys(publisher, redis_url) -> None:
    topic = "odds:1:39:501"
    await publisher.publish(_update(topic, "1.50"))
    client = aioredis.Redis.from_url(redis_url)
    try:
        for key in topic_keys(topic):
            assert DEFAULT_TOPIC_TTL_MS - 60_000 < await client.pttl(key) <= DEFAULT_TOPIC_TTL_MS
        await fast_forward(redis_url, topic, 3 * DAY_MS)
        await publisher.publish(_update(topic, "1.60"))
        for key in topic_keys(topic):
            assert await client.pttl(key) > DEFAULT_TOPIC_TTL_MS - 60_000
    finally:
        await client.aclose()


async def test_a_topic_followed_before_its_first_publish_keeps_its_seq_space(
        worker, publisher, redis_url) -> None:
    """Regression: the first subscriber's read gave the meta key a 24 h expiry that
    no publish cleared, so a day later a live topic started a new epoch."""
    topic = "odds:1:39:502"
    player = OddsClient(worker.url, token=token())
    await player.connect()
    assert (await player.subscribe([topic])).accepted == [topic]
    await player.wait_synced([topic])
    first = await publisher.publish(_update(topic, "1.50"))
    await eventually(lambda: player.topics[topic].seq == first.seq
                     and player.topics[topic].epoch == first.epoch)
    resets = player.stats.resets  # the move from the unpublished epoch to the first
    for _ in range(3):
        await fast_forward(redis_url, topic, DAY_MS)
        published = await publisher.publish(_update(topic, "1.60"))
        assert published.epoch == first.epoch
    await eventually(lambda: player.topics[topic].seq == published.seq)
    assert player.stats.resets == resets
    assert player.violations == []
    await player.close()


async def test_a_topic_unpublished_past_its_ttl_is_forgotten_whole(worker, publisher,
                                                                   redis_url) -> None:
    topic = "odds:1:39:503"
    old = await publisher.publish(_update(topic, "1.50"))
    player = OddsClient(worker.url, token=token())
    await player.connect()
    await player.subscribe([topic])
    await player.wait_synced([topic])
    await fast_forward(redis_url, topic, DEFAULT_TOPIC_TTL_MS + 1)
    assert await _keys(redis_url) == []
    new = await publisher.publish(_update(topic, "2.50"))
    assert new.epoch != old.epoch and new.seq == 1
    await eventually(lambda: player.topics[topic].epoch == new.epoch, timeout=10)
    assert player.stats.resets >= 1
    assert player.topics[topic].markets["1:39:503"]["prices"]["home"] == "2.50"
    assert player.violations == []
    await player.close()


async def test_ttl_zero_keeps_a_topic_forever_and_clears_an_older_expiry(redis_url, pmap) -> None:
    topic = "odds:1:39:504"
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.hset(meta_key(topic), mapping={"epoch": "r1-20260101", "seq": 0})
        await client.pexpire(meta_key(topic), DAY_MS)  # as the old reads left it
        await Publisher(client, pmap, topic_ttl_ms=0).publish(_update(topic, "1.50"))
        for key in (meta_key(topic), history_key(topic), latest_key(topic)):
            assert await client.pttl(key) == -1
    finally:
        await client.aclose()


def test_a_ttl_shorter_than_history_is_refused(pmap) -> None:
    with pytest.raises(ValueError, match="topic_ttl_ms"):
        Publisher(aioredis.Redis(), pmap, topic_ttl_ms=1000)


async def test_a_redis_that_lost_acknowledged_writes_gets_a_new_epoch(publisher, redis_url,
                                                                       pmap) -> None:
    """A failover to a replica that was behind (or an append-only file's lost last
    second) leaves the topic at a seq below what its publisher got back. Going
    on in that epoch would give seqs players hold to other events; the publisher
    that saw the higher seq makes publish.lua start a new epoch instead."""
    topic = "odds:1:39:502"
    first = [await publisher.publish(_update(topic, f"1.{n}0")) for n in range(1, 6)]
    assert [p.seq for p in first] == [1, 2, 3, 4, 5]
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.hset(meta_key(topic), "seq", 3)  # what the promoted replica had
        again = await publisher.publish(_update(topic, "1.90"))
        assert again.epoch != first[-1].epoch and again.seq == 1
        assert await client.xlen(history_key(topic)) == 1  # nothing of the lost seq space
        # A publisher that never saw the lost seqs cannot tell: it goes on (README).
        other = Publisher(client, pmap)
        await client.hset(meta_key(topic), "seq", 0)
        assert (await other.publish(_update(topic, "1.95"))).epoch == again.epoch
        # Nor is anything changed while the topic stands at or past the seq it saw.
        assert (await publisher.publish(_update(topic, "1.96"))).epoch == again.epoch
    finally:
        await client.aclose()
