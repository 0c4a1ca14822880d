"""`GET /t/{code}`: a tracking link's redirect, its click recorded first (PROTOCOL.md §9).

`plan_click` decides without awaiting: the refusal (404 unknown, 410
paused, 503 not ready) or the click to record, with its fresh click id
and everything the record holds. `TrackingRoute.answer` is the shell:
it records the click (attribution/recorder.py, shared round trips) and
only then answers 302; when Redis does not record it, 503. Method rules
(405 with `Allow: GET, HEAD`) are the parser's (gateway/http.py), and a
HEAD's answer loses its body in the worker, like every HEAD.

Every answer says `Cache-Control: no-store`: a cached 302 would send a
second visit to the first click's id without recording it, and a cached
404 would outlive the link's creation.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from websockets.datastructures import Headers
from websockets.http11 import Response

from attribution import clickid
from attribution.clicks import Click
from attribution.linkcache import LinkCache
from attribution.links import CODE
from attribution.recorder import ClickNotRecorded, ClickRecorder
from attribution.settings import AttributionSettings, ClickKeys
from attribution.verdicts import client_hash, is_bot
from gateway.http import json_response, response

log = logging.getLogger("oddsgate.clicks")

PREFIX = "/t/"
NO_STORE = ("Cache-Control", "no-store")
MAX_HEADER = 512  # user agent and referer are cut to this in the record
SAMPLES = 20_000


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    code: str
    message: str

    def response(self) -> Response:
        return json_response(self.status, {"type": "error", "code": self.code,
                                           "message": self.message}, cache="no-store")


NOT_READY = Refusal(503, "unavailable", "tracking links are not available on this worker now")


def plan_click(path: str, query: dict[str, list[str]], method: str, headers: Headers,
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

    async def answer(self, path: str, query: dict[str, list[str]], method: str,
                     headers: Headers, peer: str | None) -> Response:
        started = time.perf_counter_ns()
        planned = plan_click(path, query, method, headers, peer, cache=self.cache,
                             keys=self.keys, hash_secret=self.hash_secret)
        if isinstance(planned, Refusal):
            return planned.response()
        click, location = planned
        spent = time.perf_counter_ns() - started
        try:
            await self.recorder.record(click)
        except ClickNotRecorded as exc:
            log.warning("%s", exc)
            return Refusal(503, "unavailable", "click not recorded; retry").response()
        resumed = time.perf_counter_ns()
        answer = response(302, b"", headers=[("Location", location), NO_STORE])
        self.server_ns.append(spent + time.perf_counter_ns() - resumed)
        return answer

    def timing(self) -> dict:
        """p50/p99/max of the worker's own time per click, in microseconds."""
        samples = sorted(self.server_ns)
        if not samples:
            return {"clicks": 0}

        def at(share: float) -> float:
            return round(samples[min(len(samples) - 1, int(share * len(samples)))] / 1000, 1)

        return {"clicks": len(samples), "p50_us": at(0.5), "p99_us": at(0.99),
                "max_us": round(samples[-1] / 1000, 1)}
