"""The HAProxy process in front of a node's workers: start it, reload it, stop it.

What HAProxy runs with is rendered and checked by the `haproxy` package
(haproxy/render.py, haproxy/check.py); this module owns the process.

`HAProxyProcess` runs HAProxy the way the supervisor needs it: a foreground
child in master-worker mode (`haproxy -W -db`), so that

* its death is the supervisor's SIGCHLD, with no pidfile or daemon to chase;
* `reload()` is SIGUSR2 to the master, which re-reads the config and hands the
  listening sockets to a new worker: no connection is refused, and existing
  WebSocket tunnels stay on the old worker until they end (at most
  `hard_stop_after_s`);
* the master's CLI (`-S`, private to this module) tells whether a reload was
  loaded or failed, instead of guessing from timing.

Every config it starts or reloads with is rendered, written through
supervisor/private.py (renamed into place, never through a link) and
passes `haproxy -c` first. Before each reload the server states are dumped
to the state file the new worker loads, so a drained or DOWN worker does not
get players for the few hundred milliseconds before the first checks.

The supervisor's agent owns every server's admin state (`ready`/`drain`
answers to agent checks). This module never sets drain through the stats
socket, because the agent's next `ready` would undo it.

Like the embedded Redis, every started HAProxy is stopped by `stop()`, the
context manager, or at interpreter exit. It runs in its own process group, so
a terminal's Ctrl-C reaches the supervisor only, and the supervisor decides the
order in which the node winds down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, BinaryIO

import psutil

from haproxy.check import check, find_haproxy
from haproxy.errors import HAProxyConfigError, HAProxyError
from haproxy.render import BACKEND, CLICKS_BACKEND, render, server_name
from haproxy.settings import HAProxySettings, address, check_path
from supervisor.children import ChildRegistry
from supervisor.private import open_log, private_dir, stage_file, write_private

# HAProxySettings and HAProxyError are also this module's API: the supervisor
# passes the one and catches the other.
__all__ = [
    "FD_RESERVE",
    "HAProxyConfigError",
    "HAProxyError",
    "HAProxyProcess",
    "HAProxySettings",
    "fit_maxconn",
    "read_servers",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "haproxy.cfg"
STATE_NAME = "haproxy.state"
LOG_NAME = "haproxy.log"
MASTER_SOCKET_NAME = "haproxy-master.sock"
# Descriptors HAProxy needs beyond two per connection: listeners, checks,
# pollers, pipes, the CLI. It computed 33 for a small farm; keep a wide margin.
FD_RESERVE = 1000
# The first line of a server state file: format version 1. HAProxy warns
# about a missing or empty file, so a fresh start writes just this.
_STATE_VERSION_LINE = "1\n"

_running: ChildRegistry[HAProxyProcess] = ChildRegistry(lambda child: child.stop(timeout=2.0))


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
    `haproxy.log` (HAProxy's stdout and stderr, unless `on_line` takes them),
    and the master CLI socket. The stats socket is wherever `settings` says.
    `runtime_dir` must be ours alone, and files are renamed into place from
    random names, never written through a link (supervisor/private.py).

    `on_line`, when given, gets each line HAProxy writes (its request log and
    its own diagnostics) and the master's pid, from a reader thread, instead
    of `haproxy.log`: the supervisor relays them into its own log, in its
    format (supervisor/services.py).
    """

    def __init__(
        self,
        settings: HAProxySettings,
        runtime_dir: str | os.PathLike[str],
        *,
        haproxy: str | None = None,
        on_line: Callable[[str, int], None] | None = None,
    ) -> None:
        self.runtime_dir = Path(os.path.abspath(runtime_dir))  # a link there is refused
        self.config_path = self.runtime_dir / CONFIG_NAME
        self.state_path = self.runtime_dir / STATE_NAME
        self.log_path = self.runtime_dir / LOG_NAME
        self.master_socket = self.runtime_dir / MASTER_SOCKET_NAME
        check_path("master socket", str(self.master_socket), unix_socket=True)
        self.on_line = on_line
        self._recent_lines: deque[str] = deque(maxlen=20)  # for errors, when relayed
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
        return (f"HAProxyProcess({address(self.settings.bind_host, self.settings.bind_port)}, "
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
                out: BinaryIO | int = subprocess.PIPE
                if self.on_line is None:
                    out = stack.enter_context(open_log(self.log_path))
                    log_offset = os.fstat(out.fileno()).st_size
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    cwd=self.runtime_dir, process_group=0,
                )
            if self.on_line is not None:
                self._recent_lines.clear()
                assert self._proc.stdout is not None
                threading.Thread(target=self._relay,
                                 args=(self._proc.stdout, self.on_line, self._proc.pid),
                                 name="haproxy-output", daemon=True).start()
            self._owner_pid = os.getpid()
            _running.add(self)
            self._wait_ready(timeout, log_offset)
            return self

    def _relay(self, output: IO[bytes], on_line: Callable[[str, int], None], pid: int) -> None:
        """Hand each line HAProxy writes to `on_line`, until its last process closes it.

        The master and its workers share the pipe, so EOF comes when every
        one of them is gone. A failing `on_line` loses that line, never the
        ones after it: HAProxy must not block on a full pipe.
        """
        with output:
            for raw in output:
                line = raw.decode(errors="replace").rstrip("\n")
                if not line:
                    continue
                self._recent_lines.append(line)
                try:
                    on_line(line, pid)
                except Exception:
                    log.exception("relaying a line of haproxy's output failed")

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
        wanted = {(BACKEND, server_name(i)): (settings.worker_host, str(port))
                  for i, port in enumerate(settings.worker_ports)}
        wanted.update({(CLICKS_BACKEND, s.name): (s.host, str(s.port))
                       for s in settings.click_servers()})
        kept = []
        for line in dump.splitlines():
            parts = line.split()
            if line.startswith("#") or len(parts) < 19:
                kept.append(line)  # version line, header, blank
                continue
            backend, name, addr, port = parts[1], parts[3], parts[4], parts[18]
            if backend not in (BACKEND, CLICKS_BACKEND) \
                    or wanted.get((backend, name)) == (addr, port):
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
        if self.on_line is not None:
            tail = list(self._recent_lines)[-lines:]
            return "haproxy's last lines:\n" + ("\n".join(tail) if tail else "(none)")
        try:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(offset)
                text = log_file.read().decode(errors="replace")
        except OSError as exc:
            return f"log {self.log_path} unreadable: {exc}"
        tail = text.strip().splitlines()[-lines:]
        return f"log {self.log_path}:\n" + ("\n".join(tail) if tail else "(empty)")

