"""The embedded redis-server: it comes up, answers, restarts in place, and never outlives us."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from supervisor import embedded_redis
from supervisor.embedded_redis import EmbeddedRedis, EmbeddedRedisError, free_port, free_port_range

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None and not os.path.exists("/usr/bin/redis-server"),
    reason="redis-server is not installed (scripts/bootstrap.sh installs it)",
)


def _gone(pid: int, within: float = 3.0) -> bool:
    """True once no process has this pid: not running, and not a zombie nobody reaped."""
    deadline = time.monotonic() + within
    while os.path.exists(f"/proc/{pid}"):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path: a unix socket path must fit in 107 bytes, and pytest's tmp_path may not."""
    path = Path(tempfile.mkdtemp(prefix="og-er-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_tcp_start_ping_stop(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, port=0)
    server.start()
    try:
        pid = server.pid
        assert pid is not None and server.running
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.close()
        config = server.config_path.read_text()
        for line in ('save ""', "appendonly no", "daemonize no", f"port {server.port}"):
            assert line in config.splitlines()
        assert server.log_path.exists()
    finally:
        server.stop()
    assert not server.running and server.pid is None
    assert _gone(pid)
    server.stop()  # a second stop is harmless


def test_unix_socket_mode(short_dir: Path) -> None:
    with EmbeddedRedis(short_dir) as server:
        pid = server.pid
        assert server.socket_path == short_dir / "redis.sock"
        assert server.url == f"unix://{short_dir}/redis.sock"
        mode = os.stat(server.socket_path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o700
        assert "port 0" in server.config_path.read_text().splitlines()
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.close()
    assert pid is not None and _gone(pid)
    assert not (short_dir / "redis.sock").exists()


def test_socket_path_too_long_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unix socket path"):
        EmbeddedRedis(tmp_path / ("x" * 120))


def test_restart_keeps_data_when_persistent(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, port=0, persist=True) as server:
        url, first_pid = server.url, server.pid
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        client.xadd("s", {"a": "1"})
        server.restart()
        assert server.url == url
        assert server.pid not in (None, first_pid)
        assert first_pid is not None and _gone(first_pid)
        assert client.get("k") == b"v"  # redis-py reconnects on its own
        assert client.xlen("s") == 1
        client.close()
        lines = server.config_path.read_text().splitlines()
        assert "appendonly yes" in lines and "appendfsync everysec" in lines


def test_a_nodes_own_redis_keeps_clicks_across_its_restart(short_dir: Path) -> None:
    """The embedded Redis a node runs (OG_REDIS_URL empty) appends every write and
    fsyncs each second, as the README's Tracking links section says clicks rely on."""
    from gateway.config import Settings
    from supervisor.runtime import redis_for

    settings = Settings.from_env({"OG_RUNTIME_DIR": str(short_dir)}, allow_anonymous=True)
    with redis_for(settings) as url:
        lines = (short_dir / "redis" / "redis.conf").read_text().splitlines()
        assert "appendonly yes" in lines and "appendfsync everysec" in lines
        client = redis.Redis.from_url(url)
        client.xadd("og:clicks", {"c": "{}"})
        client.close()
    with redis_for(settings) as url:
        client = redis.Redis.from_url(url)
        assert client.xlen("og:clicks") == 1
        client.close()


def test_restart_without_persistence_starts_empty(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, port=0) as server:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        server.restart()
        assert client.get("k") is None
        client.close()


def test_start_failure_says_why(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EmbeddedRedis(tmp_path, port=taken.getsockname()[1])
        with pytest.raises(EmbeddedRedisError, match=r"(?i)address already in use"):
            server.start(timeout=3.0)
    assert not server.running and server.pid is None


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, port=0).start()
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    started = time.monotonic()
    server.stop(timeout=0.3)
    assert time.monotonic() - started < 3.0
    assert _gone(pid)


def test_forked_child_exit_leaves_parent_server_alone(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, port=0) as server:
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            try:
                embedded_redis._running.stop_all()  # what the child's atexit runs
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        assert server.running
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.close()


def _run_child(script: str, tmp_path: Path, *, sigterm: bool) -> int:
    """Run a Python child that starts a server, prints its pid, and ends; return that pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"child printed {line!r}"
    if sigterm:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    return int(line)


def test_atexit_stops_server_on_normal_exit(tmp_path: Path) -> None:
    pid = _run_child(
        """
        import sys
        from supervisor.embedded_redis import EmbeddedRedis
        server = EmbeddedRedis(sys.argv[1], port=0).start()
        print(server.pid, flush=True)
        """,
        tmp_path,
        sigterm=False,
    )
    assert _gone(pid)


def test_sigterm_turned_into_exit_stops_server(tmp_path: Path) -> None:
    pid = _run_child(
        """
        import signal, sys, time
        from supervisor.embedded_redis import EmbeddedRedis
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        server = EmbeddedRedis(sys.argv[1], port=0).start()
        print(server.pid, flush=True)
        time.sleep(30)
        """,
        tmp_path,
        sigterm=True,
    )
    assert _gone(pid)


def test_free_port_range_gives_a_run_of_bindable_ports() -> None:
    base = free_port_range(4)
    socks = []
    try:
        for offset in range(4):
            sock = socket.socket()
            socks.append(sock)
            sock.bind(("127.0.0.1", base + offset))  # raises if the range was not free
    finally:
        for sock in socks:
            sock.close()
