"""`oddsgate demo`: a quiet terminal, the processes' logs in files.

Run as a user runs it, in a subprocess with free ports: without a terminal
(one report line a second, kept; what CI sees) until SIGTERM, and on a
pseudo-terminal (one status line rewritten in place). tests/test_cli_smoke.py
runs it with --duration as the README shows it.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import orjson
import pytest

from supervisor.demo import StatusOutput, Tick
from supervisor.embedded_redis import free_port, free_port_range
from supervisor.settings import node_port_count
from tests.conftest import ROOT

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
pytestmark = [
    pytest.mark.skipif(not (os.access(HAPROXY, os.X_OK) and shutil.which("redis-server")),
                       reason="needs haproxy and redis-server"),
    pytest.mark.timeout(90),
]


def demo_env(runtime: Path, **settings: str) -> tuple[dict[str, str], int, int]:
    port, metrics = free_port(), free_port()
    env = {**os.environ, "OG_RUNTIME_DIR": str(runtime), "OG_WORKERS": "2",
           "OG_BASE_PORT": str(free_port_range(node_port_count(2))),
           "OG_AGENT_PORT": str(free_port()),
           "OG_METRICS_PORT": str(metrics), **settings}
    env.pop("OG_REDIS_URL", None)
    return env, port, metrics


def demo_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "supervisor.cli", "demo", "--clients", "4", "--port",
            str(port)]


def test_without_a_terminal_a_line_a_second_and_the_logs_in_files(tmp_path: Path) -> None:
    runtime = tmp_path / "demo"
    env, port, metrics = demo_env(runtime, OG_LOG_FORMAT="json")
    proc = subprocess.Popen(demo_argv(port), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while sum(line.startswith("t=") for line in lines) < 2:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, ("".join(lines), proc.poll())
            lines.append(line)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stdout = "".join(lines) + out
    assert proc.returncode == 0, (stdout, err)
    header = stdout.split("\nt=")[0]
    for wanted in [f"oddsgate demo: starting a node (its log: {runtime / 'node.log'})",
                   "a synthetic feed at 200 events/s, 4 players",
                   f"2 workers on 127.0.0.1:{env['OG_BASE_PORT']}-",
                   f"HAProxy on 127.0.0.1:{port}",
                   f"players   ws://127.0.0.1:{port}/ws",
                   f"shell     http://127.0.0.1:{port}/?token=",
                   f"partners  http://127.0.0.1:{port}/partner/?token=",
                   f"metrics   http://127.0.0.1:{metrics}/metrics (import deploy/grafana/",
                   f"logs      {runtime / 'node.log'} (node, workers, HAProxy), "
                   f"{runtime / 'demo.log'}",
                   f"try       OG_RUNTIME_DIR={runtime} ",
                   " status\n", " drain --worker 0 ", " reload "]:
        assert wanted in header, (wanted, header)
    # One line on partner traffic: on where the node answers /t/, else why it is off.
    assert ("\n            synthetic partners acme, tipster-9, oddsblog clicking" in header) \
        != ("\n            partner traffic off: " in header), header
    reports = [line for line in stdout.splitlines() if line.startswith("t=")]
    assert len(reports) >= 2 and all("violations=0" in r for r in reports), stdout
    assert all(line.startswith(("oddsgate demo:", "  ", "t=")) for line in stdout.splitlines())
    assert err == ""  # every log line went to a file
    # The node's log: the supervisor, both workers and HAProxy, one JSON object a line.
    node_log = [orjson.loads(line) for line in (runtime / "node.log").read_text().splitlines()]
    roles = {(r["role"], r["index"]) for r in node_log}
    assert {("supervisor", None), ("worker", 0), ("worker", 1), ("haproxy", None)} <= roles
    assert any(r["message"].startswith("shutting down: draining") for r in node_log)
    assert (runtime / "demo.log").exists()
    assert oct((runtime / "node.log").stat().st_mode & 0o777) == "0o600"


def test_on_a_terminal_one_status_line_rewritten_in_place(tmp_path: Path) -> None:
    env, port, _ = demo_env(tmp_path / "tty")
    try:
        leader, follower = pty.openpty()
    except OSError as exc:  # no /dev/ptmx in this sandbox
        pytest.skip(f"no pseudo-terminal: {exc}")
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    proc = subprocess.Popen(demo_argv(port), cwd=ROOT, env=env, stdin=follower,
                            stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while seen.count(b"\r\x1b[2K") < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                seen += os.read(leader, 65536)
        proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 40
        while time.monotonic() < end:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: every process on the terminal is gone
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    text = seen.decode(errors="replace")
    assert "oddsgate demo: a node on this machine" in text
    status = [part for part in text.split("\r\x1b[2K") if " players | " in part]
    assert len(status) >= 3, text
    assert all("violations 0" in s and "w0 ready" in s and "w1 ready" in s
               for s in status), status
    assert "\nt=" not in text  # no line a second on a terminal
    # between two refreshes nothing but the line itself: no log line, no newline
    assert all("\n" not in s.rstrip("\r\n") for s in status[:-1]), status


def test_status_line_fits_the_terminal(monkeypatch) -> None:
    class Screen:
        def __init__(self) -> None:
            self.text = ""

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("COLUMNS", "40")
    screen = Screen()
    output = StatusOutput(screen)  # type: ignore[arg-type]
    tick = Tick(1.0, 50, 1234, 0.8, 1.4, 0, 0, 0,
                [{"index": 0, "phase": "ready", "connections": 25, "agent": "up ready"}])
    output.tick(tick)
    output.tick(tick)
    output.print("a line that stays")
    output.close()
    frames = screen.text.split("\r\x1b[2K")
    assert frames[1] == frames[2] and len(frames[1]) < 40 and frames[1].endswith("…")
    assert frames[-1] == "a line that stays\n"  # the status line was cleared first
