"""The webhook drill: conversions at a steady rate to 50 partners, 10% of them broken.

Used by the `webhooks` bench scenario (bench/scenarios/webhooks.py) and by
bench/tests/test_webhooks_drill.py. One Redis, one dispatcher process
(`oddsgate webhooks run`, as a node runs it), and 50 partner receivers in
this process (aiohttp.web on loopback): 45 answer 204, 3 answer 500, 2 hang
until the dispatcher's timeout. Conversions are appended to og:conversions
as the attribution edge writes them, `rate` a second for `seconds`.
Reported: conversion accepted (received_ts) to delivered at the receiver,
p50/p99/max, for the healthy partners; healthy conversions never delivered
once the dispatcher has had `drain_s` to finish (lost, target 0); and the
dispatcher's CPU seconds per thousand deliveries.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import orjson
import psutil
import redis.asyncio as aioredis
from aiohttp import web

from attribution.keys import CONVERSIONS
from webhooks.endpoints import new_endpoint
from webhooks.store import HookStore

PARTNERS = 50
FAILING = 3  # answer 500
HANGING = 2  # never answer before the dispatcher's timeout


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def drill(redis_url: str, tree: Path, rate: int, seconds: float,
                drain_s: float = 20.0, timeout_s: float = 2.0) -> dict:
    healthy_latency_ms: list[float] = []
    delivered: set[str] = set()
    attempts = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal attempts
        body = await request.read()
        attempts += 1
        kind = request.match_info["kind"]
        if kind == "hang":
            await asyncio.sleep(3600)
        if kind == "fail":
            return web.Response(status=500)
        event = orjson.loads(body)
        data = event["data"]
        if data["conversion_id"] not in delivered:
            delivered.add(data["conversion_id"])
            healthy_latency_ms.append((time.time_ns() - data["received_ts"]) / 1e6)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{kind}/{partner}", handle)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    redis = aioredis.Redis.from_url(redis_url)
    store = HookStore(redis)
    kinds = {}
    for i in range(PARTNERS):
        kind = "fail" if i < FAILING else "hang" if i < FAILING + HANGING else "ok"
        partner = f"p{i:02d}"
        kinds[partner] = kind
        await store.save_endpoint(new_endpoint(
            partner, url=f"http://127.0.0.1:{port}/{kind}/{partner}", now_s=time.time()))
    env = {**os.environ, "OG_REDIS_URL": redis_url, "OG_WEBHOOKS_METRICS_PORT": "0",
           "OG_WEBHOOKS_TIMEOUT_S": str(timeout_s), "OG_WEBHOOKS_LEASE_S": str(timeout_s * 3)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "supervisor.cli", "webhooks", "run", cwd=tree, env=env)
    dispatcher = psutil.Process(proc.pid)
    healthy_sent: set[str] = set()
    try:
        cpu_before = sum(dispatcher.cpu_times()[:2])
        total = int(rate * seconds)
        started = time.monotonic()
        for n in range(total):
            partner = f"p{n % PARTNERS:02d}"
            now = time.time_ns()
            conversion_id = f"cv_{n:07d}"
            record = {"conversion_id": conversion_id, "id": f"op-{n}", "click_id": f"ck_{n}",
                      "type": "deposit", "player": f"pl-{n}", "amount": "20.00",
                      "currency": "EUR", "ts": now, "received_ts": now,
                      "attributed": {"partner": partner, "campaign": "c", "creative": "k"},
                      "reason": None}
            await redis.xadd(CONVERSIONS, {"c": orjson.dumps(record)})
            if kinds[partner] == "ok":
                healthy_sent.add(conversion_id)
            await asyncio.sleep(max(0.0, started + (n + 1) / rate - time.monotonic()))
        deadline = time.monotonic() + drain_s
        while healthy_sent - delivered and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cpu_s = sum(dispatcher.cpu_times()[:2]) - cpu_before
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        await redis.aclose()
        await runner.cleanup()
    return {
        "conversions": total, "rate_per_s": rate, "partners": PARTNERS,
        "failing": FAILING, "hanging": HANGING,
        "healthy_conversions": len(healthy_sent),
        "delivered_healthy": len(healthy_sent & delivered),
        "lost": len(healthy_sent - delivered),
        "attempts": attempts,
        "latency_ms": {"p50": _pct(healthy_latency_ms, 0.5), "p99": _pct(healthy_latency_ms, 0.99),
                       "max": _pct(healthy_latency_ms, 1.0)},
        "cpu_s_per_1000_deliveries": round(cpu_s * 1000 / max(1, attempts), 3),
    }
