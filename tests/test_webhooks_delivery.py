"""The dispatcher against real Redis and real HTTP receivers on loopback.

Each test runs a `Dispatcher` in this event loop with short retry
schedules (tests/webhooks_harness.py), appends conversion records to
og:conversions as the attribution edge does, and watches what the
receivers get. Progress is asserted, never durations, except the lower
bound a Retry-After sets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from standardwebhooks import Webhook

from supervisor.embedded_redis import free_port
from tests.conftest import eventually
from tests.webhooks_harness import (
    Receiver,
    add_click,
    add_conversion,
    conversion_record,
    fast_settings,
    hang,
)
from webhooks import keys
from webhooks.dispatcher import Dispatcher
from webhooks.endpoints import Endpoint, new_endpoint
from webhooks.settings import WebhookSettings
from webhooks.store import HookStore


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def receivers() -> AsyncIterator[Callable]:
    started: list[Receiver] = []

    async def start(answer=None, port: int = 0) -> Receiver:
        receiver = Receiver(port=port) if answer is None else Receiver(answer, port=port)
        started.append(await receiver.start())
        return receiver

    yield start
    for receiver in started:
        await receiver.stop()


@pytest.fixture
async def dispatch(redis: aioredis.Redis) -> AsyncIterator[Callable]:
    running: list[tuple[asyncio.Event, asyncio.Task]] = []

    async def start(settings: WebhookSettings | None = None) -> Dispatcher:
        dispatcher = Dispatcher(redis, settings or fast_settings())
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(dispatcher.run(stop))))
        return dispatcher

    yield start
    for stop, task in running:
        stop.set()
        await asyncio.wait_for(task, 10)


async def add_endpoint(redis: aioredis.Redis, partner: str, **kwargs) -> Endpoint:
    endpoint = new_endpoint(partner, now_s=0, **kwargs)
    await HookStore(redis).save_endpoint(endpoint)
    return endpoint


async def consumed(redis: aioredis.Redis, entries: int) -> None:
    """Until the dispatcher's group has read `entries` entries and acknowledged them all."""
    for _ in range(500):
        groups = await redis.xinfo_groups("og:conversions")
        if groups and groups[0]["entries-read"] == entries and groups[0]["pending"] == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the dispatcher did not consume {entries} entries: {groups}")


def counter(dispatcher: Dispatcher, endpoint: Endpoint, outcome: str) -> float:
    return dispatcher.metrics.deliveries.labels(endpoint.id, outcome)._value.get()


async def test_a_conversion_arrives_signed_with_its_click_and_partner_seq(redis, receivers,
                                                                          dispatch) -> None:
    receiver = await receivers()
    endpoint = await add_endpoint(redis, "acme", url=receiver.url)
    await add_click(redis, "ck_1", "spring-code", "acme", {"sub1": "kw", "sub2": "eu"})
    dispatcher = await dispatch()
    await add_conversion(redis, conversion_record(1, "acme", "ftd", click_id="ck_1"))
    await eventually(lambda: len(receiver.received) == 1)
    got = receiver.received[0]
    assert got.method == "POST" and got.headers["content-type"] == "application/json"
    event = Webhook(endpoint.secrets[0].secret).verify(got.body, got.headers)
    assert event["type"] == "conversion.ftd"
    data = event["data"]
    assert data["partner_seq"] == 1
    assert (data["conversion_id"], data["amount"], data["currency"]) == \
        ("cv_000001", "10.50", "EUR")
    assert data["click"] == {"click_id": "ck_1", "code": "spring-code", "campaign": "spring",
                             "creative": "banner-1", "subs": {"sub1": "kw", "sub2": "eu"}}
    assert got.headers["webhook-id"].startswith("msg_")
    await eventually(lambda: counter(dispatcher, endpoint, "delivered") == 1)
    assert dispatcher.metrics.latency.labels(endpoint.id)._sum.get() > 0
    assert await redis.zcard(keys.DUE) == 0 and await redis.hlen(keys.BODIES) == 0
    assert (await HookStore(redis).stats(endpoint.id))["delivered"] == "1"


