"""What every scenario needs: parameters, Redis, load generators, a feed, a measurement.

A scenario run is one system on one scenario, set up from nothing and torn
down completely (`contextlib.ExitStack`), so runs cannot leak into each
other. `measure()` turns one interval into the figures every run reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from bench.adapters import CHECK_SHARE
from bench.counters import merge
from bench.feedproc import FeedProcess, open_markets
from bench.loadgen import LoadGenPool, LoadSpec, split_plans
from bench.peers.install import Availability
from bench.population import Universe
from bench.systems import System, Target
from supervisor.embedded_redis import EmbeddedRedis

SEED_PEAK_EVENTS_PER_S = 800_000 / 60  # issue 5: the seed's peak, 800,000 events a minute
SOURCE_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 10)]


FACTOR_PER_CORE = 0.0005  # the default scale: 0.001 of the seed's peak on 2 cores


@dataclass
class Params:
    quick: bool
    seed: int = 1
    factor: float = FACTOR_PER_CORE * (os.cpu_count() or 1)  # of SEED_PEAK_EVENTS_PER_S
    connections: int = 10_000  # steady and spike
    topics_per_conn: int = 5
    warmup_s: float = 3.0
    measure_s: float = 8.0
    loadgens: int = 2
    workers: int = 1
    connect_concurrency: int = 32  # per load generator
    connect_counts: list[int] = field(default_factory=lambda: [10_000, 50_000])
    subscribe_conns: int = 2_000
    subscribe_per_s: float = 500.0  # players subscribing (5 topics each) per second
    setup_subscribe_per_s: float = 4000.0  # how fast a fan-out population subscribes
    spike_connections: int = 2_000
    spike_factor: float = 50.0
    spike_s: float = 30.0
    stalled_share: float = 0.02
    saturation_connections: int = 1_000
    # players whose events are checked (§5) and timed, in steady and saturation; the
    # others only count (bench.adapters: the load generator's cost per event)
    check_share: float = CHECK_SHARE
    saturation_steps: list[float] = field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    saturation_settle_s: float = 1.0
    saturation_measure_s: float = 2.5
    p99_limit_ms: float = 50.0
    node_workers: int = 2  # workers of the node under `oddsgate run --haproxy`
    drain_connections: int = 5_000  # the node session's players: all on one worker, drained
    drain_wait_s: float = 30.0  # after the hints' window, for the last players to resume
    node_env: dict = field(default_factory=dict)  # OG_* settings of the node (--node-setting)
    shell_loads: int = 15  # page loads per shell variant (cold cache, warm cache)
    shell_mobile_loads: int = 6  # and behind the mobile network's throttling
    profile: bool = False
    profile_s: float = 8.0

    @property
    def rate(self) -> float:
        return SEED_PEAK_EVENTS_PER_S * self.factor

    @classmethod
    def for_mode(cls, quick: bool, **overrides: object) -> Params:
        p = cls(quick=quick)
        if quick:
            p.connections = 5_000
            p.warmup_s, p.measure_s = 1.0, 4.0
            p.connect_counts = [10_000]
            p.subscribe_conns = 1_000
            p.spike_s = 4.0
            p.spike_connections = 1_000
            p.saturation_steps = [2, 8, 32, 64]
            p.saturation_settle_s, p.saturation_measure_s = 0.5, 2.0
            p.profile_s = 5.0
            p.drain_connections, p.drain_wait_s = 2_000, 20.0
            p.shell_loads, p.shell_mobile_loads = 10, 3
        for key, value in overrides.items():
            if value is not None:
                setattr(p, key, value)
        return p

    def to_dict(self) -> dict:
        return asdict(self)

    def estimate_s(self, scenarios: list[str], fd_limit: int | None = None,
                   node: bool = False) -> float:
        """About how long a job takes here, so a run can stop before its time limit.

        `node`: the job runs a whole node (`oddsgate run --haproxy`), whose
        steady and drain share one session (bench.scenarios.drain)."""
        if node and scenarios[0] != "connect":
            players = self.drain_connections
            # start the node, connect through HAProxy, subscribe, warm
            total = 8.0 + players / 900 + players / self.setup_subscribe_per_s
            if "steady" in scenarios:
                total += self.warmup_s + self.measure_s
            if "drain" in scenarios:  # resumes ran at ~250-900/s on this 2-core machine
                total += 3.0 + players / 300
            return total
        if scenarios[0] == "steady":
            profile = self.profile_s + 2 if self.profile else 0.0
            return 5.5 + self.connections / 1200 + self.warmup_s + self.measure_s + profile
        if scenarios[0] == "spike":  # the stalled players' wake takes a second or two
            return (5.5 + self.spike_connections / 1200 + self.warmup_s + self.measure_s
                    + self.spike_s + 4)
        if scenarios[0] == "saturation":
            step = self.saturation_settle_s + self.saturation_measure_s
            # the ladder, then up to 3 bisection probes (a 2x gap to 10%)
            return 2.5 + self.saturation_connections / 1200 + self.warmup_s + 8 * step + 10
        if scenarios[0] == "connect":
            counts = [c for c in self.connect_counts if fd_limit is None or c <= fd_limit]
            if node:  # one stage as large as HAProxy's descriptors allow
                counts = [min(c, fd_limit or c) for c in self.connect_counts]
                return 8.0 + max(counts, default=0) / 800
            return 6.0 + max(counts, default=0) / 1000
        if scenarios[0] == "subscribe":
            return 8.0 + 2 * self.subscribe_conns / self.subscribe_per_s
        if scenarios[0] == "clicks":  # bench.scenarios.clicks: start, 4 phases, stop
            return 10.0 + (9.0 + 2 * 3.0 if self.quick else 40.0 + 2 * 10.0)
        if scenarios[0] == "shell":  # ~0.5 s a loopback load, ~2.3 s a throttled one
            return 4.0 + 2 * self.shell_loads * 0.5 + self.shell_mobile_loads * 2.3
        return 0.0


@dataclass
class Result:
    system: str
    scenario: str
    status: str  # ok | failed | skipped | unavailable | n/a
    variant: str = ""
    reason: str = ""
    params: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


def rss_bytes(procs: list[psutil.Process]) -> int:
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def kernel_send_queue(ports: set[int]) -> int | None:
    """Bytes the kernel holds unsent for established TCP sockets on these local ports."""
    try:
        out = subprocess.run(["ss", "-tnH", "state", "established"], capture_output=True,
                             text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2].rpartition(":")[2].isdigit() \
                and int(parts[2].rpartition(":")[2]) in ports:
            total += int(parts[1])
    return total


def machine_busy() -> float:
    """CPU seconds spent by the whole machine so far (all cores, not idle)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def machine_split() -> tuple[float, float, float]:
    """(busy, softirq, steal) CPU seconds so far: softirq is mostly loopback packet work
    no process is charged for; steal is time the hypervisor gave to other guests."""
    t = psutil.cpu_times()
    return machine_busy(), t.softirq + t.irq, getattr(t, "steal", 0.0)


