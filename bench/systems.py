"""The systems under test: how each is started on loopback, reached and fed.

A `System` starts its server processes against a Redis (or, for NATS, its
own server) and returns a `Target`: the endpoints players connect to and the
wire protocol they speak. `Oddsgate` is bare workers, its target their
ports (one connection in turn to each); `OddsgateNode` is a whole node under
`oddsgate run --haproxy`, its target the HAProxy frontend (`via="haproxy"`).
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
from supervisor.control import request as control_request
from supervisor.embedded_redis import free_port, free_port_range
from supervisor.haproxy import FD_RESERVE as HAPROXY_FD_RESERVE
from supervisor.settings import NodeSettings, node_port_count

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 20.0
NODE = "oddsgate+haproxy"  # the system name of a whole node (OddsgateNode)


@dataclass
class Target:
    endpoints: list[tuple[str, int]]
    protocol: str  # bench.adapters.PROTOCOLS key
    via: str = "workers"  # "workers": straight to each worker; "haproxy": a frontend
    backends: list[tuple[str, int]] = field(default_factory=list)  # behind the frontend
    token_secret: str | None = None  # players carry an og_session cookie signed with it


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


def wait_http(port: int, proc: subprocess.Popen, server: Server | None, path: str = "/healthz",
              timeout: float = START_TIMEOUT_S) -> None:
    """Until `path` answers 200; `server` (when given) names the log to quote on failure."""
    def tail() -> str:
        return f":\n{server.log_tail()}" if server is not None else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}{tail()}")
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not healthy within {timeout:.0f}s{tail()}")


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

    def _start_script(self, python: Path, script: str, redis_url: str) -> Target:
        """A one-process Python peer from bench/peers/: `--port`, `--redis-url`, /healthz."""
        self.feed_address = redis_url
        port = free_port()
        proc = self.server.start(
            [str(python), str(PEERS / script), "--port", str(port), "--redis-url", redis_url],
            self.workdir / f"{self.name}.log")
        wait_http(port, proc, self.server)
        return Target([(LOOPBACK, port)], self.protocol)

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


class OddsgateNode(System):
    """A whole node, `oddsgate run --haproxy`: supervisor, workers and HAProxy in front.

    Players reach it through the HAProxy frontend (`Target.via == "haproxy"`),
    each with its own `og_session` cookie (a session token the load generator
    mints with the node's secret), so HAProxy places them by its consistent
    hash as it would in production. The workers' own ports are in
    `Target.backends`, for the bench's warming connections (anonymous, one set
    per worker). The supervisor's control socket (`command`) drains and
    undrains workers. Everything the node writes (control socket, HAProxy's
    files, its log) stays in the run dir; `processes()` is the supervisor and
    all its descendants (workers and HAProxy), so server CPU and RSS include
    HAProxy.
    """

    name = NODE
    protocol = "oddsgate"
    has_snapshots = True
    description = "oddsgate run --haproxy: the supervisor, its workers and HAProxy in front"
    SECRET = "oddsgate-bench-session-secret-for-og_session"  # HS256 wants >= 32 bytes
    READY_TIMEOUT_S = 40.0

    def __init__(self, workdir: Path, avail: Availability, workers: int = 2,
                 tree: Path = ROOT, env: dict[str, str] | None = None) -> None:
        super().__init__(workdir, avail)
        self.count = max(2, workers)
        self.tree = tree
        self.env = dict(env or {})  # OG_* over the bench's (OG_DRAIN_WINDOW_MS, say)
        self.runtime: Path | None = None
        self.agent_port = 0
        self.base_port = 0

    def workers(self) -> int:
        return self.count

    def unavailable(self) -> str | None:
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        return None if os.access(haproxy, os.X_OK) else "haproxy is not installed"

    @staticmethod
    def player_capacity(nofile: int) -> int:
        """Players HAProxy holds under this descriptor limit: two descriptors each."""
        return max(0, (nofile - HAPROXY_FD_RESERVE) // 2)

    @property
    def node_settings(self) -> NodeSettings:
        """What `oddsgate run` will read: its own defaults, this system's OG_* over them."""
        return NodeSettings.from_env(self.env)

    def start(self, redis_url: str) -> Target:
        self.feed_address = redis_url
        self.runtime = self.workdir / "node"
        self.runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        frontend, agent = free_port(), free_port()
        base = free_port_range(node_port_count(self.count))
        self.agent_port, self.base_port = agent, base  # for an edge HAProxy in front (scaling)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OG_")},
            "OG_RUNTIME_DIR": str(self.runtime),
            "OG_REDIS_URL": redis_url,
            "OG_JWT_SECRET": self.SECRET,
            "OG_ALLOW_ANONYMOUS": "1",  # the warming connections carry no token
            "OG_WORKERS": str(self.count),
            "OG_BASE_PORT": str(base),
            "OG_AGENT_PORT": str(agent),
            "OG_METRICS_PORT": "0",
            "OG_HAPROXY_BIND": f"{LOOPBACK}:{frontend}",
            "OG_NODE": "bench",
            "OG_SHUTDOWN_DEADLINE_S": "5",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(self.tree),
            **self.env,
        }
        proc = self.server.start([sys.executable, "-m", "supervisor.cli", "run", "--haproxy"],
                                 self.workdir / "oddsgate-node.log", env, cwd=self.tree)
        self.wait_ready(proc)
        return Target([(LOOPBACK, frontend)], self.protocol, via="haproxy",
                      backends=[(LOOPBACK, base + i) for i in range(self.count)],
                      token_secret=self.SECRET)

    def command(self, timeout: float = 30.0, **cmd: object) -> dict:
        """One control-socket command (supervisor/control.py): status, drain, undrain."""
        assert self.runtime is not None, "not started"
        reply = control_request(self.runtime / "control.sock", cmd, timeout=timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"control {cmd}: {reply.get('error') or reply}")
        return reply

    def wait(self, predicate, what: str, timeout: float = READY_TIMEOUT_S,
             proc: subprocess.Popen | None = None) -> dict:
        """Poll `status` until `predicate(status)`; the last status."""
        deadline = time.monotonic() + timeout
        status: dict = {}
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode}:\n{self.server.log_tail(40)}")
            try:
                status = self.command(cmd="status", timeout=5)
            except (ConnectionError, OSError, RuntimeError):
                status = {}
            if status and predicate(status):
                return status
            time.sleep(0.1)
        raise RuntimeError(f"{what} not within {timeout:.0f}s: {status.get('workers')} "
                           f"{status.get('haproxy')}\n{self.server.log_tail(20)}")

    def wait_ready(self, proc: subprocess.Popen | None = None) -> dict:
        """Every worker ready and, in HAProxy's own view, every server UP (rise 2)."""
        return self.wait(lambda s: all(w["phase"] == "ready" and w["agent"] == "up ready"
                                       for w in s["workers"])
                         and set((s.get("haproxy") or {}).values()) == {"UP"},
                         "every worker ready and UP in HAProxy", proc=proc)

    def stop(self) -> None:
        family = self.processes()  # the supervisor and its descendants, while they are there
        self.server.stop(timeout=30.0)
        for proc in family:  # anything a killed supervisor left behind (psutil checks reuse)
            with contextlib.suppress(psutil.Error):
                if proc.is_running():
                    proc.kill()


class PlainWs(System):
    name = "plain-ws"
    protocol = "plain"
    description = "websockets + redis-py, one process, await send per follower"

    def start(self, redis_url: str) -> Target:
        return self._start_script(Path(sys.executable), "plain_ws.py", redis_url)


class SocketIOPy(System):
    name = "python-socketio"
    protocol = "socketio"
    emitter = "socketio_py"
    description = "python-socketio 5 + AsyncRedisManager on aiohttp/uvloop, one process"

    def unavailable(self) -> str | None:
        return self.avail.peers_venv

    def start(self, redis_url: str) -> Target:
        return self._start_script(self.avail.python, "socketio_py.py", redis_url)


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
