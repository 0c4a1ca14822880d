"""How long a click takes to show in its partner's rows (PROTOCOL.md §12: within 1 s).

From the click record's XADD on `og:clicks` to the `stats` event of its
`campaign:{id}:today` row on the partner's Redis channel (what every worker
following `stats:{partner}` receives), through the real statistics service
(attribution/stats_service.py) on a private Redis, while a background of
`--rate` clicks a second spread over `--partners` partners runs:

    python -m bench.stats_latency
    python -m bench.stats_latency --rate 2000 --probes 50

The worker's fan-out after that is the fan-out bench's (bench/fanout_cost.py).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from attribution import keys
from attribution.stats_service import StatsService, StatsSettings
from supervisor.embedded_redis import EmbeddedRedis


def _click(i: int, partner: str, campaign: str) -> bytes:
    return orjson.dumps({"click_id": f"b{i}", "code": "x", "partner": partner,
                         "campaign": campaign, "creative": "cr", "ts": time.time_ns(),
                         "subs": {}, "ip_hash": "h", "ua": "bench", "referer": None,
                         "verdict": "ok"})


async def _background(redis: aioredis.Redis, rate: float, partners: int,
                      stop: asyncio.Event) -> None:
    i = 0
    while not stop.is_set():
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(max(1, round(rate / 100))):
                i += 1
                pipe.xadd(keys.CLICKS_STREAM,
                          {keys.RECORD_FIELD: _click(i, f"p{i % partners}", "bg")})
            await pipe.execute()
        await asyncio.sleep(0.01)


async def _run(args: argparse.Namespace, url: str) -> list[float]:
    redis = aioredis.Redis.from_url(url)
    service = StatsService(redis, StatsSettings(consumer="bench",
                                                publish_ms=args.publish_ms))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(service.run(stop)),
             asyncio.create_task(_background(redis, args.rate, args.partners, stop))]
    pubsub = redis.pubsub()
    await pubsub.ssubscribe("stats:probe")  # publish.lua sends with SPUBLISH
    latencies = []
    try:
        for n in range(args.probes):
            campaign = f"probe{n}"
            start = time.perf_counter()
            await redis.xadd(keys.CLICKS_STREAM,
                             {keys.RECORD_FIELD: _click(-n - 1, "probe", campaign)})
            wanted = f"campaign:{campaign}:today"
            while True:
                # None also for a subscribe confirmation: only the clock says "never".
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if time.perf_counter() - start > 5:
                    raise SystemExit(f"probe {n}: no stats event within 5 s")
                if message is not None and orjson.loads(message["data"])["key"] == wanted:
                    break
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pubsub.aclose()
        await redis.aclose()
    return latencies


def measure(rate: float = 500, partners: int = 50, probes: int = 30,
            publish_ms: int = 250) -> dict:
    """Click to stats event on a private Redis: p50/p99/max ms over `probes` clicks."""
    args = argparse.Namespace(rate=rate, partners=partners, probes=probes,
                              publish_ms=publish_ms)
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp), port=0, persist=False)
        server.start()
        try:
            latencies = sorted(asyncio.run(_run(args, server.url)))
        finally:
            server.stop()
    ms = [round(x * 1000, 1) for x in latencies]

    def pick(q: float) -> float:
        return ms[min(len(ms) - 1, int(q * len(ms)))]

    return {"probes": len(ms), "background_clicks_per_s": rate, "partners": partners,
            "publish_ms": publish_ms,
            "click_to_stats_ms": {"p50": pick(0.5), "p99": pick(0.99), "max": ms[-1]}}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stats_latency",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500, help="background clicks a second")
    parser.add_argument("--partners", type=int, default=50)
    parser.add_argument("--probes", type=int, default=30)
    parser.add_argument("--publish-ms", type=int, default=250)
    args = parser.parse_args()
    result = measure(args.rate, args.partners, args.probes, args.publish_ms)
    ms = result["click_to_stats_ms"]
    print(f"click -> stats event: p50 {ms['p50']:.0f} ms, p99 {ms['p99']:.0f} ms,"
          f" max {ms['max']:.0f} ms over {result['probes']} probes at {args.rate:.0f}"
          f" background clicks/s (publish every {args.publish_ms} ms)")

if __name__ == "__main__":
    main()
