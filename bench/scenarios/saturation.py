"""`saturation`: raise the event rate step by step until p99 passes the limit.

Its own population (`saturation_connections` players, see session.py).
Each step sets the feed's rate, lets it settle, and measures; it stops at
the first step whose p99 passes `p99_limit_ms` or which delivers less than
95% of what the feed's events should produce (the system, or this machine,
is falling behind); a step that misses is measured once more before it
counts, so one blip on a shared machine does not end the ladder; a step's
window is long enough for 10,000 deliveries (at most 5 s), since a p99 over
a few thousand is decided by one unlucky burst. The
highest step that held is the result, with deliveries per second per server
core; every step is kept for the plots.
"""

from __future__ import annotations

import time

from bench.harness import Harness, Result, limited_by
from bench.scenarios.fanout import Fanout
from bench.systems import System

NAME = "saturation"
MIN_DELIVERED_SHARE = 0.95
MIN_SAMPLES = 10_000  # deliveries a step's window should hold, up to MAX_WINDOW_S
MAX_WINDOW_S = 5.0


def held(fig: dict, limit_ms: float) -> bool:
    p99 = fig["latency_ms"]["p99_ms"]
    share = fig.get("delivered_share")
    return (p99 is not None and p99 <= limit_ms
            and (share is None or share >= MIN_DELIVERED_SHARE)
            and not fig.get("lost_connections"))


def phase(h: Harness, system: System, f: Fanout) -> Result:
    p = h.p
    result = Result(system.name, NAME, "ok", variant=f"{f.connected} players", params={
        "connections": f.connected, "topics_per_conn": p.topics_per_conn,
        "base_rate": round(p.rate, 1), "steps": p.saturation_steps,
        "settle_s": p.saturation_settle_s, "measure_s": p.saturation_measure_s,
        "p99_limit_ms": p.p99_limit_ms, "workers": system.workers(),
    })
    steps: list[dict] = []
    best: dict | None = None
    stop_reason = f"every step held (up to x{p.saturation_steps[-1]:g})"
    per_event = sum(h.universe.shares[t] * n for t, n in f.followers.items())
    for multiplier in p.saturation_steps:
        rate = p.rate * multiplier
        f.feed.call("set_rate", rate=rate)
        time.sleep(p.saturation_settle_s)
        # p99 over too few deliveries is one burst's luck: low steps measure longer
        window = min(MAX_WINDOW_S, max(p.saturation_measure_s,
                                       MIN_SAMPLES / max(per_event * rate, 1.0)))
        fig = f.measure(h, system, window)
        if not held(fig, p.p99_limit_ms):
            # a short window on a shared machine can miss by a blip: confirm once
            fig = f.measure(h, system, window)
            fig["confirmed"] = True
        fig["rate_target"] = round(rate, 1)
        fig["multiplier"] = multiplier
        fig["limited_by"] = limited_by(fig, system.workers())
        steps.append(fig)
        lat = fig["latency_ms"]
        h.log(f"    x{multiplier:g}: {fig['events_per_s']:.0f} ev/s, "
              f"{fig['deliveries_per_s']:.0f} deliveries/s "
              f"({fig.get('delivered_share') or 0:.0%}), p99 {lat['p99_ms']} ms, "
              f"server {fig['server_cores']:.2f} cores, machine {fig['machine_cores_busy']:.2f}")
        if not held(fig, p.p99_limit_ms):
            stop_reason = (f"x{multiplier:g} did not hold: p99 {lat['p99_ms']} ms, "
                           f"delivered {fig.get('delivered_share')}, limited by "
                           f"{fig['limited_by']}")
            break
        best = fig
    result.notes.append(stop_reason)
    summary = dict(best) if best else {}
    if best:
        cores = best["server_cores"] or None
        summary["held_rate"] = best["events_per_s"]
        summary["held_factor"] = round(p.factor * best["multiplier"], 5)
        summary["deliveries_per_s_per_server_core"] = (
            round(best["deliveries_per_s"] / cores) if cores else None)
    else:
        result.notes.append("not even the first step held")
    summary["steps"] = [_compact(s) for s in steps]
    result.figures = summary
    return result


def _compact(fig: dict) -> dict:
    keys = ("multiplier", "rate_target", "events_per_s", "deliveries_per_s", "delivered_share",
            "latency_ms", "server_cores", "server_cpu_s_per_million",
            "deliveries_per_server_cpu_s", "loadgen_cores", "loadgen_max_core",
            "machine_cores_busy", "other_cores", "violations_total", "limited_by")
    return {k: fig.get(k) for k in keys}
