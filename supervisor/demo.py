"""`oddsgate demo`: a node on this machine with a feed and players, watched live.

It starts what a node needs (embedded Redis, a gateway worker), a synthetic
feed, and a crowd of players built on the client library; then prints one
line a second of what the players see: events delivered, publish-to-receipt
latency, snapshots, resumes and PROTOCOL.md §5 violations (always 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis.asyncio as aioredis
import uvloop

from feed.publisher import Publisher
from feed.synthetic import SyntheticFeed
from gateway.auth import issue_token
from gateway.client import OddsClient
from gateway.topics import PartitionMap
from supervisor.embedded_redis import EmbeddedRedis


def _percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("worker did not become healthy")


async def _watch(args: argparse.Namespace, redis_url: str, secret: str) -> None:
    pmap = PartitionMap.load(None)
    redis = aioredis.Redis.from_url(redis_url)
    feed = SyntheticFeed(Publisher(redis, pmap), pmap, seed=1, rate=args.rate)
    topics = feed.topics_by_popularity()[:40]
    rng = random.Random(2)
    url = f"ws://127.0.0.1:{args.port}/ws"
    players = []
    for i in range(args.clients):
        player = OddsClient(url, token=issue_token(secret, f"demo-{i}", secrets.token_hex(4)),
                            record_latency=True)
        await player.connect()
        await player.subscribe(rng.sample(topics, k=min(5, len(topics))))
        players.append(player)
    print(f"demo: {len(players)} players on {url}, feed {args.rate:.0f} events/s; Ctrl-C stops",
          flush=True)
    feed_task = asyncio.create_task(feed.run(duration=args.duration))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    last_events = 0
    started = time.monotonic()
    while not stop.is_set() and not feed_task.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        samples: list[int] = []
        for player in players:
            samples.extend(player.latencies_ns)
            player.latencies_ns.clear()
        events = sum(p.stats.events for p in players)
        violations = sum(len(p.violations) for p in players)
        print(
            f"t={time.monotonic() - started:5.1f}s delivered={events - last_events:6d}/s "
            f"latency p50={_percentile(samples, 0.5):6.2f}ms "
            f"p99={_percentile(samples, 0.99):6.2f}ms "
            f"snapshots={sum(p.stats.snapshots for p in players)} "
            f"resumes={sum(p.stats.resumes for p in players)} violations={violations}",
            flush=True,
        )
        last_events = events
    feed.stop()
    await asyncio.gather(feed_task, return_exceptions=True)
    for player in players:
        await player.close()
    await redis.aclose()


def run_demo(args: argparse.Namespace) -> int:
    runtime = Path(os.environ.get("OG_RUNTIME_DIR") or f"/tmp/oddsgate-demo-{os.getuid()}")
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = os.environ.get("OG_JWT_SECRET") or secrets.token_hex(16)
    with EmbeddedRedis(runtime / "redis") as redis_server:
        env = {**os.environ, "OG_REDIS_URL": redis_server.url, "OG_JWT_SECRET": secret,
               "OG_PORT": str(args.port)}
        worker = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "worker"], env=env)
        try:
            _wait_healthy(args.port, worker)
            print(f"demo: worker on http://127.0.0.1:{args.port} (healthz, /v1/topics), "
                  f"redis {redis_server.url}", flush=True)
            uvloop.run(_watch(args, redis_server.url, secret))
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0
