"""The click listener (gateway/clicklistener.py): its parser without a loop, then a real
worker's listener over raw sockets (keep-alive, pipelining, HTTP/1.0, bad input)."""

from __future__ import annotations

import asyncio
import socket
import time
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

from attribution.recorder import ClickNotRecorded
from attribution.tracking import Answer, Planned, Refusal
from gateway.clicklistener import (
    MAX_FIELDS,
    MAX_HEAD,
    MAX_IN_FLIGHT,
    MAX_LINE,
    BadHead,
    ClickListener,
    Head,
    HeadReader,
    parse_head,
)
from supervisor.embedded_redis import free_port
from tests.test_tracking import ADMIN_KEY, CLICK_KEYS, LINK, admin, records, wait_links_loaded

GET = b"GET /t/spring-24?sub1=a HTTP/1.1\r\nHost: x\r\nUser-Agent: Mozilla/5.0\r\n\r\n"


def read_all(data: bytes) -> list[Head | BadHead]:
    reader = HeadReader()
    reader.feed(data)
    heads = []
    while (head := reader.next()) is not None:
        heads.append(head)
        if isinstance(head, BadHead):
            break
    return heads


# -- the parser, no sockets -----------------------------------------------------------------

def test_a_head_is_read_with_its_fields_whatever_the_case_of_their_names() -> None:
    [head] = read_all(b"GET /t/a?x=1 HTTP/1.1\r\nhost: h\r\nX-Forwarded-For: 1.2.3.4\r\n"
                      b"x-forwarded-for: 5.6.7.8\r\nUSER-AGENT:  ua \r\n\r\n")
    assert isinstance(head, Head)
    assert (head.method, head.target, head.version) == ("GET", "/t/a?x=1", "HTTP/1.1")
    assert head.fields.get("User-Agent") == "ua"
    assert head.fields.get_all("X-Forwarded-For") == ["1.2.3.4", "5.6.7.8"]
    assert head.fields.get("Referer") is None and head.keep_alive and not head.has_body


def test_pipelined_heads_come_out_one_by_one_and_a_split_head_waits_for_its_rest() -> None:
    reader = HeadReader()
    reader.feed(GET + GET + GET[:20])
    assert isinstance(reader.next(), Head) and isinstance(reader.next(), Head)
    assert reader.next() is None and reader.partial
    reader.feed(GET[20:])
    assert isinstance(reader.next(), Head)
    assert reader.next() is None and not reader.partial


def test_empty_lines_before_a_request_line_are_ignored() -> None:
    assert [type(h) for h in read_all(b"\r\n\r\n" + GET)] == [Head]


