"""Every command the README shows, run the way a new user runs it.

Each command is the installed `.venv/bin/oddsgate` in a subprocess, from the
repository root, with an environment that holds no OG_* setting beyond the
ones the README line sets (and free ports in place of the defaults, so the
suite does not collide with a node already running here). The runtime dir is
the default one under a fresh XDG_RUNTIME_DIR, as after a login. Durations
are cut short; everything is bounded by timeouts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import orjson
import pytest

from gateway.config import describe
from supervisor.embedded_redis import free_port, free_port_range
from supervisor.settings import node_port_count
from tests.conftest import ROOT, http_get

ENTRY = Path(sys.executable).with_name("oddsgate")
OGATE = [str(ENTRY)] if ENTRY.exists() else [sys.executable, "-m", "supervisor.cli"]
SECRET = "a-new-users-secret-of-at-least-32-bytes"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
has_haproxy = os.access(HAPROXY, os.X_OK)
has_redis = shutil.which("redis-server") is not None or os.path.exists("/usr/bin/redis-server")
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def home() -> Iterator[Path]:
    """A new user's home and login runtime dir; short, for unix socket paths."""
    path = Path(tempfile.mkdtemp(prefix="og-smoke-"))
    (path / "run").mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def user_env(home: Path, **settings: str) -> dict[str, str]:
    """A login shell's environment: PATH, HOME, XDG_RUNTIME_DIR, and `settings`."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
            "LANG": "C.UTF-8", "XDG_RUNTIME_DIR": str(home / "run"), **settings}


def oddsgate(home: Path, *args: str, timeout: float = 30.0,
             **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run([*OGATE, *args], cwd=ROOT, env=user_env(home, **settings),
                          capture_output=True, text=True, timeout=timeout)


def start(home: Path, *args: str, **settings: str) -> subprocess.Popen:
    return subprocess.Popen([*OGATE, *args], cwd=ROOT, env=user_env(home, **settings),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> tuple[int, str]:
    """SIGTERM, as an operator's Ctrl-C or systemd would; the exit code and the output."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{proc.args} ignored SIGTERM for {timeout}s:\n{out[-3000:]}")
    return proc.returncode, out


def wait_for(what: str, predicate, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"{what}: exited {proc.returncode}:\n{proc.communicate()[0][-3000:]}")
        if time.monotonic() > deadline:
            code, out = stop(proc)
            pytest.fail(f"{what}: not within {timeout}s (exit {code}):\n{out[-3000:]}")
        time.sleep(0.1)


def answers(url: str) -> bool:
    try:
        return http_get(url, timeout=1)[0] == 200
    except OSError:
        return False


def one_line(done: subprocess.CompletedProcess, code: int) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


# -- Running pieces by hand ----------------------------------------------------------


COMMANDS = ["run", "status", "drain", "undrain", "reload", "haproxy-config", "worker", "feed",
            "aggregate", "providers", "token", "stats", "config", "demo"]


def test_help_lists_every_command_and_each_has_its_own(home: Path) -> None:
    done = oddsgate(home, "--help")
    assert done.returncode == 0, done.stderr
    listed = [line.split()[0] for line in done.stdout.splitlines()
              if line.startswith("    ") and line.split()[0] in COMMANDS]
    assert listed == COMMANDS
    for command, flag in [("feed", "--spike-after"), ("haproxy-config", "--agent-port"),
                          ("drain", "--wait"), ("demo", "--clients"), ("drain", "--region"),
                          ("aggregate", "--rebuild"), ("providers", "--region"),
                          ("demo", "--status-file")]:
        done = oddsgate(home, command, "--help")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"usage: oddsgate {command} ") and flag in done.stdout


