"""`POST /v1/conversions` on real workers and a real Redis (PROTOCOL.md §10): operator keys,
field errors, body limits, idempotency under concurrency, attribution and the stream record."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import redis
from ulid import ULID

from attribution import keys
from attribution.clickid import _mac, mint
from attribution.link_store import LinkStore
from attribution.links import Link
from attribution.operator_keys import key_hash, new_key
from attribution.settings import ClickKeys
from gateway.http import MAX_BODY_BYTES
from supervisor.cli import main
from supervisor.embedded_redis import EmbeddedRedis
from tests.conftest import WorkerProcess, start_worker
from tests.node_harness import start_node

CLICK_KEYS = "k1:conversion-test-secret-01"
KEYS = ClickKeys.parse(CLICK_KEYS)
DAY_NS = 86_400 * 10**9
WINDOW_S = 30 * 86_400


@pytest.fixture(scope="module")
def conv_worker(redis_server: EmbeddedRedis,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """One worker for the module (each test's Redis is flushed by `redis_url`)."""
    worker = start_worker(redis_server.url, Path(tmp_path_factory.mktemp("conv-worker")),
                          OG_CLICK_KEYS=CLICK_KEYS)
    yield worker
    worker.stop()


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        all_headers = dict(headers or {})
        if method == "POST" and body is not None:
            all_headers.setdefault("Content-Length", str(len(body)))
        conn.request(method, path, body=body, headers=all_headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post(port: int, conversion: dict | bytes, key: str | None) -> tuple[int, dict, bytes]:
    raw = conversion if isinstance(conversion, bytes) else orjson.dumps(conversion)
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return call(port, "POST", "/v1/conversions", raw, headers)


def operator_key(redis_url: str, port: int, name: str = "backoffice") -> str:
    """A key made by `oddsgate keys add`, once the worker takes it (a 400, not a 401)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["keys", "--redis-url", redis_url, "add", name]) == 0
    key = out.getvalue().splitlines()[-1]
    wait_for(lambda: post(port, b"{}", key)[0] != 401)
    return key


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met"
        time.sleep(0.05)


def conversion(click_id: str, **changes: object) -> dict:
    return {"id": "op-1", "click_id": click_id, "type": "ftd", "player": "p-991",
            "amount": "25.00", "currency": "EUR", "ts": time.time_ns(), **changes}


def stream(redis_url: str) -> list[dict]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(fields[b"c"]) for _, fields in client.xrange(keys.CONVERSIONS)]
    finally:
        client.close()


def index_click(redis_url: str, click_id: str, ts: int, **fields: str) -> None:
    """The click index as the click recorder writes it (attribution/record_click.lua)."""
    client = redis.Redis.from_url(redis_url)
    client.hset(keys.click_index(click_id), mapping={
        "click_id": click_id, "code": "spring", "partner": "p42", "campaign": "c7",
        "creative": "banner-a", "ts": ts, "subs": "{}", "ip_hash": "h", "ua": "ua",
        "referer": "", "verdict": "ok", **fields})
    client.pexpire(keys.click_index(click_id), WINDOW_S * 1000)
    client.close()


# -- operator keys --------------------------------------------------------------------------


def test_no_key_a_wrong_key_and_a_revoked_key_are_401(conv_worker: WorkerProcess,
                                                      redis_url: str) -> None:
    port = conv_worker.port
    key = operator_key(redis_url, port)
    body = conversion(mint(KEYS))
    for headers in ({}, {"Authorization": "Basic " + key}, {"Authorization": "Bearer"},
                    {"Authorization": f"Bearer {new_key()}"},
                    {"Authorization": f"Bearer {key_hash(key)}"}):
        status, got, answer = call(port, "POST", "/v1/conversions", orjson.dumps(body),
                                   headers)
        assert status == 401, headers
        assert got["www-authenticate"] == "Bearer"
        assert orjson.loads(answer)["code"] == "unauthorized"
    assert post(port, body, key)[0] == 202
    assert main(["keys", "--redis-url", redis_url, "revoke", "backoffice"]) == 0
    # within the workers' refresh time (an empty body: nothing is stored while it waits)
    wait_for(lambda: post(port, b"{}", key)[0] == 401)
    assert post(port, conversion(mint(KEYS), id="after-revoke"), key)[0] == 401
    assert [r["id"] for r in stream(redis_url)] == ["op-1"]  # the refused ones left nothing


def test_a_key_is_checked_before_the_body(conv_worker: WorkerProcess, redis_url: str) -> None:
    assert post(conv_worker.port, b"not json", None)[0] == 401


# -- the body -------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "field"), [
    ({"type": "purchase"}, "type"),
    ({"amount": 25}, "amount"),
    ({"currency": "eur"}, "currency"),
    ({"ts": 1763800000}, "ts"),
    ({"id": ""}, "id"),
    ({"player": None}, "player"),
    ({"affiliate": "x"}, "affiliate"),
])
def test_a_bad_field_is_400_naming_it(conv_worker: WorkerProcess, redis_url: str,
                                      changes: dict, field: str) -> None:
    key = operator_key(redis_url, conv_worker.port)
    status, headers, answer = post(conv_worker.port, conversion(mint(KEYS), **changes), key)
    assert status == 400
    error = orjson.loads(answer)
    assert (error["type"], error["code"], error["field"]) == ("error", "bad_request", field)
    assert error["message"].startswith(f"{field}: ")
    assert headers["content-type"] == "application/json"
    assert stream(redis_url) == []


def test_a_body_over_16_kib_is_413_and_16_kib_is_taken(conv_worker: WorkerProcess,
                                                       redis_url: str) -> None:
    key = operator_key(redis_url, conv_worker.port)
    raw = orjson.dumps(conversion(mint(KEYS)))
    exactly = raw + b" " * (MAX_BODY_BYTES - len(raw))  # JSON may end in white space
    assert post(conv_worker.port, exactly, key)[0] == 202
    status, headers, _ = post(conv_worker.port, exactly + b" ", key)
    assert (status, headers["connection"]) == (413, "close")
    assert len(stream(redis_url)) == 1


def raw_status(port: int, head: str, body: bytes = b"") -> int:
    """The status a worker answers to a request written byte for byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_post_needs_a_length_and_conversions_take_post_only(conv_worker: WorkerProcess) -> None:
    status, headers, _ = call(conv_worker.port, "GET", "/v1/conversions")
    assert (status, headers["allow"]) == (405, "POST")
    port = conv_worker.port
    assert raw_status(port, "POST /v1/conversions HTTP/1.1\r\nHost: t\r\n") == 411
    assert raw_status(port, "POST /v1/conversions HTTP/1.1\r\nHost: t\r\n"
                      "Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n") == 501


# -- idempotency ------------------------------------------------------------------------------


def test_the_same_id_twice_returns_the_first_answer_and_counts_once(
        conv_worker: WorkerProcess, redis_url: str) -> None:
    key = operator_key(redis_url, conv_worker.port)
    first = post(conv_worker.port, conversion(mint(KEYS)), key)
    again = post(conv_worker.port, conversion("forged-now", amount="99.00"), key)
    assert first[0] == again[0] == 202
    assert again[2] == first[2]
    assert len(stream(redis_url)) == 1
    client = redis.Redis.from_url(redis_url)
    assert client.get(keys.conversion_idempotency("op-1")) == first[2]
    client.close()


def test_twenty_concurrent_posts_of_one_id_make_one_record(conv_worker: WorkerProcess,
                                                           redis_url: str) -> None:
    key = operator_key(redis_url, conv_worker.port)
    click_id = mint(KEYS)
    index_click(redis_url, click_id, time.time_ns())
    body = conversion(click_id, id="op-race")
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: post(conv_worker.port, body, key), range(20)))
    assert {status for status, _, _ in answers} == {202}
    assert len({answer for _, _, answer in answers}) == 1
    [record] = stream(redis_url)
    assert record["conversion_id"] == orjson.loads(answers[0][2])["conversion_id"]


