"""`clicks`: tracking-link redirects through HAProxy, steady then a 50x storm.

A node (`oddsgate run --haproxy`, one worker) with one link; an open-loop
client clicks at `STEADY_RPS` for a while, then at 50 times that (the storm,
30 s; quick: 5 s), each click on its own connection as a browser's would be.
HAProxy sends `/t/` to the worker's click listener (gateway/clicklistener.py)
over connections it keeps alive, so the worker's side of a click has no
connection setup; its CPU per click is what the redirects per worker core
measure.
Then both sides at full speed (closed loop, `CONCURRENCY` clicks in flight):
the node's `/t/` and a bare HAProxy answering a static
`http-request redirect`, on the same machine in the same run, and their
ratio (target: at least 0.3).

Reported: redirects/s per worker core (clicks / the worker's CPU seconds),
the worker's own time per click (plan and answer, not the wait for Redis;
GET /admin/clicks/timing) and the client's latency, p50/p99; clicks lost
(redirected ids not in `og:clicks`; target 0).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from urllib.parse import parse_qs, urlsplit

import orjson
import psutil
import redis

from attribution import keys
from attribution.link_store import LinkStore
from attribution.links import Link
from bench.harness import Harness, Result, cpu_seconds
from bench.systems import System, wait_http
from supervisor.embedded_redis import free_port, free_port_range
from supervisor.settings import node_port_count

NAME = "clicks"
STEADY_RPS = 40.0
STORM_FACTOR = 50
SECONDS = {True: (2.0, 5.0, 3.0), False: (10.0, 30.0, 10.0)}  # steady, storm, full speed
CONCURRENCY = 32
RATIO_TARGET = 0.3
ADMIN_KEY = "bench-admin-key"
UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/124.0 Safari/537.36"
STATIC_CFG = """global
    maxconn 4000
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend redirect
    bind 127.0.0.1:{port}
    http-request redirect location https://casino.example/welcome?ogclid=static code 302
"""


async def click(port: int, path: str) -> tuple[int, str | None, float]:
    """One click on its own connection: (status, click id of a 302, seconds)."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: b\r\nUser-Agent: {UA}\r\n"
                     "Connection: close\r\n\r\n".encode())
        head = (await asyncio.wait_for(reader.read(), 10)).split(b"\r\n\r\n", 1)[0]
    finally:
        writer.close()
    elapsed = time.perf_counter() - started
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    location = next((line.split(":", 1)[1].strip() for line in lines[1:]
                     if line.lower().startswith("location:")), "")
    ids = parse_qs(urlsplit(location).query).get("ogclid") if status == 302 else None
    return status, ids[0] if ids else None, elapsed


