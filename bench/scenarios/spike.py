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
left to the kernel's autotuning, as a phone's or a browser's are: a stalled
one fills its own (~200 KB here) and then backs up into the server. (They
used to be fixed at 64 KiB; over loopback, a stalled player's kernel then
dropped segments (thousands of small frames overran the memory its window
promised) and HAProxy's resend waited on a backed-off retransmission timer,
5 s after waking: the bench's artifact, not the server's.)

The stalled players read again when the spike ends, or after `STALL_MAX_S`
if it lasts longer (issue "Hardening", 7): per player, the old events it is
shown after waking (superseded before it woke: `bench.adapters.Wake`) and
the time from waking until it holds the current price of every market it
follows (the feed's newest at waking). The healthy players' latency is
measured while the others stall.
Old events are what its own receive buffer, the server's kernel send queue
and the server's pending output held; a server that bounds the last two by
coalescing shows few, one that lets the kernel queue megabytes shows them
all. The player's own receive queue at waking (FIONREAD) had already left
the server, so the old events read from those first bytes are counted
apart (`own_old_events`), and the target holds the server to the rest: what
it, HAProxy and their kernels still held for the player. Targets: at most
1,000 of those old events, current within 1 s. Players not current
`WAKE_WAIT_S` after waking count as never. Then they are cut off.
"""

from __future__ import annotations

import math
import random
import time

from bench import population
from bench.harness import Harness, Result, kernel_send_queue, limited_by, rss_bytes
from bench.scenarios.fanout import Fanout
from bench.systems import System

NAME = "spike"
WAKE_WAIT_S = 15.0
# A player silent for longer than a worker's heartbeat (OG_HEARTBEAT_MS, 20 s:
# a ping, then as long again for its pong) is closed as dead; it would never
# wake. So a stall lasts the spike, but at most this long.
STALL_MAX_S = 15.0
OLD_EVENTS_TARGET = 1_000  # per stalled player, after waking
TO_CURRENT_TARGET_MS = 1_000.0


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
    stall_s = min(p.spike_s, STALL_MAX_S)
    f.pool.call("stall", indices=stalled)
    started = time.monotonic()
    f.feed.call("spike", seconds=p.spike_s)
    f.exclude(stalled)
    during = f.measure(h, system, max(1.0, stall_s - 1.0))
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
    time.sleep(max(0.0, started + stall_s - time.monotonic()))
    woke = time.monotonic()
    wakes = during["wake"] = wake(f, stalled)
    wakes["stalled_s"] = round(woke - started, 1)
    wakes["spike_went_on"] = stall_s < p.spike_s  # woken while the spike still ran
    h.log(f"    woken after {wakes['stalled_s']:g}s: {wakes['current']} of {count} current; "
          f"old events p50/max {wakes['old_events']['p50']}/{wakes['old_events']['max']}, "
          f"to current p50/max {wakes['to_current_ms']['p50']}/"
          f"{wakes['to_current_ms']['max']} ms")
    time.sleep(max(0.0, started + p.spike_s - time.monotonic()))
    f.drop(stalled)
    return result


def wake(f: Fanout, stalled: list[int], wait_s: float = WAKE_WAIT_S) -> dict:
    """The stalled players read again; what each was shown until it held the current prices."""
    topics = sorted({t for i in stalled for t in f.plans[i]})
    heads = f.feed.call("heads", topics=topics)
    f.pool.call("wake", indices=stalled, heads=heads)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not sum(part["waiting"] for part in f.pool.call("wakes", records=False)):
            break
        time.sleep(0.1)
    records = [r for part in f.pool.call("wakes") for r in part["records"]]
    return wake_figures(records, len(stalled))


def wake_figures(records: list[dict], stalled: int) -> dict:
    """Per stalled player, from the load generators' `Wake.record()`s: p50/p99/max.

    Nearest rank over every stalled player. One that never held the current
    prices (closed, or not there within the wait) counts as never in the
    time's percentiles, which are None where it is reached; its old events
    are what it was shown by then. The maxima are None when a player never
    got there (or was not there to wake).
    """
    everyone = max(stalled, len(records))
    current = [r for r in records if r["current_ns"]]
    to_current = sorted(round((r["current_ns"] - r["woke_ns"]) / 1e6, 1) for r in current)
    old = sorted(r["old_events"] for r in records)
    # Shown from the server's side: after the bytes already in the player's
    # own receive queue when it woke.
    held = sorted(r["old_events"] - r.get("own_old_events", 0) for r in records)
    own_kb = sorted(round(r.get("own_bytes", 0) / 1024) for r in records)
    complete = bool(everyone) and len(current) == everyone

    def rank(values: list, q: float) -> float | int | None:
        k = math.ceil(q * everyone) - 1
        return values[max(0, k)] if everyone and k < len(values) else None

    return {
        "stalled": stalled,
        "woken": len(records),
        "current": len(current),
        "never_current": everyone - len(current),
        "closed": sum(1 for r in records if r["closed"] and not r["current_ns"]),
        "old_events": {"p50": rank(old, 0.5), "p99": rank(old, 0.99),
                       "max": old[-1] if old and len(old) == everyone else None},
        "server_old_events": {"p50": rank(held, 0.5), "p99": rank(held, 0.99),
                              "max": held[-1] if held and len(held) == everyone else None},
        "own_queue_kb": {"p50": rank(own_kb, 0.5),
                         "max": own_kb[-1] if own_kb and len(own_kb) == everyone else None},
        "to_current_ms": {"p50": rank(to_current, 0.5), "p99": rank(to_current, 0.99),
                          "max": to_current[-1] if complete else None},
        "events_read": sum(r["events"] for r in records),
        "old_events_target": OLD_EVENTS_TARGET,
        "to_current_target_ms": TO_CURRENT_TARGET_MS,
    }
