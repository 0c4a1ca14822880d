"""The HAProxy layer against the real haproxy binary, on free loopback ports.

Three tiny backends stand in for gateway workers (`/healthz`, `/who` naming
the backend, and a WebSocket-like upgrade that echoes lines), and a tiny agent
stands in for the supervisor's agent-check port. Nothing is mocked on
HAProxy's side: what these tests see is what a node's players would see.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.client
import os
import shutil
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import psutil
import pytest

from haproxy.check import check
from haproxy.errors import HAProxyConfigError, HAProxyError
from haproxy.render import load_template, render
from haproxy.settings import HAProxySettings, NodeTarget
from supervisor.agent import agent_request_index
from supervisor.cli import main as oddsgate
from supervisor.embedded_redis import free_port
from supervisor.haproxy import HAProxyProcess, fit_maxconn, read_servers
from supervisor.settings import NodeSettings

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
pytestmark = [
    pytest.mark.skipif(not os.access(HAPROXY, os.X_OK), reason="haproxy is not installed"),
    pytest.mark.timeout(60),
]
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
COOKIES = [f"session-{i:04d}" for i in range(200)]


def until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> float:
    """Wait until `predicate()` is true; the seconds it took. AssertionError after `timeout`."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


# -- stand-ins for workers and the supervisor's agent -------------------------


