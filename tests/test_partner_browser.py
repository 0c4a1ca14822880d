"""The partner dashboard (`/partner/`, issue 12) in a real browser, against a scripted server.

Playwright drives Debian's /usr/bin/chromium (never a downloaded browser), as
in tests/test_shell_browser.py. The page and its assets are served by
`StaticSite` exactly as a worker serves them; `/ws` is a scripted server in
the test's own event loop that plays PROTOCOL.md §12 frames by hand: the
statistics service is built elsewhere, and a script can make every case
happen on cue (a resume, a reset, a refusal). What the page holds is read
from `window.oddsgate` and what a partner sees from the DOM.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import orjson
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request

from gateway.auth import issue_token
from gateway.static import StaticSite
from tests.conftest import JWT_SECRET
from tests.test_shell_browser import ARTIFACTS, PageErrors, browser, wait_js  # noqa: F401

PARTNER = "acme-7"
TOPIC = f"stats:{PARTNER}"
E1, E2 = "s1-20261127", "s2-20261127"
STEP_S = 10.0  # how long the page may take to show what the script sent

def partner_token(partner: str = PARTNER) -> str:
    return issue_token(JWT_SECRET, "partner-user", "ps1", 3600.0, partner=partner)


def counters(clicks: int, unique: int, bots: int, dups: int, regs: int, ftds: int,
             deposits: str = "0.00") -> dict:
    return {"clicks": clicks, "unique_clicks": unique, "bot_clicks": bots,
            "duplicate_clicks": dups, "registrations": regs, "ftds": ftds,
            "deposits": deposits, "currency": "EUR"}


def stats(seq: int, key: str, values: dict, *, epoch: str = E1, ts: int | None = None,
          **extra: Any) -> dict:
    """A §12 event, fields in the contract's order."""
    event = {"type": "stats", "topic": TOPIC, "epoch": epoch, "seq": seq, "key": key,
             "ts": ts if ts is not None else time.time_ns(), "counters": values}
    event.update(extra)
    return event


def snapshot(seq: int, events: list[dict], epoch: str = E1) -> dict:
    return {"type": "snapshot", "topic": TOPIC, "epoch": epoch, "seq": seq, "markets": events}


SERIES_KEY = "minutes:1h"


def now_minute() -> int:
    return time.time_ns() // 60_000_000_000


def series_row(seq: int, start: int, clicks: dict[int, int], *, epoch: str = E1,
               **extra: Any) -> dict:
    """The partner's `minutes:1h` row (README, "Per-minute series"): 60 buckets from
    minute `start`; `clicks` maps a minute to its clicks, a third of them bots."""
    buckets = {name: [0] * 60 for name in ("clicks", "unique_clicks", "bot_clicks",
                                           "duplicate_clicks", "registrations", "ftds")}
    for minute, n in clicks.items():
        i = minute - start
        if 0 <= i < 60:
            buckets["clicks"][i] = n
            buckets["bot_clicks"][i] = n // 3
            buckets["unique_clicks"][i] = n - n // 3
    total = sum(buckets["clicks"])
    event = stats(seq, SERIES_KEY, counters(total, sum(buckets["unique_clicks"]),
                                            sum(buckets["bot_clicks"]), 0, 0, 0),
                  epoch=epoch, **extra)
    event["minutes"] = {"start": start, **buckets}
    return event


BARS_JS = """() => Object.fromEntries([...document.querySelectorAll('#spark svg rect')]
  .filter((r) => r.dataset.clicks !== '0').map((r) => [r.dataset.minute, +r.dataset.clicks]))"""


async def bars(page) -> dict[int, int]:
    """The chart's non-empty bars: minute -> clicks, as drawn."""
    return {int(m): n for m, n in (await page.evaluate(BARS_JS)).items()}


async def wait_bars(page, expected: dict[int, int]) -> None:
    deadline = time.monotonic() + STEP_S
    while (got := await bars(page)) != expected:
        assert time.monotonic() < deadline, (got, expected)
        await asyncio.sleep(0.05)


