"""The runtime dir is ours alone, and nothing the node writes there follows a link.

The attack these tests replay: another local user creates the predictable
runtime dir first (mode 0777) and plants a symbolic link where the node will
write its Redis config; a node started as root must refuse the directory, in
one line naming OG_RUNTIME_DIR (exit 2), and the link's target must be left
untouched. Tests run as root here, so "another user" is uid 65534 (chown).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import ConfigError
from haproxy.settings import HAProxySettings
from supervisor.cli import main as oddsgate_main
from supervisor.embedded_redis import EmbeddedRedis, free_port
from supervisor.haproxy import HAProxyProcess
from supervisor.private import open_log, private_dir, write_private
from tests.conftest import ROOT, http_get

OTHER_UID = 65534  # nobody
VICTIM_TEXT = "root-owned file another user wants overwritten\n"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None
                                 and not os.path.exists("/usr/bin/redis-server"),
                                 reason="redis-server is not installed")
needs_haproxy = pytest.mark.skipif(not os.access(HAPROXY, os.X_OK),
                                   reason="haproxy is not installed")
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path (unix socket paths must fit in 107 bytes), 0700 like pytest's own."""
    path = Path(tempfile.mkdtemp(prefix="og-rt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def victim(short_dir: Path) -> Path:
    path = short_dir / "victim"
    path.write_text(VICTIM_TEXT)
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a shell with no oddsgate settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OG_") and k != "XDG_RUNTIME_DIR"}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def oddsgate(*args: str, env: dict[str, str], timeout: float = 20.0,
             preexec_fn=None) -> subprocess.CompletedProcess:
    """`oddsgate ARGS` as an operator runs it; killed (and failed) after `timeout`."""
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        pytest.fail(f"`oddsgate {' '.join(args)}` still running after {timeout}s "
                    f"(it should have refused to start):\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_one_line_naming_the_setting(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "OG_RUNTIME_DIR" in lines[0]
    return lines[0]


def plant(directory: Path, name: str, target: Path) -> Path:
    link = directory / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


# -- private_dir ---------------------------------------------------------------


def test_a_missing_dir_is_created_0700_with_its_parents(short_dir: Path) -> None:
    path = private_dir(short_dir / "a" / "run")
    assert path.is_dir()
    assert path.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_uid == os.geteuid()
    assert private_dir(path) == path  # ours already: accepted as it is
    assert os.listdir(path) == []  # the writability probe left nothing behind


@pytest.mark.parametrize(("mode", "owner", "problem"), [
    (0o777, None, "writable by others"),
    (0o770, None, "writable by others"),
    pytest.param(0o700, OTHER_UID, "owned by uid 65534", marks=needs_root),
    pytest.param(0o777, OTHER_UID, "owned by uid 65534", marks=needs_root),
])
def test_an_existing_dir_not_ours_alone_is_refused(short_dir: Path, mode: int,
                                                    owner: int | None, problem: str) -> None:
    path = short_dir / "run"
    path.mkdir()
    path.chmod(mode)
    if owner is not None:
        os.chown(path, owner, owner)
    with pytest.raises(ConfigError, match=f"OG_RUNTIME_DIR: .*{problem}"):
        private_dir(path)


def test_a_link_or_a_file_in_place_of_the_dir_is_refused(short_dir: Path) -> None:
    real = short_dir / "real"
    real.mkdir(mode=0o700)
    (short_dir / "link").symlink_to(real)
    with pytest.raises(ConfigError, match="is a symbolic link"):
        private_dir(short_dir / "link")
    (short_dir / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        private_dir(short_dir / "file")
    with pytest.raises(ConfigError, match=r"OG_RUNTIME_DIR: .* cannot be created"):
        private_dir(short_dir / "file" / "run")


def test_writes_replace_a_planted_link_instead_of_following_it(short_dir: Path,
                                                              victim: Path) -> None:
    link = plant(short_dir, "redis.conf", victim)
    write_private(link, "port 0\n")
    assert victim.read_text() == VICTIM_TEXT
    assert not link.is_symlink() and link.read_text() == "port 0\n"
    assert link.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(short_dir)) == ["redis.conf", "victim"]  # no temp file left


def test_a_log_that_is_a_link_is_refused(short_dir: Path, victim: Path) -> None:
    link = plant(short_dir, "redis.log", victim)
    with pytest.raises(ConfigError, match=r"redis\.log is a symbolic link"):
        open_log(link)
    assert victim.read_text() == VICTIM_TEXT
    with open_log(short_dir / "fresh.log") as log:
        log.write(b"one\n")
    with open_log(short_dir / "fresh.log") as log:
        log.write(b"two\n")
    assert (short_dir / "fresh.log").read_bytes() == b"one\ntwo\n"


# -- the node's files ------------------------------------------------------------


@needs_redis
def test_embedded_redis_writes_its_config_over_a_planted_link(short_dir: Path,
                                                             victim: Path) -> None:
    run = private_dir(short_dir / "run")
    plant(run, "redis.conf", victim)
    with EmbeddedRedis(run, port=0) as server:
        assert server.running
    assert victim.read_text() == VICTIM_TEXT
    assert not (run / "redis.conf").is_symlink()


@needs_haproxy
def test_haproxy_writes_config_and_state_over_planted_links(short_dir: Path,
                                                          victim: Path) -> None:
    run = private_dir(short_dir / "haproxy")
    for name in ("haproxy.cfg", "haproxy.state"):
        plant(run, name, victim)
    settings = HAProxySettings(bind_port=free_port(), worker_ports=[free_port()],
                               agent_port=free_port(), stats_socket=str(run / "s.sock"),
                               maxconn=100)
    proc = HAProxyProcess(settings, run, haproxy=HAPROXY)
    try:
        proc.start()
        proc.reload()
    finally:
        proc.stop(timeout=2.0)
    assert victim.read_text() == VICTIM_TEXT
    assert not (run / "haproxy.cfg").is_symlink() and not (run / "haproxy.state").is_symlink()
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]  # staged files all gone


def test_haproxy_config_output_uses_no_predictable_temp_name(short_dir: Path,
                                                            victim: Path) -> None:
    """The old `.NAME.PID.tmp` could be planted beforehand; the output must not follow it."""
    target = short_dir / "haproxy.cfg"
    plant(short_dir, f".haproxy.cfg.{os.getpid()}.tmp", victim)
    assert oddsgate_main(["haproxy-config", "--workers", "1",
                          "--stats-socket", str(short_dir / "s.sock"),
                          "--output", str(target)]) == 0
    assert victim.read_text() == VICTIM_TEXT
    assert not target.is_symlink() and "server w0 " in target.read_text()
    assert target.stat().st_mode & 0o777 == 0o644  # read by an SRE's HAProxy user


# -- the CLI: refusals in one line, exit 2 -----------------------------------------


def prepared_by_another_user(run: Path, victim: Path) -> Path:
    """The attack: the runtime dir made 0777 by uid 65534, redis/redis.conf a link."""
    (run / "redis").mkdir(parents=True)
    plant(run, "redis/redis.conf", victim)
    for path in (run, run / "redis"):
        path.chmod(0o777)
        os.chown(path, OTHER_UID, OTHER_UID)
    return run


@needs_root
@pytest.mark.parametrize("how", ["OG_RUNTIME_DIR", "XDG_RUNTIME_DIR"])
def test_worker_refuses_a_runtime_dir_prepared_by_another_user(short_dir: Path, victim: Path,
                                                               how: str) -> None:
    # XDG_RUNTIME_DIR: the default path ($XDG_RUNTIME_DIR/oddsgate) is checked the same way
    run = prepared_by_another_user(short_dir / "oddsgate", victim)
    env = (clean_env(OG_RUNTIME_DIR=str(run)) if how == "OG_RUNTIME_DIR"
           else clean_env(XDG_RUNTIME_DIR=str(short_dir)))
    line = assert_one_line_naming_the_setting(
        oddsgate("worker", "--port", str(free_port()), "--anonymous", env=env))
    assert str(run) in line
    assert victim.read_text() == VICTIM_TEXT
    assert (run / "redis" / "redis.conf").is_symlink()  # not even replaced: refused first


@needs_haproxy
def test_run_refuses_a_haproxy_dir_others_can_write(short_dir: Path,
                                                    redis_url: str) -> None:
    run = private_dir(short_dir / "run")
    (run / "haproxy").mkdir(mode=0o777)
    (run / "haproxy").chmod(0o777)
    env = clean_env(OG_RUNTIME_DIR=str(run), OG_REDIS_URL=redis_url, OG_JWT_SECRET="s",
                    OG_WORKERS="1", OG_BASE_PORT=str(free_port()),
                    OG_AGENT_PORT=str(free_port()), OG_METRICS_PORT="0",
                    OG_HAPROXY_BIND=f"127.0.0.1:{free_port()}")
    line = assert_one_line_naming_the_setting(oddsgate("run", "--haproxy", env=env))
    assert f"{run / 'haproxy'} is writable by others" in line


@needs_redis
def test_worker_writes_its_redis_config_over_a_planted_link(short_dir: Path,
                                                           victim: Path) -> None:
    """Our own 0700 dir with a link in it (root put it there, or an old run): replaced."""
    run = private_dir(short_dir / "run")
    plant(run, "redis/redis.conf", victim)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "worker", "--port",
                             str(port), "--anonymous"], cwd=ROOT,
                            env=clean_env(OG_RUNTIME_DIR=str(run)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not _healthy(port):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "worker did not become healthy"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert victim.read_text() == VICTIM_TEXT
    assert not (run / "redis" / "redis.conf").is_symlink()


def _healthy(port: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{port}/healthz", timeout=1)[0] == 200
    except OSError:
        return False


@needs_redis
def test_worker_refuses_a_redis_log_that_is_a_link(short_dir: Path, victim: Path) -> None:
    run = private_dir(short_dir / "run")
    plant(run, "redis/redis.log", victim)
    line = assert_one_line_naming_the_setting(
        oddsgate("worker", "--port", str(free_port()), "--anonymous",
                 env=clean_env(OG_RUNTIME_DIR=str(run))))
    assert "redis.log is a symbolic link" in line
    assert victim.read_text() == VICTIM_TEXT


# -- an unwritable runtime dir: one line, exit 2 (not a traceback, exit 1) ----------


def test_worker_with_a_runtime_dir_that_cannot_be_created(short_dir: Path) -> None:
    (short_dir / "file").write_text("")
    line = assert_one_line_naming_the_setting(oddsgate(
        "worker", "--port", str(free_port()), "--anonymous",
        env=clean_env(OG_RUNTIME_DIR=str(short_dir / "file" / "run"))))
    assert "cannot be created" in line


PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE = 1


def _without_dac_override() -> None:
    """preexec_fn: root loses CAP_DAC_OVERRIDE across exec, so mode bits bind it like anyone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE)")


@pytest.mark.parametrize(("layout", "problem"), [
    ("dir", "is not writable"),  # exists, ours, 0500
    ("parent", "cannot be created"),  # missing, under a 0500 directory
])
def test_worker_with_an_unwritable_runtime_dir(short_dir: Path, layout: str,
                                              problem: str) -> None:
    locked = short_dir / "locked"
    locked.mkdir(mode=0o500)
    run = locked if layout == "dir" else locked / "run"
    try:
        done = oddsgate("worker", "--port", str(free_port()), "--anonymous",
                        env=clean_env(OG_RUNTIME_DIR=str(run)),
                        preexec_fn=_without_dac_override if os.geteuid() == 0 else None)
    except subprocess.SubprocessError as exc:  # prctl refused (no CAP_SETPCAP)
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE here: {exc}")
    finally:
        locked.chmod(0o700)
    assert problem in assert_one_line_naming_the_setting(done)


@needs_redis
def test_worker_whose_redis_cannot_start_says_why_in_one_line(short_dir: Path) -> None:
    """A runtime failure (here a directory squatting redis.conf's name): exit 1, no traceback."""
    run = private_dir(short_dir / "run")
    (run / "redis" / "redis.conf").mkdir(parents=True, mode=0o700)
    done = oddsgate("worker", "--port", str(free_port()), "--anonymous",
                    env=clean_env(OG_RUNTIME_DIR=str(run)))
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"oddsgate: cannot start redis-server: {run / 'redis' / 'redis.conf'}: Is a directory"]