class QuietHTTPServer(ThreadingHTTPServer):
    """HAProxy resets check connections after the answer; that is not worth a traceback."""

    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class Backend:
    """A fake gateway worker: `/healthz` (200 or 503), `/who` (its name), `/ws` (tunnel)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.healthy = True  # /healthz answers 200, else 503 (draining or starting)
        self.refusing = False  # /who answers 503, as /ws does on a draining worker
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    self._reply(200 if backend.healthy else 503, b"ok\n")
                elif self.path == "/who":
                    if backend.refusing:
                        self._reply(503, b"draining\n")
                    else:
                        self._reply(200, backend.name.encode())
                elif self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
                    self._tunnel()
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _tunnel(self) -> None:
                """A WebSocket upgrade, then a line echo prefixed with our name."""
                key = self.headers.get("Sec-WebSocket-Key", "")
                accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest())
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept.decode())
                self.end_headers()
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    while line := self.rfile.readline():
                        self.wfile.write(backend.name.encode() + b":" + line)
                        self.wfile.flush()

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Agent:
    """The supervisor's agent-check port: reads `w<i>\\n`, answers `replies[i]` (default ready).

    A reply of None closes the connection without answering (a mute agent).
    """

    def __init__(self) -> None:
        self.replies: dict[int, str | None] = {}
        self.requests: Counter[bytes] = Counter()
        agent = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(2)
                with contextlib.suppress(OSError):
                    data = self.request.recv(64)
                    agent.requests[data] += 1
                    index = agent_request_index(data)
                    reply = agent.replies.get(index, "ready") if index is not None else "ready"
                    if reply is not None:
                        self.request.sendall(reply.encode() + b"\n")

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclasses.dataclass
class Node:
    haproxy: HAProxyProcess
    backends: list[Backend]
    agent: Agent

    @property
    def port(self) -> int:
        return self.haproxy.settings.bind_port

    def who(self, cookie: str | None, timeout: float = 5.0) -> str:
        """The backend that served `/who` for this cookie, through HAProxy."""
        status, body = self.get("/who", cookie, timeout)
        assert status == 200, (status, body)
        return body

    def get(self, path: str, cookie: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Cookie": f"og_session={cookie}"} if cookie else {}
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def mapping(self) -> dict[str, str]:
        return {cookie: self.who(cookie) for cookie in COOKIES}

    def status(self, name: str) -> str:
        return self.haproxy.servers()[name]["status"]


class Tunnel:
    """A WebSocket-like upgraded connection through HAProxy: send a line, get it echoed."""

    def __init__(self, port: int, cookie: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /ws HTTP/1.1\r\nHost: oddsgate\r\nCookie: og_session={cookie}\r\n"
            "Connection: Upgrade\r\nUpgrade: websocket\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.file = self.sock.makefile("rb")
        status = self.file.readline()
        assert b" 101 " in status, status
        while self.file.readline() not in (b"\r\n", b""):
            pass

    def echo(self, text: str) -> str:
        self.sock.sendall(text.encode() + b"\n")
        return self.file.readline().decode().rstrip("\n")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def node_settings(tmp_path: Path, backends: list[Backend], agent: Agent,
                  **overrides: object) -> HAProxySettings:
    values: dict[str, object] = {
        "bind_port": free_port(),
        "worker_ports": [b.port for b in backends],
        "agent_port": agent.port,
        "stats_socket": str(tmp_path / "stats.sock"),
        "maxconn": 2000,
    }
    values.update(overrides)
    return HAProxySettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    backends = [Backend(f"b{i}") for i in range(3)]
    agent = Agent()
    proc = HAProxyProcess(node_settings(tmp_path, backends, agent), tmp_path / "run",
                          haproxy=HAPROXY)
    pids: list[int] = []
    try:
        proc.start()
        pids = [proc.pid or 0, *proc.worker_pids()]
        yield Node(proc, backends, agent)
    finally:
        with contextlib.suppress(HAProxyError):
            pids += proc.worker_pids() if proc.running else []
        proc.stop(timeout=2.0)
        for backend in backends:
            backend.close()
        agent.close()
    assert not proc.running
    assert not [pid for pid in pids if psutil.pid_exists(pid)], "haproxy left processes behind"


def settings(tmp_path: Path, **overrides: object) -> HAProxySettings:
    values: dict[str, object] = {
        "bind_port": 18000,
        "worker_ports": [18001, 18002, 18003],
        "agent_port": 18999,
        "stats_socket": str(tmp_path / "stats.sock"),
        "state_file": str(tmp_path / "state"),
    }
    values.update(overrides)
    return HAProxySettings(**values)  # type: ignore[arg-type]


def code_lines(config: str) -> list[str]:
    """The config without comments and blank lines."""
    return [line.strip() for line in config.splitlines()
            if line.strip() and not line.strip().startswith("#")]


# -- rendering and checking ----------------------------------------------------


def test_rendered_config_passes_haproxy_check_without_warnings(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("1\n")
    config = render(settings(tmp_path, server_maxconn=5000))
    check(config, haproxy=HAPROXY, strict=True)
    lines = code_lines(config)
    assert 'server w0 127.0.0.1:18001 id 1 agent-send "w0\\n"' in lines
    assert 'server w2 127.0.0.1:18003 id 3 agent-send "w2\\n"' in lines
    assert "balance hash req.cook(og_session)" in lines
    assert "hash-type consistent" in lines
    assert "timeout tunnel 3600s" in lines
    assert f"server-state-file {tmp_path / 'state'}" in lines
    assert any(line.startswith("stats socket ") and "mode 600 level admin" in line
               for line in lines)
    default_server = next(line for line in lines if line.startswith("default-server"))
    assert "agent-addr 127.0.0.1 agent-port 18999 agent-inter 200ms" in default_server
    assert "check inter 500ms fall 3 rise 2 weight 100" in default_server
    assert default_server.endswith("maxconn 5000")
    assert not any("shutdown-sessions" in line for line in lines)
    assert not any("http-server-close" in line for line in lines)
    assert not any(line in ("daemon", "master-worker") for line in lines)


def test_json_log_format_renders_and_passes_haproxy_check(tmp_path: Path) -> None:
    """OG_LOG_FORMAT=json: the same redaction, inside a JSON object; `haproxy -c` clean."""
    (tmp_path / "state").write_text("1\n")
    text = [line for line in code_lines(render(settings(tmp_path)))
            if line.startswith("log-format ")]
    config = render(settings(tmp_path, log_format="json"))
    check(config, haproxy=HAPROXY, strict=True)
    (line,) = [line for line in code_lines(config) if line.startswith("log-format ")]
    assert line.startswith('log-format "{\\"accept_ts\\":%Ts.%ms,') and line.endswith('}"')
    redaction = "regsub(\\\"([?&;])([^=&;]*[%][^=&;]*|token|og_session)=[^&;]*\\\""
    assert redaction in line and redaction in text[0]
    with pytest.raises(ValueError, match="log_format='xml'"):
        render(settings(tmp_path, log_format="xml"))


def test_ipv6_addresses_render_in_brackets(tmp_path: Path) -> None:
    config = render(settings(tmp_path, bind_host="::1", worker_host="::1", agent_host="::1"))
    check(config, haproxy=HAPROXY)
    lines = code_lines(config)
    assert "server w1 [::1]:18002 id 2 agent-send \"w1\\n\"" in lines
    assert any(line.startswith("bind [::1]:") for line in lines)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"worker_ports": []}, "at least one worker"),
    ({"worker_ports": [0]}, "worker_ports\\[0\\]"),
    ({"worker_ports": [18001, 70000]}, "worker_ports\\[1\\]"),
    ({"worker_ports": [18001, 18001]}, "duplicates"),
    ({"bind_port": 18002}, "bind_port"),
    ({"agent_port": True}, "agent_port"),
    ({"stats_socket": "relative/stats.sock"}, "absolute"),
    ({"stats_socket": "/tmp/" + "x" * 120}, "longer than"),
    ({"state_file": "state"}, "absolute"),
    ({"stats_socket": "/tmp/a b.sock"}, "not allowed"),
    ({"bind_host": "127.0.0.1 #"}, "bind_host"),
    ({"worker_host": "127.0.0.1:8000"}, "IPv6"),
    ({"agent_inter_ms": 0}, "agent_inter_ms"),
    ({"server_maxconn": -1}, "server_maxconn"),
    ({"log_level": "loud"}, "log_level"),
])
def test_bad_settings_raise_value_error(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render(settings(tmp_path, **overrides))


def test_tracking_links_go_to_the_click_listeners_which_track_their_workers(
        tmp_path: Path) -> None:
    (tmp_path / "state").write_text("1\n")
    config = render(settings(tmp_path, click_ports=[18101, 18102, 18103]))
    check(config, haproxy=HAPROXY, strict=True)
    lines = code_lines(config)
    assert "use_backend clicks if { path_beg /t/ }" in lines
    assert lines.index("use_backend clicks if { path_beg /t/ }") \
        < lines.index("default_backend gateway")
    clicks = lines[lines.index("backend clicks"):]
    assert "http-reuse always" in clicks and "balance leastconn" in clicks
    assert "server c0 127.0.0.1:18101 id 1 track gateway/w0" in clicks
    assert "server c2 127.0.0.1:18103 id 3 track gateway/w2" in clicks
    # without click listeners /t/ stays with the workers' own ports
    plain = code_lines(render(settings(tmp_path)))
    assert not any("use_backend" in line or line.startswith("server c") for line in plain)
    check(render(settings(tmp_path)), haproxy=HAPROXY, strict=True)


def test_several_nodes_click_listeners_follow_each_nodes_worker_ports(tmp_path: Path) -> None:
    nodes = [NodeTarget.parse("a=127.0.0.1:18001:2:18999:1"),
             NodeTarget.parse("b=127.0.0.2:18001:2:18999:2")]
    made = HAProxySettings.for_nodes(nodes, bind_port=18000,
                                     stats_socket=str(tmp_path / "stats.sock"))
    config = render(made)
    check(config, haproxy=HAPROXY, strict=True)
    lines = code_lines(config)
    assert "server a-c1 127.0.0.1:18004 id 1002 track gateway/a-w1" in lines
    assert "server b-c0 127.0.0.2:18003 id 2001 track gateway/b-w0" in lines


@pytest.mark.parametrize(("overrides", "message"), [
    ({"click_ports": [18101]}, "1 for 3 workers"),
    ({"click_ports": [18101, 18102, 18001]}, r"click_ports\[2\]"),
    ({"click_ports": [18101, 18101, 18103]}, r"click_ports\[1\]"),
    ({"click_ports": [18101, 18102, 70000]}, r"click_ports\[2\]"),
    ({"click_ports": [18101, 18102, 18000]}, "bind_port"),
])
def test_bad_click_ports_raise_value_error(tmp_path: Path, overrides: dict,
                                           message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render(settings(tmp_path, **overrides))


def test_for_workers_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        HAProxySettings.for_workers(0, 9001, bind_port=2, agent_port=1, stats_socket="/tmp/s")
    made = HAProxySettings.for_workers(3, 9001, bind_port=2, agent_port=1, stats_socket="/tmp/s")
    assert made.worker_ports == [9001, 9002, 9003]
    assert made.click_ports == [9004, 9005, 9006]  # right after, as a node's default
    made = HAProxySettings.for_workers(2, 9001, 9501, bind_port=2, agent_port=1,
                                       stats_socket="/tmp/s")
    assert made.click_ports == [9501, 9502]


def test_broken_config_fails_check_with_haproxys_message(tmp_path: Path) -> None:
    broken = load_template().replace("hash-type consistent", "hash-type nonsense")
    with pytest.raises(HAProxyConfigError, match="'hash-type' only supports"):
        check(render(settings(tmp_path), template=broken), haproxy=HAPROXY)
    path = tmp_path / "bad.cfg"
    path.write_text("global\n    this-is-not-a-keyword 1\n")
    with pytest.raises(HAProxyConfigError, match="this-is-not-a-keyword"):
        check(path, haproxy=HAPROXY)
    with pytest.raises(HAProxyConfigError, match="no HAProxy config"):
        check(tmp_path / "missing.cfg", haproxy=HAPROXY)
    with pytest.raises(ValueError, match="placeholder"):
        render(settings(tmp_path), template="global\n    maxconn $nope\n")


def test_fit_maxconn_lowers_to_the_descriptor_limit(tmp_path: Path) -> None:
    wanted = settings(tmp_path, maxconn=100_000)
    fitted = fit_maxconn(wanted, fd_limit=20_000)
    assert fitted.maxconn > 1000
    assert 2 * fitted.maxconn < 20_000
    assert fit_maxconn(wanted, fd_limit=1_000_000).maxconn == 100_000


# -- routing -------------------------------------------------------------------


def test_same_cookie_same_backend_and_cookies_spread(node: Node) -> None:
    first = node.who("player-42")
    assert all(node.who("player-42") == first for _ in range(20))
    spread = Counter(node.mapping().values())
    assert set(spread) == {"b0", "b1", "b2"}, spread
    assert min(spread.values()) >= 20, spread
    # no cookie (a ?token= client): round robin over every backend
    assert {node.who(None) for _ in range(9)} == {"b0", "b1", "b2"}
    # the agent was asked with the agent-send string, newline included (its checks
    # run every 200 ms per server, not in step with the health checks: wait for them)
    until(lambda: {b"w0\n", b"w1\n", b"w2\n"} <= set(node.agent.requests), timeout=5)
    assert node.get("/haproxy-health")[0] == 200
    assert set(read_servers(node.haproxy.settings.stats_socket)) == {"w0", "w1", "w2"}


def test_request_log_never_holds_a_session_token(node: Node) -> None:
    """HAProxy logs each request line; `?token=` and the og_session cookie stay out of it."""
    secrets = ["QUERY-SECRET", "ESCAPED-SECRET", "COOKIE-SECRET", "SEMI-SECRET"]
    paths = ["/who?topic=odds:1&token=QUERY-SECRET",
             "/who?tok%65n=ESCAPED-SECRET",  # the worker decodes the name into `token`
             "/who?x=1;TOKEN=SEMI-SECRET"]
    for path in paths:
        conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=5)
        try:
            conn.request("GET", path, headers={"Cookie": "og_session=COOKIE-SECRET"})
            conn.getresponse().read()  # 404 from the stand-in: only the log line matters
        finally:
            conn.close()
    log_path = node.haproxy.log_path
    until(lambda: log_path.read_text().count("GET /who?") >= len(paths), timeout=5)
    text = log_path.read_text()
    assert not [s for s in secrets if s in text], text[-2000:]
    assert '"GET /who?topic=odds:1&token=REDACTED HTTP/1.1"' in text  # the rest is kept
    assert "tok%65n=REDACTED" in text and "TOKEN=REDACTED" in text


def test_json_request_log_is_relayed_one_object_a_line_without_tokens(tmp_path: Path) -> None:
    """OG_LOG_FORMAT=json: HAProxy writes JSON request lines, handed to `on_line` (the
    supervisor's relay) instead of haproxy.log; still no session token in them."""
    backend, agent = Backend("b0"), Agent()
    lines: list[tuple[str, int]] = []
    proc = HAProxyProcess(node_settings(tmp_path, [backend], agent, log_format="json"),
                          tmp_path / "run", haproxy=HAPROXY,
                          on_line=lambda line, pid: lines.append((line, pid)))
    try:
        proc.start()
        master = proc.pid
        for path in ["/who?topic=odds:1&token=QUERY-SECRET", '/who?q="x\\y"&tok%65n=ESC']:
            conn = http.client.HTTPConnection("127.0.0.1", proc.settings.bind_port, timeout=5)
            try:
                conn.request("GET", path, headers={"Cookie": "og_session=COOKIE-SECRET"})
                conn.getresponse().read()
            finally:
                conn.close()
        until(lambda: sum(line.startswith("{") for line, _ in lines) >= 2, timeout=5)
    finally:
        proc.stop(timeout=2.0)
        backend.close()
        agent.close()
    text = "\n".join(line for line, _ in lines)
    assert not [s for s in ("QUERY-SECRET", "ESC", "COOKIE-SECRET") if s in text], text
    requests = [orjson.loads(line) for line, _ in lines if line.startswith("{")]
    assert [r["request"] for r in requests] == [
        "GET /who?topic=odds:1&token=REDACTED HTTP/1.1",
        'GET /who?q="x\\y"&tok%65n=REDACTED HTTP/1.1']
    assert {r["backend"] for r in requests} == {"gateway"}
    assert all(isinstance(r[k], int) for r in requests for k in ("status", "Ta", "bytes"))
    assert {pid for _, pid in lines} == {master}
    assert not proc.log_path.exists()  # nothing went to the file


def test_agent_drain_moves_only_the_drained_servers_keys(node: Node) -> None:
    before = node.mapping()
    drained = Counter(before.values()).most_common(1)[0][0]
    index = int(drained[1:])
    moved = [c for c, b in before.items() if b == drained]
    tunnel = Tunnel(node.port, moved[0])
    assert tunnel.echo("hello") == f"{drained}:hello"

    node.agent.replies[index] = "drain"
    until(lambda: node.status(f"w{index}").startswith("DRAIN"), timeout=2.0)
    after = node.mapping()
    assert all(after[c] != drained for c in moved)
    assert all(after[c] == before[c] for c in COOKIES if c not in moved)
    # an established tunnel to the drained worker is not cut
    assert tunnel.echo("still there") == f"{drained}:still there"
    assert int(node.haproxy.servers()[f"w{index}"]["scur"]) == 1

    node.agent.replies[index] = "ready"
    until(lambda: node.status(f"w{index}") == "UP", timeout=2.0)
    assert node.mapping() == before
    assert tunnel.echo("bye") == f"{drained}:bye"
    tunnel.close()


def test_agent_weight_only_moves_keys_off_the_lighter_server(node: Node) -> None:
    before = node.mapping()
    node.agent.replies[1] = "ready 25%"
    until(lambda: node.haproxy.servers()["w1"]["weight"] == "25", timeout=2.0)
    after = node.mapping()
    changed = [c for c in COOKIES if after[c] != before[c]]
    assert changed, "a quarter weight must move some keys"
    assert all(before[c] == "b1" for c in changed)


def test_failing_health_check_takes_a_server_out_but_keeps_its_tunnels(node: Node) -> None:
    # A server starts as "UP 1/3": one failed check would take it out. It is
    # fully UP (plain "UP") after fall - 1 good checks.
    until(lambda: node.status("w2") == "UP", timeout=3.0)
    before = node.mapping()
    sick = node.backends[2]
    cookies = [c for c, b in before.items() if b == sick.name]
    tunnel = Tunnel(node.port, cookies[0])
    assert tunnel.echo("hi") == f"{sick.name}:hi"

    sick.healthy = False
    # fall 3: DOWN only after the third failed check in a row (HAProxy counts them)
    until(lambda: node.status("w2") == "DOWN", timeout=4.0)
    assert int(node.haproxy.servers()["w2"]["chkfail"]) >= 3
    after = node.mapping()
    assert all(after[c] != sick.name for c in cookies)
    assert all(after[c] == before[c] for c in COOKIES if c not in cookies)
    assert tunnel.echo("alive") == f"{sick.name}:alive"  # no shutdown-sessions
    tunnel.close()

    sick.healthy = True
    until(lambda: node.status("w2") == "UP", timeout=3.0)
    assert node.mapping() == before


def test_503_from_a_draining_worker_is_retried_elsewhere(node: Node) -> None:
    before = node.mapping()
    refusing = node.backends[0]
    refusing.refusing = True  # the worker drains; its agent has not said so yet
    cookies = [c for c, b in before.items() if b == refusing.name][:10]
    for cookie in cookies:
        assert node.who(cookie) != refusing.name


# -- lifecycle -------------------------------------------------------------------


def test_reload_keeps_serving(node: Node) -> None:
    failures: list[str] = []
    served = Counter()
    stop = threading.Event()

    def load() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                served[node.who(COOKIES[i % len(COOKIES)], timeout=2.0)] += 1
            except Exception as exc:  # any failure is the test's failure
                failures.append(repr(exc))

    tunnel = Tunnel(node.port, "player-7")
    owner = tunnel.echo("before")
    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.2)
        first = node.haproxy.worker_pids()
        node.haproxy.reload()
        time.sleep(0.2)
        node.haproxy.reload(dataclasses.replace(node.haproxy.settings, log_level="notice"))
        time.sleep(0.2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not failures, failures[:5]
    assert sum(served.values()) > 50
    assert node.haproxy.worker_pids() != first
    assert node.haproxy.settings.log_level == "notice"
    # the tunnel stays with the old worker, which finishes it before leaving
    assert tunnel.echo("after") == owner.replace("before", "after")
    tunnel.close()


def test_reload_carries_the_agents_drain_over(node: Node) -> None:
    node.agent.replies[1] = "drain"
    until(lambda: node.status("w1").startswith("DRAIN"), timeout=2.0)
    node.agent.replies[1] = None  # the agent goes mute: HAProxy keeps the last state
    time.sleep(0.5)
    assert node.status("w1") == "DRAIN (agent)"
    node.haproxy.reload()
    assert node.status("w1") == "DRAIN (agent)"  # from the state file, not from the agent
    assert all(node.who(c) != "b1" for c in COOKIES[:50])


def test_bad_reload_leaves_the_running_config(node: Node) -> None:
    workers = node.haproxy.worker_pids()
    with pytest.raises(ValueError):
        node.haproxy.reload(dataclasses.replace(node.haproxy.settings, worker_ports=[]))
    assert node.haproxy.worker_pids() == workers
    assert node.who("player-1") in {"b0", "b1", "b2"}


def test_start_fails_clearly_when_the_port_is_taken(tmp_path: Path) -> None:
    agent = Agent()
    with socket.socket() as taken:
        # SO_REUSEPORT, as a stale HAProxy's listener has: only `noreuseport`
        # makes ours refuse to share the port with it.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = HAProxyProcess(
            HAProxySettings(bind_port=port, worker_ports=[free_port()], agent_port=agent.port,
                            stats_socket=str(tmp_path / "s.sock"), maxconn=100),
            tmp_path, haproxy=HAPROXY)
        try:
            with pytest.raises(HAProxyError, match="exited"):
                proc.start(timeout=5.0)
            assert not proc.running
        finally:
            proc.stop()
            agent.close()


