"""HAProxy in front of a node's workers: render the config, check it, run it, reload it.

The config comes from `haproxy/oddsgate.cfg.tmpl` (string.Template, so the
template stays a readable HAProxy file an SRE can review) and is always run
through `haproxy -c` before anyone starts or reloads with it: a typo must fail
the deploy step, not leave the node without a load balancer.

`HAProxyProcess` runs HAProxy the way the supervisor needs it: a foreground
child in master-worker mode (`haproxy -W -db`), so that

* its death is the supervisor's SIGCHLD, with no pidfile or daemon to chase;
* `reload()` is SIGUSR2 to the master, which re-reads the config and hands the
  listening sockets to a new worker: no connection is refused, and existing
  WebSocket tunnels stay on the old worker until they end (at most
  `hard_stop_after_s`);
* the master's CLI (`-S`, private to this module) tells whether a reload was
  loaded or failed, instead of guessing from timing.

Before each reload the server states are dumped to the state file the new
worker loads, so a drained or DOWN worker does not get players for the few
hundred milliseconds before the first checks.

The supervisor's agent owns every server's admin state (`ready`/`drain`
answers to agent checks). This module never sets drain through the stats
socket, because the agent's next `ready` would undo it.

Like the embedded Redis, every started HAProxy is stopped by `stop()`, the
context manager, or at interpreter exit. It runs in its own process group, so
a terminal's Ctrl-C reaches the supervisor only, and the supervisor decides the
order in which the node winds down.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template
from types import TracebackType

import psutil

from supervisor.children import ChildRegistry
from supervisor.private import open_log, private_dir, stage_file, write_private

log = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "haproxy" / "oddsgate.cfg.tmpl"
DEFAULT_HAPROXY = "/usr/sbin/haproxy"  # Debian's; /usr/sbin is not on every user's PATH
BACKEND = "gateway"
CONFIG_NAME = "haproxy.cfg"
STATE_NAME = "haproxy.state"
LOG_NAME = "haproxy.log"
MASTER_SOCKET_NAME = "haproxy-master.sock"
STATS_SOCKET_NAME = "haproxy.sock"
DEFAULT_BIND_PORT = 8000
DEFAULT_BASE_PORT = 8001  # the worker's own default port (OG_PORT)
DEFAULT_AGENT_PORT = 8999
LOG_LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
# Descriptors HAProxy needs beyond two per connection: listeners, checks,
# pollers, pipes, the CLI. It computed 33 for a small farm; keep a wide margin.
FD_RESERVE = 1000
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL on Linux
_HOST_CHARS = re.compile(r"^[A-Za-z0-9._:-]+$")
_AGENT_REQUEST = re.compile(rb"^w(\d{1,6})\r?\n?$")
# The first line of a server state file: format version 1. HAProxy warns
# about a missing or empty file, so a fresh start writes just this.
_STATE_VERSION_LINE = "1\n"

_running: ChildRegistry[HAProxyProcess] = ChildRegistry(lambda child: child.stop(timeout=2.0))


class HAProxyError(RuntimeError):
    """HAProxy could not be found, started, reloaded or reached; the message says why."""


class HAProxyConfigError(HAProxyError):
    """`haproxy -c` refused a configuration; the message holds HAProxy's own output."""


# -- settings and rendering ---------------------------------------------------


