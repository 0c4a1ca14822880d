"""`connect`: how fast players get in, and what an idle player costs the server.

Players connect (HTTP upgrade, then the system's own greeting: oddsgate's
`welcome`, Socket.IO's namespace ack, NATS's PONG) from several loopback
source addresses, `connect_concurrency` at a time per load generator. Each
stage (10k, then 50k in a full run) reports connections per second and the
server's RSS growth per connection once they sit idle (no subscriptions).

Through HAProxy (issue 5 asks for it): the same on a whole node
(`oddsgate+haproxy`, bench.systems.OddsgateNode), every player with its own
session cookie; HAProxy holds two descriptors per player, so its stage is as
large as RLIMIT_NOFILE allows (9,000 players under this machine's 20,000).
"""

from __future__ import annotations

import contextlib
import math
import time

from bench.counters import merge
from bench.harness import SOURCE_ADDRESSES, Harness, Result, rss_bytes
from bench.systems import Oddsgate, OddsgateNode, System

NAME = "connect"
SETTLE_S = 1.5
FD_MARGIN = 1000  # descriptors a process keeps for everything but players


def run(h: Harness, system: System) -> list[Result]:
    p = h.p
    per_process = h.nofile - FD_MARGIN
    counts = sorted(p.connect_counts)
    results = []
    notes = []
    if isinstance(system, OddsgateNode):
        cap = system.player_capacity(h.nofile) // 1000 * 1000
        if counts[-1] > cap:
            notes.append(f"through HAProxy at most {cap:,} players here: HAProxy holds two "
                         f"descriptors per player and RLIMIT_NOFILE is {h.nofile} (raising "
                         f"it needs CAP_SYS_RESOURCE); stages of {counts[-1]:,} need more")
        counts = sorted({min(c, cap) for c in counts})
    elif not isinstance(system, Oddsgate):
        # one server process: it can hold no more than its descriptor limit
        for count in [c for c in counts if c > per_process]:
            results.append(Result(
                system.name, NAME, "skipped", variant=f"{count // 1000}k idle",
                reason=f"skipped: one process may open {h.nofile} files here (RLIMIT_NOFILE "
                       f"hard limit; raising it needs CAP_SYS_RESOURCE)"))
        counts = [c for c in counts if c <= per_process]
    elif counts[-1] > per_process * system.count:
        system.count = math.ceil(counts[-1] / per_process)
    if not counts:
        return results
    loadgens = max(p.loadgens, math.ceil(counts[-1] / per_process))
    run_dir = h.run_dir(f"{system.name}-{NAME}")
    system.workdir = run_dir
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(h.redis(run_dir))
        target = stack.enter_context(h.system(system, redis.url))
        time.sleep(SETTLE_S)
        rss_base = rss_bytes(system.processes())
        pool = stack.enter_context(h.loadgens(target, [[] for _ in range(counts[-1])],
                                              processes=loadgens))
        for count in counts:
            stage = h.connect_all(pool, upto=count)
            time.sleep(SETTLE_S)
            procs = system.processes()
            rss = rss_bytes(procs)
            stats = pool.call("stats")
            merged = merge(stats)
            new = stage["attempted"]
            opened = sum(s["open"] for s in stats)
            per_s = new / stage["seconds"] if stage["seconds"] else None
            h.log(f"    {opened} open ({per_s:.0f}/s), server RSS {rss / 2**20:.0f} MiB")
            result = Result(system.name, NAME, "ok", variant=f"{count // 1000}k idle", params={
                "connections": count, "concurrency_per_loadgen": p.connect_concurrency,
                "loadgens": len(pool.pipes), "source_addresses": len(SOURCE_ADDRESSES),
                "via": target.via, "workers": system.workers(),
            }, figures={
                "open_connections": opened,
                "connections_per_s": round(per_s, 1) if per_s else None,
                "connect_latency_ms": merged["connect"].summary_ms(),
                "failures": stage["failures"],
                "rss_bytes": rss,
                "rss_base_bytes": rss_base,
                "rss_per_conn_bytes": round((rss - rss_base) / opened) if opened else None,
                "violations_total": sum(merged["violations"].values()),
                "lost_connections": merged["lost"],
            })
            if opened < count:
                result.notes.append(f"{count - opened} connections failed: {stage['failures']}")
            result.notes += notes
            results.append(result)
    return results