# -- attribution ------------------------------------------------------------------------------


def test_a_click_through_a_tracking_link_is_credited(conv_worker: WorkerProcess,
                                                     redis_url: str) -> None:
    """End to end: the link, the 302 with its click id, then the conversion credits it."""
    client = redis.Redis.from_url(redis_url)
    LinkStore(client).add(Link.create("spring-24", "p42", "c7", "banner1",
                                      "https://casino.example/welcome"))
    client.close()
    wait_for(lambda: call(conv_worker.port, "GET", "/t/spring-24")[0] == 302)
    status, headers, _ = call(conv_worker.port, "GET", "/t/spring-24",
                              headers={"User-Agent": "Mozilla/5.0 (X11; Linux x86_64)"})
    assert status == 302
    click_id = parse_qs(urlsplit(headers["location"]).query)["ogclid"][0]
    key = operator_key(redis_url, conv_worker.port)
    status, _, answer = post(conv_worker.port, conversion(click_id), key)
    assert status == 202
    body = orjson.loads(answer)
    assert body["attributed"] == {"partner": "p42", "campaign": "c7", "creative": "banner1"}
    assert "reason" not in body
    ULID.from_str(body["conversion_id"])


def old_click_id(age_ns: int) -> str:
    ulid = str(ULID.from_timestamp((time.time_ns() - age_ns) / 1e9))
    return f"{ulid}.k1.{_mac(KEYS.by_kid['k1'], ulid, 'k1')}"


@pytest.mark.parametrize("case", ["unknown", "forged", "altered", "expired_data",
                                  "expired_id"])