async def test_unattributed_conversions_and_other_partners_send_nothing(redis, receivers,
                                                                        dispatch) -> None:
    receiver = await receivers()
    await add_endpoint(redis, "acme", url=receiver.url, events="conversion.deposit")
    await dispatch()
    await add_conversion(redis, conversion_record(1, None))
    await add_conversion(redis, conversion_record(2, "other"))
    await add_conversion(redis, conversion_record(3, "acme", "ftd"))  # filtered out
    await add_conversion(redis, conversion_record(4, "acme", "deposit"))
    await eventually(lambda: len(receiver.received) == 1)
    assert receiver.received[0].event["data"]["conversion_id"] == "cv_000004"
    await consumed(redis, 4)  # every entry read and acknowledged


async def test_retries_on_500_timeout_and_refused_connection_keep_the_webhook_id(
        redis, receivers, dispatch) -> None:
    async def flaky(_request: web.Request, n: int) -> web.Response:
        if n == 1:
            return web.Response(status=500)
        if n == 2:
            await asyncio.sleep(5)  # past the 0.5 s timeout
        return web.Response(status=200)

    port = free_port()  # nothing listens there yet: connections are refused
    endpoint = await add_endpoint(redis, "acme", url=f"http://127.0.0.1:{port}/hook")
    dispatcher = await dispatch()
    await add_conversion(redis, conversion_record(1, "acme"))
    await eventually(lambda: counter(dispatcher, endpoint, "failed") >= 2)
    receiver = await receivers(flaky, port=port)
    await eventually(lambda: counter(dispatcher, endpoint, "delivered") == 1, timeout=10)
    assert [r.headers["webhook-id"] for r in receiver.received] == \
        [receiver.received[0].headers["webhook-id"]] * 3
    for got in receiver.received:
        Webhook(endpoint.secrets[0].secret).verify(got.body, got.headers)
    letter = (await HookStore(redis).stats(endpoint.id))
    assert int(letter["failed"]) >= 4 and letter["retrying"] == "0"


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured(redis, receivers, dispatch, status: int) -> None:
    async def busy(_request: web.Request, n: int) -> web.Response:
        if n == 1:
            return web.Response(status=status, headers={"Retry-After": "1"})
        return web.Response(status=200)

    receiver = await receivers(busy)
    endpoint = await add_endpoint(redis, "acme", url=receiver.url)
    dispatcher = await dispatch()  # its own schedule would retry within 0.02 s
    await add_conversion(redis, conversion_record(1, "acme"))
    await eventually(lambda: counter(dispatcher, endpoint, "delivered") == 1)
    first, second = receiver.received
    assert second.at - first.at >= 0.99


async def test_410_disables_the_endpoint_and_says_so(redis, receivers, dispatch) -> None:
    gone = await receivers(lambda _r, _n: _answer(410))
    healthy = await receivers()
    gone_endpoint = await add_endpoint(redis, "acme", url=gone.url)
    await add_endpoint(redis, "acme", url=healthy.url)
    dispatcher = await dispatch()
    await add_conversion(redis, conversion_record(1, "acme"))
    await eventually(lambda: counter(dispatcher, gone_endpoint, "gone") == 1)
    stored = await HookStore(redis).endpoint(gone_endpoint.id)
    assert stored is not None and not stored.enabled and "410" in stored.disabled_reason
    assert dispatcher.metrics.enabled.labels(gone_endpoint.id)._value.get() == 0
    await add_conversion(redis, conversion_record(2, "acme"))
    await eventually(lambda: len(healthy.received) == 2)
    assert len(gone.received) == 1
    letters = await HookStore(redis).dead_letters("acme")
    assert [d["attempts"][-1]["status"] for d in letters] == [410]


async def _answer(status: int) -> web.Response:
    return web.Response(status=status)


