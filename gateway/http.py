"""The worker's plain HTTP endpoints (PROTOCOL.md §6), answered in the handshake.

websockets hands every request to `process_request` before upgrading; these
routes answer there and the connection closes after the response. `/ws`
returns None (go on with the upgrade) once the token checks out, or 401.

Before that, the request head is judged here (`judge_request`, asked by the
parser in gateway/wsprotocol.py): websockets' own parser takes any method as
GET and drops requests with a body without a word, so the rules of what a
worker serves live in one plain function. The few paths that take a body
(POST /v1/conversions, the admin API under /admin/) are named here too
(`allowed_methods`), so the parser knows how many bytes to read before any
route runs.
"""

from __future__ import annotations

import email.utils
import http
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from gateway.errors import ErrorCode


def response(
    status: int,
    body: bytes | str,
    content_type: str = "text/plain; charset=utf-8",
    headers: Iterable[tuple[str, str]] = (),
) -> Response:
    raw = body.encode() if isinstance(body, str) else body
    status_obj = http.HTTPStatus(status)
    all_headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(raw))),
            ("Content-Type", content_type),
            *headers,
        ]
    )
    return Response(status_obj.value, status_obj.phrase, all_headers, raw)


def json_response(status: int, body: bytes | dict, *, cache: str = "no-cache",
                  headers: Iterable[tuple[str, str]] = ()) -> Response:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return response(status, raw, "application/json", [("Cache-Control", cache), *headers])


def error_response(status: int, code: str, message: str,
                   headers: Iterable[tuple[str, str]] = (), *, field: str | None = None,
                   cache: str = "no-cache") -> Response:
    """Same fields as the WebSocket `error` frame, so clients parse one shape; `field`
    names the bad field of a request body (admin API, conversions)."""
    body: dict = {"type": "error", "code": code, "message": message}
    if field is not None:
        body["field"] = field
    return json_response(status, body, cache=cache, headers=headers)


def rate_limited(message: str, retry_after_s: int) -> Response:
    """429 in the `error` shape, code `rate_limited` as on the WebSocket, with Retry-After."""
    return error_response(429, ErrorCode.RATE_LIMITED, message,
                          headers=[("Retry-After", str(retry_after_s))])


# -- what a worker accepts over HTTP/1.x (README: "HTTP on a worker") --------------------

WS_PATH = "/ws"
SERVER_HEADER = "oddsgate"
ALLOW_PLAIN = "GET, HEAD"
ALLOW_WS = "GET"  # a HEAD cannot upgrade, so /ws answers GET only
# The operator's back office posts conversions (PROTOCOL.md §10); nothing reads them back here.
CONVERSIONS_PATH = "/v1/conversions"
ALLOW_CONVERSIONS = "POST"
# The admin HTTP API (attribution links): reads with GET, changes with POST.
ADMIN_PREFIX = "/admin/"
ALLOW_ADMIN = "GET, HEAD, POST"
# Methods whose request carries content a route reads (RFC 9110 §9.3.3).
BODY_METHODS = frozenset({"POST"})
# The largest body read (PROTOCOL.md §10: 413 over 16 KiB). A conversion is a few
# hundred bytes, a link under 3 KB; a bound keeps a worker's memory per
# connection small whatever a client announces.
MAX_BODY_BYTES = 16 * 1024

