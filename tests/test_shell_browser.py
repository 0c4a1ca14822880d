"""The player shell in a real browser: headless Debian Chromium, a real worker, real Redis.

Playwright drives /usr/bin/chromium (installed by scripts/bootstrap.sh; no
browser is ever downloaded) with a fresh profile per test. The page is served
by a worker subprocess (`worker_factory`), prices are published with the
aggregator's `Publisher`, and what the page holds is read both from
`window.oddsgate` (the JS client's state and its §5 violation count) and from
the DOM (what a player sees). Timings are reported, not asserted.

Without /usr/bin/chromium the module is skipped, unless CI is set: there the
bootstrap installs it, so a missing browser is a failure.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import random
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import redis.asyncio as aioredis
from websockets.datastructures import Headers

from client.odds import BACKOFF_BASE_S, BACKOFF_CAP_S, RegionRing
from client.rules import RuleChecker
from feed.events import PriceUpdate
from feed.publisher import Publisher
from gateway.static import StaticSite
from gateway.topics import PartitionMap
from redis_contract import history_key, latest_key, meta_key
from supervisor.embedded_redis import EmbeddedRedis, free_port
from tests.conftest import ROOT, start_worker, token
from tests.region_harness import TwinFeed

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = ROOT / "tests" / "artifacts"

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip("no /usr/bin/chromium (scripts/bootstrap.sh installs it; with CI set this fails)",
                allow_module_level=True)
try:
    from playwright.async_api import BrowserContext, Page, async_playwright
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("playwright is not installed (pip install -e '.[dev]')", allow_module_level=True)

MARKET_TOPIC = "odds:1:39:1"  # market-level: one market, home/draw/away
LEAGUE_TOPIC = "odds:5:8"  # league-level: many markets on one topic
WAIT_MS = 15_000


# -- fixtures and helpers --------------------------------------------------------


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # a fresh user-data dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1120, "height": 660},
        )
        try:
            yield context
        finally:
            await context.close()


class PageErrors:
    """Uncaught exceptions and console errors of a page (a CSP refusal is one)."""

    def __init__(self, page: Page) -> None:
        self.uncaught: list[str] = []
        self.console: list[str] = []
        page.on("pageerror", lambda exc: self.uncaught.append(str(exc)))
        page.on("console",
                lambda msg: self.console.append(msg.text) if msg.type == "error" else None)


def update(topic: str, market: int, prices: dict[str, str], status: str = "open") -> PriceUpdate:
    sport, league, *own = topic.split(":")[1:]
    market = int(own[0]) if own else market
    return PriceUpdate(topic, f"{sport}:{league}:{market}", f"m-{sport}-{league}-{market}",
                       prices, status)


def _random_prices(rng: random.Random, topic: str) -> dict[str, str]:
    outcomes = ("home", "draw", "away") if topic.startswith("odds:1:") else ("home", "away")
    return {o: f"{rng.uniform(1.05, 9.5):.2f}" for o in outcomes}


async def churn(publisher: Publisher, topics: list[str], count: int, rng: random.Random,
                markets: int = 6, chunk: int = 20) -> None:
    """`count` random price moves over `topics`, published in pipelined chunks."""
    for start in range(0, count, chunk):
        batch = []
        for _ in range(min(chunk, count - start)):
            topic = rng.choice(topics)
            batch.append(update(topic, rng.randrange(1, markets + 1),
                                _random_prices(rng, topic)))
        await publisher.publish_many(batch)


async def redis_view(redis_url: str, topic: str) -> tuple[str, int, dict[str, dict]]:
    """(epoch, seq, market -> {seq, status, prices}): what the page must end up showing."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        epoch, seq = await client.hmget(meta_key(topic), "epoch", "seq")
        latest = {k.decode(): orjson.loads(v) for k, v in
                  (await client.hgetall(latest_key(topic))).items()}
    finally:
        await client.aclose()
    markets = {m: {"seq": e["seq"], "status": e["status"], "prices": e["prices"]}
               for m, e in latest.items()}
    return epoch.decode(), int(seq), markets


SHOWN_JS = """(topic) => {
  const out = {};
  const rows = document.querySelectorAll(`section[data-topic="${topic}"] .mkt[data-market]`);
  for (const row of rows) {
    const prices = {};
    for (const px of row.querySelectorAll(".px")) {
      prices[px.dataset.outcome] = px.querySelector(".v").textContent;
    }
    out[row.dataset.market] = {seq: Number(row.dataset.seq), status: row.dataset.status, prices};
  }
  return out;
}"""

# True once the page's client holds `seq` of every topic and the DOM shows, per
# market, the seq expected: the screen has caught up, not just the socket.
CAUGHT_UP_JS = """(want) => {
  const og = window.oddsgate;
  if (!og) return false;
  const topics = og.topics;
  for (const [topic, [seq, markets]] of Object.entries(want)) {
    if (!topics[topic] || topics[topic].seq !== seq) return false;
    for (const [market, mseq] of Object.entries(markets)) {
      const row = document.querySelector(
        `section[data-topic="${topic}"] .mkt[data-market="${market}"]`);
      if (!row || Number(row.dataset.seq) !== mseq) return false;
    }
  }
  return true;
}"""


async def shown(page: Page, topic: str) -> dict[str, dict]:
    return await page.evaluate(SHOWN_JS, topic)


async def wait_caught_up(page: Page, redis_url: str, topics: list[str]) -> None:
    want = {}
    for topic in topics:
        _, seq, markets = await redis_view(redis_url, topic)
        want[topic] = [seq, {m: v["seq"] for m, v in markets.items()}]
    await page.wait_for_function(CAUGHT_UP_JS, arg=want, timeout=WAIT_MS, polling=50)