@dataclass(kw_only=True)
class HAProxySettings:
    """Everything the template needs; `validate()` says what is wrong before HAProxy does.

    Worker `i` listens on `worker_host:worker_ports[i]`, is named `w<i>` in
    HAProxy and to the agent, and has the fixed server id `i + 1` (the id
    places the server on the hash ring, so it must never change).
    """

    bind_host: str = "127.0.0.1"
    bind_port: int = DEFAULT_BIND_PORT
    worker_host: str = "127.0.0.1"
    worker_ports: list[int]
    agent_host: str = "127.0.0.1"
    agent_port: int
    stats_socket: str
    maxconn: int = 100_000
    health_inter_ms: int = 500
    agent_inter_ms: int = 200
    tunnel_timeout_s: int = 3600
    #: per-worker connection cap; above it players queue (`timeout queue`), then 503
    server_maxconn: int | None = None
    #: how long an old worker may keep its tunnels after a reload or graceful stop
    hard_stop_after_s: int = 300
    #: `info` logs every request and finished WebSocket; `notice` only state changes
    log_level: str = "info"
    #: where `reload()` saves server states for the new worker; None: not carried
    state_file: str | None = None

    @classmethod
    def for_workers(cls, workers: int, base_port: int = DEFAULT_BASE_PORT,
                    **kwargs: object) -> HAProxySettings:
        """Settings for `workers` workers on consecutive ports from `base_port`."""
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers={workers!r}: need at least one worker")
        return cls(worker_ports=[base_port + i for i in range(workers)], **kwargs)  # type: ignore[arg-type]

    def validate(self) -> None:
        """Raise ValueError naming the first bad field; render() calls this."""
        if not isinstance(self.worker_ports, list | tuple) or not self.worker_ports:
            raise ValueError("worker_ports: need at least one worker")
        for name in ("bind_port", "agent_port"):
            _check_port(name, getattr(self, name))
        for i, port in enumerate(self.worker_ports):
            _check_port(f"worker_ports[{i}]", port)
        if len(set(self.worker_ports)) != len(self.worker_ports):
            raise ValueError(f"worker_ports: duplicates in {list(self.worker_ports)}")
        taken = set(self.worker_ports)
        for name in ("bind_port", "agent_port"):
            port = getattr(self, name)
            if port in taken:
                raise ValueError(f"{name}={port}: already used by a worker or the other listener")
            taken.add(port)
        for name in ("bind_host", "worker_host", "agent_host"):
            _check_host(name, getattr(self, name))
        _check_path("stats_socket", self.stats_socket, unix_socket=True)
        if self.state_file is not None:
            _check_path("state_file", self.state_file)
        for name in ("maxconn", "health_inter_ms", "agent_inter_ms", "tunnel_timeout_s",
                     "hard_stop_after_s"):
            _check_positive(name, getattr(self, name))
        if self.server_maxconn is not None:
            _check_positive("server_maxconn", self.server_maxconn)
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level={self.log_level!r}: not one of {', '.join(LOG_LEVELS)}")


def _check_port(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{name}={value!r}: not a TCP port (1-65535)")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer")


def _check_host(name: str, value: object) -> None:
    """An IP literal or a host name; anything else could break (or inject into) the config."""
    if not isinstance(value, str) or not _HOST_CHARS.match(value):
        raise ValueError(f"{name}={value!r}: not an IP address or host name")
    if ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise ValueError(f"{name}={value!r}: not an IPv6 address "
                             "(give the port separately, without brackets)") from None


def _check_path(name: str, value: object, *, unix_socket: bool = False) -> None:
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ValueError(f"{name}={value!r}: must be an absolute path")
    if any(c.isspace() or c in "\"'#\\$" or not c.isprintable() for c in value):
        raise ValueError(f"{name}={value!r}: spaces, quotes, '#', '$' and backslashes "
                         "are not allowed in paths HAProxy reads")
    if unix_socket and len(os.fsencode(value)) > _SUN_PATH_MAX:
        raise ValueError(f"{name}={value!r}: a unix socket path longer than "
                         f"{_SUN_PATH_MAX} bytes; use a shorter runtime dir")


def _address(host: str, port: int) -> str:
    """host:port as HAProxy writes it, IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def server_name(index: int) -> str:
    """HAProxy's name for worker `index`, also what agent-send sends (plus a newline)."""
    return f"w{index}"


def agent_request_index(data: bytes) -> int | None:
    """The worker index in an agent check request (`b"w3\\n"` -> 3); None if it is not one.

    For the supervisor's agent: HAProxy sends the agent-send string as soon as
    it connects and then waits for one reply line.
    """
    match = _AGENT_REQUEST.match(data.strip(b" \t") or b"-")
    return int(match.group(1)) if match else None


def server_lines(settings: HAProxySettings) -> list[str]:
    """One `server` line per worker; the shared options are on the template's default-server."""
    return [
        f"    server {server_name(i)} {_address(settings.worker_host, port)} id {i + 1} "
        f'agent-send "{server_name(i)}\\n"'
        for i, port in enumerate(settings.worker_ports)
    ]


def load_template(path: str | os.PathLike[str] | None = None) -> str:
    """The template's text; the default sits in the source tree next to this package."""
    template_path = Path(path) if path is not None else TEMPLATE_PATH
    try:
        return template_path.read_text()
    except OSError as exc:
        raise HAProxyError(f"cannot read the HAProxy template {template_path}: {exc}") from exc


