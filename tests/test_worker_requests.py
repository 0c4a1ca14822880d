"""Requests, refusals, limits and close codes against a real worker (§3, §4)."""

from __future__ import annotations

import asyncio
import socket
import time

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from feed.events import PriceUpdate
from tests.conftest import eventually, token

COOKIE = {"Cookie": f"og_session={token()}"}


async def _recv(ws, timeout: float = 5.0) -> dict:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


async def _open(url: str, tok: str | None = None):
    ws = await connect(url, additional_headers={"Cookie": f"og_session={tok or token()}"})
    assert (await _recv(ws))["type"] == "welcome"
    return ws


async def _closed_with(ws, timeout: float = 5.0) -> int:
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    return ws.close_code


async def _assert_serves(worker) -> None:
    """The worker is up and a new player still gets subscribe + snapshot."""
    assert worker.alive()
    ws = await _open(worker.url)
    await ws.send('{"op":"subscribe","id":"ok","topics":{"odds:1:39:1":null}}')
    assert (await _recv(ws))["type"] == "subscribed"
    assert (await _recv(ws))["type"] == "snapshot"
    await ws.close()


async def test_partial_subscribe_errors_then_subscribed_then_snapshots(worker_factory) -> None:
    worker = worker_factory(OG_MAX_TOPICS="2")
    ws = await _open(worker.url, token(topics=["odds:1:", "odds:5:"]))
    await ws.send(orjson.dumps({"op": "subscribe", "id": 7, "topics": {
        "odds:1:39:1": None, "odds:5:8": None, "odds:1:39:2": None,
        "odds:1:39": None, "odds:2:12:1": None}}).decode())
    frames = [await _recv(ws) for _ in range(5)]
    errors = {f["code"]: f for f in frames[:3]}
    assert set(errors) == {"unknown_topic", "forbidden", "too_many_topics"}
    assert errors["unknown_topic"]["topics"] == ["odds:1:39"]  # market-level league
    assert errors["forbidden"]["topics"] == ["odds:2:12:1"]
    assert errors["too_many_topics"]["topics"] == ["odds:1:39:2"]
    assert all(e["id"] == 7 and e["message"] for e in errors.values())
    assert frames[3] == {"type": "subscribed", "id": 7, "topics": ["odds:1:39:1", "odds:5:8"]}
    assert {frames[4]["type"], frames[4]["topic"]} == {"snapshot", "odds:1:39:1"}
    assert {"type": "snapshot", "topic": "odds:5:8"}.items() <= (await _recv(ws)).items()
    await ws.close()


async def test_ping_ack_unsubscribe(worker, publisher) -> None:
    ws = await _open(worker.url)
    before = time.time_ns()
    await ws.send('{"op":"ping","id":"p"}')
    pong = await _recv(ws)
    assert pong["type"] == "pong" and pong["id"] == "p" and pong["ts"] >= before
    await publisher.publish(PriceUpdate("odds:1:39:3", "1:39:3", "m-3", {"home": "1.90"}))
    await ws.send('{"op":"subscribe","topics":{"odds:1:39:3":null}}')
    assert await _recv(ws) == {"type": "subscribed", "topics": ["odds:1:39:3"]}
    assert (await _recv(ws))["type"] == "snapshot"
    await publisher.publish(PriceUpdate("odds:1:39:3", "1:39:3", "m-3", {"home": "2.00"}))
    event = await _recv(ws)
    assert event["seq"] == 2
    await ws.send('{"op":"ack","topics":{"odds:1:39:3":2}}')  # no reply
    await ws.send('{"op":"unsubscribe","id":2,"topics":["odds:1:39:3"]}')
    assert await _recv(ws) == {"type": "unsubscribed", "id": 2, "topics": ["odds:1:39:3"]}
    await publisher.publish(PriceUpdate("odds:1:39:3", "1:39:3", "m-3", {"home": "2.10"}))
    await ws.send('{"op":"ping"}')
    assert (await _recv(ws))["type"] == "pong"  # and no event in between
    await ws.close()


async def test_one_redis_subscription_per_topic_dropped_after_the_last(worker, redis_url) -> None:
    client = aioredis.Redis.from_url(redis_url)

    async def numsub() -> int:
        # topics are shard channels (SSUBSCRIBE), on one server as on a cluster
        return dict(await client.pubsub_shardnumsub("odds:1:39:4"))[b"odds:1:39:4"]

    players = [await _open(worker.url) for _ in range(3)]
    for ws in players:
        await ws.send('{"op":"subscribe","topics":{"odds:1:39:4":null}}')
        assert (await _recv(ws))["type"] == "subscribed"
        assert (await _recv(ws))["type"] == "snapshot"
    assert await numsub() == 1
    await players[0].send('{"op":"unsubscribe","topics":["odds:1:39:4"]}')
    assert (await _recv(players[0]))["type"] == "unsubscribed"
    await players[1].close()
    await asyncio.sleep(0.2)
    assert await numsub() == 1
    await players[2].close()
    for _ in range(100):
        if await numsub() == 0:
            break
        await asyncio.sleep(0.05)
    assert await numsub() == 0
    await players[0].close()
    await client.aclose()


