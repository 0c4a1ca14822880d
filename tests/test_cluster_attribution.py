"""Attribution, statistics, webhooks, links and the aggregator's input log on a real
Redis Cluster (tests/cluster_harness.py: three masters on loopback, no replicas).

Every client is made by redis_contract/target.py from the cluster's
`redis-cluster://` address, as a node's processes make theirs. What is
proved here: each multi-key script and MULTI keeps its keys in one slot
(the cluster refuses it otherwise, so running it is the check), the
consumer groups count and deliver exactly once, the link changes published
through one master reach a follower subscribed on another, and the CLIs
take the cluster address.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from redis.cluster import key_slot
from standardwebhooks import Webhook
from websockets.datastructures import Headers

from aggregator.inputlog import CopyGap, InputLog, input_key
from aggregator.inputs import ProviderMessage
from attribution import keys
from attribution.intake import ConversionIntake
from attribution.link_store import AsyncLinkStore
from attribution.linkcache import LinkCache
from attribution.links import Link
from attribution.linksync import LinkSync
from attribution.migrate_keys import migrate
from attribution.operator_keys import key_hash
from attribution.recorder import ClickRecorder
from attribution.settings import AttributionSettings
from attribution.stats_service import StatsService, StatsSettings
from attribution.tracking import TrackingRoute
from redis_contract import target
from supervisor.cli import main
from tests.cluster_harness import LocalCluster
from tests.conftest import ROOT, eventually, start_worker
from tests.test_conversions_worker import call, operator_key, post, wait_for
from tests.test_migrate_keys import check_moved, populate_old
from tests.test_stats_service import (
    NOW,
    _all_acknowledged,
    _append,
    _recount,
    _stored,
    _stream_records,
    _until,
)
from tests.webhooks_harness import (
    Receiver,
    add_click,
    add_conversion,
    conversion_record,
    fast_settings,
)
from webhooks import keys as hook_keys
from webhooks.dispatcher import Dispatcher
from webhooks.endpoints import new_endpoint
from webhooks.store import HookStore

CLICK_KEYS = "k1:cluster-test-secret-0001"
SETTINGS = AttributionSettings(click_keys=CLICK_KEYS, dedupe_window_s=60,
                               attribution_window_s=3600)
LINK = Link.create("spring-24", "p42", "c7", "banner1", "https://sportsbook.example/welcome")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("cluster"), masters=3) as running:
        yield running


@pytest.fixture
def cluster_url(cluster: LocalCluster) -> str:
    """The cluster's address, every master flushed (data and scripts) for each test."""
    for port in cluster.masters_ports():
        with cluster.client(port) as client:
            client.flushall()
            client.script_flush()
    return cluster.url


@pytest.fixture
async def client(cluster_url: str) -> AsyncIterator:
    connection = target.async_client(cluster_url)
    await connection.initialize()
    yield connection
    await connection.aclose()


async def _follow_links(url: str) -> tuple[LinkSync, LinkCache, asyncio.Task]:
    cache = LinkCache()
    sync = LinkSync(url, cache, reconnect_delay=0.05)
    task = asyncio.create_task(sync.run())
    await eventually(lambda: cache.loaded)
    return sync, cache, task


async def _stop_following(sync: LinkSync, task: asyncio.Task) -> None:
    sync.stopping = True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# -- the slots ------------------------------------------------------------------------


def test_keys_written_together_share_a_slot() -> None:
    """What the cluster checks at run time, for every group (attribution/keys.py)."""
    clicks = {key_slot(k.encode()) for k in (
        keys.CLICKS, keys.click_index("01JD-any-click"), keys.dedupe("code", "h", "ua"))}
    conversions = {key_slot(k.encode()) for k in (
        keys.CONVERSIONS, keys.conversion_idempotency("op-{1}-with}braces{"),
        hook_keys.ENDPOINTS, hook_keys.DELIVERIES, hook_keys.BODIES, hook_keys.DUE,
        hook_keys.DEAD, hook_keys.partner_seq("acme"), hook_keys.endpoint_stats("ep_1"))}
    operator = {key_slot(k.encode()) for k in (keys.OPERATOR_KEYS, keys.OPERATOR_KEYS_ADDED)}
    partner = {key_slot(k.encode()) for k in (
        keys.stats_seen_key("42", "2026-11-27"), keys.stats_day_key("42", "2026-11-27"),
        keys.stats_minute_key("42", 29_000_000))}
    inputs = {key_slot(input_key(p).encode()) for p in ("atlas", "borealis", "cygnus")}
    for group in (clicks, conversions, operator, partner, inputs):
        assert len(group) == 1
    # the long-lived keys kept their names
    assert (keys.CLICKS, keys.CONVERSIONS, keys.OPERATOR_KEYS, keys.LINKS) == \
        ("og:clicks", "og:conversions", "og:keys", "og:links")


