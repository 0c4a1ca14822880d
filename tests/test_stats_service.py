"""The statistics service against a real Redis (and a real worker at the end).

Exactly once: after redeliveries (records handed out and counted but never
acknowledged, re-read by the next run) and after a `kill -9` of `oddsgate
stats run` mid-stream, the stored counts equal a recount of the streams.
Rows follow time (a sliding window that empties is republished as zeros),
and a click reaches its partner's session over the WebSocket.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from attribution import keys
from attribution.stats import (
    NS_PER_MINUTE,
    SERIES_KEY,
    SERIES_MINUTES,
    tally_click,
    tally_conversion,
    utc_day,
)
from attribution.stats_service import StatsService, StatsSettings
from gateway.topics import stats_topic
from redis_contract import latest_key
from tests.conftest import ROOT
from tests.node_harness import start_node
from tests.test_stats_counting import click, conversion
from tests.test_stats_topics import _events, _subscribe, partner_token

NOW = (time.time_ns() // NS_PER_MINUTE) * NS_PER_MINUTE + 30 * 10**9
DAY_NS = 86_400 * 10**9
# 2025-11-22T12:00:30Z, for tests with an injected clock: the hour or two they move
# through stays inside one UTC day whenever they run (NOW's may cross midnight).
NOON = 1_763_812_800_000_000_000 + 30 * 10**9


def _minute_back(ts: int, i: int) -> int:
    """`ts` moved back by 0-6 minutes, never across its UTC midnight (the day's counts
    are compared too)."""
    return max(ts - (i % 7) * NS_PER_MINUTE, ts // DAY_NS * DAY_NS)


def _stream_records(n: int, ts: int) -> list[tuple[str, dict]]:
    """Clicks of every verdict and conversions of every type for two partners, spread
    over the 7 minutes up to `ts`, with repeats of the same ids (a writer that retried
    its XADD)."""
    out: list[tuple[str, dict]] = []
    verdicts = ("ok", "ok", "bot", "duplicate")
    for i in range(n):
        partner = "42" if i % 3 else "7"
        at = _minute_back(ts, i)
        out.append((keys.CLICKS_STREAM, click(verdicts[i % 4], cid=f"k{i}", ts=at,
                                              partner=partner, campaign=f"c{i % 4}",
                                              creative=f"cr{i % 2}")))
        if i % 5 == 0:
            kind = ("registration", "ftd", "deposit")[i % 3]
            record = conversion(kind, None if kind == "registration" else f"{i}.25",
                                None if kind == "registration" else "EUR", cid=f"v{i}", ts=at)
            out.append((keys.CONVERSIONS_STREAM, record))
    return out + out[:7]  # the same records again


def _recount(records: list[tuple[str, dict]]) -> dict[str, dict[str, int]]:
    """The day's counts per partner, each id once: what the stored counts must equal."""
    seen: set[str] = set()
    out: dict[str, dict[str, int]] = {}
    for stream, record in records:
        t = tally_click(record) if stream == keys.CLICKS_STREAM else tally_conversion(record)
        if t is None or t.record_id in seen:
            continue
        seen.add(t.record_id)
        day = out.setdefault(t.partner, {})
        for name, n in t.increments:
            day[name] = day.get(name, 0) + n
    return out


def _recount_minutes(records: list[tuple[str, dict]]) -> dict[str, dict[int, dict[str, int]]]:
    """Per partner, per minute, each id once: clicks, unique_clicks, bot_clicks,
    duplicate_clicks, registrations and ftds of every campaign together."""
    seen: set[str] = set()
    out: dict[str, dict[int, dict[str, int]]] = {}
    for stream, record in records:
        t = tally_click(record) if stream == keys.CLICKS_STREAM else tally_conversion(record)
        if t is None or t.record_id in seen:
            continue
        seen.add(t.record_id)
        bucket = out.setdefault(t.partner, {}).setdefault(t.minute, {})
        for name, n in t.increments:
            dim, _, counter = name.split(":")
            if dim == "campaign" and not counter.startswith("deposits."):
                bucket[counter] = bucket.get(counter, 0) + n
    return out


