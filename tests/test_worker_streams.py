"""Snapshots, live streams, resumes and Redis failures against a real worker.

The players here are `client.OddsClient`s (which check every rule of
PROTOCOL.md §5 on what they receive) or raw WebSockets where a test needs to
see the exact frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from client.odds import OddsClient
from feed.events import PriceUpdate
from feed.publisher import PUBLISH_LUA, Publisher, new_epoch
from redis_contract import history_key, latest_key, meta_key, topic_keys
from tests.conftest import eventually, token

LEAGUE_TOPIC = "odds:5:8"  # league-level: many markets on one topic


def _update(topic: str, market: int, price: str) -> PriceUpdate:
    """An update of `market`; on a market-level topic, always the topic's own market."""
    sport, league, *own = topic.split(":")[1:]
    market = int(own[0]) if own else market
    return PriceUpdate(topic, f"{sport}:{league}:{market}", f"m-{market}", {"home": price})


async def _publish_at(publisher: Publisher, topic: str, rate: float, seconds: float,
                      markets: int = 20, tolerate_errors: bool = False) -> int:
    """Publish `rate` events/s for `seconds` in 10 ms ticks; returns how many."""
    rng = random.Random(7)
    per_tick = max(1, round(rate / 100))
    ticks = round(seconds * 100)
    sent = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    for tick in range(ticks):
        batch = [_update(topic, rng.randrange(markets), f"{rng.uniform(1.01, 9):.2f}")
                 for _ in range(per_tick)]
        try:
            await publisher.publish_many(batch)
            sent += len(batch)
        except (ConnectionError, OSError, aioredis.ConnectionError):
            if not tolerate_errors:
                raise
        delay = start + (tick + 1) / 100 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    return sent


async def _redis_state(redis_url: str, topic: str) -> tuple[str, int, dict[str, dict]]:
    client = aioredis.Redis.from_url(redis_url)
    epoch, seq = await client.hmget(meta_key(topic), "epoch", "seq")
    latest = {k.decode(): orjson.loads(v) for k, v in
              (await client.hgetall(latest_key(topic))).items()}
    await client.aclose()
    return epoch.decode(), int(seq), latest


async def _client(worker, topics: list[str], **kw) -> OddsClient:
    client = OddsClient(worker.url, token=token(), **kw)
    await client.connect()
    result = await client.subscribe(topics)
    assert result.accepted == topics, result
    await client.wait_synced(topics)
    return client


async def _assert_caught_up(clients: list[OddsClient], redis_url: str, topic: str) -> None:
    epoch, seq, latest = await _redis_state(redis_url, topic)
    for client in clients:
        await eventually(lambda c=client: c.topics[topic].seq == seq, timeout=10)
    for client in clients:
        held = client.topics[topic]
        assert held.epoch == epoch
        assert {m: e["seq"] for m, e in held.markets.items()} == \
            {m: e["seq"] for m, e in latest.items()}
        assert client.violations == []


async def test_snapshot_then_live_has_no_gap_while_publishing_2000_per_second(
        worker, publisher, redis_url) -> None:
    await _publish_at(publisher, LEAGUE_TOPIC, 2000, 0.2)  # some state before anyone joins
    clients: list[OddsClient] = []

    async def join_over_time() -> None:
        for _ in range(12):
            clients.append(await _client(worker, [LEAGUE_TOPIC]))
            await asyncio.sleep(0.1)

    sent, _ = await asyncio.gather(
        _publish_at(publisher, LEAGUE_TOPIC, 2000, 2.0), join_over_time())
    assert sent == 4000
    await _assert_caught_up(clients, redis_url, LEAGUE_TOPIC)
    assert all(c.stats.coalesced == 0 for c in clients)
    for client in clients:
        await client.close()


async def _raw_player(url: str):
    ws = await connect(url, additional_headers={"Cookie": f"og_session={token()}"})
    assert orjson.loads(await ws.recv())["type"] == "welcome"
    return ws


async def _frames_until_quiet(ws, quiet: float = 0.5) -> list[dict]:
    frames = []
    with contextlib.suppress(TimeoutError):
        while True:
            frames.append(orjson.loads(await asyncio.wait_for(ws.recv(), quiet)))
    return frames


def _events(frames: list[dict]) -> list[dict]:
    out = []
    for frame in frames:
        out.extend(frame["events"] if frame["type"] == "batch" else [frame])
    return out


async def _subscribe_raw(ws, topic: str, resume: dict | None) -> list[dict]:
    await ws.send(orjson.dumps({"op": "subscribe", "id": 1, "topics": {topic: resume}}).decode())
    return await _frames_until_quiet(ws)