class Harness:
    def __init__(self, params: Params, avail: Availability, workdir: Path | None = None,
                 log=print, nofile: int = 1024) -> None:
        self.p = params
        self.nofile = nofile
        self.tree = Path(__file__).resolve().parent.parent  # where oddsgate workers run from
        self.avail = avail
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="oddsgate-bench-"))
        self.universe = Universe.build(params.seed)
        self.log = log
        self._runs = 0

    def run_dir(self, label: str) -> Path:
        self._runs += 1
        path = self.workdir / f"{self._runs:02d}-{label}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def redis(self, run_dir: Path) -> Iterator[EmbeddedRedis]:
        server = EmbeddedRedis(run_dir / "redis", port=0)
        server.start()
        try:
            yield server
        finally:
            server.stop()

    @contextlib.contextmanager
    def system(self, system: System, redis_url: str) -> Iterator[Target]:
        try:
            target = system.start(redis_url)
            if system.emitter == "lua":
                asyncio.run(open_markets(redis_url, self.p.seed))
        except BaseException:
            system.stop()
            raise
        try:
            yield target
        finally:
            system.stop()

    @contextlib.contextmanager
    def loadgens(self, target: Target, plans: list[list[str]], processes: int | None = None,
                 check_share: float = 1.0) -> Iterator[LoadGenPool]:
        """`check_share`: the share of players checked (the rest count; see bench.adapters);
        1 unless a scenario needs only counts and latency from a sample."""
        indexed = list(enumerate(plans))
        count = max(1, min(processes or self.p.loadgens, len(indexed)))
        specs = [LoadSpec(target.protocol, target.endpoints, SOURCE_ADDRESSES, share,
                          token_secret=target.token_secret, check_share=check_share)
                 for share in split_plans(indexed, count)]
        pool = LoadGenPool(specs)
        try:
            yield pool
        finally:
            pool.close()

    @contextlib.contextmanager
    def feed(self, system: System, rate: float) -> Iterator[tuple[FeedProcess, dict]]:
        proc = FeedProcess()
        try:
            info = proc.call("start", emitter=system.emitter, address=system.feed_address,
                             rate=rate, seed=self.p.seed, spike_factor=self.p.spike_factor)
            yield proc, info
        finally:
            proc.close()

    def connect_all(self, pool: LoadGenPool, upto: int | None = None) -> dict:
        timeout = 60 + (upto or self.p.connections) / 200
        parts = pool.call("connect", timeout=timeout + 10, upto=upto,
                          concurrency=self.p.connect_concurrency, deadline_s=timeout)
        failures: dict[str, int] = {}
        for part in parts:
            for why, n in part["failures"].items():
                failures[why] = failures.get(why, 0) + n
        return {"open": sum(p["open"] for p in parts),
                "attempted": sum(p["attempted"] for p in parts),
                "seconds": max(p["seconds"] for p in parts), "failures": failures}

    def subscribe_all(self, pool: LoadGenPool, per_second: float | None = None,
                      timeout: float = 90.0, upto: int | None = None) -> dict:
        per_proc = per_second / len(pool.pipes) if per_second else None
        parts = pool.call("subscribe", timeout=timeout + 30, per_second=per_proc,
                          wait_s=timeout, upto=upto)
        return {"requested": sum(p["requested"] for p in parts),
                "synced": sum(p["synced"] for p in parts),
                "seconds": max(p["seconds"] for p in parts)}

    def measure(self, pool: LoadGenPool, system: System, seconds: float, *,
                connections: int, rss_base: int, feed: FeedProcess | None = None,
                redis: EmbeddedRedis | None = None,
                followers: dict[str, int] | None = None) -> dict:
        procs = system.processes()
        redis_procs = [psutil.Process(redis.pid)] if redis and redis.pid else []
        pool.call("reset")
        cpu0, rcpu0, busy0 = cpu_seconds(procs), cpu_seconds(redis_procs), machine_split()
        feed0 = feed.call("stats") if feed else None
        t0 = time.monotonic()
        time.sleep(seconds)
        parts = pool.call("stats")
        wall = time.monotonic() - t0
        cpu1, rcpu1, busy1 = cpu_seconds(procs), cpu_seconds(redis_procs), machine_split()
        feed1 = feed.call("stats") if feed else None
        if feed1 and feed1.get("failed"):
            raise RuntimeError(f"the bench feed stopped: {feed1['failed']}")
        rss = rss_bytes(procs)
        return figures(parts, wall, server_cpu=cpu1 - cpu0, redis_cpu=rcpu1 - rcpu0,
                       machine_cpu=tuple(b - a for a, b in zip(busy0, busy1, strict=True)),
                       feed0=feed0, feed1=feed1,
                       connections=connections, rss=rss, rss_base=rss_base,
                       followers=followers)


