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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

LOG_LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
LOG_FORMATS = ("text", "json")  # the request log's layout (haproxy/render.py)
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes with the NUL on Linux
_HOST_CHARS = re.compile(r"^[A-Za-z0-9._:-]+$")
_NODE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,18}[a-z0-9])?")
NODE_ID_STRIDE = 1000  # server ids: node number x 1000 + worker index + 1


@dataclass(frozen=True)
class NodeTarget:
    """One `oddsgate run` node behind a shared HAProxy (issue 14: several nodes).

    `number` (1-64) fixes its servers' ids, hence their places on the hash
    ring: give every node its own and never renumber one, or players move.
    Its agent answers for its own workers by their node-local names (`w<i>`).
    """

    name: str
    host: str
    base_port: int
    workers: int
    agent_port: int
    number: int
    #: worker i's click listener on click_base_port + i; None: the node's default,
    #: right after its worker ports (OG_CLICK_BASE_PORT unset)
    click_base_port: int | None = None

    @property
    def click_base(self) -> int:
        return self.click_base_port if self.click_base_port is not None \
            else self.base_port + self.workers

    @classmethod
    def parse(cls, text: str) -> NodeTarget:
        """`NAME=HOST:BASE_PORT:WORKERS:AGENT_PORT:NUMBER` (the --node flag)."""
        name, sep, rest = text.partition("=")
        parts = rest.rsplit(":", 4)
        if not sep or len(parts) != 5:
            raise ValueError(f"--node {text!r}: expected NAME=HOST:BASE_PORT:WORKERS:"
                             "AGENT_PORT:NUMBER")
        host, *numbers = parts
        try:
            base_port, workers, agent_port, number = (int(n) for n in numbers)
        except ValueError:
            raise ValueError(f"--node {text!r}: ports, workers and number are integers") from None
        return cls(name, host.strip("[]"), base_port, workers, agent_port, number)

    def validate(self) -> None:
        if not isinstance(self.name, str) or not _NODE_NAME.fullmatch(self.name):
            raise ValueError(f"node name {self.name!r}: 1-20 of [a-z0-9-]")
        _check_host(f"node {self.name} host", self.host)
        _check_port(f"node {self.name} base_port", self.base_port)
        _check_port(f"node {self.name} agent_port", self.agent_port)
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) \
                or not 1 <= self.workers < NODE_ID_STRIDE:
            raise ValueError(f"node {self.name}: workers={self.workers!r}, need 1-999")
        _check_port(f"node {self.name} last worker port", self.base_port + self.workers - 1)
        _check_port(f"node {self.name} last click port", self.click_base + self.workers - 1)
        if isinstance(self.number, bool) or not isinstance(self.number, int) \
                or not 1 <= self.number <= 64:
            raise ValueError(f"node {self.name}: number={self.number!r}, need 1-64")


