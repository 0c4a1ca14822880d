"""`oddsgate webhooks ...`: the operator's interface to partner endpoints and dead letters.

The same operations are on every worker's admin API (`/admin/webhooks...`,
attribution/admin.py); both call webhooks/operations.py. Every command reads
OG_REDIS_URL (or --redis-url). Bad input is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import orjson
from redis.exceptions import RedisError

from gateway.config import ConfigError
from supervisor.redact import shown_url, unreachable

log = logging.getLogger("oddsgate.webhooks")
_STOP_GRACE_S = 5.0


def add_webhooks_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="the region's Redis (OG_REDIS_URL, or the cluster "
                        "of OG_REDIS_CLUSTER_NODES); redis-cluster://host:port,... for a cluster")
    sub = parser.add_subparsers(dest="webhooks_command", required=True)
    add = sub.add_parser("add", help="register a partner's webhook (prints its secret last) "
                         "or postback")
    add.add_argument("--partner", required=True, help="partner id ([A-Za-z0-9_-]{1,32})")
    target = add.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="signed JSON webhook: POSTed to this URL")
    target.add_argument("--postback", help="GET URL template with macros {click_id} {event} "
                        "{amount} {currency} {sub1}..{sub5} {conversion_id}")
    add.add_argument("--events", help="comma-separated event types (default: all)")
    listing = sub.add_parser("list", help="endpoints with their counters and breaker state")
    listing.add_argument("--json", action="store_true", help="one JSON object a line")
    for name, text in (("disable", "stop delivering to an endpoint"),
                       ("enable", "deliver to an endpoint again"),
                       ("rotate-secret", "a new secret; the old one still signs during the "
                        "overlap (OG_WEBHOOKS_ROTATION_OVERLAP_S)")):
        command = sub.add_parser(name, help=text)
        command.add_argument("endpoint", help="endpoint id (ep_...)")
    dead = sub.add_parser("dead-letters", help="deliveries that exhausted their retries")
    dead.add_argument("--partner")
    dead.add_argument("--json", action="store_true", help="one JSON object a line")
    replay = sub.add_parser("replay", help="send dead letters again, same webhook-id")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("webhook_id", nargs="?", help="a dead letter's webhook-id (msg_...)")
    which.add_argument("--partner", help="every dead letter of this partner")
    sub.add_parser("run", help="the dispatcher: conversions to partners, retried, never lost")


def run_webhooks(args: argparse.Namespace) -> int:
    from redis_contract import target

    try:  # OG_REDIS_CLUSTER_NODES names a cluster instead (redis_contract/target.py)
        url = args.redis_url or target.redis_target(os.environ.get("OG_REDIS_URL", ""))
    except target.RedisTargetError as exc:
        raise ConfigError(str(exc)) from None
    if not url:
        raise ConfigError("OG_REDIS_URL: the region's Redis is required (or --redis-url)")
    if args.webhooks_command == "run":
        return _run_dispatcher(url)
    try:
        return asyncio.run(_admin(url, args))
    except unreachable() as exc:
        print(f"oddsgate webhooks: cannot reach Redis at {shown_url(url)}: {exc}",
              file=sys.stderr)
        return 1


def _run_dispatcher(url: str) -> int:
    import uvloop

    from webhooks.dispatcher import serve
    from webhooks.settings import WebhookSettings

    settings = WebhookSettings.from_env()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        serving = asyncio.create_task(serve(url, settings, stop))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            stopping.cancel()
            serving.result()  # its error, if it ended on one
            return
        done, _ = await asyncio.wait({serving}, timeout=_STOP_GRACE_S)
        if not done:
            # Everything is in Redis, each change atomic: leaving now loses nothing (what
            # was in hand is due again after its lease), so a stuck call never holds a stop.
            log.warning("dispatcher not stopped after %g s; exiting now", _STOP_GRACE_S)
            logging.shutdown()
            os._exit(0)

    try:
        uvloop.run(main())
    except (*unreachable(), RedisError) as exc:
        print(f"oddsgate webhooks run: {exc}", file=sys.stderr)
        return 1
    return 0


def _fail(message: str) -> int:
    print(f"oddsgate webhooks: {message}", file=sys.stderr)
    return 2


async def _admin(url: str, args: argparse.Namespace) -> int:
    from redis_contract import target
    from webhooks import operations as ops
    from webhooks.store import HookStore

    redis = target.async_client(url)
    store = HookStore(redis)
    command = args.webhooks_command
    try:
        if command == "add":
            row = await ops.add(store, args.partner, url=args.url, postback=args.postback,
                                events=args.events)
            print(f"endpoint {row['id']} ({row['kind']}) for partner {row['partner']}: "
                  f"{row['url']}")
            if "secret" in row:
                print(row["secret"])
            return 0
        if command == "list":
            return _list(await ops.rows(store), args.json)
        if command in ("disable", "enable"):
            row = await ops.set_enabled(store, args.endpoint, command == "enable")
            print(f"endpoint {row['id']}: {'enabled' if command == 'enable' else 'disabled'}")
            return 0
        if command == "rotate-secret":
            row, secret, overlap = await ops.rotate_secret(store, args.endpoint)
            print(f"endpoint {row['id']}: new secret; the previous one still signs for "
                  f"{overlap:g} s")
            print(secret)
            return 0
        if command == "dead-letters":
            letters = await ops.dead_letters(store, args.partner)
            for letter in letters:
                if args.json:
                    print(orjson.dumps(letter).decode())
                else:
                    last = letter["attempts"][-1] if letter["attempts"] else {}
                    print(f"{letter['webhook_id']}  partner={letter['partner']} "
                          f"endpoint={letter['endpoint']} type={letter['type']} "
                          f"attempts={len(letter['attempts'])} last_status={last.get('status')} "
                          f"last_error={last.get('error')}")
            if not args.json:
                print(f"{len(letters)} dead letter(s)")
            return 0
        if command == "replay":
            moved = await ops.replay(store, args.webhook_id, args.partner)
            print(f"{len(moved)} dead letter(s) due again, with their original webhook-id")
            return 0
        raise AssertionError(command)
    except ops.OperationError as exc:
        hint = " (see `oddsgate webhooks list`)" if exc.field == "endpoint" and \
            exc.status == 404 else ""
        return _fail(f"{exc.field}: {exc}{hint}")
    finally:
        await redis.aclose()


def _list(rows: list[dict], as_json: bool) -> int:
    for row in rows:
        if as_json:
            print(orjson.dumps(row).decode())
        else:
            print(f"{row['id']}  partner={row['partner']} {row['kind']} {row['url']} "
                  f"events={','.join(row['events'])} [{row['state']}] "
                  f"delivered={row['delivered']} failed={row['failed']} "
                  f"retrying={row['retrying']} dead={row['dead']} breaker={row['breaker']} "
                  f"secrets={row['secrets']}")
    if not as_json:
        print(f"{len(rows)} endpoint(s)")
    return 0
