"""Where a node keeps its private files, and the Redis it runs when none is given."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from gateway.config import ConfigError, Settings
from redis_contract.target import redis_target
from supervisor.embedded_redis import EmbeddedRedis
from supervisor.private import private_dir


def runtime_path(settings: Settings) -> Path:
    """OG_RUNTIME_DIR, else $XDG_RUNTIME_DIR/oddsgate, else /tmp/oddsgate-$UID; not created."""
    return _runtime_path(settings.runtime_dir)


def _runtime_path(configured: str) -> Path:
    if configured:
        return Path(configured)
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "oddsgate"
    return Path(f"/tmp/oddsgate-{os.getuid()}")


def node_redis_url() -> str:
    """The Redis a command-line tool uses without --redis-url: OG_REDIS_URL, or the
    cluster of OG_REDIS_CLUSTER_NODES, else the unix socket of the embedded Redis of
    the node on this host (its runtime dir as `runtime_path` finds it), so a tool run
    beside a node finds its Redis with no flags. Both variables set is the mistake the
    node refuses to start on: RedisTargetError, which the tools turn into exit 2."""
    url = redis_target(os.environ.get("OG_REDIS_URL", ""))
    if url:
        return url
    runtime = os.path.abspath(_runtime_path(os.environ.get("OG_RUNTIME_DIR", "")))
    return f"unix://{runtime}/redis/redis.sock"


def runtime_dir(settings: Settings) -> Path:
    """The runtime dir, created 0700 or checked to be ours alone (ConfigError otherwise).

    The /tmp default is a name other users can take first; see supervisor/private.py.
    """
    return private_dir(runtime_path(settings))


@contextlib.contextmanager
def redis_for(settings: Settings) -> Iterator[str]:
    """The Redis to use: the cluster (OG_REDIS_CLUSTER_NODES) as a `redis-cluster://`
    address, the configured URL, or an embedded server's for the block."""
    if settings.redis_cluster_nodes:
        yield redis_target(settings.redis_url, settings.redis_cluster_nodes)
        return
    if settings.redis_url:
        yield settings.redis_url
        return
    redis_dir = runtime_dir(settings) / "redis"
    try:
        # persistent: clicks answered with a 302 must survive a restart of this Redis
        embedded = EmbeddedRedis(redis_dir, persist=True)
    except ValueError as exc:  # a socket path too long for sun_path
        raise ConfigError(f"OG_RUNTIME_DIR: {exc}") from None
    with embedded:
        yield embedded.url
