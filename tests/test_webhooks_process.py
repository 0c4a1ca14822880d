"""`oddsgate webhooks` as operators run it: the CLI, and the dispatcher as a process that
is killed with SIGKILL in the middle of its deliveries and loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import psutil
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from standardwebhooks import Webhook

from supervisor.embedded_redis import free_port
from tests.conftest import ROOT, eventually
from tests.node_harness import start_node
from tests.webhooks_harness import Received, Receiver, add_conversion, conversion_record
from webhooks import keys
from webhooks.store import HookStore

FAST = {"OG_WEBHOOKS_TIMEOUT_S": "0.5", "OG_WEBHOOKS_LEASE_S": "1", "OG_WEBHOOKS_POLL_S": "0.01",
        "OG_WEBHOOKS_RETRY_BASE_S": "0.02", "OG_WEBHOOKS_RETRY_CAP_S": "0.1",
        "OG_WEBHOOKS_BREAKER_OPEN_S": "0.1"}


def oddsgate(redis_url: str, *argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor.cli", "webhooks", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "OG_REDIS_URL": redis_url, **env})


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def test_bad_input_is_one_line_and_exit_2(redis_url: str) -> None:
    for argv, says in [
        (["add", "--partner", "a b", "--url", "https://x"], "--partner"),
        (["add", "--partner", "p", "--url", "mailto:x"], "--url"),
        (["add", "--partner", "p", "--url", "https://x", "--events", "ftd"], "--events"),
        (["add", "--partner", "p", "--postback", "https://x/?a={amt}"], "{amt}"),
        (["disable", "ep_missing"], "no endpoint"),
        (["replay", "msg_missing"], "no dead letter"),
    ]:
        done = oddsgate(redis_url, *argv)
        assert done.returncode == 2, (argv, done.stderr)
        assert says in done.stderr and "Traceback" not in done.stderr
    done = oddsgate("", "list", OG_REDIS_URL="")
    assert done.returncode == 2 and "OG_REDIS_URL" in done.stderr


async def test_endpoints_through_the_cli(redis_url: str, redis) -> None:
    added = oddsgate(redis_url, "add", "--partner", "acme", "--url", "https://acme.example/h",
                     "--events", "conversion.ftd,conversion.deposit")
    assert added.returncode == 0, added.stderr
    secret = added.stdout.splitlines()[-1]
    assert secret.startswith("whsec_")
    endpoint_id = added.stdout.split()[1]
    postback = oddsgate(redis_url, "add", "--partner", "acme", "--postback",
                        "https://t.example/pb?cid={click_id}&e={event}&a={amount}")
    assert postback.returncode == 0 and "postback" in postback.stdout
    listed = oddsgate(redis_url, "list", "--json")
    rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert [r["kind"] for r in rows] == ["webhook", "postback"]
    assert rows[0]["events"] == ["conversion.ftd", "conversion.deposit"]
    assert rows[0]["state"] == "enabled" and rows[0]["breaker"] == "closed"

    assert oddsgate(redis_url, "disable", endpoint_id).returncode == 0
    text = oddsgate(redis_url, "list").stdout
    assert "[disabled: by an operator]" in text and "2 endpoint(s)" in text
    assert oddsgate(redis_url, "enable", endpoint_id).returncode == 0
    assert "[enabled]" in oddsgate(redis_url, "list").stdout.splitlines()[0]

    rotated = oddsgate(redis_url, "rotate-secret", endpoint_id)
    new_secret = rotated.stdout.splitlines()[-1]
    assert rotated.returncode == 0 and new_secret.startswith("whsec_") and new_secret != secret
    endpoint = await HookStore(redis).endpoint(endpoint_id)
    assert endpoint is not None
    signing = endpoint.signing_secrets(0)
    assert signing == [new_secret, secret]  # both sign during the overlap
    assert oddsgate(redis_url, "rotate-secret", rows[1]["id"]).returncode == 2


async def test_dead_letters_listed_and_replayed_by_partner_through_the_cli(
        redis_url: str, redis) -> None:
    up = asyncio.Event()
    answered_ok: list[Received] = []

    async def answer(request: web.Request, _n: int) -> web.Response:
        if not up.is_set():
            return web.Response(status=500)
        answered_ok.append(receiver.received[-1])
        return web.Response(status=200)

    receiver = await Receiver(answer).start()
    try:
        added = oddsgate(redis_url, "add", "--partner", "acme", "--url", receiver.url)
        secret = added.stdout.splitlines()[-1]
        dispatcher = await start_dispatcher(redis_url, OG_WEBHOOKS_GIVE_UP_AFTER_S="0.2")
        try:
            for n in range(3):
                await add_conversion(redis, conversion_record(n, "acme"))
            await wait_for_dead(redis, 3)
            letters = oddsgate(redis_url, "dead-letters", "--partner", "acme", "--json")
            rows = [orjson.loads(line) for line in letters.stdout.splitlines()]
            assert len(rows) == 3
            for row in rows:
                assert {"at_s", "status", "latency_ms", "error"} <= set(row["attempts"][0])
                assert row["attempts"][0]["status"] == 500
            assert "3 dead letter(s)" in oddsgate(redis_url, "dead-letters").stdout
            assert oddsgate(redis_url, "dead-letters", "--partner", "other",
                            "--json").stdout == ""
            listed = orjson.loads(oddsgate(redis_url, "list", "--json").stdout)
            assert listed["dead"] == 3 and listed["delivered"] == 0
            up.set()
            replayed = oddsgate(redis_url, "replay", "--partner", "acme")
            assert replayed.returncode == 0 and replayed.stdout.startswith("3 ")
            await eventually(lambda: len(answered_ok) == 3)
            assert {r.headers["webhook-id"] for r in answered_ok} == \
                {row["webhook_id"] for row in rows}
            for got in answered_ok:
                Webhook(secret).verify(got.body, got.headers)
            assert oddsgate(redis_url, "dead-letters").stdout == "0 dead letter(s)\n"
        finally:
            await stop(dispatcher)
    finally:
        await receiver.stop()


async def wait_for_dead(redis: aioredis.Redis, count: int) -> None:
    for _ in range(500):
        if await redis.hlen(keys.DEAD) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no dead letters")


async def start_dispatcher(redis_url: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "supervisor.cli", "webhooks", "run", cwd=ROOT,
        env={**os.environ, "OG_REDIS_URL": redis_url, "OG_WEBHOOKS_METRICS_PORT": "0",
             **FAST, **env})


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)


async def test_sigkill_in_the_middle_of_deliveries_loses_nothing(redis_url: str, redis,
                                                                 tmp_path: Path) -> None:
    async def slowish(_request: web.Request, _n: int) -> web.Response:
        await asyncio.sleep(0.005)
        return web.Response(status=200)

    receivers = {p: await Receiver(slowish).start() for p in ("alpha", "beta")}
    try:
        for partner, receiver in receivers.items():
            assert oddsgate(redis_url, "add", "--partner", partner,
                            "--url", receiver.url).returncode == 0
        total = 400
        dispatcher = await start_dispatcher(redis_url)
        try:
            for n in range(total // 2):
                await add_conversion(redis, conversion_record(n, ("alpha", "beta")[n % 2]))
            await eventually(lambda: sum(len(r.received) for r in receivers.values()) >= 60,
                             timeout=20)
            dispatcher.send_signal(signal.SIGKILL)
            await dispatcher.wait()
            for n in range(total // 2, total):  # accepted while no dispatcher runs
                await add_conversion(redis, conversion_record(n, ("alpha", "beta")[n % 2]))
            dispatcher = await start_dispatcher(redis_url)

            def ids_seen() -> set[str]:
                return {r.event["data"]["conversion_id"] for rec in receivers.values()
                        for r in rec.received}

            await eventually(lambda: len(ids_seen()) == total, timeout=60)
            for _ in range(500):  # and every one settled: nothing left due
                if await redis.zcard(keys.DUE) == 0:
                    break
                await asyncio.sleep(0.01)
        finally:
            await stop(dispatcher)
        assert ids_seen() == {f"cv_{n:06d}" for n in range(total)}
        webhook_ids: dict[str, set[str]] = defaultdict(set)
        for receiver in receivers.values():
            for got in receiver.received:
                webhook_ids[got.event["data"]["conversion_id"]].add(got.headers["webhook-id"])
        assert all(len(ids) == 1 for ids in webhook_ids.values())  # duplicates: same id
        for partner, receiver in receivers.items():
            seqs = {r.event["data"]["partner_seq"] for r in receiver.received}
            assert seqs == set(range(1, total // 2 + 1)), partner
        assert await redis.zcard(keys.DUE) == 0
    finally:
        for receiver in receivers.values():
            await receiver.stop()


def test_the_dispatcher_refuses_bad_settings_at_start(redis_url: str) -> None:
    done = oddsgate(redis_url, "run", OG_WEBHOOKS_LEASE_S="1", OG_WEBHOOKS_TIMEOUT_S="10",
                    OG_WEBHOOKS_METRICS_PORT=str(free_port()))
    assert done.returncode == 2 and "OG_WEBHOOKS_LEASE_S" in done.stderr


async def test_a_node_with_og_webhooks_supervises_the_dispatcher(redis_url: str, redis,
                                                                 tmp_path: Path) -> None:
    receiver = await Receiver().start()
    try:
        assert oddsgate(redis_url, "add", "--partner", "acme",
                        "--url", receiver.url).returncode == 0
        node = await asyncio.to_thread(
            start_node, redis_url, tmp_path / "node", 1, OG_WEBHOOKS="1",
            OG_WEBHOOKS_METRICS_PORT=str(free_port()), **FAST)
        try:
            await add_conversion(redis, conversion_record(1, "acme"))
            await eventually(lambda: len(receiver.received) == 1, timeout=20)
            first = dispatcher_pid(node.proc.pid)
            os.kill(first, signal.SIGKILL)
            await eventually(lambda: dispatcher_pid(node.proc.pid) not in (None, first),
                             timeout=20)
            await add_conversion(redis, conversion_record(2, "acme"))
            await eventually(lambda: len(receiver.received) == 2, timeout=20)
        finally:
            await asyncio.to_thread(node.stop)
        assert [r.event["data"]["partner_seq"] for r in receiver.received] == [1, 2]
    finally:
        await receiver.stop()


def dispatcher_pid(node_pid: int) -> int | None:
    """The pid of the node's `oddsgate webhooks run` child, if one runs."""
    for child in psutil.Process(node_pid).children(recursive=True):
        try:
            if "webhooks" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                return child.pid
        except psutil.NoSuchProcess:
            continue
    return None
