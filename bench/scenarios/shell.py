"""`shell`: the player shell in a real browser, from navigation to fresh odds on screen.

One oddsgate worker on a private Redis, the bench feed running, and Debian's
headless Chromium (/usr/bin/chromium, driven by Playwright as
tests/test_shell_browser.py does; no browser is ever downloaded) loading
`GET /?topics=...`: the page's default topics (gateway/shell/app.js
`defaultTopics`, mirrored by `default_topics`) plus the universe's
`SHELL_HOT_TOPICS` busiest, so that a live price arrives soon after the
snapshots. A "keeper" page follows the same topics the whole time, so the
worker's channels are open, as production's popular topics are (a cold
channel is `subscribe`'s business).

Variants, each a run of page loads one after the other, every load a new
navigation of one tab (a renderer process already running):

- `cold cache`: the cache disabled (CDP `Network.setCacheDisabled`, DevTools'
  "Disable cache"): every load fetches the page and its script, as a first
  visit does.
- `warm cache`: a load not counted primes the cache; then the hashed script
  comes from the cache and the HTML is revalidated (304), as a return visit.
- `mobile (Slow 4G)`: cold cache behind DevTools' "Slow 4G" throttling
  (formerly "Fast 3G": 150 ms RTT x 3.75 = 562.5 ms per request, 1.6 Mbps
  x 0.9 down, 750 kbps x 0.9 up), set with CDP
  `Network.emulateNetworkConditions`; the CPU is not slowed. The latency is
  added to each HTTP request (the WebSocket handshake included), not to
  WebSocket frames: the subscribe -> snapshot round trip is not slowed.

A load is done when the page's own marks (`window.oddsgate.timings`, ms since
navigation start) say every wanted topic's snapshot is on screen
(`all-snapshots`, the time to fresh odds) and a first live price has been
applied (`first-event`); one that does not get there in `WAIT_S` is counted
as failed, with what it reached. Bytes come from the browser's Resource
Timing entries, violations from the JS client's §5 checker. Timings are
reported, never asserted; the targets table says whether the mobile p99 fits
`FRESH_ODDS_BUDGET_MS`.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from bench.harness import Harness, Result
from bench.systems import System
from gateway.topics import PartitionMap

NAME = "shell"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
VIEWPORT = {"width": 412, "height": 915}  # a phone's
SHELL_HOT_TOPICS = 5
DEFAULT_TOPIC_COUNT = 6  # app.js DEFAULT_TOPIC_COUNT
WAIT_S = 15.0
FAILED_IN_A_ROW = 3  # then the run stops as failed: the worker or the browser is gone
POLL_MS = 20
FRESH_ODDS_BUDGET_MS = 1500.0  # issue 6: fresh odds on screen within 1.5 s on a mobile network
FRESH_ODDS_MARK = "all-snapshots"
COLD, WARM, MOBILE = "cold cache", "warm cache", "mobile (Slow 4G)"
# DevTools' "Slow 4G" preset (Chromium's front_end/core/sdk/NetworkManager.ts), in CDP units:
# latency in ms per request, throughput in bytes per second.
SLOW_4G = {"offline": False, "latency": 150 * 3.75,
           "downloadThroughput": 1.6 * 1000 * 1000 * 0.9 / 8,
           "uploadThroughput": 750 * 1000 * 0.9 / 8}

# What a load reports, in the order a page gets there: (key, what it is).
MARKS = [
    ("html", "HTML received (navigation responseEnd)"),
    ("fcp", "first contentful paint (the HTML's skeleton)"),
    ("js", "app.js received"),
    ("script", "module starts"),
    ("skeleton", "skeleton of every topic laid out"),
    ("ws-created", "WebSocket created"),
    ("ws-open", "WebSocket open"),
    ("welcome", "welcome; subscribe sent"),
    ("snapshot", "first snapshot received"),
    ("first-render", "first snapshot on screen"),
    ("all-snapshots", "every topic's odds on screen (fresh odds)"),
    ("first-event", "first live price on screen"),
]
DONE = f"""() => {{
  const t = window.oddsgate && window.oddsgate.timings;
  return !!t && "{FRESH_ODDS_MARK}" in t && "first-event" in t;
}}"""
# Everything a load reports, read in one evaluate (a function: the page's CSP forbids eval).
COLLECT = """() => {
  const og = window.oddsgate;
  const nav = performance.getEntriesByType("navigation")[0];
  const resource = (part) => performance.getEntriesByType("resource")
    .find((e) => e.name.includes(part));
  const size = (e) => e && {transfer: e.transferSize, encoded: e.encodedBodySize,
                            decoded: e.decodedBodySize, end: e.responseEnd};
  const fcp = performance.getEntriesByType("paint")
    .find((e) => e.name === "first-contentful-paint");
  return {
    timings: og ? og.timings : {},
    html: size(nav), js: size(resource("/static/app.")), topics: size(resource("/v1/topics")),
    fcp: fcp ? fcp.startTime : null,
    violations: og ? og.violations : null,
    counts: og ? og.counts : {},
    first_latency: og && og.latencies.length ? og.latencies[0] : null,
  };
}"""


def unavailable() -> str | None:
    """Why the shell cannot be driven here, or None."""
    if not CHROMIUM.exists():
        return f"no {CHROMIUM} (scripts/bootstrap.sh installs Debian's chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"the playwright package is missing ({exc}); pip install -e '.[dev]'"
    return None


def default_topics(pmap: dict) -> list[str]:
    """What the page follows without ?topics= (app.js `defaultTopics`): the high-value
    topics, then market 1 of each sport's first market-level league, six at most."""
    topics = list(pmap.get("high_value") or [])
    for sport in pmap.get("sports") or []:
        leagues = sport.get("market_level_leagues") or []
        if leagues:
            topics.append(f"odds:{sport['id']}:{leagues[0]}:1")
    return list(dict.fromkeys(topics))[:DEFAULT_TOPIC_COUNT]