# -- `oddsgate haproxy-config` ---------------------------------------------------


def test_haproxy_config_prints_the_config(tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    code = oddsgate(["haproxy-config", "--workers", "2", "--base-port", "9101",
                     "--bind", "127.0.0.1:9100", "--agent-port", "9199",
                     "--stats-socket", str(tmp_path / "s.sock"), "--check", "--haproxy", HAPROXY])
    out = capsys.readouterr().out
    assert code == 0
    assert 'server w0 127.0.0.1:9101 id 1 agent-send "w0\\n"' in out
    assert 'server w1 127.0.0.1:9102 id 2 agent-send "w1\\n"' in out
    assert "bind 127.0.0.1:9100" in out

    target = tmp_path / "haproxy.cfg"
    assert oddsgate(["haproxy-config", "--workers", "1", "--stats-socket",
                     str(tmp_path / "s.sock"), "--output", str(target)]) == 0
    assert "server w0 127.0.0.1:8001 id 1" in target.read_text()
    assert capsys.readouterr().out == ""


def test_haproxy_config_defaults_are_the_nodes(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """With no flags, HAProxy is pointed at the ports a default `oddsgate run` listens on."""
    node = NodeSettings()
    assert oddsgate(["haproxy-config", "--workers", "2",
                     "--stats-socket", str(tmp_path / "s.sock")]) == 0
    lines = code_lines(capsys.readouterr().out)
    default_server = next(line for line in lines if line.startswith("default-server"))
    assert f"agent-port {node.agent_port} " in default_server
    assert f"bind {node.haproxy_bind}" in lines
    assert any(line.startswith(f"server w1 127.0.0.1:{node.base_port + 1} ") for line in lines)


@pytest.mark.parametrize("argv", [
    ["--workers", "0"],
    ["--workers", "many"],
    ["--bind", "nowhere"],
    ["--base-port", "70000"],
    ["--agent-port", "8001"],
    ["--stats-socket", "relative.sock"],
    ["--no-such-flag"],
])
def test_haproxy_config_bad_arguments_exit_2(argv: list[str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    if "--stats-socket" not in argv:
        argv = [*argv, "--stats-socket", str(tmp_path / "s.sock")]
    assert oddsgate(["haproxy-config", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err
