"""A private redis-server owned by this process: the embedded default.

A node that runs its own Redis must never leave one behind, because an orphan
keeps the unix socket, the port and possibly stale history that a later start
would mistake for its own. So every instance is stopped by `stop()`, by the
context manager, or at interpreter exit (atexit). A parent that wants the same
on SIGTERM turns the signal into `SystemExit` (or calls `stop()` from its
handler): a bare SIGTERM kills Python without running atexit, and
PR_SET_PDEATHSIG is not reachable from the stdlib without ctypes tricks that
also fire when the *thread* that forked exits.

The server runs in the foreground (`daemonize no`) as our child, in our process
group, from a generated config file in its directory, which also holds its log
and, when persistence is on, its append-only file. That directory must be ours
alone and its files are never written through a link (supervisor/private.py):
a node may run as root in a directory another user could have prepared.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from supervisor.children import ChildRegistry
from supervisor.private import open_log, private_dir, write_private

DEFAULT_REDIS_SERVER = "/usr/bin/redis-server"
SOCKET_NAME = "redis.sock"
CONFIG_NAME = "redis.conf"
LOG_NAME = "redis.log"
LOOPBACK = "127.0.0.1"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL on Linux
_AUTO_PORT_ATTEMPTS = 3
# fsync of the append-only file when persistent: "everysec" (at most a second of
# writes lost if Redis itself crashes) rather than "always" (none, at a disk flush
# per write); README, Tracking links.
APPENDFSYNC = "everysec"

_running: ChildRegistry[EmbeddedRedis] = ChildRegistry(lambda child: child.stop())


class EmbeddedRedisError(RuntimeError):
    """The server did not come up (or would not go down); the message holds its log's tail."""


