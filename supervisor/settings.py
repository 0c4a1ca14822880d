"""Settings of a node: how many workers, where everything listens, when to drain.

The worker settings (gateway/config.py) apply to every worker; these are the
supervisor's own. Same rules: `OG_*` variables, flags override, a bad value
stops `oddsgate run` at start with exit code 2.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from gateway.config import ConfigError, EnvSettings, setting


def node_port_count(workers: int) -> int:
    """How many ports from OG_BASE_PORT a node of `workers` listens on by default: its
    workers', then their click listeners' (`NodeSettings.click_ports`), for whoever
    reserves a free range for a node (tests, the bench, the regions demo)."""
    return 2 * workers


@dataclass
class NodeSettings(EnvSettings):
    workers: int = setting(
        "OG_WORKERS", 0, "worker processes; 0: one per usable core (sched_getaffinity)", minimum=0
    )
    base_port: int = setting(
        "OG_BASE_PORT", 8001, "worker i listens on base port + i", minimum=1
    )
    click_base_port: int = setting(
        "OG_CLICK_BASE_PORT", 0, "worker i's click listener (`GET /t/{code}`, where HAProxy "
        "sends tracking links) listens on this + i; 0: right after the worker ports "
        "(OG_BASE_PORT + workers + i)", minimum=0
    )
    haproxy: bool = setting("OG_HAPROXY", False, "start and supervise HAProxy in front")
    haproxy_bind: str = setting("OG_HAPROXY_BIND", "127.0.0.1:8000", "HAProxy frontend address")
    agent_port: int = setting(
        "OG_AGENT_PORT", 8100, "TCP port of the HAProxy agent-check answers", minimum=1
    )
    metrics_port: int = setting(
        "OG_METRICS_PORT", 9100, "port of GET /metrics (Prometheus); 0: off", minimum=0
    )
    metrics_host: str = setting("OG_METRICS_HOST", "127.0.0.1", "address of GET /metrics")
    aggregate: bool = setting(
        "OG_AGGREGATE", False, "this node hosts its region's aggregator (`oddsgate aggregate`, "
        "supervised; its settings: OG_STREAM, OG_GENERATION, OG_PROVIDERS, ...)")
    webhooks: bool = setting(
        "OG_WEBHOOKS", False, "this node hosts the region's webhook dispatcher (`oddsgate "
        "webhooks run`, supervised; its settings: OG_WEBHOOKS_*)")
    stats: bool = setting(
        "OG_STATS", False, "this node runs the partner statistics service (`oddsgate stats "
        "run`, supervised; its settings: OG_STATS_*)")
    drain_window_ms: int = setting(
        "OG_DRAIN_WINDOW_MS", 500, "drained players get reconnect.after_ms spread over this",
        minimum=0,
    )
    drain_reconnects_per_worker_s: int = setting(
        "OG_DRAIN_RECONNECTS_PER_WORKER_S", 300,
        "the window is stretched so that a drained worker's players return at most this "
        "many a second per worker still in service (what each resumes without queueing); "
        "0: never stretched",
        minimum=0,
    )
    drain_settle_ms: int = setting(
        "OG_DRAIN_SETTLE_MS", 600,
        "time between a drain's start and the reconnect hints (HAProxy sees the drain first)",
        minimum=0,
    )
    drain_above_connections: int = setting(
        "OG_DRAIN_ABOVE_CONNECTIONS", 0,
        "automatic drain of a worker above this many connections; 0: off", minimum=0,
    )
    drain_above_mean_share: float = setting(
        "OG_DRAIN_ABOVE_MEAN_SHARE", 0.0,
        "automatic drain of a worker this share above the node mean (0.5 = +50%); 0: off",
        minimum=0,
    )
    drain_recover_share: float = setting(
        "OG_DRAIN_RECOVER_SHARE", 0.9,
        "an automatically drained worker is ready again below this share of its threshold",
        minimum=0.1,
    )
    drain_min_connections: int = setting(
        "OG_DRAIN_MIN_CONNECTIONS", 100,
        "the above-mean rule ignores workers with fewer connections than this", minimum=0,
    )
    heartbeat_timeout_s: float = setting(
        "OG_HEARTBEAT_TIMEOUT_S", 5.0, "a worker silent this long is killed and replaced",
        minimum=0.5,
    )
    restart_backoff_s: float = setting(
        "OG_RESTART_BACKOFF_S", 0.5, "first delay before restarting a dead worker (doubles)",
        minimum=0.0,
    )
    restart_backoff_max_s: float = setting(
        "OG_RESTART_BACKOFF_MAX_S", 30.0, "longest delay between restarts", minimum=0.0
    )
    crash_loop_restarts: int = setting(
        "OG_CRASH_LOOP_RESTARTS", 5,
        "restarts within OG_CRASH_LOOP_WINDOW_S after which a worker is left failed", minimum=1,
    )
    crash_loop_window_s: float = setting(
        "OG_CRASH_LOOP_WINDOW_S", 60.0, "window of the crash-loop limit", minimum=1.0
    )
    shutdown_deadline_s: float = setting(
        "OG_SHUTDOWN_DEADLINE_S", 10.0, "SIGTERM drains players for at most this long",
        minimum=0.0,
    )
    connections_per_worker: int = setting(
        "OG_CONNECTIONS_PER_WORKER", 50_000, "capacity RLIMIT_NOFILE is raised for", minimum=1
    )

    def check(self) -> None:
        super().check()
        host, _, port = self.haproxy_bind.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"OG_HAPROXY_BIND={self.haproxy_bind!r}: expected HOST:PORT")
        if self.base_port + self.worker_count > 65536:
            raise ConfigError("OG_BASE_PORT + workers goes past port 65535")
        clicks = self.click_ports
        if clicks[-1] > 65535:
            raise ConfigError("the click listeners (OG_CLICK_BASE_PORT + workers) go past "
                              "port 65535")
        workers = range(self.base_port, self.base_port + self.worker_count)
        for port in clicks:
            if port in workers or port in (self.agent_port, self.metrics_port):
                raise ConfigError(f"OG_CLICK_BASE_PORT: click listener port {port} is taken "
                                  "by a worker, the agent or /metrics")

    @property
    def worker_count(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))

    @property
    def click_ports(self) -> list[int]:
        """Worker i's click listener port, at index i."""
        base = self.click_base_port or self.base_port + self.worker_count
        return [base + i for i in range(self.worker_count)]

    @property
    def bind(self) -> tuple[str, int]:
        host, _, port = self.haproxy_bind.rpartition(":")
        return host, int(port)