def render(settings: HAProxySettings, template: str | None = None) -> str:
    """The HAProxy config for `settings`; ValueError if a setting is unusable.

    `template` is the template text (default: the shipped one); placeholders
    it lacks are simply unused, unknown ones are a ValueError.
    """
    settings.validate()
    text = load_template() if template is None else template
    if settings.state_file is not None:
        state_global = f"server-state-file {settings.state_file}"
        state_defaults = "load-server-state-from-file global"
    else:
        state_global = "# server-state-file: none, a reload starts every server fresh"
        state_defaults = "load-server-state-from-file none"
    values = {
        "maxconn": str(settings.maxconn),
        "stats_socket": settings.stats_socket,
        "log_level": settings.log_level,
        "hard_stop_after": f"{settings.hard_stop_after_s}s",
        "server_state_file": state_global,
        "load_server_state": state_defaults,
        "tunnel_timeout_s": str(settings.tunnel_timeout_s),
        "bind": _address(settings.bind_host, settings.bind_port),
        "health_inter_ms": str(settings.health_inter_ms),
        "agent_inter_ms": str(settings.agent_inter_ms),
        "agent_host": settings.agent_host,
        "agent_port": str(settings.agent_port),
        "server_maxconn": (f" maxconn {settings.server_maxconn}"
                           if settings.server_maxconn is not None else ""),
        "servers": "\n".join(server_lines(settings)),
        "worker_count": str(len(settings.worker_ports)),
    }
    try:
        return Template(text).substitute(values)
    except KeyError as exc:
        raise ValueError(f"HAProxy template has an unknown placeholder ${exc.args[0]}") from None
    except ValueError as exc:  # a lone "$" not followed by a name
        raise ValueError(f"HAProxy template: {exc} (write a literal dollar as $$)") from None


