"""`oddsgate links`: add, pause, resume and list tracking links.

Writes go to Redis through the same store as the admin API
(attribution/link_store.py), so every worker's cache follows at once.
Exit codes: 0 done; 2 bad input (one line naming the field); 1 Redis
unreachable.
"""

from __future__ import annotations

import argparse
import sys

import orjson

from attribution.link_store import LinkConflict, LinkStore
from attribution.links import DEFAULT_CLICK_PARAM, Link, LinkError
from redis_contract import target
from supervisor.redact import shown_url, unreachable

DESCRIPTION = ("Tracking links (GET /t/{code}): add one, pause or resume it, list them. "
               "Redis: --redis-url, else OG_REDIS_URL, else the node's embedded Redis.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.add_argument("--redis-url", help="Redis URL, or redis-cluster://host:port,... "
                        "(default OG_REDIS_URL, else the embedded Redis of OG_RUNTIME_DIR)")
    actions = parser.add_subparsers(dest="links_command", required=True)
    add = actions.add_parser("add", help="add a link")
    add.add_argument("code", help="1-64 of A-Z a-z 0-9 _ -: the {code} of /t/{code}")
    add.add_argument("--partner", required=True)
    add.add_argument("--campaign", required=True)
    add.add_argument("--creative", required=True)
    add.add_argument("--url", required=True, help="destination, http:// or https://")
    add.add_argument("--subids", action="store_true",
                     help="pass sub1..sub5 of the tracking URL on to the destination")
    add.add_argument("--click-param", default=DEFAULT_CLICK_PARAM,
                     help=f"query parameter of the click id (default {DEFAULT_CLICK_PARAM})")
    add.add_argument("--paused", action="store_true", help="add it paused (410 until resumed)")
    for name, what in (("pause", "pause a link: /t/{code} answers 410"),
                       ("resume", "resume a paused link")):
        action = actions.add_parser(name, help=what)
        action.add_argument("code")
    listing = actions.add_parser("list", help="every link")
    listing.add_argument("--json", action="store_true", help="one JSON array")


def redis_url(args: argparse.Namespace) -> str:
    from supervisor.runtime import node_redis_url

    return args.redis_url or node_redis_url()


def run(args: argparse.Namespace) -> int:
    try:
        link = _link(args) if args.links_command == "add" else None
    except LinkError as exc:
        print(f"oddsgate links: {exc}", file=sys.stderr)
        return 2
    try:
        url = redis_url(args)
    except target.RedisTargetError as exc:  # OG_REDIS_URL and OG_REDIS_CLUSTER_NODES both set
        print(f"oddsgate links: {exc}", file=sys.stderr)
        return 2
    client = None
    try:
        # a cluster's client finds its nodes as it is made: unreachable is raised here
        client = target.sync_client(url, socket_connect_timeout=5, socket_timeout=5)
        return _perform(args, LinkStore(client), link)
    except LinkError as exc:
        print(f"oddsgate links: {exc}", file=sys.stderr)
        return 2
    except LinkConflict as exc:
        print(f"oddsgate links: {exc}", file=sys.stderr)
        return 1
    except unreachable() as exc:
        print(f"oddsgate links: Redis at {shown_url(url)} unreachable: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # not a URL redis-py or target.py takes
        print(f"oddsgate links: --redis-url: {exc}", file=sys.stderr)
        return 2
    finally:
        if client is not None:
            client.close()


def _link(args: argparse.Namespace) -> Link:
    return Link.create(args.code, args.partner, args.campaign, args.creative, args.url,
                       args.click_param, args.subids, not args.paused)


def _perform(args: argparse.Namespace, store: LinkStore, link: Link | None) -> int:
    command = args.links_command
    if link is not None:
        store.add(link)
        print(f"added {link.code} -> {link.url}" + ("" if link.active else " (paused)"))
    elif command in ("pause", "resume"):
        changed = store.set_active(args.code, command == "resume")
        print(f"{changed.code} {'active' if changed.active else 'paused'}")
    else:
        links = store.all()
        ordered = [links[code] for code in sorted(links)]
        if args.json:
            print(orjson.dumps([each.to_dict() for each in ordered]).decode())
        else:
            for each in ordered:
                print(f"{each.code:20} {'active' if each.active else 'paused':7} "
                      f"{each.partner:12} {each.campaign:14} {each.creative:14} "
                      f"{'subids' if each.subids else '-':7} {each.click_param:10} {each.url}")
    return 0
