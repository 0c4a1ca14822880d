"""`drain`: drain a worker holding 5,000 players; how soon each is back on another.

Runs on a whole node (`bench.systems.OddsgateNode`: `oddsgate run --haproxy`,
2 workers, HAProxy in front), and shares its population with the node's
`steady` (one session, so a run pays for one setup):

1. Every worker but 0 is drained first (the supervisor's control socket,
   `{"cmd":"drain"}`), so that the `drain_connections` players, connecting
   through HAProxy each with its own `og_session` cookie, all land on worker
   0 (their `welcome` says so). They subscribe and the feed runs.
2. The other workers are undrained and HAProxy sees them UP again. A few
   anonymous connections straight to each worker keep every topic's channel
   open there, as the popular topics of a busy node are.
3. `steady` (when asked): publish-to-receipt through HAProxy, measured as the
   direct `steady` is, with the same players on one worker: the difference
   with the direct figure is what HAProxy's hop costs.
4. `drain`: worker 0 is drained: the measured move.

The load generator follows every `reconnect` hint (bench.loadgen
`follow_hints`): it waits `after_ms`, connects to the same frontend (retrying
as the client library does: full-jitter backoff) and resubscribes with
`{"epoch","seq"}` per topic, its §5 check state carried over. A player's
resume time runs from its hint (the `reconnect` frame's receipt plus its
`after_ms`) to its resume being complete on the new worker: `subscribed`
received, and the snapshot of every topic that got a `reset`. The replay
that follows is not timed, but every event is checked, and the run waits a
moment after the last resume for late resets and violations. A player that
got a `reset` is counted as resumed-with-reset, apart.

Reported: players, how many resumed (with and without reset), the spread of
their resume times (p50/p90/p99/max, share within 500 ms: the target is
99%), when they were told and due and when they arrived (histograms from the
drain command), the resume rate the node sustained, CPU during the move, and
violations, topic resets and errors across the move.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

from bench import population
from bench.counters import merge
from bench.harness import Harness, Result, cpu_seconds, machine_split, rss_bytes
from bench.scenarios import steady
from bench.scenarios.fanout import SUBSCRIBE_WAIT_S, Fanout
from bench.systems import OddsgateNode, System

NAME = "drain"
SESSION = ("steady", "drain")  # what one node session measures, in this order
HINT_TARGET_MS = 500.0  # drained players resumed on other workers: 99% within this of the hint
TARGET_SHARE = 0.99
TAIL_S = 1.0  # after the last resume: late resets, replays and violations are seen too
BUCKETS_MS = (100, 250, 500, 1000, 2000, 5000, 10_000)
MAX_BUCKETS = 40


def run(h: Harness, system: System) -> list[Result]:
    if not isinstance(system, OddsgateNode):
        return [Result(system.name, NAME, "n/a",
                       reason="needs a whole node (oddsgate run --haproxy): see oddsgate+haproxy")]
    return run_node_session(h, system, [NAME])


def run_node_session(h: Harness, system: OddsgateNode, scenarios: list[str]) -> list[Result]:
    """The node's steady and drain on one population (see the module's docstring)."""
    p = h.p
    cap = system.player_capacity(h.nofile)
    players = min(p.drain_connections, cap - 1000)
    results: list[Result] = []
    with _gathered(h, system, players) as f:
        time.sleep(p.warmup_s)
        if "steady" in scenarios:
            result = steady.phase(h, system, f)
            result.params.update(via="haproxy", players_per_worker=_workers(f))
            result.notes += f.notes
            why = (f"HAProxy holds two descriptors per player, {cap:,} players at most under "
                   f"RLIMIT_NOFILE {h.nofile}" if players < p.drain_connections else
                   "the drain's population (`drain_connections`), whose setup this shares")
            result.notes.append(
                f"through HAProxy: {f.connected:,} players, all on worker 0 of "
                f"{system.count} (the drain needs them on one worker): one worker's load "
                "plus HAProxy's hop"
                + (f"; not {p.connections:,} as in the direct run: {why}"
                   if players != p.connections else ""))
            results.append(result)
        if "drain" in scenarios:
            held = _workers(f).get("0", 0)
            f.pool.call("follow_hints", on=True)
            result = move(h, system, f, [0], variant=f"worker 0 holding {held:,} players")
            result.notes += f.notes
            results.append(result)
    return results


@contextlib.contextmanager
def _gathered(h: Harness, system: OddsgateNode, players: int) -> Iterator[Fanout]:
    """A node whose `players` all sit on worker 0, the others ready and warm; feed on."""
    p = h.p
    run_dir = h.run_dir(f"{system.name}-{NAME}")
    system.workdir = run_dir
    others = list(range(1, system.count))
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(h.redis(run_dir))
        target = stack.enter_context(h.system(system, redis.url))
        for worker in others:
            system.command(cmd="drain", worker=worker)
        system.wait(lambda s: all(not str((s.get("haproxy") or {}).get(f"w{w}", "UP"))
                                  .startswith("UP") for w in others),
                    "HAProxy sees the other workers drained")
        time.sleep(0.5)
        rss_base = rss_bytes(system.processes())
        plans = population.plan(h.universe, players, p.topics_per_conn, p.seed)
        pool = stack.enter_context(h.loadgens(target, plans))
        connect = h.connect_all(pool)
        warm = pool.call_one(0, "warm", timeout=180, topics=h.universe.topics,
                             endpoints=target.backends[:1])
        sub = h.subscribe_all(pool, per_second=p.setup_subscribe_per_s, timeout=SUBSCRIBE_WAIT_S)
        feed, info = stack.enter_context(h.feed(system, p.rate))
        for worker in others:
            system.command(cmd="undrain", worker=worker)
        system.wait_ready()
        warm_others = pool.call_one(0, "warm", timeout=180, topics=h.universe.topics,
                                    endpoints=target.backends[1:])
        f = Fanout(target, redis, pool, feed, info, plans, connect["open"], sub["synced"],
                   rss_base, population.follower_counts(plans),
                   setup={"connect": connect, "warm": warm, "warm_others": warm_others,
                          "subscribe": sub})
        where = _workers(f)
        if connect["open"] < len(plans):
            f.notes.append(f"only {connect['open']} of {len(plans)} connections opened: "
                           f"{connect['failures']}")
        if sub["synced"] < sub["requested"]:
            f.notes.append(f"only {sub['synced']} of {sub['requested']} players got every "
                           "snapshot or subscription ack")
        if set(where) != {"0"}:
            f.notes.append(f"players per worker before the drain: {where} (all on 0 wanted)")
        h.log(f"    {connect['open']} connected through HAProxy in {connect['seconds']:.1f}s "
              f"(per worker {where}), {sub['synced']} subscribed in {sub['seconds']:.1f}s; "
              f"workers {others} undrained and warm; feed at {p.rate:.0f} events/s")
        yield f


def move(h: Harness, system: OddsgateNode, f: Fanout, drained: list[int],
         variant: str) -> Result:
    """Drain `drained`, follow every player to its new worker, and say how it went."""
    p = h.p
    pool = f.pool
    _finish_moves(pool)
    where = _workers(f)
    players = sum(where.get(str(w), 0) for w in drained)
    pool.call("moves", clear=True, records=False)
    procs = system.processes()
    stats0 = pool.call("stats")
    before = merge(stats0)
    cpu0, busy0 = cpu_seconds(procs), machine_split()
    # the node may stretch its window to the crowd: wait for the last one due, not a guess
    settings = system.node_settings
    window_ms, settle_ms = settings.drain_window_ms, settings.drain_settle_ms
    started = time.monotonic()
    drain_ns = time.time_ns()
    for worker in drained:
        system.command(cmd="drain", worker=worker)
    hints_by = started + (settle_ms + window_ms) / 1000 + 3.0
    deadline = started + (settle_ms + window_ms) / 1000 + p.drain_wait_s
    progress: dict = {}
    while time.monotonic() < deadline:
        time.sleep(0.25)
        progress = _progress(pool.call("moves", records=False))
        if progress["last_due_ns"]:
            last_due = started + (progress["last_due_ns"] - drain_ns) / 1e9
            deadline = max(deadline, last_due + p.drain_wait_s)
        if progress["hinted"] and not progress["waiting"] \
                and (progress["hinted"] >= players or time.monotonic() > hints_by):
            break
    waited = time.monotonic() - started
    cpu1, busy1 = cpu_seconds(procs), machine_split()
    stats1 = pool.call("stats")
    time.sleep(TAIL_S)
    records = [r for part in pool.call("moves") for r in part["records"]]
    after = merge(pool.call("stats"))
    status = system.command(cmd="status")
    fig = drain_figures(records, players, drain_ns, drained, HINT_TARGET_MS)
    fig["server_cores"] = round((cpu1 - cpu0) / waited, 3)
    fig["loadgen_cores"] = round(sum(b["cpu_s"] - a["cpu_s"]
                                     for a, b in zip(stats0, stats1, strict=True)) / waited, 3)
    fig["machine_cores_busy"] = round((busy1[0] - busy0[0]) / waited, 3)
    fig["softirq_cores"] = round((busy1[1] - busy0[1]) / waited, 3)
    fig["violations"] = _delta(after["violations"], before["violations"])
    fig["violations_total"] = sum(fig["violations"].values())
    fig["topic_resets"] = after["resets"] - before["resets"]
    fig["errors"] = _delta(after["errors"], before["errors"])
    fig["lost_connections"] = after["lost"] - before["lost"]
    fig["players_per_worker_before"] = where
    fig["players_per_worker_after"] = _workers(f)
    fig["worker_connections_after"] = {str(w["index"]): w["connections"]
                                       for w in status["workers"]}
    fig["waited_s"] = round(waited, 2)
    result = Result(system.name, NAME, "ok", variant=variant, params={
        "players": players, "drained_workers": drained, "workers": system.count,
        "node_settings": dict(system.env), "via": "haproxy",
        "feed_rate": round(p.rate, 1), "topics_per_conn": p.topics_per_conn,
        "target_ms": HINT_TARGET_MS,
    }, figures=fig)
    if progress and progress["hinted"] < players:
        result.notes.append(f"only {progress['hinted']} of {players} players got a hint")
    if fig["not_resumed"]:
        result.notes.append(f"{fig['not_resumed']} players not resumed within "
                            f"{waited:.0f}s: {fig['failures'] or 'no failure reported'}")
    lat = fig["resume_ms"]
    h.log(f"    drain ({variant}): {fig['resumed']}/{players} resumed "
          f"({fig['resumed_with_reset']} with reset), after their hint p50 {lat['p50']} ms, "
          f"p99 {lat['p99']} ms, max {lat['max']} ms; {fig['within_target_share']:.1%} within "
          f"{HINT_TARGET_MS:.0f} ms; peak {fig['peak_resumes_per_s']} resumes/s; violations "
          f"{fig['violations_total']}")
    return result


def drain_figures(records: list[dict], players: int, drain_ns: int, drained: list[int],
                  target_ms: float = HINT_TARGET_MS) -> dict:
    """What one move says, from the load generators' `Move.record()`s.

    `players` is how many were on the drained workers when the drain began;
    a player that never resumed counts against every share and percentile
    (as never), so p99 is None when more than 1% are missing.
    """
    everyone = max(players, len(records))
    resumed = [r for r in records if r["resumed_ns"]]
    clean = [r for r in resumed if not r["resets"]]
    late_ms = sorted((r["resumed_ns"] - r["hint_ns"]) / 1e6 - r["after_ms"] for r in resumed)
    arrivals = sorted((r["resumed_ns"] - drain_ns) / 1e6 for r in resumed)
    due = sorted((r["hint_ns"] - drain_ns) / 1e6 + r["after_ms"] for r in records)
    hints = sorted((r["hint_ns"] - drain_ns) / 1e6 for r in records)
    after_ms = [r["after_ms"] for r in records]
    failures: dict[str, int] = {}
    for r in records:
        if not r["resumed_ns"]:
            why = r["failure"] or ("connected, resume not complete" if r["connected_ns"]
                                   else "not reconnected")
            if r.get("abandoned"):
                why = f"given up ({why})"
            failures[why] = failures.get(why, 0) + 1
    within = sum(1 for v in late_ms if v <= target_ms)
    fig: dict = {
        "players": players,
        "hinted": len(records),
        "resumed": len(resumed),
        "resumed_without_reset": len(clean),
        "resumed_with_reset": len(resumed) - len(clean),
        "not_resumed": everyone - len(resumed),
        "resumed_without_reset_share": _ratio(len(clean), everyone),
        "moved_to_other_worker": sum(1 for r in resumed if r["to_worker"] not in drained),
        "reconnect_attempts_failed": sum(max(0, r["attempts"] - 1) for r in resumed)
        + sum(r["attempts"] for r in records if not r["resumed_ns"]),
        "failures": failures,
        "resume_ms": {
            "p50": _rank(late_ms, everyone, 0.50),
            "p90": _rank(late_ms, everyone, 0.90),
            "p99": _rank(late_ms, everyone, 0.99),
            "max": round(late_ms[-1], 1) if late_ms else None,  # of those that resumed
            "mean": round(sum(late_ms) / len(late_ms), 1) if late_ms else None,
            "min": round(late_ms[0], 1) if late_ms else None,
        },
        "target_ms": target_ms,
        "within_target": within,
        "within_target_share": _ratio(within, everyone),
        "target_met": bool(everyone) and within >= math.ceil(TARGET_SHARE * everyone),
        "after_ms": {"min": min(after_ms, default=None), "max": max(after_ms, default=None)},
        # from the drain command, in ms
        "first_hint_ms": round(hints[0], 1) if hints else None,
        "last_hint_ms": round(hints[-1], 1) if hints else None,
        "last_due_ms": round(due[-1], 1) if due else None,
        "first_resumed_ms": round(arrivals[0], 1) if arrivals else None,
        "resumed_99_ms": _rank(arrivals, everyone, TARGET_SHARE),
        "last_resumed_ms": round(arrivals[-1], 1) if arrivals else None,
    }
    fig.update(_histograms(due, arrivals))
    span_s = (arrivals[-1] - due[0]) / 1000 if arrivals and due else 0.0
    fig["mean_resumes_per_s"] = round(len(resumed) / span_s) if span_s > 0 else None
    return fig


def _histograms(due: list[float], arrivals: list[float]) -> dict:
    """Players due and players resumed per bucket, from the first one due."""
    if not due and not arrivals:
        return {"histogram": None, "peak_resumes_per_s": None}
    start = min([*due[:1], *arrivals[:1]])
    end = max([*due[-1:], *arrivals[-1:]])
    bucket = next((b for b in BUCKETS_MS if (end - start) / b < MAX_BUCKETS), BUCKETS_MS[-1])
    start = math.floor(start / bucket) * bucket
    count = int((end - start) // bucket) + 1

    def counts(values: list[float]) -> list[int]:
        out = [0] * count
        for v in values:
            out[min(count - 1, int((v - start) // bucket))] += 1
        return out

    resumed = counts(arrivals)
    return {"histogram": {"start_ms": start, "bucket_ms": bucket, "due": counts(due),
                          "resumed": resumed},
            "peak_resumes_per_s": round(max(resumed) * 1000 / bucket)}


def _rank(sorted_values: list[float], everyone: int, q: float) -> float | None:
    """Nearest-rank percentile over `everyone`, the missing ones counting as never."""
    if not everyone:
        return None
    k = math.ceil(q * everyone) - 1
    if k >= len(sorted_values):
        return None
    return round(sorted_values[max(0, k)], 1)


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in out.items() if v}


def _progress(parts: list[dict]) -> dict:
    out = {k: sum(p[k] for p in parts) for k in ("hinted", "resumed", "waiting")}
    out["last_due_ns"] = max((p["last_due_ns"] for p in parts), default=0)
    return out


def _finish_moves(pool, timeout: float = 15.0) -> None:
    """Let the players still moving (an earlier move's last ones) arrive, or give them up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _progress(pool.call("moves", records=False))["waiting"]:
            return
        time.sleep(0.25)
    pool.call("follow_hints", on=False)  # abandons them: they count in no later move
    pool.call("follow_hints", on=True)


def _workers(f: Fanout) -> dict[str, int]:
    """Open players per worker (their `welcome`), over every load generator."""
    out: dict[str, int] = {}
    for part in f.pool.call("workers"):
        for worker, n in part.items():
            out[worker] = out.get(worker, 0) + n
    return dict(sorted(out.items()))