def fit_maxconn(settings: HAProxySettings, fd_limit: int | None = None) -> HAProxySettings:
    """`settings` with maxconn lowered to what the descriptor hard limit can hold.

    HAProxy needs about two descriptors per connection and, with 2.6's default
    `strict-limits`, refuses to start when it cannot raise its limit that far.
    A node whose `ulimit -Hn` is too small therefore runs with fewer players
    (logged loudly) rather than not at all. `fd_limit` defaults to this
    process's hard RLIMIT_NOFILE, which the child inherits.
    """
    if fd_limit is None:
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if fd_limit == resource.RLIM_INFINITY:
            return settings
    fits = max(1, (fd_limit - FD_RESERVE) // 2)
    if settings.maxconn <= fits:
        return settings
    log.warning("HAProxy maxconn %d needs about %d file descriptors but the hard limit is %d; "
                "running with maxconn %d (raise `ulimit -Hn` / LimitNOFILE for more)",
                settings.maxconn, 2 * settings.maxconn + FD_RESERVE, fd_limit, fits)
    return dataclasses.replace(settings, maxconn=fits)


# -- checking -----------------------------------------------------------------


def find_haproxy(haproxy: str | None = None) -> str:
    """The haproxy binary: the one given, else on PATH, else Debian's /usr/sbin/haproxy."""
    path = haproxy or shutil.which("haproxy") or DEFAULT_HAPROXY
    if not os.access(path, os.X_OK):
        raise HAProxyError(f"haproxy not found or not executable: {path}")
    return path


def check(config: str | os.PathLike[str], *, haproxy: str | None = None,
          strict: bool = False, timeout: float = 30.0) -> None:
    """Run `haproxy -c` on a config; HAProxyConfigError with HAProxy's output if refused.

    `config` is a path (an os.PathLike, or a str without a newline) or the
    config text itself (a str with newlines, checked from a temporary file).
    `strict` adds `-dW`: warnings fail too, which is what the tests want of
    the shipped template. Otherwise warnings are logged and accepted.
    """
    binary = find_haproxy(haproxy)
    if isinstance(config, str) and "\n" in config:
        with tempfile.TemporaryDirectory(prefix="oddsgate-haproxy-check-") as tmp:
            path = Path(tmp) / CONFIG_NAME
            path.write_text(config)
            _run_check(binary, path, strict, timeout, label="the config text")
    else:
        path = Path(config)
        if not path.is_file():
            raise HAProxyConfigError(f"no HAProxy config at {path}")
        _run_check(binary, path, strict, timeout, label=str(path))


def _run_check(binary: str, path: Path, strict: bool, timeout: float, label: str) -> None:
    argv = [binary, "-c", *(["-dW"] if strict else []), "-f", str(path)]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise HAProxyError(f"`{' '.join(argv)}` did not finish within {timeout:.0f}s") from None
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise HAProxyConfigError(
            f"haproxy refused {label} (exit {done.returncode}):\n{output or '(no output)'}"
        )
    warnings = [line for line in output.splitlines() if "[WARNING]" in line]
    for line in warnings:
        log.warning("haproxy -c %s: %s", label, line)


# -- the running process ------------------------------------------------------


def _unix_command(path: str | os.PathLike[str], command: str, timeout: float) -> str:
    """One command on a HAProxy CLI socket (stats or master), its whole answer.

    The write side is shut after the command: the stats socket would answer
    and close anyway, but the master CLI waits for the end of input.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(command.rstrip("\n").encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def read_servers(stats_socket: str | os.PathLike[str],
                 timeout: float = 5.0) -> dict[str, dict[str, str]]:
    """`show stat` of the gateway backend: server name -> its CSV columns.

    A function of the socket path, so that a process that did not start
    HAProxy (`oddsgate status`, a test harness) can read it too. The
    interesting columns: `status` ("UP"; "UP 1/3" = up but going down, which
    is also how every server starts; "DOWN", "DOWN (agent)", "DRAIN (agent)",
    "MAINT"), `weight`, `scur` (current sessions), `agent_status`,
    `check_status`. A node is ready for players when every server is "UP".
    """
    try:
        lines = _unix_command(stats_socket, "show stat", timeout).splitlines()
    except OSError as exc:
        raise HAProxyError(f"stats socket {stats_socket}: {exc}") from exc
    if not lines or not lines[0].startswith("# "):
        raise HAProxyError(f"unexpected `show stat` answer: {lines[:1]}")
    columns = lines[0][2:].split(",")
    servers = {}
    for line in lines[1:]:
        row = dict(zip(columns, line.split(","), strict=False))
        if row.get("pxname") == BACKEND and row.get("svname") not in ("BACKEND", None):
            servers[row["svname"]] = row
    return servers


@dataclass
class _MasterView:
    """What the master CLI's `show proc` says: reload counters and worker pids."""

    reloads: int
    failed: int
    workers: list[int]
    old_workers: list[int]


def _parse_show_proc(text: str) -> _MasterView:
    """Parse `show proc`: a master line, then `# workers`, `# old workers`, `# programs`."""
    view = _MasterView(reloads=0, failed=0, workers=[], old_workers=[])
    section = ""
    for line in text.splitlines():
        if line.startswith("# "):
            section = line[2:].strip()
            continue
        parts = line.split()
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        if parts[1] == "master":
            view.reloads = int(parts[2])
            found = re.search(r"failed:\s*(\d+)", line)
            view.failed = int(found.group(1)) if found else 0
        elif parts[1] == "worker":
            target = view.old_workers if section == "old workers" else view.workers
            target.append(int(parts[0]))
    return view


class HAProxyProcess:
    """One HAProxy master (and its workers) serving the node's frontend.

    Files in `runtime_dir`: `haproxy.cfg` (rendered and checked on every
    start and reload), `haproxy.state` (server states across reloads),
    `haproxy.log` (HAProxy's stdout and stderr, unless `inherit_output`), and
    the master CLI socket. The stats socket is wherever `settings` says.
    `runtime_dir` must be ours alone, and files are renamed into place from
    random names, never written through a link (supervisor/private.py).
    """

    def __init__(
        self,
        settings: HAProxySettings,
        runtime_dir: str | os.PathLike[str],
        *,
        haproxy: str | None = None,
        inherit_output: bool = False,
    ) -> None:
        self.runtime_dir = Path(os.path.abspath(runtime_dir))  # a link there is refused
        self.config_path = self.runtime_dir / CONFIG_NAME
        self.state_path = self.runtime_dir / STATE_NAME
        self.log_path = self.runtime_dir / LOG_NAME
        self.master_socket = self.runtime_dir / MASTER_SOCKET_NAME
        _check_path("master socket", str(self.master_socket), unix_socket=True)
        self.inherit_output = inherit_output
        self._haproxy = haproxy
        self.settings = self._prepare(settings)
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid: int | None = None
        self._lock = threading.RLock()  # one start/stop/reload at a time

    # -- state ---------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The master's pid while it runs."""
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        return (f"HAProxyProcess({_address(self.settings.bind_host, self.settings.bind_port)}, "
                f"pid={self.pid})")

    def stats(self, command: str, timeout: float = 5.0) -> str:
        """One runtime API command on the stats socket (`show stat`, `show info`, ...)."""
        try:
            return _unix_command(self.settings.stats_socket, command, timeout)
        except OSError as exc:
            raise HAProxyError(f"stats socket {self.settings.stats_socket}: {exc}") from exc

    def servers(self) -> dict[str, dict[str, str]]:
        """`show stat` of the gateway backend, per server; see `read_servers()`."""
        return read_servers(self.settings.stats_socket)

    def worker_pids(self, timeout: float = 5.0) -> list[int]:
        """The current (not the old, finishing) worker processes, from the master."""
        return self._master_view(timeout).workers

    def _master_view(self, timeout: float = 5.0) -> _MasterView:
        try:
            return _parse_show_proc(_unix_command(self.master_socket, "show proc", timeout))
        except OSError as exc:
            raise HAProxyError(f"master CLI {self.master_socket}: {exc}") from exc

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 10.0) -> HAProxyProcess:
        """Render, check, start, and wait until the frontend accepts connections."""
        with self._lock:
            if self.running:
                return self
            binary = find_haproxy(self._haproxy)
            private_dir(self.runtime_dir)
            if self.settings.state_file is not None:
                # A state file left by an earlier run would resurrect its drains and DOWNs.
                write_private(self.settings.state_file, _STATE_VERSION_LINE)
            write_private(self.config_path, render(self.settings))
            check(self.config_path, haproxy=binary)
            argv = [binary, "-W", "-db", "-S", f"{self.master_socket},mode,600",
                    "-f", str(self.config_path)]
            log_offset = 0
            with contextlib.ExitStack() as stack:
                out = None
                if not self.inherit_output:
                    out = stack.enter_context(open_log(self.log_path))
                    log_offset = os.fstat(out.fileno()).st_size
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    cwd=self.runtime_dir, process_group=0,
                )
            self._owner_pid = os.getpid()
            _running.add(self)
            self._wait_ready(timeout, log_offset)
            return self

    def _wait_ready(self, timeout: float, log_offset: int) -> None:
        """Wait for `_ready()`, or for the master's exit (a bind failure, say), or time out.

        The stats answer must come from a child of *our* master: a stale
        HAProxy left on the same socket path would otherwise look ready
        while ours is failing to bind the port.
        """
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._forget()
                raise HAProxyError(f"haproxy exited with status {code} during start; "
                                   f"{self._log_tail(log_offset)}")
            if self._ready():
                return
            if time.monotonic() >= deadline:
                tail = self._log_tail(log_offset)
                self.stop(graceful=False)
                raise HAProxyError(f"haproxy was not ready within {timeout:.1f}s; {tail}")
            time.sleep(0.02)

    def _ready(self) -> bool:
        """Our worker on the stats socket, the master CLI listing it, the frontend accepting.

        The master opens its CLI only once its workers are up, and `reload()`
        depends on that CLI, so start() waits for it too.
        """
        pid = self._stats_pid(self.settings.stats_socket)
        if pid is None:
            return False
        try:
            if pid not in self._master_view(timeout=0.5).workers:
                return False
        except HAProxyError:
            return False
        return self._frontend_accepts()

    def _stats_pid(self, stats_socket: str) -> int | None:
        """The pid of the worker answering on `stats_socket`, if our master is its parent."""
        try:
            info = _unix_command(stats_socket, "show info", timeout=0.5)
        except OSError:
            return None
        found = re.search(r"^Pid: (\d+)$", info, re.MULTILINE)
        if found is None or self._proc is None:
            return None
        pid = int(found.group(1))
        try:
            return pid if psutil.Process(pid).ppid() == self._proc.pid else None
        except psutil.Error:
            return None

    def _frontend_accepts(self) -> bool:
        host = self.settings.bind_host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        try:
            with socket.create_connection((host, self.settings.bind_port), timeout=0.5):
                return True
        except OSError:
            return False

    def reload(self, new_settings: HAProxySettings | None = None,
               timeout: float = 10.0) -> None:
        """Hitless reload onto `new_settings` (default: the current ones, re-rendered).

        The new config is checked before it replaces the running one, so a bad
        config leaves the running HAProxy untouched (HAProxyConfigError). Then
        the server states are saved for the new worker, the master gets
        SIGUSR2, and this returns once the master reports the reload loaded
        and the new worker answers on the stats socket. Old workers keep their
        WebSocket tunnels until these end or `hard_stop_after_s` passes.
        """
        with self._lock:
            if not self.running or self._proc is None:
                raise HAProxyError("haproxy is not running; start() it first")
            settings = self._prepare(new_settings or self.settings)
            staged = stage_file(self.runtime_dir, render(settings),
                                prefix=f".{CONFIG_NAME}.new-")
            try:
                check(staged, haproxy=self._haproxy)
                before = self._master_view()
                if settings.state_file is not None:
                    self._save_server_state(settings)
                log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
                os.replace(staged, self.config_path)
            finally:
                staged.unlink(missing_ok=True)  # already renamed, unless something failed
            self._proc.send_signal(signal.SIGUSR2)
            self._wait_reloaded(before, settings.stats_socket, timeout, log_offset)
            self.settings = settings

    def _wait_reloaded(self, before: _MasterView, stats_socket: str, timeout: float,
                       log_offset: int) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise HAProxyError(f"haproxy exited during reload; {self._log_tail(log_offset)}")
            try:
                view: _MasterView | None = self._master_view(timeout=0.5)
            except HAProxyError:
                view = None  # the master is busy re-executing itself
            if view is not None:
                if view.failed > before.failed:
                    raise HAProxyConfigError(
                        "haproxy could not load the new config; the old workers keep "
                        f"serving. {self._log_tail(log_offset)}")
                pid = self._stats_pid(stats_socket) if view.reloads > before.reloads else None
                if pid in view.workers and pid not in before.workers:
                    return
            if time.monotonic() >= deadline:
                raise HAProxyError(f"reload not confirmed within {timeout:.1f}s; "
                                   f"{self._log_tail(log_offset)}")
            time.sleep(0.02)

    def _save_server_state(self, settings: HAProxySettings) -> None:
        """`show servers state` into the state file, minus servers whose address changed.

        HAProxy restores a saved server's address over the configured one, so
        a line for `w3` at its old port would send players to the wrong place
        if the worker ports changed; such lines are dropped and the server
        starts fresh.
        """
        assert settings.state_file is not None
        try:
            dump = self.stats("show servers state")
        except HAProxyError as exc:
            log.warning("no server state carried over the reload: %s", exc)
            dump = _STATE_VERSION_LINE
        wanted = {server_name(i): (settings.worker_host, str(port))
                  for i, port in enumerate(settings.worker_ports)}
        kept = []
        for line in dump.splitlines():
            parts = line.split()
            if line.startswith("#") or len(parts) < 19:
                kept.append(line)  # version line, header, blank
                continue
            backend, name, addr, port = parts[1], parts[3], parts[4], parts[18]
            if backend != BACKEND or wanted.get(name) == (addr, port):
                kept.append(line)
        text = "\n".join(kept).strip() + "\n"
        write_private(settings.state_file, text if text.strip() else _STATE_VERSION_LINE)

    def stop(self, timeout: float = 5.0, *, graceful: bool = True) -> None:
        """Stop HAProxy and its workers; always reaps, so no process is left behind.

        Graceful: SIGUSR1, the old-worker way (stop listening, let the open
        connections finish) for up to `timeout`. Then, or at once when not
        graceful, SIGTERM (close everything now), and SIGKILL to the whole
        process group if even that hangs.
        """
        with self._lock:
            self._stop(timeout, graceful)

    def _stop(self, timeout: float, graceful: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        if self._owner_pid != os.getpid():
            raise HAProxyError("only the process that started haproxy may stop it")
        try:
            if proc.poll() is None and graceful:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGUSR1)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout if not graceful else 2.0)
                except subprocess.TimeoutExpired:
                    # The master is not reaped yet, so its pid (= the group id) cannot
                    # have been reused: killing the group hits only our processes.
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        finally:
            self._forget()
            for path in (self.master_socket, Path(self.settings.stats_socket)):
                with contextlib.suppress(OSError):
                    if path.is_socket():
                        path.unlink()

    def __enter__(self) -> HAProxyProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers -------------------------------------------------------------

    def _prepare(self, settings: HAProxySettings) -> HAProxySettings:
        if settings.state_file is None:
            settings = dataclasses.replace(settings, state_file=str(self.state_path))
        settings.validate()
        return fit_maxconn(settings)

    def _forget(self) -> None:
        self._proc = None
        _running.discard(self)

    def _log_tail(self, offset: int = 0, lines: int = 20) -> str:
        if self.inherit_output:
            return "see the supervisor's stderr for haproxy's messages"
        try:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(offset)
                text = log_file.read().decode(errors="replace")
        except OSError as exc:
            return f"log {self.log_path} unreadable: {exc}"
        tail = text.strip().splitlines()[-lines:]
        return f"log {self.log_path}:\n" + ("\n".join(tail) if tail else "(empty)")


