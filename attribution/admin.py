"""The worker's admin HTTP API for links, behind `Authorization: Bearer <OG_ADMIN_KEY>`.

| request | answer |
| --- | --- |
| `GET /admin/links` | 200 `{"links":[link, ...]}` sorted by code |
| `POST /admin/links` (a link as JSON) | 201 the link; 400 naming the bad field; 409 taken |
| `POST /admin/links/{code}/pause` or `/resume` | 200 the link; 404 unknown |
| `GET /admin/clicks/timing` | this worker's own time per click (p50/p99), for the bench |
| `GET /admin/webhooks` | 200 `{"endpoints":[row, ...]}` (`webhooks list --json`'s rows) |
| `POST /admin/webhooks` | 201 the new endpoint's row, with `secret` (shown once) |
| `POST /admin/webhooks/{id}/enable`, `/disable`, `/rotate-secret` | 200 the row; 404 |
| `GET /admin/webhooks/dead-letters[/{partner}]` | 200 `{"dead_letters":[...]}` |
| `POST /admin/webhooks/replay` | 200 `{"replayed":[webhook-id, ...]}` |

The webhook calls are `oddsgate webhooks`' own operations (webhooks/
operations.py): `POST /admin/webhooks` takes `{"partner", "url" or
"postback", "events"?}`, replay `{"webhook_id"}` or `{"partner"}`; a
rotation's answer adds `secret` and `overlap_s`; 400 names the bad field.

With OG_ADMIN_KEY empty the whole API answers 404, as if it did not exist:
an unset key must not mean an open door. The key is compared in constant
time. `AdminApi.answer` takes the body as bytes; the worker's request
parsing reads it (gateway/wsprotocol.py).
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable

import orjson
from websockets.datastructures import Headers
from websockets.http11 import Response

from attribution.link_store import AsyncLinkStore, LinkConflict, LinkExists, UnknownLink
from attribution.links import Link, LinkError
from gateway.http import error_response, json_response
from webhooks import operations as hooks
from webhooks.store import HookStore

PREFIX = "/admin/"
_ACTION = re.compile(r"/admin/links/([A-Za-z0-9_-]{1,64})/(pause|resume)")
_HOOK_ACTION = re.compile(r"/admin/webhooks/([A-Za-z0-9_-]{1,64})/(enable|disable|rotate-secret)")
_DEAD = re.compile(r"/admin/webhooks/dead-letters(?:/([A-Za-z0-9_-]{1,32}))?")


def _error(status: int, code: str, message: str, field: str | None = None,
           headers: list[tuple[str, str]] | None = None) -> Response:
    """The worker's `error` shape (gateway/http.py), never cached, plus the bad `field`."""
    return error_response(status, code, message, headers or (), field=field, cache="no-store")


def _ok(status: int, body: dict) -> Response:
    return json_response(status, body, cache="no-store")


