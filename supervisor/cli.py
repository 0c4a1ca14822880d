"""`oddsgate`: the one binary operators run.

Subcommands: `worker` (one gateway worker), `feed` (the synthetic feed),
`token` (mint a session token for tests and demos), `config` (every
setting with its env var and default), `demo` (a whole node on this
machine with live traffic). Exit codes: 0 done, 1 runtime failure, 2 bad
usage or configuration.
"""

from __future__ import annotations

import argparse
import logging
import sys

from gateway.config import ConfigError, Settings, describe


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)


def _worker(args: argparse.Namespace) -> int:
    from gateway.worker import run
    from supervisor.runtime import redis_for

    settings = Settings.from_env(
        host=args.host, port=args.port, redis_url=args.redis_url,
        worker_index=args.index, allow_anonymous=True if args.anonymous else None,
    )
    with redis_for(settings) as url:
        settings.redis_url = url
        run(settings)
    return 0


def _token(args: argparse.Namespace) -> int:
    from gateway.auth import issue_token

    settings = Settings.from_env(allow_anonymous=True)
    secret = args.secret or settings.jwt_secret
    if not secret:
        print("oddsgate token: no secret (set OG_JWT_SECRET or pass --secret)", file=sys.stderr)
        return 2
    print(issue_token(secret, args.player, args.session, args.ttl,
                      topics=args.topics.split(",") if args.topics else None))
    return 0


def _config(_args: argparse.Namespace) -> int:
    for env, default, doc in describe():
        print(f"{env:28} {default:14} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oddsgate", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="run one gateway worker")
    worker.add_argument("--host", help="listen address (OG_HOST)")
    worker.add_argument("--port", type=int, help="listen port (OG_PORT)")
    worker.add_argument("--redis-url", help="Redis URL (OG_REDIS_URL); none: embedded Redis")
    worker.add_argument("--index", type=int, help="worker number (OG_WORKER_INDEX)")
    worker.add_argument("--anonymous", action="store_true",
                        help="let players in without a token (OG_ALLOW_ANONYMOUS)")
    worker.set_defaults(func=_worker)

    feed = sub.add_parser("feed", help="run the synthetic feed", add_help=False)
    feed.set_defaults(func=None)

    token = sub.add_parser("token", help="mint a session token")
    token.add_argument("--player", default="demo-player")
    token.add_argument("--session", default="demo-session")
    token.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires")
    token.add_argument("--topics", help="comma-separated topic prefixes the token allows")
    token.add_argument("--secret", help="HS256 secret (default OG_JWT_SECRET)")
    token.set_defaults(func=_token)

    config = sub.add_parser("config", help="list every setting, its env var and default")
    config.set_defaults(func=_config)

    demo = sub.add_parser("demo", help="a node on this machine with a feed and live counts")
    demo.add_argument("--rate", type=float, default=200.0, help="feed events per second")
    demo.add_argument("--clients", type=int, default=50, help="demo players")
    demo.add_argument("--duration", type=float, default=None, help="seconds, default forever")
    demo.add_argument("--port", type=int, default=8001, help="worker port")
    demo.set_defaults(func=_demo)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from supervisor.demo import run_demo

    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["feed"]:  # the feed owns its flags
        from feed.synthetic import main as feed_main

        return feed_main(argv[1:])
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"oddsgate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
