"""`oddsgate`: the one binary operators run.

Subcommands: `run` (a node: supervisor, one worker per core, optionally
HAProxy), `status`, `drain`, `undrain`, `reload` (deploy scripts, through
the node's control socket), `haproxy-config` (render the HAProxy file),
`worker` (one gateway worker), `feed` (the synthetic feed), `aggregate` (a
region's aggregator), `providers` (the synthetic providers), `token` (mint a
session token), `keys` (operator API keys for conversions), `links`
(tracking links), `config` (every setting), `demo` (a node with live
traffic). One argparse tree holds them all (`build_parser()`); the flags of
`haproxy-config`, `feed`, `keys` and `links` are declared beside their code
(supervisor/haproxy_config.py, feed/synthetic/cli.py, attribution/keys_cli.py,
attribution/links_cli.py).

Exit codes: 0 done; 1 failed (a drain or reload that did not complete in
its timeout, a node whose workers all failed); 2 bad usage or
configuration; 3 no supervisor answers on the control socket.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from gateway.config import ConfigError, Settings, describe
from supervisor import haproxy_config
from supervisor.embedded_redis import EmbeddedRedisError

# The role a command's process has in its JSON log lines (supervisor/logformat.py);
# a command not listed here is named after itself ("worker", "demo", "feed", ...).
ROLES = {"run": "supervisor"}


def setup_logging(verbose: bool = False, *, log_format: str | None = None,
                  role: str = "oddsgate") -> None:
    """stderr logging for every subcommand, in OG_LOG_FORMAT unless `log_format` is given;
    players' tokens are redacted from all of it."""
    from supervisor import logformat

    logformat.configure(log_format or logformat.configured_format(), verbose=verbose,
                        role=role)


def _worker(args: argparse.Namespace) -> int:
    from gateway.worker import run
    from supervisor.logformat import set_process
    from supervisor.runtime import redis_for

    settings = Settings.from_env(
        host=args.host, port=args.port, redis_url=args.redis_url,
        worker_index=args.index, allow_anonymous=True if args.anonymous else None,
    )
    set_process("worker", settings.worker_index)
    with redis_for(settings) as url:
        settings.redis_url = url
        return run(settings)


def _control_path(args: argparse.Namespace):
    from supervisor.runtime import runtime_dir

    return runtime_dir(Settings.from_env(allow_anonymous=True)) / "control.sock"