# -- clicks and conversions ---------------------------------------------------------------


async def test_a_click_is_recorded_with_its_index_and_verdict(cluster, cluster_url,
                                                              client) -> None:
    await AsyncLinkStore(client).add(LINK)
    sync, cache, task = await _follow_links(cluster_url)
    try:
        recorder = ClickRecorder(client, dedupe_window_ms=SETTINGS.dedupe_window_ms,
                                 attribution_window_ms=SETTINGS.attribution_window_s * 1000)
        await recorder.warm()
        route = TrackingRoute(SETTINGS, cache, recorder)
        browser = Headers({"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/130.0"})
        answers = [await route.answer("/t/spring-24", {"sub1": ["kw"]}, "GET", browser,
                                      "198.51.100.7") for _ in range(2)]
        bot = await route.answer("/t/spring-24", {}, "HEAD", browser, "198.51.100.8")
        assert [a.status_code for a in [*answers, bot]] == [302, 302, 302]
        # a batch of one loop turn: one pipeline, every click in the stream's slot
        many = await asyncio.gather(*(route.answer(
            "/t/spring-24", {}, "GET", browser, f"203.0.113.{n}") for n in range(20)))
        assert {a.status_code for a in many} == {302}
    finally:
        await _stop_following(sync, task)
    stored = [orjson.loads(f[b"c"]) for _, f in await client.xrange(keys.CLICKS)]
    assert [r["verdict"] for r in stored[:3]] == ["ok", "duplicate", "bot"]
    assert [r["verdict"] for r in stored[3:]] == ["ok"] * 20
    first = stored[0]
    index = await client.hgetall(keys.click_index(first["click_id"]))
    assert index[b"partner"] == b"p42" and index[b"verdict"] == b"ok"
    assert 3500 < await client.ttl(keys.click_index(first["click_id"])) <= 3600
    # all of it on the master serving og:clicks
    owner = cluster.master_of(key_slot(keys.CLICKS.encode()))
    with cluster.client(owner) as direct:
        assert direct.xlen(keys.CLICKS) == 23
        assert direct.exists(keys.click_index(first["click_id"]))
    # Redis lost its scripts (a restart, a failover to a fresh node): reloaded, recorded
    for port in cluster.masters_ports():
        with cluster.client(port) as direct:
            direct.script_flush()
    assert await recorder.record(_click_like(first, "cid-after-flush")) == "ok"
    assert await client.xlen(keys.CLICKS) == 24


async def test_clicks_follow_their_slot_to_another_master(cluster, cluster_url,
                                                         client) -> None:
    """The slot of og:clicks (with every index and dedupe key in it) migrates while
    clicks are recorded: each is recorded or refused (TRYAGAIN while its keys are
    split between the two masters), none is lost, and all land on the new master."""
    await AsyncLinkStore(client).add(LINK)
    sync, cache, task = await _follow_links(cluster_url)
    recorder = ClickRecorder(client, dedupe_window_ms=60_000, attribution_window_ms=3_600_000)
    route = TrackingRoute(SETTINGS, cache, recorder)
    browser = Headers({"User-Agent": "Mozilla/5.0"})
    slot = key_slot(keys.CLICKS.encode())
    try:
        for n in range(300):  # 601 keys to migrate one by one: clicks come meanwhile
            assert (await route.answer("/t/spring-24", {}, "GET", browser,
                                       f"10.0.{n // 250}.{n % 250}")).status_code == 302
        source = cluster.master_of(slot)
        destination = next(p for p in cluster.masters_ports() if p != source)
        move = asyncio.create_task(asyncio.to_thread(cluster.move_slot, slot, destination,
                                                     batch=1))
        statuses: list[int] = []
        while not move.done() or statuses[-3:] != [302, 302, 302]:
            answer = await route.answer("/t/spring-24", {}, "GET", browser,
                                        f"10.9.{len(statuses) // 250}.{len(statuses) % 250}")
            statuses.append(answer.status_code)
            await asyncio.sleep(0.005)
        await move
    finally:
        await _stop_following(sync, task)
    assert set(statuses) <= {302, 503}
    assert cluster.master_of(slot) == destination
    with cluster.client(destination) as direct:
        assert direct.xlen(keys.CLICKS) == 300 + statuses.count(302)
    verdicts = [orjson.loads(f[b"c"])["verdict"] for _, f in await client.xrange(keys.CLICKS)]
    assert verdicts.count("ok") == len(verdicts)  # every client distinct: no duplicate