_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2: method names
_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]")
_DIGITS = re.compile(r"[0-9]{1,18}")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with a request head, decided before any route sees it.

    `status` 0 means serve it: then `upgrade` says whether it asks for a
    WebSocket (frames may follow on the connection) or is plain HTTP (the
    connection carries this one request and closes after its answer).
    Otherwise the request is refused with `status`, and `allow` is the
    `Allow` header of a 405.
    """

    status: int = 0
    message: str = ""
    allow: str | None = None
    upgrade: bool = False
    body_length: int = 0  # bytes of content to read before the route runs (a POST's)

    @property
    def serve(self) -> bool:
        return self.status == 0

    def response(self) -> Response:
        """The refusal as it goes on the wire (Connection: close, like every answer)."""
        extra = [("Server", SERVER_HEADER)]
        if self.allow is not None:
            extra.append(("Allow", self.allow))
        return response(self.status, self.message + "\n", headers=extra)


SERVE = Verdict()
SERVE_UPGRADE = Verdict(upgrade=True)


def allowed_methods(path: str) -> str:
    """The `Allow` of a path: the one table of which method goes where."""
    if path == WS_PATH:
        return ALLOW_WS
    if path == CONVERSIONS_PATH:
        return ALLOW_CONVERSIONS
    if path.startswith(ADMIN_PREFIX):
        return ALLOW_ADMIN
    return ALLOW_PLAIN


def judge_request(method: str, target: str, version: str, headers: Headers) -> Verdict:
    """Serve or refuse one request head, without sockets (the parser asks this).

    The worker serves GET and HEAD without a body, one request per
    connection, and POST with a body of at most MAX_BODY_BYTES on the paths
    that take one (`allowed_methods`). Order matters: a malformed head is 400
    whatever it asks; a method the target does not allow is 405 before any
    look at a body (its body is never read either way). Method names are
    case-sensitive (RFC 9110 §9.1): `get` is not GET. Transfer-Encoding next
    to Content-Length is ambiguous framing (the request-smuggling shape) and
    HTTP/1.0 has no transfer codings, so both are 400; otherwise a transfer
    coding is 501, as RFC 9112 §6.1 asks of a server that does not implement
    it: a body comes with a Content-Length or not at all. A POST without one
    is 411 (RFC 9110 §15.5.12), since the length is what lets the worker
    refuse an oversized body before reading it. A Content-Length over what
    the method takes (none for GET and HEAD, MAX_BODY_BYTES for POST) is
    413: the request is well framed, its content is just larger than this
    server takes, and the connection closes instead of reading it.
    HTTP/1.0 is served for plain requests; the WebSocket upgrade needs
    HTTP/1.1 (RFC 6455 §4.1), so /ws over 1.0 is 505, as websockets itself
    answers.
    """
    if not _VERSION.fullmatch(version):
        return Verdict(400, "bad request line")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        return Verdict(505, "HTTP/1.1 or HTTP/1.0 only")
    if not _TOKEN.fullmatch(method):
        return Verdict(400, "bad request method")
    path = _target_path(target)
    if path is None:
        return Verdict(400, "bad request target")
    allow = allowed_methods(path)
    if method not in allow.split(", "):
        return Verdict(405, f"{method[:16]} not allowed here; {allow} only", allow)
    takes_body = method in BODY_METHODS
    if "Transfer-Encoding" in headers:
        if "Content-Length" in headers:
            return Verdict(400, "both Transfer-Encoding and Content-Length")
        if version == "HTTP/1.0":
            return Verdict(400, "Transfer-Encoding in an HTTP/1.0 request")
        return Verdict(501, "transfer codings are not implemented; send a Content-Length"
                       if takes_body else
                       "transfer codings are not implemented; requests have no body")
    lengths = {part.strip() for value in headers.get_all("Content-Length")
               for part in value.split(",")}
    length = 0
    framed = bool(lengths)
    if lengths:
        if len(lengths) > 1 or not all(_DIGITS.fullmatch(v) for v in lengths):
            return Verdict(400, "bad Content-Length")
        length = int(lengths.pop())
    if takes_body:
        if not framed:
            return Verdict(411, f"{method} needs a Content-Length")
        if length > MAX_BODY_BYTES:
            return Verdict(413, f"body over {MAX_BODY_BYTES} bytes")
        return Verdict(body_length=length)
    if length > 0:
        return Verdict(413, "requests to this server have no body")
    if path == WS_PATH:
        if version != "HTTP/1.1":
            return Verdict(505, "the WebSocket upgrade needs HTTP/1.1")
        if any("websocket" in value.lower() for value in headers.get_all("Upgrade")):
            return SERVE_UPGRADE
    return SERVE


def _target_path(target: str) -> str | None:
    """The path of an origin-form or absolute-form target (RFC 9112 §3.2); None if neither."""
    if target.startswith("/"):
        return urlsplit(target).path
    if target.startswith(("http://", "https://")):
        return urlsplit(target).path or "/"
    return None


@dataclass
class RequestWithBody(Request):
    """websockets' handshake Request, plus the content of a POST.

    websockets' Request has no body ("isn't useful in the context of this
    library"); the parser (gateway/wsprotocol.py) reads exactly the
    Content-Length that `judge_request` admitted and hands it on here.
    """

    body: bytes = b""


def request_body(request: Request) -> bytes:
    """The content a request carried: empty for a GET, a HEAD, or a bodiless POST."""
    return request.body if isinstance(request, RequestWithBody) else b""


def without_body(answer: Response) -> Response:
    """The answer to HEAD: GET's status and headers (Content-Length included), no body."""
    return Response(answer.status_code, answer.reason_phrase, answer.headers, b"")