async def test_a_failing_or_hanging_endpoint_does_not_hold_up_a_healthy_one(
        redis, receivers, dispatch) -> None:
    healthy = await receivers()
    hanging = await receivers(hang)
    failing = await receivers(lambda _r, _n: _answer(500))
    good = await add_endpoint(redis, "good", url=healthy.url)
    await add_endpoint(redis, "slow", url=hanging.url)
    await add_endpoint(redis, "bad", url=failing.url)
    settings = fast_settings(timeout_s=30.0, lease_s=60.0, breaker_failures=3,
                             breaker_open_s=0.5)
    dispatcher = await dispatch(settings)
    for n in range(60):
        await add_conversion(redis, conversion_record(n, ("good", "slow", "bad")[n % 3]))
    await eventually(lambda: counter(dispatcher, good, "delivered") == 20)
    # every healthy delivery came while the hanging endpoint still held all its attempts
    assert len(hanging.received) == settings.concurrency
    assert {r.event["data"]["partner_seq"] for r in healthy.received} == set(range(1, 21))
    assert dispatcher.lanes[good.id].breaker.state.name == "CLOSED"


async def test_an_open_breaker_stops_attempts_then_a_probe_resumes(redis, receivers,
                                                                   dispatch) -> None:
    healthy_now = asyncio.Event()

    async def down_then_up(_request: web.Request, _n: int) -> web.Response:
        return web.Response(status=200 if healthy_now.is_set() else 502)

    receiver = await receivers(down_then_up)
    endpoint = await add_endpoint(redis, "acme", url=receiver.url)
    dispatcher = await dispatch(fast_settings(breaker_failures=3, breaker_open_s=0.3,
                                              concurrency=1))
    for n in range(5):
        await add_conversion(redis, conversion_record(n, "acme"))
    await eventually(lambda: endpoint.id in dispatcher.lanes
                     and dispatcher.lanes[endpoint.id].breaker.state.name == "OPEN")
    assert dispatcher.metrics.breaker.labels(endpoint.id)._value.get() == 2
    healthy_now.set()
    await eventually(lambda: counter(dispatcher, endpoint, "delivered") == 5, timeout=10)
    assert dispatcher.lanes[endpoint.id].breaker.state.name == "CLOSED"


async def test_dead_letters_keep_their_attempts_and_replay_with_the_same_id(
        redis, receivers, dispatch) -> None:
    fixed = asyncio.Event()

    async def broken(_request: web.Request, _n: int) -> web.Response:
        return web.Response(status=204 if fixed.is_set() else 500)

    receiver = await receivers(broken)
    endpoint = await add_endpoint(redis, "acme", url=receiver.url)
    dispatcher = await dispatch(fast_settings(give_up_after_s=0.2))
    await add_conversion(redis, conversion_record(1, "acme"))
    await add_conversion(redis, conversion_record(2, "acme"))
    await eventually(lambda: counter(dispatcher, endpoint, "dead") == 2)
    store = HookStore(redis)
    letters = await store.dead_letters("acme")
    assert len(letters) == 2 and await store.dead_letters("nobody") == []
    for letter in letters:
        assert len(letter["attempts"]) >= 2
        assert all(a["status"] == 500 and a["latency_ms"] is not None and a["at_s"] > 0
                   for a in letter["attempts"])
    stats = await store.stats(endpoint.id)
    assert stats["dead"] == "2" and stats["retrying"] == "0"
    fixed.set()
    sent_before = len(receiver.received)
    assert await store.replay([letters[0]["webhook_id"]], 0) == [letters[0]["webhook_id"]]
    await eventually(lambda: counter(dispatcher, endpoint, "delivered") == 1)
    assert receiver.received[-1].headers["webhook-id"] == letters[0]["webhook_id"]
    assert len(receiver.received) == sent_before + 1
    assert [d["webhook_id"] for d in await store.dead_letters()] == [letters[1]["webhook_id"]]


