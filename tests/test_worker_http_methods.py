"""A real worker's answers to raw HTTP: methods, HEAD, bodies, pipelining, HTTP/1.0,
and the rate limits of GET /v1/snapshot (README: "HTTP on a worker").

Requests go out as raw bytes over a socket and the whole answer is read until
the worker closes, so what is checked is what a client or HAProxy receives.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import connect

from feed.events import PriceUpdate
from supervisor.embedded_redis import EmbeddedRedis
from tests.conftest import WorkerProcess, start_worker, token
from tests.node_harness import start_node

WS_HEADERS = ("Upgrade: websocket\r\nConnection: Upgrade\r\n"
              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


@pytest.fixture(scope="module")
def http_worker(redis_server: EmbeddedRedis,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """One worker for the requests that change nothing (starting one per test costs ~1 s)."""
    worker = start_worker(redis_server.url, Path(tmp_path_factory.mktemp("http-worker")))
    yield worker
    worker.stop()


def exchange(port: int, raw: bytes, timeout: float = 5.0) -> bytes:
    """Send `raw` in one write; everything the worker sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        chunks = []
        while chunk := sock.recv(65536):  # a timeout fails the test: the worker must close
            chunks.append(chunk)
    return b"".join(chunks)


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (names in lower case: HAProxy writes them so) and body."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    assert sep, answer
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


def ask(port: int, method: str, target: str, extra: str = "", body: bytes = b"",
        version: str = "HTTP/1.1") -> tuple[int, dict[str, str], bytes]:
    raw = f"{method} {target} {version}\r\nHost: test\r\n{extra}\r\n".encode() + body
    return parse(exchange(port, raw))


@pytest.mark.parametrize("target", ["/", "/healthz", "/v1/topics", "/nope"])
def test_head_gets_gets_headers_without_a_body(http_worker: WorkerProcess, target: str) -> None:
    get_status, get_headers, get_body = ask(http_worker.port, "GET", target)
    status, headers, body = ask(http_worker.port, "HEAD", target)
    assert status == get_status
    assert body == b""
    assert headers["content-length"] == get_headers["content-length"] == str(len(get_body))
    assert headers["content-type"] == get_headers["content-type"]


def test_head_of_a_snapshot_is_its_get_without_the_body(http_worker: WorkerProcess) -> None:
    cookie = f"Cookie: og_session={token(player='head')}\r\n"
    target = "/v1/snapshot?topic=odds:1:39:1"
    get_status, get_headers, get_body = ask(http_worker.port, "GET", target, cookie)
    status, headers, body = ask(http_worker.port, "HEAD", target, cookie)
    assert (status, get_status, body) == (200, 200, b"")
    assert headers["content-length"] == get_headers["content-length"] == str(len(get_body))


@pytest.mark.parametrize("method", ["DELETE", "TRACE", "POST", "PUT", "OPTIONS", "get"])
def test_other_methods_are_405_with_allow(http_worker: WorkerProcess, method: str) -> None:
    status, headers, _ = ask(http_worker.port, method, "/healthz")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    assert headers["connection"] == "close"


@pytest.mark.parametrize("method", ["POST", "HEAD", "get"])
def test_ws_with_another_method_never_upgrades(http_worker: WorkerProcess, method: str) -> None:
    answer = exchange(http_worker.port, (f"{method} /ws?token={token()} HTTP/1.1\r\nHost: t\r\n"
                                         f"{WS_HEADERS}\r\n").encode())
    status, headers, _ = parse(answer)
    assert (status, headers["allow"]) == (405, "GET")
    assert b"101 Switching" not in answer


def test_a_body_is_refused_413_and_the_connection_closes(http_worker: WorkerProcess) -> None:
    status, headers, body = ask(http_worker.port, "GET", "/healthz", "Content-Length: 5\r\n",
                                b"hello")
    assert status == 413  # exchange() returned: the worker closed the connection
    assert headers["connection"] == "close"
    assert body == b"requests to this server have no body\n"


def test_a_body_on_ws_is_refused_before_the_upgrade(http_worker: WorkerProcess) -> None:
    answer = exchange(http_worker.port, (f"GET /ws?token={token()} HTTP/1.1\r\nHost: t\r\n"
                                         f"{WS_HEADERS}Content-Length: 3\r\n\r\nabc").encode())
    assert parse(answer)[0] == 413


