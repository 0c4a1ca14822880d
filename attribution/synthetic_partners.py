"""Synthetic partners for the demo: links, clicks and conversions through the node's front door.

`oddsgate demo` shows the partner dashboard (`/partner/`) with live numbers, so
something has to click tracking links and convert. This module does what real
traffic does, over HTTP only, so it exercises the same code as a partner's
visitors and an operator's back office and knows nothing of how they are built:

- links are created with the worker's admin API (`POST /admin/links`, behind
  OG_ADMIN_KEY), the same store as `oddsgate links add`;
- visitors follow `GET /t/{code}` (PROTOCOL.md §9) and keep the click id the
  302 carries; some come back (duplicates), some are crawlers (bots);
- some visitors register, deposit for the first time, deposit again: each a
  `POST /v1/conversions` (§10) with an operator key this module registers in
  `og:keys` (name -> SHA-256 hex of the key, as the shared contract stores it).

`probe_partners` says, once, whether the node answers `/t/` at all (the demo
prints one line when it does not); `drive_partners` then runs until `stop`.
What to do next is decided by `TrafficPlan`, a plain object that never awaits
(seeded: the same seed, the same visitors); the loop only carries its
requests. HTTP goes through urllib in a thread: a few requests a second, no
redirects followed (the 302's Location is what carries the click id).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import secrets
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import orjson

from attribution.keys import OPERATOR_KEYS  # operator key name -> SHA-256 hex of the key
from redis_contract import target

OPERATOR_KEY_NAME = "demo-partners"
CLICK_PARAM = "ogclid"
LANDING = "https://sportsbook.example/welcome"
HTTP_TIMEOUT_S = 5.0
BOT_AGENT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


@dataclass(frozen=True, slots=True)
class PartnerLink:
    """One tracking link of a synthetic partner."""

    code: str
    partner: str
    campaign: str
    creative: str

    def admin_body(self) -> dict:
        """The link as `POST /admin/links` takes it; sub-ids passed on."""
        return {"code": self.code, "partner": self.partner, "campaign": self.campaign,
                "creative": self.creative, "url": LANDING, "subids": True}


# A few partners with campaigns of one or two creatives, and their weight in the traffic.
LINKS: tuple[tuple[PartnerLink, int], ...] = (
    (PartnerLink("demo-acme-spring-a", "acme", "spring", "banner-a"), 5),
    (PartnerLink("demo-acme-spring-v", "acme", "spring", "video"), 3),
    (PartnerLink("demo-acme-c7-a", "acme", "c7", "banner-a"), 2),
    (PartnerLink("demo-tipster9-derby", "tipster-9", "derby", "post"), 3),
    (PartnerLink("demo-oddsblog-weekend", "oddsblog", "weekend", "sidebar"), 1),
)
PARTNER_IDS: tuple[str, ...] = tuple(dict.fromkeys(link.partner for link, _ in LINKS))


class PartnerTrafficOff(RuntimeError):
    """The node cannot take synthetic partner traffic; the message says why."""


@dataclass(frozen=True, slots=True)
class Click:
    """`GET /t/{code}` (or HEAD, as a link checker asks) with a visitor's user agent."""

    code: str
    user_agent: str
    method: str = "GET"
    visitor: int | None = None  # whose click id to keep; None for bots and repeats
    sub1: str | None = None


@dataclass(frozen=True, slots=True)
class Conversion:
    """`POST /v1/conversions`: one operator event of a visitor who clicked."""

    body: dict


@dataclass
class Visitor:
    number: int
    click_id: str | None = None
    registered: bool = False
    deposits: int = 0