async def test_postback_macros_arrive_url_encoded(redis, receivers, dispatch) -> None:
    receiver = await receivers()
    await add_endpoint(redis, "acme", postback=receiver.url.replace("/hook", "/pb")
                       + "?cid={click_id}&e={event}&a={amount}&s1={sub1}&cur={currency}")
    await add_click(redis, "ck 7&x", "code", "acme", {"sub1": "a b/c?d=e"})
    await dispatch()
    await add_conversion(redis, conversion_record(7, "acme", "deposit", click_id="ck 7&x"))
    await eventually(lambda: len(receiver.received) == 1)
    got = receiver.received[0]
    assert got.method == "GET"
    assert got.path_qs == ("/pb?cid=ck%207%26x&e=conversion.deposit&a=10.50"
                           "&s1=a%20b%2Fc%3Fd%3De&cur=EUR")


async def test_partner_seq_goes_up_by_one_per_event_sent_to_each_partner(
        redis, receivers, dispatch) -> None:
    receiver_a, receiver_b = await receivers(), await receivers()
    await add_endpoint(redis, "alpha", url=receiver_a.url)
    await add_endpoint(redis, "beta", url=receiver_b.url)
    await add_endpoint(redis, "beta", postback=receiver_b.url + "?seq_of={conversion_id}")
    await dispatch()
    for n in range(90):
        await add_conversion(redis, conversion_record(n, (None, "alpha", "beta")[n % 3]))
    await eventually(lambda: len(receiver_a.received) == 30 and len(receiver_b.received) == 60)
    seqs = sorted(r.event["data"]["partner_seq"] for r in receiver_a.received)
    assert seqs == list(range(1, 31))
    posted = sorted(r.event["data"]["partner_seq"] for r in receiver_b.received
                    if r.method == "POST")
    assert posted == list(range(1, 31))  # both of beta's endpoints: one number per event
    assert int(await redis.get(keys.partner_seq("beta"))) == 30


async def test_an_endpoint_added_later_gets_events_from_then_on(redis, receivers,
                                                                dispatch) -> None:
    receiver = await receivers()
    await dispatch()
    await add_conversion(redis, conversion_record(1, "acme"))
    await consumed(redis, 1)
    await add_endpoint(redis, "acme", url=receiver.url)
    await add_conversion(redis, conversion_record(2, "acme"))
    await eventually(lambda: len(receiver.received) == 1)
    assert orjson.loads(receiver.received[0].body)["data"]["conversion_id"] == "cv_000002"


async def test_an_operator_disable_stops_deliveries_and_enable_resumes(redis, receivers,
                                                                       dispatch) -> None:
    receiver = await receivers()
    endpoint = await add_endpoint(redis, "acme", url=receiver.url)
    dispatcher = await dispatch()
    await add_conversion(redis, conversion_record(1, "acme"))
    await eventually(lambda: len(receiver.received) == 1)
    endpoint.enabled, endpoint.disabled_reason = False, "by an operator"
    await HookStore(redis).save_endpoint(endpoint)  # what `webhooks disable` writes
    await eventually(lambda: not dispatcher.endpoints[endpoint.id].enabled)
    await add_conversion(redis, conversion_record(2, "acme"))
    await consumed(redis, 2)
    assert len(receiver.received) == 1 and await redis.zcard(keys.DUE) == 0
    endpoint.enabled = True
    await HookStore(redis).save_endpoint(endpoint)
    await add_conversion(redis, conversion_record(3, "acme"))
    await eventually(lambda: len(receiver.received) == 2)
    assert receiver.received[1].event["data"]["partner_seq"] == 2


async def test_a_malformed_record_is_logged_and_passed_over(redis, receivers, dispatch,
                                                            caplog) -> None:
    receiver = await receivers()
    await add_endpoint(redis, "acme", url=receiver.url)
    await dispatch()
    await redis.xadd("og:conversions", {"c": b"{not json"})
    await redis.xadd("og:conversions", {"x": b"no c field"})
    await add_conversion(redis, conversion_record(3, "acme", kind="refund"))
    await add_conversion(redis, conversion_record(4, "acme"))
    await eventually(lambda: len(receiver.received) == 1)
    await consumed(redis, 4)
    assert receiver.received[0].event["data"]["partner_seq"] == 1
    said = [r.getMessage() for r in caplog.records if "gives no event" in r.getMessage()]
    assert len(said) == 3 and "refund" in said[2]
