"""Results on disk (JSON, Markdown, plots) and the table printed at the end.

Every number in the Markdown comes from a Result's figures; where a run did
not happen the table says why (skipped, unavailable, failed, n/a), never a
number.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench.harness import Result
from bench.scenarios import clicks, failover, shell, spike, stats, webhooks
from bench.systems import NODE

TARGETS = {
    "deliveries_per_server_cpu_s": 300_000,
    "p50_ms": 1.0,
    "p99_ms": 5.0,
    "idle_conn_bytes": 10_000,
    "subscribe_p99_ms": 10.0,
    "drain_resume_p99_ms": 500.0,  # 99% of drained players resumed within this of their hint
    "shell_fresh_odds_p99_ms": shell.FRESH_ODDS_BUDGET_MS,
    "stalled_old_events": spike.OLD_EVENTS_TARGET,  # per stalled player, after waking
    "stalled_to_current_ms": spike.TO_CURRENT_TARGET_MS,
    "failover_resumed_p99_ms": failover.RESUMED_P99_TARGET_MS,
}
FANOUT = ("steady", "saturation", "spike")
CONTENDED_CORES = 0.3  # CPU used by processes outside the run above which we flag it


def _num(value: float | int | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _kb(value: float | int | None) -> str:
    return "-" if value is None else f"{value / 1000:,.1f} KB"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _lat(lat: dict | None) -> list[str]:
    lat = lat or {}
    return [_num(lat.get(k), 2) for k in ("p50_ms", "p99_ms", "p999_ms", "max_ms")]


def _violations(fig: dict) -> str:
    total = fig.get("violations_total")
    if total is None:
        return "-"
    if not total:
        return "0"
    detail = ", ".join(f"{k} {v}" for k, v in sorted(fig.get("violations", {}).items()))
    return f"**{total}** ({detail})"


def _other(fig: dict) -> str:
    other = fig.get("other_cores")
    if other is None:
        return "-"
    text = _num(other, 2)
    return f"**{text}**" if other > CONTENDED_CORES else text


def fanout_table(results: list[Result]) -> list[str]:
    rows = [
        "| scenario | system | players | events/s | deliveries/s | delivered | p50 ms | p99 ms "
        "| p99.9 ms | max ms | deliveries / server CPU-s | server CPU-s / M deliveries "
        "| RSS / conn | violations | server cores | loadgen cores | softirq + steal cores "
        "| other cores |",
        "|" + "---|" * 18,
    ]
    for r in results:
        if r.scenario not in FANOUT or r.status != "ok" or not r.figures.get("latency_ms"):
            continue
        f = r.figures
        name = {"saturation": f"saturation, highest held ({r.variant})",
                "spike": "spike (healthy players)"}.get(r.scenario, r.scenario)
        rows.append("| " + " | ".join([
            name, r.system, _num(f.get("connections")), _num(f.get("events_per_s")),
            _num(f.get("deliveries_per_s")), _pct(f.get("delivered_share")),
            *_lat(f.get("latency_ms")),
            _num(f.get("deliveries_per_server_cpu_s")), _num(f.get("server_cpu_s_per_million"), 1),
            _kb(f.get("rss_per_conn_bytes")), _violations(f), _num(f.get("server_cores"), 2),
            _num(f.get("loadgen_cores"), 2),
            _num((f.get("softirq_cores") or 0) + (f.get("steal_cores") or 0), 2), _other(f),
        ]) + " |")
    return rows


def saturation_lines(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        if r.scenario != "saturation" or r.status != "ok":
            continue
        f = r.figures
        steps = "; ".join(
            f"{'bisect ' if s.get('phase') == 'bisect' else ''}"
            f"x{s['multiplier']:g} {_num(s['events_per_s'])} ev/s: p99 "
            f"{_num((s['latency_ms'] or {}).get('p99_ms'), 1)} ms, "
            f"{_pct(s.get('delivered_share'))} delivered"
            for s in f.get("steps", []))
        if f.get("held_rate") is not None:
            head = (f"held {_num(f.get('held_rate'))} events/s = "
                    f"{_num(f.get('deliveries_per_s'))} deliveries/s, "
                    f"{_num(f.get('deliveries_per_s_per_server_core'))} deliveries/s per server "
                    f"core")
        else:
            head = "no step held"
        out.append(f"- **{r.system}** ({r.variant}): {head}. Stopped: "
                   f"{r.notes[0] if r.notes else '-'}. Ladder: {steps}.")
    return out


def checked_lines(results: list[Result]) -> list[str]:
    """How many players the load generators checked (§5, latency) in each fan-out run;
    the others only counted their events (bench.adapters, `--check-share`)."""
    parts = []
    for r in results:
        f = r.figures
        if r.status != "ok" or r.scenario not in ("steady", "saturation") \
                or f.get("checked_connections") is None:
            continue
        drives = ""
        if f.get("loadgen_cores") and f.get("deliveries_per_s"):
            drives = (f", load generators {_num(f['deliveries_per_s'] / f['loadgen_cores'])} "
                      "deliveries per CPU-s")
        parts.append(f"{r.scenario} / {r.system} {_num(f['checked_connections'])} of "
                     f"{_num(f.get('open_connections'))}{drives}")
    if not parts:
        return []
    return ["Players checked (PROTOCOL.md §5 and latency; the others count their events, "
            "so deliveries and `delivered` are over every player), and what the load "
            "generators read per CPU-second (one process on a whole core would read that "
            "many, at this run's frame sizes): " + "; ".join(parts) + "."]


def batching_lines(results: list[Result], batched: str = "oddsgate",
                   unbatched: str = "oddsgate-unbatched") -> list[str]:
    """Issue 4's A/B: per-turn `batch` frames against one frame per event, on the same
    spike (x50 on one match: its followers get several events a turn), in one run."""
    runs = {r.system: r for r in results if r.scenario == "spike" and r.status == "ok"}
    if batched not in runs or unbatched not in runs:
        return []
    a, b = runs[batched].figures, runs[unbatched].figures

    def per_frame(f: dict) -> str:
        frames = f.get("frames_per_s")
        return _num(f["deliveries_per_s"] / frames, 2) if frames else "-"

    def p99(f: dict) -> str:
        return _num((f.get("latency_ms") or {}).get("p99_ms"), 1)

    out = [f"Micro-batching A/B (the spike, healthy players): `{batched}` sends one `batch` "
           f"per player per loop turn, `{unbatched}` (OG_MAX_BATCH=1) one frame per event.", "",
           "| system | deliveries/s | delivered | deliveries / server CPU-s | events per frame "
           "| p99 ms |", "|---|---|---|---|---|---|"]
    for name, f in ((batched, a), (unbatched, b)):
        out.append(f"| {name} | {_num(f.get('deliveries_per_s'))} | "
                   f"{_pct(f.get('delivered_share'))} | "
                   f"{_num(f.get('deliveries_per_server_cpu_s'))} | {per_frame(f)} | {p99(f)} |")
    da, db = a.get("deliveries_per_server_cpu_s"), b.get("deliveries_per_server_cpu_s")
    if da and db:
        ratio = da / db
        verdict = ("batching is kept (the default)" if ratio >= 1.0 else
                   "one frame per event was cheaper in this run")
        out += ["", f"Batched delivers {ratio:.2f}x the deliveries per server CPU-second of "
                    f"one frame per event: {verdict}."]
    return out


def spike_lines(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        if r.scenario != "spike" or r.status != "ok":
            continue
        f = r.figures
        before = (f.get("before") or {}).get("latency_ms") or {}
        growth = f.get("rss_growth_bytes") or 0
        out.append(
            f"- **{r.system}**: {f.get('stalled_connections')} players stalled (of "
            f"{f.get('spike_followers')} following `{f.get('spike_topic')}`); healthy players' "
            f"p99 {_num(f['latency_ms'].get('p99_ms'), 1)} ms during the spike against "
            f"{_num(before.get('p99_ms'), 1)} ms in steady; server growth over the spike per "
            f"stalled player (an upper bound: healthy players' queues are in it when the "
            f"server falls behind) {_kb(f.get('memory_per_stalled_conn_bytes'))} in RSS (total "
            f"{growth / 2**20:+,.1f} MiB) and "
            f"{_kb(f.get('kernel_queue_per_stalled_conn_bytes'))} in kernel send queues; "
            f"{_pct(f.get('delivered_share'))} of the spike's deliveries arrived in time "
            f"(limited by {f.get('limited_by')}).")
    return out


def wake_lines(results: list[Result]) -> list[str]:
    """The spike's stalled players once they read again: one row per system."""
    runs = [r for r in results if r.scenario == "spike" and r.status == "ok"
            and r.figures.get("wake")]
    if not runs:
        return []
    rows = ["| system | stalled | for | current | never current | old events p50 | p99 | max "
            "| of which the server held, max | player's own queue at waking, max KB "
            "| to current p50 ms | p99 ms | max ms |", "|" + "---|" * 13]
    for r in runs:
        w = r.figures["wake"]
        old, ms = w.get("old_events") or {}, w.get("to_current_ms") or {}
        held = (w.get("server_old_events") or {}).get("max")
        own = (w.get("own_queue_kb") or {}).get("max")
        never = w.get("never_current") or 0
        stalled_s = w.get("stalled_s")
        rows.append("| " + " | ".join([
            r.system, _num(w.get("stalled")),
            "-" if stalled_s is None else f"{stalled_s:g} s"
            + (" (the spike went on)" if w.get("spike_went_on") else ""),
            _num(w.get("current")),
            f"**{never}**" if never else "0",
            *(_num(old.get(k)) if old.get(k) is not None else "never"
              for k in ("p50", "p99", "max")),
            _num(held) if held is not None else "-",
            _num(own) if own is not None else "-",
            *(_num(ms.get(k), 1) if ms.get(k) is not None else "never"
              for k in ("p50", "p99", "max")),
        ]) + " |")
    return ["Stalled players after waking (at the spike's end, or after "
            f"{spike.STALL_MAX_S:g} s: longer, a worker's heartbeat closes them): per player, "
            "the old events it is shown (superseded before it woke) and the time from waking "
            "until it holds the current price of every market it follows; a player not there "
            f"within {spike.WAKE_WAIT_S:g} s counts as never.", "", *rows]