def _series_by_minute(event: dict | None) -> dict[int, dict[str, int]]:
    """A published series row as minute -> non-zero counts (what `_recount_minutes`
    gives); {} without a row."""
    if event is None:
        return {}
    series = event["minutes"]
    assert all(len(v) == SERIES_MINUTES for k, v in series.items() if k != "start")
    out: dict[int, dict[str, int]] = {}
    for name, values in series.items():
        if name == "start":
            continue
        for i, n in enumerate(values):
            if n:
                out.setdefault(series["start"] + i, {})[name] = n
    return out


async def _published_series(client: aioredis.Redis, partners) -> dict:
    return {p: _series_by_minute(await _series(client, p)) for p in partners}


async def _append(client: aioredis.Redis, records: list[tuple[str, dict]]) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for stream, record in records:
            pipe.xadd(stream, {keys.RECORD_FIELD: orjson.dumps(record)})
        await pipe.execute()


async def _stored(client: aioredis.Redis, partners, ts: int) -> dict[str, dict[str, int]]:
    out = {}
    for partner in partners:
        raw = await client.hgetall(keys.stats_day_key(partner, utc_day(ts)))
        out[partner] = {k.decode(): int(v) for k, v in raw.items()}
    return out


async def _all_acknowledged(client: aioredis.Redis) -> bool:
    for stream in (keys.CLICKS_STREAM, keys.CONVERSIONS_STREAM):
        if not await client.exists(stream):
            return False
        last = (await client.xinfo_stream(stream))["last-generated-id"]
        groups = {g["name"].decode(): g for g in await client.xinfo_groups(stream)}
        group = groups.get(keys.STATS_GROUP)
        if group is None or group["pending"] or group["last-delivered-id"] != last:
            return False
    return True


async def _until(predicate, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.05)


class _LostAck(ConnectionError):
    pass


async def test_redelivered_records_are_counted_exactly_once(redis_url) -> None:
    client = aioredis.Redis.from_url(redis_url)
    settings = StatsSettings(consumer="c1", publish_ms=50, batch=7)
    records = _stream_records(120, NOW)
    try:
        crashed = StatsService(client, settings, clock=lambda: NOW)
        await crashed.ensure_groups()
        await _append(client, records)
        # A first run counts a batch of each stream, and dies before its XACK.
        for stream, tally in ((keys.CLICKS_STREAM, tally_click),
                              (keys.CONVERSIONS_STREAM, tally_conversion)):
            reply = await client.xreadgroup(keys.STATS_GROUP, "c1", {stream: ">"}, count=20)
            original = client.xack
            client.xack = _raise_lost_ack  # type: ignore[method-assign]
            try:
                await crashed.count(stream, reply[0][1], tally)
            except _LostAck:
                pass
            finally:
                client.xack = original  # type: ignore[method-assign]
        # The next run re-reads those (pending to c1), then the rest.
        service = StatsService(client, settings, clock=lambda: NOW)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        await _until(lambda: _all_acknowledged(client))
        stop.set()
        await task
        assert service.malformed == 0
        assert service.repeats >= 20  # the re-read ones found their ids counted
        assert await _stored(client, ("42", "7"), NOW) == _recount(records)
        await service.publish_changes()
        expected = _recount_minutes(records)
        assert len(expected["42"]) > 1  # several minutes, not one bucket
        assert await _published_series(client, ("42", "7")) == expected
    finally:
        await client.aclose()