@pytest.mark.parametrize(("version", "connection", "keep_alive"), [
    ("HTTP/1.1", None, True),
    ("HTTP/1.1", "close", False),
    ("HTTP/1.1", "Keep-Alive, Close", False),
    ("HTTP/1.0", None, False),
    ("HTTP/1.0", "keep-alive", True),
])
def test_keep_alive_follows_the_version_and_the_connection_field(version, connection,
                                                                keep_alive) -> None:
    field = f"Connection: {connection}\r\n" if connection else ""
    [head] = read_all(f"GET /t/a {version}\r\nHost: h\r\n{field}\r\n".encode())
    assert isinstance(head, Head) and head.keep_alive is keep_alive


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /t/a HTTP/1.1\nHost: h\n\n", 400),  # bare LF
    (b"GET /t/a HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", 400),  # bare CR
    (b"GET  /t/a HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET /t/a\r\nHost: h\r\n\r\n", 400),
    (b"GET /t/a HTTP/1.1 x\r\nHost: h\r\n\r\n", 400),
    (b"GET /t/a HTTX/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET /t/a HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    (b"G(T /t/a HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET t/a HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET /t/\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n", 400),
    (b"GET /t/a HTTP/1.1\r\nHost : h\r\n\r\n", 400),  # space before the colon
    (b"GET /t/a HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", 400),  # obs-fold
    (b"GET /t/a HTTP/1.1\r\nno colon\r\n\r\n", 400),
    (b"GET /t/a HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET /t/a HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
    (b"GET /t/a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /t/a HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n", 400),
    (b"GET /t/a HTTP/1.1\r\nHost: h\r\nContent-Length: 1, 2\r\n\r\n", 400),
    (b"GET /t/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
     b"Content-Length: 3\r\n\r\n", 400),
    (b"GET /t/a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET /t/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
])
def test_bad_heads_are_refused_with_their_status(raw, status) -> None:
    [head] = read_all(raw)
    assert isinstance(head, BadHead) and head.status == status, head


def test_a_bare_lf_is_refused_before_the_head_is_complete() -> None:
    reader = HeadReader()
    reader.feed(b"GET /t/a HTTP/1.1\nHost")
    head = reader.next()
    assert isinstance(head, BadHead) and head.status == 400


def test_limits_are_enforced_where_the_bytes_are_parsed() -> None:
    reader = HeadReader()
    reader.feed(b"GET /t/" + b"a" * MAX_LINE)  # no end of line in sight
    assert reader.next() == BadHead(414, "request line too long")
    long_line = b"GET /t/" + b"a" * MAX_LINE + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    assert parse_head(long_line[:-4]).status == 414
    long_field = b"GET /t/a HTTP/1.1\r\nHost: h\r\nX: " + b"v" * MAX_LINE + b"\r\n\r\n"
    assert read_all(long_field)[0].status == 431
    many = b"GET /t/a HTTP/1.1\r\nHost: h\r\n" + b"X: v\r\n" * MAX_FIELDS + b"\r\n"
    assert read_all(many)[0].status == 431
    reader = HeadReader()  # a head that never ends, in lines under the line limit
    reader.feed(b"GET /t/a HTTP/1.1\r\n" + b"X: " + b"v" * 1000 + b"\r\n")
    for _ in range(MAX_HEAD // 1000):
        assert reader.next() is None
        reader.feed(b"X: " + b"v" * 1000 + b"\r\n")
    assert reader.next() == BadHead(431, "request header fields too large")


def test_a_body_is_noticed_so_the_connection_closes_after_the_answer() -> None:
    [head] = read_all(b"POST /t/a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n")
    assert isinstance(head, Head) and head.has_body
    [head] = read_all(b"POST /t/a HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(head, Head) and not head.has_body


# -- a real worker's listener -------------------------------------------------------------

@pytest.fixture
def listener(worker_factory):
    """A worker with its click listener, the link LINK, and the listener's port."""
    port = free_port()
    worker = worker_factory(OG_CLICK_KEYS=CLICK_KEYS, OG_ADMIN_KEY=ADMIN_KEY,
                            OG_CLIENT_HASH_KEY="hash-key", OG_CLICK_PORT=str(port))
    wait_links_loaded(worker)
    assert admin(worker, "POST", "/admin/links", LINK)[0] == 201
    return worker, port


def exchange(port: int, data: bytes, answers: int, timeout: float = 5.0,
             close: bool = False) -> tuple[list[tuple[int, dict[str, str], bytes]], bool]:
    """Send `data` on one connection, read `answers` answers; and whether the server
    closed the connection after them."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if close:
            sock.shutdown(socket.SHUT_WR)
        buffer = b""
        parsed = []
        head_only = [line.startswith(b"HEAD ") for line in data.split(b"\r\n")
                     if line.split(b" ")[0].isupper() and b"HTTP/1." in line]
        while len(parsed) < answers:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                chunk = sock.recv(65536)
                assert chunk, f"closed after {len(parsed)} answers: {buffer!r}"
                buffer += chunk
                continue
            lines = buffer[:end].decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:])
            length = 0 if head_only[len(parsed)] else int(headers["Content-Length"])
            while len(buffer) < end + 4 + length:
                chunk = sock.recv(65536)
                assert chunk
                buffer += chunk
            parsed.append((int(lines[0].split()[1]), headers, buffer[end + 4:end + 4 + length]))
            buffer = buffer[end + 4 + length:]
        sock.settimeout(0.5)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        return parsed, closed


def click_id(headers: dict[str, str]) -> str:
    return parse_qs(urlsplit(headers["Location"]).query)["ogclid"][0]


def test_clicks_are_answered_on_one_kept_alive_connection_and_recorded_first(
        listener, redis_url) -> None:
    _, port = listener
    answers, closed = exchange(port, GET * 3, 3)
    assert not closed
    assert [status for status, _, _ in answers] == [302, 302, 302]
    for _, headers, body in answers:
        assert body == b"" and headers["Cache-Control"] == "no-store"
        assert "Connection" not in headers and headers["Server"] == "oddsgate"
        assert headers["Location"].startswith("https://casino.example/welcome?")
    ids = [click_id(headers) for _, headers, _ in answers]
    recorded = [r["click_id"] for r in records(redis_url)]
    assert sorted(ids) == sorted(recorded) and len(set(ids)) == 3
    assert records(redis_url)[0]["subs"] == {"sub1": "a"}


def test_pipelined_requests_are_answered_in_order(listener) -> None:
    _, port = listener
    requests = [GET, b"GET /t/nope HTTP/1.1\r\nHost: x\r\n\r\n", GET,
                b"HEAD /t/spring-24 HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                b"DELETE /t/spring-24 HTTP/1.1\r\nHost: x\r\n\r\n"] * 5
    answers, closed = exchange(port, b"".join(requests), len(requests))
    assert [status for status, _, _ in answers] == [302, 404, 302, 302, 404, 405] * 5
    assert not closed
    assert orjson.loads(answers[1][2])["code"] == "unknown_link"
    assert answers[3][2] == b"" and int(answers[3][1]["Content-Length"]) == 0
    assert answers[5][1]["Allow"] == "GET, HEAD"


def test_connection_close_and_http_1_0(listener) -> None:
    _, port = listener
    answers, closed = exchange(port, GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
                               + GET, 1)
    assert answers[0][0] == 302 and answers[0][1]["Connection"] == "close" and closed
    answers, closed = exchange(port, b"GET /t/spring-24 HTTP/1.0\r\n\r\n", 1)
    assert answers[0][0] == 302 and answers[0][1]["Connection"] == "close" and closed
    answers, closed = exchange(
        port, b"GET /t/spring-24 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" * 2, 2)
    assert [a[0] for a in answers] == [302, 302] and not closed
    assert answers[1][1]["Connection"] == "keep-alive"


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /t/spring-24 HTTP/1.1\nHost: x\n\n", 400),
    (b"GET /t/" + b"a" * (MAX_LINE + 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /t/spring-24 HTTP/1.1\r\nHost: x\r\n" + b"X: v\r\n" * (MAX_FIELDS + 1) + b"\r\n",
     431),
    (b"GET /t/spring-24 HTTP/3.0\r\nHost: x\r\n\r\n", 505),
    (b"GET http://[::1/t/spring-24 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /t/spring-24 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody", 413),
    (b"POST /t/spring-24 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody", 405),
    (b"GET /t/spring-24 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     501),
])
def test_bad_input_is_answered_then_the_connection_closes_and_the_worker_lives_on(
        listener, raw, status) -> None:
    worker, port = listener
    answers, closed = exchange(port, raw + GET, 1)
    assert answers[0][0] == status and answers[0][1]["Connection"] == "close" and closed
    assert exchange(port, GET, 1)[0][0][0] == 302 and worker.alive


def test_garbage_and_half_heads_do_not_hurt_the_worker(listener) -> None:
    worker, port = listener
    for junk in (b"\x00\xff" * 5000, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                 b"GET /t/spring-24 HTTP/1.1\r\nHost: x\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(5)
            while sock.recv(65536):
                pass
    assert exchange(port, GET, 1)[0][0][0] == 302 and worker.alive


def test_the_client_address_comes_from_x_forwarded_for_behind_loopback(
        listener, redis_url) -> None:
    _, port = listener
    one = GET.replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n")
    other = GET.replace(b"\r\n\r\n", b"\r\nX-Forwarded-For: 198.51.100.1, 203.0.113.8\r\n\r\n")
    exchange(port, one + one + other, 3)
    rows = records(redis_url)
    assert [r["verdict"] for r in rows] == ["ok", "duplicate", "ok"]
    assert rows[0]["ip_hash"] == rows[1]["ip_hash"] != rows[2]["ip_hash"]


def test_an_idle_connection_stays_open_for_the_next_click(listener) -> None:
    _, port = listener
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for _ in range(2):
            sock.sendall(GET)
            assert sock.recv(65536).startswith(b"HTTP/1.1 302 Found\r\n")
            time.sleep(1.5)  # past a sweep of the listener


def test_a_worker_whose_click_port_is_taken_exits_at_once(worker_factory) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="exited with 1") as failed:
            worker_factory(OG_CLICK_KEYS=CLICK_KEYS, OG_CLICK_PORT=str(taken.getsockname()[1]))
        assert time.monotonic() - started < 10
        assert "(clicks)" in str(failed.value)


def test_a_half_closed_client_still_gets_its_answers(listener) -> None:
    _, port = listener
    answers, closed = exchange(port, GET * 2, 2, close=True)
    assert [a[0] for a in answers] == [302, 302] and closed


# -- the listener in this process, with a route whose clicks finish when told -------------

class HeldRoute:
    """A TrackingRoute stand-in: every click waits until the test sets its future."""

    def __init__(self) -> None:
        self.held: list[asyncio.Future] = []

    def begin(self, path, query, method, headers, peer):
        future = asyncio.get_running_loop().create_future()
        self.held.append(future)
        return Planned(future, f"https://dest.example/?n={len(self.held)}", 0)

    def settle(self, planned):
        if planned.recorded.exception() is not None:
            return Refusal(503, "unavailable", "click not recorded; retry").answer()
        return Answer(302, (("Location", planned.location), ("Cache-Control", "no-store")))


async def read_answers(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    heads = []
    for _ in range(count):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        heads.append(head)
    return heads


async def test_answers_leave_in_request_order_whatever_order_clicks_are_recorded_in() -> None:
    route = HeldRoute()
    listener = ClickListener(route)  # type: ignore[arg-type]
    await listener.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(GET * 3)
        while len(route.held) < 3:
            await asyncio.sleep(0.01)
        route.held[2].set_result("ok")
        route.held[1].set_exception(ClickNotRecorded("redis down"))
        await asyncio.sleep(0.05)
        assert not reader._buffer  # nothing may overtake the first answer
        route.held[0].set_result("ok")
        heads = await read_answers(reader, 3)
        assert [h.split(b" ")[1] for h in heads] == [b"302", b"503", b"302"]
        assert b"n=1" in heads[0] and b"n=3" in heads[2]
        writer.close()
    finally:
        await listener.close()


async def test_pipelined_requests_past_the_limit_wait_for_room() -> None:
    route = HeldRoute()
    listener = ClickListener(route)  # type: ignore[arg-type]
    await listener.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(GET * (MAX_IN_FLIGHT + 4))
        await asyncio.sleep(0.2)
        assert len(route.held) == MAX_IN_FLIGHT  # the rest is not even parsed yet
        for future in route.held[:MAX_IN_FLIGHT]:
            future.set_result("ok")
        await read_answers(reader, MAX_IN_FLIGHT)
        while len(route.held) < MAX_IN_FLIGHT + 4:
            await asyncio.sleep(0.01)
        for future in route.held[MAX_IN_FLIGHT:]:
            future.set_result("ok")
        assert len(await read_answers(reader, 4)) == 4
        writer.close()
    finally:
        await listener.close()


async def test_idle_connections_and_slow_heads_are_closed_by_the_sweep() -> None:
    listener = ClickListener(HeldRoute(), idle_s=2.5, head_s=0.5)  # type: ignore[arg-type]
    await listener.start("127.0.0.1", 0)
    try:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", listener.port)
        slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", listener.port)
        slow_writer.write(b"GET /t/a HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        assert await asyncio.wait_for(slow_reader.read(), 2.2) == b""  # closed, no answer
        assert not idle_reader.at_eof()
        assert await asyncio.wait_for(idle_reader.read(), 3) == b""
        idle_writer.close()
        slow_writer.close()
        for _ in range(100):  # our side shut first; the connection ends when theirs does
            if not listener.connections:
                break
            await asyncio.sleep(0.02)
        assert not listener.connections
    finally:
        await listener.close()


async def test_thousands_of_pipelined_requests_in_one_read_are_all_answered() -> None:
    """Refusals are ready at once: the answers must not recurse per batch of requests."""
    listener = ClickListener(HeldRoute())  # type: ignore[arg-type]
    await listener.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        count = 20000
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n" * count)
        heads = await read_answers(reader, count)
        assert len(heads) == count and all(h.startswith(b"HTTP/1.1 404 ") for h in heads)
        writer.close()
    finally:
        await listener.close()


def test_an_absolute_form_target_is_served_by_its_path(listener) -> None:
    _, port = listener
    answers, _ = exchange(port, b"GET http://x.example/t/spring-24?sub1=z HTTP/1.1\r\n"
                                b"Host: x.example\r\n\r\nGET http://x.example/other HTTP/1.1\r\n"
                                b"Host: x.example\r\n\r\n", 2)
    assert [a[0] for a in answers] == [302, 404] and "sub1=z" in answers[0][1]["Location"]