def page_topics(pmap: dict, busiest: list[str], hot: int = SHELL_HOT_TOPICS) -> list[str]:
    """The page's defaults, then the `hot` busiest topics of the feed not among them."""
    topics = default_topics(pmap)
    return topics + [t for t in busiest if t not in topics][:hot]


def load_figures(raw: dict) -> dict:
    """One load, from what COLLECT read: marks in ms since navigation start, and bytes."""
    marks = {k: float(v) for k, v in (raw.get("timings") or {}).items()}
    for key in ("html", "js"):
        end = (raw.get(key) or {}).get("end")
        if end:
            marks[key] = float(end)
    if raw.get("fcp") is not None:
        marks["fcp"] = float(raw["fcp"])
    out = {"marks": {k: round(v, 1) for k, v in marks.items()},
           "violations": raw.get("violations"), "counts": raw.get("counts") or {}}
    if raw.get("first_latency") is not None:
        out["first_event_latency_ms"] = round(float(raw["first_latency"]), 1)
    for key in ("html", "js", "topics"):
        part = raw.get(key)
        if part:
            out[f"{key}_bytes"] = {k: part.get(k) for k in ("transfer", "encoded", "decoded")}
    return out


def percentile(values: list[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least q of the values at or under it
    (under 100 values, p99 is the max)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarise(loads: list[dict]) -> dict:
    """Per mark p50/p95/p99/max over the loads that reached it; failures; bytes (median
    per load); violations summed. A load that failed counts as never reaching the marks
    it lacks: they weigh in the p99 of the time to fresh odds as infinitely late."""
    marks: dict[str, dict] = {}
    for key, _ in MARKS:
        values = [ld["marks"][key] for ld in loads if key in ld.get("marks", {})]
        if not values:
            continue
        marks[key] = {"count": len(values), **{
            name: round(percentile(values, q), 1)
            for name, q in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99), ("max_ms", 1.0))}}
    fresh = [ld.get("marks", {}).get(FRESH_ODDS_MARK, math.inf) for ld in loads]
    p99 = percentile(fresh, 0.99)
    failed = [ld for ld in loads if ld.get("failed")]
    out: dict = {
        "loads": len(loads),
        "failed": len(failed),
        "failures": sorted({ld["failed"] for ld in failed})[:5],
        "marks": marks,
        "fresh_odds_p99_ms": None if p99 is None or math.isinf(p99) else round(p99, 1),
        "fresh_odds_reached": sum(1 for v in fresh if not math.isinf(v)),
        "violations_total": sum(ld.get("violations") or 0 for ld in loads),
        "page_errors": sum(len(ld.get("page_errors") or []) for ld in loads),
        "violations": {},
    }
    for ld in loads:
        for rule, n in (ld.get("counts") or {}).items():
            out["violations"][rule] = out["violations"].get(rule, 0) + n
    latencies = [ld["first_event_latency_ms"] for ld in loads
                 if ld.get("first_event_latency_ms") is not None]
    if latencies:
        out["first_event_latency_ms"] = {"p50_ms": round(percentile(latencies, 0.5), 1),
                                         "max_ms": round(max(latencies), 1)}
    for key in ("html_bytes", "js_bytes", "topics_bytes"):
        parts = [ld[key] for ld in loads if ld.get(key)]
        if parts:
            out[key] = {k: percentile([p[k] or 0 for p in parts], 0.5)
                        for k in ("transfer", "encoded", "decoded")}
    return out


def fits_budget(summary: dict, budget_ms: float = FRESH_ODDS_BUDGET_MS) -> bool | None:
    """Whether every load but the slowest 1% had fresh odds on screen within the budget:
    None when nothing was loaded; False when the p99 load never got there."""
    if not summary.get("loads"):
        return None
    p99 = summary.get("fresh_odds_p99_ms")
    return p99 is not None and p99 <= budget_ms