async def test_what_a_gone_consumer_left_unacknowledged_is_taken_over(redis_url) -> None:
    client = aioredis.Redis.from_url(redis_url)
    records = _stream_records(30, NOW)
    try:
        service = StatsService(client, StatsSettings(consumer="c1", claim_idle_ms=0),
                               clock=lambda: NOW)
        await service.ensure_groups()
        await _append(client, records)
        for stream in (keys.CLICKS_STREAM, keys.CONVERSIONS_STREAM):  # handed out, then gone
            await client.xreadgroup(keys.STATS_GROUP, "retired-node", {stream: ">"}, count=10)
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        await _until(lambda: _all_acknowledged(client))
        stop.set()
        await task
        assert await _stored(client, ("42", "7"), NOW) == _recount(records)
    finally:
        await client.aclose()


async def _raise_lost_ack(*_args, **_kwargs):
    raise _LostAck("connection lost before XACK")


async def test_rows_are_published_and_republished_as_the_windows_slide(redis_url) -> None:
    client = aioredis.Redis.from_url(redis_url)
    now = [NOON]
    service = StatsService(client, StatsSettings(consumer="c1"), clock=lambda: now[0])
    try:
        await service.ensure_groups()
        await _append(client, [(keys.CLICKS_STREAM, click("ok", ts=NOON, creative=None))])
        reply = await client.xreadgroup(keys.STATS_GROUP, "c1", {keys.CLICKS_STREAM: ">"})
        await service.count(keys.CLICKS_STREAM, reply[0][1], tally_click)
        assert await service.publish_changes() == 4  # today, 1h, 5m of c7, and the series
        assert await service.publish_changes() == 0  # nothing changed: nothing sent
        now[0] = NOON + 5 * NS_PER_MINUTE  # the click leaves the 5m window
        assert await service.publish_changes() == 2  # the 5m row, and the series moved
        latest = await client.hgetall("og:{stats:42}:latest")
        counters = {k.decode(): orjson.loads(v)["counters"]["clicks"] for k, v in latest.items()}
        assert counters == {"campaign:c7:today": 1, "campaign:c7:1h": 1, "campaign:c7:5m": 0,
                            SERIES_KEY: 1}
        # A restarted service knows what the topic holds: it zeroes the 1h row later.
        restarted = StatsService(client, StatsSettings(consumer="c1"),
                                 clock=lambda: NOON + 60 * NS_PER_MINUTE)
        await restarted._load_active()
        assert await restarted.publish_changes() == 2  # the 1h row, and the series
        event = orjson.loads(await client.hget("og:{stats:42}:latest", "campaign:c7:1h"))
        assert event["counters"]["clicks"] == 0 and event["type"] == "stats"
        series = orjson.loads(await client.hget("og:{stats:42}:latest", SERIES_KEY))
        assert series["minutes"]["start"] == NOON // NS_PER_MINUTE + 1
        assert series["counters"]["clicks"] == 0 and set(series["minutes"]["clicks"]) == {0}
    finally:
        await client.aclose()


async def _series(client: aioredis.Redis, partner: str) -> dict | None:
    raw = await client.hget(latest_key(stats_topic(partner)), SERIES_KEY)
    return None if raw is None else orjson.loads(raw)