def figures(parts: list[dict], wall: float, *, server_cpu: float, redis_cpu: float,
            machine_cpu: tuple[float, float, float], feed0: dict | None,
            feed1: dict | None, connections: int, rss: int, rss_base: int,
            followers: dict[str, int] | None) -> dict:
    merged = merge(parts)
    deliveries = merged["deliveries"]
    published = (feed1["sent"] - feed0["sent"]) if feed0 and feed1 else 0
    events_per_s = published / wall if wall else 0.0
    out: dict = {
        "seconds": round(wall, 2),
        "connections": connections,
        "open_connections": sum(p["open"] for p in parts),
        # the players whose events were checked (§5) and timed; the others only counted
        "checked_connections": sum(p.get("checked_open", 0) for p in parts),
        "events_per_s": round(events_per_s, 1),
        "deliveries": deliveries,
        "deliveries_per_s": round(deliveries / wall, 1) if wall else 0.0,
        "frames_per_s": round(merged["frames"] / wall, 1) if wall else 0.0,
        "latency_ms": merged["latency"].summary_ms(),
        "server_cpu_s": round(server_cpu, 3),
        "server_cores": round(server_cpu / wall, 3) if wall else 0.0,
        "deliveries_per_server_cpu_s": round(deliveries / server_cpu) if server_cpu else None,
        "server_cpu_s_per_million": (round(server_cpu / deliveries * 1e6, 3)
                                     if deliveries else None),
        "rss_bytes": rss,
        "rss_per_conn_bytes": round((rss - rss_base) / connections) if connections else None,
        "violations": merged["violations"],
        "violations_total": sum(merged["violations"].values()),
        "coalesced": merged["coalesced"],
        "resets": merged["resets"],
        "errors": merged["errors"],
        "lost_connections": merged["lost"],
        "loadgen_cores": round(sum(p["cpu_s"] for p in parts) / wall, 3) if wall else 0.0,
        "loadgen_max_core": round(max(p["cpu_s"] / p["wall_s"] for p in parts), 3),
        "redis_cores": round(redis_cpu / wall, 3) if wall else 0.0,
        "machine_cores_busy": round(machine_cpu[0] / wall, 3) if wall else 0.0,
        "softirq_cores": round(machine_cpu[1] / wall, 3) if wall else 0.0,
        "steal_cores": round(machine_cpu[2] / wall, 3) if wall else 0.0,
        "machine_cores": os.cpu_count(),
    }
    accounted = (out["server_cores"] + out["loadgen_cores"] + out["redis_cores"]
                 + out["softirq_cores"] + out["steal_cores"])
    if feed0 and feed1:
        out["feed_cores"] = round((feed1["cpu_s"] - feed0["cpu_s"]) / wall, 3)
        accounted += out["feed_cores"]
    # CPU nobody in this run accounts for: kernel threads, or other jobs on the
    # machine (a test suite running beside the bench skews every figure)
    out["other_cores"] = round(max(0.0, out["machine_cores_busy"] - accounted), 3)
    if followers is not None and feed0 and feed1:
        before = feed0["by_topic"]
        expected = sum((n - before.get(t, 0)) * followers.get(t, 0)
                       for t, n in feed1["by_topic"].items()) / wall
        out["expected_deliveries_per_s"] = round(expected, 1)
        out["delivered_share"] = round(deliveries / wall / expected, 4) if expected else None
    return out


def limited_by(fig: dict, workers: int) -> str:
    """Which resource ran out during the interval, as far as CPU time tells."""
    cores = fig.get("machine_cores") or 1
    if fig.get("machine_cores_busy", 0) >= 0.93 * cores:
        return "machine CPU (all cores busy)"
    if fig.get("server_cores", 0) >= 0.93 * workers:
        return "server CPU"
    if fig.get("loadgen_max_core", 0) >= 0.93:
        return "load generator CPU"
    return "not CPU"
