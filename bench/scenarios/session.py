"""Fan-out sessions: set a population up, run a scenario's phases on it (see fanout.py).

- `run_steady_session`: `connections` players (10,000), measured at the base
  rate, and profiled if asked. Steady and saturation check a sample of the
  players (`check_share`; every player counts its events).
- `run_spike_session`: `spike_connections` players: steady first (what the
  spike is compared with), then the spike. Every player checked: a stalled
  one that wakes is watched event by event.
- `run_saturation_session`: the rate ladder on `saturation_connections`
  players.

Spike and saturation have smaller populations because of what this machine
can carry: one event's fan-out to every follower of a hot topic takes
longer than 50 ms here with 10,000 players, whatever the rate (the ladder
would say nothing), and x50 on a match followed by 6,700 players makes more
deliveries than the load generators can read on the cores the server leaves
them (the healthy players' latency would be the load generators' backlog).
A phase that fails is recorded as failed; what was measured before it is
kept.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from bench import population
from bench.harness import Harness, Result, rss_bytes
from bench.scenarios import saturation, spike, steady
from bench.scenarios.fanout import SUBSCRIBE_WAIT_S, Fanout
from bench.systems import System


@contextlib.contextmanager
def _population(h: Harness, system: System, label: str, connections: int,
                check_share: float = 1.0) -> Iterator[Fanout]:
    p = h.p
    run_dir = h.run_dir(f"{system.name}-{label}")
    system.workdir = run_dir
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(h.redis(run_dir))
        target = stack.enter_context(h.system(system, redis.url))
        time.sleep(0.5)
        rss_base = rss_bytes(system.processes())
        plans = population.plan(h.universe, connections, p.topics_per_conn, p.seed)
        pool = stack.enter_context(h.loadgens(target, plans, check_share=check_share))
        connect = h.connect_all(pool)
        # through HAProxy, the warming connections go to each worker straight
        warm = pool.call_one(0, "warm", timeout=180, topics=h.universe.topics,
                             endpoints=target.backends or None)
        sub = h.subscribe_all(pool, per_second=p.setup_subscribe_per_s, timeout=SUBSCRIBE_WAIT_S)
        notes = []
        if connect["open"] < len(plans):
            notes.append(f"only {connect['open']} of {len(plans)} connections opened: "
                         f"{connect['failures']}")
        if sub["synced"] < sub["requested"]:
            notes.append(f"only {sub['synced']} of {sub['requested']} players got every "
                         f"snapshot or subscription ack")
        feed, info = stack.enter_context(h.feed(system, p.rate))
        h.log(f"    {connect['open']} connected in {connect['seconds']:.1f}s, "
              f"{warm['topics']} topics warmed in {warm['seconds']:.1f}s, "
              f"{sub['synced']} subscribed in {sub['seconds']:.1f}s; feed at {p.rate:.0f} "
              f"events/s")
        yield Fanout(target, redis, pool, feed, info, plans, connect["open"], sub["synced"],
                     rss_base, population.follower_counts(plans),
                     setup={"connect": connect, "warm": warm, "subscribe": sub}, notes=notes)


def run_steady_session(h: Harness, system: System) -> list[Result]:
    with _population(h, system, "steady", h.p.connections, h.p.check_share) as f:
        time.sleep(h.p.warmup_s)
        return [steady.phase(h, system, f, profile=h.p.profile)]


def run_spike_session(h: Harness, system: System) -> list[Result]:
    with _population(h, system, "spike", h.p.spike_connections) as f:
        time.sleep(h.p.warmup_s)
        base = steady.phase(h, system, f)
        try:
            return [spike.phase(h, system, f, base)]
        except Exception as exc:
            h.log(f"    spike failed: {type(exc).__name__}: {exc}")
            return [Result(system.name, spike.NAME, "failed",
                           reason=f"{type(exc).__name__}: {str(exc)[:300]}")]


def run_saturation_session(h: Harness, system: System) -> list[Result]:
    with _population(h, system, "saturation", h.p.saturation_connections,
                     h.p.check_share) as f:
        time.sleep(h.p.warmup_s)
        return [saturation.phase(h, system, f)]


SESSIONS = {"steady": run_steady_session, "spike": run_spike_session,
            "saturation": run_saturation_session}
