"""What the template needs, checked before HAProxy sees it.

Every value lands in a configuration file HAProxy parses, so a value is
refused here, naming its field, when it could break the file or inject a
line into it (a space or `#` in a host, a quote in a path), or when HAProxy
would only refuse it later with a less helpful message. Ports have no
defaults here: the node's settings (supervisor/settings.py) declare them once.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

LOG_LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
LOG_FORMATS = ("text", "json")  # the request log's layout (haproxy/render.py)
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL on Linux
_HOST_CHARS = re.compile(r"^[A-Za-z0-9._:-]+$")


@dataclass(kw_only=True)
class HAProxySettings:
    """Everything the template needs; `validate()` says what is wrong before HAProxy does.

    Worker `i` listens on `worker_host:worker_ports[i]`, is named `w<i>` in
    HAProxy and to the agent, and has the fixed server id `i + 1` (the id
    places the server on the hash ring, so it must never change).
    """

    bind_host: str = "127.0.0.1"
    bind_port: int
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
    #: the request log's layout: `text` (option httplog's) or `json` (OG_LOG_FORMAT)
    log_format: str = "text"
    #: where a reload saves server states for the new worker; None: not carried
    state_file: str | None = None

    @classmethod
    def for_workers(cls, workers: int, base_port: int, **kwargs: object) -> HAProxySettings:
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
        check_path("stats_socket", self.stats_socket, unix_socket=True)
        if self.state_file is not None:
            check_path("state_file", self.state_file)
        for name in ("maxconn", "health_inter_ms", "agent_inter_ms", "tunnel_timeout_s",
                     "hard_stop_after_s"):
            _check_positive(name, getattr(self, name))
        if self.server_maxconn is not None:
            _check_positive("server_maxconn", self.server_maxconn)
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level={self.log_level!r}: not one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format={self.log_format!r}: not one of "
                             f"{', '.join(LOG_FORMATS)}")


def check_path(name: str, value: object, *, unix_socket: bool = False) -> None:
    """An absolute path HAProxy can read from its config (or bind, for a unix socket)."""
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ValueError(f"{name}={value!r}: must be an absolute path")
    if any(c.isspace() or c in "\"'#\\$" or not c.isprintable() for c in value):
        raise ValueError(f"{name}={value!r}: spaces, quotes, '#', '$' and backslashes "
                         "are not allowed in paths HAProxy reads")
    if unix_socket and len(os.fsencode(value)) > _SUN_PATH_MAX:
        raise ValueError(f"{name}={value!r}: a unix socket path longer than "
                         f"{_SUN_PATH_MAX} bytes; use a shorter runtime dir")


def address(host: str, port: int) -> str:
    """host:port as HAProxy writes it, IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
