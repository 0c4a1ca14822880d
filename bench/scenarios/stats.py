"""`stats`: a click to its partner's statistics row (PROTOCOL.md §12: within 1 s).

bench/stats_latency.py in the plan: the real statistics service on a
private Redis, a background of clicks over 50 partners, and probe clicks
timed from their XADD on `og:clicks` to the `stats` event of their row on the
partner's channel (what every worker following the topic receives; the
worker's fan-out after that is the fan-out scenarios'). Target: p99 <= 1 s.
"""

from __future__ import annotations

from bench.harness import Harness, Result
from bench.stats_latency import measure
from bench.systems import System

NAME = "stats"
TARGET_P99_MS = 1000.0
RATE = {True: 200, False: 500}
PROBES = {True: 10, False: 30}


def run(h: Harness, system: System) -> list[Result]:
    if system.name != "oddsgate":
        return [Result(system.name, NAME, "n/a", reason="oddsgate's statistics service only")]
    figures = measure(rate=RATE[h.p.quick], probes=PROBES[h.p.quick])
    lat = figures["click_to_stats_ms"]
    h.log(f"    click -> stats event p50/p99/max {lat['p50']}/{lat['p99']}/{lat['max']} ms "
          f"over {figures['probes']} probes at {figures['background_clicks_per_s']:g} clicks/s")
    figures["violations_total"] = 0
    return [Result(system.name, NAME, "ok",
                   variant=f"{figures['background_clicks_per_s']:g} background clicks/s",
                   params={k: figures[k] for k in ("partners", "publish_ms", "probes")},
                   figures=figures)]