async def test_the_series_rolls_every_minute_without_clicks_then_rests(redis_url) -> None:
    """Clock injected, no sleeps: each new minute moves the window by one, the click
    slides one bucket left, and an hour later the emptied series is published once
    more and then left alone until the next count."""
    client = aioredis.Redis.from_url(redis_url)
    now = [NOON]
    minute0 = NOON // NS_PER_MINUTE
    service = StatsService(client, StatsSettings(consumer="c1"), clock=lambda: now[0])
    try:
        await service.ensure_groups()
        await _append(client, [(keys.CLICKS_STREAM, click("bot", ts=NOON, creative=None)),
                               (keys.CLICKS_STREAM, click("ok", cid="k2", ts=NOON,
                                                          creative=None))])
        reply = await client.xreadgroup(keys.STATS_GROUP, "c1", {keys.CLICKS_STREAM: ">"})
        await service.count(keys.CLICKS_STREAM, reply[0][1], tally_click)
        await service.publish_changes()
        for later in range(0, 60):
            now[0] = NOON + later * NS_PER_MINUTE
            published = await service.publish_changes()
            assert published == (0 if later == 0 else 1 + (later == 5)), later  # +5m row
            event = await _series(client, "42")
            start = minute0 + later - 59
            assert event["minutes"]["start"] == start
            expected = [0] * 60
            expected[minute0 - start] = 2
            assert event["minutes"]["clicks"] == expected
            assert event["minutes"]["bot_clicks"][minute0 - start] == 1
            assert event["minutes"]["unique_clicks"][minute0 - start] == 1
            assert event["counters"]["clicks"] == 2
        # A restarted service reads the series back from the topic: nothing to resend.
        restarted = StatsService(client, StatsSettings(consumer="c1"), clock=lambda: now[0])
        await restarted._load_active()
        assert await restarted.publish_changes() == 0
        now[0] = NOON + 60 * NS_PER_MINUTE  # the click leaves the hour
        assert await service.publish_changes() == 2  # 1h row zeroed, the series emptied
        assert set((await _series(client, "42"))["minutes"]["clicks"]) == {0}
        now[0] = NOON + 61 * NS_PER_MINUTE  # the partner leaves the active set: once more
        assert await service.publish_changes() == 1
        now[0] = NOON + 62 * NS_PER_MINUTE  # then nothing moves it (README: zeros after it)
        assert await service.publish_changes() == 0
        assert (await _series(client, "42"))["minutes"]["start"] == minute0 + 61 - 59
        # Within a minute, a new count changes only the current bucket.
        now[0] = NOON + 70 * NS_PER_MINUTE
        await _append(client, [(keys.CLICKS_STREAM, click("ok", cid="k3", ts=now[0],
                                                          creative=None))])
        reply = await client.xreadgroup(keys.STATS_GROUP, "c1", {keys.CLICKS_STREAM: ">"})
        await service.count(keys.CLICKS_STREAM, reply[0][1], tally_click)
        assert await service.publish_changes() == 4
        event = await _series(client, "42")
        assert event["minutes"]["start"] == minute0 + 70 - 59
        assert event["minutes"]["clicks"] == [0] * 59 + [1]
    finally:
        await client.aclose()