def first_rows() -> list[dict]:
    """A partner with two campaigns and two creatives, in every window, as of seq 12."""
    rows = []
    seq = 0
    for window, scale in (("today", 10), ("1h", 2), ("5m", 1)):
        for key, base in (("campaign:spring:", 100), ("campaign:c7:", 40),
                          ("creative:banner-a:", 90), ("creative:video:", 50)):
            seq += 1
            c = base * scale
            rows.append(stats(seq, key + window,
                              counters(c, c - c // 5, c // 10, c // 10, c // 20, c // 50,
                                       f"{c * 5}.00")))
    return rows


class ScriptedConnection:
    """One page connection: what the page sent, and a way to answer it."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.inbox: asyncio.Queue[dict] = asyncio.Queue()

    async def request(self) -> dict:
        """The page's next request (its pings are answered here, never returned)."""
        while True:
            msg = await asyncio.wait_for(self.inbox.get(), STEP_S)
            if msg.get("op") != "ping":
                return msg

    async def send(self, *frames: dict) -> None:
        for frame in frames:
            await self.ws.send(orjson.dumps(frame).decode())


class ScriptedStatsServer:
    """The dashboard's pages as a worker serves them, and a scripted `/ws`."""

    def __init__(self) -> None:
        self.site = StaticSite.load()
        self.connections: asyncio.Queue[ScriptedConnection] = asyncio.Queue()
        self.tokens: list[str | None] = []
        self.url = ""

    def process_request(self, conn: ServerConnection, request: Request):
        url = urlsplit(request.path)
        if url.path == "/ws":
            self.tokens.append((parse_qs(url.query).get("token") or [None])[0])
            return None
        return self.site.respond(url.path, request.headers)

    async def handler(self, ws: ServerConnection) -> None:
        conn = ScriptedConnection(ws)
        await ws.send(orjson.dumps({"type": "welcome", "conn": f"c{self.connections.qsize()}",
                                    "node": "scripted", "worker": 0, "heartbeat_ms": 20000,
                                    "region": "test"}).decode())
        self.connections.put_nowait(conn)
        async for raw in ws:
            msg = orjson.loads(raw)
            if msg.get("op") == "ping":
                await ws.send(orjson.dumps({"type": "pong", "id": msg.get("id"),
                                            "ts": time.time_ns()}).decode())
            conn.inbox.put_nowait(msg)

    async def next_connection(self) -> ScriptedConnection:
        return await asyncio.wait_for(self.connections.get(), STEP_S)


@pytest.fixture
async def server() -> AsyncIterator[ScriptedStatsServer]:
    scripted = ScriptedStatsServer()
    async with serve(scripted.handler, "127.0.0.1", 0,
                     process_request=scripted.process_request) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        scripted.url = f"http://127.0.0.1:{port}"
        yield scripted


async def open_dashboard(page, server: ScriptedStatsServer, token: str | None) -> None:
    query = f"?token={token}" if token else ""
    await page.goto(f"{server.url}/partner/{query}")
    await wait_js(page, "() => window.oddsgate !== undefined")


async def subscribed_with_snapshot(server: ScriptedStatsServer, rows: list[dict],
                                   seq: int) -> ScriptedConnection:
    conn = await server.next_connection()
    request = await conn.request()
    assert request == {"op": "subscribe", "id": request["id"], "topics": {TOPIC: None}}
    await conn.send({"type": "subscribed", "id": request["id"], "topics": [TOPIC]},
                    snapshot(seq, rows))
    return conn


ROWS_JS = """(sel) => Object.fromEntries([...document.querySelectorAll(sel + ' tbody tr')]
  .map((tr) => [tr.dataset.key, [...tr.children].map((td) => td.textContent)]))"""


async def table(page, section: str) -> dict[str, list[str]]:
    return await page.evaluate(ROWS_JS, f"#{section}")


