"""`failover`: a whole region lost under players; how fast they are served by another.

Two full regions from `oddsgate demo --regions 2 --no-players` (each its
Redis with its input log, its aggregator, a node with HAProxy; the synthetic
providers shared), `players` clients on both (half starting on each) holding
both URLs and following every market the providers price. Once prices flow,
every process of region A is SIGKILLed (bench/failover.py, the drill the
tests run too). Reported, per player of region A: from the kill to resumed
in region B (its resume answered there) and to its first new price there,
p50/p99/max; resets and §5 violations over every player (targets: p99 <=
1 s, 0 resets, 0 violations). And the aggregator's own cost, from region B's
status key: input log ts to publish acknowledged, p50/p99, and CPU per
thousand inputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil

import orjson
import redis

from aggregator.providers import default_markets
from bench.failover import drill, start_regions
from bench.harness import Harness, Result
from bench.systems import System
from gateway.topics import PartitionMap, topic_for_market
from supervisor.embedded_redis import free_port_range

NAME = "failover"
PLAYERS = {True: 200, False: 1000}  # quick, full
RESUMED_P99_TARGET_MS = 1000.0


def topics() -> list[str]:
    pmap = PartitionMap.load(None)
    return sorted({topic_for_market(pmap, *map(int, m.market.split(":")))
                   for m in default_markets()})


def aggregator_status(regions, index: int) -> dict:
    url = f"unix://{regions.runtime / f'region-{index}' / 'redis' / 'redis.sock'}"
    with contextlib.suppress(redis.RedisError, OSError):
        client = redis.Redis.from_url(url)
        raw = client.get("og:agg:main:status")
        client.close()
        if raw is not None:
            return orjson.loads(raw)
    return {}


def run(h: Harness, system: System) -> list[Result]:
    if system.name != "oddsgate":
        return [Result(system.name, NAME, "n/a", reason="oddsgate's regions only")]
    run_dir = h.run_dir(f"{system.name}-{NAME}")
    players = PLAYERS[h.p.quick]
    if shutil.which("haproxy") is None:
        return [Result(system.name, NAME, "unavailable", reason="no haproxy")]
    regions = start_regions(run_dir, free_port_range(2), cwd=h.tree)
    try:
        figures = asyncio.run(drill(regions, players, topics()))
        figures["aggregator"] = aggregator_status(regions, 1)
    finally:
        regions.stop()
    lat = figures["resumed_ms"]
    h.log(f"    {figures['on_killed_region']} players on the killed region: resumed "
          f"{figures['resumed']} p50/p99/max {lat['p50']}/{lat['p99']}/{lat['max']} ms; "
          f"resets {figures['resets']}, violations {figures['violations']}")
    figures["violations_total"] = figures["violations"]
    figures["resumed_p99_target_ms"] = RESUMED_P99_TARGET_MS
    return [Result(system.name, NAME, "ok", variant="region A killed (SIGKILL, every process)",
                   params={"players": players, "regions": 2, "workers_per_region": 1,
                           "topics": len(topics())}, figures=figures)]