@pytest.mark.parametrize("where", ["memory", "redis", "other-worker"])
async def test_resume_inside_the_window_replays_exactly_the_missed_events(
        worker_factory, publisher, where: str) -> None:
    first = worker_factory(OG_RECENT_EVENTS="0" if where == "redis" else "512")
    topic = "odds:1:39:11"
    await _publish_at(publisher, topic, 1000, 0.05, markets=3)
    ws = await _raw_player(first.url)
    frames = await _subscribe_raw(ws, topic, None)
    snapshot = frames[1]
    assert [f["type"] for f in frames] == ["subscribed", "snapshot"]
    await ws.close()
    # Another player keeps the channel (and its ring) alive meanwhile.
    keeper = await _raw_player(first.url)
    await _subscribe_raw(keeper, topic, None)
    missed = [(await publisher.publish(_update(topic, i % 3, f"2.{i:02d}"))).seq
              for i in range(40)]
    second = worker_factory(index=1) if where == "other-worker" else first
    ws = await _raw_player(second.url)
    frames = await _subscribe_raw(
        ws, topic, {"epoch": snapshot["epoch"], "seq": snapshot["seq"]})
    assert frames[0] == {"type": "subscribed", "id": 1, "topics": [topic]}
    events = _events(frames[1:])
    assert all(e["type"] == "odds" and "coalesced" not in e for e in events)
    assert [e["seq"] for e in events] == list(range(snapshot["seq"] + 1, missed[-1] + 1))
    await ws.close()
    await _frames_until_quiet(keeper, 0.1)  # a full receive queue would stall its close
    await keeper.close()


async def test_resume_outside_the_window_gets_reset_and_snapshot(worker, publisher,
                                                                 redis_url) -> None:
    topic = "odds:1:39:12"
    first = await publisher.publish(_update(topic, 1, "1.10"))
    for i in range(20):
        await publisher.publish(_update(topic, 1 + i % 2, f"1.{i + 20}"))
    client = aioredis.Redis.from_url(redis_url)
    await client.xtrim(history_key(topic), maxlen=5, approximate=False)  # the window has moved on
    await client.aclose()
    ws = await _raw_player(worker.url)
    frames = await _subscribe_raw(ws, topic, {"epoch": first.epoch, "seq": first.seq})
    assert [f["type"] for f in frames] == ["subscribed", "reset", "snapshot"]
    assert frames[1] == {"type": "reset", "topic": topic, "reason": "window"}
    assert frames[2]["seq"] == 21 and len(frames[2]["markets"]) == 1


@pytest.mark.parametrize(("resume", "reason"), [
    ({"epoch": "r0-19700101", "seq": 3}, "epoch"),
    ("ahead", "ahead"),
])
async def test_resume_of_another_epoch_or_ahead_gets_reset(worker_factory, publisher, resume,
                                                           reason) -> None:
    worker = worker_factory(OG_LAG_WAIT_MS="0")  # ahead: reset at once, not held
    topic = "odds:1:39:13"
    last = None
    for i in range(5):
        last = await publisher.publish(_update(topic, 1, f"3.{i}0"))
    if resume == "ahead":
        resume = {"epoch": last.epoch, "seq": last.seq + 100}
    ws = await _raw_player(worker.url)
    frames = await _subscribe_raw(ws, topic, resume)
    assert [f["type"] for f in frames] == ["subscribed", "reset", "snapshot"]
    assert frames[1]["reason"] == reason
    assert (frames[2]["epoch"], frames[2]["seq"]) == (last.epoch, last.seq)


async def test_replay_longer_than_the_limit_gets_reset(worker_factory, publisher) -> None:
    worker = worker_factory(OG_REPLAY_MAX="10", OG_RECENT_EVENTS="0")
    topic = "odds:1:39:14"
    first = await publisher.publish(_update(topic, 1, "1.01"))
    await publisher.publish_many([_update(topic, 1, f"1.{i + 10}") for i in range(30)])
    ws = await _raw_player(worker.url)
    frames = await _subscribe_raw(ws, topic, {"epoch": first.epoch, "seq": first.seq})
    assert [f["type"] for f in frames] == ["subscribed", "reset", "snapshot"]


async def test_events_lost_by_pubsub_are_filled_from_history(worker, publisher,
                                                             redis_url) -> None:
    """Pub/sub is at-most-once: a seq jump makes the worker read history first."""
    topic = "odds:1:39:15"
    await publisher.publish(_update(topic, 1, "1.50"))  # the topic has its epoch
    players = [await _client(worker, [topic]) for _ in range(3)]
    silent = aioredis.Redis.from_url(redis_url)
    no_publish = silent.register_script(PUBLISH_LUA.replace(
        "redis.call('SPUBLISH', ARGV[1], event)", ""))
    for i in range(5):  # in history and latest, never sent on the channel
        body = _update(topic, 2, f"1.6{i}").body()
        await no_publish(keys=topic_keys(topic), args=[topic, new_epoch(), "1:39:15",
                                                       body, 60_000])
    await publisher.publish(_update(topic, 1, "1.70"))
    await _assert_caught_up(players, redis_url, topic)
    for player in players:
        assert player.stats.coalesced == 0 and player.stats.resets == 0
        await player.close()
    await silent.aclose()


