"""The flags and entry points of `oddsgate aggregate` and `oddsgate providers`.

Declared here, beside their code, and added to the `oddsgate` tree lazily
(supervisor/cli.py), as the feed's are.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import uvloop

from gateway.config import ConfigError

log = logging.getLogger("oddsgate.aggregate")

AGGREGATE_DESCRIPTION = (
    "One region's aggregator: merge the providers' streams from this region's input log, "
    "price them, publish byte-identical events (docs/aggregator.md). Settings: OG_REDIS_URL "
    "(required), OG_STREAM, OG_GENERATION, OG_PROVIDERS, OG_REGION, and `oddsgate config`. "
    "Exit codes: 0 stopped; 2 bad settings; 4 diverged (a late input: rebuild the region).")
PROVIDERS_DESCRIPTION = (
    "The synthetic providers, in real time, appended to every region's input log "
    "(each region's Redis directly). Give every region with --region NAME=REDIS_URL.")


def add_aggregate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = AGGREGATE_DESCRIPTION
    parser.add_argument("--redis-url", help="this region's Redis (OG_REDIS_URL)")
    parser.add_argument("--region", help="this region's name, in logs and status (OG_REGION)")
    parser.add_argument("--rebuild", action="store_true",
                        help="forget this region's published stream and checkpoint, then "
                        "replay the input log from its start (after exit 4)")


def add_providers_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = PROVIDERS_DESCRIPTION
    parser.add_argument("--region", action="append", required=True, metavar="NAME=REDIS_URL",
                        help="a region's Redis (repeat for each region)")
    parser.add_argument("--seed", type=int, default=7, help="the simulation's seed")
    parser.add_argument("--buffer-s", type=float, default=600.0,
                        help="how long a region may be away and still be caught up")


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


def run_aggregate(args: argparse.Namespace) -> int:
    import os

    from aggregator.service import Aggregator
    from aggregator.settings import AggregatorSettings
    from gateway.topics import PartitionMap
    from redis_contract import target

    settings = AggregatorSettings.from_env()
    try:  # OG_REDIS_CLUSTER_NODES names a cluster instead (redis_contract/target.py)
        url = args.redis_url or target.redis_target(os.environ.get("OG_REDIS_URL", ""))
    except target.RedisTargetError as exc:
        raise ConfigError(str(exc)) from None
    if not url:
        raise ConfigError("OG_REDIS_URL: the region's Redis is required (or --redis-url)")
    region = args.region or os.environ.get("OG_REGION", "local")
    try:
        pmap = PartitionMap.load(os.environ.get("OG_PARTITION_MAP") or None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"OG_PARTITION_MAP: partition map: {exc}") from None

    async def main() -> int:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        redis = target.async_client(url)
        try:
            aggregator = Aggregator(redis, settings, pmap, region)
            if args.rebuild:
                dropped = await aggregator.rebuild()
                log.warning("rebuild: dropped %d topics and the checkpoint of %s in region %s",
                            dropped, settings.stream, region)
            log.info("aggregating %s (epoch %s-g%d) in region %s from providers %s",
                     settings.stream, settings.stream, settings.generation, region,
                     ",".join(aggregator.providers))
            return await aggregator.run(stop)
        except ValueError as exc:
            print(f"oddsgate aggregate: {exc}", file=sys.stderr)
            return 2
        finally:
            await redis.aclose()

    return uvloop.run(main())


def run_providers(args: argparse.Namespace) -> int:
    from aggregator.feeder import feed_regions

    urls: dict[str, str] = {}
    for item in args.region:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            raise ConfigError(f"--region {item!r}: expected NAME=REDIS_URL")
        if name in urls:
            raise ConfigError(f"--region {name}: given twice")
        urls[name] = url

    async def main() -> int:
        stop = asyncio.Event()
        _stop_on_signals(stop)
        try:
            await feed_regions(urls, args.seed, stop, buffer_s=args.buffer_s)
        except RuntimeError as exc:
            print(f"oddsgate providers: {exc}", file=sys.stderr)
            return 1
        return 0

    return uvloop.run(main())