def test_a_click_that_cannot_be_credited_is_stored_with_its_reason(
        conv_worker: WorkerProcess, redis_url: str, case: str) -> None:
    now = time.time_ns()
    if case == "unknown":  # genuine, never clicked (or its index gone)
        click_id, reason = mint(KEYS), "unknown_click"
    elif case == "forged":
        click_id, reason = "01JDX0000000000000000000000.k1.AAAAAAAAAAAAAAAAAAAAAA", \
            "forged_click"
    elif case == "altered":  # a recorded click's id with one character changed
        genuine = mint(KEYS)
        index_click(redis_url, genuine, now)
        click_id, reason = genuine[:-1] + ("B" if genuine[-1] != "B" else "C"), \
            "forged_click"
    elif case == "expired_data":  # the index still there, its click 31 days old
        click_id, reason = mint(KEYS), "expired_click"
        index_click(redis_url, click_id, now - 31 * DAY_NS)
    else:  # minted 31 days ago: its index has expired, its own time says why
        click_id, reason = old_click_id(31 * DAY_NS), "expired_click"
    key = operator_key(redis_url, conv_worker.port)
    status, _, answer = post(conv_worker.port, conversion(click_id, id=f"op-{case}"), key)
    assert status == 202
    body = orjson.loads(answer)
    assert (body["attributed"], body["reason"]) == (None, reason)
    [record] = stream(redis_url)
    assert (record["attributed"], record["reason"], record["click_id"]) == \
        (None, reason, click_id)


def test_the_stream_record_is_the_shared_contracts(conv_worker: WorkerProcess,
                                                   redis_url: str) -> None:
    key = operator_key(redis_url, conv_worker.port)
    click_id = mint(KEYS)
    index_click(redis_url, click_id, time.time_ns() - DAY_NS)
    sent = conversion(click_id, id="op-record", type="deposit", amount="10.50",
                      currency="GBP", ts=time.time_ns() - 1000)
    before = time.time_ns()
    status, _, answer = post(conv_worker.port, sent, key)
    after = time.time_ns()
    assert status == 202
    [record] = stream(redis_url)
    assert list(record) == ["conversion_id", "id", "click_id", "type", "player", "amount",
                            "currency", "ts", "received_ts", "attributed", "reason"]
    assert before <= record.pop("received_ts") <= after
    assert record == {
        "conversion_id": orjson.loads(answer)["conversion_id"], "id": "op-record",
        "click_id": click_id, "type": "deposit", "player": "p-991", "amount": "10.50",
        "currency": "GBP", "ts": sent["ts"],
        "attributed": {"partner": "p42", "campaign": "c7", "creative": "banner-a"},
        "reason": None}


def test_the_worker_logged_no_failure(conv_worker: WorkerProcess) -> None:
    assert conv_worker.alive()
    assert "Traceback" not in conv_worker.log()


# -- without click keys, and behind HAProxy ----------------------------------------------------


def test_without_click_keys_conversions_are_503_not_miscredited(worker_factory,
                                                                redis_url: str) -> None:
    worker = worker_factory(OG_CLICK_KEYS="")
    key = operator_key(redis_url, worker.port)
    status, headers, answer = post(worker.port, conversion(mint(KEYS)), key)
    assert (status, headers["retry-after"]) == (503, "60")
    assert "OG_CLICK_KEYS" in orjson.loads(answer)["message"]
    assert stream(redis_url) == []


def test_a_conversion_through_haproxy(redis_url: str, tmp_path: Path) -> None:
    node = start_node(redis_url, tmp_path / "node", workers=1, OG_CLICK_KEYS=CLICK_KEYS)
    try:
        key = operator_key(redis_url, node.frontend_port)
        status, _, answer = post(node.frontend_port, conversion(mint(KEYS)), key)
        assert (status, orjson.loads(answer)["reason"]) == (202, "unknown_click")
        assert post(node.frontend_port, b" " * (MAX_BODY_BYTES + 1), key)[0] == 413
    finally:
        node.stop()


def test_redis_down_is_503_and_the_retry_counts_once(tmp_path: Path) -> None:
    """Never a lost or a doubled conversion: 503 while Redis is away, then the same id
    again is taken once."""
    server = EmbeddedRedis(tmp_path / "redis", port=0, persist=True)
    server.start()
    worker = start_worker(server.url, tmp_path, OG_CLICK_KEYS=CLICK_KEYS)
    try:
        key = operator_key(server.url, worker.port)
        body = conversion(mint(KEYS), id="op-outage")
        server.stop()
        status, headers, answer = post(worker.port, body, key)
        assert (status, headers["retry-after"]) == (503, "1")
        assert orjson.loads(answer)["code"] == "unavailable"
        assert worker.alive()
        server.start()
        wait_for(lambda: post(worker.port, body, key)[0] == 202)
        assert post(worker.port, body, key)[0] == 202
        assert [r["id"] for r in stream(server.url)] == ["op-outage"]
        assert "Traceback" not in worker.log()
    finally:
        worker.stop()
        server.stop()


def test_a_body_that_never_arrives_is_cut_off_by_the_handshake_timeout(worker_factory) -> None:
    """A client announcing more than it sends holds a connection only as long as a slow
    WebSocket handshake would: the worker closes it, answering nothing."""
    worker = worker_factory(OG_CLICK_KEYS=CLICK_KEYS, OG_HANDSHAKE_TIMEOUT_S="0.5")
    with socket.create_connection(("127.0.0.1", worker.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/conversions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
                     b'{"id":')
        try:
            answer = sock.recv(65536)  # a timeout here fails the test: it must close
        except ConnectionResetError:  # an abort may reach us as a reset
            answer = b""
        assert answer == b""
    assert worker.alive()
    assert call(worker.port, "GET", "/healthz")[0] == 200