async def wait_row(page, key: str, seq: int) -> None:
    await wait_js(page, f"""() => {{
        const tr = document.querySelector('tr[data-key="{key}"]');
        return tr !== null && tr.dataset.seq === "{seq}"; }}""")


# -- the page ---------------------------------------------------------------------------


async def test_snapshot_rows_live_update_windows_and_sparkline(server, browser) -> None:  # noqa: F811
    page = await browser.new_page()
    errors = PageErrors(page)
    await open_dashboard(page, server, partner_token())
    [sent_token] = server.tokens  # ?token= travels to /ws as the shell's does
    assert jwt.decode(sent_token, JWT_SECRET, algorithms=["HS256"])["partner"] == PARTNER
    now = now_minute()
    start = now - 59
    # A partner with no clicks in the last hour: the snapshot's series is all zeros.
    rows = [*first_rows(), series_row(13, start, {})]
    conn = await subscribed_with_snapshot(server, rows, 13)

    # The snapshot: one row per campaign and per creative of today, sorted by name.
    await wait_row(page, "campaign:spring:today", 1)
    campaigns = await table(page, "campaigns")
    assert list(campaigns) == ["campaign:c7:today", "campaign:spring:today"]
    # clicks, unique, bots, duplicates, registrations, FTDs, deposits, conversion rate
    assert campaigns["campaign:spring:today"] == [
        "spring", "1,000", "800", "100", "100", "50", "20", "5000.00 EUR", "6.3%"]
    assert list(await table(page, "creatives")) == ["creative:banner-a:today",
                                                    "creative:video:today"]
    assert await page.inner_text("#partner") == PARTNER
    assert await page.get_attribute("#conn", "data-state") == "connected"

    # Live: one row changes, the others stay; the series row moves this minute's bar.
    await conn.send(stats(14, "campaign:c7:today", counters(407, 322, 41, 44, 25, 8, "2010.50")),
                    series_row(15, start, {now: 7}))
    await wait_row(page, "campaign:c7:today", 14)
    assert (await table(page, "campaigns"))["campaign:c7:today"] == [
        "c7", "407", "322", "41", "44", "25", "8", "2010.50 EUR", "7.8%"]
    assert (await table(page, "campaigns"))["campaign:spring:today"] == \
        campaigns["campaign:spring:today"]
    await wait_bars(page, {now: 7})
    minutes = {m["minute"]: m for m in await page.evaluate("window.oddsgate.minutes")}
    assert len(minutes) == 60 and (minutes[now]["clicks"], minutes[now]["bots"]) == (7, 2)
    drawn = await page.evaluate(
        "() => [...document.querySelectorAll('#spark svg rect')].map((r) => r.dataset.clicks)")
    assert len(drawn) == 60

    # A batch (coalesced, as a worker may send it): the newest series event wins.
    await conn.send({"type": "batch", "events": [
        stats(17, "campaign:spring:today", counters(1003, 802, 100, 101, 50, 20, "5000.00"),
              coalesced=True),
        stats(18, "campaign:autumn:today", counters(4, 4, 0, 0, 1, 0)),
        series_row(19, start, {now: 14}),
    ]})
    await wait_row(page, "campaign:autumn:today", 18)
    assert list(await table(page, "campaigns")) == [
        "campaign:autumn:today", "campaign:c7:today", "campaign:spring:today"]
    await wait_bars(page, {now: 14})
    assert "14 clicks" in await page.inner_text("#spark-label")

    # Another window: the same page shows that window's rows.
    await page.click('button[data-window="1h"]')
    await wait_js(page, "() => document.querySelector('tr[data-key=\"campaign:c7:1h\"]') !== null")
    assert (await table(page, "campaigns"))["campaign:spring:1h"][:2] == ["spring", "200"]
    assert list(await table(page, "creatives")) == ["creative:banner-a:1h", "creative:video:1h"]
    await page.click('button[data-window="5m"]')
    await wait_js(page, "() => document.querySelector('tr[data-key=\"campaign:c7:5m\"]') !== null")
    assert (await table(page, "campaigns"))["campaign:c7:5m"][1] == "40"

    og = await page.evaluate("window.oddsgate")
    assert og["violations"] == 0, og["violationList"]
    assert og["held"] == {"epoch": E1, "seq": 19, "hasBase": True}
    assert errors.uncaught == [] and errors.console == []
    await page.click('button[data-window="today"]')
    await wait_row(page, "campaign:c7:today", 14)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "partner.png"))