def _control(args: argparse.Namespace, command: dict) -> int:
    import orjson

    from supervisor.control import ControlUnavailable, request

    timeout = float(command.get("timeout", 60)) + 5
    try:
        reply = request(_control_path(args), command, timeout=timeout)
    except ControlUnavailable as exc:
        print(f"oddsgate: {exc}", file=sys.stderr)
        return 3
    except TimeoutError:
        print("oddsgate: the supervisor did not answer in time", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(orjson.dumps(reply, option=orjson.OPT_INDENT_2).decode())
    else:
        _print_status(reply)
    if not reply.get("ok"):
        print(f"oddsgate: {reply.get('error') or reply.get('detail') or 'failed'}"
              + (" (timed out)" if reply.get("timed_out") else ""), file=sys.stderr)
        return 2 if "error" in reply and str(reply["error"]).startswith("bad request") else 1
    return 0


def _print_status(reply: dict) -> None:
    if "workers" not in reply:
        return
    print(f"{'worker':>6} {'pid':>8} {'port':>6} {'phase':>10} {'agent':>9} "
          f"{'conns':>7} {'backpr':>6} {'subs':>7} {'restarts':>8}")
    for w in reply["workers"]:
        print(f"{w['index']:>6} {w['pid'] or '-':>8} {w['port']:>6} {w['phase']:>10} "
              f"{w['agent'].split()[-1]:>9} {w['connections']:>7} "
              f"{w['connections_backpressure']:>6} {w['subscriptions']:>7} {w['restarts']:>8}")
    if reply.get("haproxy"):
        print("haproxy: " + "  ".join(f"{k}={v}" for k, v in sorted(reply["haproxy"].items())))
    print(f"connections {reply['connections']}  back-pressure share "
          f"{reply['backpressure_share']:.1%}  breaker "
          f"{'OPEN (shedding)' if reply.get('breaker_open') else 'closed'} "
          f"trips {reply.get('breaker_trips', 0)}")


def _status(args: argparse.Namespace) -> int:
    return _control(args, {"cmd": "status"})


def _drain(args: argparse.Namespace) -> int:
    return _control(args, {"cmd": "drain",
                           "worker": "all" if args.all or args.region else args.worker,
                           "region": args.region, "wait": args.wait, "timeout": args.timeout})


def _undrain(args: argparse.Namespace) -> int:
    return _control(args, {"cmd": "undrain", "worker": "all" if args.worker is None
                           else args.worker})


def _reload(args: argparse.Namespace) -> int:
    return _control(args, {"cmd": "reload", "timeout": args.timeout})


def _run(args: argparse.Namespace) -> int:
    from supervisor.run import run_node

    return run_node(args)


def _token(args: argparse.Namespace) -> int:
    from gateway.auth import issue_token
    from gateway.topics import is_partner_id

    settings = Settings.from_env(allow_anonymous=True)
    secret = args.secret or settings.jwt_secret
    if not secret:
        print("oddsgate token: no secret (set OG_JWT_SECRET or pass --secret)", file=sys.stderr)
        return 2
    if args.partner is not None and not is_partner_id(args.partner):
        print(f"oddsgate token: --partner {args.partner!r}: expected 1-32 of [A-Za-z0-9_-]",
              file=sys.stderr)
        return 2
    print(issue_token(secret, args.player, args.session, args.ttl,
                      topics=args.topics.split(",") if args.topics else None,
                      partner=args.partner))
    return 0


def _config(_args: argparse.Namespace) -> int:
    for env, default, doc in describe():
        print(f"{env:28} {default:14} {doc}")
    return 0


def _feed_flags(parser: argparse.ArgumentParser) -> None:
    from feed.synthetic import cli as feed_cli

    parser.description = feed_cli.DESCRIPTION
    feed_cli.add_arguments(parser)


def _feed(args: argparse.Namespace) -> int:
    from feed.synthetic.cli import run

    return run(args)


def _links_flags(parser: argparse.ArgumentParser) -> None:
    from attribution import links_cli

    links_cli.add_arguments(parser)


def _links(args: argparse.Namespace) -> int:
    from attribution.links_cli import run

    return run(args)


def _aggregate_flags(parser: argparse.ArgumentParser) -> None:
    from aggregator.cli import add_aggregate_arguments

    add_aggregate_arguments(parser)


def _aggregate(args: argparse.Namespace) -> int:
    from aggregator.cli import run_aggregate

    return run_aggregate(args)


def _webhooks_flags(parser: argparse.ArgumentParser) -> None:
    from webhooks.cli import add_webhooks_arguments

    add_webhooks_arguments(parser)


def _webhooks(args: argparse.Namespace) -> int:
    from webhooks.cli import run_webhooks

    return run_webhooks(args)


def _providers_flags(parser: argparse.ArgumentParser) -> None:
    from aggregator.cli import add_providers_arguments

    add_providers_arguments(parser)


def _providers(args: argparse.Namespace) -> int:
    from aggregator.cli import run_providers

    return run_providers(args)


def _keys_flags(parser: argparse.ArgumentParser) -> None:
    from attribution.keys_cli import add_arguments

    add_arguments(parser)


def _keys(args: argparse.Namespace) -> int:
    from attribution.keys_cli import run

    return run(args)


def _stats_run(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from attribution.stats_service import StatsSettings, serve

    settings = StatsSettings.from_env()
    from redis_contract.target import RedisTargetError, redis_target
    try:
        url = redis_target(args.redis_url or os.environ.get("OG_REDIS_URL", ""))
    except RedisTargetError as exc:
        raise ConfigError(f"OG_REDIS_CLUSTER_NODES: {exc}") from None
    if not url:
        raise ConfigError("OG_REDIS_URL: the Redis of og:clicks and og:conversions is "
                          "required (or --redis-url, or OG_REDIS_CLUSTER_NODES)")
    asyncio.run(serve(url, settings))
    return 0


class _Subcommand(argparse.ArgumentParser):
    """A subcommand's parser; `flags`, if given, adds its flags when that subcommand is used.

    The feed's flags are declared beside the feed (feed/synthetic/cli.py),
    whose imports (redis, uvloop) take longer than all of `oddsgate status`;
    added lazily, they cost nothing to the commands that do not use them.
    """

    def __init__(self, *args: Any,
                 flags: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._add_flags = flags

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None,
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._add_flags is not None:
            add_flags, self._add_flags = self._add_flags, None
            add_flags(self)
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oddsgate", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Subcommand)

    run = sub.add_parser("run", help="run a node: supervisor and one worker per core")
    run.add_argument("--workers", type=int, help="worker processes (OG_WORKERS; 0: per core)")
    run.add_argument("--base-port", type=int, help="first worker port (OG_BASE_PORT)")
    run.add_argument("--haproxy", action="store_true", help="start HAProxy in front (OG_HAPROXY)")
    run.add_argument("--bind", help="HAProxy frontend HOST:PORT (OG_HAPROXY_BIND)")
    run.add_argument("--anonymous", action="store_true",
                     help="let players in without a token (OG_ALLOW_ANONYMOUS)")
    run.set_defaults(func=_run)

    status = sub.add_parser("status", help="workers, connections and drain states of the node")
    status.add_argument("--json", action="store_true", help="the whole status as JSON")
    status.set_defaults(func=_status)

    drain = sub.add_parser("drain", help="send a worker's players elsewhere, take no new ones")
    which = drain.add_mutually_exclusive_group(required=True)
    which.add_argument("--worker", type=int, help="worker index")
    which.add_argument("--all", action="store_true", help="every worker")
    which.add_argument("--region", action="store_true",
                       help="every worker, its players told to move to another region "
                       "(reconnect reason region_drain): run on each node of a region "
                       "before deploying it (README, Regions)")
    drain.add_argument("--wait", action="store_true", help="return once it holds no player")
    drain.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits")
    drain.add_argument("--json", action="store_true")
    drain.set_defaults(func=_drain)

    undrain = sub.add_parser("undrain", help="let drained workers take players again")
    undrain.add_argument("--worker", type=int, help="worker index (default: all)")
    undrain.add_argument("--json", action="store_true")
    undrain.set_defaults(func=_undrain)

    reload = sub.add_parser("reload", help="replace every worker, one at a time, no downtime")
    reload.add_argument("--timeout", type=float, default=120.0,
                        help="seconds each worker's players get to move")
    reload.add_argument("--json", action="store_true")
    reload.set_defaults(func=_reload)

    haproxy = sub.add_parser(
        "haproxy-config", help="render the HAProxy configuration",
        description="Print the HAProxy config for this node's workers (checked with "
                    "`haproxy -c` when --check is given).")
    haproxy_config.add_arguments(haproxy)
    haproxy.set_defaults(func=haproxy_config.run)

    worker = sub.add_parser("worker", help="run one gateway worker")
    worker.add_argument("--host", help="listen address (OG_HOST)")
    worker.add_argument("--port", type=int, help="listen port (OG_PORT)")
    worker.add_argument("--redis-url", help="Redis URL (OG_REDIS_URL); none: embedded Redis")
    worker.add_argument("--index", type=int, help="worker number (OG_WORKER_INDEX)")
    worker.add_argument("--anonymous", action="store_true",
                        help="let players in without a token (OG_ALLOW_ANONYMOUS)")
    worker.set_defaults(func=_worker)

    feed = sub.add_parser("feed", help="run the synthetic feed", flags=_feed_flags)
    feed.set_defaults(func=_feed)

    aggregate = sub.add_parser("aggregate", help="run one region's aggregator",
                               flags=_aggregate_flags)
    aggregate.set_defaults(func=_aggregate)
    providers = sub.add_parser("providers", help="run the synthetic providers into regions",
                               flags=_providers_flags)
    providers.set_defaults(func=_providers)

    webhooks = sub.add_parser("webhooks", help="partner webhooks and postbacks: endpoints, "
                              "the dispatcher, dead letters", flags=_webhooks_flags)
    webhooks.set_defaults(func=_webhooks)

    token = sub.add_parser("token", help="mint a session token")
    token.add_argument("--player", default="demo-player")
    token.add_argument("--session", default="demo-session")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires")
    token.add_argument("--topics", help="comma-separated topic prefixes the token allows")
    token.add_argument("--secret", help="HS256 secret (default OG_JWT_SECRET)")
    token.add_argument("--partner", help="a partner's statistics session: may follow "
                       "stats:{partner} (and odds topics only as --topics allows)")
    token.set_defaults(func=_token)

    keys = sub.add_parser("keys", help="add, list or revoke operator API keys (conversions)",
                          flags=_keys_flags)
    keys.set_defaults(func=_keys)
    stats = sub.add_parser("stats", help="partner statistics (PROTOCOL.md §12)")
    stats_sub = stats.add_subparsers(dest="stats_command", required=True)
    stats_run = stats_sub.add_parser(
        "run", help="count og:clicks and og:conversions exactly once and publish "
        "the partners' rows to stats:{partner}")
    stats_run.add_argument("--redis-url", help="default OG_REDIS_URL")
    stats_run.set_defaults(func=_stats_run)

    config = sub.add_parser("config", help="list every setting, its env var and default")
    config.set_defaults(func=_config)

    demo = sub.add_parser("demo", help="a node on this machine with a feed and live counts")
    demo.add_argument("--rate", type=float, default=200.0, help="feed events per second")
    demo.add_argument("--clients", type=int, default=50, help="demo players")
    demo.add_argument("--duration", type=float, default=None, help="seconds, default forever")
    demo.add_argument("--port", type=int, default=8000,
                      help="HAProxy frontend port (region i: port + i)")
    demo.add_argument("--regions", type=int, default=1,
                      help="full regions to run, each with its Redis, input log, aggregator "
                      "and node; providers shared (README, Regions)")
    demo.add_argument("--no-players", action="store_true",
                      help="with --regions: start no synthetic players")
    demo.add_argument("--status-file", help="with --regions: write the regions' URLs, "
                      "process ids and a player token here once every region serves")
    demo.add_argument("--workers", type=int, default=1, help="with --regions: workers per region")
    demo.add_argument("--seed", type=int, default=7, help="with --regions: the providers' seed")
    demo.set_defaults(func=_demo)

    links = sub.add_parser("links", help="add, pause, resume or list tracking links (/t/)",
                           flags=_links_flags)
    links.set_defaults(func=_links)
    return parser


def _demo(args: argparse.Namespace) -> int:
    if args.regions < 1:
        raise ConfigError("--regions: at least 1")
    if args.regions > 1:
        from supervisor.regions_demo import run_regions_demo

        return run_regions_demo(args)
    if args.no_players or args.status_file:
        raise ConfigError("--no-players and --status-file go with --regions 2 or more")
    from supervisor.demo import run_demo

    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    """The exit code of `oddsgate ARGV`; argparse's own (2, or 0 for --help) on bad usage."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage and the error, or the help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        setup_logging(args.verbose, role=ROLES.get(args.command, args.command))
    except ConfigError as exc:  # OG_LOG_FORMAT: before anything could be logged
        print(f"oddsgate: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"oddsgate: {exc}", file=sys.stderr)
        return 2
    except EmbeddedRedisError as exc:  # a runtime failure: its message, not a traceback
        print(f"oddsgate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
