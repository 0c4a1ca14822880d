"""attribution.synthetic_partners: the demo's partner traffic, against a fake node.

The links, clicks and conversions endpoints are built by other parts of issue
12; here a small HTTP server plays them as PROTOCOL.md §9/§10 and the admin
API describe them, and records what the synthetic partners send, so what is
checked is the traffic itself: requests as the protocol wants them, click ids
carried from the redirect into conversions, the operator key stored as its
SHA-256 in og:keys, and one clear reason when the node cannot take it.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
import redis

from attribution.synthetic_partners import (
    LINKS,
    OPERATOR_KEY_NAME,
    OPERATOR_KEYS,
    PARTNER_IDS,
    Click,
    Conversion,
    PartnerTrafficOff,
    TrafficCounts,
    TrafficPlan,
    click_id_of,
    drive_partners,
    probe_partners,
)

ADMIN_KEY = "admin-key-for-tests"


class FakeNode(http.server.ThreadingHTTPServer):
    """`/admin/links`, `/t/{code}` and `/v1/conversions` as the protocol describes them."""

    daemon_threads = True

    def __init__(self, *, tracking: bool = True) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.links: dict[str, dict] = {}
        self.clicks = 0
        node = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, status: int, body: bytes = b"",
                        headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _record(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                node.requests.append((self.command, self.path, dict(self.headers), body))
                return body

            def do_GET(self) -> None:
                self._record()
                path = urlsplit(self.path).path
                if tracking and path.startswith("/t/") and path[3:] in node.links:
                    node.clicks += 1
                    self._answer(302, headers={
                        "Location": f"https://sportsbook.example/welcome?ogclid=CLK{node.clicks}",
                        "Cache-Control": "no-store"})
                else:
                    self._answer(404, b"not found\n")

            do_HEAD = do_GET

            def do_POST(self) -> None:
                body = self._record()
                path = urlsplit(self.path).path
                if path == "/admin/links" and tracking:
                    if self.headers.get("Authorization") != f"Bearer {ADMIN_KEY}":
                        self._answer(401)
                        return
                    link = orjson.loads(body)
                    status = 409 if link["code"] in node.links else 201
                    node.links.setdefault(link["code"], link)
                    self._answer(status, body)
                elif path == "/v1/conversions" and tracking:
                    conv = orjson.loads(body)
                    attributed = {"partner": "acme", "campaign": "spring", "creative": "video"}
                    self._answer(202, orjson.dumps({"conversion_id": "cv" + conv["id"],
                                                    "attributed": attributed}))
                else:
                    self._answer(405 if path != "/admin/links" else 404)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def node() -> Iterator[FakeNode]:
    server = FakeNode()
    yield server
    server.shutdown()
    server.server_close()


def test_plan_mixes_new_visitors_repeats_bots_and_conversions() -> None:
    plan = TrafficPlan(seed=5)
    actions = []
    for _ in range(600):
        action = plan.next()
        actions.append(action)
        if isinstance(action, Click):
            plan.clicked(action, f"id-{len(actions)}" if action.visitor is not None else None)
    clicks = [a for a in actions if isinstance(a, Click)]
    conversions = [a.body for a in actions if isinstance(a, Conversion)]
    agents = [c.user_agent for c in clicks if c.visitor is not None]
    assert len(set(agents)) == len(agents)  # every new visitor is a new client
    assert any(c.visitor is None and c.user_agent in agents for c in clicks)  # came back
    assert any("Googlebot" in c.user_agent for c in clicks)
    assert any(c.method == "HEAD" for c in clicks)
    codes = {link.code for link, _ in LINKS}
    assert {c.code for c in clicks} == codes
    assert {c.sub1 for c in clicks if c.visitor is not None} >= {"v0"}
    # Conversions (§10): only for a visitor whose click went through, in order.
    known = {f"id-{i + 1}" for i, a in enumerate(actions) if isinstance(a, Click)}
    by_click: dict[str, list[str]] = {}
    for body in conversions:
        assert body["click_id"] in known
        assert isinstance(body["ts"], int) and body["ts"] > 1_700_000_000 * 10**9
        if body["type"] == "registration":
            assert set(body) == {"id", "click_id", "type", "player", "ts"}
        else:
            assert set(body) == {"id", "click_id", "type", "player", "ts", "amount", "currency"}
            assert body["currency"] == "EUR" and body["amount"].endswith(".00")
        by_click.setdefault(body["click_id"], []).append(body["type"])
    assert len({b["id"] for b in conversions}) == len(conversions)
    for types in by_click.values():
        assert types[0] == "registration"
        assert types[1:2] in ([], ["ftd"]) and set(types[2:]) <= {"deposit"}
    assert {"registration", "ftd", "deposit"} <= {b["type"] for b in conversions}


def test_the_same_seed_plans_the_same_visitors() -> None:
    one, two = TrafficPlan(seed=9), TrafficPlan(seed=9)
    assert [one.next() for _ in range(50)] == [two.next() for _ in range(50)]


def test_click_id_of_a_location() -> None:
    assert click_id_of("https://x.example/a?b=1&ogclid=ABC") == "ABC"
    assert click_id_of("https://x.example/a?b=1") is None
    assert click_id_of(None) is None


async def test_probe_creates_the_links_and_checks_the_redirect(node) -> None:
    await probe_partners(node.url, ADMIN_KEY)
    assert set(node.links) == {link.code for link, _ in LINKS}
    assert {link["partner"] for link in node.links.values()} == set(PARTNER_IDS)
    assert all(link["subids"] is True and link["url"].startswith("https://")
               for link in node.links.values())
    assert [r[0] for r in node.requests if r[1].startswith("/t/")] == ["HEAD"]
    await probe_partners(node.url, ADMIN_KEY)  # an earlier run's links (409) are fine


async def test_probe_says_why_partner_traffic_is_off(node) -> None:
    with pytest.raises(PartnerTrafficOff, match="no admin key"):
        await probe_partners(node.url, "")
    with pytest.raises(PartnerTrafficOff, match="401"):
        await probe_partners(node.url, "wrong")
    bare = FakeNode(tracking=False)  # a node without the attribution edge
    try:
        with pytest.raises(PartnerTrafficOff, match="POST /admin/links answered 404"):
            await probe_partners(bare.url, ADMIN_KEY)
    finally:
        bare.shutdown()
        bare.server_close()


async def test_drive_clicks_and_converts_with_the_redirects_click_ids(node, redis_url) -> None:
    await probe_partners(node.url, ADMIN_KEY)
    node.requests.clear()
    stop = asyncio.Event()
    counts = TrafficCounts()
    task = asyncio.create_task(drive_partners(node.url, redis_url, stop, rate=1000.0, seed=4,
                                              counts=counts))
    while counts.conversions < 5 and not task.done():
        await asyncio.sleep(0.02)
    stop.set()
    assert await asyncio.wait_for(task, 10) is counts

    with redis.Redis.from_url(redis_url) as client:
        stored = client.hget(OPERATOR_KEYS, OPERATOR_KEY_NAME).decode()
    posts = [r for r in node.requests if r[1] == "/v1/conversions"]
    assert len(posts) == counts.conversions >= 5
    given = {f"CLK{i}" for i in range(1, node.clicks + 1)}
    for _, _, headers, body in posts:
        key = headers["Authorization"].removeprefix("Bearer ")
        assert hashlib.sha256(key.encode()).hexdigest() == stored
        assert headers["Content-Type"] == "application/json"
        assert orjson.loads(body)["click_id"] in given  # taken from a 302's Location
    clicks = [r for r in node.requests if r[1].startswith("/t/")]
    assert len(clicks) == counts.clicks
    assert all(r[2]["User-Agent"] for r in clicks)
    assert any(parse_qs(urlsplit(r[1]).query).get("sub1") for r in clicks)
    assert counts.attributed == counts.conversions
    assert counts.answers["GET /t 302"] > 0
