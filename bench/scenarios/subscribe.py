"""`subscribe`: subscribe-to-snapshot latency, with the feed running.

Two waves of `subscribe_conns` connected players each subscribe to 5 Zipf
topics, paced at `subscribe_per_s` players a second; a topic's latency runs
from the subscribe request leaving the player to that topic's snapshot
arriving (a `shed` topic is retried after `retry_after_ms`, and its latency
includes the wait, as the player lives it).

- `cold start`: the first wave finds no channel open (a worker that just
  started, or a quiet hour): the worker subscribes Redis and loads each
  topic's state while players keep arriving.
- `warm`: the second wave subscribes the same way once the channels are
  open, which is the common case: snapshots come from memory.

Peers have no snapshot in their protocol, so this scenario is oddsgate's.
"""

from __future__ import annotations

import contextlib
import time

from bench import population
from bench.counters import merge
from bench.harness import Harness, Result
from bench.systems import System

NAME = "subscribe"
PREFEED_S = 2.0


def run(h: Harness, system: System) -> list[Result]:
    p = h.p
    if not system.has_snapshots:
        return [Result(system.name, NAME, "n/a", reason="no snapshot in its protocol")]
    run_dir = h.run_dir(f"{system.name}-{NAME}")
    system.workdir = run_dir
    wave = p.subscribe_conns
    plans = population.plan(h.universe, 2 * wave, p.topics_per_conn, p.seed + 1)
    results = []
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(h.redis(run_dir))
        target = stack.enter_context(h.system(system, redis.url))
        stack.enter_context(h.feed(system, p.rate))
        time.sleep(PREFEED_S)
        pool = stack.enter_context(h.loadgens(target, plans))
        connect = h.connect_all(pool)
        for variant, upto in (("cold start", wave), ("warm", 2 * wave)):
            pool.call("reset", subscribe=True)
            sub = h.subscribe_all(pool, per_second=p.subscribe_per_s, upto=upto)
            merged = merge(pool.call("stats"))
            lat = merged["subscribe"].summary_ms()
            h.log(f"    {variant}: {lat['count']} snapshots, p50 {lat['p50_ms']} ms, "
                  f"p99 {lat['p99_ms']} ms, errors {merged['errors']}")
            result = Result(system.name, NAME, "ok", variant=variant, params={
                "connections": wave, "topics_per_conn": p.topics_per_conn,
                "players_per_s": p.subscribe_per_s, "feed_rate": round(p.rate, 1),
                "workers": system.workers(),
            }, figures={
                "subscribe_ms": lat,
                "snapshots": lat["count"],
                "synced_players": sub["synced"],
                "violations": merged["violations"],
                "violations_total": sum(merged["violations"].values()),
                "errors": merged["errors"],
            })
            if connect["open"] < len(plans):
                result.notes.append(f"only {connect['open']} of {len(plans)} connected")
            if sub["synced"] < sub["requested"]:
                result.notes.append(f"{sub['requested'] - sub['synced']} players never got "
                                    "every snapshot")
            results.append(result)
    return results