def test_bad_usage_exits_2_with_the_commands_name(home: Path) -> None:
    for args, prefix in [(["feed", "--rate", "0"], "oddsgate feed: error: argument --rate"),
                         (["-v", "feed", "--count", "x"], "oddsgate feed: error: argument --count"),
                         (["haproxy-config", "--bind", "nowhere"],
                          "oddsgate haproxy-config: error: argument --bind"),
                         (["providers"], "oddsgate providers: error: the following arguments"),
                         (["nonsense"], "oddsgate: error: argument command")]:
        done = oddsgate(home, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.strip().splitlines()[-1].startswith(prefix), done.stderr


def test_config_lists_every_setting(home: Path) -> None:
    done = oddsgate(home, "config")
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
    assert {env for env, _, _ in describe()} <= listed


def test_token_mints_a_session_token(home: Path) -> None:
    done = oddsgate(home, "token", "--player", "p1", OG_JWT_SECRET=SECRET)
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "p1" and claims["exp"] > time.time()
    assert "OG_JWT_SECRET" in one_line(oddsgate(home, "token", "--player", "p1"), 2)


def test_token_for_a_partner_carries_the_claim_and_refuses_a_bad_id(home: Path) -> None:
    done = oddsgate(home, "token", "--partner", "p-42", OG_JWT_SECRET=SECRET)
    assert done.returncode == 0, done.stderr
    assert jwt.decode(done.stdout.strip(), SECRET, algorithms=["HS256"])["partner"] == "p-42"
    line = one_line(oddsgate(home, "token", "--partner", "no/slash", OG_JWT_SECRET=SECRET), 2)
    assert "--partner" in line


def test_stats_run_says_what_is_wrong_in_one_line(home: Path) -> None:
    assert "OG_REDIS_URL" in one_line(oddsgate(home, "stats", "run"), 2)
    line = one_line(oddsgate(home, "stats", "run", OG_REDIS_URL="redis://127.0.0.1:1",
                             OG_STATS_PUBLISH_MS="5"), 2)
    assert "OG_STATS_PUBLISH_MS" in line


def test_feed_publishes_for_its_duration(home: Path, redis_url: str) -> None:
    done = oddsgate(home, "feed", "--rate", "500", "--duration", "1", OG_REDIS_URL=redis_url)
    assert done.returncode == 0, done.stderr
    assert "oddsgate feed: done, " in done.stderr
    published = int(done.stderr.split("oddsgate feed: done, ")[1].split()[0])
    assert 250 <= published <= 600, done.stderr


def test_feed_spike_starts_and_spikes(home: Path, redis_url: str) -> None:
    """`--spike` died at start (its argparse defaults were dataclass descriptors)."""
    done = oddsgate(home, "feed", "--rate", "200", "--duration", "1", "--spike",
                    OG_REDIS_URL=redis_url)
    assert done.returncode == 0, done.stderr
    assert ", spike on odds:" in done.stderr
    early = oddsgate(home, "feed", "--rate", "200", "--duration", "1.5", "--spike",
                     "--spike-after", "0.5", OG_REDIS_URL=redis_url)
    assert early.returncode == 0, early.stderr
    assert " SPIKE" in early.stderr  # a per-second report during the spike


def test_feed_without_any_redis_is_a_one_line_runtime_failure(home: Path) -> None:
    assert "cannot reach Redis" in one_line(oddsgate(home, "feed", "--duration", "1"), 1)


@pytest.mark.skipif(not has_redis, reason="redis-server is not installed")
def test_worker_runs_on_its_own_embedded_redis(home: Path) -> None:
    line = one_line(oddsgate(home, "worker", "--port", str(free_port())), 2)
    assert "OG_JWT_SECRET" in line  # as the README line reads: it needs a secret
    port = free_port()
    proc = start(home, "worker", "--port", str(port), OG_JWT_SECRET=SECRET)
    wait_for("worker healthy", lambda: answers(f"http://127.0.0.1:{port}/healthz"), proc)
    redis_dir = home / "run" / "oddsgate" / "redis"
    assert (redis_dir / "redis.sock").is_socket()
    assert (home / "run" / "oddsgate").stat().st_mode & 0o777 == 0o700
    code, out = stop(proc)
    assert code == 0, out[-3000:]
    assert not (redis_dir / "redis.sock").exists()  # its Redis went with it


def test_control_commands_without_a_node_exit_3(home: Path) -> None:
    assert "no supervisor" in one_line(oddsgate(home, "status"), 3)
    assert "no supervisor" in one_line(oddsgate(home, "drain", "--worker", "0"), 3)


@pytest.mark.skipif(not has_haproxy, reason="haproxy is not installed")
def test_haproxy_config_check(home: Path) -> None:
    done = oddsgate(home, "haproxy-config", "--workers", "4", "--check")
    assert done.returncode == 0, done.stderr
    servers = [line for line in done.stdout.splitlines() if line.strip().startswith("server w")]
    assert len(servers) == 4
    assert f"stats socket {home / 'run' / 'oddsgate' / 'haproxy.sock'} " in done.stdout


# -- Running a node ------------------------------------------------------------------


def node_ports() -> dict[str, str]:
    """The README's defaults (8000, 8001 and the click listener's 8002, 8100, 9100) moved
    to free ports."""
    return {"OG_HAPROXY_BIND": f"127.0.0.1:{free_port()}",
            "OG_BASE_PORT": str(free_port_range(node_port_count(1))),
            "OG_AGENT_PORT": str(free_port()), "OG_METRICS_PORT": str(free_port())}


@pytest.mark.skipif(not (has_haproxy and has_redis), reason="needs haproxy and redis-server")
def test_node_and_its_control_commands(home: Path) -> None:
    ports = node_ports()
    settings = {"OG_JWT_SECRET": SECRET, "OG_WORKERS": "1", **ports}
    node = start(home, "run", "--haproxy", **settings)
    try:
        frontend = f"http://{ports['OG_HAPROXY_BIND']}"
        wait_for("node up", lambda: answers(f"{frontend}/haproxy-health"), node, timeout=60)
        status = oddsgate(home, "status")
        assert status.returncode == 0, status.stderr
        assert "connections" in status.stdout
        as_json = orjson.loads(oddsgate(home, "status", "--json").stdout)
        assert [w["index"] for w in as_json["workers"]] == [0]
        assert oddsgate(home, "drain", "--worker", "0", "--wait", "--timeout", "60",
                        timeout=90).returncode == 0
        assert oddsgate(home, "undrain").returncode == 0
        assert oddsgate(home, "undrain", "--worker", "0").returncode == 0
        one_line(oddsgate(home, "drain", "--worker", "9"), 2)  # no such worker: bad usage
        reload = oddsgate(home, "reload", timeout=150)
        assert reload.returncode == 0, reload.stderr
        metrics = http_get(f"http://127.0.0.1:{ports['OG_METRICS_PORT']}/metrics")
        assert metrics[0] == 200 and b"oddsgate_" in metrics[2]
    finally:
        code, out = stop(node)
    assert code == 0, out[-3000:]


@pytest.mark.skipif(not (has_haproxy and has_redis), reason="needs haproxy and redis-server")
def test_demo(home: Path) -> None:
    ports = node_ports()
    port = ports.pop("OG_HAPROXY_BIND").rsplit(":", 1)[1]
    done = oddsgate(home, "demo", "--duration", "2", "--clients", "3", "--port", port,
                    timeout=90, OG_WORKERS="1", OG_RUNTIME_DIR=str(home / "demo"), **ports)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert "oddsgate demo: a node on this machine" in done.stdout  # the header
    assert "oddsgate.supervisor" not in done.stdout + done.stderr  # the node's log: a file
    reports = [line for line in done.stdout.splitlines() if line.startswith("t=")]
    assert reports and all("violations=0" in line for line in reports), done.stdout
    # every market is published before the demo's players follow it: no reset
    assert all(" resets=0 " in line for line in reports), done.stdout
    # the statistics service runs, so the partner dashboard the header prints is live
    assert "statistics service of region" in (home / "demo" / "node.log").read_text()


def test_aggregate_and_providers_say_what_is_wrong_in_one_line(home: Path) -> None:
    done = oddsgate(home, "aggregate")
    assert done.returncode == 2 and done.stderr.strip() == (
        "oddsgate: OG_REDIS_URL: the region's Redis is required (or --redis-url)")
    done = oddsgate(home, "aggregate", OG_REDIS_URL="redis://127.0.0.1:1", OG_STREAM="Bad!")
    assert done.returncode == 2 and "OG_STREAM='Bad!'" in done.stderr
    done = oddsgate(home, "providers", "--region", "nowhere")
    assert done.returncode == 2
    assert done.stderr.strip() == "oddsgate: --region 'nowhere': expected NAME=REDIS_URL"


@pytest.mark.skipif(not (has_haproxy and has_redis), reason="needs haproxy and redis-server")
@pytest.mark.timeout(150)
def test_demo_with_two_regions(home: Path) -> None:
    port = free_port_range(2)
    done = oddsgate(home, "demo", "--regions", "2", "--duration", "6", "--clients", "4",
                    "--port", str(port), timeout=120, OG_RUNTIME_DIR=str(home / "rd"))
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert "demo: 2 regions serving" in done.stdout
    assert f"eu-west: ws://127.0.0.1:{port}/ws" in done.stdout
    assert f"eu-central: ws://127.0.0.1:{port + 1}/ws" in done.stdout
    reports = [line for line in done.stdout.splitlines() if line.startswith("t=")]
    assert reports, done.stdout
    assert all("violations=0" in line and " resets=0 " in line for line in reports), reports
    assert "eu-west:2p(up) eu-central:2p(up)" in reports[0], reports
