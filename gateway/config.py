"""Every setting of a worker, where it comes from, and its default.

Settings come from `OG_*` environment variables (what a container or a
systemd unit sets) and may be overridden by command-line flags. Each is
checked when read, so a bad value stops the process at start with one line
naming the variable, not with a traceback an hour later.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields

from redis_contract.target import RedisTargetError, redis_target


class ConfigError(ValueError):
    """A setting with a value the gateway cannot run with."""


# One WebSocket origin: ws:// or wss://, a host (a leading `*.` for its subdomains)
# and an optional port, nothing else: it goes into a CSP header as it is.
_WS_ORIGIN = re.compile(r"wss?://(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*(:[0-9]{1,5})?")


def ws_origins(raw: str) -> tuple[str, ...]:
    """The origins of a comma- or space-separated list (OG_SHELL_CONNECT_SRC);
    ValueError naming the first entry that is not a ws:// or wss:// origin.
    A trailing slash is dropped; a path is refused rather than widened."""
    origins = []
    for entry in raw.replace(",", " ").split():
        origin = entry.removesuffix("/")
        if not _WS_ORIGIN.fullmatch(origin):
            raise ValueError(f"{entry!r} is not a ws:// or wss:// origin (scheme, host, port)")
        origins.append(origin)
    return tuple(dict.fromkeys(origins))


def setting(env: str, default: object, doc: str, *, minimum: float | None = None,
            choices: tuple[str, ...] | None = None):
    """A dataclass field read from `env`, checked against `minimum` or `choices`."""
    return field(default=default,
                 metadata={"env": env, "doc": doc, "min": minimum, "choices": choices})


class EnvSettings:
    """Loading and checking shared by every settings dataclass of the project."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object):
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            raw = env.get(f.metadata["env"])
            if raw is not None and raw != "":
                values[f.name] = _convert(f.name, f.metadata["env"], type(f.default), raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.check()
        return settings

    @classmethod
    def env_value(cls, name: str, env: Mapping[str, str] | None = None) -> object:
        """One setting from the environment, checked like `from_env` checks it.

        For what a process needs before it can load the rest (the log format,
        which applies to the very first line it logs).
        """
        env = os.environ if env is None else env
        f = next(f for f in fields(cls) if f.name == name)  # type: ignore[arg-type]
        raw = env.get(f.metadata["env"])
        if raw is None or raw == "":
            return f.default
        value = _convert(f.name, f.metadata["env"], type(f.default), raw)
        _check_field(f, value)
        return value

    def check(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            _check_field(f, getattr(self, f.name))

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(env var, default, meaning) of every setting, for --help and the README."""
        return [(f.metadata["env"], repr(f.default), f.metadata["doc"])
                for f in fields(cls)]  # type: ignore[arg-type]


@dataclass
class Settings(EnvSettings):
    host: str = setting("OG_HOST", "127.0.0.1", "address the worker listens on")
    port: int = setting("OG_PORT", 8001, "port the worker listens on", minimum=0)
    click_port: int = setting(
        "OG_CLICK_PORT", 0, "port of the worker's click listener (`GET /t/{code}` only, "
        "kept-alive HTTP/1.1; HAProxy sends /t/ there); 0: none, /t/ on OG_PORT only (set by "
        "the supervisor from OG_CLICK_BASE_PORT)", minimum=0)
    redis_url: str = setting(
        "OG_REDIS_URL", "", "Redis URL (redis://, rediss://, unix://); empty: embedded Redis"
    )
    redis_cluster_nodes: str = setting(
        "OG_REDIS_CLUSTER_NODES", "", "Redis Cluster seed nodes, host:port,host:port (Redis 7: "
        "sharded pub/sub); set instead of OG_REDIS_URL; every process of the node uses the cluster"
    )
    runtime_dir: str = setting(
        "OG_RUNTIME_DIR", "", "the node's private files (embedded Redis, HAProxy, control "
        "socket); created 0700, refused unless owned by this user and not group/world-writable; "
        "empty: $XDG_RUNTIME_DIR/oddsgate or /tmp/oddsgate-$UID"
    )
    node: str = setting("OG_NODE", "", "node name shown in `welcome`; empty: the host name")
    worker_index: int = setting("OG_WORKER_INDEX", 0, "worker number shown in `welcome`",
                                 minimum=0)
    region: str = setting(
        "OG_REGION", "local", "the region this node serves, shown in `welcome` (PROTOCOL.md §8)"
    )
    lag_wait_ms: int = setting(
        "OG_LAG_WAIT_MS", 2000,
        "how long a resume point ahead of what this region has published (a player from "
        "another region) is held for the region to catch up before `reset` `ahead`", minimum=0,
    )
    region_stale_after_ms: int = setting(
        "OG_REGION_STALE_AFTER_MS", 0,
        "the region's aggregator must show progress this often, or /healthz fails and new "
        "players are refused (the region cannot serve); 0: no aggregator is watched", minimum=0,
    )
    jwt_secret: str = setting("OG_JWT_SECRET", "", "HS256 secret for session tokens")
    jwt_leeway_s: float = setting("OG_JWT_LEEWAY_S", 5.0, "clock skew allowed on `exp`",
                                   minimum=0)
    allow_anonymous: bool = setting(
        "OG_ALLOW_ANONYMOUS", False, "let players in without a token (a bad token is still 401)"
    )
    partition_map: str = setting(
        "OG_PARTITION_MAP", "", "JSON file of the partition map; empty: the built-in one"
    )
    history_s: float = setting(
        "OG_HISTORY_S", 60.0, "history the publisher keeps per topic (>= 30)", minimum=30
    )
    max_frame_bytes: int = setting(
        "OG_MAX_FRAME_BYTES", 65_536, "largest client frame; bigger closes 1009", minimum=256
    )
    max_topics: int = setting(
        "OG_MAX_TOPICS", 200, "topics one connection may follow", minimum=1
    )
    rate_limit_rps: float = setting(
        "OG_RATE_LIMIT_RPS", 20.0, "requests a second per connection", minimum=0.1
    )
    rate_limit_burst: float = setting(
        "OG_RATE_LIMIT_BURST", 40.0, "request burst per connection", minimum=1
    )
    rate_limit_close_after: int = setting(
        "OG_RATE_LIMIT_CLOSE_AFTER", 20, "refused requests in a row before close 4429",
        minimum=1
    )
    snapshot_rate_limit_rps: float = setting(
        "OG_SNAPSHOT_RATE_LIMIT_RPS", 5.0,
        "GET /v1/snapshot requests a second per client (the token's player, else its "
        "address); more get 429", minimum=0.1
    )
    snapshot_rate_limit_burst: float = setting(
        "OG_SNAPSHOT_RATE_LIMIT_BURST", 20.0, "GET /v1/snapshot burst per client", minimum=1
    )
    snapshot_rate_limit_clients: int = setting(
        "OG_SNAPSHOT_RATE_LIMIT_CLIENTS", 4096,
        "clients whose snapshot buckets a worker keeps (least recently seen dropped first)",
        minimum=1
    )
    snapshot_redis_reads_per_s: float = setting(
        "OG_SNAPSHOT_REDIS_READS_PER_S", 200.0,
        "snapshot reads a worker sends to Redis a second, all clients together (topics it "
        "does not follow); more get 429", minimum=1
    )
    max_bad_requests: int = setting(
        "OG_MAX_BAD_REQUESTS", 10, "bad requests per connection before close 4400", minimum=1
    )
    handshake_timeout_s: float = setting(
        "OG_HANDSHAKE_TIMEOUT_S", 5.0, "time to complete the WebSocket handshake", minimum=0.1
    )
    heartbeat_ms: int = setting(
        "OG_HEARTBEAT_MS", 20_000, "WebSocket ping interval (and pong timeout)", minimum=100
    )
    recent_events: int = setting(
        "OG_RECENT_EVENTS", 512, "events per topic kept in memory for fast resumes", minimum=0
    )
    replay_max: int = setting(
        "OG_REPLAY_MAX", 10_000, "longest replay; further behind gets reset + snapshot",
        minimum=1
    )
    compression: bool = setting(
        "OG_COMPRESSION", False, "permessage-deflate when the client offers it"
    )
    shell_connect_src: str = setting(
        "OG_SHELL_CONNECT_SRC", "",
        "origins besides its own that the player shell may open WebSockets to, comma- or "
        "space-separated (wss://eu.example.com): the other regions' frontends its "
        "?regions= names; its CSP connect-src",
    )
    high_watermark_bytes: int = setting(
        "OG_HIGH_WATERMARK_BYTES", 65_536,
        "pending output above which a player gets only the newest event per market",
        minimum=1024,
    )
    low_watermark_bytes: int = setting(
        "OG_LOW_WATERMARK_BYTES", 16_384,
        "pending output below which a coalescing player is caught up and served normally",
        minimum=0,
    )
    socket_sndbuf_bytes: int = setting(
        "OG_SOCKET_SNDBUF_BYTES", 0,
        "kernel send buffer per player socket; 0: the kernel's autotuning", minimum=0,
    )
    socket_notsent_lowat_bytes: int = setting(
        "OG_SOCKET_NOTSENT_LOWAT_BYTES", 16_384,
        "unsent bytes the kernel takes per player socket (TCP_NOTSENT_LOWAT); the rest "
        "waits in the worker, where the watermarks see it and coalescing can replace it; "
        "0: the kernel's limit (megabytes of old events a stalled player sees on waking)",
        minimum=0,
    )
    stall_timeout_s: float = setting(
        "OG_STALL_TIMEOUT_S", 60.0,
        "a player over its high-water mark this long is closed 1013 (a dead peer)",
        minimum=0.1,
    )
    breaker_trip_share: float = setting(
        "OG_BREAKER_TRIP_SHARE", 0.05,
        "share of the node's players in back-pressure that trips the breaker", minimum=0.0,
    )
    breaker_recover_share: float = setting(
        "OG_BREAKER_RECOVER_SHARE", 0.03,
        "share under which the breaker closes again", minimum=0.0,
    )
    breaker_min_players: int = setting(
        "OG_BREAKER_MIN_PLAYERS", 10,
        "players in back-pressure the breaker needs besides the share, so a few "
        "connections cannot trip it", minimum=1,
    )
    shed_retry_ms: int = setting(
        "OG_SHED_RETRY_MS", 2000, "retry_after_ms of a shed subscription", minimum=1
    )
    max_batch: int = setting(
        "OG_MAX_BATCH", 256,
        "most events in one frame (a `batch`); 1 sends every event in its own frame",
        minimum=1,
    )
    fanout_slice: int = setting(
        "OG_FANOUT_SLICE", 128,
        "players written per loop iteration in a fan-out, so requests and pings get in "
        "between a hot event's thousands of sends; 0: every player in one go",
        minimum=0,
    )
    listen_backlog: int = setting(
        "OG_LISTEN_BACKLOG", 4096,
        "connections the kernel queues for accept() (capped by net.core.somaxconn)",
        minimum=1,
    )
    gc_managed: bool = setting(
        "OG_GC_MANAGED", True,
        "the worker runs CPython's full garbage collections itself (gateway/gcpolicy.py) "
        "instead of stalling whenever the heap grows by a quarter",
    )
    gc_full_closed_share: float = setting(
        "OG_GC_FULL_CLOSED_SHARE", 0.25,
        "a full collection once this share of the open players have closed since the last",
        minimum=0.0,
    )
    gc_full_min_closed: int = setting(
        "OG_GC_FULL_MIN_CLOSED", 1000,
        "and at least this many players", minimum=1,
    )
    gc_full_interval_s: float = setting(
        "OG_GC_FULL_INTERVAL_S", 900.0,
        "a full collection at least this often, whatever closed", minimum=1.0,
    )
    reuse_port: bool = setting(
        "OG_REUSE_PORT", False,
        "share the port with a successor process (set by the supervisor for reloads)",
    )
    fleet: str = setting(
        "OG_FLEET", "", "shared-memory fleet table to report into (set by the supervisor)"
    )
    fleet_slot: int = setting(
        "OG_FLEET_SLOT", 0, "this process's slot in the fleet table (set by the supervisor)",
        minimum=0,
    )
    redis_reconnect_s: float = setting(
        "OG_REDIS_RECONNECT_S", 0.5, "fixed delay between Redis reconnect attempts",
        minimum=0.01
    )
    audit_s: float = setting(
        "OG_AUDIT_S", 5.0, "how often the worker compares every topic's seq with Redis's "
        "(one read per topic), to find a subscription lost without notice within two "
        "periods; 0: never", minimum=0
    )
    log_format: str = setting(
        "OG_LOG_FORMAT", "text",
        "log lines of every oddsgate process and of HAProxy: `text` (readable) or `json` "
        "(one object per line: time, level, logger, role, index, message, fields)",
        choices=("text", "json"),
    )

    def check(self) -> None:
        super().check()
        if self.low_watermark_bytes >= self.high_watermark_bytes:
            raise ConfigError("OG_LOW_WATERMARK_BYTES must be below OG_HIGH_WATERMARK_BYTES")
        if self.breaker_recover_share > self.breaker_trip_share:
            raise ConfigError("OG_BREAKER_RECOVER_SHARE must not exceed OG_BREAKER_TRIP_SHARE")
        if not self.jwt_secret and not self.allow_anonymous:
            raise ConfigError(
                "OG_JWT_SECRET is empty and OG_ALLOW_ANONYMOUS is off: nobody could connect"
            )
        if self.port > 65535:
            raise ConfigError(f"OG_PORT={self.port}: not a port")
        if self.click_port > 65535:
            raise ConfigError(f"OG_CLICK_PORT={self.click_port}: not a port")
        if self.click_port and self.click_port == self.port:
            raise ConfigError(f"OG_CLICK_PORT={self.click_port}: the same as OG_PORT")
        if self.redis_cluster_nodes:
            try:
                redis_target(self.redis_url, self.redis_cluster_nodes)
            except RedisTargetError as exc:
                raise ConfigError(f"OG_REDIS_CLUSTER_NODES: {exc}") from None
        try:
            ws_origins(self.shell_connect_src)
        except ValueError as exc:
            raise ConfigError(f"OG_SHELL_CONNECT_SRC: {exc}") from None

    @property
    def node_name(self) -> str:
        return self.node or socket.gethostname()

    @property
    def shell_connect_origins(self) -> tuple[str, ...]:
        return ws_origins(self.shell_connect_src)

    @property
    def history_ms(self) -> int:
        return int(self.history_s * 1000)


def _check_field(f: Field, value: object) -> None:
    env, minimum, choices = f.metadata["env"], f.metadata["min"], f.metadata.get("choices")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{env}={value}: must be a finite number")
    if minimum is not None and value < minimum:  # type: ignore[operator]
        raise ConfigError(f"{env}={value}: must be at least {minimum}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{env}={value!r}: must be one of {', '.join(choices)}")


def _convert(name: str, env: str, kind: type, raw: str) -> object:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{env}={raw!r}: not a valid {kind.__name__} for {name}") from None


def describe() -> list[tuple[str, str, str]]:
    """(env var, default, meaning) of every worker setting."""
    return Settings.describe()
