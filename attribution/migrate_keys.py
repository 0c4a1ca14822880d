"""`python -m attribution.migrate_keys`: move a deployment's keys to their cluster names.

For Redis Cluster every key written beside another in one script or MULTI
took that key's hash tag (attribution/keys.py says why and which). A
deployment that ran before has its data under the old names; this moves it,
once, with the node stopped (a click recorded meanwhile under a new name
would make the move of that same name a conflict, reported, not merged):

  og:click:<id>              -> og:click:{og:clicks}:<id>      (TTL kept)
  og:dedupe:<code>:<digest>  -> og:dedupe:{og:clicks}:...      (TTL kept)
  og:conv:<id>               -> og:conv:{og:conversions}:<id>
  og:keys:added              -> og:keys:{og:keys}:added
  og:hooks:<name>            -> og:hooks:{og:conversions}:<name>
  og:in:<provider> (streams) -> og:in:{og:in}:<provider>       (og:in:origin stays)

Without the move, conversions of clicks made before the upgrade find no
index (`unknown_click`), a retried operator id is taken again, and the
webhook queue and dead letters are forgotten. Run it against the single
server before copying its data into a cluster, or against the cluster after
an import: a server moves each key with RENAMENX, a cluster (whose RENAME
stays within one slot) with DUMP, RESTORE (with the key's remaining TTL)
and DEL. A name already taken is left alone and reported. Running it again
moves nothing. Exit 0 when every old key moved (or none was there), 1 when
Redis is unreachable or a key could not move, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import redis

from aggregator.inputlog import INPUT_PREFIX
from attribution import keys
from redis_contract import target
from supervisor.redact import shown_url, unreachable
from webhooks import keys as hook_keys


@dataclass(frozen=True)
class Rename:
    """Old keys matching `pattern` (SCAN MATCH) move to `new(old)`; None: not one of ours."""

    pattern: str
    new: Callable[[str], str | None]
    stream_only: bool = False  # og:in:origin, a string, shares the old prefix


def _prefix(old: str, new: str) -> Callable[[str], str | None]:
    def rename(key: str) -> str | None:
        if not key.startswith(old) or key.startswith(new) or key[len(old):].startswith("{"):
            return None  # already moved (or another tag's key)
        return new + key[len(old):]

    return rename


RENAMES = (
    Rename("og:click:*", _prefix("og:click:", keys.CLICK_INDEX_PREFIX)),
    Rename("og:dedupe:*", _prefix("og:dedupe:", keys.DEDUPE_PREFIX)),
    Rename("og:conv:*", _prefix("og:conv:", keys.CONVERSION_PREFIX)),
    Rename("og:keys:added", lambda key: keys.OPERATOR_KEYS_ADDED if key == "og:keys:added"
           else None),
    Rename("og:hooks:*", _prefix("og:hooks:", hook_keys.PREFIX)),
    Rename("og:in:*", _prefix("og:in:", INPUT_PREFIX), stream_only=True),
)


@dataclass
class Report:
    moved: dict[str, int] = field(default_factory=dict)  # pattern -> keys moved
    taken: list[tuple[str, str]] = field(default_factory=list)  # (old, new) not moved

    def lines(self) -> Iterator[str]:
        for pattern, count in self.moved.items():
            yield f"{pattern}: {count} moved"
        for old, new in self.taken:
            yield f"not moved: {old} (its new name {new} exists)"


def migrate(client: redis.Redis | redis.RedisCluster, *, dry_run: bool = False) -> Report:
    """Move every old key to its new name; what moved and what could not."""
    cluster = isinstance(client, redis.RedisCluster)
    report = Report()
    for rule in RENAMES:
        moved = 0
        for raw in list(client.scan_iter(match=rule.pattern, count=1000)):
            old = raw.decode() if isinstance(raw, bytes) else raw
            new = rule.new(old)
            if new is None:
                continue
            if rule.stream_only and client.type(old) not in (b"stream", "stream"):
                continue
            if dry_run or _move(client, old, new, cluster):
                moved += 1
            else:
                report.taken.append((old, new))
        report.moved[rule.pattern] = moved
    return report


def _move(client: redis.Redis | redis.RedisCluster, old: str, new: str, cluster: bool) -> bool:
    if not cluster:
        return bool(client.renamenx(old, new))  # atomic; the TTL goes with the key
    if client.exists(new):
        return False
    dumped = client.dump(old)
    if dumped is None:  # expired meanwhile
        return True
    ttl = client.pttl(old)
    try:
        client.restore(new, max(ttl, 0), dumped)
    except redis.ResponseError as exc:
        if "BUSYKEY" in str(exc):
            return False
        raise
    client.delete(old)
    return True


def main(argv: list[str] | None = None) -> int:
    from supervisor.runtime import node_redis_url

    parser = argparse.ArgumentParser(prog="python -m attribution.migrate_keys",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url",
                        help="redis:// or unix:// URL, or redis-cluster://host:port,... "
                        "(default: $OG_REDIS_URL or $OG_REDIS_CLUSTER_NODES, else the "
                        "node's embedded Redis)")
    parser.add_argument("--dry-run", action="store_true", help="count, move nothing")
    args = parser.parse_args(argv)
    if args.redis_url is None:
        try:
            args.redis_url = node_redis_url()
        except target.RedisTargetError as exc:  # OG_REDIS_URL and the cluster both set
            print(f"migrate_keys: {exc}", file=sys.stderr)
            return 2
    client = None
    try:
        client = target.sync_client(args.redis_url, socket_connect_timeout=2.0,
                                    socket_timeout=30.0)
        report = migrate(client, dry_run=args.dry_run)
    except ValueError as exc:
        print(f"migrate_keys: --redis-url: {exc}", file=sys.stderr)
        return 2
    except unreachable() as exc:
        print(f"migrate_keys: cannot reach Redis at {shown_url(args.redis_url)}: {exc}",
              file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
    for line in report.lines():
        print(line)
    return 1 if report.taken else 0


if __name__ == "__main__":
    sys.exit(main())