@dataclass
class TrafficPlan:
    """What the synthetic partners' visitors do next, one request at a time.

    Mostly new visitors clicking a link (weighted by the link's popularity);
    some come back to the same link (the node calls it a duplicate), some are
    crawlers or HEAD link checkers (bots). A visitor whose click went through
    may register, then deposit for the first time (ftd), then again: each a
    conversion naming the click id the redirect gave it.
    """

    seed: int = 12
    rng: random.Random = field(init=False)
    visitors: list[Visitor] = field(default_factory=list)
    last_click: dict[int, Click] = field(default_factory=dict)
    sent: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def next(self) -> Click | Conversion:
        roll = self.rng.random()
        converting = [v for v in self.visitors if v.click_id is not None and v.deposits < 3]
        if converting and roll < 0.25:
            return self._conversion(self.rng.choice(converting))
        if self.last_click and roll < 0.33:
            again = self.last_click[self.rng.choice(list(self.last_click))]
            return Click(again.code, again.user_agent)  # the same client and link again
        if roll < 0.41:
            code = self._link().code
            if self.rng.random() < 0.5:
                return Click(code, BOT_AGENT)
            return Click(code, self._agent(len(self.visitors)), method="HEAD")
        visitor = Visitor(len(self.visitors))
        self.visitors.append(visitor)
        click = Click(self._link().code, self._agent(visitor.number), visitor=visitor.number,
                      sub1=f"v{visitor.number}")
        self.last_click[visitor.number] = click
        if len(self.last_click) > 50:
            del self.last_click[next(iter(self.last_click))]
        return click

    def clicked(self, click: Click, click_id: str | None) -> None:
        """The redirect of `click` carried `click_id` (None: no 302, or no id in it)."""
        if click.visitor is not None and click_id is not None:
            self.visitors[click.visitor].click_id = click_id

    def _conversion(self, visitor: Visitor) -> Conversion:
        self.sent += 1
        body: dict = {"id": f"demo-{self.seed}-{self.sent}-{secrets.token_hex(3)}",
                      "click_id": visitor.click_id, "player": f"demo-player-{visitor.number}",
                      "ts": time.time_ns()}
        if not visitor.registered:
            visitor.registered = True
            body["type"] = "registration"
        else:
            body["type"] = "ftd" if visitor.deposits == 0 else "deposit"
            visitor.deposits += 1
            body["amount"] = f"{self.rng.choice((10, 20, 25, 50, 100, 250))}.00"
            body["currency"] = "EUR"
        return Conversion(body)

    def _link(self) -> PartnerLink:
        links, weights = zip(*LINKS, strict=True)
        return self.rng.choices(links, weights)[0]

    def _agent(self, number: int) -> str:
        return (f"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                f"Chrome/131.0 Safari/537.36 demo-visitor/{number}")


# -- HTTP, carried in a thread ---------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs) -> None:
        return None  # the 302 itself is the answer: its Location holds the click id


_OPENER = urllib.request.build_opener(_NoRedirect)


def http_call(method: str, url: str, headers: dict[str, str] | None = None,
              body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request, header names in lower case (HAProxy
    sends them so); 599 with the reason when no answer came back."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _OPENER.open(request, timeout=HTTP_TIMEOUT_S) as resp:
            return resp.status, _lower(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, _lower(exc.headers.items()), exc.read()
    except (urllib.error.URLError, OSError) as exc:
        return 599, {}, str(exc).encode()


def _lower(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in items}


def click_id_of(location: str | None) -> str | None:
    """The click id a 302's Location carries (PROTOCOL.md §9: `ogclid` here)."""
    if not location:
        return None
    values = parse_qs(urlsplit(location).query).get(CLICK_PARAM)
    return values[0] if values else None


def _json(body: dict) -> bytes:
    return orjson.dumps(body)


def _attributed(body: bytes) -> bool:
    """Whether a 202's answer credits a partner (§10: `attributed` not null)."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(answer, dict) and bool(answer.get("attributed"))


async def probe_partners(http_url: str, admin_key: str) -> None:
    """Create the synthetic links and check, once, that `/t/` redirects on this node.

    Raises PartnerTrafficOff saying why not (no admin API, a refused key,
    `/t/` not answered or without click keys). The probe is a HEAD: the node
    records it as a bot click, as it would a link checker's.
    """
    if not admin_key:
        raise PartnerTrafficOff("no admin key (OG_ADMIN_KEY) to create links with")
    headers = {"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"}
    for link, _ in LINKS:
        status, _, body = await asyncio.to_thread(
            http_call, "POST", f"{http_url}/admin/links", headers, _json(link.admin_body()))
        if status not in (201, 409):  # 409: there from an earlier run
            raise PartnerTrafficOff(f"POST /admin/links answered {status} "
                                    f"{body[:120].decode(errors='replace').strip()}")
    code = LINKS[0][0].code
    status, headers_back, _ = await asyncio.to_thread(
        http_call, "HEAD", f"{http_url}/t/{code}", {"User-Agent": "oddsgate-demo-probe"})
    if status != 302 or click_id_of(headers_back.get("location")) is None:
        raise PartnerTrafficOff(f"GET /t/{code} answered {status}, not a redirect with a "
                                "click id")


async def register_operator_key(redis_url: str) -> str:
    """A fresh operator key for the demo's conversions, its hash stored in og:keys."""
    key = secrets.token_urlsafe(32)
    client = target.async_client(redis_url)
    try:
        digest = hashlib.sha256(key.encode()).hexdigest()
        await client.hset(OPERATOR_KEYS, OPERATOR_KEY_NAME, digest)
    finally:
        await client.aclose()
    return key


@dataclass
class TrafficCounts:
    """What the synthetic partners did, by what the node answered."""

    clicks: int = 0
    conversions: int = 0
    attributed: int = 0
    answers: Counter = field(default_factory=Counter)  # "GET /t 302" -> count


async def drive_partners(http_url: str, redis_url: str, stop: asyncio.Event, *,
                         rate: float = 4.0, seed: int = 12,
                         counts: TrafficCounts | None = None) -> TrafficCounts:
    """Click and convert at about `rate` requests a second until `stop` is set.

    Call `probe_partners` first: this assumes the links exist. A request the
    node refuses is counted in `counts.answers` and the traffic goes on (a
    worker restarting in the demo must not end it).
    """
    counts = counts if counts is not None else TrafficCounts()
    operator_key = await register_operator_key(redis_url)
    conversion_headers = {"Authorization": f"Bearer {operator_key}",
                          "Content-Type": "application/json"}
    plan = TrafficPlan(seed)
    pause = 1.0 / rate if rate > 0 else 1.0
    while not stop.is_set():
        action = plan.next()
        if isinstance(action, Click):
            query = f"?sub1={action.sub1}" if action.sub1 else ""
            status, headers, _ = await asyncio.to_thread(
                http_call, action.method, f"{http_url}/t/{action.code}{query}",
                {"User-Agent": action.user_agent})
            counts.clicks += 1
            counts.answers[f"{action.method} /t {status}"] += 1
            plan.clicked(action, click_id_of(headers.get("location")) if status == 302 else None)
        else:
            status, _, body = await asyncio.to_thread(
                http_call, "POST", f"{http_url}/v1/conversions", conversion_headers,
                _json(action.body))
            counts.conversions += 1
            counts.answers[f"POST /v1/conversions {status}"] += 1
            if status == 202 and _attributed(body):
                counts.attributed += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)
    return counts