def connect_table(results: list[Result]) -> list[str]:
    rows = ["| system | stage | open | conns/s | connect p50 ms | connect p99 ms "
            "| RSS / idle conn | server processes | failures |", "|" + "---|" * 9]
    for r in results:
        if r.scenario != "connect" or r.status != "ok":
            continue
        f = r.figures
        lat = f.get("connect_latency_ms") or {}
        failures = sum((f.get("failures") or {}).values())
        rows.append(f"| {r.system} | {r.variant} | {_num(f.get('open_connections'))} | "
                    f"{_num(f.get('connections_per_s'))} | {_num(lat.get('p50_ms'), 2)} | "
                    f"{_num(lat.get('p99_ms'), 2)} | {_kb(f.get('rss_per_conn_bytes'))} | "
                    f"{r.params.get('workers', 1)} | {failures} |")
    return rows


def subscribe_table(results: list[Result]) -> list[str]:
    rows = ["| system | wave | players | snapshots | p50 ms | p99 ms | p99.9 ms | max ms "
            "| errors (whole run) | violations |", "|" + "---|" * 10]
    for r in results:
        if r.scenario != "subscribe" or r.status != "ok":
            continue
        f = r.figures
        errors = ", ".join(f"{k} {v}" for k, v in sorted((f.get("errors") or {}).items()))
        rows.append(f"| {r.system} | {r.variant} | {_num(r.params.get('connections'))} | "
                    f"{_num(f.get('snapshots'))} | " + " | ".join(_lat(f.get("subscribe_ms")))
                    + f" | {errors or '0'} | {_violations(f)} |")
    return rows


