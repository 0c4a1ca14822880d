"""Publishing at a seq the producer decided (PROTOCOL.md §8), against a real Redis.

A deterministic aggregator runs in every region and tells each region's
Redis the epoch and seq of every event: the same events make the same bytes
in every region; going over events again (a restart) publishes nothing
twice; a generation change is a new seq space; a Redis that lost the topic
takes the stream up at its seq; a hole is refused, never papered over.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from feed.events import PriceUpdate
from feed.publisher import Publisher, SeqGap, Sequenced
from redis_contract import history_key, latest_key, meta_key

TOPIC = "odds:1:39:31"
MARKET = "1:39:31"


def _event(seq: int, price: str, epoch: str = "main-g1", ts: int = 0) -> Sequenced:
    update = PriceUpdate(TOPIC, MARKET, "m-31", {"home": price}, ts=ts or 1_700_000_000_000 + seq)
    return Sequenced(TOPIC, MARKET, epoch, seq, update.body())


async def _state(redis: aioredis.Redis) -> tuple[list, list[bytes], dict]:
    meta = await redis.hmget(meta_key(TOPIC), "epoch", "seq")
    history = [fields[b"e"] for _id, fields in await redis.xrange(history_key(TOPIC))]
    return meta, history, await redis.hgetall(latest_key(TOPIC))


@pytest.fixture
async def two_regions(redis_url: str, pmap):
    """Two databases of the test Redis stand for two regions' Redis servers."""
    base = redis_url.rsplit("/", 1)[0] if redis_url.startswith("redis://") else redis_url
    sep = "/" if redis_url.startswith("redis://") else "?db="
    clients = [aioredis.Redis.from_url(f"{base}{sep}{db}") for db in (5, 6)]
    for client in clients:
        await client.flushdb()
    yield clients, [Publisher(c, pmap) for c in clients]
    for client in clients:
        await client.flushdb()
        await client.aclose()


async def test_the_same_events_give_the_same_bytes_in_every_region(two_regions) -> None:
    (a, b), (pub_a, pub_b) = two_regions
    events = [_event(seq, f"1.{seq:02d}") for seq in range(1, 21)]
    received: list[bytes] = []
    pubsub = b.pubsub()  # channels are the server's, not a database's: both regions' here
    await pubsub.ssubscribe(TOPIC)
    assert await pub_a.publish_sequenced(events) == 20
    assert await pub_b.publish_sequenced(events[:7]) == 7  # b lags, then catches up
    assert await pub_b.publish_sequenced(events[7:]) == 13
    while len(received) < 40:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if msg is not None:
            received.append(msg["data"])
    await pubsub.aclose()
    state_a, state_b = await _state(a), await _state(b)
    assert state_a == state_b
    meta, history, latest = state_a
    assert latest[MARKET.encode()] == history[-1]
    assert meta == [b"main-g1", b"20"] and len(history) == 20
    # What each region sent (a's twenty, then b's) is what history holds, byte for byte.
    assert received[:20] == history and received[20:] == history
    assert history[0].startswith(
        b'{"type":"odds","topic":"odds:1:39:31","epoch":"main-g1","seq":1,')


async def test_going_over_events_again_publishes_nothing_twice(two_regions) -> None:
    (a, _), (pub, _) = two_regions
    events = [_event(seq, f"2.{seq:02d}") for seq in range(1, 6)]
    assert await pub.publish_sequenced(events[:3]) == 3
    before = await _state(a)
    # A restarted aggregator goes over 2..5 again: only 4 and 5 are new.
    assert await pub.publish_sequenced(events[1:]) == 2
    meta, history, _ = await _state(a)
    assert meta == [b"main-g1", b"5"] and history[:3] == before[1]
    assert len(history) == 5


async def test_a_new_generation_is_a_new_seq_space(two_regions) -> None:
    (a, _), (pub, _) = two_regions
    await pub.publish_sequenced([_event(seq, "3.00") for seq in range(1, 4)])
    assert await pub.publish_sequenced([_event(1, "3.50", epoch="main-g2")]) == 1
    meta, history, latest = await _state(a)
    assert meta == [b"main-g2", b"1"] and len(history) == 1
    assert b'"epoch":"main-g2","seq":1,' in latest[MARKET.encode()]


async def test_a_redis_that_lost_the_topic_takes_the_stream_up_at_its_seq(two_regions) -> None:
    (a, _), (pub, _) = two_regions
    assert await pub.publish_sequenced([_event(501, "4.00"), _event(502, "4.10")]) == 2
    meta, history, _ = await _state(a)
    assert meta == [b"main-g1", b"502"] and len(history) == 2


async def test_a_hole_is_refused(two_regions) -> None:
    (a, _), (pub, _) = two_regions
    await pub.publish_sequenced([_event(1, "5.00"), _event(2, "5.10")])
    with pytest.raises(SeqGap, match="at seq 3, refusing seq 5"):
        await pub.publish_sequenced([_event(3, "5.20"), _event(5, "5.40")])
    meta, history, _ = await _state(a)
    assert meta == [b"main-g1", b"3"] and len(history) == 3  # what came before the hole


async def test_publishing_with_an_assigned_seq_still_works_beside(two_regions) -> None:
    (a, _), (pub, _) = two_regions
    published = await pub.publish(PriceUpdate(TOPIC, MARKET, "m", {"home": "6.00"}))
    assert published.seq == 1
    await asyncio.sleep(0)
    assert (await _state(a))[0][1] == b"1"