async def assert_shows_newest(page: Page, redis_url: str, topics: list[str]) -> None:
    """Exactly the newest price of every market, on screen and in the client's state."""
    state = await page.evaluate("window.oddsgate.topics")
    for topic in topics:
        epoch, seq, markets = await redis_view(redis_url, topic)
        assert await shown(page, topic) == markets, topic
        assert (state[topic]["epoch"], state[topic]["seq"]) == (epoch, seq)
        assert {m: v["seq"] for m, v in state[topic]["markets"].items()} == \
            {m: v["seq"] for m, v in markets.items()}


async def open_shell(page: Page, worker, topics: list[str] | None, *,
                     with_token: bool = True) -> None:
    query = []
    if with_token:
        query.append(f"token={token()}")
    if topics:
        query.append("topics=" + ",".join(topics))
    await page.goto(f"{worker.http}/?{'&'.join(query)}")
    await wait_js(page, "() => window.oddsgate !== undefined")


async def wait_js(page: Page, predicate: str, arg: Any = None) -> None:
    """Poll `predicate`, which must be a function: the page's CSP forbids eval, which
    Playwright would use to poll a bare expression."""
    await page.wait_for_function(predicate, arg=arg, timeout=WAIT_MS, polling=50)


# -- the page ----------------------------------------------------------------------


async def test_page_shows_the_snapshot_then_a_live_price(worker, publisher, redis_url,
                                                         browser) -> None:
    await publisher.publish_many([
        update(MARKET_TOPIC, 1, {"home": "1.85", "draw": "3.40", "away": "4.20"}),
        update(MARKET_TOPIC, 1, {"home": "1.90", "draw": "3.40", "away": "4.10"}),
        update(LEAGUE_TOPIC, 1, {"home": "1.50", "away": "2.60"}),
        update(LEAGUE_TOPIC, 2, {"home": "2.05", "away": "1.80"}),
        update(LEAGUE_TOPIC, 3, {"home": "3.10", "away": "1.38"}, status="suspended"),
        update(LEAGUE_TOPIC, 4, {"home": "1.22", "away": "4.40"}, status="closed"),
    ])
    page = await browser.new_page()
    errors = PageErrors(page)
    script_responses: list[dict[str, str]] = []
    page.on("response", lambda r: script_responses.append(r.headers)
            if "/static/" in r.url else None)
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    sent = sent_frames(page)
    topics = [MARKET_TOPIC, LEAGUE_TOPIC]
    await open_shell(page, worker, topics)

    # The snapshot, on screen.
    await wait_caught_up(page, redis_url, topics)
    await assert_shows_newest(page, redis_url, topics)
    assert await page.get_attribute("#conn", "data-state") == "connected"
    assert await page.get_attribute('[data-market="5:8:3"]', "data-status") == "suspended"
    assert await page.inner_text('[data-market="5:8:4"] .badge') == "CLOSED"

    # Then live: a price published now appears, with its flash direction.
    await publisher.publish_many([
        update(MARKET_TOPIC, 1, {"home": "2.15", "draw": "3.25", "away": "3.70"}),
        update(LEAGUE_TOPIC, 2, {"home": "1.95", "away": "1.90"}),
    ])
    home = f'section[data-topic="{MARKET_TOPIC}"] [data-market="1:39:1"] [data-outcome="home"]'
    await page.wait_for_function(
        "(sel) => document.querySelector(sel + ' .v').textContent === '2.15'",
        arg=home, timeout=WAIT_MS, polling=50)
    assert await page.get_attribute(home, "data-dir") == "up"
    await wait_caught_up(page, redis_url, topics)
    await assert_shows_newest(page, redis_url, topics)

    og = await page.evaluate("window.oddsgate")
    assert og["violations"] == 0, og["violationList"]
    assert (og["status"], og["resumes"], og["resets"]) == ("connected", 0, 0)
    # index.html's bootstrap opened the one socket, before the module even started.
    assert og["earlySocket"] == "adopted"
    assert len(sockets) == 1 and sockets[0].startswith(f"{worker.url}?token=ey"), sockets
    assert og["timings"]["ws-created"] < og["timings"]["script"]
    # One subscribe, whether the bootstrap sent it (welcome first) or the client did.
    assert sent == [[{"op": "subscribe", "id": 1,
                      "topics": {MARKET_TOPIC: None, LEAGUE_TOPIC: None}}]], sent
    assert og["latencyMs"] is not None
    assert re.fullmatch(r"latency \d+ ms", await page.inner_text("#latency"))
    assert script_responses and script_responses[0]["cache-control"] == \
        "public, max-age=31536000, immutable"
    assert errors.uncaught == [] and errors.console == []
    print(f"\nshell timings (ms since navigation): {og['timings']}; "
          f"publish-to-screen {og['latencyMs']:.1f} ms")

    # One more move so that a flash is on screen, then the artifact.
    await publisher.publish(update(LEAGUE_TOPIC, 1, {"home": "1.44", "away": "2.75"}))
    await page.wait_for_function(
        "() => document.querySelector('[data-market=\"5:8:1\"] [data-outcome=home] .v')"
        ".textContent === '1.44'", timeout=WAIT_MS, polling=50)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "shell.png"))