@pytest.mark.parametrize(("method", "target", "allow"), [
    ("GET", "/v1/conversions", "POST"),
    ("PUT", "/v1/conversions", "POST"),
    ("DELETE", "/admin/links", "GET, HEAD, POST"),
    ("POST", "/t/some-link", "GET, HEAD"),
])
def test_paths_that_take_a_post_say_so_in_allow(http_worker: WorkerProcess, method: str,
                                                target: str, allow: str) -> None:
    status, headers, _ = ask(http_worker.port, method, target, "Content-Length: 2\r\n", b"{}")
    assert (status, headers["allow"]) == (405, allow)


def test_a_post_body_is_read_whole_or_refused_before_reading(
        http_worker: WorkerProcess) -> None:
    # read whole: the route answers (401 without an operator key), not the parser
    status, headers, _ = ask(http_worker.port, "POST", "/v1/conversions",
                             "Content-Length: 2\r\n", b"{}")
    assert (status, headers["www-authenticate"]) == (401, "Bearer")
    status, _, _ = ask(http_worker.port, "POST", "/v1/conversions",
                       "Content-Length: 16385\r\n", b"x" * 100)
    assert status == 413  # answered without waiting for the 16385 bytes
    assert ask(http_worker.port, "POST", "/v1/conversions")[0] == 411
    # the rules of every other request stand: a GET with a body is still 413
    assert ask(http_worker.port, "GET", "/admin/links", "Content-Length: 2\r\n",
               b"{}")[0] == 413


