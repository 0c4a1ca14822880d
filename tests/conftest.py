"""Fixtures: a real Redis per test session, real worker processes per test.

Nothing here mocks Redis or the network: the suite starts redis-server on a
free loopback port (persistence on, so a restart test keeps history) and
runs workers as `oddsgate worker` subprocesses, the way operators do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis  # noqa: F401  (imported now, not lazily by its plugin at session end)
import pytest
import redis
import redis.asyncio as aioredis

from feed.publisher import Publisher
from gateway.auth import issue_token
from gateway.topics import PartitionMap
from supervisor.embedded_redis import EmbeddedRedis, free_port

JWT_SECRET = "test-secret-for-oddsgate-suite-only"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=0, persist=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """A clean database for each test."""
    if not redis_server.running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def pmap() -> PartitionMap:
    return PartitionMap.load(None)


@pytest.fixture
async def publisher(redis_url: str, pmap: PartitionMap) -> AsyncIterator[Publisher]:
    client = aioredis.Redis.from_url(redis_url)
    yield Publisher(client, pmap)
    await client.aclose()


def token(player: str = "p1", session: str = "s1", ttl: float = 3600.0,
          topics: list[str] | None = None) -> str:
    return issue_token(JWT_SECRET, player, session, ttl, topics)


@dataclass
class WorkerProcess:
    port: int
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def http_get(url: str, headers: dict[str, str] | None = None,
             timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def start_worker(redis_url: str, log_dir: Path, index: int = 0, **env: str) -> WorkerProcess:
    port = int(env.get("OG_PORT") or free_port())
    full_env = {
        **os.environ,
        "OG_REDIS_URL": redis_url,
        "OG_PORT": str(port),
        "OG_WORKER_INDEX": str(index),
        "OG_JWT_SECRET": JWT_SECRET,
        "OG_NODE": "test-node",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    log_path = log_dir / f"worker-{index}-{port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "worker"],
            env=full_env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
        )
    worker = WorkerProcess(port, proc, log_path, env)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{worker.log()}")
        try:
            if http_get(worker.http + "/healthz", timeout=1)[0] == 200:
                return worker
        except OSError:
            pass
        time.sleep(0.05)
    worker.stop()
    raise RuntimeError(f"worker did not become healthy:\n{worker.log()}")


@pytest.fixture
def worker_factory(redis_url: str, tmp_path: Path) -> Iterator:
    started: list[WorkerProcess] = []

    def factory(index: int = 0, **env: str) -> WorkerProcess:
        worker = start_worker(redis_url, tmp_path, index, **env)
        started.append(worker)
        return worker

    yield factory
    for worker in started:
        worker.stop()


@pytest.fixture
def worker(worker_factory) -> WorkerProcess:
    return worker_factory()


async def eventually(predicate, timeout: float = 5.0, interval: float = 0.02) -> None:
    """Wait until `predicate()` holds; fail with its last value otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