def stop_all() -> None:
    """Stop every HAProxyProcess this process started (atexit runs it too)."""
    _running.stop_all()


# -- `oddsgate haproxy-config` ------------------------------------------------


def _host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` for argparse."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _default_stats_socket() -> str:
    """The node's runtime dir (OG_RUNTIME_DIR and friends), as the supervisor uses it."""
    from gateway.config import Settings
    from supervisor.runtime import runtime_dir

    return str(runtime_dir(Settings.from_env(allow_anonymous=True)) / STATS_SOCKET_NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oddsgate haproxy-config",
        description="Print the HAProxy config for this node's workers (checked with "
                    "`haproxy -c` when --check is given).",
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="number of gateway workers (default: CPU count)")
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT,
                        help="port of worker 0; worker i listens on base + i")
    parser.add_argument("--worker-host", default="127.0.0.1", help="address workers listen on")
    parser.add_argument("--bind", type=_host_port, default=("127.0.0.1", DEFAULT_BIND_PORT),
                        metavar="HOST:PORT", help="where players connect")
    parser.add_argument("--agent-host", default="127.0.0.1",
                        help="address of the supervisor's agent-check port")
    parser.add_argument("--agent-port", type=int, default=DEFAULT_AGENT_PORT,
                        help="the supervisor's agent-check port")
    parser.add_argument("--stats-socket", help="HAProxy's admin socket "
                        "(default: haproxy.sock in the node's runtime dir)")
    parser.add_argument("--state-file", help="server state file for reloads (default: none)")
    parser.add_argument("--maxconn", type=int, default=100_000, help="players, node-wide")
    parser.add_argument("--server-maxconn", type=int, help="players per worker (default: none)")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    parser.add_argument("--output", "-o", help="write to FILE instead of stdout")
    parser.add_argument("--check", action="store_true", help="run `haproxy -c` on the result")
    parser.add_argument("--haproxy", help="haproxy binary for --check")
    return parser


def main_config(argv: list[str] | None = None) -> int:
    """`oddsgate haproxy-config`: 0 done, 2 bad arguments or a config HAProxy refuses."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and the error (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        bind_host, bind_port = args.bind
        settings = HAProxySettings.for_workers(
            args.workers, args.base_port, worker_host=args.worker_host,
            bind_host=bind_host, bind_port=bind_port,
            agent_host=args.agent_host, agent_port=args.agent_port,
            stats_socket=args.stats_socket or _default_stats_socket(),
            state_file=args.state_file, maxconn=args.maxconn,
            server_maxconn=args.server_maxconn, log_level=args.log_level,
        )
        text = render(settings)
        if args.check:
            check(text, haproxy=args.haproxy)
    except (ValueError, HAProxyConfigError) as exc:  # ConfigError is a ValueError
        print(f"oddsgate haproxy-config: {exc}", file=sys.stderr)
        return 2
    except HAProxyError as exc:
        print(f"oddsgate haproxy-config: {exc}", file=sys.stderr)
        return 1
    if args.output:
        try:
            # an SRE's file, read by an HAProxy that may run as another user
            write_private(Path(args.output).resolve(), text, mode=0o644)
        except OSError as exc:
            print(f"oddsgate haproxy-config: cannot write {args.output}: {exc}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main_config())
