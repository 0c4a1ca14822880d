"""The bench's feed: `feed.synthetic.SyntheticFeed` in its own process.

Seeded and paced by the product's own synthetic feed (same universe, same
Zipf shares, same spike), publishing through the emitter of the system under
test (bench.emitters). Driven over a pipe: start, set_rate, spike, heads, stats, stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import time
import traceback
from dataclasses import dataclass, field

import psutil
import redis.asyncio as aioredis
import uvloop

from bench.emitters import make_emitter
from feed.publisher import Publisher
from feed.synthetic import Spike, SyntheticFeed
from gateway.topics import PartitionMap

# The universe the bench uses: 12 market-level leagues x 42 markets = 504
# market topics, plus 50 league-level topics (issue 5: "500 market topics
# plus league topics").
MARKETS_PER_LEAGUE = 42
TAIL_LEAGUES = 10


@dataclass(frozen=True)
class TriggeredSpike(Spike):
    """The feed's spike, started on command instead of at a fixed time.

    `SyntheticFeed.run` asks `active(elapsed)` every tick; `window` holds the
    [start, end) it answers for, in seconds since the run began, and stays
    empty until `trigger`.
    """

    window: list = field(default_factory=lambda: [math.inf, math.inf])

    def active(self, elapsed: float) -> bool:
        return self.window[0] <= elapsed < self.window[1]

    def trigger(self, at: float, seconds: float) -> None:
        self.window[:] = [at, at + seconds]


def bench_feed(seed: int, rate: float = 1.0, spike: Spike | None = None,
               publisher=None) -> SyntheticFeed:
    return SyntheticFeed(publisher, PartitionMap.load(None), seed=seed, rate=rate,
                         markets_per_league=MARKETS_PER_LEAGUE, tail_leagues=TAIL_LEAGUES,
                         spike=spike)


async def open_markets(redis_url: str, seed: int) -> int:
    """Publish every market of the bench's universe once, before any player follows it,
    as an aggregator lists a market before it is offered (players following a topic
    before its first publish would each get a `reset` when it comes). Returns the count."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        return await bench_feed(seed, publisher=Publisher(client, PartitionMap.load(None))
                                ).publish_opening_prices()
    finally:
        await client.aclose()


class FeedRunner:
    def __init__(self) -> None:
        self.feed: SyntheticFeed | None = None
        self.emitter = None
        self.task: asyncio.Task | None = None
        self.spike: TriggeredSpike | None = None
        self.proc = psutil.Process()
        self.started = 0.0

    async def cmd_start(self, emitter: str, address: str, rate: float, seed: int,
                        spike_factor: float = 50.0) -> dict:
        self.emitter = make_emitter(emitter, address, PartitionMap.load(None))
        self.spike = TriggeredSpike(factor=spike_factor, after=math.inf, seconds=0.0)
        self.feed = bench_feed(seed, rate, self.spike, self.emitter)
        self.started = time.monotonic()
        self.task = asyncio.create_task(self.feed.run())
        return {"started_monotonic": self.started,
                "spike_topic": self.feed.spike_market.topic}

    async def cmd_spike(self, seconds: float) -> dict:
        """Start the spike now; it extra-publishes the spike market at the *starting* rate's
        share x (factor - 1), as `SyntheticFeed` computes it when its run begins."""
        at = time.monotonic() - self.started
        self.spike.trigger(at, seconds)
        return {"at": at}

    async def cmd_set_rate(self, rate: float) -> dict:
        assert self.feed is not None
        self.feed.rate = float(rate)
        return {}

    async def cmd_heads(self, topics: list[str]) -> dict:
        """Per topic, each market's newest seq published so far: the current prices."""
        heads = self.emitter.heads if self.emitter else {}
        return {t: dict(heads[t]) for t in topics if t in heads}

    async def cmd_stats(self) -> dict:
        t = self.proc.cpu_times()
        failed = None
        if self.task is not None and self.task.done():
            exc = self.task.exception()
            failed = repr(exc) if exc else "finished"
        return {"sent": self.emitter.sent if self.emitter else 0,
                "by_topic": dict(self.emitter.by_topic) if self.emitter else {},
                "cpu_s": t.user + t.system, "monotonic": time.monotonic(), "failed": failed}

    async def cmd_stop(self) -> dict:
        result = {}
        if self.feed is not None and self.task is not None:
            self.feed.stop()
            with contextlib.suppress(Exception):
                done = await asyncio.wait_for(self.task, 10)
                result = {"published": done.published, "errors": done.errors,
                          "seconds": done.seconds}
        if self.emitter is not None:
            with contextlib.suppress(Exception):
                await self.emitter.close()
        return result


async def _serve(pipe: multiprocessing.connection.Connection) -> None:
    runner = FeedRunner()
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()
    loop.add_reader(pipe.fileno(), lambda: inbox.put_nowait(pipe.recv()))
    pipe.send(("ok", {}))
    while True:
        name, kwargs = await inbox.get()
        try:
            pipe.send(("ok", await getattr(runner, f"cmd_{name}")(**kwargs)))
        except Exception:
            pipe.send(("error", traceback.format_exc()))
        if name == "stop":
            return


def process_main(pipe: multiprocessing.connection.Connection) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_serve(pipe))


class FeedProcess:
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=process_main, args=(child,), name="bench-feed",
                                daemon=True)
        self.proc.start()
        child.close()
        self._recv(30)

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def _recv(self, timeout: float) -> dict:
        if not self.pipe.poll(timeout):
            raise RuntimeError(f"bench feed did not answer within {timeout:.0f}s")
        status, value = self.pipe.recv()
        if status != "ok":
            raise RuntimeError(f"bench feed failed:\n{value}")
        return value

    def call(self, name: str, timeout: float = 30.0, **kwargs: object) -> dict:
        self.pipe.send((name, kwargs))
        return self._recv(timeout)

    def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(Exception):
                self.call("stop", timeout=15)
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)
