"""`steady`: 10,000 players x 5 Zipf topics at the seed's peak rate times the factor.

Issue 5's load (800,000 events a minute at the seed's peak) scaled by the
factor that fits the machine; the factor is in every result.
"""

from __future__ import annotations

from bench.harness import SEED_PEAK_EVENTS_PER_S, Harness, Result, limited_by
from bench.profile import profile_worker
from bench.scenarios.fanout import Fanout
from bench.systems import System

NAME = "steady"


def phase(h: Harness, system: System, f: Fanout, profile: bool = False) -> Result:
    p = h.p
    result = Result(system.name, NAME, "ok", variant=f"factor {p.factor:g}", params={
        "connections": f.connected, "topics_per_conn": p.topics_per_conn,
        "rate": round(p.rate, 1), "factor": p.factor,
        "seed_peak_events_per_s": round(SEED_PEAK_EVENTS_PER_S, 1),
        "market_topics": h.universe.market_topics, "topics": len(h.universe.topics),
        "warmup_s": p.warmup_s, "measure_s": p.measure_s, "seed": p.seed,
        "workers": system.workers(), "check_share": p.check_share,
    })
    result.figures = f.measure(h, system, p.measure_s)
    result.figures["limited_by"] = limited_by(result.figures, system.workers())
    result.figures["setup"] = f.setup
    result.notes += f.notes
    lat = result.figures["latency_ms"]
    h.log(f"    steady: {result.figures['deliveries_per_s']:.0f} deliveries/s "
          f"({(result.figures.get('delivered_share') or 0):.0%} of expected), p50 "
          f"{lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, server {result.figures['server_cores']} "
          f"cores")
    if profile and system.name == "oddsgate":
        result.figures["profile"] = profile_worker(h, system, p.profile_s)
    return result
