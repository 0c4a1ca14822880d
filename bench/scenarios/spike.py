"""`spike`: steady, then one match x50 for a while, with 2% of players stalled.

On its own population (`spike_connections` players, see session.py).

The feed's own spike (`feed.synthetic.Spike`, triggered on command here)
hits the busiest market-level market. When it starts, 2% of the
players, picked among that match's followers (seeded), stop reading: their
kernel buffers fill and the server has to hold or drop their output.
Reported: the healthy players' latency during the spike (against steady's),
and the server's memory growth over the spike divided by the stalled players:
its RSS (what the server itself queues) and, apart, its sockets' kernel send
queues (`ss`), which a server can bound with SO_SNDBUF. When the server also
falls behind its healthy players, their queues are in that growth too, so
it is an upper bound per stalled player. Players' receive buffers are
fixed at 64 KiB (bench.loadgen.PLAYER_RCVBUF), so a stalled one backs up
into the server within seconds. The stalled players are cut off when the
spike ends.
"""

from __future__ import annotations

import random
import time

from bench import population
from bench.harness import Harness, Result, kernel_send_queue, limited_by, rss_bytes
from bench.scenarios.fanout import Fanout
from bench.systems import System

NAME = "spike"


def phase(h: Harness, system: System, f: Fanout, base: Result) -> Result:
    p = h.p
    result = Result(system.name, NAME, "ok", variant=f"x{p.spike_factor:g} for {p.spike_s:g}s",
                    params={"connections": f.connected, "rate": round(p.rate, 1),
                            "spike_factor": p.spike_factor, "spike_s": p.spike_s,
                            "stalled_share": p.stalled_share, "workers": system.workers()})
    spike_topic = f.feed_info["spike_topic"]
    follow = [i for i in population.followers(f.plans, spike_topic) if i not in f.dropped]
    count = min(len(follow), round(p.stalled_share * f.connected))
    stalled = sorted(random.Random(p.seed).sample(follow, count))
    ports = {port for _, port in f.target.endpoints}
    rss_start = rss_bytes(system.processes())
    queued_start = kernel_send_queue(ports)
    f.pool.call("stall", indices=stalled)
    started = time.monotonic()
    f.feed.call("spike", seconds=p.spike_s)
    f.exclude(stalled)
    during = f.measure(h, system, max(1.0, p.spike_s - 1.0))
    rss_end = rss_bytes(system.processes())
    queued_end = kernel_send_queue(ports)
    during["limited_by"] = limited_by(during, system.workers())
    during["stalled_connections"] = count
    during["spike_topic"] = spike_topic
    during["spike_followers"] = len(follow)
    during["rss_growth_bytes"] = rss_end - rss_start
    during["memory_per_stalled_conn_bytes"] = (round((rss_end - rss_start) / count)
                                               if count else None)
    if queued_start is not None and queued_end is not None:
        during["kernel_send_queue_growth_bytes"] = queued_end - queued_start
        during["kernel_queue_per_stalled_conn_bytes"] = (
            round((queued_end - queued_start) / count) if count else None)
    during["before"] = {k: base.figures.get(k)
                        for k in ("latency_ms", "deliveries_per_s", "server_cores")}
    result.figures = during
    h.log(f"    spike: healthy p99 {during['latency_ms']['p99_ms']} ms (steady "
          f"{base.figures['latency_ms']['p99_ms']} ms), {count} stalled, server RSS "
          f"{(rss_end - rss_start) / 2**20:+.0f} MiB")
    time.sleep(max(0.0, started + p.spike_s - time.monotonic()))
    f.drop(stalled)
    return result
