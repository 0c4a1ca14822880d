"""`oddsgate feed` (and `python -m feed.synthetic`): the synthetic feed from a shell.

Every flag is checked where argparse parses it (a rate, a partition map
file, a Redis URL, the history a topic keeps), so bad usage is refused
before anything connects: exit 2 with argparse's message. A Redis that does
not answer is one line and exit 1; done or stopped (SIGINT, SIGTERM) is 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
from collections.abc import Callable

import redis.asyncio as aioredis
import redis.exceptions
import uvloop

from feed.publisher import DEFAULT_HISTORY_MS, MIN_HISTORY_MS, Publisher
from feed.synthetic.model import DEFAULT_MARKETS_PER_LEAGUE, DEFAULT_TAIL_LEAGUES
from feed.synthetic.pacing import (
    DEFAULT_RATE,
    SPIKE_AFTER_S,
    SPIKE_FACTOR,
    SPIKE_SECONDS,
    FeedReport,
    Spike,
    SyntheticFeed,
)
from gateway.topics import PartitionMap
from redis_contract import target
from supervisor.redact import shown_url, unreachable

REDIS_URL_ENV = "OG_REDIS_URL"
DESCRIPTION = ("Publish a synthetic, seeded odds feed into Redis through the atomic publish "
               "contract, at a paced rate, until a duration or count is reached.")


def _number(kind: type, minimum: float, *, inclusive: bool) -> Callable[[str], float]:
    """An argparse type: a finite `kind` at least (or above) `minimum`."""
    noun = "an integer" if kind is int else "a number"
    bound = f"at least {minimum:g}" if inclusive else f"above {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not math.isfinite(value) or not (value >= minimum if inclusive else value > minimum):
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        return value

    return parse


_positive_float = _number(float, 0, inclusive=False)
_non_negative_float = _number(float, 0, inclusive=True)
_positive_int = _number(int, 1, inclusive=True)
_non_negative_int = _number(int, 0, inclusive=True)
_history_seconds = _number(float, MIN_HISTORY_MS / 1000, inclusive=True)


def _partition_map(path: str) -> PartitionMap:
    """An argparse type: the partition map in a JSON file."""
    try:
        return PartitionMap.load(path)
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _redis_url(url: str) -> str:
    """An argparse type: a URL redis-py accepts, or a `redis-cluster://` address
    (redis_contract/target.py); nothing connects yet."""
    try:
        if target.is_cluster(url):
            target.cluster_nodes(url)
        else:
            aioredis.Redis.from_url(url)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The feed's flags, on `oddsgate feed` or on this module's own parser."""
    parser.add_argument(
        "--redis-url",
        type=_redis_url,
        help=f"redis:// or unix:// URL, or redis-cluster://host:port,... (default: "
        f"${REDIS_URL_ENV}, or the cluster of $OG_REDIS_CLUSTER_NODES, else the embedded "
        "Redis's socket in the node's runtime dir)",
    )
    parser.add_argument("--rate", type=_positive_float, default=DEFAULT_RATE, help="events/s")
    parser.add_argument("--seed", type=int, default=1, help="the universe and stream seed")
    parser.add_argument("--duration", type=_positive_float, help="stop after this many seconds")
    parser.add_argument("--count", type=_positive_int, help="stop after this many events")
    parser.add_argument(
        "--spike", action="store_true", help="one popular match at x50 rate for a while"
    )
    parser.add_argument(
        "--spike-after", type=_non_negative_float, default=SPIKE_AFTER_S, help="s before the spike"
    )
    parser.add_argument(
        "--spike-seconds", type=_positive_float, default=SPIKE_SECONDS, help="spike length in s"
    )
    parser.add_argument(
        "--spike-factor", type=_positive_float, default=SPIKE_FACTOR, help=argparse.SUPPRESS
    )
    parser.add_argument("--partition-map", metavar="FILE", type=_partition_map,
                        help="JSON partition map")
    parser.add_argument(
        "--history-seconds",
        type=_history_seconds,
        default=DEFAULT_HISTORY_MS / 1000,
        help=f"history each topic keeps (at least {MIN_HISTORY_MS // 1000})",
    )
    parser.add_argument(
        "--markets-per-league", type=_positive_int, default=DEFAULT_MARKETS_PER_LEAGUE
    )
    parser.add_argument("--tail-leagues", type=_non_negative_int, default=DEFAULT_TAIL_LEAGUES)
    parser.add_argument("--quiet", action="store_true", help="no per-second report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oddsgate feed", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def _print_report(report: FeedReport) -> None:
    print(report.line(), file=sys.stderr, flush=True)


async def _publish(args: argparse.Namespace, pmap: PartitionMap) -> int:
    client = target.async_client(
        args.redis_url, socket_connect_timeout=2.0, socket_timeout=10.0
    )
    try:
        try:
            await client.ping()
        except (*unreachable(), redis.exceptions.RedisError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(
                f"oddsgate feed: cannot reach Redis at {shown_url(args.redis_url)}: {reason}",
                file=sys.stderr,
            )
            return 1
        publisher = Publisher(client, pmap, history_ms=int(args.history_seconds * 1000))
        spike = (
            Spike(factor=args.spike_factor, after=args.spike_after, seconds=args.spike_seconds)
            if args.spike
            else None
        )
        feed = SyntheticFeed(
            publisher,
            pmap,
            seed=args.seed,
            rate=args.rate,
            markets_per_league=args.markets_per_league,
            tail_leagues=args.tail_leagues,
            spike=spike,
            on_report=None if args.quiet else _print_report,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, feed.stop)
        if not args.quiet:
            print(
                f"oddsgate feed: {len(feed.universe())} markets on {len(feed.topics())} topics, "
                f"rate {args.rate:g}/s, seed {args.seed}"
                + (f", spike on {feed.spike_market.topic}" if spike else ""),
                file=sys.stderr,
                flush=True,
            )
        try:
            result = await feed.run(duration=args.duration, count=args.count)
        except redis.exceptions.RedisError as exc:
            print(f"oddsgate feed: Redis refused a publish: {exc}", file=sys.stderr)
            return 1
        if not args.quiet:
            print(
                f"oddsgate feed: done, {result.published} events in {result.seconds:.1f}s, "
                f"{result.errors} failed batches",
                file=sys.stderr,
            )
        return 0
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


def run(args: argparse.Namespace) -> int:
    """Publish as `args` say: 0 when done or stopped, 1 if Redis is unreachable."""
    pmap = args.partition_map if args.partition_map is not None else PartitionMap.load(None)
    from supervisor.runtime import node_redis_url

    if args.redis_url is None:
        try:
            args.redis_url = node_redis_url()
        except target.RedisTargetError as exc:
            print(f"oddsgate feed: {exc}", file=sys.stderr)
            return 2
    try:
        return uvloop.run(_publish(args, pmap))
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    """`oddsgate feed`: exit 0 when done or stopped, 1 if Redis is unreachable, 2 on bad usage."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
