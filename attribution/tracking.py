"""`GET /t/{code}`: a tracking link's redirect, its click recorded first (PROTOCOL.md §9).

`plan_click` decides without awaiting: the refusal (404 unknown, 410
paused, 503 not ready) or the click to record, with its fresh click id
and everything the record holds. `TrackingRoute` is the shell: `begin`
plans and hands the click to the recorder (attribution/recorder.py,
shared round trips), `settle` turns the recorder's reply into the answer,
302 only for a recorded click and 503 when Redis did not record it. An
`Answer` is plain (status, headers, body), so both servers of `/t/` write
the same one: the worker's port through websockets (`TrackingRoute.answer`,
`Answer.response`) and the lean click listener (gateway/clicklistener.py),
which calls `begin` and `settle` from callbacks, with no task per click.
Method rules (405 with `Allow: GET, HEAD`) are each server's parser's
(gateway/http.py, gateway/clicklistener.py), and a HEAD's answer loses
its body there, like every HEAD.

Every answer says `Cache-Control: no-store`: a cached 302 would send a
second visit to the first click's id without recording it, and a cached
404 would outlive the link's creation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import orjson
from websockets.http11 import Response

from attribution import clickid
from attribution.clicks import Click
from attribution.linkcache import LinkCache
from attribution.links import CODE
from attribution.recorder import ClickNotRecorded, ClickRecorder
from attribution.settings import AttributionSettings, ClickKeys
from attribution.verdicts import client_hash, is_bot
from gateway.http import response

log = logging.getLogger("oddsgate.clicks")

PREFIX = "/t/"
NO_STORE = ("Cache-Control", "no-store")
MAX_HEADER = 512  # user agent and referer are cut to this in the record
SAMPLES = 20_000


class Fields(Protocol):
    """The request's header fields, as websockets' `Headers` reads them (names in any case)."""

    def get(self, name: str) -> str | None: ...

    def get_all(self, name: str) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer of `/t/`, whichever server writes it: the framing headers (Date,
    Content-Length, Connection) are that server's to add."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"

    def response(self) -> Response:
        """As the worker's port answers it (websockets; Connection: close)."""
        return response(self.status, self.body, self.content_type, self.headers)


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    code: str
    message: str

    def answer(self) -> Answer:
        """The `error` shape of the WebSocket, never cached."""
        return Answer(self.status, (NO_STORE,),
                      orjson.dumps({"type": "error", "code": self.code,
                                    "message": self.message}), "application/json")

    def response(self) -> Response:
        return self.answer().response()


NOT_READY = Refusal(503, "unavailable", "tracking links are not available on this worker now")


def plan_click(path: str, query: dict[str, list[str]], method: str, headers: Fields,
               peer: str | None, *, cache: LinkCache, keys: ClickKeys | None,
               hash_secret: bytes | None, now_ns: Callable[[], int] = time.time_ns,
               ) -> tuple[Click, str] | Refusal:
    """The click to record and its Location, or the refusal."""
    code = path[len(PREFIX):]
    if not CODE.fullmatch(code):
        return Refusal(404, "unknown_link", "no such tracking link")
    if keys is None or hash_secret is None or not cache.loaded:
        return NOT_READY
    link = cache.get(code)
    if link is None:
        return Refusal(404, "unknown_link", f"no tracking link {code!r}")
    if not link.active:
        return Refusal(410, "paused_link", f"tracking link {code!r} is paused")
    click_id = clickid.mint(keys)
    user_agent = (headers.get("User-Agent") or "")[:MAX_HEADER]
    click = Click(
        click_id=click_id, code=code, partner=link.partner, campaign=link.campaign,
        creative=link.creative, ts=now_ns(), subs=link.subs(query),
        ip_hash=client_hash(hash_secret, peer, headers.get_all("X-Forwarded-For")),
        ua=user_agent, referer=(headers.get("Referer") or "")[:MAX_HEADER],
        bot=is_bot(method, user_agent, headers.get),
    )
    return click, link.destination(click_id, query)


@dataclass(slots=True)
class Planned:
    """A click handed to the recorder: what `settle` needs once Redis has answered."""

    recorded: asyncio.Future[str]
    location: str
    spent_ns: int  # the worker's own time so far (planning)


NOT_RECORDED = Refusal(503, "unavailable", "click not recorded; retry")


class TrackingRoute:
    """The shell of `/t/{code}`: plan, record, answer."""

    def __init__(self, settings: AttributionSettings, cache: LinkCache,
                 recorder: ClickRecorder) -> None:
        self.cache = cache
        self.recorder = recorder
        self.keys = settings.keys
        self.hash_secret = settings.client_hash_secret()
        # The worker's own time per answered click (ns): planning and the answer, not
        # the wait for Redis. The latest ones, for the bench (GET /admin/clicks/timing).
        self.server_ns: deque[int] = deque(maxlen=SAMPLES)

    def begin(self, path: str, query: dict[str, list[str]], method: str, headers: Fields,
              peer: str | None) -> Answer | Planned:
        """The refusal, or the click planned and handed to the recorder (no await)."""
        started = time.perf_counter_ns()
        planned = plan_click(path, query, method, headers, peer, cache=self.cache,
                             keys=self.keys, hash_secret=self.hash_secret)
        if isinstance(planned, Refusal):
            return planned.answer()
        click, location = planned
        recorded = self.recorder.submit(click)
        return Planned(recorded, location, time.perf_counter_ns() - started)

    def settle(self, planned: Planned) -> Answer:
        """The answer once the recorder's future is done: 302 if the click is in Redis."""
        resumed = time.perf_counter_ns()
        exc = planned.recorded.exception()
        if exc is not None:
            log.warning("%s", exc)
            return NOT_RECORDED.answer()
        answer = Answer(302, (("Location", planned.location), NO_STORE))
        self.server_ns.append(planned.spent_ns + time.perf_counter_ns() - resumed)
        return answer

    async def answer(self, path: str, query: dict[str, list[str]], method: str,
                     headers: Fields, peer: str | None) -> Response:
        """The answer as websockets writes it (the worker's own port)."""
        begun = self.begin(path, query, method, headers, peer)
        if isinstance(begun, Answer):
            return begun.response()
        with contextlib.suppress(ClickNotRecorded):  # settle reads it from the future
            await begun.recorded
        return self.settle(begun).response()

    def timing(self) -> dict:
        """p50/p99/max of the worker's own time per click, in microseconds."""
        samples = sorted(self.server_ns)
        if not samples:
            return {"clicks": 0}

        def at(share: float) -> float:
            return round(samples[min(len(samples) - 1, int(share * len(samples)))] / 1000, 1)

        return {"clicks": len(samples), "p50_us": at(0.5), "p99_us": at(0.99),
                "max_us": round(samples[-1] / 1000, 1)}
