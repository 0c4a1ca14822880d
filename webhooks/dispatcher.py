"""`oddsgate webhooks run`: the asyncio shell that moves conversions to partners.

Two loops and one lane per endpoint:
- the consumer reads `og:conversions` through a consumer group (first what
  it had read before a restart and not acknowledged, then new entries),
  builds each attributed conversion's event (events.py) and enqueues one
  delivery per matching endpoint with the entry's ack (store.py, atomic);
- the due loop claims due deliveries from the sorted set (each claim pushes
  the delivery's due time out by a lease, so one a killed dispatcher had in
  hand is due again once the lease ends) and hands them to their lane;
- a lane (one per endpoint) has its own breaker, token bucket and
  `concurrency` workers: an endpoint that hangs fills only its own lane,
  every other partner's lane keeps going.
Which outcome an attempt has, and what follows, is decided by schedule.py
and breaker.py; this module performs it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp
import orjson
import redis.asyncio as aioredis
from ulid import ULID
from yarl import URL

from attribution.keys import click_index
from redis_contract import target
from webhooks.breaker import BreakerState, EndpointBreaker
from webhooks.endpoints import Endpoint
from webhooks.events import NotAnEvent, build_event, render_postback
from webhooks.metrics import HookMetrics
from webhooks.ratelimit import TokenBucket
from webhooks.schedule import RetryPolicy, Verdict
from webhooks.settings import WebhookSettings
from webhooks.signing import signed_headers
from webhooks.store import Claimed, HookStore, new_delivery

log = logging.getLogger("oddsgate.webhooks")

_ERROR_TEXT_MAX = 200


class Lane:
    """One endpoint's queue, breaker, bucket and workers."""

    def __init__(self, endpoint_id: str, settings: WebhookSettings) -> None:
        self.endpoint_id = endpoint_id
        self.queue: asyncio.Queue[Claimed] = asyncio.Queue()
        self.breaker = EndpointBreaker(settings.breaker_failures, settings.breaker_open_s)
        self.bucket = TokenBucket(settings.rate_per_s, max(1.0, settings.rate_per_s))
        self.workers: list[asyncio.Task] = []