async def test_cookie_token_default_topics_and_cached_script(worker, browser, pmap) -> None:
    """The host page's og_session cookie; no topics= parameter; a second visit."""
    await browser.add_cookies([{"name": "og_session", "value": token(), "url": worker.http}])
    page = await browser.new_page()
    errors = PageErrors(page)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(urlsplit(r.url).path))
    await open_shell(page, worker, None, with_token=False)
    expected = list(dict.fromkeys([
        *sorted(pmap.high_value),
        *(f"odds:{s}:{min(lg for sp, lg in pmap.market_level if sp == s)}:1"
          for s in sorted(pmap.sports) if any(sp == s for sp, _ in pmap.market_level)),
    ]))[:6]
    assert await page.evaluate("window.oddsgate.wanted") == expected
    await wait_js(page, """(topics) => topics.every(
        (t) => window.oddsgate.topics[t] && window.oddsgate.topics[t].hasBase)""", expected)
    assert await page.evaluate("window.oddsgate.violations") == 0
    # The bootstrap's socket (no token: the cookie) and its one GET /v1/topics are used.
    assert await page.evaluate("window.oddsgate.earlySocket") == "adopted"
    assert requests.count("/v1/topics") == 1, requests

    # Again: the HTML is revalidated, the immutable script comes from the cache.
    await page.goto(page.url)
    await wait_js(page, "() => window.oddsgate && window.oddsgate.status === 'connected'")
    transfer = await page.evaluate("""() => performance.getEntriesByType('resource')
        .filter((e) => e.name.includes('/static/app.')).map((e) => e.transferSize)""")
    assert transfer == [0]
    assert errors.uncaught == [] and errors.console == []


async def hold_script(page: Page, http: str) -> asyncio.Future:
    """Hold app.js back until the returned future is done: what the bootstrap does before
    the module runs is then what a slow network shows."""
    release = asyncio.get_running_loop().create_future()

    async def handle(route) -> None:
        await release
        await route.continue_()

    await page.route(lambda url: url.startswith(http + "/static/"), handle)
    return release


