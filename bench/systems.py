"""The systems under test: how each is started on loopback, reached and fed.

A `System` starts its server processes against a Redis (or, for NATS, its
own server) and returns a `Target`: the endpoints players connect to and the
wire protocol they speak. Today the oddsgate target is its workers' ports,
one connection in turn to each; once the supervisor runs HAProxy the same
`Target` will hold the HAProxy frontend instead (`via="haproxy"`), and
nothing else in the bench changes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.peers.install import NODE_DIR, PEERS, Availability, nats_server_path
from supervisor.embedded_redis import free_port

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 20.0


@dataclass
class Target:
    endpoints: list[tuple[str, int]]
    protocol: str  # bench.adapters.PROTOCOLS key
    via: str = "workers"  # "workers": straight to each worker; "haproxy": a frontend


@dataclass
class Server:
    """Processes started for one system; stopped in reverse order."""

    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start(self, cmd: list[str], log: Path, env: dict[str, str] | None = None,
              cwd: Path = ROOT) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def stop(self, timeout: float = 15.0) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

    def log_tail(self, lines: int = 15) -> str:
        out = []
        for log in self.logs:
            with contextlib.suppress(OSError):
                out += log.read_text(errors="replace").strip().splitlines()[-lines:]
        return "\n".join(out)


def wait_http(port: int, proc: subprocess.Popen, server: Server, path: str = "/healthz",
              timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not healthy within {timeout:.0f}s:\n{server.log_tail()}")


def wait_tcp(port: int, proc: subprocess.Popen, server: Server,
             timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"not listening within {timeout:.0f}s:\n{server.log_tail()}")


class System:
    name = ""
    protocol = ""
    emitter = "lua"  # bench.emitters kind the feed uses
    has_snapshots = False
    description = ""

    def __init__(self, workdir: Path, avail: Availability) -> None:
        self.workdir = workdir
        self.avail = avail
        self.server = Server()
        self.feed_address = ""

    def unavailable(self) -> str | None:
        """None when it can run here, else why not."""
        return None

    def start(self, redis_url: str) -> Target:
        raise NotImplementedError

    def stop(self) -> None:
        self.server.stop()

    def processes(self) -> list[psutil.Process]:
        out = []
        for pid in self.server.pids():
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                out.append(proc)
                out.extend(proc.children(recursive=True))
        return out

    def workers(self) -> int:
        return 1


class Oddsgate(System):
    name = "oddsgate"
    protocol = "oddsgate"
    has_snapshots = True
    description = "oddsgate workers (python -m supervisor.cli worker), uvloop"

    def __init__(self, workdir: Path, avail: Availability, workers: int = 1,
                 tree: Path = ROOT, env: dict[str, str] | None = None) -> None:
        super().__init__(workdir, avail)
        self.count = workers
        self.tree = tree  # the checkout whose gateway/ the workers run
        self.env = dict(env or {})  # OG_* settings of a variant (an A/B run), over the bench's

    def workers(self) -> int:
        return self.count

    def start(self, redis_url: str) -> Target:
        self.feed_address = redis_url
        endpoints = []
        for index in range(self.count):
            port = free_port()
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("OG_")},
                "OG_REDIS_URL": redis_url,
                "OG_HOST": LOOPBACK,
                "OG_PORT": str(port),
                "OG_WORKER_INDEX": str(index),
                "OG_ALLOW_ANONYMOUS": "1",
                "OG_NODE": "bench",
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(self.tree),
                **self.env,
            }
            proc = self.server.start([sys.executable, "-m", "supervisor.cli", "worker"],
                                     self.workdir / f"oddsgate-worker-{index}.log", env,
                                     cwd=self.tree)
            wait_http(port, proc, self.server)
            endpoints.append((LOOPBACK, port))
        return Target(endpoints, self.protocol)


class PlainWs(System):
    name = "plain-ws"
    protocol = "plain"
    description = "websockets + redis-py, one process, await send per follower"

    def start(self, redis_url: str) -> Target:
        self.feed_address = redis_url
        port = free_port()
        proc = self.server.start(
            [sys.executable, str(PEERS / "plain_ws.py"), "--port", str(port),
             "--redis-url", redis_url],
            self.workdir / "plain-ws.log")
        wait_http(port, proc, self.server)
        return Target([(LOOPBACK, port)], self.protocol)


class SocketIOPy(System):
    name = "python-socketio"
    protocol = "socketio"
    emitter = "socketio_py"
    description = "python-socketio 5 + AsyncRedisManager on aiohttp/uvloop, one process"

    def unavailable(self) -> str | None:
        return self.avail.peers_venv

    def start(self, redis_url: str) -> Target:
        self.feed_address = redis_url
        port = free_port()
        proc = self.server.start(
            [str(self.avail.python), str(PEERS / "socketio_py.py"), "--port", str(port),
             "--redis-url", redis_url],
            self.workdir / "python-socketio.log")
        wait_http(port, proc, self.server)
        return Target([(LOOPBACK, port)], self.protocol)


class SocketIONode(System):
    name = "node-socket.io"
    protocol = "socketio"
    emitter = "socketio_node"
    description = "Node socket.io 4 + @socket.io/redis-adapter 8, one process"

    def unavailable(self) -> str | None:
        return self.avail.node

    def start(self, redis_url: str) -> Target:
        self.feed_address = redis_url
        port = free_port()
        node = shutil.which("node") or "node"
        proc = self.server.start(
            [node, str(NODE_DIR / "server.js"), "--port", str(port), "--redis-url", redis_url],
            self.workdir / "node-socket.io.log", cwd=NODE_DIR)
        wait_http(port, proc, self.server)
        return Target([(LOOPBACK, port)], self.protocol)


class Nats(System):
    name = "nats-server"
    protocol = "nats"
    emitter = "nats"
    description = "nats-server WebSocket listener (Debian package), fed over its client port"

    def unavailable(self) -> str | None:
        return self.avail.nats

    def start(self, redis_url: str) -> Target:
        client_port, ws_port = free_port(), free_port()
        conf = self.workdir / "nats.conf"
        conf.write_text(
            f"listen: {LOOPBACK}:{client_port}\n"
            "max_connections: 1000000\n"
            "websocket {\n"
            f"  listen: \"{LOOPBACK}:{ws_port}\"\n"
            "  no_tls: true\n"
            "  compression: false\n"
            "}\n"
        )
        proc = self.server.start([nats_server_path() or "nats-server", "-c", str(conf)],
                                 self.workdir / "nats-server.log")
        wait_tcp(client_port, proc, self.server)
        wait_tcp(ws_port, proc, self.server)
        self.feed_address = f"{LOOPBACK}:{client_port}"
        return Target([(LOOPBACK, ws_port)], self.protocol)


SYSTEMS: dict[str, type[System]] = {
    cls.name: cls for cls in (Oddsgate, PlainWs, SocketIONode, Nats, SocketIOPy)
}
