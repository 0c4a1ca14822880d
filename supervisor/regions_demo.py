"""`oddsgate demo --regions N`: N full regions on this machine, shared providers.

Each region is what a data centre would run (PROTOCOL.md §8): its own
`oddsgate run --haproxy` (supervisor, workers, HAProxy on the region's own
frontend port, its embedded Redis holding the region's copy of the input
log) with the region's aggregator supervised beside it (`OG_AGGREGATE`).
One `oddsgate providers` process appends the synthetic providers' messages
to every region's Redis directly, as real provider adapters would. Players
(unless `--no-players`) hold every region's URL and fail over between them;
the live line shows, per region, its players and its health.

`--status-file FILE` is written once every region serves (its /healthz
answers 200, so its aggregator is publishing):
`{"regions":[{"name","ws_url","http_url","pids":[...]}],"token":"..."}`,
`pids` being every process of that region (supervisor, workers, HAProxy,
aggregator, Redis), so a test or an operator can kill a whole region.
SIGTERM or Ctrl-C stops everything this started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import redis
import uvloop

from gateway.auth import issue_token
from redis_contract import target
from supervisor.control import ControlUnavailable, request
from supervisor.embedded_redis import free_port, free_port_range
from supervisor.private import private_dir, write_private
from supervisor.settings import node_port_count

REGION_NAMES = ("eu-west", "eu-central", "us-east", "ap-south")
TOKEN_TTL_S = 4 * 3600.0


@dataclass
class Region:
    name: str
    runtime: Path
    port: int
    proc: subprocess.Popen | None = None
    pids: list[int] = field(default_factory=list)
    aggregator_pid: int | None = None
    metrics_port: int = 0

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def redis_url(self) -> str:
        return f"unix://{self.runtime / 'redis' / 'redis.sock'}"

    @property
    def control(self) -> Path:
        return self.runtime / "control.sock"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + "/healthz", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def processes(self) -> list[int]:
        """Every process of the region: supervisor, workers, HAProxy, aggregator, Redis."""
        assert self.proc is not None
        pids = [self.proc.pid]
        with contextlib.suppress(ControlUnavailable, OSError, TimeoutError):
            status = request(self.control, {"cmd": "status"}, timeout=5)
            pids += [w["pid"] for w in status["workers"] if w["pid"]]
            services = status.get("services", {})
            pids += [s["pid"] for s in services.values() if s.get("pid")]
            self.aggregator_pid = (services.get("aggregator") or {}).get("pid")
        with contextlib.suppress(redis.RedisError, OSError):
            client = target.sync_client(self.redis_url)
            pids.append(int(client.info("server")["process_id"]))
            client.close()
        return sorted(set(pids))


def _start_region(region: Region, secret: str, workers: int, others: list[Region]) -> None:
    region.metrics_port = free_port()
    env = {**os.environ,
           # the player shell may open WebSockets to the other regions (its ?regions=)
           "OG_SHELL_CONNECT_SRC": " ".join(f"ws://127.0.0.1:{o.port}" for o in others),
           "OG_RUNTIME_DIR": str(region.runtime), "OG_JWT_SECRET": secret,
           "OG_REGION": region.name, "OG_AGGREGATE": "1",
           "OG_REGION_STALE_AFTER_MS": os.environ.get("OG_REGION_STALE_AFTER_MS", "1500"),
           "OG_HAPROXY_BIND": f"127.0.0.1:{region.port}",
           "OG_WORKERS": str(workers),
           "OG_BASE_PORT": str(free_port_range(node_port_count(workers))),
           "OG_AGENT_PORT": str(free_port()),
           "OG_METRICS_PORT": str(region.metrics_port)}
    env.pop("OG_REDIS_URL", None)  # the region's own embedded Redis
    log = open(region.runtime / "node.log", "ab")  # noqa: SIM115
    region.proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", "--haproxy"],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()


def _wait_until(what: str, check, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: a process exited with {proc.returncode} "
                                   f"({' '.join(map(str, proc.args))})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g}s")
        time.sleep(0.2)


async def _players(args: argparse.Namespace, regions: list[Region], secret: str,
                   stop: asyncio.Event) -> None:
    """Players holding every region's URL, and one line a second of what they see."""
    from aggregator.providers import default_markets
    from client.odds import OddsClient
    from gateway.topics import PartitionMap, topic_for_market

    pmap = PartitionMap.load(None)
    topics = sorted({topic_for_market(pmap, *map(int, m.market.split(":")))
                     for m in default_markets()})
    urls = [r.ws_url for r in regions]
    players: list[OddsClient] = []
    for i in range(args.clients):
        # Spread over the regions: each starts on its own, and moves on failure.
        ring = urls[i % len(urls):] + urls[:i % len(urls)]
        player = OddsClient(ring, token=issue_token(secret, f"demo-{i}", secrets.token_hex(4)))
        await player.connect()
        await player.subscribe(topics)
        players.append(player)
    started = time.monotonic()
    last = 0
    while not stop.is_set():
        if args.duration is not None and time.monotonic() - started >= args.duration:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        events = sum(p.stats.events for p in players)
        per_region = {r.name: 0 for r in regions}
        for p in players:
            if p.region in per_region:
                per_region[p.region] += 1
        health = await asyncio.gather(*(asyncio.to_thread(r.healthy) for r in regions))
        line = " ".join(f"{r.name}:{per_region[r.name]}p({'up' if ok else 'DOWN'})"
                        for r, ok in zip(regions, health, strict=True))
        print(f"t={time.monotonic() - started:5.1f}s events={events - last:5d}/s {line} "
              f"failovers={sum(p.stats.failovers for p in players)} "
              f"resets={sum(p.stats.resets for p in players)} "
              f"violations={sum(len(p.violations) for p in players)}", flush=True)
        last = events
    for player in players:
        await player.close()