class AdminApi:
    def __init__(self, admin_key: str, store: AsyncLinkStore,
                 timing: Callable[[], dict],
                 caught_up: Callable[[Link], Awaitable[None]] | None = None) -> None:
        self._key = admin_key.encode()
        self.store = store
        # Answers wait for this worker's own cache to hold a saved link (LinkSync).
        self.caught_up = caught_up
        self.timing = timing
        # Partner webhooks' endpoints and dead letters, the same operations as the
        # `oddsgate webhooks` CLI (webhooks/operations.py), on the same Redis.
        self.hooks = HookStore(store.client)

    def authorized(self, headers: Headers) -> bool:
        value = headers.get("Authorization") or ""
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self._key)

    async def answer(self, method: str, path: str, headers: Headers, body: bytes) -> Response:
        if not self._key:
            return _error(404, "not_found", "no such endpoint")
        if not self.authorized(headers):
            return _error(401, "unauthorized", "Authorization: Bearer <admin key> required",
                          headers=[("WWW-Authenticate", "Bearer")])
        try:
            if path == "/admin/webhooks" or path.startswith("/admin/webhooks/"):
                return await self._hooks(method, path, body)
            return await self._route(method, path, body)
        except hooks.OperationError as exc:
            return _error(exc.status, "bad_request" if exc.status == 400 else "not_found",
                          str(exc), exc.field)
        except LinkConflict as exc:
            return _error(409, "conflict", str(exc))
        except ConnectionError as exc:
            return _error(503, "unavailable", f"Redis unavailable: {exc}")

    async def _route(self, method: str, path: str, body: bytes) -> Response:
        if path == "/admin/links":
            if method in ("GET", "HEAD"):
                links = await self.store.all()
                return _ok(200, {"links": [links[c].to_dict() for c in sorted(links)]})
            if method == "POST":
                return await self._add(body)
            return _error(405, "method_not_allowed", "GET or POST",
                          headers=[("Allow", "GET, HEAD, POST")])
        if path == "/admin/clicks/timing":
            if method in ("GET", "HEAD"):
                return _ok(200, self.timing())
            return _error(405, "method_not_allowed", "GET only", headers=[("Allow", "GET, HEAD")])
        action = _ACTION.fullmatch(path)
        if action is not None:
            if method != "POST":
                return _error(405, "method_not_allowed", "POST only",
                              headers=[("Allow", "POST")])
            try:
                link = await self.store.set_active(action.group(1), action.group(2) == "resume")
            except UnknownLink as exc:
                return _error(404, "unknown_link", exc.message, "code")
            await self._visible(link)
            return _ok(200, link.to_dict())
        return _error(404, "not_found", "no such endpoint")

    async def _hooks(self, method: str, path: str, body: bytes) -> Response:
        store = self.hooks
        if path == "/admin/webhooks":
            if method in ("GET", "HEAD"):
                return _ok(200, {"endpoints": await hooks.rows(store)})
            if method != "POST":
                return _error(405, "method_not_allowed", "GET or POST",
                              headers=[("Allow", "GET, HEAD, POST")])
            data = _json_object(body)
            if isinstance(data, Response):
                return data
            unknown = set(data) - {"partner", "url", "postback", "events"}
            if unknown:
                return _error(400, "bad_request", f"unknown field {sorted(unknown)[0]!r}",
                              sorted(unknown)[0])
            if not isinstance(data.get("partner"), str):
                return _error(400, "bad_request", "partner: a string is required", "partner")
            events = data.get("events")
            if isinstance(events, list):
                events = ",".join(str(e) for e in events)
            return _ok(201, await hooks.add(store, data["partner"], url=data.get("url"),
                                            postback=data.get("postback"), events=events))
        dead = _DEAD.fullmatch(path)
        if dead is not None:
            if method not in ("GET", "HEAD"):
                return _error(405, "method_not_allowed", "GET only",
                              headers=[("Allow", "GET, HEAD")])
            return _ok(200, {"dead_letters": await hooks.dead_letters(store, dead.group(1))})
        if path == "/admin/webhooks/replay":
            if method != "POST":
                return _error(405, "method_not_allowed", "POST only", headers=[("Allow", "POST")])
            data = _json_object(body)
            if isinstance(data, Response):
                return data
            moved = await hooks.replay(store, data.get("webhook_id"), data.get("partner"))
            return _ok(200, {"replayed": moved})
        action = _HOOK_ACTION.fullmatch(path)
        if action is None:
            return _error(404, "not_found", "no such endpoint")
        if method != "POST":
            return _error(405, "method_not_allowed", "POST only", headers=[("Allow", "POST")])
        endpoint_id, verb = action.groups()
        if verb == "rotate-secret":
            row, secret, overlap = await hooks.rotate_secret(store, endpoint_id)
            return _ok(200, {**row, "secret": secret, "overlap_s": overlap})
        return _ok(200, await hooks.set_enabled(store, endpoint_id, verb == "enable"))

    async def _add(self, body: bytes) -> Response:
        try:
            data = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return _error(400, "bad_request", "the body is not JSON", "body")
        if data is None:
            return _error(400, "bad_request", "a JSON link is required", "body")
        try:
            link = Link.from_dict(data)
        except LinkError as exc:
            return _error(400, "bad_request", exc.message, exc.field)
        try:
            await self.store.add(link)
        except LinkExists as exc:
            return _error(409, "link_exists", exc.message, "code")
        await self._visible(link)
        return _ok(201, link.to_dict())

    async def _visible(self, link: Link) -> None:
        if self.caught_up is not None:
            await self.caught_up(link)


def _json_object(body: bytes) -> dict | Response:
    """The body as a JSON object, or the 400 that says why not."""
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return _error(400, "bad_request", "the body is not JSON", "body")
    if not isinstance(data, dict):
        return _error(400, "bad_request", "a JSON object is required", "body")
    return data