class Tally:
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}

    def add(self, status: int, click_id: str | None, elapsed: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.latencies.append(elapsed)
        if click_id is not None:
            self.ids.append(click_id)


async def open_loop(port: int, rate: float, seconds: float, tally: Tally) -> None:
    """Clicks started at `rate` a second whatever the answers (a crowd, not a queue)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()
    gate = asyncio.Semaphore(512)  # the client's own file descriptors

    async def one(n: int) -> None:
        async with gate:
            try:
                tally.add(*await click(port, f"/t/bench?sub1=s{n}"))
            except (OSError, TimeoutError, ValueError, IndexError):
                tally.add(0, None, 0.0)

    start, n = loop.time(), 0
    while (now := loop.time()) < start + seconds:
        due = int((now - start) * rate)
        while n < due:
            n += 1
            task = loop.create_task(one(n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(0.002)
    if tasks:
        await asyncio.gather(*tasks)


async def closed_loop(port: int, path: str, seconds: float) -> tuple[int, Tally]:
    tally = Tally()
    deadline = asyncio.get_running_loop().time() + seconds

    async def clicker() -> None:
        while asyncio.get_running_loop().time() < deadline:
            try:
                tally.add(*await click(port, path))
            except (OSError, TimeoutError, ValueError, IndexError):
                tally.add(0, None, 0.0)

    await asyncio.gather(*(clicker() for _ in range(CONCURRENCY)))
    return tally.statuses.get(302, 0), tally


def _ms(values: list[float], q: float) -> float | None:
    ordered = sorted(v for v in values if v > 0)
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)


def _timing(port: int) -> dict:
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/admin/clicks/timing",
                                     headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        return orjson.loads(answer.read())


def run(h: Harness, system: System) -> list[Result]:
    if system.name != "oddsgate":
        return [Result(system.name, NAME, "n/a", reason="oddsgate's tracking links only")]
    if shutil.which("haproxy") is None:
        return [Result(system.name, NAME, "unavailable", reason="no haproxy")]
    run_dir = h.run_dir(f"{system.name}-{NAME}")
    steady_s, storm_s, full_s = SECONDS[h.p.quick]
    with h.redis(run_dir) as server:
        client = redis.Redis.from_url(server.url)
        LinkStore(client).add(Link.create("bench", "p1", "c1", "r1",
                                          "https://casino.example/welcome", subids=True))
        runtime = tempfile.mkdtemp(prefix="og-clicks-")  # short: unix socket paths
        frontend, static_port = free_port(), free_port()
        env = {**os.environ, "OG_RUNTIME_DIR": runtime, "OG_REDIS_URL": server.url,
               "OG_WORKERS": "1", "OG_BASE_PORT": str(free_port_range(node_port_count(1))),
               "OG_AGENT_PORT": str(free_port()), "OG_METRICS_PORT": "0",
               "OG_HAPROXY_BIND": f"127.0.0.1:{frontend}", "OG_ALLOW_ANONYMOUS": "1",
               "OG_CLICK_KEYS": "b1:bench-click-key-000000001", "OG_ADMIN_KEY": ADMIN_KEY}
        with open(run_dir / "node.log", "wb") as log:
            node = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", "--haproxy"],
                                    cwd=h.tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        (run_dir / "static.cfg").write_text(STATIC_CFG.format(port=static_port))
        static = subprocess.Popen(["haproxy", "-db", "-f", str(run_dir / "static.cfg")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_http(frontend, node, None, timeout=30.0)
            time.sleep(1.0)  # HAProxy's rise checks, the worker's link cache
            workers = [p for p in psutil.Process(node.pid).children(recursive=True)
                       if "worker" in " ".join(p.cmdline())]
            tally = Tally()
            cpu0 = cpu_seconds(workers)
            asyncio.run(open_loop(frontend, STEADY_RPS, steady_s, tally))
            asyncio.run(open_loop(frontend, STEADY_RPS * STORM_FACTOR, storm_s, tally))
            cpu1 = cpu_seconds(workers)
            storm_timing = _timing(frontend)
            node_rate, full = asyncio.run(closed_loop(frontend, "/t/bench", full_s))
            cpu2 = cpu_seconds(workers)
            static_rate, _ = asyncio.run(closed_loop(static_port, "/t/bench", full_s))
            full_timing = _timing(frontend)
        finally:
            static.send_signal(signal.SIGTERM)
            node.send_signal(signal.SIGTERM)
            for proc in (static, node):
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
            shutil.rmtree(runtime, ignore_errors=True)
        recorded = {orjson.loads(fields[b"c"])["click_id"]
                    for _, fields in client.xrange(keys.CLICKS)}
        client.close()
    redirected = tally.ids + full.ids
    lost = sum(1 for click_id in redirected if click_id not in recorded)
    clicks = tally.statuses.get(302, 0)
    figures = {
        "clicks_open_loop": clicks, "statuses": {str(k): v for k, v in tally.statuses.items()},
        "storm_rps_offered": STEADY_RPS * STORM_FACTOR,
        "storm_rps_achieved": round(clicks / (steady_s + storm_s), 1),
        "client_ms": {"p50": _ms(tally.latencies, 0.5), "p99": _ms(tally.latencies, 0.99)},
        "worker_us": storm_timing, "worker_us_full_speed": full_timing,
        "redirects_per_worker_core_s": round(clicks / (cpu1 - cpu0), 1) if cpu1 > cpu0 else None,
        "full_speed_rps": round(node_rate / full_s, 1),
        "full_speed_per_worker_core_s":
            round(node_rate / (cpu2 - cpu1), 1) if cpu2 > cpu1 else None,
        "full_speed_client_ms": {"p50": _ms(full.latencies, 0.5),
                                 "p99": _ms(full.latencies, 0.99)},
        "static_haproxy_rps": round(static_rate / full_s, 1),
        "ratio_to_static": round(node_rate / static_rate, 3) if static_rate else None,
        "ratio_target": RATIO_TARGET,
        "clicks_lost": lost,
    }
    h.log(f"    clicks: storm {figures['storm_rps_achieved']}/s of "
          f"{figures['storm_rps_offered']:.0f} offered, worker p50/p99 "
          f"{storm_timing.get('p50_us')}/{storm_timing.get('p99_us')} us, client p99 "
          f"{figures['client_ms']['p99']} ms; full speed {figures['full_speed_rps']}/s vs "
          f"static HAProxy {figures['static_haproxy_rps']}/s (ratio "
          f"{figures['ratio_to_static']}); lost {lost}")
    return [Result(system.name, NAME, "ok" if lost == 0 else "failed",
                   variant="1 worker behind HAProxy, a connection per click",
                   params={"steady_rps": STEADY_RPS, "storm_factor": STORM_FACTOR,
                           "steady_s": steady_s, "storm_s": storm_s, "full_speed_s": full_s,
                           "concurrency": CONCURRENCY}, figures=figures)]
