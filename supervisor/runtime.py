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
    if settings.runtime_dir:
        return Path(settings.runtime_dir)
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "oddsgate"
    return Path(f"/tmp/oddsgate-{os.getuid()}")


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
