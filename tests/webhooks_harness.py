"""Real HTTP receivers and conversion records for the webhook tests.

A `Receiver` is an aiohttp.web server on a free loopback port that records
every request and answers what its `answer` coroutine says (which may be
to hang). `add_conversion` appends a conversion record to og:conversions
exactly as the issue 12 contract writes it, and `add_click` the click index.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
import redis.asyncio as aioredis
from aiohttp import web

from attribution.keys import CONVERSIONS, click_index
from webhooks.settings import WebhookSettings


@dataclass
class Received:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def event(self) -> dict:
        return orjson.loads(self.body)


async def ok(_request: web.Request, _n: int) -> web.Response:
    return web.Response(status=204)


Answer = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


@dataclass
class Receiver:
    answer: Answer = ok
    port: int = 0
    received: list[Received] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.method, request.path_qs,
                                      {k.lower(): v for k, v in request.headers.items()},
                                      body, time.time()))
        return await self.answer(request, len(self.received))

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def hang(_request: web.Request, _n: int) -> web.Response:
    await asyncio.sleep(3600)
    return web.Response(status=200)


def fast_settings(**over: object) -> WebhookSettings:
    """Short schedules for tests (the 24 h schedule is the default)."""
    values: dict[str, object] = dict(
        metrics_port=0, timeout_s=0.5, retry_base_s=0.02, retry_cap_s=0.1,
        give_up_after_s=60.0, lease_s=1.0, concurrency=4, rate_per_s=0.0,
        breaker_failures=50, breaker_open_s=0.1, poll_s=0.01)
    values.update(over)
    settings = WebhookSettings(**values)  # type: ignore[arg-type]
    settings.check()
    return settings


def conversion_record(n: int, partner: str | None, kind: str = "ftd",
                      click_id: str | None = None) -> dict:
    now = time.time_ns()
    return {"conversion_id": f"cv_{n:06d}", "id": f"op-{n}", "click_id": click_id or f"ck_{n}",
            "type": kind, "player": f"pl-{n}", "amount": "10.50" if kind != "registration"
            else None, "currency": "EUR" if kind != "registration" else None,
            "ts": now, "received_ts": now,
            "attributed": {"partner": partner, "campaign": "cmp", "creative": "cr"}
            if partner else None,
            "reason": None if partner else "unknown_click"}


async def add_conversion(redis: aioredis.Redis, record: dict) -> None:
    await redis.xadd(CONVERSIONS, {"c": orjson.dumps(record)})


async def add_click(redis: aioredis.Redis, click_id: str, code: str, partner: str,
                    subs: dict[str, str]) -> None:
    """The click index as issue 12 writes it: the record's fields, `subs` a JSON string."""
    await redis.hset(click_index(click_id), mapping={
        "click_id": click_id, "code": code, "partner": partner, "campaign": "spring",
        "creative": "banner-1", "ts": str(time.time_ns()), "subs": orjson.dumps(subs),
        "ip_hash": "h", "ua": "test", "referer": "", "verdict": "ok"})
