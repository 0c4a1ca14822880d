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

A doubling ladder only says the maximum lies between the last step held and
the first missed, a factor of 2 (or 4) apart. So after a miss the rate is
bisected (geometrically) between those two until they are within
`BISECT_WITHIN` of each other: the highest rate held is then known to 10%.
Probes are measured and confirmed like steps; when every step held, the
ladder's top is reported as a lower bound and nothing is bisected.
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
BISECT_WITHIN = 1.10  # stop when the first rate missed is within 10% of the highest held
BISECT_MAX_PROBES = 5  # a 4x gap needs 4; a bound on a noisy machine that flip-flops


def next_probe(held_multiplier: float, missed_multiplier: float) -> float | None:
    """The multiplier to try between the highest held and the lowest missed; None
    once they are within BISECT_WITHIN (the geometric middle: rates are ratios)."""
    if missed_multiplier <= held_multiplier * BISECT_WITHIN:
        return None
    return round((held_multiplier * missed_multiplier) ** 0.5, 3)


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
        "check_share": p.check_share,
    })
    steps: list[dict] = []
    best: dict | None = None
    stop_reason = f"every step held (up to x{p.saturation_steps[-1]:g})"
    per_event = sum(h.universe.shares[t] * n for t, n in f.followers.items())

    def step(multiplier: float, label: str) -> dict:
        rate = p.rate * multiplier
        f.feed.call("set_rate", rate=rate)
        time.sleep(p.saturation_settle_s)
        # p99 over too few deliveries is one burst's luck: low steps measure longer
        # (latency comes from the checked players only: `check_share` of them)
        timed = per_event * rate * min(1.0, max(p.check_share, 0.01))
        window = min(MAX_WINDOW_S, max(p.saturation_measure_s, MIN_SAMPLES / max(timed, 1.0)))
        fig = f.measure(h, system, window)
        if not held(fig, p.p99_limit_ms):
            # a short window on a shared machine can miss by a blip: confirm once
            fig = f.measure(h, system, window)
            fig["confirmed"] = True
        fig["rate_target"] = round(rate, 1)
        fig["multiplier"] = multiplier
        fig["phase"] = label
        fig["limited_by"] = limited_by(fig, system.workers())
        steps.append(fig)
        lat = fig["latency_ms"]
        h.log(f"    {label} x{multiplier:g}: {fig['events_per_s']:.0f} ev/s, "
              f"{fig['deliveries_per_s']:.0f} deliveries/s "
              f"({fig.get('delivered_share') or 0:.0%}), p99 {lat['p99_ms']} ms, "
              f"server {fig['server_cores']:.2f} cores, machine {fig['machine_cores_busy']:.2f}")
        return fig

    missed: dict | None = None
    for multiplier in p.saturation_steps:
        fig = step(multiplier, "ladder")
        if not held(fig, p.p99_limit_ms):
            missed = fig
            break
        best = fig
    if missed is not None and best is not None:
        for _ in range(BISECT_MAX_PROBES):
            probe = next_probe(best["multiplier"], missed["multiplier"])
            if probe is None:
                break
            fig = step(probe, "bisect")
            if held(fig, p.p99_limit_ms):
                best = fig
            else:
                missed = fig
    if missed is not None:
        lat = missed["latency_ms"]
        stop_reason = (f"x{missed['multiplier']:g} did not hold: p99 {lat['p99_ms']} ms, "
                       f"delivered {missed.get('delivered_share')}, limited by "
                       f"{missed['limited_by']}")
        if best is not None:
            stop_reason += (f"; the highest held, x{best['multiplier']:g}, is within "
                            f"{missed['multiplier'] / best['multiplier'] - 1:.0%} of it")
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
    keys = ("multiplier", "phase", "rate_target", "events_per_s", "deliveries_per_s",
            "delivered_share", "checked_connections",
            "latency_ms", "server_cores", "server_cpu_s_per_million",
            "deliveries_per_server_cpu_s", "frames_per_s", "loadgen_cores", "loadgen_max_core",
            "redis_cores",
            "machine_cores_busy", "other_cores", "violations_total", "limited_by")
    return {k: fig.get(k) for k in keys}
