"""The region failover drill: players on two regions, one region killed whole.

Used by the `failover` bench scenario (bench/scenarios/failover.py) and by
tests/test_regions_failover.py. The regions come from `oddsgate demo
--regions 2 --no-players --status-file` (each its Redis, input log,
aggregator, node with HAProxy; shared providers). `players` clients hold
both regions' URLs, half starting on each; once every one holds every
topic's snapshot and prices flow, every process of region A is killed
(SIGKILL: no drain, no hint), and per player of region A the drill records
the time from the kill until it is resumed in region B (its `subscribed`
answered there: the client's resume count moves) and until it receives a
new price there. Resets and PROTOCOL.md §5 violations are counted over
every player, the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from client.odds import OddsClient

READY_TIMEOUT_S = 120.0
AFTER_KILL_S = 5.0  # how long players get to be resumed in region B, and to prove it
POLL_S = 0.005


@dataclass
class Regions:
    """A running `oddsgate demo --regions 2 --no-players` and what its status file says."""

    proc: subprocess.Popen
    status: dict
    workdir: Path
    runtime: Path

    @property
    def urls(self) -> list[str]:
        return [r["ws_url"] for r in self.status["regions"]]

    @property
    def names(self) -> list[str]:
        return [r["name"] for r in self.status["regions"]]

    def kill(self, index: int) -> None:
        """Every process of region `index`, at once, as a data centre lost."""
        for pid in self.status["regions"][index]["pids"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.runtime, ignore_errors=True)


def start_regions(workdir: Path, port: int, *, python: str = sys.executable,
                  cwd: Path | None = None, env: dict | None = None) -> Regions:
    status_file = workdir / "regions.json"
    log = open(workdir / "regions.log", "ab")  # noqa: SIM115
    # Short: unix socket paths (HAProxy's master CLI, Redis) must fit in ~100 bytes.
    runtime = tempfile.mkdtemp(prefix="og-regions-")
    full_env = {**os.environ, **(env or {}), "OG_RUNTIME_DIR": runtime}
    proc = subprocess.Popen(
        [python, "-m", "supervisor.cli", "demo", "--regions", "2", "--no-players",
         "--port", str(port), "--status-file", str(status_file)],
        cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not status_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            tail = (workdir / "regions.log").read_text(errors="replace")[-3000:]
            shutil.rmtree(runtime, ignore_errors=True)
            raise RuntimeError(f"the regions did not start (exit {proc.poll()}):\n{tail}")
        time.sleep(0.1)
    return Regions(proc, orjson.loads(status_file.read_bytes()), workdir, Path(runtime))


def _rank(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 1)


async def drill(regions: Regions, players: int, topics: list[str], *,
                after_kill_s: float = AFTER_KILL_S) -> dict:
    """Players on both regions, region A killed; the figures of the move."""
    token = regions.status["token"]
    a, b = regions.urls
    clients: list[OddsClient] = []
    for i in range(players):
        ring = [a, b] if i % 2 == 0 else [b, a]
        client = OddsClient(ring, token=token, name=f"p{i}")
        clients.append(client)
    await asyncio.gather(*(c.connect() for c in clients))
    await asyncio.gather(*(c.subscribe(topics) for c in clients))
    await asyncio.gather(*(c.wait_synced(topics, timeout=30) for c in clients))
    await asyncio.sleep(1.0)  # prices flowing to everyone
    on_a = [c for c in clients if c.region == regions.names[0]]
    before = {id(c): (c.stats.resumes, c.stats.events) for c in on_a}
    resumed_ms: dict[int, float] = {}
    fresh_ms: dict[int, float] = {}
    killed = time.monotonic()
    regions.kill(0)
    while time.monotonic() - killed < after_kill_s and len(fresh_ms) < len(on_a):
        now = time.monotonic()
        for c in on_a:
            key = id(c)
            resumes, events = before[key]
            if key not in resumed_ms and c.stats.resumes > resumes \
                    and c.region == regions.names[1]:
                resumed_ms[key] = (now - killed) * 1000
                before[key] = (c.stats.resumes, c.stats.events)
            elif key in resumed_ms and key not in fresh_ms and c.stats.events > events:
                fresh_ms[key] = (now - killed) * 1000
        await asyncio.sleep(POLL_S)
    await asyncio.sleep(0.5)
    figures = {
        "players": players, "on_killed_region": len(on_a),
        "resumed": len(resumed_ms), "fresh_prices": len(fresh_ms),
        "resumed_ms": {"p50": _rank(list(resumed_ms.values()), 0.5),
                       "p99": _rank(list(resumed_ms.values()), 0.99),
                       "max": _rank(list(resumed_ms.values()), 1.0)},
        "fresh_ms": {"p50": _rank(list(fresh_ms.values()), 0.5),
                     "p99": _rank(list(fresh_ms.values()), 0.99)},
        "failovers": sum(c.stats.failovers for c in clients),
        "resets": sum(c.stats.resets for c in clients),
        "violations": sum(len(c.violations) for c in clients),
        "violation_samples": [str(v) for c in clients for v in c.violations][:5],
    }
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    return figures