async def test_first_load_draws_clicks_made_before_the_page_opened(server, browser) -> None:  # noqa: F811
    """The snapshot's `minutes:1h` row is the whole last hour: bars for minutes long
    before this page existed, then the row rolls forward and the chart with it."""
    page = await browser.new_page()
    errors = PageErrors(page)
    await open_dashboard(page, server, partner_token())
    assert await page.inner_text("#spark-label") == "waiting…"
    now = now_minute()
    start = now - 59
    before = {start + 1: 4, now - 30: 12, now - 1: 9, now: 3}  # all in the hour a minute on
    conn = await subscribed_with_snapshot(
        server, [*first_rows(), series_row(13, start, before)], 13)
    await wait_bars(page, before)
    assert await page.inner_text("#spark-label") == "28 clicks · peak 12/min"
    minutes = await page.evaluate("window.oddsgate.minutes")
    assert all(m["known"] for m in minutes) and len(minutes) == 60
    title = await page.evaluate(f"""() => document.querySelector(
        '#spark rect[data-minute="{now - 30}"] title').textContent""")
    assert title.endswith("12 clicks (8 unique, 4 bots, 0 duplicates)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "partner-first-load.png"))

    # Two minutes later the server's row has rolled by two: the oldest bucket has
    # left the hour, a new one fills. (This page's clock is still in an older minute:
    # the chart follows the row's newest bucket.)
    await conn.send(series_row(14, start + 2, {**before, now + 2: 2}))
    await wait_bars(page, {now - 30: 12, now - 1: 9, now: 3, now + 2: 2})
    last = await page.evaluate(
        "() => document.querySelector('#spark svg rect:last-of-type').dataset.minute")
    assert int(last) == max(now + 2, now_minute())
    og = await page.evaluate("window.oddsgate")
    assert og["violations"] == 0, og["violationList"]
    assert errors.uncaught == [] and errors.console == []


async def test_reconnect_resumes_from_the_last_seq_without_reset(server, browser) -> None:  # noqa: F811
    page = await browser.new_page()
    errors = PageErrors(page)
    await open_dashboard(page, server, partner_token())
    now = now_minute()
    conn = await subscribed_with_snapshot(server, first_rows(), 12)  # no series row yet
    await wait_row(page, "campaign:c7:today", 2)
    await wait_bars(page, {})
    assert "0 clicks" in await page.inner_text("#spark-label")  # none in the hour: zeros
    await conn.send(stats(13, "campaign:c7:today", counters(401, 321, 40, 40, 20, 8)),
                    series_row(14, now - 59, {now: 1}))
    await wait_row(page, "campaign:c7:today", 13)
    await wait_bars(page, {now: 1})

    # The worker drains: a hint, then close 1012; the page comes back and resumes.
    await conn.send({"type": "reconnect", "after_ms": 50, "reason": "drain"})
    await conn.ws.close(1012, "drain")
    again = await server.next_connection()
    request = await again.request()
    assert request["topics"] == {TOPIC: {"epoch": E1, "seq": 14}}
    # What happened meanwhile is replayed; no snapshot, no reset.
    await again.send({"type": "subscribed", "id": request["id"], "topics": [TOPIC]},
                     stats(15, "campaign:spring:today",
                           counters(1010, 805, 100, 105, 51, 20, "5000.00")),
                     stats(16, "campaign:c7:today", counters(409, 325, 41, 43, 21, 8)),
                     series_row(17, now - 59, {now: 19}))
    await wait_row(page, "campaign:c7:today", 16)
    assert (await table(page, "campaigns"))["campaign:spring:today"][1] == "1,010"
    og = await page.evaluate("window.oddsgate")
    assert (og["status"], og["resumes"], og["resets"]) == ("resumed", 1, 0)
    assert og["stats"]["snapshots"] == 1 and og["violations"] == 0, og["violationList"]
    assert await page.get_attribute("#conn", "data-state") == "resumed"
    # The replayed series row replaces the one held: 1 + 10 + 8 clicks this minute.
    await wait_bars(page, {now: 19})
    assert errors.uncaught == []


async def test_reset_replaces_the_rows_with_the_new_snapshot(server, browser) -> None:  # noqa: F811
    page = await browser.new_page()
    errors = PageErrors(page)
    await open_dashboard(page, server, partner_token())
    now = now_minute()
    conn = await subscribed_with_snapshot(
        server, [*first_rows(), series_row(13, now - 59, {now - 1: 5, now: 2})], 13)
    await wait_row(page, "campaign:c7:today", 2)
    await wait_bars(page, {now - 1: 5, now: 2})

    # The statistics' seq space was rebuilt: reset, then a snapshot of the new epoch
    # in which campaign c7 is gone and spring has grown.
    await conn.send({"type": "reset", "topic": TOPIC, "reason": "epoch"},
                    snapshot(4, [stats(1, "campaign:spring:today",
                                       counters(1020, 810, 105, 105, 52, 21, "5100.00"),
                                       epoch=E2),
                                 stats(2, "creative:video:today",
                                       counters(500, 400, 50, 50, 25, 10), epoch=E2),
                                 stats(3, "campaign:spring:1h",
                                       counters(20, 20, 0, 0, 1, 0), epoch=E2),
                                 series_row(4, now - 59, {now - 3: 6}, epoch=E2)], epoch=E2))
    await wait_js(page, """() => document.querySelector('tr[data-key="campaign:c7:today"]')
        === null""")
    await wait_row(page, "campaign:spring:today", 1)
    assert list(await table(page, "campaigns")) == ["campaign:spring:today"]
    assert list(await table(page, "creatives")) == ["creative:video:today"]
    assert (await table(page, "campaigns"))["campaign:spring:today"][1] == "1,020"
    og = await page.evaluate("window.oddsgate")
    assert (og["resets"], og["status"]) == (1, "reset")
    assert og["held"] == {"epoch": E2, "seq": 4, "hasBase": True}
    assert set(og["rows"]) == {"campaign:spring:today", "creative:video:today",
                               "campaign:spring:1h", SERIES_KEY}
    await wait_bars(page, {now - 3: 6})  # the new epoch's hour, nothing of the old
    assert og["violations"] == 0, og["violationList"]
    assert "reset" in await page.inner_text("#conn")
    # Then live again in the new epoch.
    await conn.send(stats(5, "campaign:spring:today", counters(1021, 811, 105, 105, 52, 21),
                          epoch=E2))
    await wait_row(page, "campaign:spring:today", 5)
    assert await page.evaluate("window.oddsgate.violations") == 0
    assert errors.uncaught == []


async def test_another_partners_topic_is_shown_as_forbidden(server, browser) -> None:  # noqa: F811
    page = await browser.new_page()
    await open_dashboard(page, server, partner_token("other-partner"))
    conn = await server.next_connection()
    request = await conn.request()
    assert request["topics"] == {"stats:other-partner": None}
    await conn.send({"type": "error", "id": request["id"], "code": "forbidden",
                     "topics": ["stats:other-partner"], "message": "topic not allowed"},
                    {"type": "subscribed", "id": request["id"], "topics": []})
    await wait_js(page, "() => !document.querySelector('#notice').hidden")
    notice = await page.inner_text("#notice")
    assert "may not see partner other-partner's statistics (forbidden)" in notice
    assert await page.get_attribute("#conn", "data-state") == "refused"
    assert await page.evaluate("window.oddsgate.refused") == {"stats:other-partner": "forbidden"}
    assert await page.evaluate("document.querySelectorAll('tbody tr').length") == 0


async def test_a_token_without_partner_connects_nowhere(server, browser) -> None:  # noqa: F811
    page = await browser.new_page()
    player = issue_token(JWT_SECRET, "p1", "s1")
    await open_dashboard(page, server, player)
    assert "carries no partner" in await page.inner_text("#notice")
    await open_dashboard(page, server, None)
    assert "needs a partner session token" in await page.inner_text("#notice")
    assert server.tokens == [] and server.connections.empty()


async def test_refused_token_close_4401_is_a_clear_message(server, browser) -> None:  # noqa: F811
    page = await browser.new_page()
    await open_dashboard(page, server, partner_token())
    conn = await server.next_connection()
    await conn.request()
    await conn.ws.close(4401, "session token expired")
    await wait_js(page, "() => !document.querySelector('#notice').hidden")
    assert "refused this session token" in await page.inner_text("#notice")
    assert await page.evaluate("window.oddsgate.status") == "closed"


async def test_helpers(server, browser) -> None:  # noqa: F811
    """The partner claim read from the token, keys, the conversion rate."""
    page = await browser.new_page()
    await open_dashboard(page, server, partner_token())
    out = await page.evaluate("""([good, bad]) => {
      const lib = window.oddsgate.lib;
      return {
        good: lib.partnerOf(good), bad: lib.partnerOf(bad), junk: lib.partnerOf("a.b.c"),
        keys: ["campaign:c7:today", "creative:v:a:1h", "campaign:c7:2h", "market:x:today",
               "campaign::5m"].map((k) => lib.parseKey(k)),
        rates: [lib.conversionRate({unique_clicks: 0, registrations: 3}),
                lib.conversionRate({unique_clicks: 3, registrations: 1})],
        minutes: (() => {
          const s = new lib.MinuteSeries(() => 100 * 60000 + 5);  // minute 100
          const view = () => { const out = s.series();
            return [out[0].minute, out.at(-1).minute, out.filter((m) => m.clicks)
              .map((m) => [m.minute, m.clicks]), out[0].known]; };
          const row = (start, at) => ({minutes: {start, clicks: Array.from({length: 60},
            (_, i) => (at[start + i] || 0))}});
          return [view(),
            (s.update(row(41, {41: 1, 100: 3})), view()),  // as current as this clock
            (s.update(row(30, {89: 2})), view()),  // not republished since: zeros after
            (s.update(row(43, {102: 5})), view()),  // the server's clock is ahead
            (s.update(undefined), view()),  // no row: none in the hour
            (s.update({minutes: {start: "x", clicks: []}}), view())];  // malformed: none
        })(),
      };
    }""", [partner_token("p_42"), _token_with_partner("no spaces")])
    assert (out["good"], out["bad"], out["junk"]) == ("p_42", None, None)
    assert out["keys"] == [{"dimension": "campaign", "name": "c7", "window": "today"},
                           {"dimension": "creative", "name": "v:a", "window": "1h"},
                           None, None, None]
    assert out["rates"] == ["\u2013", "33.3%"]  # an en dash: no rate without clicks
    assert out["minutes"] == [
        [41, 100, [], False],  # before a snapshot: unknown
        [41, 100, [[41, 1], [100, 3]], True],
        [41, 100, [[89, 2]], True],
        [43, 102, [[102, 5]], True],
        [41, 100, [], True],
        [41, 100, [], True],
    ]


def _token_with_partner(partner: str) -> str:
    """A token whose claim issue_token would refuse to mint: the page must refuse it too."""
    import time

    import jwt

    return jwt.encode({"sub": "p", "sid": "s", "exp": int(time.time()) + 3600,
                       "partner": partner}, JWT_SECRET, algorithm="HS256")