def run(h: Harness, system: System) -> list[Result]:
    if system.name != "oddsgate":
        return [Result(system.name, NAME, "n/a", reason="oddsgate's player shell only")]
    why = unavailable()
    if why:
        return [Result(system.name, NAME, "unavailable", reason=why)]
    from playwright.sync_api import sync_playwright

    p = h.p
    run_dir = h.run_dir(f"{system.name}-{NAME}")
    system.workdir = run_dir
    topics = page_topics(PartitionMap.load(None).to_dict(), h.universe.topics)
    plan = [(COLD, p.shell_loads), (WARM, p.shell_loads), (MOBILE, p.shell_mobile_loads)]
    results = []
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(h.redis(run_dir))
        target = stack.enter_context(h.system(system, redis.url))
        feed, _ = stack.enter_context(h.feed(system, p.rate))
        host, port = target.endpoints[0]
        url = f"http://{host}:{port}/?topics={','.join(topics)}"
        pw = stack.enter_context(sync_playwright())
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=CHROMIUM_ARGS)
        stack.callback(browser.close)
        keeper = browser.new_context(viewport=VIEWPORT)
        stack.callback(keeper.close)
        # opens every channel and stays open; done once a live price is on screen
        keeper_page = keeper.new_page()
        kept = _load(keeper_page, url, [])
        if kept.get("failed"):
            raise RuntimeError(f"the keeper page did not load: {kept['failed']}")
        # One tab for every measured load, so that a load does not pay for starting a
        # renderer process (which its timings would not show anyway).
        context = browser.new_context(viewport=VIEWPORT)
        stack.callback(context.close)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        cdp = context.new_cdp_session(page)
        cdp.send("Network.enable")
        for variant, count in plan:
            started = time.monotonic()
            # DevTools' "Disable cache": every load fetches the page and its script
            cdp.send("Network.setCacheDisabled", {"cacheDisabled": variant != WARM})
            if variant == MOBILE:
                cdp.send("Network.emulateNetworkConditions", SLOW_4G)
            if variant == WARM:
                _load(page, url, errors)  # primes the cache; not counted
            loads = _loads(page, url, errors, count)
            stats = feed.call("stats")
            if stats.get("failed"):
                raise RuntimeError(f"the bench feed stopped: {stats['failed']}")
            summary = summarise(loads)
            fresh = summary["marks"].get(FRESH_ODDS_MARK, {})
            event = summary["marks"].get("first-event", {})
            h.log(f"    {variant}: {summary['loads']} loads in {time.monotonic() - started:.1f}s"
                  f", {summary['failed']} failed; fresh odds p50 {fresh.get('p50_ms')} ms, "
                  f"p99 {summary['fresh_odds_p99_ms']} ms; first live price p50 "
                  f"{event.get('p50_ms')} ms; violations {summary['violations_total']}")
            result = Result(system.name, NAME, "ok", variant=variant, params={
                "loads": count, "topics": topics, "feed_rate": round(p.rate, 1),
                "wait_s": WAIT_S, "viewport": VIEWPORT, "chromium": browser.version,
                "network": SLOW_4G if variant == MOBILE else "loopback",
                "workers": system.workers(),
            }, figures=summary | {"fresh_odds_ms": sorted(
                ld["marks"].get(FRESH_ODDS_MARK) for ld in loads
                if FRESH_ODDS_MARK in ld["marks"])})
            if variant == MOBILE:
                result.figures["fits_budget"] = fits_budget(summary)
                result.figures["budget_ms"] = FRESH_ODDS_BUDGET_MS
            if summary["page_errors"]:
                result.notes.append(f"{variant}: uncaught errors in the page: "
                                    f"{next(e for ld in loads for e in ld.get('page_errors', []))}")
            if summary["failed"]:
                result.notes.append(f"{variant}: {summary['failed']} of {summary['loads']} "
                                    f"loads failed: {'; '.join(summary['failures'])}")
            results.append(result)
        keeper_violations = keeper_page.evaluate("() => window.oddsgate.violations")
        if keeper_violations:  # the keeper followed the feed the whole run
            results[-1].figures["violations_total"] += keeper_violations
            results[-1].notes.append(f"the keeper page counted {keeper_violations} violations")
    return results


def _loads(page, url: str, errors: list[str], count: int) -> list[dict]:
    loads: list[dict] = []
    for _ in range(count):
        loads.append(_load(page, url, errors))
        last = loads[-FAILED_IN_A_ROW:]
        if len(last) == FAILED_IN_A_ROW and all(ld.get("failed") for ld in last):
            raise RuntimeError(f"{FAILED_IN_A_ROW} page loads in a row failed: "
                               f"{last[-1]['failed']}")
    return loads


def _load(page, url: str, errors: list[str]) -> dict:
    """One navigation of `page` to `url`: its figures, or what it reached and why it failed."""
    del errors[:]
    failed = None
    try:
        page.goto(url, wait_until="commit", timeout=WAIT_S * 1000)
        page.wait_for_function(DONE, timeout=WAIT_S * 1000, polling=POLL_MS)
    except Exception as exc:  # playwright's TimeoutError, or the page went away
        failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    try:
        figures = load_figures(page.evaluate(COLLECT))
    except Exception as exc:
        figures = {"marks": {}, "violations": None}
        failed = failed or f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    if failed:
        reached = [k for k, _ in MARKS if k in figures["marks"]]
        figures["failed"] = (f"not done in {WAIT_S:.0f}s (reached: "
                             f"{', '.join(reached) or 'nothing'}): {failed}")
    if errors:
        figures["page_errors"] = errors[:3]
    return figures