def test_a_worker_on_the_cluster_redirects_records_and_takes_conversions(cluster_url, cluster,
                                                                       tmp_path) -> None:
    """A real `oddsgate worker` given OG_REDIS_CLUSTER_NODES: a link added by the CLI, a
    click over HTTP (302 only once recorded), the operator key's conversion credited."""
    worker = start_worker("", tmp_path, OG_REDIS_CLUSTER_NODES=cluster.seeds,
                          OG_CLICK_KEYS=CLICK_KEYS)
    try:
        assert main(["links", "--redis-url", cluster_url, "add", "spring-24", "--partner", "p42",
                     "--campaign", "c7", "--creative", "banner1",
                     "--url", "https://sportsbook.example/welcome"]) == 0
        wait_for(lambda: call(worker.port, "GET", "/t/spring-24")[0] == 302)
        status, headers, _ = call(worker.port, "GET", "/t/spring-24?sub1=kw",
                                  headers={"User-Agent": "Mozilla/5.0 (X11) Firefox/130.0",
                                           "X-Forwarded-For": "203.0.113.50"})
        assert status == 302, worker.log()
        click_id = parse_qs(urlsplit(headers["location"]).query)["ogclid"][0]
        client = target.sync_client(cluster_url)
        try:
            recorded = [orjson.loads(f[b"c"]) for _, f in client.xrange(keys.CLICKS)]
            assert click_id in {r["click_id"] for r in recorded}
            assert client.hget(keys.click_index(click_id), "partner") == b"p42"
            key = operator_key(cluster_url, worker.port)
            body = orjson.dumps({"id": "op-w1", "click_id": click_id, "type": "ftd",
                                 "player": "p-1", "amount": "25.00", "currency": "EUR",
                                 "ts": time.time_ns()})
            first, again = (post(worker.port, body, key) for _ in range(2))
            assert first[0] == again[0] == 202 and first[2] == again[2], worker.log()
            assert orjson.loads(first[2])["attributed"]["partner"] == "p42"
            assert client.xlen(keys.CONVERSIONS) == 1
        finally:
            client.close()
    finally:
        worker.stop()


def _click_like(record: dict, click_id: str):
    from attribution.clicks import Click

    return Click(click_id, record["code"], record["partner"], record["campaign"],
                 record["creative"], time.time_ns(), {}, "another-client", "ua", "", bot=False)


