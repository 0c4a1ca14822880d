"""Slow players against real workers: coalescing under a spike, and the breaker.

Stalled players are real sockets with a small receive buffer whose client
stops reading (`pause_reading`), on workers with small send buffers and
watermarks, so back-pressure shows within a second instead of after the
kernel's megabytes of autotuned buffering.
"""

from __future__ import annotations

import asyncio
import socket

import orjson
import redis.asyncio as aioredis

from client.odds import OddsClient
from client.rules import verify_coalescing
from feed.events import PriceUpdate
from redis_contract import history_key
from tests.conftest import eventually, token
from tests.node_harness import start_node

LEAGUE = "odds:5:8"
SMALL_BUFFERS = {
    "OG_SOCKET_SNDBUF_BYTES": "4096",
    "OG_HIGH_WATERMARK_BYTES": "8192",
    "OG_LOW_WATERMARK_BYTES": "2048",
}


def _small_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def _player(url: str, topics: list[str], port: int | None = None,
                  name: str = "p") -> OddsClient:
    options = {"sock": _small_socket(port)} if port is not None else {}
    client = OddsClient(url, token=token(name, name), reconnect=False, ws_options=options)
    await client.connect()
    result = await client.subscribe(topics)
    assert result.accepted == topics
    await client.wait_synced(topics)
    return client


def _stall(client: OddsClient) -> None:
    client._ws.transport.pause_reading()  # the app stops reading; TCP fills up


def _unstall(client: OddsClient) -> None:
    client._ws.transport.resume_reading()


async def _spike(publisher, topic: str, events: int, markets: int = 20) -> None:
    """`events` updates over `markets` markets, as fast as Redis takes them."""
    sport, league = topic.split(":")[1:3]
    for start in range(0, events, 100):
        await publisher.publish_many([
            PriceUpdate(topic, f"{sport}:{league}:{(start + i) % markets}",
                        f"m-{(start + i) % markets}", {"home": f"{1 + (start + i) % 97}.50"})
            for i in range(100)
        ])
        await asyncio.sleep(0.01)


async def _history(redis_url: str, topic: str) -> list[dict]:
    client = aioredis.Redis.from_url(redis_url)
    entries = await client.xrange(history_key(topic))
    await client.aclose()
    return [orjson.loads(fields[b"e"]) for _id, fields in entries]


async def test_a_stalled_player_is_coalesced_and_ends_on_the_newest_prices(
        worker_factory, publisher, redis_url) -> None:
    worker = worker_factory(**SMALL_BUFFERS)
    await publisher.publish(PriceUpdate(LEAGUE, "5:8:0", "m-0", {"home": "1.01"}))
    healthy = [await _player(worker.url, [LEAGUE], name=f"h{i}") for i in range(3)]
    received_by_stalled: list[dict] = []
    stalled = await _player(worker.url, [LEAGUE], port=worker.port, name="slow")
    base = stalled.topics[LEAGUE].seq
    stalled.on_message = lambda m: received_by_stalled.append(m) if m["type"] == "odds" else None
    _stall(stalled)
    await _spike(publisher, LEAGUE, 4000)  # x50 a normal minute of this league, in ~1 s
    published = [e for e in await _history(redis_url, LEAGUE) if e["seq"] > base]
    last_seq = published[-1]["seq"]
    for client in healthy:  # the others kept receiving while it stalled
        await eventually(lambda c=client: c.topics[LEAGUE].seq == last_seq, timeout=15)
        assert client.violations == [], [str(v) for v in client.violations[:12]]
    _unstall(stalled)
    await eventually(lambda: stalled.topics[LEAGUE].seq == last_seq, timeout=15)
    # Bounded: what reached it is what sat in buffers plus one event per market,
    # not the 4,000 published.
    assert len(received_by_stalled) < 1000, len(received_by_stalled)
    assert stalled.stats.coalesced >= 1
    assert stalled.violations == []
    assert verify_coalescing(received_by_stalled, published, after_seq=base) == []
    newest = {e["market"]: e["prices"] for e in published}
    assert {m: e["prices"] for m, e in stalled.topics[LEAGUE].markets.items()
            if m in newest} == newest
    for client in (*healthy, stalled):
        await client.close()