def _bytes(part: dict | None) -> str:
    if not part:
        return "-"
    return (f"{_num(part.get('transfer'))} B ({_num(part.get('encoded'))} / "
            f"{_num(part.get('decoded'))})")


def shell_lines(results: list[Result]) -> list[str]:
    """The player shell in a browser: one column per variant, one row per mark."""
    runs = [r for r in results if r.scenario == shell.NAME and r.status == "ok"]
    if not runs:
        return []
    rows = ["| ms since navigation start: p50 / p95 / max | "
            + " | ".join(f"{r.variant} ({r.figures.get('loads')} loads)" for r in runs) + " |",
            "|---|" + "---|" * len(runs)]
    for key, label in shell.MARKS:
        cells = []
        for r in runs:
            m = (r.figures.get("marks") or {}).get(key)
            cells.append("-" if not m else " / ".join(
                _num(m.get(k)) for k in ("p50_ms", "p95_ms", "max_ms"))
                + ("" if m.get("count") == r.figures.get("loads") else f" ({m.get('count')})"))
        name = f"**{label}**" if key == shell.FRESH_ODDS_MARK else label
        rows.append(f"| {name} (`{key}`) | " + " | ".join(cells) + " |")
    extra = [
        ("first live price, publish-to-screen p50 / max ms",
         lambda f: " / ".join(_num((f.get("first_event_latency_ms") or {}).get(k))
                              for k in ("p50_ms", "max_ms"))),
        ("HTML bytes transferred (gzip body / decoded)", lambda f: _bytes(f.get("html_bytes"))),
        ("app.js bytes transferred (gzip body / decoded)",
         lambda f: _bytes(f.get("js_bytes"))),
        ("failed loads", lambda f: "0" if not f.get("failed") else f"**{f['failed']}**"),
        ("violations (the JS client's §5 checker)", _violations),
    ]
    for label, cell in extra:
        rows.append(f"| {label} | " + " | ".join(cell(r.figures) for r in runs) + " |")
    out = ["Headless Chromium loads `GET /` on "
           f"{len(runs[0].params.get('topics') or [])} topics (the page's defaults and the "
           "feed's busiest) while the feed runs; each load is one navigation, timed by the "
           "page's own marks (`window.oddsgate.timings`). A mark reached by fewer loads than "
           "ran shows their count in brackets.", "", *rows, ""]
    for r in runs:
        if r.figures.get("fits_budget") is None:
            continue
        verdict = "**fits**" if r.figures["fits_budget"] else "**does not fit**"
        p99 = r.figures.get("fresh_odds_p99_ms")
        out.append(f"Fresh odds on screen, {r.variant}: p99 "
                   f"{_num(p99) + ' ms' if p99 is not None else 'never (a load failed)'} "
                   f"over {r.figures.get('loads')} loads (under 100 loads the p99 is the "
                   f"slowest): {verdict} the {_num(r.figures.get('budget_ms'))} ms budget. "
                   "DevTools' throttling delays each HTTP request (the WebSocket handshake "
                   "included), not WebSocket frames: on a real network the subscribe -> "
                   "snapshot round trip adds one more RTT (150 ms here).")
    return out


