"""Where a process's Redis is: one server, or a Redis Cluster.

Every process of a node passes its Redis around as one string (the
supervisor hands it to workers and services as `OG_REDIS_URL`, the CLIs take
it as `--redis-url`), so a cluster is written as a string too:
`redis-cluster://host:port,host:port` names its seed nodes. The operator
sets `OG_REDIS_CLUSTER_NODES=host:port,host:port` (README, settings), which
`redis_target()` turns into that string; clients are made here and nowhere
else, so a process that runs on one server runs on a cluster unchanged.

A cluster works because every multi-key step keeps its keys in one slot:
a topic's keys carry the topic as their hash tag (redis_contract), and the
attribution keys share theirs (attribution/keys.py).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a client is made: `oddsgate config` loads no redis
    import redis
    import redis.asyncio as aioredis

CLUSTER_SCHEME = "redis-cluster://"
CLUSTER_ENV = "OG_REDIS_CLUSTER_NODES"


class RedisTargetError(ValueError):
    """A Redis address that cannot be used; the message says what is wrong."""


def parse_nodes(text: str) -> list[tuple[str, int]]:
    """`host:port,host:port` (IPv6 as `[addr]:port`) as (host, port) pairs."""
    nodes = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RedisTargetError(f"{part!r} is not host:port")
        nodes.append((host, int(port)))
    if not nodes:
        raise RedisTargetError("no cluster node given (host:port,host:port)")
    return nodes


def cluster_url(nodes: str) -> str:
    """The one-string form of a cluster's seed nodes."""
    pairs = parse_nodes(nodes)
    return CLUSTER_SCHEME + ",".join(
        f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in pairs)


def is_cluster(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEME)


def cluster_nodes(url: str) -> list[tuple[str, int]]:
    if not is_cluster(url):
        raise RedisTargetError(f"{url!r} is not a {CLUSTER_SCHEME} address")
    return parse_nodes(url[len(CLUSTER_SCHEME):].rstrip("/"))


def redis_target(url: str = "", nodes: str | None = None) -> str:
    """The Redis a process uses: the cluster when `OG_REDIS_CLUSTER_NODES` (or
    `nodes`) names one, else `url`. Both at once is a mistake worth stopping on."""
    nodes = os.environ.get(CLUSTER_ENV, "") if nodes is None else nodes
    if nodes.strip():
        if url and not is_cluster(url):
            raise RedisTargetError(f"both OG_REDIS_URL ({url}) and {CLUSTER_ENV} are set; "
                                   "set one")
        return cluster_url(nodes)
    return url


def async_client(url: str, **kwargs: Any) -> aioredis.Redis | aioredis.RedisCluster:
    """An asyncio client for a server URL or a `redis-cluster://` address."""
    import redis.asyncio as aioredis
    from redis.asyncio.cluster import ClusterNode as AsyncClusterNode

    if is_cluster(url):
        startup = [AsyncClusterNode(h, p) for h, p in cluster_nodes(url)]
        return aioredis.RedisCluster(startup_nodes=startup, **kwargs)
    return aioredis.Redis.from_url(url, **kwargs)


def sync_client(url: str, **kwargs: Any) -> redis.Redis | redis.RedisCluster:
    """A blocking client, for the CLIs, likewise."""
    import redis
    from redis.cluster import ClusterNode

    if is_cluster(url):
        startup = [ClusterNode(h, p) for h, p in cluster_nodes(url)]
        return redis.RedisCluster(startup_nodes=startup, **kwargs)
    return redis.Redis.from_url(url, **kwargs)