@dataclass(frozen=True)
class Server:
    """One `server` line: a worker, where its agent is, what the agent calls it."""

    name: str
    host: str
    port: int
    id: int
    agent_name: str
    agent_host: str | None = None  # None: the template's default-server's
    agent_port: int | None = None


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
    #: several nodes behind this HAProxy; empty: the one node of worker_* and agent_*
    nodes: list[NodeTarget] = field(default_factory=list)
    #: worker i's click listener (`/t/` only, kept alive) on worker_host:click_ports[i];
    #: empty: no click listeners, /t/ goes to the workers' own ports like everything else
    click_ports: list[int] = field(default_factory=list)

    def servers(self) -> Iterator[Server]:
        """Every worker HAProxy balances over, with its fixed id and its agent."""
        return self._per_worker("w", self.worker_ports, lambda node: node.base_port)

    def click_servers(self) -> Iterator[Server]:
        """Every worker's click listener: named `c<i>` (`<node>-c<i>`), tracking the
        worker's server `w<i>` (`tracks`) for its health and its agent's drain."""
        return self._per_worker("c", self.click_ports, lambda node: node.click_base)

    def _per_worker(self, letter: str, local_ports: list[int],
                    node_base: Callable[[NodeTarget], int]) -> Iterator[Server]:
        """One server per worker: this node's ports, or every node's from its base."""
        if not self.nodes:
            for i, port in enumerate(local_ports):
                yield Server(f"{letter}{i}", self.worker_host, port, i + 1, f"w{i}")
            return
        for node in self.nodes:
            for i in range(node.workers):
                yield Server(f"{node.name}-{letter}{i}", node.host, node_base(node) + i,
                             node.number * NODE_ID_STRIDE + i + 1, f"w{i}",
                             node.host, node.agent_port)

    @staticmethod
    def tracks(click: Server) -> str:
        """The worker server a click server follows (same node, same index)."""
        return click.name[:-len(click.agent_name)] + click.agent_name

    @property
    def clicks(self) -> bool:
        """Whether /t/ goes to the click listeners."""
        return bool(self.nodes) or bool(self.click_ports)

    @classmethod
    def for_nodes(cls, nodes: list[NodeTarget], **kwargs: object) -> HAProxySettings:
        """Settings for HAProxy in front of several nodes (the first one's agent is the
        default-server's; every server line names its own)."""
        if not nodes:
            raise ValueError("--node: need at least one node")
        first = nodes[0]
        return cls(nodes=list(nodes), worker_host=first.host,
                   worker_ports=[first.base_port + i for i in range(first.workers)],
                   agent_host=first.host, agent_port=first.agent_port, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def for_workers(cls, workers: int, base_port: int, click_base_port: int | None = None,
                    **kwargs: object) -> HAProxySettings:
        """Settings for `workers` workers on consecutive ports from `base_port`, their
        click listeners from `click_base_port` (None: right after the worker ports, the
        node's default)."""
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers={workers!r}: need at least one worker")
        clicks = base_port + workers if click_base_port is None else click_base_port
        return cls(worker_ports=[base_port + i for i in range(workers)],  # type: ignore[arg-type]
                   click_ports=[clicks + i for i in range(workers)], **kwargs)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field; render() calls this."""
        if self.nodes:
            self._validate_nodes()
        if not isinstance(self.worker_ports, list | tuple) or not self.worker_ports:
            raise ValueError("worker_ports: need at least one worker")
        for name in ("bind_port", "agent_port"):
            _check_port(name, getattr(self, name))
        for i, port in enumerate(self.worker_ports):
            _check_port(f"worker_ports[{i}]", port)
        if len(set(self.worker_ports)) != len(self.worker_ports):
            raise ValueError(f"worker_ports: duplicates in {list(self.worker_ports)}")
        if self.click_ports:
            if len(self.click_ports) != len(self.worker_ports):
                raise ValueError(f"click_ports: {len(self.click_ports)} for "
                                 f"{len(self.worker_ports)} workers")
            for i, port in enumerate(self.click_ports):
                _check_port(f"click_ports[{i}]", port)
                if port in self.worker_ports or self.click_ports.index(port) != i:
                    raise ValueError(f"click_ports[{i}]={port}: already used by a worker "
                                     "or another click listener")
        taken = set(self.worker_ports) | set(self.click_ports)
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


    def _validate_nodes(self) -> None:
        names, numbers, endpoints = set(), set(), set()
        for node in self.nodes:
            node.validate()
            if node.name in names:
                raise ValueError(f"node {node.name}: named twice")
            if node.number in numbers:
                raise ValueError(f"node {node.name}: number {node.number} taken by another "
                                 "node (it places the servers on the hash ring)")
            names.add(node.name)
            numbers.add(node.number)
            for port in [*range(node.base_port, node.base_port + node.workers),
                         *range(node.click_base, node.click_base + node.workers),
                         node.agent_port]:
                if (node.host, port) in endpoints:
                    raise ValueError(f"node {node.name}: {address(node.host, port)} used twice")
                endpoints.add((node.host, port))


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
