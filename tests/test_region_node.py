"""A worker as one region's (PROTOCOL.md §8): `welcome` names the region, a
resume from a region further on is held until this one catches up, and
`/healthz` follows the region's aggregator.

Real worker processes over a real Redis; the "other region" is only a resume
point ahead of what this region's Redis holds, which is exactly what a
player moving in from a region further on brings.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from feed.events import PriceUpdate
from redis_contract import REGION_ALIVE_KEY
from tests.conftest import http_get, token

TOPIC = "odds:1:39:21"


def _update(price: str) -> PriceUpdate:
    return PriceUpdate(TOPIC, "1:39:21", "m-21", {"home": price})


async def _player(url: str) -> tuple[object, dict]:
    ws = await connect(url, additional_headers={"Cookie": f"og_session={token()}"})
    return ws, orjson.loads(await ws.recv())


async def _frames(ws, quiet: float) -> list[dict]:
    frames = []
    try:
        while True:
            frames.append(orjson.loads(await asyncio.wait_for(ws.recv(), quiet)))
    except TimeoutError:
        return frames


def _events(frames: list[dict]) -> list[dict]:
    return [e for f in frames for e in (f["events"] if f["type"] == "batch" else [f])]


async def test_welcome_names_the_region(worker_factory) -> None:
    worker = worker_factory(OG_REGION="eu-west")
    ws, welcome = await _player(worker.url)
    assert welcome["type"] == "welcome" and welcome["region"] == "eu-west"
    await ws.close()


async def test_a_resume_ahead_is_held_until_the_region_publishes_it(worker_factory,
                                                                    publisher) -> None:
    worker = worker_factory(OG_LAG_WAIT_MS="3000")
    last = None
    for i in range(3):
        last = await publisher.publish(_update(f"2.{i}0"))
    ws, _ = await _player(worker.url)
    # The player comes from a region that has published two more events.
    ahead = {"epoch": last.epoch, "seq": last.seq + 2}
    await ws.send(orjson.dumps({"op": "subscribe", "id": 1, "topics": {TOPIC: ahead}}).decode())
    frames = await _frames(ws, 0.5)
    assert [f["type"] for f in frames] == ["subscribed"]  # held: no reset, nothing old
    for i in range(4):  # this region catches up, and goes on
        await publisher.publish(_update(f"3.{i}0"))
    frames = await _frames(ws, 0.5)
    assert all(f["type"] in ("odds", "batch") for f in frames)
    assert [e["seq"] for e in _events(frames)] == [last.seq + 3, last.seq + 4]
    await ws.close()


async def test_a_resume_still_ahead_after_the_wait_is_reset_ahead(worker_factory,
                                                                  publisher) -> None:
    worker = worker_factory(OG_LAG_WAIT_MS="300")
    last = await publisher.publish(_update("4.00"))
    ws, _ = await _player(worker.url)
    ahead = {"epoch": last.epoch, "seq": last.seq + 5}
    started = time.monotonic()
    await ws.send(orjson.dumps({"op": "subscribe", "id": 1, "topics": {TOPIC: ahead}}).decode())
    frames = [orjson.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
    waited = time.monotonic() - started
    assert [f["type"] for f in frames] == ["subscribed", "reset", "snapshot"]
    assert frames[1]["reason"] == "ahead" and frames[2]["seq"] == last.seq
    assert waited >= 0.25  # the region was given its wait first
    await ws.close()


async def test_healthz_fails_while_the_regions_aggregator_shows_no_progress(
        worker_factory, redis_url) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    await redis.set(REGION_ALIVE_KEY, "test", px=3000)  # the aggregator is making progress
    worker = worker_factory(OG_REGION_STALE_AFTER_MS="400")
    assert http_get(worker.http + "/healthz")[0] == 200
    await redis.delete(REGION_ALIVE_KEY)  # it stops: its mark runs out
    deadline = time.monotonic() + 3
    while http_get(worker.http + "/healthz")[0] == 200:
        assert time.monotonic() < deadline, "healthz still 200 with no aggregator progress"
        await asyncio.sleep(0.05)
    status, _, body = http_get(worker.http + "/healthz")
    assert status == 503 and b"region stale" in body
    status, _, _ = http_get(worker.http + "/ws")
    assert status == 503  # and new players are refused: they go to another region
    await redis.set(REGION_ALIVE_KEY, "test", px=3000)
    deadline = time.monotonic() + 3
    while http_get(worker.http + "/healthz")[0] != 200:
        assert time.monotonic() < deadline, "healthz did not recover with progress back"
        await asyncio.sleep(0.05)
    await redis.aclose()