def free_port(host: str = LOOPBACK) -> int:
    """A port nobody listened on a moment ago; racy by nature, so callers retry on EADDRINUSE."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ports_free(ports: Iterable[int], host: str = LOOPBACK) -> bool:
    """Whether every one of `ports` could be bound a moment ago (released at once:
    racy, like `free_port`, so callers retry on EADDRINUSE)."""
    socks: list[socket.socket] = []
    try:
        for port in ports:
            sock = socket.socket()
            socks.append(sock)
            sock.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        for sock in socks:
            sock.close()


def free_port_range(count: int, host: str = LOOPBACK) -> int:
    """A base port with `count` free ports after it (a node's workers listen on
    base + index); checked, not guaranteed, like `free_port`."""
    for _ in range(50):
        base = free_port(host)
        if base + count < 65535 and ports_free(range(base, base + count), host):
            return base
    raise RuntimeError("no free range of ports")


def _quote(value: str) -> str:
    """Redis config strings: double quotes, backslash escapes, so paths may hold spaces."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class EmbeddedRedis:
    """One redis-server child, on a unix socket (the product) or a loopback port (tests).

    `port=None` serves only the unix socket `<runtime_dir>/redis.sock` (mode 0700,
    no TCP); `port=0` picks a free loopback port once, kept across restarts;
    any other port is used as given. `persist=True` turns the append-only file
    on (fsynced every second), so a `restart()` keeps the data, as a real Redis
    restart would; a node's own embedded Redis is persistent (supervisor/runtime.py).
    """

    def __init__(
        self,
        runtime_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        persist: bool = False,
        redis_server: str | None = None,
        extra_config: dict[str, str] | None = None,
    ) -> None:
        # abspath, not resolve(): a link in place of the directory must be seen
        # (and refused) by start(), not silently followed here.
        self.runtime_dir = Path(os.path.abspath(runtime_dir))
        self.persist = persist
        self.extra_config = dict(extra_config or {})
        self._redis_server = redis_server or shutil.which("redis-server") or DEFAULT_REDIS_SERVER
        self._auto_port = port == 0
        if port is not None and not 0 <= port <= 65535:
            raise ValueError(f"port {port} is not a TCP port")
        self.port: int | None = free_port() if port == 0 else port
        self.socket_path: Path | None = self.runtime_dir / SOCKET_NAME if port is None else None
        if self.socket_path is not None and len(os.fsencode(self.socket_path)) > _SUN_PATH_MAX:
            raise ValueError(
                f"unix socket path {self.socket_path} is longer than {_SUN_PATH_MAX} bytes; "
                "use a shorter runtime dir"
            )
        self.config_path = self.runtime_dir / CONFIG_NAME
        self.log_path = self.runtime_dir / LOG_NAME
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid: int | None = None

    # -- state ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """What redis-py's `from_url` takes to reach this server."""
        if self.socket_path is not None:
            return f"unix://{self.socket_path}"
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        return f"EmbeddedRedis({self.url!r}, pid={self.pid})"

    # -- config --------------------------------------------------------------

    def config_text(self) -> str:
        """The generated config; written on every start so a restart picks up changes."""
        lines = [
            "daemonize no",
            "supervised no",
            f"dir {_quote(str(self.runtime_dir))}",
            f"logfile {_quote(str(self.log_path))}",
            "loglevel notice",
            "always-show-logo no",
            'save ""',
            f"appendonly {'yes' if self.persist else 'no'}",
        ]
        if self.persist:
            # What a node's clicks rely on (README, Tracking links): the append-only
            # file, fsynced once a second, so a crash of Redis itself loses at most
            # the last second of writes; a crash of a worker loses nothing.
            lines.append(f"appendfsync {APPENDFSYNC}")
        if self.socket_path is not None:
            lines += [
                "port 0",
                f"unixsocket {_quote(str(self.socket_path))}",
                "unixsocketperm 700",
            ]
        else:
            lines += [f"bind {LOOPBACK}", f"port {self.port}", "protected-mode yes"]
        lines += [f"{key} {value}" for key, value in self.extra_config.items()]
        return "\n".join(lines) + "\n"

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 5.0) -> EmbeddedRedis:
        """Start and wait until PING answers, so the caller may connect at once."""
        if self.running:
            return self
        if not os.access(self._redis_server, os.X_OK):
            raise EmbeddedRedisError(
                f"redis-server not found or not executable: {self._redis_server}"
            )
        private_dir(self.runtime_dir)
        for attempt in range(_AUTO_PORT_ATTEMPTS):
            try:
                self._start_once(timeout)
                return self
            except EmbeddedRedisError as exc:
                # free_port() is a guess; if someone took the port meanwhile, guess again
                lost_race = self._auto_port and "Address already in use" in str(exc)
                if not lost_race or attempt == _AUTO_PORT_ATTEMPTS - 1:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> None:
        try:
            log_offset = self._spawn()
        except OSError as exc:  # a full disk, a directory squatting a file's name
            where = exc.filename2 or exc.filename or self.runtime_dir
            raise EmbeddedRedisError(f"cannot start redis-server: {where}: "
                                     f"{exc.strerror or exc}") from None
        self._owner_pid = os.getpid()
        _running.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._forget()
                raise EmbeddedRedisError(
                    f"redis-server exited with status {code} during start; "
                    f"log {self.log_path}:\n{self._log_tail(log_offset)}"
                )
            if self._ping():
                return
            if time.monotonic() >= deadline:
                tail = self._log_tail(log_offset)
                self.stop()
                raise EmbeddedRedisError(
                    f"redis-server did not answer PING within {timeout:.1f}s at {self.url}; "
                    f"log {self.log_path}:\n{tail}"
                )
            time.sleep(0.01)

    def _spawn(self) -> int:
        """Write the config, start the server with its output on the log; the log's old size."""
        write_private(self.config_path, self.config_text())
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()  # left by a killed server; redis would replace it too
        # Early failures (a bad config line) go to stderr before the logfile is
        # opened, so stderr is appended to the same log.
        with open_log(self.log_path) as log:
            log_offset = os.fstat(log.fileno()).st_size
            self._proc = subprocess.Popen(
                [self._redis_server, str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.runtime_dir,
                start_new_session=False,
            )
        return log_offset

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; always reaps, so no zombie remains."""
        proc = self._proc
        if proc is None:
            return
        if self._owner_pid != os.getpid():
            raise EmbeddedRedisError("only the process that started this redis-server may stop it")
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
        finally:
            self._forget()
            if self.socket_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.socket_path.unlink()

    def crash(self) -> None:
        """SIGKILL, no shutdown: what a fault drill needs (nothing flushed, no
        goodbye to a cluster); reaped like `stop()`."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        self._forget()

    def restart(self, timeout: float = 5.0) -> None:
        """Stop and start on the same socket or port and directory (data kept only if `persist`)."""
        self.stop(timeout)
        self.start(timeout)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers -------------------------------------------------------------

    def _forget(self) -> None:
        self._proc = None
        _running.discard(self)

    def _ping(self) -> bool:
        """A raw PING: no client library needed, and `-LOADING` (AOF replay) counts as not yet."""
        try:
            if self.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                address: str | tuple[str, int] = str(self.socket_path)
            else:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                address = (LOOPBACK, int(self.port or 0))
            with sock:
                sock.settimeout(0.5)
                sock.connect(address)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self, offset: int = 0, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        tail = text.strip().splitlines()[-lines:]
        return "\n".join(tail) if tail else "(log empty)"
