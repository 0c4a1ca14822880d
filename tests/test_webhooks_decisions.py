"""The webhook dispatcher's plain decisions, with no event loop: retry schedule, breaker,
token bucket, signing, event building, postback macros, endpoint checks."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from email.utils import format_datetime

import orjson
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from webhooks.breaker import BreakerState, EndpointBreaker
from webhooks.endpoints import (
    EndpointError,
    Secret,
    check_events,
    new_endpoint,
    rotate,
)
from webhooks.events import NotAnEvent, build_event, render_postback
from webhooks.ratelimit import TokenBucket
from webhooks.schedule import RetryPolicy, Verdict, parse_retry_after
from webhooks.signing import signed_headers


def conversion(**over) -> dict:
    record = {"conversion_id": "cv_1", "id": "op-1", "click_id": "ck_1", "type": "ftd",
              "player": "pl-9", "amount": "25.00", "currency": "EUR",
              "ts": 1_700_000_000_000_000_000, "received_ts": 1_700_000_000_500_000_000,
              "attributed": {"partner": "acme", "campaign": "cmp", "creative": "cr"},
              "reason": None}
    record.update(over)
    return record


# -- schedule ---------------------------------------------------------------------------


def test_default_schedule_retries_first_within_5s_and_for_at_least_24h() -> None:
    policy = RetryPolicy(rng=random.Random(1))
    assert 0 < policy.delay_s(1) <= 5
    now, first, failures = 0.0, 0.0, 0
    while True:
        decision = policy.decide(500, None, failures, first, now)
        if decision.verdict is Verdict.DEAD:
            break
        assert decision.verdict is Verdict.RETRY and decision.due_s is not None
        now, failures = decision.due_s, failures + 1
    assert now >= 24 * 3600
    assert failures < 60  # backoff, not hammering


def test_delays_grow_exponentially_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(base_s=1, cap_s=8, rng=random.Random(7))
    for failures, full in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8)]:
        delays = {policy.delay_s(failures) for _ in range(50)}
        assert all(full / 2 <= d <= full for d in delays)
        assert len(delays) > 1  # jittered


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_any_2xx_is_delivered(status: int) -> None:
    assert RetryPolicy().decide(status, None, 0, 0, 1).verdict is Verdict.DELIVERED


@pytest.mark.parametrize("status", [None, 301, 400, 404, 500, 502, 429, 503])
def test_everything_else_but_410_is_retried(status) -> None:
    assert RetryPolicy().decide(status, None, 0, 0, 1).verdict is Verdict.RETRY


def test_410_is_gone() -> None:
    assert RetryPolicy().decide(410, None, 0, 0, 1).verdict is Verdict.GONE


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured_on_429_and_503(status: int) -> None:
    policy = RetryPolicy(base_s=0.1, cap_s=3600, rng=random.Random(3))
    assert policy.decide(status, "120", 0, 1000, 1000).due_s == 1120
    date = format_datetime(datetime.fromtimestamp(1300, UTC), usegmt=True)
    assert policy.decide(status, date, 0, 1000, 1000).due_s == pytest.approx(1300)


def test_retry_after_is_not_believed_on_500_and_past_the_period_makes_a_dead_letter() -> None:
    policy = RetryPolicy(base_s=0.1, cap_s=60, give_up_after_s=3600, rng=random.Random(3))
    assert policy.decide(500, "120", 0, 1000, 1000).due_s < 1001
    assert policy.decide(429, "600", 0, 1000, 1000).due_s == 1600  # beyond the cap
    assert policy.decide(429, "99999", 0, 1000, 1000).verdict is Verdict.DEAD


def test_parse_retry_after_refuses_garbage() -> None:
    assert parse_retry_after("soon", 0) is None
    assert parse_retry_after(None, 0) is None
    assert parse_retry_after(" 7 ", 0) == 7


# -- breaker, bucket ---------------------------------------------------------------------


def test_breaker_opens_after_failures_then_lets_one_probe_through() -> None:
    breaker = EndpointBreaker(failures_to_open=3, open_s=10)
    for _ in range(3):
        assert breaker.allow(0)
        breaker.record(False, 0)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow(5) and breaker.retry_at(5) == 10
    assert breaker.allow(10)  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow(10)  # only one probe at a time
    breaker.record(False, 11)
    assert breaker.state is BreakerState.OPEN and not breaker.allow(12)
    assert breaker.allow(21)
    breaker.record(True, 21)
    assert breaker.state is BreakerState.CLOSED and breaker.allow(21) and breaker.allow(21)


def test_a_success_resets_the_count_of_failures_in_a_row() -> None:
    breaker = EndpointBreaker(failures_to_open=2, open_s=10)
    for success in (False, True, False, True, False):
        breaker.record(success, 0)
    assert breaker.state is BreakerState.CLOSED


def test_token_bucket_limits_the_rate() -> None:
    bucket = TokenBucket(rate_per_s=10, burst=2)
    assert bucket.wait_s(0) == 0 and bucket.wait_s(0) == 0
    assert bucket.wait_s(0) == pytest.approx(0.1)
    assert bucket.wait_s(0.1) == 0
    assert TokenBucket(0, 1).wait_s(0) == 0  # 0: no limit


# -- signing ----------------------------------------------------------------------------


def test_signatures_verify_with_the_reference_library_and_name_the_id() -> None:
    endpoint = new_endpoint("acme", url="https://example.com/h", now_s=0)
    secret = endpoint.secrets[0].secret
    assert secret.startswith("whsec_")
    body = '{"type":"conversion.ftd"}'
    headers = signed_headers("msg_1", body, [secret], time.time())
    assert Webhook(secret).verify(body, headers) == {"type": "conversion.ftd"}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, {**headers, "webhook-id": "msg_2"})


def test_during_a_rotation_both_secrets_sign_and_the_old_one_expires() -> None:
    endpoint = new_endpoint("acme", url="https://example.com/h", now_s=0)
    old = endpoint.secrets[0].secret
    new = rotate(endpoint, overlap_s=100, now_s=1000)
    assert endpoint.signing_secrets(1050) == [new, old]
    headers = signed_headers("msg_1", "{}", endpoint.signing_secrets(1050), time.time())
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify("{}", headers)
    assert endpoint.signing_secrets(1101) == [new]
    assert endpoint.secrets[1] == Secret(old, 1100)


def test_postbacks_have_no_secret_to_rotate() -> None:
    endpoint = new_endpoint("acme", postback="https://x.example/?c={click_id}", now_s=0)
    with pytest.raises(EndpointError, match="postback"):
        rotate(endpoint, 10, 0)


# -- events -----------------------------------------------------------------------------


def test_event_carries_the_conversion_its_click_and_the_partner_seq() -> None:
    click = {"code": "spring", "campaign": "c-from-click", "creative": "banner",
             "subs": '{"sub1":"a b","sub2":"x&y"}', "partner": "acme"}
    parts = build_event(conversion(), click)
    assert parts.type == "conversion.ftd" and parts.partner == "acme"
    event = orjson.loads(parts.body(41))
    assert list(event) == ["type", "timestamp", "data"]
    assert event["type"] == "conversion.ftd"
    assert event["timestamp"] == "2023-11-14T22:13:20.500Z"
    data = event["data"]
    assert data["partner_seq"] == 41
    assert (data["conversion_id"], data["id"], data["amount"], data["currency"]) == \
        ("cv_1", "op-1", "25.00", "EUR")
    assert data["click"] == {"click_id": "ck_1", "code": "spring", "campaign": "c-from-click",
                             "creative": "banner", "subs": {"sub1": "a b", "sub2": "x&y"}}


def test_without_its_click_index_the_event_has_what_the_conversion_has() -> None:
    data = orjson.loads(build_event(conversion(), {}).body(1))["data"]
    assert data["click"] == {"click_id": "ck_1", "code": None, "campaign": "cmp",
                             "creative": "cr", "subs": {}}


@pytest.mark.parametrize("record,why", [
    (conversion(attributed=None, reason="unknown_click"), "not attributed"),
    (conversion(type="refund"), "type"),
    (conversion(received_ts="yesterday"), "received_ts"),
])
def test_records_that_give_no_event(record: dict, why: str) -> None:
    with pytest.raises(NotAnEvent, match=why):
        build_event(record, {})


def test_postback_macros_are_url_encoded() -> None:
    click = {"code": "c", "subs": '{"sub1":"a b&c=d","sub3":"ü/?#"}'}
    event = orjson.loads(build_event(conversion(amount="1,5 €"), click).body(1))
    url = render_postback("https://t.example/pb?cid={click_id}&e={event}&a={amount}"
                          "&s1={sub1}&s2={sub2}&s3={sub3}&cur={currency}&cv={conversion_id}",
                          event)
    assert url == ("https://t.example/pb?cid=ck_1&e=conversion.ftd&a=1%2C5%20%E2%82%AC"
                   "&s1=a%20b%26c%3Dd&s2=&s3=%C3%BC%2F%3F%23&cur=EUR&cv=cv_1")


# -- endpoint checks ----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,flag", [
    ({"url": "ftp://x"}, "--url"),
    ({"url": "https://"}, "--url"),
    ({"postback": "https://x/?a={nope}"}, "--postback"),
    ({"postback": "https://x/?a={"}, "--postback"),
    ({"url": "https://x", "events": "conversion.ftd,conversion.bogus"}, "--events"),
    ({}, "exactly one"),
])
def test_bad_endpoints_are_refused_naming_the_field(kwargs: dict, flag: str) -> None:
    with pytest.raises(EndpointError, match=flag):
        new_endpoint("acme", now_s=0, **kwargs)
    with pytest.raises(EndpointError, match="--partner"):
        new_endpoint("no spaces", url="https://x", now_s=0)


def test_events_filter() -> None:
    endpoint = new_endpoint("acme", url="https://x", events="conversion.ftd", now_s=0)
    assert endpoint.wants("conversion.ftd") and not endpoint.wants("conversion.deposit")
    assert check_events("") == []
    endpoint.enabled = False
    assert not endpoint.wants("conversion.ftd")
