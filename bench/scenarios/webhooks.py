"""`webhooks`: conversions to 50 partner receivers, 10% failing or hanging (bench/webhooks.py).

Reported: conversion-to-delivery p50/p99/max for the healthy partners, the
healthy deliveries lost (target 0) and the dispatcher's CPU per thousand
attempts. Not a comparison: the peers have no webhooks.
"""

from __future__ import annotations

import asyncio

from bench.harness import Harness, Result
from bench.systems import System
from bench.webhooks import FAILING, HANGING, PARTNERS, drill

NAME = "webhooks"
RATE = {True: 100, False: 300}  # conversions a second: quick, full
SECONDS = {True: 5.0, False: 20.0}


def run(h: Harness, system: System) -> list[Result]:
    if system.name != "oddsgate":
        return [Result(system.name, NAME, "n/a", reason="oddsgate's dispatcher only")]
    run_dir = h.run_dir(f"{system.name}-{NAME}")
    rate, seconds = RATE[h.p.quick], SECONDS[h.p.quick]
    with h.redis(run_dir) as redis_server:
        figures = asyncio.run(drill(redis_server.url, h.tree, rate, seconds))
    lat = figures["latency_ms"]
    h.log(f"    {figures['delivered_healthy']}/{figures['healthy_conversions']} healthy "
          f"delivered, p50/p99/max {lat['p50']}/{lat['p99']}/{lat['max']} ms, lost "
          f"{figures['lost']}, {figures['cpu_s_per_1000_deliveries']} CPU s per 1000 attempts")
    return [Result(system.name, NAME, "ok" if figures["lost"] == 0 else "failed",
                   variant=f"{FAILING} failing + {HANGING} hanging of {PARTNERS} partners",
                   params={"rate_per_s": rate, "seconds": seconds, "partners": PARTNERS},
                   figures=figures)]