class NoWorkerYet(http.server.ThreadingHTTPServer):
    """What a player meets while no worker is up behind HAProxy: the page (as a worker
    serves it), and 503 for the WebSocket handshake."""

    daemon_threads = True

    def __init__(self, port: int) -> None:
        site = StaticSite.load()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path == "/ws":
                    self.send_error(503)
                    return
                resp = site.respond(path, Headers())
                self.send_response(resp.status_code)
                for name, value in resp.headers.raw_items():
                    if name.lower() not in ("date", "connection"):
                        self.send_header(name, value)
                self.end_headers()
                self.wfile.write(resp.body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", port), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def sent_frames(page: Page) -> list[list[dict]]:
    """What the page sends, pings aside, per WebSocket it opens, as they go."""
    sent: list[list[dict]] = []

    def on_socket(ws) -> None:
        frames: list[dict] = []
        sent.append(frames)

        def on_sent(payload: str | bytes) -> None:
            frame = orjson.loads(payload)
            if frame.get("op") != "ping":
                frames.append(frame)

        ws.on("framesent", on_sent)

    page.on("websocket", on_socket)
    return sent


async def test_frames_before_the_script_are_replayed(worker, publisher, redis_url,
                                                     browser) -> None:
    """The bootstrap's socket gets its welcome, subscribes and gets the snapshots, all
    before app.js has arrived: the client adopts the socket, takes the request over and
    plays what was buffered, in order; it does not subscribe again."""
    topics = [MARKET_TOPIC, LEAGUE_TOPIC, MARKET_TOPIC]  # a repeat is asked for once
    await churn(publisher, topics, 30, random.Random(7))
    page = await browser.new_page()
    errors = PageErrors(page)
    sent = sent_frames(page)
    release = await hold_script(page, worker.http)
    await page.goto(f"{worker.http}/?token={token()}&topics={','.join(topics)}",
                    wait_until="commit")
    await wait_js(page, """() => !!window.__ogEarly && window.__ogEarly.frames
        .filter((f) => JSON.parse(f).type === "snapshot").length === 2""")
    buffered = await page.evaluate("window.__ogEarly.frames.map((f) => JSON.parse(f).type)")
    assert buffered[:2] == ["welcome", "subscribed"], buffered
    release.set_result(None)
    await wait_caught_up(page, redis_url, topics)
    await assert_shows_newest(page, redis_url, topics)
    og = await page.evaluate("window.oddsgate")
    assert (og["earlySocket"], og["status"], og["violations"]) == ("adopted", "connected", 0)
    assert og["stats"]["connections"] == 1 and og["stats"]["snapshots"] == 2
    assert og["wanted"] == [MARKET_TOPIC, LEAGUE_TOPIC]
    assert og["timings"]["snapshot"] >= og["timings"]["script"]
    assert await page.evaluate("window.oddsgate.client.pending.size") == 0  # answered
    assert sent == [[{"op": "subscribe", "id": 1,
                      "topics": {MARKET_TOPIC: None, LEAGUE_TOPIC: None}}]]
    assert await page.evaluate("window.__ogEarly") is None  # taken over, not kept
    assert errors.uncaught == [] and errors.console == []


async def test_early_socket_unreachable_then_the_client_connects(worker_factory, publisher,
                                                                 redis_url, browser) -> None:
    """No worker listens when the bootstrap opens its socket: it has failed by the time
    app.js runs, and the client goes on as after any failed attempt: it reconnects."""
    topics = [MARKET_TOPIC]
    await churn(publisher, topics, 10, random.Random(8))
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    page = await browser.new_page()
    errors = PageErrors(page)
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    release = await hold_script(page, origin)
    placeholder = NoWorkerYet(port)
    try:
        await page.goto(f"{origin}/?token={token()}&topics={MARKET_TOPIC}", wait_until="commit")
        await wait_js(page, "() => !!window.__ogEarly && window.__ogEarly.closed !== null")
    finally:
        placeholder.shutdown()
        placeholder.server_close()
    worker_factory(OG_PORT=str(port))  # then app.js comes from it
    release.set_result(None)
    await wait_caught_up(page, redis_url, topics)
    await assert_shows_newest(page, redis_url, topics)
    og = await page.evaluate("window.oddsgate")
    assert (og["earlySocket"], og["status"], og["violations"]) == ("closed", "connected", 0)
    assert og["stats"]["connections"] == 1
    states = [(s["state"], s["detail"]) for s in og["statusLog"]]
    assert states[:2] == [("connecting", ""), ("reconnecting", "unreachable")], states
    assert len(sockets) == 2 and sockets[0] == sockets[1], sockets
    assert errors.uncaught == []  # the console has the failed socket's error


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_page_resumes_after_its_worker_restarts(worker_factory, publisher, redis_url,
                                                      browser, how) -> None:
    """Stopped (close 1012) or killed (the socket just drops): the page resumes."""
    rng = random.Random(3)
    topics = [MARKET_TOPIC, LEAGUE_TOPIC]
    await churn(publisher, topics, 40, rng)
    worker = worker_factory()
    page = await browser.new_page()
    errors = PageErrors(page)
    await open_shell(page, worker, topics)
    await wait_caught_up(page, redis_url, topics)
    await churn(publisher, topics, 200, rng)  # live traffic, in batches

    if how == "kill":
        worker.proc.kill()
        worker.proc.wait()
    else:
        worker.stop()
    # The indicator counts down to each attempt while the worker is away.
    await wait_js(page, """() => window.oddsgate.status === 'reconnecting'
        && /^reconnecting in \\d+ ms$/.test(document.querySelector('#conn').innerText)""")
    await churn(publisher, topics, 120, rng)  # missed while down: replayed on resume
    worker_factory(OG_PORT=str(worker.port))
    await wait_js(page, "() => window.oddsgate.resumes >= 1")
    await churn(publisher, topics, 100, rng)

    await wait_caught_up(page, redis_url, topics)
    await assert_shows_newest(page, redis_url, topics)
    og = await page.evaluate("window.oddsgate")
    assert og["violations"] == 0, og["violationList"]
    assert og["resets"] == 0
    assert og["stats"]["snapshots"] == len(topics)  # resumed by replay, not a new snapshot
    states = [s["state"] for s in og["statusLog"]]
    assert states.index("reconnecting") < states.index("resumed"), states
    assert og["status"] == "resumed"
    assert errors.uncaught == []


async def test_reset_replaces_the_view_with_the_snapshot(worker_factory, publisher, redis_url,
                                                         browser) -> None:
    rng = random.Random(4)
    topic = LEAGUE_TOPIC
    await churn(publisher, [topic], 30, rng)
    worker = worker_factory()
    page = await browser.new_page()
    errors = PageErrors(page)
    await open_shell(page, worker, [topic])
    await wait_caught_up(page, redis_url, [topic])
    before = await page.evaluate("window.oddsgate.topics")

    worker.stop()
    await wait_js(page, "() => window.oddsgate.status === 'reconnecting'")
    # History no longer reaches the page's resume point: the worker must reset it.
    await churn(publisher, [topic], 5, rng)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.xtrim(history_key(topic), maxlen=1, approximate=False)
    finally:
        await client.aclose()
    await churn(publisher, [topic], 25, rng, markets=8)  # markets 7 and 8 appear
    worker_factory(OG_PORT=str(worker.port))
    await wait_js(page, "() => window.oddsgate.resets >= 1")

    await wait_caught_up(page, redis_url, [topic])
    await assert_shows_newest(page, redis_url, [topic])
    og = await page.evaluate("window.oddsgate")
    assert og["violations"] == 0, og["violationList"]
    assert (og["resets"], og["status"], og["stats"]["snapshots"]) == (1, "reset", 2)
    assert og["statusLog"][-1]["detail"] == f"{topic}: window"
    assert og["topics"][topic]["seq"] > before[topic]["seq"]
    assert errors.uncaught == []


# -- regions (PROTOCOL.md §8) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def other_region_redis(tmp_path_factory) -> Any:
    """Region B's Redis; region A's is the suite's (`redis_url`)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis-b"), port=0).start()
    yield server
    server.stop()


async def test_page_fails_over_to_the_next_region_and_shows_it(redis_url, other_region_redis,
                                                              tmp_path, browser) -> None:
    """Two regions (a worker each, its own Redis, the same events byte for byte); the
    page, served by A with ?regions=A,B, follows prices in A; A stops: the page moves
    to B (A refuses the reconnect), resumes without reset, and says so."""
    redis_b = aioredis.Redis.from_url(other_region_redis.url)
    await redis_b.flushall()
    await redis_b.aclose()
    port_a, port_b = free_port(), free_port()
    origins = f"ws://127.0.0.1:{port_a} ws://127.0.0.1:{port_b}"  # the CSP's connect-src
    a = start_worker(redis_url, tmp_path, 0, OG_PORT=str(port_a), OG_SHELL_CONNECT_SRC=origins,
                     OG_REGION="a")
    b = start_worker(other_region_redis.url, tmp_path, 1, OG_PORT=str(port_b),
                     OG_SHELL_CONNECT_SRC=origins, OG_REGION="b")
    twin = TwinFeed([redis_url, other_region_redis.url])
    try:
        rng = random.Random(11)
        topics = [MARKET_TOPIC, LEAGUE_TOPIC]

        async def prices(count: int) -> None:
            for _ in range(count):
                topic = rng.choice(topics)
                await twin.publish_many([update(topic, rng.randrange(1, 6),
                                                _random_prices(rng, topic))])

        await twin.publish_many([update(t, m, _random_prices(rng, t))
                                 for t in topics for m in range(1, 6)])
        page = await browser.new_page()
        errors = PageErrors(page)
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        await page.goto(f"{a.http}/?token={token()}&topics={','.join(topics)}"
                        f"&regions={a.url},{b.url}")
        await wait_js(page, "() => window.oddsgate !== undefined")
        await wait_caught_up(page, redis_url, topics)
        og = await page.evaluate("window.oddsgate")
        where = og["region"] or f"127.0.0.1:{port_a}"  # the welcome's name, else the host
        assert await page.inner_text("#region") == f"region {where} · 0 failovers"
        assert og["regionUrl"].startswith(f"{a.url}?token=ey")
        assert og["earlySocket"] == "adopted" and sockets == [og["regionUrl"]]
        await prices(40)

        a.stop()  # drains: `reconnect`, close 1012; the reconnect to A is refused
        await prices(40)  # missed while moving: B replays them
        await wait_js(page, "() => window.oddsgate.failovers === 1 && window.oddsgate.resumes >= 1")
        await prices(40)  # live in B
        await wait_caught_up(page, other_region_redis.url, topics)
        await assert_shows_newest(page, other_region_redis.url, topics)

        og = await page.evaluate("window.oddsgate")
        assert og["regionUrl"].startswith(f"{b.url}?token=ey")
        where = og["region"] or f"127.0.0.1:{port_b}"
        assert await page.inner_text("#region") == f"region {where} · 1 failover"
        assert og["violations"] == 0, og["violationList"]
        assert (og["resets"], og["stats"]["snapshots"], og["status"]) == (0, 2, "resumed")
        assert og["stats"]["connectFailures"] >= 1  # A, refusing, before B
        assert sockets[-1] == og["regionUrl"]
        await page.screenshot(path=str(ARTIFACTS / "shell-failover.png"))
        assert errors.uncaught == []
        print(f"\nfailover status log: {[(s['state'], s['detail']) for s in og['statusLog']]}")
    finally:
        await twin.aclose()
        a.stop()
        b.stop()


async def test_regions_the_csp_does_not_allow_are_passed_over(worker, publisher, redis_url,
                                                             browser) -> None:
    """?regions= entries the operator did not list in OG_SHELL_CONNECT_SRC: the browser
    blocks them (Chromium with no close event), and the page goes on to the next region
    at once, the bootstrap's socket (first region) and the client's (second) alike."""
    await churn(publisher, [MARKET_TOPIC], 10, random.Random(13))
    page = await browser.new_page()
    errors = PageErrors(page)
    blocked = [f"ws://127.0.0.1:{free_port()}/ws" for _ in range(2)]
    await page.goto(f"{worker.http}/?token={token()}&topics={MARKET_TOPIC}"
                    f"&regions={blocked[0]},{blocked[1]},{worker.url}")
    await wait_js(page, "() => window.oddsgate !== undefined")
    await wait_caught_up(page, redis_url, [MARKET_TOPIC])
    og = await page.evaluate("window.oddsgate")
    assert [url.split("?")[0] for url in og["regions"]] == [*blocked, worker.url]
    assert og["regionUrl"].startswith(f"{worker.url}?token=ey")
    assert (og["status"], og["violations"], og["failovers"]) == ("connected", 0, 0)
    assert (og["earlySocket"], og["stats"]["connectFailures"]) == ("closed", 2)
    # Given up on the CSP's refusal, not after the 10 s wait for a welcome.
    log = og["statusLog"]
    assert log[-1]["state"] == "connected" and log[-1]["at"] - log[0]["at"] < 10_000, log
    assert sum("Content Security Policy" in line for line in errors.console) == 2
    assert errors.uncaught == []


# -- the JS client against the Python one --------------------------------------------------

T, U = "odds:1:39:1", "odds:1:40"
E1, E2 = "r1-20261122", "r2-20261123"


def _ev(seq: int, market: str = "a", *, topic: str = T, epoch: str = E1, **extra: Any) -> dict:
    return {"type": "odds", "topic": topic, "epoch": epoch, "seq": seq, "market": market,
            "event_id": f"m-{market}", "ts": 1763800000123456789 + seq, "status": "open",
            "prices": {"home": f"1.{seq:02d}"}, **extra}


def _welcome(n: int = 1) -> dict:
    return {"type": "welcome", "conn": f"c{n}", "node": "h", "worker": 0, "heartbeat_ms": 15000}


def _subscribed(*topics: str) -> dict:
    return {"type": "subscribed", "id": 1, "topics": list(topics)}


def _snapshot(seq: int, markets: list[dict], *, topic: str = T, epoch: str = E1) -> dict:
    return {"type": "snapshot", "topic": topic, "epoch": epoch, "seq": seq, "markets": markets}


def _opening(seq: int = 2) -> list[dict]:
    return [_welcome(), _subscribed(T), _snapshot(seq, [_ev(seq - 1, "a"), _ev(seq, "b")])]


def _batch(*events: dict) -> dict:
    return {"type": "batch", "events": list(events)}


RESET = {"type": "reset", "topic": T, "reason": "window"}

# Streams in which each rule of client/rules.py fires (or must not).
HAND_STREAMS: list[list[dict]] = [
    [*_opening(), _ev(3), _ev(4, "c"), _batch(_ev(5), _ev(6, "b"))],
    [_welcome(), _subscribed(T), _snapshot(0, []), _ev(1)],
    [*_opening(), _ev(4, "b", coalesced=True), _ev(5)],
    [*_opening(), _ev(3), _welcome(2), _subscribed(T), _ev(4), _batch(_ev(6, coalesced=True))],
    [*_opening(9), RESET, _snapshot(3, [_ev(3, epoch=E2)], epoch=E2), _ev(4, epoch=E2)],
    [*_opening(9), RESET, _snapshot(4, [_ev(4)]), _ev(5)],
    [*_opening(), _ev(3), _snapshot(7, [_ev(6), _ev(7, "b")]), _ev(8)],
    [{"$expect_resume": [T, E1, 40]}, _welcome(), _subscribed(T), _ev(41), _ev(42)],
    [*_opening(), _ev(3), _ev(4), _welcome(2), {"$expect_resume": [T, E1, 2]}, _subscribed(T),
     _ev(3), _ev(4)],
    [*_opening(9), _welcome(2), {"$expect_snapshot": T}, _subscribed(T), _snapshot(5, [_ev(5)])],
    [_welcome(), {"$expect_snapshot": U},
     {"type": "error", "id": 1, "code": "shed", "topics": [U]}, _subscribed()],
    [*_opening(), _ev(3), _ev(3)],
    [*_opening(), _ev(4), _ev(3)],
    [*_opening(), _ev(5, "b", coalesced=True), _ev(4, "b")],
    [*_opening(), _ev(3), _welcome(2), {"$expect_resume": [T, E1, 3]}, _subscribed(T), _ev(3)],
    [*_opening(5), _snapshot(6, [_ev(2, "a"), _ev(6, "c")])],
    [*_opening(5), _snapshot(4, [])],
    [*_opening(), _ev(4)],
    [*_opening(), _ev(3), _welcome(2), _subscribed(T), _ev(6)],
    [_welcome(), _ev(1)],
    [_welcome(), {"$expect_snapshot": T}, _ev(1), _subscribed(T), _ev(1)],
    [*_opening(), _welcome(2), _ev(3)],
    [*_opening(), RESET, _ev(3)],
    [*_opening(), {"type": "unsubscribed", "id": 2, "topics": [T]}, _ev(3)],
    [_welcome(), _snapshot(1, []), {"type": "reset", "topic": T}],
    [*_opening(), _ev(3, epoch=E2)],
    [*_opening(), _snapshot(4, [], epoch=E2)],
    [_welcome(), _subscribed(T), _snapshot(2, [_ev(3), _ev(1, epoch=E2)])],
    [*_opening(), {"type": "odds", "topic": T, "seq": 3}, {**_ev(4), "seq": "4"},
     {"type": "reset"}, {"type": "snapshot", "topic": T}, _snapshot(5, [{"market": 3, "seq": 1}])],
    [*_opening(), _ev(3, topic=U), {"type": "pong", "id": 3, "ts": 1}],
]


def _random_stream(rng: random.Random) -> list[dict]:
    """A delivery §5 allows (skips only superseded events, flags gaps, may resume),
    then sometimes broken the way a buggy server would."""
    n = rng.randint(1, 30)
    markets = [f"1:39:{rng.randrange(rng.randint(1, 4))}" for _ in range(n)]
    published = [_ev(i + 1, m) for i, m in enumerate(markets)]
    last_of = {m: i + 1 for i, m in enumerate(markets)}
    base = rng.randrange(n)
    held = {e["market"]: e for e in published[:base]}
    received, last = [], base
    for event in published[base:]:
        if last_of[event["market"]] > event["seq"] and rng.random() < 0.4:
            continue
        copy = dict(event)
        if event["seq"] != last + 1:
            copy["coalesced"] = True
        received.append(copy)
        last = event["seq"]
    mutation = rng.choice(["none", "none", "swap", "dup", "unflag", "drop", "epoch"])
    if mutation == "swap" and len(received) >= 2:
        i, j = sorted(rng.sample(range(len(received)), 2))
        received[i], received[j] = received[j], received[i]
    elif mutation == "dup" and received:
        received.insert(rng.randint(1, len(received)), dict(rng.choice(received)))
    elif mutation == "unflag":
        for event in received:
            event.pop("coalesced", None)
    elif mutation == "drop" and received:
        del received[rng.randrange(len(received))]
    elif mutation == "epoch" and received:
        received[-1] = {**received[-1], "epoch": E2}
    frames: list[dict] = []
    i = 0
    while i < len(received):
        size = rng.randint(1, 4)
        chunk = received[i : i + size]
        frames.append(chunk[0] if len(chunk) == 1 else _batch(*chunk))
        i += size
    if rng.random() < 0.5:
        at = rng.randint(0, len(frames))
        frames[at:at] = [_welcome(2), _subscribed(T)]
    return [_welcome(), _subscribed(T), _snapshot(base, list(held.values())), *frames]


def _python_result(stream: list[dict]) -> dict:
    checker = RuleChecker()
    for step in stream:
        if "$expect_resume" in step:
            checker.expect_resume(*step["$expect_resume"])
        elif "$expect_snapshot" in step:
            checker.expect_snapshot(step["$expect_snapshot"])
        else:
            checker.feed(step)
    return {
        "rules": [v.rule for v in checker.violations],
        "counts": checker.counts,
        "topics": {t: [st.epoch, st.seq, st.has_base, st.live,
                       {m: e["seq"] for m, e in st.markets.items()}]
                   for t, st in checker.topics.items()},
    }


# Streams go in and results come out as JSON text: Playwright's own serialisation of
# a large nested argument takes seconds.
JS_RESULTS = """(text) => JSON.stringify(JSON.parse(text).map((stream) => {
  const checker = new window.oddsgate.lib.RuleChecker();
  for (const step of stream) {
    if (step["$expect_resume"]) checker.expectResume(...step["$expect_resume"]);
    else if (step["$expect_snapshot"]) checker.expectSnapshot(step["$expect_snapshot"]);
    else checker.feed(step);
  }
  const topics = {};
  for (const [t, st] of checker.topics) {
    const markets = {};
    for (const [m, e] of st.markets) markets[m] = e.seq;
    topics[t] = [st.epoch, st.seq, st.hasBase, st.live, markets];
  }
  return {rules: checker.violations.map((v) => v.rule), counts: checker.counts, topics};
}))"""


async def test_js_client_checks_the_rules_like_the_python_one(worker, browser) -> None:
    rng = random.Random(6)
    streams = HAND_STREAMS + [_random_stream(rng) for _ in range(400)]
    page = await browser.new_page()
    await open_shell(page, worker, [MARKET_TOPIC])
    js = orjson.loads(await page.evaluate(JS_RESULTS, orjson.dumps(streams).decode()))
    python = [_python_result(s) for s in streams]
    for i, (got, want) in enumerate(zip(js, python, strict=True)):
        assert got == want, (i, streams[i])
    fired = {rule for result in python for rule in result["rules"]}
    assert fired == {"seq_order", "market_regression", "silent_gap", "unexpected", "epoch",
                     "bad_snapshot", "malformed"}

    # Backoff: full jitter under the same ceilings as client.odds.backoff_delay.
    ceilings = await page.evaluate("""() => Array.from({length: 12},
        (_, n) => window.oddsgate.lib.backoffDelay(n, () => 1))""")
    assert ceilings == [min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**n) * 1000 for n in range(12)]
    assert await page.evaluate("window.oddsgate.lib.backoffDelay(3, () => 0)") == 0
    assert await page.evaluate("[...window.oddsgate.lib.TERMINAL_CLOSE_CODES]") == \
        [1008, 1009, 4400, 4401, 4429]
    assert PartitionMap.load(None).high_value  # the default topics above start from these


# The JS client over a scripted socket: what it sends, when it reconnects, when it stops.
SCRIPTED_JS = """async ([topic, other]) => {
  const lib = window.oddsgate.lib;
  const sockets = [];
  class ScriptedSocket {
    constructor(url) { this.url = url; this.readyState = 1; this.sent = []; sockets.push(this); }
    send(data) { this.sent.push(JSON.parse(data)); }
    close() { this.readyState = 3; }
  }
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const say = (ws, msg) => ws.onmessage({data: JSON.stringify(msg)});
  const welcome = {type: "welcome", conn: "c", node: "n", worker: 0, heartbeat_ms: 20000};
  const ev = (seq, market) => ({type: "odds", topic, epoch: "E1", seq, market, event_id: "m",
                                ts: Date.now() * 1e6, status: "open", prices: {home: "1.50"}});
  const client = new lib.OddsClient("ws://example/ws?token=t", [topic, other],
                                    {WebSocketImpl: ScriptedSocket});
  const out = {};
  client.start();
  let ws = sockets[0];
  say(ws, welcome);
  out.first = ws.sent[0];
  say(ws, {type: "error", id: 1, code: "unknown_topic", topics: [other], message: "no"});
  say(ws, {type: "subscribed", id: 1, topics: [topic]});
  say(ws, {type: "snapshot", topic, epoch: "E1", seq: 5, markets: [ev(5, "1:39:1")]});
  say(ws, {type: "batch", events: [ev(6, "1:39:1"), ev(8, "1:39:1")]});  // a silent gap
  say(ws, ev(7, "1:39:1"));  // older than shown: counted, never shown
  out.held = client.checker.topics.get(topic).markets.get("1:39:1").seq;
  out.wanted = client.wanted;
  say(ws, {type: "reconnect", after_ms: 300, reason: "drain"});
  ws.onclose({code: 1012, reason: "drain"});
  out.status = [client.status, client.detail];
  out.waitMs = client.reconnectAt - Date.now();
  await sleep(150);
  out.socketsEarly = sockets.length;
  await sleep(300);
  out.socketsLate = sockets.length;
  ws = sockets[1];
  say(ws, welcome);
  out.resume = ws.sent[0];
  say(ws, {type: "error", id: 2, code: "shed", topics: [topic], retry_after_ms: 50});
  say(ws, {type: "subscribed", id: 2, topics: []});
  await sleep(150);
  out.retry = ws.sent[1];
  say(ws, {type: "subscribed", id: 3, topics: [topic]});
  out.resumes = client.stats.resumes;
  ws.onclose({code: 1006, reason: ""});  // no hint: full-jitter backoff
  out.backoffMs = client.reconnectAt - Date.now();
  await sleep(250);
  ws = sockets[2];
  say(ws, welcome);
  ws.onclose({code: 4401, reason: "token expired"});  // terminal
  await sleep(300);
  out.final = [client.status, client.detail, sockets.length];
  out.counts = client.checker.counts;
  client.stop();
  return out;
}"""


async def test_js_client_resumes_honours_hints_and_stops_when_refused(worker, browser) -> None:
    page = await browser.new_page()
    await open_shell(page, worker, [MARKET_TOPIC])
    out = await page.evaluate(SCRIPTED_JS, [MARKET_TOPIC, "odds:9:9"])
    assert out["first"] == {"op": "subscribe", "id": 1,
                            "topics": {MARKET_TOPIC: None, "odds:9:9": None}}
    assert out["wanted"] == [MARKET_TOPIC]  # refused for good: not asked again
    assert out["held"] == 8
    assert out["counts"] == {"silent_gap": 1, "seq_order": 1, "market_regression": 1}
    # reconnect.after_ms is honoured: nothing before it, a new socket after it.
    assert out["status"] == ["reconnecting", "drain"]
    assert 250 <= out["waitMs"] <= 300
    assert (out["socketsEarly"], out["socketsLate"]) == (1, 2)
    # The resume carries the last event held; a shed topic is asked for again.
    assert out["resume"] == {"op": "subscribe", "id": 2,
                             "topics": {MARKET_TOPIC: {"epoch": "E1", "seq": 8}}}
    assert out["retry"] == {"op": "subscribe", "id": 3,
                            "topics": {MARKET_TOPIC: {"epoch": "E1", "seq": 8}}}
    assert out["resumes"] == 1  # the retry continues the resume, it is not another
    assert 0 <= out["backoffMs"] <= BACKOFF_CAP_S * 1000
    assert out["final"] == ["closed", "4401 token expired", 3]


# The JS client over scripted sockets in two regions: where each attempt goes.
SCRIPTED_REGIONS_JS = """async ([topic]) => {
  const lib = window.oddsgate.lib;
  const sockets = [];
  class ScriptedSocket {
    constructor(url) { this.url = url; this.readyState = 1; this.sent = []; sockets.push(this); }
    send(data) { this.sent.push(JSON.parse(data)); }
    close() { this.readyState = 3; }
  }
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const say = (ws, msg) => ws.onmessage({data: JSON.stringify(msg)});
  const welcome = (region) => ({type: "welcome", conn: "c", node: "n", worker: 0,
                                heartbeat_ms: 20000, region});
  const ev = (seq) => ({type: "odds", topic, epoch: "E1", seq, market: "1:39:1", event_id: "m",
                        ts: Date.now() * 1e6, status: "open", prices: {home: "1.50"}});
  const client = new lib.OddsClient(["ws://a/ws", "ws://b/ws"], [topic],
                                    {WebSocketImpl: ScriptedSocket, random: () => 0.5});
  const out = {};
  client.start();
  let ws = sockets[0];
  say(ws, welcome("a"));
  say(ws, {type: "subscribed", id: 1, topics: [topic]});
  say(ws, {type: "snapshot", topic, epoch: "E1", seq: 5, markets: [ev(5)]});
  say(ws, ev(6));
  out.first = [client.region, client.regionUrl, client.stats.failovers];
  say(ws, {type: "reconnect", after_ms: 50, reason: "region_drain"});
  ws.onclose({code: 1012, reason: "region drain"});
  await sleep(120);
  ws = sockets[1];
  say(ws, welcome("b"));
  out.resume = ws.sent[0];
  say(ws, {type: "subscribed", id: 2, topics: [topic]});
  say(ws, ev(7));
  out.drained = [client.region, client.regionUrl, client.stats.failovers, client.status];
  ws.onclose({code: 1006, reason: ""});  // B drops: B again first, after a backoff
  await sleep(150);
  sockets[2].onclose({code: 1006, reason: ""});  // B refuses: A at once
  out.nextMs = client.reconnectAt - Date.now();
  await sleep(30);
  sockets[3].onclose({code: 1006, reason: ""});  // A refuses too: a whole pass, back off
  out.backoffMs = client.reconnectAt - Date.now();
  await sleep(250);
  say(sockets[4], welcome("b"));
  out.urls = sockets.map((s) => s.url);
  out.stats = client.stats;
  out.back = [client.region, client.status, client.checker.total];
  client.stop();
  out.parsed = [
    lib.regionUrls(" ws://a.example/ws , https://x.example/ws, nonsense, wss://b.example/ws?x=1",
                   "tok"),
    lib.regionUrls(null, "tok"),
    lib.regionUrls("", null),
  ];
  out.moves = ["region_drain", "drain", "restart", "overload", null].map(lib.movesRegion);
  return out;
}"""

# The same operations on the JS RegionRing, for client.odds.RegionRing to answer alike.
RING_JS = """(runs) => runs.map(([n, ops]) => {
  const urls = Array.from({length: n}, (_, i) => `ws://r${i}/ws`);
  const ring = new window.oddsgate.lib.RegionRing(urls);
  return ops.map((op) => [ring[op]() === true, ring.index, ring.failedInARow]);
})"""


async def test_js_client_moves_between_regions_as_the_python_one_decides(worker,
                                                                         browser) -> None:
    page = await browser.new_page()
    await open_shell(page, worker, [MARKET_TOPIC])
    out = await page.evaluate(SCRIPTED_REGIONS_JS, [MARKET_TOPIC])
    assert out["first"] == ["a", "ws://a/ws", 0]
    # region_drain: after after_ms, to B, resuming from the last event held.
    assert out["resume"] == {"op": "subscribe", "id": 2,
                             "topics": {MARKET_TOPIC: {"epoch": "E1", "seq": 6}}}
    assert out["drained"] == ["b", "ws://b/ws", 1, "resumed"]
    # A drop: B again; B refusing: A at once; A refusing: a backoff (0.5 of 400 ms).
    assert out["urls"] == ["ws://a/ws", "ws://b/ws", "ws://b/ws", "ws://a/ws", "ws://b/ws"]
    assert out["nextMs"] <= 0
    assert 150 <= out["backoffMs"] <= 200
    assert out["back"] == ["b", "resuming", 0]
    assert (out["stats"]["failovers"], out["stats"]["connectFailures"],
            out["stats"]["backoffs"]) == (1, 2, 1)  # back in B, where it was: no failover
    assert out["parsed"] == [
        ["ws://a.example/ws?token=tok", "wss://b.example/ws?x=1&token=tok"],
        [f"{worker.url}?token=tok"],
        [worker.url],
    ]
    assert out["moves"] == [True, False, False, False, False]

    rng = random.Random(12)
    runs = [(n, [rng.choice(["failed", "failed", "connected", "leave"]) for _ in range(12)])
            for n in (1, 2, 3, 4) for _ in range(10)]
    js = await page.evaluate(RING_JS, runs)
    for (n, ops), got in zip(runs, js, strict=True):
        ring = RegionRing([f"ws://r{i}/ws" for i in range(n)])
        want = []
        for op in ops:
            said = getattr(ring, op)()
            want.append([said is True, ring.index, ring.failed_in_a_row])
        assert got == want, (n, ops)