@pytest.mark.parametrize(
    "frame",
    ["garbage", "[]", '{"op":"dance"}', '{"op":"subscribe","topics":[]}',
     '{"op":"subscribe","topics":{"odds:1:39:1":{"epoch":"e","seq":-1}}}', b"\x00binary"],
)
async def test_bad_request_gets_an_error_and_the_connection_stays(worker, frame) -> None:
    ws = await _open(worker.url)
    await ws.send(frame)
    error = await _recv(ws)
    assert error["type"] == "error" and error["code"] == "bad_request" and error["message"]
    await ws.send('{"op":"ping","id":1}')
    assert (await _recv(ws))["type"] == "pong"
    await ws.close()
    await _assert_serves(worker)


async def test_repeated_bad_requests_close_4400(worker_factory) -> None:
    worker = worker_factory(OG_MAX_BAD_REQUESTS="3")
    ws = await _open(worker.url)
    for _ in range(3):
        await ws.send("nope")
    codes = [(await _recv(ws))["code"] for _ in range(3)]
    assert codes == ["bad_request"] * 3
    assert await _closed_with(ws) == 4400
    await _assert_serves(worker)


async def test_rate_limit_refuses_then_closes_4429(worker_factory) -> None:
    worker = worker_factory(OG_RATE_LIMIT_RPS="1", OG_RATE_LIMIT_BURST="2",
                            OG_RATE_LIMIT_CLOSE_AFTER="3")
    ws = await _open(worker.url)
    for i in range(5):
        await ws.send(orjson.dumps({"op": "ping", "id": i}).decode())
    replies = [await _recv(ws) for _ in range(5)]
    assert [r["type"] for r in replies[:2]] == ["pong", "pong"]
    limited = replies[2:]
    assert all(r["code"] == "rate_limited" and r["retry_after_ms"] > 0 for r in limited)
    assert [r["id"] for r in limited] == [2, 3, 4]  # refused unread, yet the id is echoed
    assert await _closed_with(ws) == 4429
    await _assert_serves(worker)


async def test_frame_too_large_closes_1009(worker_factory) -> None:
    worker = worker_factory(OG_MAX_FRAME_BYTES="1024")
    ws = await _open(worker.url)
    await ws.send('{"op":"ping","pad":"' + "x" * 2000 + '"}')
    assert await _closed_with(ws) == 1009
    await _assert_serves(worker)


async def test_handshake_timeout_drops_silent_sockets(worker_factory) -> None:
    worker = worker_factory(OG_HANDSHAKE_TIMEOUT_S="0.3")
    sock = socket.create_connection(("127.0.0.1", worker.port))
    sock.settimeout(5)
    started = time.monotonic()
    assert sock.recv(1024) == b""  # closed by the server, having said nothing
    assert time.monotonic() - started < 4
    sock.close()
    await _assert_serves(worker)


async def test_token_expiry_closes_4401(worker_factory) -> None:
    worker = worker_factory(OG_JWT_LEEWAY_S="0")
    ws = await _open(worker.url, token(ttl=1.5))
    assert await _closed_with(ws, timeout=10) == 4401


async def test_many_topics_and_clients_leave_no_channels_behind(worker, redis_url) -> None:
    players = [await _open(worker.url) for _ in range(5)]
    topics = {f"odds:1:39:{m}": None for m in range(10, 30)}
    for ws in players:
        await ws.send(orjson.dumps({"op": "subscribe", "topics": topics}).decode())
        assert (await _recv(ws))["type"] == "subscribed"
        for _ in topics:
            assert (await _recv(ws))["type"] == "snapshot"
    client = aioredis.Redis.from_url(redis_url)
    assert len(await client.pubsub_shardchannels("odds:*")) == 20
    for ws in players:
        await ws.close()

    async def channels() -> int:
        return len(await client.pubsub_shardchannels("odds:*"))

    for _ in range(100):
        if await channels() == 0:
            break
        await asyncio.sleep(0.05)
    assert await channels() == 0
    await client.aclose()
    await eventually(worker.alive)


async def test_heartbeat_keeps_answering_peers_and_drops_silent_ones(worker_factory) -> None:
    worker = worker_factory(OG_HEARTBEAT_MS="300")
    lively = await _open(worker.url)  # websockets answers pings by itself
    silent = await _open(worker.url)
    silent.transport.pause_reading()  # reads nothing: never sees a ping, never pongs
    await asyncio.sleep(2.0)
    await lively.send('{"op":"ping","id":1}')
    assert (await _recv(lively))["type"] == "pong"
    silent.transport.resume_reading()
    assert await _closed_with(silent) in (1011, 1006)
    await lively.close()