def _start_stats(redis_url: str, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OG_REDIS_URL": redis_url, "OG_STATS_CONSUMER": "node-1",
           "OG_STATS_PUBLISH_MS": "100", "OG_STATS_BATCH": "50", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log_file:
        return subprocess.Popen([sys.executable, "-m", "supervisor.cli", "stats", "run"],
                                env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)


async def test_a_kill_9_mid_stream_counts_nothing_twice_or_never(redis_url, tmp_path) -> None:
    client = aioredis.Redis.from_url(redis_url)
    records = _stream_records(3000, NOW)
    proc = _start_stats(redis_url, tmp_path / "stats.log")
    try:
        await _append(client, records[:200])
        await _until(lambda: _all_acknowledged(client))
        for start in range(200, len(records), 400):  # keep it busy while it dies
            await _append(client, records[start:start + 400])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not await _all_acknowledged(client)  # it died with records left
        proc = _start_stats(redis_url, tmp_path / "stats.log")
        await _until(lambda: _all_acknowledged(client), timeout=60)
        assert await _stored(client, ("42", "7"), NOW) == _recount(records)
        # The restarted process publishes the series: the recount, minute by minute.
        expected = _recount_minutes(records)

        async def series_published() -> bool:
            return await _published_series(client, ("42", "7")) == expected

        await _until(series_published)
    finally:
        proc.terminate()
        proc.wait(10)
        await client.aclose()
        print((tmp_path / "stats.log").read_text()[-2000:])  # shown when the test fails


async def test_a_click_shows_in_its_partners_rows_over_the_websocket(
        worker, redis_url, tmp_path) -> None:
    client = aioredis.Redis.from_url(redis_url)
    proc = _start_stats(redis_url, tmp_path / "stats.log")
    try:
        async with connect(worker.url + f"?token={partner_token('42')}") as ws:
            await ws.recv()
            frames = await _subscribe(ws, {"stats:42": None})
            assert frames[1]["type"] == "snapshot"
            await _append(client, [(keys.CLICKS_STREAM, click("ok", ts=time.time_ns()))])
            rows_seen: dict[str, dict] = {}

            async def _row_arrived() -> bool:
                frame = orjson.loads(await ws.recv())
                for e in _events([frame]):
                    for event in e.get("markets", [e]) if e["type"] == "snapshot" else [e]:
                        if event.get("type") == "stats":
                            rows_seen[event["key"]] = event["counters"]
                return (rows_seen.get("campaign:c7:today", {}).get("clicks") == 1
                        and "creative:cr1:5m" in rows_seen)

            await _until(_row_arrived, timeout=20)
            assert rows_seen["creative:cr1:5m"]["unique_clicks"] == 1
    finally:
        proc.terminate()
        proc.wait(10)
        await client.aclose()


async def test_a_fresh_subscribers_snapshot_holds_the_last_hour_minute_by_minute(
        worker, redis_url, tmp_path) -> None:
    """Clicks of the last hour, counted before anyone subscribed, are in the first
    snapshot's `minutes:1h` row, read by the Python client under §5's checker."""
    from client.odds import OddsClient

    client = aioredis.Redis.from_url(redis_url)
    now = time.time_ns()
    records = [(keys.CLICKS_STREAM, click(("ok", "bot", "duplicate")[i % 3], cid=f"h{i}",
                                          ts=now - (i % 50) * NS_PER_MINUTE,
                                          campaign=f"c{i % 2}"))
               for i in range(120)]
    expected = _recount_minutes(records)["42"]
    proc = _start_stats(redis_url, tmp_path / "stats.log")
    odds = OddsClient(worker.url, token=partner_token("42"), token_in="query")
    try:
        await _append(client, records)

        async def published() -> bool:
            return (await _published_series(client, ("42",)))["42"] == expected

        await _until(published)
        await odds.connect()
        await odds.subscribe(["stats:42"])
        await odds.wait_synced(["stats:42"], timeout=10)
        held = odds.topics["stats:42"].markets[SERIES_KEY]
        assert held["type"] == "stats" and held["key"] == SERIES_KEY
        assert len(expected) == 50 and _series_by_minute(held) == expected
        assert held["counters"]["clicks"] == 120
        assert odds.violations == []
    finally:
        await odds.close()
        proc.terminate()
        proc.wait(10)
        await client.aclose()


async def test_a_node_with_og_stats_runs_the_service_and_restarts_it(redis_url, tmp_path) -> None:
    node = start_node(redis_url, tmp_path / "node", workers=1, OG_STATS="1",
                      OG_STATS_PUBLISH_MS="100")
    client = aioredis.Redis.from_url(redis_url)
    try:
        first = node.status()["services"]["stats"]["pid"]
        assert first is not None
        os.kill(first, signal.SIGKILL)
        node.wait(lambda: (node.status()["services"]["stats"]["pid"] or first) != first, 20,
                  "the statistics service restarted")
        await _append(client, [(keys.CLICKS_STREAM, click("bot", ts=time.time_ns()))])

        async def counted() -> bool:
            event = await client.hget("og:{stats:42}:latest", "campaign:c7:today")
            return event is not None and orjson.loads(event)["counters"]["bot_clicks"] == 1

        await _until(counted)
        assert node.status()["services"]["stats"]["restarts"] == 1
    finally:
        await client.aclose()
        assert node.stop() == 0, node.log_path.read_text()[-3000:]