async def test_the_breaker_trips_sheds_then_recovers_across_two_workers(
        redis_server, publisher, tmp_path) -> None:
    node = start_node(redis_server.url, tmp_path / "node", **SMALL_BUFFERS,
                      OG_BREAKER_TRIP_SHARE="0.05", OG_BREAKER_RECOVER_SHARE="0.03",
                      OG_BREAKER_MIN_PLAYERS="2")
    try:
        healthy = [await _player(node.url, [LEAGUE], name=f"h{i}") for i in range(18)]
        # one stalled player on each worker: 2 of 20 connections, 10% >= 5%
        stalled = [await _player(f"ws://127.0.0.1:{node.base_port + w}/ws", [LEAGUE],
                                 port=node.base_port + w, name=f"s{w}") for w in range(2)]
        for client in stalled:
            _stall(client)
        feeding = asyncio.create_task(_spike(publisher, LEAGUE, 40_000))

        def both_stalled_and_open() -> bool:
            status = node.status()
            pressured = [w["connections_backpressure"] for w in status["workers"]]
            return status["breaker_open"] and min(pressured) >= 1

        await asyncio.to_thread(node.wait, both_stalled_and_open, 30,
                                "both stalled players in back-pressure, breaker open")
        feeding.cancel()
        # The healthy players catch up; the stalled ones (2 of 21) keep it open.
        await asyncio.sleep(0.5)
        assert node.status()["breaker_open"]
        probe = OddsClient(node.url, token=token("probe", "probe"), reconnect=False)
        await probe.connect()
        shed = await probe.subscribe(["odds:1:39:7"])
        assert shed.accepted == [] and shed.errors[0]["code"] == "shed"
        assert shed.errors[0]["retry_after_ms"] > 0
        priority = await probe.subscribe(["odds:1:39:1"])  # high-value in the partition map
        assert priority.accepted == ["odds:1:39:1"]
        for client in stalled:  # the slow players leave
            client._ws.transport.abort()
        await asyncio.to_thread(node.wait, lambda: not node.status()["breaker_open"], 20,
                                "breaker closed")
        again = await probe.subscribe(["odds:1:39:7"])
        assert again.accepted == ["odds:1:39:7"]
        status = node.status()
        assert status["breaker_trips"] >= 1
        assert "oddsgate_breaker_trips_total" in node.metrics()
        await probe.close()
        for client in healthy:
            assert client.violations == [], [str(v) for v in client.violations[:12]]
            await client.close()
    finally:
        node.stop()


async def test_a_player_stalled_past_the_timeout_is_cut_off(worker_factory, publisher) -> None:
    worker = worker_factory(**SMALL_BUFFERS, OG_STALL_TIMEOUT_S="1")
    stalled = await _player(worker.url, [LEAGUE], port=worker.port, name="dead-peer")
    _stall(stalled)
    await _spike(publisher, LEAGUE, 2000)
    await eventually(lambda: "over its high-water mark" in worker.log(), timeout=10)
    _unstall(stalled)
    await asyncio.wait_for(stalled.closed.wait(), 10)  # the worker dropped the connection
    assert stalled.closed_reason is not None
    assert stalled.closed_reason.code in (1013, 1006, None)
    # The worker is fine; its breaker (1 of 1 players stalled) closes again.
    newcomer = OddsClient(worker.url, token=token("next", "next"), reconnect=False)
    await newcomer.connect()
    for _ in range(50):
        if (await newcomer.subscribe([LEAGUE])).accepted == [LEAGUE]:
            break
        await asyncio.sleep(0.1)
    await newcomer.wait_synced([LEAGUE])
    assert newcomer.violations == []
    await newcomer.close()