async def test_the_last_event_lost_by_pubsub_is_found_by_the_audit(worker_factory, publisher,
                                                                  redis_url) -> None:
    """No later event reveals a lost last one by its seq: the audit compares
    every topic with Redis's seq, and a channel still behind at the next audit
    is repaired (OG_AUDIT_S; a subscription lost without notice looks the same)."""
    worker = worker_factory(OG_AUDIT_S="0.2")
    topic = "odds:1:39:16"
    await publisher.publish(_update(topic, 1, "1.50"))
    players = [await _client(worker, [topic]) for _ in range(2)]
    silent = aioredis.Redis.from_url(redis_url)
    no_publish = silent.register_script(PUBLISH_LUA.replace(
        "redis.call('SPUBLISH', ARGV[1], event)", ""))
    body = _update(topic, 2, "1.66").body()
    await no_publish(keys=topic_keys(topic), args=[topic, new_epoch(), "1:39:16", body, 60_000])
    await _assert_caught_up(players, redis_url, topic)
    assert "with no event arriving: repairing and subscribing again" in worker.log()
    for player in players:
        assert player.stats.resets == 0 and player.violations == []
        await player.close()
    await silent.aclose()


async def test_redis_restart_mid_stream_leaves_no_silent_gap(worker, publisher, redis_url,
                                                             redis_server) -> None:
    players = [await _client(worker, [LEAGUE_TOPIC]) for _ in range(5)]

    async def restart_midway() -> None:
        await asyncio.sleep(0.7)
        await asyncio.to_thread(redis_server.restart)

    await asyncio.gather(
        _publish_at(publisher, LEAGUE_TOPIC, 500, 2.5, tolerate_errors=True),
        restart_midway(),
    )
    await _assert_caught_up(players, redis_url, LEAGUE_TOPIC)
    for player in players:
        await player.close()


async def _publish_once_redis_is_back(publisher: Publisher, update: PriceUpdate):
    for _ in range(50):
        try:
            return await publisher.publish(update)
        except aioredis.ConnectionError:  # the pooled connection died with the server
            await asyncio.sleep(0.1)
    raise AssertionError("Redis did not come back")


async def test_redis_losing_its_data_resets_players_to_the_new_epoch(
        worker, publisher, redis_url, redis_server) -> None:
    topic = "odds:1:39:16"
    old = await publisher.publish(_update(topic, 1, "1.90"))
    players = [await _client(worker, [topic]) for _ in range(3)]
    await eventually(lambda: all(p.topics[topic].seq == old.seq for p in players))
    client = aioredis.Redis.from_url(redis_url)
    await client.flushall()
    await client.aclose()
    await asyncio.to_thread(redis_server.restart)
    await eventually(lambda: all(p.stats.resets >= 1 for p in players), timeout=10)
    new = await _publish_once_redis_is_back(publisher, _update(topic, 1, "2.90"))
    assert new.epoch != old.epoch
    await _assert_caught_up(players, redis_url, topic)
    for player in players:
        assert player.topics[topic].markets["1:39:16"]["prices"]["home"] == "2.90"
        await player.close()


async def test_client_resumes_after_its_worker_restarts(worker_factory, publisher,
                                                        redis_url) -> None:
    """The client library reconnects on its own and resumes without loss."""
    topic = "odds:1:39:17"
    worker = worker_factory()
    await publisher.publish(_update(topic, 1, "1.00"))  # the topic has its epoch
    player = await _client(worker, [topic])
    await _publish_at(publisher, topic, 500, 0.2, markets=4)
    worker.stop()
    await _publish_at(publisher, topic, 500, 0.2, markets=4)  # missed while down
    worker_factory(OG_PORT=str(worker.port))
    await player.wait_resumed(1, timeout=15)
    await _publish_at(publisher, topic, 500, 0.2, markets=4)
    await _assert_caught_up([player], redis_url, topic)
    assert player.stats.resets == 0
    await player.close()


@pytest.mark.parametrize(("max_batch", "frames"), [("1", 10), ("256", 1)])
async def test_events_of_one_turn_share_a_frame_up_to_max_batch(worker_factory, publisher,
                                                                max_batch, frames) -> None:
    worker = worker_factory(OG_MAX_BATCH=max_batch)
    topic = f"odds:1:39:18{max_batch}"
    await publisher.publish(_update(topic, 1, "1.00"))  # the topic has its epoch
    ws = await _raw_player(worker.url)
    assert [f["type"] for f in await _subscribe_raw(ws, topic, None)] == ["subscribed",
                                                                          "snapshot"]
    await publisher.publish_many([_update(topic, 1, f"1.{i:02d}") for i in range(10)])
    received = await _frames_until_quiet(ws)
    assert len(received) == frames
    assert [e["seq"] for e in _events(received)] == list(range(2, 12))
    await ws.close()
