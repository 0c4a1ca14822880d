"""What a worker accepts over HTTP, without sockets: the rules (gateway/http.py), the
parser that applies them (gateway/wsprotocol.py), and the snapshot rate limits
(gateway/ratelimit.py)."""

from __future__ import annotations

import pytest
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import CLOSED, OPEN
from websockets.server import ServerProtocol

from gateway.auth import ANONYMOUS, Claims
from gateway.http import (
    ALLOW_PLAIN,
    ALLOW_WS,
    MAX_BODY_BYTES,
    SERVE,
    RequestWithBody,
    judge_request,
    rate_limited,
    request_body,
    response,
    without_body,
)
from gateway.ratelimit import ClientBuckets, client_key
from gateway.wsprotocol import PlayerProtocol

UPGRADE = [("Host", "x"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
           ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]


def judge(method: str = "GET", target: str = "/healthz", version: str = "HTTP/1.1",
          headers: list[tuple[str, str]] | None = None):
    return judge_request(method, target, version, Headers(headers or [("Host", "x")]))


# -- the rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/", "/healthz", "/v1/topics", "/v1/snapshot?topic=t",
                                    "/static/app.js", "http://example.com/healthz"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_get_and_head_without_a_body_are_served(method: str, target: str) -> None:
    assert judge(method, target) == SERVE
    assert judge(method, target, headers=[("Host", "x"), ("Content-Length", "0")]) == SERVE


@pytest.mark.parametrize("method", ["DELETE", "TRACE", "POST", "PUT", "PATCH", "OPTIONS",
                                    "CONNECT", "get", "Get", "head", "PRI"])
def test_other_methods_are_405_with_allow(method: str) -> None:
    verdict = judge(method)
    assert (verdict.status, verdict.allow) == (405, ALLOW_PLAIN) == (405, "GET, HEAD")
    assert verdict.response().headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("method", ["HEAD", "POST", "DELETE", "get"])
def test_ws_takes_get_only_so_no_other_method_upgrades(method: str) -> None:
    verdict = judge(method, "/ws", headers=UPGRADE)
    assert (verdict.status, verdict.allow, verdict.upgrade) == (405, ALLOW_WS, False)
    assert ALLOW_WS == "GET"


def test_a_method_is_judged_before_its_body() -> None:
    assert judge("POST", headers=[("Content-Length", "5")]).status == 405
    assert judge("POST", headers=[("Transfer-Encoding", "chunked")]).status == 405


@pytest.mark.parametrize(("headers", "status"), [
    ([("Content-Length", "5")], 413),
    ([("Content-Length", "5"), ("Content-Length", "5")], 413),
    ([("Content-Length", "5, 5")], 413),
    ([("Content-Length", "abc")], 400),
    ([("Content-Length", "-1")], 400),
    ([("Content-Length", "")], 400),
    ([("Content-Length", "5"), ("Content-Length", "6")], 400),
    ([("Content-Length", "1" * 19)], 400),
    ([("Transfer-Encoding", "chunked")], 501),
    ([("Transfer-Encoding", "gzip, chunked")], 501),
    ([("Transfer-Encoding", "chunked"), ("Content-Length", "0")], 400),
])
def test_a_body_is_refused(headers: list[tuple[str, str]], status: int) -> None:
    assert judge(headers=[("Host", "x"), *headers]).status == status


# -- the paths that take a body (POST /v1/conversions, the admin API) ------------------


@pytest.mark.parametrize("target", ["/v1/conversions", "/admin/links", "/admin/links/abc",
                                    "http://example.com/v1/conversions"])
@pytest.mark.parametrize("length", [0, 1, MAX_BODY_BYTES])
def test_post_with_a_content_length_up_to_16_kib_is_served(target: str, length: int) -> None:
    verdict = judge("POST", target, headers=[("Host", "x"), ("Content-Length", str(length))])
    assert verdict.serve and verdict.body_length == length and not verdict.upgrade
    assert MAX_BODY_BYTES == 16 * 1024


@pytest.mark.parametrize("target", ["/v1/conversions", "/admin/links"])
def test_post_over_16_kib_is_413_before_reading(target: str) -> None:
    verdict = judge("POST", target, headers=[("Content-Length", str(MAX_BODY_BYTES + 1))])
    assert verdict.status == 413
    assert verdict.message == "body over 16384 bytes"


@pytest.mark.parametrize("target", ["/v1/conversions", "/admin/links"])
def test_post_without_content_length_is_411(target: str) -> None:
    assert judge("POST", target).status == 411


@pytest.mark.parametrize(("headers", "status"), [
    ([("Transfer-Encoding", "chunked")], 501),
    ([("Transfer-Encoding", "chunked"), ("Content-Length", "5")], 400),
    ([("Content-Length", "5"), ("Content-Length", "6")], 400),
    ([("Content-Length", "x")], 400),
])
def test_post_bodies_are_framed_by_content_length_only(
        headers: list[tuple[str, str]], status: int) -> None:
    assert judge("POST", "/v1/conversions", headers=headers).status == status


@pytest.mark.parametrize(("method", "target", "allow"), [
    ("GET", "/v1/conversions", "POST"),
    ("HEAD", "/v1/conversions", "POST"),
    ("PUT", "/v1/conversions", "POST"),
    ("post", "/v1/conversions", "POST"),
    ("DELETE", "/admin/links", "GET, HEAD, POST"),
    ("POST", "/t/abc", "GET, HEAD"),
    ("POST", "/v1/conversions/x", "GET, HEAD"),
    ("POST", "/admin", "GET, HEAD"),
])
def test_each_path_says_its_own_allow(method: str, target: str, allow: str) -> None:
    verdict = judge(method, target, headers=[("Content-Length", "2")])
    assert (verdict.status, verdict.allow) == (405, allow)


def test_get_on_the_admin_api_keeps_the_no_body_rule() -> None:
    assert judge("GET", "/admin/links") == SERVE
    assert judge("GET", "/admin/links", headers=[("Content-Length", "3")]).status == 413


def test_transfer_encoding_in_http_1_0_is_faulty_framing() -> None:
    verdict = judge(version="HTTP/1.0", headers=[("Transfer-Encoding", "chunked")])
    assert verdict.status == 400


def test_http_1_0_is_served_but_cannot_upgrade() -> None:
    assert judge(version="HTTP/1.0", headers=[]) == SERVE
    assert judge("HEAD", "/", version="HTTP/1.0", headers=[]) == SERVE
    assert judge("GET", "/ws", version="HTTP/1.0", headers=UPGRADE).status == 505


@pytest.mark.parametrize(("method", "target", "version", "status"), [
    ("GET", "/healthz", "HTTP/2.0", 505),
    ("GET", "/healthz", "HTTP/0.9", 505),
    ("GET", "/healthz", "HTTX/1.1", 400),
    ("GET", "/healthz", "http/1.1", 400),
    ("G(T", "/healthz", "HTTP/1.1", 400),
    ("GET", "healthz", "HTTP/1.1", 400),
    ("GET", "*", "HTTP/1.1", 400),
])
def test_malformed_request_lines(method: str, target: str, version: str, status: int) -> None:
    assert judge(method, target, version).status == status


def test_only_a_websocket_upgrade_to_ws_goes_on_to_frames() -> None:
    assert judge("GET", "/ws", headers=UPGRADE).upgrade
    assert not judge("GET", "/ws").upgrade  # no Upgrade header: a plain request (426 later)
    assert not judge("GET", "/healthz", headers=UPGRADE).upgrade


def test_a_refusal_closes_and_names_the_server() -> None:
    answer = judge("DELETE").response()
    assert answer.status_code == 405
    assert answer.headers["Connection"] == "close"
    assert answer.headers["Server"] == "oddsgate"
    assert int(answer.headers["Content-Length"]) == len(answer.body) > 0


def test_head_keeps_gets_headers_and_drops_the_body() -> None:
    get = response(200, "hello\n")
    head = without_body(get)
    assert (head.status_code, head.body) == (200, b"")
    assert head.headers["Content-Length"] == "6"
    assert head.serialize().endswith(b"\r\n\r\n")


def test_rate_limited_has_the_error_shape_and_retry_after() -> None:
    answer = rate_limited("slow down", 3)
    assert answer.status_code == 429
    assert answer.headers["Retry-After"] == "3"
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.body == b'{"type":"error","code":"rate_limited","message":"slow down"}'


# -- the parser ----------------------------------------------------------------------------


def protocol() -> PlayerProtocol:
    return PlayerProtocol.adopt(ServerProtocol())


def written(proto: ServerProtocol) -> bytes:
    return b"".join(proto.data_to_send())


def test_adopt_replaces_the_class_and_its_parser() -> None:
    plain = ServerProtocol()
    proto = PlayerProtocol.adopt(plain)
    assert proto is plain and type(proto) is PlayerProtocol
    proto.receive_data(b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert written(proto).startswith(b"HTTP/1.1 405 ")  # the new parser read it


def test_pipelined_requests_yield_one_request_and_the_rest_is_dropped() -> None:
    proto = protocol()
    proto.receive_data(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                       b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    [request] = proto.events_received()
    assert (request.method, request.path) == ("GET", "/healthz")
    assert written(proto) == b""  # nothing failed: the answer is still to come
    proto.receive_data(b"more garbage")
    assert proto.events_received() == [] and written(proto) == b""
    proto.send_response(response(200, "ok\n"))
    out = proto.data_to_send()
    assert out[0].startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in out[0]
    assert out[-1] == b""  # then EOF


def test_websockets_own_parser_loses_the_first_answer_to_a_pipelined_request() -> None:
    """Why PlayerProtocol exists: the plain parser reads request 2 as frames and fails."""
    proto = ServerProtocol()
    proto.receive_data(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                       b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert written(proto) == b""  # EOF before any answer
    assert proto.eof_sent


def test_a_refused_request_is_answered_at_once_and_its_body_dropped() -> None:
    proto = protocol()
    proto.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    out = proto.data_to_send()
    assert out[0].startswith(b"HTTP/1.1 413 ") and out[-1] == b""
    assert proto.events_received() == []
    proto.receive_data(b"more body")
    proto.receive_eof()
    assert proto.state is CLOSED


def post(body: bytes, length: int | None = None, target: str = "/v1/conversions") -> bytes:
    n = len(body) if length is None else length
    return (f"POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n").encode() + body


def test_a_post_is_handed_on_with_exactly_its_body() -> None:
    proto = protocol()
    proto.receive_data(post(b'{"a":1}') + b"GET / HTTP/1.1\r\n\r\n")  # then a pipelined one
    [request] = proto.events_received()
    assert isinstance(request, RequestWithBody)
    assert (request.method, request.path, request.body) == ("POST", "/v1/conversions",
                                                           b'{"a":1}')
    assert request_body(request) == b'{"a":1}'
    assert written(proto) == b""  # the route answers, then the connection closes


def test_a_body_arriving_in_pieces_is_waited_for() -> None:
    proto = protocol()
    proto.receive_data(post(b"", length=6))
    assert proto.events_received() == []
    proto.receive_data(b"abc")
    assert proto.events_received() == []
    proto.receive_data(b"def")
    [request] = proto.events_received()
    assert request.body == b"abcdef"


def test_a_peer_gone_mid_body_ends_closed_without_a_request() -> None:
    proto = protocol()
    proto.receive_data(post(b"abc", length=10))
    proto.receive_eof()
    assert proto.events_received() == []
    assert proto.state is CLOSED and proto.data_to_send() == [b""]


def test_a_get_has_no_body_for_the_route() -> None:
    proto = protocol()
    proto.receive_data(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    [request] = proto.events_received()
    assert request_body(request) == b""


@pytest.mark.parametrize(("raw", "status"), [
    (post(b"", length=MAX_BODY_BYTES + 1), b"413"),
    (b"POST /v1/conversions HTTP/1.1\r\nHost: x\r\n\r\n", b"411"),
    (b"POST /healthz HTTP/1.1\r\nContent-Length: 2\r\n\r\nab", b"405"),
])
def test_refused_posts_are_answered_without_reading_the_body(raw: bytes, status: bytes) -> None:
    proto = protocol()
    proto.receive_data(raw)
    assert written(proto).startswith(b"HTTP/1.1 " + status + b" ")
    assert proto.events_received() == []


@pytest.mark.parametrize(("raw", "status"), [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\nHost: x\n\n", b"400"),
    (b"GET /\xff HTTP/1.1\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nbad header\r\n\r\n", b"400"),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", b"414"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
    (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"501"),
])
def test_malformed_heads_get_an_answer(raw: bytes, status: bytes) -> None:
    proto = protocol()
    proto.receive_data(raw)
    assert written(proto).startswith(b"HTTP/1.1 " + status + b" ")


def test_a_peer_gone_mid_head_or_before_the_answer_ends_closed() -> None:
    proto = protocol()
    proto.receive_data(b"GET / HTTP/1.1\r\nHost")
    proto.receive_eof()
    assert proto.state is CLOSED and proto.data_to_send() == [b""]
    proto = protocol()
    proto.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(proto.events_received()) == 1
    proto.receive_eof()
    assert proto.state is CLOSED  # what websockets' connection_lost asserts


def test_an_upgrade_goes_on_to_frames() -> None:
    proto = protocol()
    head = b"GET /ws HTTP/1.1\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in UPGRADE)
    proto.receive_data(head + b"\r\n")
    [request] = proto.events_received()
    assert isinstance(request, Request)
    proto.send_response(proto.accept(request))
    assert written(proto).startswith(b"HTTP/1.1 101 ")
    assert proto.state is OPEN
    frame = Frame(Opcode.TEXT, b'{"op":"ping"}')
    proto.receive_data(frame.serialize(mask=True))
    [got] = proto.events_received()
    assert got.data == b'{"op":"ping"}'


# -- snapshot rate limits -----------------------------------------------------------------


def test_a_client_gets_its_burst_then_a_retry_after() -> None:
    buckets = ClientBuckets(rate=0.5, burst=3, capacity=10)
    assert [buckets.admit("a", 0.0) for _ in range(3)] == [None, None, None]
    assert buckets.admit("a", 0.0) == 2  # one token back at 0.5/s: 2 s
    assert buckets.admit("b", 0.0) is None  # another client has its own bucket
    assert buckets.admit("a", 2.0) is None


def test_the_table_of_buckets_is_bounded_least_recently_seen_first() -> None:
    buckets = ClientBuckets(rate=0.001, burst=1, capacity=2)
    assert buckets.admit("a", 0.0) is None
    assert buckets.admit("b", 0.0) is None
    assert buckets.admit("a", 0.0) is not None  # a is the most recent now
    assert buckets.admit("c", 0.0) is None  # evicts b
    assert len(buckets) == 2
    assert buckets.admit("a", 0.0) is not None  # a kept its empty bucket
    assert buckets.admit("b", 0.0) is None  # b starts again


PLAYER = Claims("p1", "s1", 2e9, None)


@pytest.mark.parametrize(("claims", "peer", "xff", "key"), [
    (PLAYER, "127.0.0.1", ["9.9.9.9"], "player:p1"),
    (None, "203.0.113.7", [], "addr:203.0.113.7"),
    (ANONYMOUS, "203.0.113.7", [], "addr:203.0.113.7"),  # anonymous players share a name
    (None, "127.0.0.1", [], "addr:127.0.0.1"),
    (None, "127.0.0.1", ["198.51.100.1"], "addr:198.51.100.1"),  # HAProxy on loopback
    (None, "::1", ["198.51.100.1"], "addr:198.51.100.1"),
    (None, "127.0.0.1", ["6.6.6.6, 198.51.100.1"], "addr:198.51.100.1"),  # its entry is last
    (None, "127.0.0.1", ["6.6.6.6", "198.51.100.1"], "addr:198.51.100.1"),
    (None, "127.0.0.1", ["not-an-ip"], "addr:127.0.0.1"),
    (None, "203.0.113.7", ["198.51.100.1"], "addr:203.0.113.7"),  # not from loopback: ignored
    (None, "::ffff:203.0.113.7", [], "addr:203.0.113.7"),
    (None, "2001:db8:1:2:aaaa::1", [], "addr:2001:db8:1:2::/64"),
    (None, "2001:db8:1:2:bbbb::9", [], "addr:2001:db8:1:2::/64"),
    (None, None, [], "addr:unknown"),
])
def test_client_key(claims: Claims | None, peer: str | None, xff: list[str], key: str) -> None:
    assert client_key(claims, peer, xff) == key