def drain_lines(results: list[Result]) -> list[str]:
    """The drain moves of a node (bench.scenarios.drain): one row each, then their spread."""
    runs = [r for r in results if r.scenario == "drain" and r.status == "ok"]
    if not runs:
        return []
    rows = ["| system | move | players | resumed | without reset | with reset | not resumed "
            "| after hint p50 ms | p90 ms | p99 ms | max ms | within 500 ms "
            "| 99% resumed, from the drain command | peak resumes/s | violations |",
            "|" + "---|" * 15]
    lines = []
    for r in runs:
        f = r.figures
        lat = f.get("resume_ms") or {}
        share = f.get("within_target_share")
        rows.append("| " + " | ".join([
            r.system, r.variant, _num(f.get("players")), _num(f.get("resumed")),
            _num(f.get("resumed_without_reset")), _num(f.get("resumed_with_reset")),
            _num(f.get("not_resumed")), _num(lat.get("p50")), _num(lat.get("p90")),
            _num(lat.get("p99")) if lat.get("p99") is not None else "never",
            _num(lat.get("max")), "-" if share is None else f"{share * 100:.1f}%",
            f"{_num(f.get('resumed_99_ms'))} ms" if f.get("resumed_99_ms") is not None
            else "never", _num(f.get("peak_resumes_per_s")), _violations(f),
        ]) + " |")
        hist = f.get("histogram")
        after = f.get("after_ms") or {}
        settings = " ".join(f"{k}={v}" for k, v in (r.params.get("node_settings") or {}).items())
        line = (f"- {r.variant}: hints received from {_num(f.get('first_hint_ms'))} to "
                f"{_num(f.get('last_hint_ms'))} ms after the drain command, `after_ms` "
                f"{after.get('min')}-{after.get('max')} (the node's window; "
                f"{settings or 'its default settings'}); the last player was due at "
                f"{_num(f.get('last_due_ms'))} ms and resumed at "
                f"{_num(f.get('last_resumed_ms'))} ms; {f.get('topic_resets', 0)} topic "
                f"resets, {f.get('reconnect_attempts_failed', 0)} failed reconnect attempts, "
                f"{_num(f.get('mean_resumes_per_s'))} resumes/s on average.")
        if hist:
            line += (f" Per {hist['bucket_ms']} ms from {hist['start_ms'] / 1000:g} s after "
                     f"the command, players due: {' '.join(map(str, hist['due']))}; resumed: "
                     f"{' '.join(map(str, hist['resumed']))}.")
        lines.append(line)
    return [*rows, "", *lines, "",
            "A player's resume time runs from its hint (the `reconnect` frame's receipt plus "
            "its `after_ms`) to its resume complete on another worker (`subscribed`, and a "
            "snapshot after each `reset`); players that never resumed count as never in the "
            "shares and percentiles. Every player sits on worker 0 (the others were drained "
            "while they connected, then undrained); worker 0 is drained."]


def _pick(results: list[Result], scenario: str, system: str = "oddsgate") -> list[Result]:
    return [r for r in results if r.scenario == scenario and r.system == system
            and r.status == "ok"]


