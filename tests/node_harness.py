"""A whole node for tests: `oddsgate run --haproxy` on free loopback ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from supervisor.control import request
from supervisor.embedded_redis import free_port, free_port_range
from supervisor.haproxy import _unix_command
from supervisor.haproxy_config import STATS_SOCKET_NAME
from supervisor.settings import node_port_count
from tests.conftest import JWT_SECRET, ROOT, http_get


@dataclass
class Node:
    proc: subprocess.Popen
    runtime: Path
    frontend_port: int
    base_port: int
    metrics_port: int
    agent_port: int
    workers: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.frontend_port}/ws"

    @property
    def control(self) -> Path:
        return self.runtime / "control.sock"

    def command(self, **cmd: object) -> dict:
        return request(self.control, cmd, timeout=float(cmd.get("timeout", 30)) + 10)

    def status(self) -> dict:
        return self.command(cmd="status")

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "supervisor.cli", *args], cwd=ROOT, timeout=timeout,
            env={**os.environ, "OG_RUNTIME_DIR": str(self.runtime)},
            capture_output=True, text=True,
        )

    def metrics(self) -> str:
        status, _, body = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics")
        assert status == 200
        return body.decode()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int | None]:
        return [w["pid"] for w in self.status()["workers"]]

    def wait(self, predicate, timeout: float = 20.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"{what} not met within {timeout}s\n{self.log()[-3000:]}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            try:
                status = self.status()
            except (ConnectionError, OSError):
                return False
            return all(w["phase"] == "ready" and w["agent"] == "up ready"
                       for w in status["workers"])
        self.wait(ready, timeout, "all workers ready")
        # HAProxy needs `rise 2` health checks before it routes to a server
        self.wait(lambda: set(self.haproxy_status().values()) == {"UP"}, timeout,
                  "every server UP in HAProxy")

    def haproxy_status(self) -> dict[str, str]:
        """Server name -> status, as HAProxy itself reports it (via `oddsgate status`)."""
        try:
            return self.status().get("haproxy") or {}
        except (ConnectionError, OSError):
            return {}

    def haproxy_stat(self, backend: str) -> dict[str, dict[str, str]]:
        """`show stat` of one backend, from HAProxy's stats socket: server name (and
        BACKEND) -> its columns (`status`, `stot`, `reuse`, ...)."""
        lines = _unix_command(self.runtime / STATS_SOCKET_NAME, "show stat", 5.0).splitlines()
        columns = lines[0][2:].split(",")
        rows = [dict(zip(columns, line.split(","), strict=False)) for line in lines[1:] if line]
        return {row["svname"]: row for row in rows if row.get("pxname") == backend}

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_node(redis_url: str, runtime: Path, workers: int = 2, *,
               frontend_port: int | None = None, **env: str) -> Node:
    """`frontend_port`: HAProxy's, e.g. to bring a node back where players knew it."""
    frontend, agent, metrics = frontend_port or free_port(), free_port(), free_port()
    base = free_port_range(node_port_count(workers))
    runtime.mkdir(parents=True, exist_ok=True)
    log_path = runtime / "node.log"
    full_env = {
        **os.environ,
        "OG_RUNTIME_DIR": str(runtime),
        "OG_REDIS_URL": redis_url,
        "OG_JWT_SECRET": JWT_SECRET,
        "OG_WORKERS": str(workers),
        "OG_BASE_PORT": str(base),
        "OG_AGENT_PORT": str(agent),
        "OG_METRICS_PORT": str(metrics),
        "OG_HAPROXY_BIND": f"127.0.0.1:{frontend}",
        "OG_DRAIN_SETTLE_MS": "700",
        "OG_NODE": "test-node",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "run", "--haproxy"],
                                cwd=ROOT, env=full_env, stdout=log_file,
                                stderr=subprocess.STDOUT)
    node = Node(proc, runtime, frontend, base, metrics, agent, workers, log_path)
    try:
        node.wait_ready()
    except BaseException:
        node.stop()
        raise
    return node


def welcome_worker(frame: bytes | str) -> int:
    return orjson.loads(frame)["worker"]