class Dispatcher:
    def __init__(self, redis: aioredis.Redis, settings: WebhookSettings,
                 metrics: HookMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = HookStore(redis)
        self.redis = redis
        self.settings = settings
        self.metrics = metrics or HookMetrics()
        self.clock = clock
        self.policy = RetryPolicy(settings.retry_base_s, settings.retry_cap_s,
                                  settings.give_up_after_s)
        self.endpoints: dict[str, Endpoint] = {}
        self.lanes: dict[str, Lane] = {}
        self.in_hand: set[str] = set()
        self.http: aiohttp.ClientSession | None = None

    async def run(self, stop: asyncio.Event) -> None:
        await self.store.ensure_group()
        await self.refresh_endpoints()
        # limit=0: no pool-wide cap, so connections held by one hanging endpoint never
        # make another endpoint's request wait for a free slot; each lane caps its own.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        self.http = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s))
        loops = [asyncio.create_task(self._consume(stop)), asyncio.create_task(self._due(stop)),
                 asyncio.create_task(self._gauges(stop))]
        try:
            await stop.wait()
        finally:
            for task in loops + [w for lane in self.lanes.values() for w in lane.workers]:
                task.cancel()
            await asyncio.gather(*loops, *(w for lane in self.lanes.values()
                                           for w in lane.workers), return_exceptions=True)
            await self.http.close()

    async def refresh_endpoints(self) -> None:
        self.endpoints = await self.store.endpoints()
        for endpoint in self.endpoints.values():
            self.metrics.know(endpoint.id, endpoint.enabled)

    # -- conversions -> deliveries ---------------------------------------------------------

    async def _consume(self, stop: asyncio.Event) -> None:
        pending = True  # first what this consumer read before a restart and did not ack
        while not stop.is_set():
            try:
                entries = await self.store.read(self.settings.consumer, pending, 100, 1000)
                if pending and not entries:
                    pending = False
                    continue
                await self.refresh_endpoints()  # an endpoint added a moment ago gets events
                for entry_id, fields in entries:
                    await self.consume_entry(entry_id, fields)
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
                log.warning("conversions stream: %s; reading again in 1 s", exc)
                await asyncio.sleep(1.0)

    async def consume_entry(self, entry_id: bytes, fields: dict) -> None:
        raw = fields.get(b"c")
        try:
            conversion = orjson.loads(raw) if raw is not None else None
            if not isinstance(conversion, dict):
                raise NotAnEvent("no JSON object in field c")
            parts = build_event(conversion, {})
        except (orjson.JSONDecodeError, NotAnEvent) as exc:
            if not getattr(exc, "expected", False):
                log.warning("conversion %s gives no event: %s", entry_id.decode(), exc)
            await self.store.ack(entry_id)
            return
        click_id = conversion.get("click_id")
        if isinstance(click_id, str) and click_id:
            click = await self.redis.hgetall(click_index(click_id))
            if click:
                parts = build_event(conversion, {k.decode(): v.decode() for k, v in click.items()})
        deliveries = [new_delivery("msg_" + str(ULID()), endpoint, parts.type, parts.accepted_ns)
                      for endpoint in sorted(self.endpoints.values(), key=lambda e: e.id)
                      if endpoint.partner == parts.partner and endpoint.wants(parts.type)]
        await self.store.enqueue(entry_id, parts.partner, parts.head, parts.tail, deliveries,
                                 int(self.clock() * 1000))

    # -- due deliveries -> lanes -----------------------------------------------------------------

    async def _due(self, stop: asyncio.Event) -> None:
        lease_ms = int(self.settings.lease_s * 1000)
        while not stop.is_set():
            try:
                claimed = await self.store.claim(int(self.clock() * 1000), lease_ms, 500)
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
                log.warning("due deliveries: %s; looking again in 1 s", exc)
                await asyncio.sleep(1.0)
                continue
            for item in claimed:
                if item.webhook_id in self.in_hand:
                    continue  # still queued or in flight here: the claim extended its lease
                self.in_hand.add(item.webhook_id)
                self._lane(item.delivery["endpoint"]).queue.put_nowait(item)
            if len(claimed) < 500:
                await asyncio.sleep(self.settings.poll_s)

    def _lane(self, endpoint_id: str) -> Lane:
        lane = self.lanes.get(endpoint_id)
        if lane is None:
            lane = self.lanes[endpoint_id] = Lane(endpoint_id, self.settings)
            lane.workers = [asyncio.create_task(self._work(lane))
                            for _ in range(self.settings.concurrency)]
        return lane

    async def _work(self, lane: Lane) -> None:
        while True:
            item = await lane.queue.get()
            try:
                await self.attempt(lane, item)
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
                # the delivery stays due in Redis (its lease ends): nothing is lost
                log.warning("delivery %s: %s", item.webhook_id, exc)
            except Exception:  # a bug must not end the lane: the delivery stays due
                log.exception("delivery %s", item.webhook_id)
            finally:
                self.in_hand.discard(item.webhook_id)

    async def attempt(self, lane: Lane, item: Claimed) -> None:
        endpoint = self.endpoints.get(lane.endpoint_id)
        if endpoint is None or not endpoint.enabled:
            endpoint = await self.store.endpoint(lane.endpoint_id)  # enabled a moment ago?
        if endpoint is None or not endpoint.enabled:
            reason = "endpoint removed" if endpoint is None else \
                f"endpoint disabled ({endpoint.disabled_reason or 'by an operator'})"
            item.delivery["attempts"].append({"at_s": self.clock(), "status": None,
                                              "latency_ms": None, "error": reason})
            await self.store.dead(item, failed_attempt=False)
            self.metrics.deliveries.labels(lane.endpoint_id, "dead").inc()
            return
        now = self.clock()
        if not lane.breaker.allow(now):
            first = item.delivery["first_attempt_s"]
            if first is not None and now - first > self.settings.give_up_after_s:
                await self.store.dead(item, failed_attempt=False)  # its period ran out
                self.metrics.deliveries.labels(lane.endpoint_id, "dead").inc()
                return
            await self.store.defer(item.webhook_id, int(lane.breaker.retry_at(now) * 1000))
            return
        wait = lane.bucket.wait_s(now)
        while wait > 0:
            await asyncio.sleep(wait)
            wait = lane.bucket.wait_s(self.clock())
        await self._send_and_settle(lane, endpoint, item)

    async def _send_and_settle(self, lane: Lane, endpoint: Endpoint, item: Claimed) -> None:
        assert self.http is not None
        started = self.clock()
        status: int | None = None
        retry_after: str | None = None
        error: str | None = None
        body = item.body.decode()
        try:
            if endpoint.kind == "webhook":
                headers = signed_headers(item.webhook_id, body,
                                         endpoint.signing_secrets(started), started)
                request = self.http.post(endpoint.url, data=item.body, headers=headers)
            else:
                # encoded=True: sent as rendered; yarl would otherwise unquote %2F and %3F
                url = URL(render_postback(endpoint.url, orjson.loads(item.body)), encoded=True)
                request = self.http.get(url, headers={"webhook-id": item.webhook_id})
            async with request as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
                await response.read()
        except TimeoutError:
            error = f"timeout after {self.settings.timeout_s:g} s"
        except aiohttp.ClientError as exc:
            error = (f"{type(exc).__name__}: {exc}")[:_ERROR_TEXT_MAX]
        finished = self.clock()
        delivery = item.delivery
        if delivery["first_attempt_s"] is None:
            delivery["first_attempt_s"] = started
        delivery["attempts"].append({"at_s": started, "status": status,
                                     "latency_ms": round((finished - started) * 1000, 1),
                                     "error": error})
        # failures since this retry period began (a replay starts a new one)
        failures_before = sum(1 for a in delivery["attempts"]
                              if a["at_s"] >= delivery["first_attempt_s"]) - 1
        decision = self.policy.decide(status, retry_after, failures_before,
                                      delivery["first_attempt_s"], finished)
        lane.breaker.record(decision.verdict is Verdict.DELIVERED, finished)
        self.metrics.breaker.labels(endpoint.id).set(int(lane.breaker.state))
        if decision.verdict is Verdict.DELIVERED:
            await self.store.delivered(item)
            self.metrics.deliveries.labels(endpoint.id, "delivered").inc()
            self.metrics.latency.labels(endpoint.id).observe(
                max(0.0, finished - delivery["accepted_ns"] / 1e9))
        elif decision.verdict is Verdict.RETRY:
            assert decision.due_s is not None
            await self.store.retry(item, int(decision.due_s * 1000))
            self.metrics.deliveries.labels(endpoint.id, "failed").inc()
        elif decision.verdict is Verdict.GONE:
            await self._disable_gone(endpoint, item)
        else:
            await self.store.dead(item, failed_attempt=True)
            self.metrics.deliveries.labels(endpoint.id, "dead").inc()
            log.warning("delivery %s to %s is a dead letter after %d attempts",
                        item.webhook_id, endpoint.id, len(delivery["attempts"]))

    async def _disable_gone(self, endpoint: Endpoint, item: Claimed) -> None:
        """410: the receiver says the endpoint is gone; disabled, this delivery kept dead."""
        fresh = await self.store.endpoint(endpoint.id) or endpoint
        fresh.enabled = False
        fresh.disabled_reason = f"410 Gone at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
        await self.store.save_endpoint(fresh)
        self.endpoints[fresh.id] = fresh
        await self.store.dead(item, failed_attempt=True)
        self.metrics.deliveries.labels(endpoint.id, "gone").inc()
        self.metrics.enabled.labels(endpoint.id).set(0)
        log.warning("endpoint %s of partner %s answered 410 Gone: disabled", endpoint.id,
                    endpoint.partner)

    # -- gauges ----------------------------------------------------------------------------------

    async def _gauges(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.refresh_endpoints()  # disable, enable, rotate-secret: within 1 s
                self.metrics.dead_letters.set(await self.store.dead_letter_count())
                for endpoint_id in list(self.endpoints):
                    stats = await self.store.stats(endpoint_id)
                    self.metrics.retrying.labels(endpoint_id).set(int(stats.get("retrying", 0)))
                    lane = self.lanes.get(endpoint_id)
                    state = lane.breaker.state if lane else BreakerState.CLOSED
                    if stats.get("breaker") != state.name.lower():
                        await self.store.set_breaker(endpoint_id, state.name.lower())
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
                log.warning("gauges: %s", exc)
            await asyncio.sleep(1.0)


async def serve(redis_url: str, settings: WebhookSettings, stop: asyncio.Event) -> None:
    """The dispatcher and its /metrics until `stop` is set."""
    from supervisor.metrics import MetricsServer

    metrics = HookMetrics()
    server = None
    if settings.metrics_port:
        server = MetricsServer(settings.metrics_host, settings.metrics_port, metrics.registry)
        await server.start()
    redis = target.async_client(redis_url)
    try:
        await Dispatcher(redis, settings, metrics).run(stop)
    finally:
        await redis.aclose()
        if server is not None:
            await server.stop()
