"""`oddsgate aggregate`: one region's aggregator, the asyncio shell around the plain parts.

It reads the region's copies of the providers' streams (aggregator/inputlog.py),
merges them (aggregator/merge.py), prices them (aggregator/engine.py) and
publishes each event at the seq the engine gave it (`publish.lua`, pinned):
the same inputs give every region the same bytes. Around that:

- Progress marks the region alive: `og:region:alive` is set with an expiry
  of `stale_after_ms` whenever the watermark moves, and workers follow it for
  `/healthz` (PROTOCOL.md §8).
- A provider silent for `provider_idle_ms` of wall time no longer holds the
  watermark (`Merger.exclude`), so one dead feed never stops the prices.
- Checkpoints (`og:agg:{stream}:checkpoint`): the engine's and the merge's
  snapshots, saved only after everything they cover is published. Any Redis
  error, and any restart, goes back to the last checkpoint and reads the
  copies again from its positions: the events it produces again are already
  in Redis and are skipped, so nothing is lost or published twice, the epoch
  stays, and no seq is reused.
- A late input (`Merger.diverged`: this region's copy of a provider lagged
  past a watermark another region may have held) is a fail-stop: the alive
  mark is deleted, the region's workers fail `/healthz`, and the process
  exits 4 (`EXIT_DIVERGED`), which its supervisor does not restart in a loop.
  `oddsgate aggregate --rebuild` replays the region from its input log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from dataclasses import dataclass, field

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from aggregator.engine import Engine
from aggregator.inputlog import InputLog
from aggregator.inputs import InvalidInput
from aggregator.merge import MergeError, Merger
from aggregator.settings import AggregatorSettings
from feed.publisher import Publisher, SeqGap, Sequenced
from gateway.topics import PartitionMap
from redis_contract import REGION_ALIVE_KEY, topic_keys

log = logging.getLogger("oddsgate.aggregate")

EXIT_DIVERGED = 4
READ_BLOCK_MS = 50
READ_COUNT = 5000
RETRY_S = 0.5


def checkpoint_key(stream: str) -> str:
    return f"og:agg:{stream}:checkpoint"


def status_key(stream: str) -> str:
    return f"og:agg:{stream}:status"


class Diverged(RuntimeError):
    """A late input: this region's output may differ from another's."""


@dataclass
class Progress:
    """What the aggregator reports (its status key, logs, the bench)."""

    inputs: int = 0
    published: int = 0
    restarts_from_checkpoint: int = 0
    # input pts -> publish acknowledged, ns, of the events published lately
    latencies_ns: list[int] = field(default_factory=list)
    cpu_s_at_start: float = field(default_factory=lambda: _cpu_s())

    def figures(self) -> dict:
        lat = sorted(self.latencies_ns[-20_000:])

        def q(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] / 1e6, 3) if lat else None

        cpu = _cpu_s() - self.cpu_s_at_start
        return {"inputs": self.inputs, "published": self.published,
                "restarts_from_checkpoint": self.restarts_from_checkpoint,
                "input_to_publish_ms_p50": q(0.5), "input_to_publish_ms_p99": q(0.99),
                "cpu_s": round(cpu, 3),
                "cpu_ms_per_1000_inputs": round(1e6 * cpu / self.inputs, 3)
                if self.inputs else None}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Aggregator:
    def __init__(self, redis: aioredis.Redis, settings: AggregatorSettings,
                 pmap: PartitionMap, region: str = "") -> None:
        self.redis = redis
        self.settings = settings
        self.pmap = pmap
        self.region = region
        self.providers = settings.provider_names()
        self.log = InputLog(redis)
        self.publisher = Publisher(redis, pmap, history_ms=int(settings.history_s * 1000))
        self.progress = Progress()
        self.engine: Engine
        self.merger: Merger
        self._read_after: dict[str, int] = {}
        self._heard: dict[str, float] = {}  # provider -> monotonic time of its last message

    # -- state --------------------------------------------------------------

    async def restore(self) -> None:
        """The last checkpoint, or a fresh start of the generation."""
        raw = await self.redis.get(checkpoint_key(self.settings.stream))
        s = self.settings
        fresh = True
        if raw is not None:
            saved = orjson.loads(raw)
            if saved.get("generation") == s.generation and saved.get("stream") == s.stream:
                self.engine = Engine.restore(saved["engine"].encode(), self.pmap)
                self.merger = Merger.restore(saved["merger"])
                fresh = False
            else:
                log.warning("checkpoint is of %s generation %s; starting generation %d",
                            saved.get("stream"), saved.get("generation"), s.generation)
        if fresh:
            self.engine = Engine(s.stream, s.generation, self.pmap)
            self.merger = Merger(self.providers)
        if set(self.merger.providers) != set(self.providers):
            raise ValueError(f"the checkpoint merges {sorted(self.merger.providers)}, not "
                             f"{list(self.providers)}: providers change with a new generation")
        self._read_after = dict(self.merger.positions)
        now = time.monotonic()
        self._heard = dict.fromkeys(self.providers, now)

    async def checkpoint(self) -> None:
        s = self.settings
        await self.redis.set(checkpoint_key(s.stream), orjson.dumps({
            "stream": s.stream, "generation": s.generation,
            "engine": self.engine.snapshot().decode(), "merger": self.merger.snapshot(),
        }))

    # -- the loop -------------------------------------------------------------

    async def step(self, block_ms: int = READ_BLOCK_MS) -> int:
        """Read, merge, price, publish once; returns the inputs released."""
        messages = await self.log.read(self._read_after, READ_COUNT, block_ms)
        now = time.monotonic()
        for msg in messages:
            self._read_after[msg.provider] = msg.pseq
            self._heard[msg.provider] = now
            self.merger.offer(msg)
        if self.merger.diverged:
            raise Diverged(f"late input from {self.merger.late}")
        idle_s = self.settings.provider_idle_ms / 1000
        for provider, heard in self._heard.items():
            if now - heard > idle_s and provider not in self.merger.excluded:
                # Silent for us is not silent in the log: this process may have
                # stood still (a pause, a stopped VM) or its last read may have
                # been answered with another provider's first entry. Only a copy
                # holding nothing unread is a provider that went quiet; excluding
                # one with a backlog would make its next messages late.
                if await self.log.last_pseq(provider) > self._read_after[provider]:
                    self._heard[provider] = now
                    continue
                log.warning("provider %s silent for %.1fs: no longer waited for",
                            provider, now - heard)
                self.merger.exclude(provider)
        released = self.merger.release()
        if not released:
            return 0
        outputs = [out for msg in released for out in self.engine.process(msg)]
        epoch = self.engine.epoch
        if outputs:
            self.progress.published += await self.publisher.publish_sequenced(
                [Sequenced(o.topic, o.market, epoch, o.seq, o.body) for o in outputs])
            done = time.time_ns()
            self.progress.latencies_ns.extend(done - o.ts for o in outputs)
            if len(self.progress.latencies_ns) > 40_000:
                del self.progress.latencies_ns[:20_000]
        self.progress.inputs += len(released)
        await self.redis.set(REGION_ALIVE_KEY, f"{self.region} {self.merger.released_watermark}",
                             px=self.settings.alive_ms)
        return len(released)

    async def run(self, stop: asyncio.Event) -> int:
        """Until `stop`; the exit code (0, or EXIT_DIVERGED)."""
        while not stop.is_set():
            try:
                await self.restore()
                await self._loop(stop)
            except Diverged as exc:
                log.error("input arrived after its place was published (%s): this region's "
                          "stream may differ from the others'; stopping it (rebuild with "
                          "`oddsgate aggregate --rebuild`)", exc)
                await self._drop_alive()
                return EXIT_DIVERGED
            except (InvalidInput, MergeError) as exc:
                # Only the adapters' appends write the copies, canonically; an entry
                # that does not parse is a corrupt copy, which no region may skip
                # on its own (the others would not).
                log.error("this region's input log is not a provider's stream (%s): "
                          "stopping; rebuild the copy from the providers", exc)
                await self._drop_alive()
                return EXIT_DIVERGED
            except (RedisError, OSError, SeqGap) as exc:
                log.warning("aggregator: %s; going back to the last checkpoint", exc)
                self.progress.restarts_from_checkpoint += 1
                await asyncio.sleep(RETRY_S)
        return 0

    async def _loop(self, stop: asyncio.Event) -> None:
        next_checkpoint = time.monotonic() + self.settings.checkpoint_ms / 1000
        next_status = time.monotonic() + 1.0
        while not stop.is_set():
            await self.step()
            now = time.monotonic()
            if now >= next_checkpoint:
                await self.checkpoint()
                next_checkpoint = now + self.settings.checkpoint_ms / 1000
            if now >= next_status:
                await self.redis.set(status_key(self.settings.stream),
                                     orjson.dumps(self.status()))
                next_status = now + 1.0
        await self.checkpoint()

    def status(self) -> dict:
        return {"region": self.region, "epoch": self.engine.epoch,
                "watermark": self.merger.released_watermark,
                "excluded": list(self.merger.excluded), "late": self.merger.late,
                "buffered": self.merger.buffered, **self.progress.figures()}

    async def _drop_alive(self) -> None:
        with contextlib.suppress(RedisError):  # its expiry does it anyway
            await self.redis.delete(REGION_ALIVE_KEY)

    async def rebuild(self) -> int:
        """Forget this region's published stream and checkpoint; the next run replays
        the input log from its start. Returns the topics dropped."""
        raw = await self.redis.get(checkpoint_key(self.settings.stream))
        topics: list[str] = []
        if raw is not None:
            saved = orjson.loads(raw)
            topics = sorted(orjson.loads(saved["engine"])["seqs"])
        async with self.redis.pipeline(transaction=False) as pipe:
            for topic in topics:
                pipe.delete(*topic_keys(topic))
            pipe.delete(checkpoint_key(self.settings.stream), REGION_ALIVE_KEY)
            await pipe.execute()
        return len(topics)