def run_regions_demo(args: argparse.Namespace) -> int:
    base = private_dir(os.environ.get("OG_RUNTIME_DIR") or f"/tmp/oddsgate-regions-{os.getuid()}")
    secret = os.environ.get("OG_JWT_SECRET") or secrets.token_hex(16)
    regions = [Region(REGION_NAMES[i] if i < len(REGION_NAMES) else f"region-{i}",
                      private_dir(base / f"region-{i}"), args.port + i)
               for i in range(args.regions)]
    providers: subprocess.Popen | None = None
    stop = asyncio.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        for region in regions:
            _start_region(region, secret, args.workers, [r for r in regions if r is not region])
        procs = [r.proc for r in regions if r.proc is not None]
        _wait_until("the regions' Redis", lambda: all(
            (r.runtime / "redis" / "redis.sock").exists() for r in regions), procs, 60)
        plog = open(base / "providers.log", "ab")  # noqa: SIM115
        providers = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "providers", "--seed", str(args.seed),
             *[f"--region={r.name}={r.redis_url}" for r in regions]],
            stdout=plog, stderr=subprocess.STDOUT)
        plog.close()
        _wait_until("every region serving", lambda: all(r.healthy() for r in regions),
                    [*procs, providers], 90)
        token = issue_token(secret, "demo-shell", secrets.token_hex(4), TOKEN_TTL_S)
        for region in regions:
            region.pids = region.processes()
        if args.status_file:
            write_private(Path(args.status_file), orjson.dumps({
                "regions": [{"name": r.name, "ws_url": r.ws_url, "http_url": r.http_url,
                             "pids": r.pids, "aggregator_pid": r.aggregator_pid,
                             "runtime_dir": str(r.runtime),
                             "metrics_url": f"http://127.0.0.1:{r.metrics_port}/metrics"}
                            for r in regions],
                "token": token}, option=orjson.OPT_INDENT_2))
        shell_regions = ",".join(r.ws_url for r in regions)
        print(f"demo: {len(regions)} regions serving; logs in {base}", flush=True)
        for region in regions:
            print(f"  {region.name}: {region.ws_url} (pids {region.pids}); player shell "
                  f"{region.http_url}/?token={token}&regions={shell_regions}", flush=True)
        print("  drain a region for a deploy: OG_RUNTIME_DIR="
              f"{regions[0].runtime} .venv/bin/oddsgate drain --region --wait", flush=True)
        if args.no_players:
            # A region lost (killed by a drill, or crashed) is reported, never a reason
            # to stop the others: surviving it is what they are for.
            reported: set[str] = set()
            ends = None if args.duration is None else time.monotonic() + args.duration
            while not stop.is_set() and (ends is None or time.monotonic() < ends):
                for r in regions:
                    if r.proc is not None and r.proc.poll() is not None \
                            and r.name not in reported:
                        reported.add(r.name)
                        print(f"demo: region {r.name} is down (exit {r.proc.returncode}); "
                              "the others go on", flush=True)
                time.sleep(0.2)
        else:
            async def watch() -> None:
                loop = asyncio.get_running_loop()
                inner = asyncio.Event()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, inner.set)
                if stop.is_set():
                    inner.set()
                await _players(args, regions, secret, inner)

            uvloop.run(watch())
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        print(f"oddsgate demo: {exc} (logs in {base})", file=sys.stderr)
        return 1
    finally:
        for proc in [providers, *(r.proc for r in regions)]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [providers, *(r.proc for r in regions)]:
            if proc is not None:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return 0
