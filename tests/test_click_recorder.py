"""The click recorder against a real Redis: one round trip for every click of a loop turn,
verdicts decided in the same script, and no verdict without a stored record."""

from __future__ import annotations

import asyncio

import orjson
import pytest
import redis.asyncio as aioredis

from attribution import keys
from attribution.clicks import Click
from attribution.recorder import ClickNotRecorded, ClickRecorder


def click(n: int, *, ip_hash: str = "h", bot: bool = False) -> Click:
    return Click(f"cid-{n}", "spring-24", "p42", "c7", "banner1", 1_000 + n, {}, ip_hash,
                 "Mozilla/5.0", "", bot=bot)


@pytest.fixture
async def client(redis_url):
    connection = aioredis.Redis.from_url(redis_url)
    yield connection
    await connection.aclose()


async def test_clicks_of_one_turn_share_one_round_trip(client) -> None:
    recorder = ClickRecorder(client, dedupe_window_ms=60_000, attribution_window_ms=60_000)
    await recorder.warm()  # as a worker does at start: no NOSCRIPT round trip after it
    verdicts = await asyncio.gather(*(recorder.record(click(n, ip_hash=f"h{n % 5}"))
                                      for n in range(20)))
    assert recorder.round_trips == 1
    assert verdicts == ["ok"] * 5 + ["duplicate"] * 15
    stored = [orjson.loads(fields[b"c"]) for _, fields in await client.xrange(keys.CLICKS)]
    assert [record["verdict"] for record in stored] == verdicts
    assert [record["click_id"] for record in stored] == [f"cid-{n}" for n in range(20)]


async def test_bots_take_no_dedupe_key(client) -> None:
    recorder = ClickRecorder(client, dedupe_window_ms=60_000, attribution_window_ms=60_000)
    assert await recorder.record(click(1, bot=True)) == "bot"
    assert await recorder.record(click(2)) == "ok"
    assert await recorder.record(click(3)) == "duplicate"


async def test_a_lost_script_cache_is_reloaded(client) -> None:
    recorder = ClickRecorder(client, dedupe_window_ms=60_000, attribution_window_ms=60_000)
    assert await recorder.record(click(1)) == "ok"
    await client.script_flush()
    assert await recorder.record(click(2, ip_hash="other")) == "ok"
    assert await client.xlen(keys.CLICKS) == 2


async def test_redis_gone_is_not_recorded() -> None:
    gone = aioredis.Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=1)
    recorder = ClickRecorder(gone, dedupe_window_ms=1, attribution_window_ms=1)
    with pytest.raises(ClickNotRecorded):
        await recorder.record(click(1))
    assert recorder.failed == 1 and recorder.recorded == 0
    await gone.aclose()


async def test_a_click_that_cannot_be_sent_fails_alone(client) -> None:
    recorder = ClickRecorder(client, dedupe_window_ms=60_000, attribution_window_ms=60_000)
    broken = click(2)
    broken.ua = "bad \ud800 surrogate"  # cannot be written as UTF-8
    results = await asyncio.gather(recorder.record(click(1)), recorder.record(broken),
                                   recorder.record(click(3, ip_hash="other")),
                                   return_exceptions=True)
    assert results[0] == "ok" and results[2] == "ok"
    assert isinstance(results[1], ClickNotRecorded)
    assert recorder.round_trips == 1 and await client.xlen(keys.CLICKS) == 2


async def test_a_connection_redis_dropped_is_replaced_and_the_batch_sent_again(
        client, redis_url) -> None:
    recorder = ClickRecorder(client, dedupe_window_ms=60_000, attribution_window_ms=60_000)
    assert await recorder.record(click(1)) == "ok"  # its connection now waits in the pool
    other = aioredis.Redis.from_url(redis_url)
    try:
        assert await other.client_kill_filter(_type="normal", skipme=True) >= 1
    finally:
        await other.aclose()
    assert await recorder.record(click(2, ip_hash="other")) == "ok"
    assert recorder.failed == 0 and await client.xlen(keys.CLICKS) == 2
