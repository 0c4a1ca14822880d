"""The worker's plain HTTP endpoints (PROTOCOL.md §6), answered in the handshake.

websockets hands every request to `process_request` before upgrading; these
routes answer there and the connection closes after the response. `/ws`
returns None (go on with the upgrade) once the token checks out, or 401.
"""

from __future__ import annotations

import email.utils
import http
from collections.abc import Iterable

import orjson
from websockets.datastructures import Headers
from websockets.http11 import Response


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


def json_response(status: int, body: bytes | dict, *, cache: str = "no-cache") -> Response:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return response(status, raw, "application/json", [("Cache-Control", cache)])


def error_response(status: int, code: str, message: str) -> Response:
    """Same fields as the WebSocket `error` frame, so clients parse one shape."""
    return json_response(status, {"type": "error", "code": code, "message": message})