def test_transfer_encoding_is_501(http_worker: WorkerProcess) -> None:
    status, _, _ = ask(http_worker.port, "GET", "/healthz", "Transfer-Encoding: chunked\r\n",
                       b"5\r\nhello\r\n0\r\n\r\n")
    assert status == 501
    status, _, _ = ask(http_worker.port, "GET", "/healthz",
                       "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"hello")
    assert status == 400


def test_pipelined_requests_get_the_first_answer_and_connection_close(
        http_worker: WorkerProcess) -> None:
    one = b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n"
    for _ in range(20):  # the first answer must arrive every time, not lose a race to a RST
        answer = exchange(http_worker.port, one + one)
        assert answer.count(b"HTTP/1.1 ") == 1, answer
        status, headers, body = parse(answer)
        assert (status, headers["connection"], body) == (200, "close", b"ok\n")


def test_http_1_0_is_served_and_cannot_upgrade(http_worker: WorkerProcess) -> None:
    status, _, body = parse(exchange(http_worker.port, b"GET /healthz HTTP/1.0\r\n\r\n"))
    assert (status, body) == (200, b"ok\n")
    answer = exchange(http_worker.port, (f"GET /ws?token={token()} HTTP/1.0\r\n"
                                         f"{WS_HEADERS}\r\n").encode())
    assert parse(answer)[0] == 505


@pytest.mark.parametrize("raw", [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\nHost: x\n\n",
                                 b"GET / HTTP/2.0\r\n\r\n"])
def test_malformed_requests_get_an_answer(http_worker: WorkerProcess, raw: bytes) -> None:
    assert parse(exchange(http_worker.port, raw))[0] in (400, 505)


async def test_a_websocket_still_opens(http_worker: WorkerProcess) -> None:
    async with connect(http_worker.url + f"?token={token()}") as ws:
        assert orjson.loads(await ws.recv())["type"] == "welcome"
        await ws.send('{"op":"ping","id":1}')
        assert orjson.loads(await ws.recv())["type"] == "pong"


def test_the_worker_logged_no_failure(http_worker: WorkerProcess) -> None:
    assert http_worker.alive()
    assert "Traceback" not in http_worker.log()


# -- GET /v1/snapshot rate limits ---------------------------------------------------------


def snapshot(port: int, topic: str, tok: str | None, forwarded: str | None = None):
    extra = f"Cookie: og_session={tok}\r\n" if tok else ""
    if forwarded:
        extra += f"X-Forwarded-For: {forwarded}\r\n"
    return ask(port, "GET", f"/v1/snapshot?topic={topic}", extra)


def test_a_client_over_its_rate_gets_429_and_others_do_not(worker_factory) -> None:
    worker = worker_factory(OG_SNAPSHOT_RATE_LIMIT_RPS="0.1", OG_SNAPSHOT_RATE_LIMIT_BURST="3")
    p1, p2 = token(player="p1"), token(player="p2")
    assert [snapshot(worker.port, "odds:1:39:1", p1)[0] for _ in range(3)] == [200] * 3
    status, headers, body = snapshot(worker.port, "odds:1:39:1", p1)
    assert status == 429
    assert orjson.loads(body) == {"type": "error", "code": "rate_limited",
                                  "message": "too many snapshot requests from this client; "
                                             "retry later"}
    assert 1 <= int(headers["retry-after"]) <= 10
    assert snapshot(worker.port, "odds:1:39:1", p2)[0] == 200  # the player, not the address


def test_without_a_valid_token_the_address_counts(worker_factory) -> None:
    worker = worker_factory(OG_SNAPSHOT_RATE_LIMIT_RPS="0.1", OG_SNAPSHOT_RATE_LIMIT_BURST="2")
    # From loopback (HAProxy's place), X-Forwarded-For names the client.
    assert [snapshot(worker.port, "odds:1:39:1", None, "198.51.100.1")[0]
            for _ in range(3)] == [401, 401, 429]
    assert snapshot(worker.port, "odds:1:39:1", "forged", "198.51.100.1")[0] == 429
    assert snapshot(worker.port, "odds:1:39:1", None, "198.51.100.2")[0] == 401
    assert snapshot(worker.port, "odds:1:39:1", token(), "198.51.100.1")[0] == 200


async def test_reads_from_redis_are_capped_per_worker(worker_factory, publisher) -> None:
    worker = worker_factory(OG_SNAPSHOT_REDIS_READS_PER_S="1")
    await publisher.publish(PriceUpdate("odds:1:39:7", "1:39:7", "m-7", {"home": "1.5"}))
    cold = ["odds:1:39:2", "odds:1:39:3", "odds:1:39:4"]
    statuses = [snapshot(worker.port, t, token(player=f"cold{i}"))[0] for i, t in enumerate(cold)]
    assert statuses[0] == 200 and 429 in statuses  # one read a second
    status, headers, body = snapshot(worker.port, "odds:1:39:5", token(player="late"))
    if status == 429:  # unless a second passed meanwhile
        assert orjson.loads(body)["code"] == "rate_limited" and int(headers["retry-after"]) >= 1
    # A topic the worker follows is served from memory, whatever Redis' budget.
    async with connect(worker.url + f"?token={token()}") as ws:
        await ws.recv()
        await ws.send('{"op":"subscribe","id":1,"topics":{"odds:1:39:7":null}}')
        while orjson.loads(await ws.recv())["type"] != "snapshot":
            pass
        warm = [snapshot(worker.port, "odds:1:39:7", token(player=f"warm{i}")) for i in range(5)]
        assert [s for s, _, _ in warm] == [200] * 5
        assert orjson.loads(warm[0][2])["markets"][0]["prices"]["home"] == "1.5"


# -- the same through HAProxy ---------------------------------------------------------------


def test_through_haproxy_refusals_arrive_and_forwarded_for_cannot_be_spoofed(
        redis_url: str, tmp_path: Path) -> None:
    node = start_node(redis_url, tmp_path / "node", workers=1,
                      OG_SNAPSHOT_RATE_LIMIT_RPS="0.1", OG_SNAPSHOT_RATE_LIMIT_BURST="2")
    try:
        port = node.frontend_port
        close = "Connection: close\r\n"  # HAProxy would keep the client's connection open
        assert ask(port, "DELETE", "/healthz", close)[0] == 405
        assert ask(port, "GET", "/healthz", close + "Content-Length: 5\r\n", b"hello")[0] == 413
        status, headers, body = ask(port, "HEAD", "/healthz", close)
        assert (status, headers["content-length"], body) == (200, "3", b"")
        # HAProxy appends the real client; a header the client wrote itself is not believed.
        statuses = [ask(port, "GET", "/v1/snapshot?topic=odds:1:39:1",
                        close + f"X-Forwarded-For: 198.51.100.{i}\r\n")[0] for i in range(4)]
        assert statuses == [401, 401, 429, 429]
    finally:
        node.stop()