def _add_operator_key(cluster_url: str, capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()
    assert main(["keys", "--redis-url", cluster_url, "add", "backoffice"]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


async def test_a_conversion_is_taken_once_and_attributed(cluster_url, client,
                                                         capsys) -> None:
    key = _add_operator_key(cluster_url, capsys)
    await AsyncLinkStore(client).add(LINK)
    sync, cache, task = await _follow_links(cluster_url)
    try:
        recorder = ClickRecorder(client, dedupe_window_ms=60_000, attribution_window_ms=3_600_000)
        answer = await TrackingRoute(SETTINGS, cache, recorder).answer(
            "/t/spring-24", {}, "GET", Headers({"User-Agent": "Mozilla/5.0"}), "192.0.2.1")
    finally:
        await _stop_following(sync, task)
    assert answer.status_code == 302
    click_id = orjson.loads((await client.xrange(keys.CLICKS))[0][1][b"c"])["click_id"]
    intake = ConversionIntake(SETTINGS, client)
    body = orjson.dumps({"id": "op-{1}", "click_id": click_id, "type": "ftd", "player": "pl-1",
                         "amount": "25.00", "currency": "EUR", "ts": time.time_ns()})
    auth = Headers({"Authorization": f"Bearer {key}"})
    # the original and its retries at once: one record, one answer for all
    answers = await asyncio.gather(*(intake.answer(auth, body) for _ in range(5)))
    assert {a.status_code for a in answers} == {202}
    assert len({a.body for a in answers}) == 1
    taken = orjson.loads(answers[0].body)
    assert taken["attributed"] == {"partner": "p42", "campaign": "c7", "creative": "banner1"}
    records = await client.xrange(keys.CONVERSIONS)
    assert len(records) == 1
    assert orjson.loads(records[0][1][b"c"])["conversion_id"] == taken["conversion_id"]
    assert await client.get(keys.conversion_idempotency("op-{1}")) == answers[0].body
    wrong = await intake.answer(Headers({"Authorization": "Bearer not-a-key"}), body)
    assert wrong.status_code == 401


def test_operator_keys_cli_on_the_cluster(cluster_url, capsys) -> None:
    key = _add_operator_key(cluster_url, capsys)
    assert main(["keys", "--redis-url", cluster_url, "add", "backoffice"]) == 2  # taken
    assert main(["keys", "--redis-url", cluster_url, "list"]) == 0
    assert "backoffice" in capsys.readouterr().out
    client = target.sync_client(cluster_url)
    try:
        assert client.hget(keys.OPERATOR_KEYS, "backoffice") is not None
        assert client.hget(keys.OPERATOR_KEYS_ADDED, "backoffice") is not None
        assert key and main(["keys", "--redis-url", cluster_url, "revoke", "backoffice"]) == 0
        assert client.hgetall(keys.OPERATOR_KEYS) == {}
        assert client.hgetall(keys.OPERATOR_KEYS_ADDED) == {}
    finally:
        client.close()


def test_the_clis_find_the_cluster_in_og_redis_cluster_nodes(cluster, cluster_url, capsys,
                                                             monkeypatch) -> None:
    """No --redis-url: OG_REDIS_CLUSTER_NODES, as an operator's shell on a node has it."""
    monkeypatch.delenv("OG_REDIS_URL", raising=False)
    monkeypatch.setenv("OG_REDIS_CLUSTER_NODES", cluster.seeds)
    assert main(["keys", "add", "from-env"]) == 0
    assert main(["links", "add", "env-link", "--partner", "p42", "--campaign", "c7",
                 "--creative", "b", "--url", "https://example.com/"]) == 0
    assert main(["webhooks", "add", "--partner", "p42", "--url", "https://example.com/h"]) == 0
    capsys.readouterr()
    assert main(["keys", "list"]) == 0 and "from-env" in capsys.readouterr().out
    assert main(["links", "list"]) == 0 and "env-link" in capsys.readouterr().out
    assert main(["webhooks", "list"]) == 0 and "p42" in capsys.readouterr().out
    # both set is a mistake the CLIs name rather than guess
    monkeypatch.setenv("OG_REDIS_URL", "redis://127.0.0.1:6379")
    for command in (["links", "list"], ["webhooks", "list"], ["keys", "list"],
                    ["feed", "--count", "1", "--quiet"]):
        assert main(command) == 2, command
        assert "OG_REDIS_CLUSTER_NODES" in capsys.readouterr().err, command
    from attribution.migrate_keys import main as migrate_main
    assert migrate_main(["--dry-run"]) == 2
    assert "OG_REDIS_CLUSTER_NODES" in capsys.readouterr().err
    # and an explicit --redis-url is taken as given
    assert main(["keys", "--redis-url", cluster_url, "list"]) == 0


def test_an_unreachable_cluster_is_one_line_and_exit_1(capsys) -> None:
    nowhere = "redis-cluster://127.0.0.1:1,127.0.0.1:2"
    capsys.readouterr()
    assert main(["keys", "--redis-url", nowhere, "list"]) == 1
    assert main(["links", "--redis-url", nowhere, "list"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(nowhere in line for line in err), err


def test_a_password_is_never_printed(capsys) -> None:
    secret_url = "redis://:s3cret-pw@127.0.0.1:1/0"
    capsys.readouterr()
    assert main(["keys", "--redis-url", secret_url, "list"]) == 1
    assert main(["links", "--redis-url", secret_url, "list"]) == 1
    assert main(["webhooks", "--redis-url", secret_url, "list"]) == 1
    err = capsys.readouterr().err
    assert "s3cret-pw" not in err and err.count(":***@") == 3, err


# -- links -------------------------------------------------------------------------------


async def test_links_added_by_the_cli_reach_a_worker_cache(cluster, cluster_url) -> None:
    sync, cache, task = await _follow_links(cluster_url)
    try:
        args = ["links", "--redis-url", cluster_url]
        assert await asyncio.to_thread(main, [
            *args, "add", "spring-24", "--partner", "p42", "--campaign", "c7",
            "--creative", "banner1", "--url", "https://sportsbook.example/welcome"]) == 0
        await eventually(lambda: cache.get("spring-24") is not None)
        assert await asyncio.to_thread(main, [*args, "pause", "spring-24"]) == 0
        await eventually(lambda: not cache.get("spring-24").active)
        # A change published through any master reaches the follower, whichever node
        # its subscription is on (plain PUBLISH crosses the cluster bus).
        masters = cluster.masters_ports()
        assert len(masters) == 3
        for n, port in enumerate(masters):
            link = Link.create(f"via-{n}", "p42", "c7", "b", "https://example.com/")
            with cluster.client(port) as direct:
                direct.publish(keys.LINKS_CHANGED, link.to_json())
            await eventually(lambda code=f"via-{n}": cache.get(code) is not None)
        # The subscription's connection is cut: the follower reconnects and reloads.
        reloads = sync.reloads
        for port in masters:
            with cluster.client(port) as direct:
                direct.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await eventually(lambda: sync.reloads > reloads, timeout=10)
        assert await asyncio.to_thread(main, [*args, "resume", "spring-24"]) == 0
        await eventually(lambda: cache.get("spring-24").active)
    finally:
        await _stop_following(sync, task)


# -- statistics ----------------------------------------------------------------------------


async def test_stats_count_exactly_once_on_the_cluster(client) -> None:
    settings = StatsSettings(consumer="c1", publish_ms=50, batch=7)
    records = _stream_records(90, NOW)
    service = StatsService(client, settings, clock=lambda: NOW)
    await service.ensure_groups()
    await _append(client, records)
    # handed out and never acknowledged (a crash): counted by the next run, once
    for stream in (keys.CLICKS_STREAM, keys.CONVERSIONS_STREAM):
        await client.xreadgroup(keys.STATS_GROUP, "c1", {stream: ">"}, count=10)
    stop = asyncio.Event()
    run = asyncio.create_task(service.run(stop))
    try:
        await _until(lambda: _all_acknowledged(client))
    finally:
        stop.set()
        await run
    assert service.malformed == 0
    assert await _stored(client, ("42", "7"), NOW) == _recount(records)
    assert await client.zscore(keys.STATS_PARTNERS, "42") is not None


async def test_stats_rows_are_published_on_the_cluster(client) -> None:
    """The rows go out through feed.publisher on each partner topic's slot."""
    service = StatsService(client, StatsSettings(consumer="c1"), clock=lambda: NOW)
    await service.ensure_groups()
    await _append(client, _stream_records(6, NOW))
    reply = await client.xreadgroup(keys.STATS_GROUP, "c1", {keys.CLICKS_STREAM: ">"})
    from attribution.stats import tally_click

    await service.count(keys.CLICKS_STREAM, reply[0][1], tally_click)
    assert await service.publish_changes() > 0
    assert await service._published("42")


def test_the_stats_service_process_counts_on_the_cluster(cluster_url, tmp_path) -> None:
    """`oddsgate stats run` with the cluster's address as OG_REDIS_URL, as a node starts it."""
    records = _stream_records(40, NOW)
    env = {**os.environ, "OG_REDIS_URL": cluster_url, "OG_STATS_CONSUMER": "node-1",
           "OG_STATS_PUBLISH_MS": "100", "PYTHONUNBUFFERED": "1"}
    env.pop("OG_REDIS_CLUSTER_NODES", None)
    log_path = tmp_path / "stats.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "stats", "run"],
                                env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)

    async def check() -> None:
        client = target.async_client(cluster_url)
        try:
            await _append(client, records)
            await _until(lambda: _all_acknowledged(client), timeout=30)
            assert await _stored(client, ("42", "7"), NOW) == _recount(records)
        finally:
            await client.aclose()

    try:
        asyncio.run(check())
    except AssertionError:
        raise AssertionError(log_path.read_text()) from None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


# -- webhooks ------------------------------------------------------------------------------


async def test_webhooks_are_enqueued_retried_and_delivered(client) -> None:
    attempts: list[int] = []

    async def flaky(_request, n: int):
        from aiohttp import web

        attempts.append(n)
        return web.Response(status=503 if n <= 2 else 204)

    receiver = await Receiver(flaky).start()
    store = HookStore(client)
    endpoint = new_endpoint("acme", now_s=0, url=receiver.url)
    await store.save_endpoint(endpoint)
    await add_click(client, "ck_1", "spring-24", "acme", {"sub1": "kw"})
    dispatcher = Dispatcher(client, fast_settings())
    stop = asyncio.Event()
    run = asyncio.create_task(dispatcher.run(stop))
    try:
        await add_conversion(client, conversion_record(1, "acme", "ftd", click_id="ck_1"))
        await add_conversion(client, conversion_record(2, None))  # credits nobody: not sent
        # two 503s (retries, one MULTI each), then delivered (another MULTI)
        await eventually(lambda: len(receiver.received) == 3, timeout=10)
        event = Webhook(endpoint.secrets[0].secret).verify(receiver.received[-1].body,
                                                           receiver.received[-1].headers)
        assert event["data"]["partner_seq"] == 1 and event["data"]["click"]["code"] == \
            "spring-24"
        assert len({r.headers["webhook-id"] for r in receiver.received}) == 1

        async def settled() -> bool:
            stats = await store.stats(endpoint.id)
            return stats.get("delivered") == "1" and await client.zcard(hook_keys.DUE) == 0

        await _until(settled)
        assert await client.hlen(hook_keys.BODIES) == 0
        groups = await client.xinfo_groups(keys.CONVERSIONS)
        assert groups[0]["pending"] == 0 and groups[0]["entries-read"] == 2
    finally:
        stop.set()
        await asyncio.wait_for(run, 10)
        await receiver.stop()


async def test_a_dead_letter_is_replayed_on_the_cluster(cluster_url, client,
                                                        capsys) -> None:
    from aiohttp import web

    answer = {"status": 500}

    async def switchable(_request, _n: int):
        return web.Response(status=answer["status"])

    receiver = await Receiver(switchable).start()
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["webhooks", "--redis-url", cluster_url, "add",
                                          "--partner", "acme", "--url", receiver.url]) == 0
    dispatcher = Dispatcher(client, fast_settings(give_up_after_s=0.2))
    stop = asyncio.Event()
    run = asyncio.create_task(dispatcher.run(stop))
    store = HookStore(client)
    try:
        await add_conversion(client, conversion_record(7, "acme"))

        async def dead() -> bool:
            return await store.dead_letter_count() == 1

        await _until(dead)
        answer["status"] = 204
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["webhooks", "--redis-url", cluster_url,
                                              "replay", "--partner", "acme"]) == 0
        assert "1 dead letter(s) due again" in capsys.readouterr().out

        async def delivered() -> bool:
            return await store.dead_letter_count() == 0 and \
                await client.zcard(hook_keys.DUE) == 0 and \
                await client.hlen(hook_keys.DELIVERIES) == 0

        await _until(delivered)
        assert await asyncio.to_thread(main, ["webhooks", "--redis-url", cluster_url,
                                              "list", "--json"]) == 0
        row = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert row["partner"] == "acme" and row["dead"] == 0 and row["delivered"] == 1, row
    finally:
        stop.set()
        await asyncio.wait_for(run, 10)
        await receiver.stop()


# -- the aggregator's input log ----------------------------------------------------------


def _heartbeats(provider: str, first: int, last: int) -> list[ProviderMessage]:
    return [ProviderMessage(provider, pseq, 1_763_800_000_000_000_000 + pseq, "heartbeat")
            for pseq in range(first, last + 1)]


async def test_the_input_log_appends_and_reads_on_the_cluster(cluster, client) -> None:
    log = InputLog(client)
    providers = ("atlas", "borealis", "cygnus")
    batch = [m for p in providers for m in _heartbeats(p, 1, 5)]
    assert await log.append(batch) == 15
    assert await log.append(batch[:3] + _heartbeats("atlas", 6, 7)) == 2  # resends skipped
    got = await log.read(dict.fromkeys(providers, 0))  # one XREAD over every copy
    assert sorted((m.provider, m.pseq) for m in got) == sorted(
        [(p, s) for p in providers for s in range(1, 6)] + [("atlas", 6), ("atlas", 7)])
    assert await log.last_pseq("atlas") == 7
    with pytest.raises(CopyGap):
        await log.append(_heartbeats("borealis", 9, 9))
    for port in cluster.masters_ports():  # scripts lost: reloaded
        with cluster.client(port) as direct:
            direct.script_flush()
    assert await log.append(_heartbeats("cygnus", 6, 6)) == 1


async def test_an_aggregator_rebuild_drops_its_topics_on_every_master(client) -> None:
    """`oddsgate aggregate --rebuild`: the topics of its checkpoint sit in many slots,
    deleted one key per command (a cluster pipeline sends each to its own master)."""
    from aggregator.service import Aggregator, checkpoint_key
    from aggregator.settings import AggregatorSettings
    from gateway.topics import PartitionMap
    from redis_contract import REGION_ALIVE_KEY, topic_keys

    settings = AggregatorSettings()
    topics = [f"odds:1:{1000 + n}" for n in range(12)]
    for topic in topics:
        for key in topic_keys(topic):
            await client.set(key, "x")
    assert len({key_slot(topic_keys(t)[0].encode()) for t in topics}) > 1
    engine = orjson.dumps({"seqs": dict.fromkeys(topics, 3)}).decode()
    await client.set(checkpoint_key(settings.stream), orjson.dumps({"engine": engine}))
    await client.set(REGION_ALIVE_KEY, "local 1")
    aggregator = Aggregator(client, settings, PartitionMap.load(None), "local")
    assert await aggregator.rebuild() == len(topics)
    for topic in topics:
        assert not await client.exists(*topic_keys(topic)[:1])
    assert not await client.exists(checkpoint_key(settings.stream))
    assert not await client.exists(REGION_ALIVE_KEY)


# -- the synthetic feed and the demo's operator key --------------------------------------


def test_the_demo_operator_key_on_the_cluster(cluster_url) -> None:
    from attribution.synthetic_partners import OPERATOR_KEY_NAME, register_operator_key

    key = asyncio.run(register_operator_key(cluster_url))
    client = target.sync_client(cluster_url)
    try:
        assert client.hget(keys.OPERATOR_KEYS, OPERATOR_KEY_NAME).decode() == key_hash(key)
    finally:
        client.close()


def test_the_feed_cli_publishes_its_count_on_the_cluster(cluster_url) -> None:
    from feed.synthetic import main as feed_main

    assert feed_main(["--redis-url", cluster_url, "--count", "50", "--rate", "2000",
                      "--quiet"]) == 0
    client = target.sync_client(cluster_url)
    try:
        metas = set(client.scan_iter(match="og:{*}:meta"))  # every master's
        assert len({key_slot(meta) for meta in metas}) > 1  # topics spread over slots
        assert sum(int(client.hget(meta, "seq")) for meta in metas) == 50
    finally:
        client.close()


# -- moving a deployment's old keys ------------------------------------------------------


def test_old_keys_move_to_their_cluster_names(cluster_url) -> None:
    """After an import into the cluster the old names sit in their own slots; the move
    (DUMP, RESTORE with the TTL, DEL: RENAME cannot leave a slot) puts each beside its
    group, consumer groups and TTLs with it."""
    client = target.sync_client(cluster_url)
    try:
        populate_old(client)
        report = migrate(client)
        assert not report.taken
        check_moved(client)
        assert sum(migrate(client).moved.values()) == 0
    finally:
        client.close()
