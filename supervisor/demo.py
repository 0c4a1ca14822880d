"""`oddsgate demo`: a whole node on this machine, a feed, players, watched live.

It starts `oddsgate run --haproxy` (supervisor, one worker per core, the
embedded Redis, HAProxy in front), a synthetic feed, and a crowd of players
built on the client library that connect through HAProxy; then prints one
line a second of what the players see (events delivered, publish-to-receipt
latency, snapshots, resumes, PROTOCOL.md §5 violations: always 0) and how
the node spreads them over its workers. In another terminal, `oddsgate
drain --worker 0` (with the same OG_RUNTIME_DIR) shows players moving.
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
from pathlib import Path

import redis.asyncio as aioredis
import uvloop

from client.odds import OddsClient
from feed.publisher import Publisher
from feed.synthetic import SyntheticFeed
from gateway.auth import issue_token
from gateway.topics import PartitionMap
from supervisor.control import ControlUnavailable, request
from supervisor.private import private_dir


def _percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6


def _wait_for_node(control: Path, proc: subprocess.Popen, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"oddsgate run exited with {proc.returncode}")
        with contextlib.suppress(ControlUnavailable, OSError, TimeoutError):
            status = request(control, {"cmd": "status"}, timeout=5)
            haproxy = status.get("haproxy") or {}
            if all(w["agent"] == "up ready" for w in status["workers"]) and haproxy \
                    and set(haproxy.values()) == {"UP"}:
                return status
        time.sleep(0.2)
    raise RuntimeError("the node did not become ready")


async def _watch(args: argparse.Namespace, redis_url: str, secret: str, control: Path) -> None:
    pmap = PartitionMap.load(None)
    redis = aioredis.Redis.from_url(redis_url)
    feed = SyntheticFeed(Publisher(redis, pmap), pmap, seed=1, rate=args.rate)
    await feed.publish_opening_prices()  # listed before anyone follows them, as an aggregator does
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
    print(f"demo: {len(players)} players through HAProxy at {url}, feed {args.rate:.0f} "
          "events/s; Ctrl-C stops", flush=True)
    shell_token = issue_token(secret, "demo-shell", secrets.token_hex(4), 86400.0)
    print(f"demo: player shell at http://127.0.0.1:{args.port}/?token={shell_token}"
          f"&topics={','.join(topics[:6])}", flush=True)
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
        try:
            status = await asyncio.to_thread(request, control, {"cmd": "status"}, 5)
            spread = " ".join(f"w{w['index']}:{w['connections']}({w['agent'].split()[-1]})"
                              for w in status["workers"])
        except (ControlUnavailable, OSError, TimeoutError):
            spread = "node unreachable"
        print(
            f"t={time.monotonic() - started:5.1f}s delivered={events - last_events:6d}/s "
            f"latency p50={_percentile(samples, 0.5):6.2f}ms "
            f"p99={_percentile(samples, 0.99):6.2f}ms "
            f"resumes={sum(p.stats.resumes for p in players)} "
            f"resets={sum(p.stats.resets for p in players)} "
            f"violations={sum(len(p.violations) for p in players)} | {spread}",
            flush=True,
        )
        last_events = events
    feed.stop()
    await asyncio.gather(feed_task, return_exceptions=True)
    for player in players:
        await player.close()
    await redis.aclose()


def run_demo(args: argparse.Namespace) -> int:
    runtime = private_dir(os.environ.get("OG_RUNTIME_DIR")
                          or f"/tmp/oddsgate-demo-{os.getuid()}")
    secret = os.environ.get("OG_JWT_SECRET") or secrets.token_hex(16)
    env = {**os.environ, "OG_RUNTIME_DIR": str(runtime), "OG_JWT_SECRET": secret,
           "OG_HAPROXY_BIND": f"127.0.0.1:{args.port}"}
    env.pop("OG_REDIS_URL", None)  # the node's own embedded Redis
    node = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", "--haproxy"],
                            env=env)
    control = runtime / "control.sock"
    try:
        status = _wait_for_node(control, node)
        redis_url = f"unix://{runtime / 'redis' / 'redis.sock'}"
        print(f"demo: node up, {len(status['workers'])} workers; players connect to "
              f"ws://127.0.0.1:{args.port}/ws; metrics on "
              f"http://127.0.0.1:{os.environ.get('OG_METRICS_PORT', '9100')}/metrics; "
              f"try: OG_RUNTIME_DIR={runtime} .venv/bin/oddsgate status", flush=True)
        uvloop.run(_watch(args, redis_url, secret, control))
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
    return 0
