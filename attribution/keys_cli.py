"""`oddsgate keys`: add, list and revoke operator API keys (PROTOCOL.md §10).

`add NAME` prints a new key once, on its last line, and stores only its
SHA-256 (attribution/operator_keys.py), so the key cannot be shown again:
an operator who loses it revokes the name and adds another. `list` shows
names and when they were added, never keys. `revoke NAME` deletes the
hash; every worker stops taking the key within its cache's refresh time
(operator_keys.REFRESH_S).

Exit codes as for every `oddsgate` command: 0 done, 1 Redis unreachable
(one line), 2 bad usage (a bad or taken name on add, an unknown one on
revoke).
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from importlib import resources

import redis

from attribution.keys import OPERATOR_KEYS, OPERATOR_KEYS_ADDED
from attribution.operator_keys import check_name, key_hash, new_key
from redis_contract import target
from supervisor.redact import shown_url, unreachable

ADD_SCRIPT = resources.files("attribution").joinpath("operator_key_add.lua").read_text()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `oddsgate keys`, added lazily by supervisor/cli.py."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--redis-url",
                        help="redis:// or unix:// URL, or redis-cluster://host:port,... "
                        "(default: $OG_REDIS_URL or $OG_REDIS_CLUSTER_NODES, else the "
                        "embedded Redis's socket in the node's runtime dir)")
    actions = parser.add_subparsers(dest="keys_command", required=True)
    add = actions.add_parser("add", help="make a key for NAME and print it once")
    add.add_argument("name", type=_name, metavar="NAME")
    actions.add_parser("list", help="key names and when they were added")
    revoke = actions.add_parser("revoke", help="delete NAME's key; workers refuse it "
                                "within seconds")
    revoke.add_argument("name", type=_name, metavar="NAME")


def _name(raw: str) -> str:
    try:
        return check_name(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from supervisor.runtime import node_redis_url

    client = None
    try:
        if args.redis_url is None:
            try:
                args.redis_url = node_redis_url()
            except target.RedisTargetError as exc:  # OG_REDIS_URL and the cluster both set
                print(f"oddsgate keys: {exc}", file=sys.stderr)
                return 2
        # A cluster's client finds its nodes as it is made: unreachable is raised here.
        client = target.sync_client(args.redis_url, socket_connect_timeout=2.0,
                                    socket_timeout=10.0)
        if args.keys_command == "add":
            return _add(client, args.name)
        if args.keys_command == "list":
            return _list(client)
        return _revoke(client, args.name)
    except ValueError as exc:  # not a URL redis-py or target.py takes
        print(f"oddsgate keys: --redis-url: {exc}", file=sys.stderr)
        return 2
    except unreachable() as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"oddsgate keys: cannot reach Redis at {shown_url(args.redis_url)}: {reason}",
              file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()


def _add(client: redis.Redis | redis.RedisCluster, name: str) -> int:
    key = new_key()
    added = client.eval(ADD_SCRIPT, 2, OPERATOR_KEYS, OPERATOR_KEYS_ADDED,
                        name, key_hash(key), str(int(time.time())))
    if not added:
        print(f"oddsgate keys: {name!r} exists; revoke it first to replace its key",
              file=sys.stderr)
        return 2
    print(f"operator key {name!r} added; it is shown once, store it now:")
    print(key)
    return 0


def _list(client: redis.Redis | redis.RedisCluster) -> int:
    names = sorted(n.decode() for n in client.hkeys(OPERATOR_KEYS))
    added = client.hgetall(OPERATOR_KEYS_ADDED)
    print(f"{'name':40} added (UTC)")
    for name in names:
        print(f"{name:40} {_when(added.get(name.encode()))}")
    return 0


def _revoke(client: redis.Redis | redis.RedisCluster, name: str) -> int:
    with client.pipeline(transaction=True) as pipe:
        pipe.hdel(OPERATOR_KEYS, name)
        pipe.hdel(OPERATOR_KEYS_ADDED, name)
        deleted, _ = pipe.execute()
    if not deleted:
        print(f"oddsgate keys: no key named {name!r}", file=sys.stderr)
        return 2
    print(f"operator key {name!r} revoked")
    return 0


def _when(raw: bytes | None) -> str:
    if raw is None:
        return "-"
    return datetime.fromtimestamp(int(raw), UTC).strftime("%Y-%m-%d %H:%M:%S")