def _verdict(value: float | None, target: float, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    if ok:
        return "**met**"
    if not value:
        return "**missed**"
    ratio = target / value if higher_is_better else value / target
    return f"**missed**, {ratio:.1f}x off"


def clicks_lines(results: list[Result]) -> list[str]:
    """Tracking-link redirects through HAProxy (bench.scenarios.clicks)."""
    runs = _pick(results, clicks.NAME)
    if not runs:
        return []
    rows = ["| storm offered/s | achieved/s | redirects/s per worker core | worker us p50 "
            "| p99 | client ms p50 | p99 | full speed/s | static HAProxy/s | ratio "
            "| clicks lost |", "|" + "---|" * 11]
    for r in runs:
        f = r.figures
        worker, client = f.get("worker_us") or {}, f.get("client_ms") or {}
        rows.append("| " + " | ".join([
            _num(f.get("storm_rps_offered")), _num(f.get("storm_rps_achieved")),
            _num(f.get("redirects_per_worker_core_s")), _num(worker.get("p50_us"), 1),
            _num(worker.get("p99_us"), 1), _num(client.get("p50"), 1),
            _num(client.get("p99"), 1), _num(f.get("full_speed_rps")),
            _num(f.get("static_haproxy_rps")), _num(f.get("ratio_to_static"), 2),
            _num(f.get("clicks_lost"))]) + " |")
    return [*rows, "", f"Targets: worker p99 well under 1 ms; ratio to a static HAProxy "
            f"redirect at least {clicks.RATIO_TARGET}; no click lost."]


def webhooks_lines(results: list[Result]) -> list[str]:
    """Conversions to partners' receivers (bench.scenarios.webhooks)."""
    runs = [r for r in results if r.scenario == webhooks.NAME and r.system == "oddsgate"
            and r.status in ("ok", "failed")]
    if not runs:
        return []
    rows = ["| partners (failing, hanging) | conversions/s | for | healthy conversions | delivered "
            "| lost | conversion to 2xx p50 ms | p99 ms | max ms | attempts "
            "| dispatcher CPU-s per 1,000 attempts |", "|" + "---|" * 11]
    for r in runs:
        f = r.figures
        lat = f.get("latency_ms") or {}
        rows.append("| " + " | ".join([
            f"{_num(f.get('partners'))} ({_num(f.get('failing'))}, {_num(f.get('hanging'))})",
            _num(f.get("rate_per_s")), f"{r.params.get('seconds', 0):g} s",
            _num(f.get("healthy_conversions")), _num(f.get("delivered_healthy")),
            _num(f.get("lost")), _num(lat.get("p50"), 1), _num(lat.get("p99"), 1),
            _num(lat.get("max"), 1), _num(f.get("attempts")),
            _num(f.get("cpu_s_per_1000_deliveries"), 2)]) + " |")
    return rows


def failover_lines(results: list[Result]) -> list[str]:
    """The regions' failover drill (bench.scenarios.failover) and the aggregator's cost."""
    runs = _pick(results, failover.NAME)
    if not runs:
        return []
    rows = ["| players | on the killed region | resumed in the other | kill to resumed p50 ms "
            "| p99 ms | max ms | to a new price p50 ms | p99 ms | failovers | resets "
            "| violations |", "|" + "---|" * 11]
    notes = []
    for r in runs:
        f = r.figures
        res, fresh = f.get("resumed_ms") or {}, f.get("fresh_ms") or {}
        rows.append("| " + " | ".join([
            _num(f.get("players")), _num(f.get("on_killed_region")), _num(f.get("resumed")),
            _num(res.get("p50")), _num(res.get("p99")), _num(res.get("max")),
            _num(fresh.get("p50")), _num(fresh.get("p99")), _num(f.get("failovers")),
            _num(f.get("resets")), _num(f.get("violations"))]) + " |")
        agg = f.get("aggregator") or {}
        if agg:
            notes.append(
                f"- The surviving region's aggregator: {_num(agg.get('inputs'))} inputs, "
                f"{_num(agg.get('published'))} events published; input log ts to publish "
                f"acknowledged p50 {agg.get('input_to_publish_ms_p50')} ms, p99 "
                f"{agg.get('input_to_publish_ms_p99')} ms (the merge waits for every "
                f"provider's next message: the providers' heartbeats, 100 ms, bound it); "
                f"{agg.get('cpu_ms_per_1000_inputs')} ms of CPU per thousand inputs.")
    return [*rows, "", *notes] if notes else rows


def target_lines(results: list[Result]) -> list[str]:
    rows = ["| target | wanted | oddsgate measured | verdict |", "|---|---|---|---|"]
    steady = _pick(results, "steady")
    if steady:
        f = steady[0].figures
        lat = f.get("latency_ms") or {}
        d = f.get("deliveries_per_server_cpu_s")
        rows.append(f"| deliveries per server CPU-second (steady) | >= 300,000 | {_num(d)} | "
                    f"{_verdict(d, TARGETS['deliveries_per_server_cpu_s'], True)} |")
        for key, wanted in (("p50_ms", "<= 1 ms"), ("p99_ms", "<= 5 ms")):
            rows.append(f"| publish-to-receipt {key[:3]} (steady) | {wanted} | "
                        f"{_num(lat.get(key), 2)} ms | "
                        f"{_verdict(lat.get(key), TARGETS[key], False)} |")
    for r in _pick(results, "connect"):
        v = r.figures.get("rss_per_conn_bytes")
        rows.append(f"| memory per idle connection ({r.variant}) | <= 10 KB | {_kb(v)} | "
                    f"{_verdict(v, TARGETS['idle_conn_bytes'], False)} |")
    for r in _pick(results, "subscribe"):
        v = (r.figures.get("subscribe_ms") or {}).get("p99_ms")
        rows.append(f"| subscribe-to-snapshot p99 ({r.variant}) | <= 10 ms | {_num(v, 2)} ms | "
                    f"{_verdict(v, TARGETS['subscribe_p99_ms'], False)} |")
    for r in _pick(results, shell.NAME):
        if r.figures.get("fits_budget") is None:
            continue
        v = r.figures.get("fresh_odds_p99_ms")
        verdict = (_verdict(v, TARGETS["shell_fresh_odds_p99_ms"], False) if v is not None
                   else "**missed** (a load never got there)")
        rows.append(f"| fresh odds on screen p99, player shell ({r.variant}, "
                    f"{r.figures.get('loads')} page loads) | <= 1,500 ms | "
                    f"{_num(v) + ' ms' if v is not None else 'never'} | {verdict} |")
    for r in _pick(results, "steady", NODE):
        lat = r.figures.get("latency_ms") or {}
        for key, wanted in (("p50_ms", "<= 1 ms"), ("p99_ms", "<= 5 ms")):
            rows.append(f"| publish-to-receipt {key[:3]} through HAProxy (steady, "
                        f"{_num(r.figures.get('connections'))} players) | {wanted} | "
                        f"{_num(lat.get(key), 2)} ms | "
                        f"{_verdict(lat.get(key), TARGETS[key], False)} |")
    for r in _pick(results, "drain", NODE):
        f = r.figures
        p99 = (f.get("resume_ms") or {}).get("p99")
        share = f.get("within_target_share") or 0.0
        verdict = (_verdict(p99, TARGETS["drain_resume_p99_ms"], False) if p99 is not None
                   else "**missed** (more than 1% never resumed)")
        rows.append(f"| drained players resumed on other workers within 500 ms of their hint "
                    f"({_num(f.get('players'))} players) | 99% | {share * 100:.1f}% (p99 "
                    f"{_num(p99) + ' ms' if p99 is not None else 'never'}) | {verdict} |")
    for r in _pick(results, "spike"):
        w = r.figures.get("wake")
        if not w:
            continue
        never = f"**missed** ({w.get('never_current')} never held the current prices)"
        worst = f"spike, worst of {_num(w.get('stalled'))} stalled players"
        # The server is held to what it (HAProxy, their kernels) still held for
        # the player; what sat in the player's own receive queue had left it.
        old = (w.get("server_old_events") or w.get("old_events") or {}).get("max")
        rows.append(f"| old events a stalled player is shown after waking, beyond its own "
                    f"receive queue ({worst}) | "
                    f"<= {_num(TARGETS['stalled_old_events'])} | "
                    f"{_num(old) if old is not None else 'never'} | "
                    + (_verdict(old, TARGETS["stalled_old_events"], False)
                       if old is not None else never) + " |")
        ms = (w.get("to_current_ms") or {}).get("max")
        rows.append(f"| waking to the current price ({worst}) | <= 1 s | "
                    f"{_num(ms, 1) + ' ms' if ms is not None else 'never'} | "
                    + (_verdict(ms, TARGETS["stalled_to_current_ms"], False)
                       if ms is not None else never) + " |")
    for r in _pick(results, clicks.NAME):
        f = r.figures
        p99 = (f.get("worker_us") or {}).get("p99_us")
        rows.append(f"| tracking redirect, the worker's own time p99 (clicks storm) | <= 1 ms | "
                    f"{_num(p99, 1) + ' us' if p99 is not None else '-'} | "
                    f"{_verdict(None if p99 is None else p99 / 1000, 1.0, False)} |")
        ratio = f.get("ratio_to_static")
        rows.append(f"| tracking redirects vs HAProxy's own static redirect (same run) | "
                    f">= {clicks.RATIO_TARGET}x | {_num(ratio, 2)}x | "
                    f"{_verdict(ratio, clicks.RATIO_TARGET, True)} |")
        lost = f.get("clicks_lost")
        rows.append(f"| clicks lost (redirected but not recorded) | 0 | {_num(lost)} | "
                    f"{'**met**' if lost == 0 else '**missed**'} |")
    for r in [r for r in results if r.scenario == webhooks.NAME and r.system == "oddsgate"
              and r.status in ("ok", "failed")]:
        f = r.figures
        p99 = (f.get("latency_ms") or {}).get("p99")
        rows.append(f"| conversion to webhook p99 (healthy partners, 10% failing or hanging) | "
                    f"<= 500 ms | {_num(p99, 1) + ' ms' if p99 is not None else '-'} | "
                    f"{_verdict(p99, 500.0, False)} |")
        lost = f.get("lost")
        rows.append(f"| conversions lost (healthy partners' deliveries) | 0 | {_num(lost)} | "
                    f"{'**met**' if lost == 0 else '**missed**'} |")
    for r in _pick(results, stats.NAME):
        p99 = (r.figures.get("click_to_stats_ms") or {}).get("p99")
        rows.append(f"| click to its partner's stats row p99 ({r.variant}) | <= 1 s | "
                    f"{_num(p99, 1) + ' ms' if p99 is not None else '-'} | "
                    f"{_verdict(p99, stats.TARGET_P99_MS, False)} |")
    for r in _pick(results, failover.NAME):
        f = r.figures
        p99 = (f.get("resumed_ms") or {}).get("p99")
        left = (f.get("on_killed_region") or 0) - (f.get("resumed") or 0)
        verdict = (f"**missed** ({left} never resumed)" if left
                   else f"**missed** ({f.get('resets')} resets)" if f.get("resets")
                   else _verdict(p99, TARGETS["failover_resumed_p99_ms"], False))
        rows.append(f"| region lost: players resumed in another region, no reset "
                    f"({_num(f.get('on_killed_region'))} players) | p99 <= 1 s | "
                    f"{_num(p99) + ' ms' if p99 is not None else 'never'}, "
                    f"{_num(f.get('resets'))} resets | {verdict} |")
    mine = [r for r in results if r.system.startswith("oddsgate") and r.status == "ok"]
    if mine:
        total = sum(r.figures.get("violations_total") or 0 for r in mine)
        rows.append(f"| ordering violations (every oddsgate run) | 0 | {total} | "
                    f"{'**met**' if total == 0 else '**missed**'} |")
    return rows


def floor_lines(machine: dict, results: list[Result]) -> list[str]:
    send_us = machine.get("loopback_send_us")
    if not send_us:
        return []
    lines = [
        f"Floor on this machine: one small `send()` over loopback to a reader waiting in "
        f"epoll costs the sender {send_us:.1f} us of CPU (bench/calibrate.py), so no "
        f"server in any language writes more than {1e6 / send_us:,.0f} frames per "
        f"CPU-second here; 300,000 deliveries per CPU-second needs at least "
        f"{300_000 * send_us / 1e6:.1f} events per frame on average."]
    steady = _pick(results, "steady")
    if steady:
        f = steady[0].figures
        if f.get("frames_per_s") and f.get("deliveries_per_s"):
            lines[0] += (f" In steady the players received "
                         f"{f['deliveries_per_s'] / f['frames_per_s']:.2f} events per frame.")
    return lines


def profile_lines(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        prof = r.figures.get("profile") if r.status == "ok" else None
        if not prof:
            continue
        if prof.get("status") != "ok":
            out.append(f"- profile of {r.system}: {prof.get('status')}: {prof.get('reason')}")
            continue
        out.append(f"py-spy on the {r.system} worker during `{r.scenario}` "
                   f"({prof['samples']} busy samples; collapsed stacks in "
                   f"`{prof.get('collapsed_stacks')}`). Self time is where the samples "
                   "were, C calls included (a `transport.write` counts its `send()`):")
        out.append("")
        out.append("| self | function | inclusive | function |")
        out.append("|---|---|---|---|")
        inclusive = [x for x in prof["inclusive"] if x["share"] < 0.995]
        for a, b in zip(prof["self"][:10], inclusive[:10], strict=False):
            out.append(f"| {a['share']:.1%} | `{a['function']}` | {b['share']:.1%} | "
                       f"`{b['function']}` |")
    return out


def note_lines(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        for note in r.notes:
            if r.scenario == "saturation" and note == (r.notes[0] if r.notes else None):
                continue  # already in the ladder line
            out.append(f"- {r.scenario} / {r.system}: {note}")
    return out


def other_lines(results: list[Result]) -> list[str]:
    return [f"- {r.scenario} / {r.system}{' (' + r.variant + ')' if r.variant else ''}: "
            f"**{r.status}**: {r.reason.removeprefix('skipped: ')}"
            for r in results if r.status != "ok"]


def _tree(git: dict) -> str:
    if git.get("commit"):
        return git["commit"] + (" + local changes" if git.get("dirty") else "")
    return f"from {git.get('tree')}"


def render(machine: dict, params: dict, results: list[Result], mode: str,
           plots: list[str]) -> str:
    v = machine["versions"]
    background = machine.get("background_cores")
    lines = [
        f"# oddsgate bench: {mode} run",
        "",
        f"{machine['date']} on {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB, Linux {machine['kernel']}, Python {machine['python']}; "
        f"oddsgate {_tree(machine['git'])}. Redis, servers, feed and load generators all "
        "share this machine, over loopback.",
        "",
        f"Scale: factor **{params['factor']:g}** of the seed's peak (13,333 events/s) = "
        f"{params['rate']:.1f} events/s; {params['connections']:,} players x "
        f"{params['topics_per_conn']} Zipf topics (504 market topics + 50 league topics); "
        f"seed {params['seed']}; oddsgate workers: {params['workers']}; "
        f"{params['loadgens']} load-generator processes.",
        "",
    ]
    if background is not None and background > CONTENDED_CORES:
        lines += [f"**The machine was not idle**: {background:.2f} cores were busy with other "
                  "work just before the run; `other cores` below says how much during each "
                  "measurement, and figures with a bold value there are skewed.", ""]
    lines += [
        "## Fan-out", "", *fanout_table(results), "",
        *([*checked, ""] if (checked := checked_lines(results)) else []),
        *saturation_lines(results), *spike_lines(results), "",
        *([*batching, ""] if (batching := batching_lines(results)) else []),
        *([*woken, ""] if (woken := wake_lines(results)) else []),
        "## Connect", "", *connect_table(results), "",
        "## Subscribe to snapshot", "", *subscribe_table(results), "",
        *(["## Drain", "", *drain, ""] if (drain := drain_lines(results)) else []),
        *(["## Player shell", "", *shell, ""] if (shell := shell_lines(results)) else []),
        *(["## Region failover", "", *fo, ""] if (fo := failover_lines(results)) else []),
        *(["## Partner webhooks", "", *wh, ""] if (wh := webhooks_lines(results)) else []),
        *(["## Tracking-link clicks", "", *cl, ""] if (cl := clicks_lines(results)) else []),
        "## oddsgate against its targets", "", *target_lines(results), "",
        *floor_lines(machine, results), "",
    ]
    prof = profile_lines(results)
    if prof:
        lines += ["## Where a worker's time goes", "", *prof, ""]
    notes = note_lines(results)
    if notes:
        lines += ["## Notes", "", *notes, ""]
    others = other_lines(results)
    if others:
        lines += ["## Not measured", "", *others, ""]
    if plots:
        lines += ["## Plots", "", *[f"![{p}]({p})" for p in plots], ""]
    lines += [
        "## How to read this",
        "",
        "- Latency is publish-to-receipt: from the `ts` the feed stamps as it prepares a "
        "batch to the moment the player's frame is read, so it includes the feed's Redis "
        "round trip and the load generator's own queueing.",
        "- `delivered` is deliveries received over what the feed's events in the same "
        "interval should have produced (events per topic x followers); under 100% the "
        "system (or this machine) is falling behind.",
        "- Server CPU is user+system time of the server processes only; Redis, the feed "
        "and the load generators are apart. Over loopback a server's `send()` also pays for "
        "the receiving side's TCP work, so CPU per delivery is higher than on a real "
        "network. `softirq + steal` is packet work the kernel charges to no process "
        "(mostly this run's loopback traffic) plus time the hypervisor gave to other "
        "guests; `other cores` is the rest of the machine's busy time that no process of "
        "the run accounts for (kernel threads, or other jobs on the machine).",
        "- RSS / conn is the server's RSS growth since before the first player, divided by "
        "players (kernel socket buffers are not in it).",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
        "",
    ]
    return "\n".join(lines)


def write(out_dir: Path, stamp: str, mode: str, machine: dict, params: dict,
          results: list[Result], plots: list[str]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = out_dir / "runs"
    runs.mkdir(exist_ok=True)
    payload = {"mode": mode, "machine": machine, "params": params,
               "results": [r.to_dict() for r in results]}
    json_path = runs / f"{stamp}-{mode}.json"
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    (out_dir / f"latest-{mode}.json").write_text(json.dumps(payload, indent=1, default=str))
    text = render(machine, params, results, mode, plots)
    md_path = out_dir / f"latest-{mode}.md"
    md_path.write_text(text)
    (out_dir / "latest.md").write_text(text)
    return json_path, md_path


def plot(python: Path, json_path: Path, out_dir: Path, mode: str
         ) -> tuple[list[str], str | None]:
    """Run bench/plot.py with the bench env's matplotlib; return the PNG names made."""
    script = Path(__file__).resolve().parent / "plot.py"
    try:
        proc = subprocess.run([str(python), str(script), str(json_path), str(out_dir), mode],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], str(exc)
    if proc.returncode != 0:
        return [], (proc.stderr.strip().splitlines() or ["plot failed"])[-1]
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()], None
