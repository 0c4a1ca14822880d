"""Clicks, conversions, link changes and statistics across a master failover, on a real
Redis Cluster with one replica per master (tests/cluster_harness.py).

The promise under test is the one a single Redis keeps (PROTOCOL.md §9, §10): a
302 never leaves for a click that is not in `og:clicks`, a conversion is taken
once, and the statistics count every record exactly once. While the master of
a group's slot is down its clicks answer 503; once its replica is promoted,
the same clients (redis-py finds the new master) carry on, with nothing
written before the kill lost (the harness waits for the replica first).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from redis.cluster import key_slot
from websockets.datastructures import Headers

from attribution import keys
from attribution.intake import ConversionIntake
from attribution.link_store import AsyncLinkStore
from attribution.links import Link
from attribution.operator_keys import key_hash, new_key
from attribution.recorder import ClickRecorder
from attribution.stats_service import StatsService, StatsSettings
from attribution.tracking import TrackingRoute
from redis_contract import target
from tests.cluster_harness import LocalCluster
from tests.conftest import eventually
from tests.test_cluster_attribution import (
    LINK,
    SETTINGS,
    _follow_links,
    _stop_following,
)
from tests.test_stats_counting import click, conversion
from tests.test_stats_service import NOW, _all_acknowledged, _append, _recount, _stored, _until

BROWSER = Headers({"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0"})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster-r"), masters=3, replicas=1) as running:
        yield running


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator:
    for port in cluster.masters_ports():
        with cluster.client(port) as direct:
            direct.flushall()
    connection = target.async_client(cluster.url)
    await connection.initialize()
    yield connection
    await connection.aclose()


async def test_clicks_conversions_and_links_across_a_failover(cluster, client) -> None:
    operator = new_key()
    await client.hset(keys.OPERATOR_KEYS, "backoffice", key_hash(operator))
    await AsyncLinkStore(client).add(LINK)
    sync, cache, task = await _follow_links(cluster.url)
    recorder = ClickRecorder(client, dedupe_window_ms=60_000, attribution_window_ms=3_600_000)
    route = TrackingRoute(SETTINGS, cache, recorder)
    redirected: list[str] = []  # the click id of every 302

    async def click(n: int) -> int:
        answer = await route.answer("/t/spring-24", {}, "GET", BROWSER, f"198.51.100.{n % 250}")
        if answer.status_code == 302:
            query = parse_qs(urlsplit(answer.headers["Location"]).query)
            redirected.append(query[LINK.click_param][0])
        return answer.status_code

    try:
        assert await click(0) == 302
        before = orjson.loads((await client.xrange(keys.CLICKS))[0][1][b"c"])["click_id"]
        clicks_master = cluster.master_of(key_slot(keys.CLICKS.encode()))
        # Clicks keep coming while the master dies and its replica takes over: each is
        # a 503 or a recorded 302, and they are 302s again once it has.
        failover = asyncio.create_task(asyncio.to_thread(_kill_and_heal, cluster,
                                                         clicks_master))
        statuses: list[int] = []
        n = 1
        while not failover.done() or statuses[-3:] != [302, 302, 302]:
            statuses.append(await click(n))
            n += 1
            assert n < 2000, statuses
            await asyncio.sleep(0.02)
        promoted = await failover
        assert set(statuses) <= {302, 503}, statuses
        stored = {orjson.loads(f[b"c"])["click_id"] for _, f in
                  await client.xrange(keys.CLICKS)}
        assert set(redirected) <= stored  # no 302 for a click that is not in og:clicks
        assert cluster.master_of(key_slot(keys.CLICKS.encode())) == promoted
        # The click from before the kill is still indexed: its conversion is credited.
        intake = ConversionIntake(SETTINGS, client)
        body = orjson.dumps({"id": "op-failover", "click_id": before, "type": "registration",
                             "player": "pl-1", "ts": time.time_ns()})
        auth = Headers({"Authorization": f"Bearer {operator}"})
        answers = [await intake.answer(auth, body) for _ in range(2)]
        assert [a.status_code for a in answers] == [202, 202]
        assert answers[0].body == answers[1].body
        assert orjson.loads(answers[0].body)["attributed"]["partner"] == "p42"
        assert await client.xlen(keys.CONVERSIONS) == 1
        # The link follower's node may be another master: kill that one too, then a
        # change made after it is followed (reconnect, reload, subscribe).
        links_master = cluster.master_of(key_slot(keys.LINKS_CHANGED.encode()))
        if links_master != promoted:
            await asyncio.to_thread(_kill_and_heal, cluster, links_master)
        store = AsyncLinkStore(client)
        await _retry(lambda: store.add(Link.create("after-kill", "p42", "c7", "b",
                                                   "https://example.com/")))
        await eventually(lambda: cache.get("after-kill") is not None, timeout=20)
    finally:
        await _stop_following(sync, task)


def _kill_and_heal(cluster: LocalCluster, master: int) -> int:
    """Kill `master`, wait for its replica to take over, then start it again: it rejoins
    as the new master's replica, so a later test can fail that one over too. The
    master now serving its slots."""
    promoted = cluster.kill_master(master)
    cluster.node(master).start()
    deadline = time.monotonic() + 20
    while True:
        try:
            if cluster.replica_of(promoted) == master:
                break
        except LookupError:
            pass
        assert time.monotonic() < deadline, f"{master} did not rejoin as a replica"
        time.sleep(0.1)
    cluster.wait_ok()
    return promoted


async def _retry(step, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await step()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _records(prefix: str, n: int) -> list[tuple[str, dict]]:
    """Clicks and conversions of two partners, ids starting with `prefix`."""
    out = []
    for i in range(n):
        out.append((keys.CLICKS_STREAM, click("ok" if i % 4 else "bot", cid=f"{prefix}k{i}",
                                              ts=NOW, partner="42" if i % 3 else "7")))
        if i % 5 == 0:
            out.append((keys.CONVERSIONS_STREAM, conversion("ftd", "10.00", "EUR",
                                                            cid=f"{prefix}v{i}", ts=NOW)))
    return out


async def test_stats_count_exactly_once_across_a_failover(cluster, client) -> None:
    settings = StatsSettings(consumer="c1", publish_ms=50, batch=5)
    first, second = _records("a", 40), _records("b", 30)
    service = StatsService(client, settings, clock=lambda: NOW)
    await service.ensure_groups()
    stop = asyncio.Event()
    run = asyncio.create_task(service.run(stop))
    try:
        await _append(client, first)
        await _until(lambda: _all_acknowledged(client))
        await asyncio.to_thread(_kill_and_heal, cluster,
                                cluster.master_of(key_slot(keys.CLICKS.encode())))
        await _retry(lambda: _append(client, second))
        await _until(lambda: _all_acknowledged(client), timeout=30)
    finally:
        stop.set()
        await run
    assert await _stored(client, ("42", "7"), NOW) == _recount(first + second)
