"""The publish side of the contract: what any aggregator calls.

One call is one run of `publish.lua`, so an event is in history, in the
latest-state hash and on the channel together or not at all. A batch is a
pipeline of those runs: one round trip, each event still atomic on its own,
and Redis runs them in order, so seqs follow the batch order per topic.

Give the publisher a client without command retries (`retry=None`) where a
repeated event matters: redis-py re-sends a whole pipeline after a broken
connection, and events that had already run would be published twice (under
new seqs, so no player sees a gap or a stale price, only a repeat).
"""

from __future__ import annotations

import datetime as _dt
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from feed.events import PriceUpdate
from gateway.topics import PartitionMap, is_stats_topic
from redis_contract import DEFAULT_TOPIC_TTL_MS, PUBLISH_LUA, topic_keys

DEFAULT_HISTORY_MS = 60_000
MIN_HISTORY_MS = 30_000  # PROTOCOL.md §3: at least 30 s of replay window


def new_epoch() -> str:
    """A fresh name for a seq space: random, with the day it began for humans."""
    return f"r{secrets.token_hex(4)}-{_dt.datetime.now(_dt.UTC):%Y%m%d}"


@dataclass(frozen=True, slots=True)
class Published:
    topic: str
    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class Sequenced:
    """An event whose epoch and seq its producer decided (a deterministic aggregator).

    `body` is `PriceUpdate.body()`'s shape: the JSON after the seq, no brace.
    """

    topic: str
    market: str
    epoch: str
    seq: int
    body: bytes


@dataclass(frozen=True, slots=True)
class StatsEvent:
    """One partner statistics row to publish: `body` is the JSON after the seq,
    no brace, starting with `"key":` (PROTOCOL.md §12's field order)."""

    topic: str
    key: str
    body: bytes


class SeqGap(RuntimeError):
    """Redis holds the topic at a seq below the event's minus one (PROTOCOL.md §1: no gaps)."""


class Publisher:
    def __init__(
        self,
        redis: aioredis.Redis,
        pmap: PartitionMap,
        *,
        history_ms: int = DEFAULT_HISTORY_MS,
        topic_ttl_ms: int = DEFAULT_TOPIC_TTL_MS,
        validate: bool = True,
    ) -> None:
        if history_ms < MIN_HISTORY_MS:
            raise ValueError(f"history_ms must be at least {MIN_HISTORY_MS} (PROTOCOL.md §3)")
        if topic_ttl_ms != 0 and topic_ttl_ms < history_ms:
            raise ValueError("topic_ttl_ms must be 0 (never expire) or at least history_ms")
        self._topic_ttl_ms = topic_ttl_ms
        self._redis = redis
        self._pmap = pmap
        self._history_ms = history_ms
        self._validate = validate
        self._script = redis.register_script(PUBLISH_LUA)
        # Where each topic stood after this publisher's last publish to it: a
        # Redis found below it lost acknowledged writes, and publish.lua then
        # starts a new epoch rather than reuse those seqs (ARGV[9], ARGV[10]).
        self._last: dict[str, tuple[str, int]] = {}

    def _known(self, topic: str) -> list:
        epoch, seq = self._last.get(topic, ("", 0))
        return [epoch, seq]

    def _remember(self, published: list[Published]) -> list[Published]:
        for p in published:
            self._last[p.topic] = (p.epoch, p.seq)
        return published

    def _args(self, update: PriceUpdate, epoch: str) -> tuple[list[str], list]:
        if self._validate:
            update.validate(self._pmap)
        return topic_keys(update.topic), [
            update.topic,
            epoch,
            update.market,
            update.body(),
            self._history_ms,
            self._topic_ttl_ms,
            0,
            "odds",
            *self._known(update.topic),
        ]

    async def publish(self, update: PriceUpdate) -> Published:
        keys, args = self._args(update, new_epoch())
        epoch, seq, _ = await self._script(keys=keys, args=args)
        return self._remember([Published(update.topic, _text(epoch), int(seq))])[0]

    async def _pipeline(self, prepared: list[tuple[str, list[str], list]],
                        raise_on_error: bool = True) -> list:
        """Plain EVALSHAs in one round trip (a script object would add SCRIPT EXISTS)."""
        if isinstance(self._redis, aioredis.RedisCluster):
            return await self._cluster_batch(prepared, raise_on_error)
        async with self._redis.pipeline(transaction=False) as pipe:
            for _topic, keys, args in prepared:
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            return await pipe.execute(raise_on_error=raise_on_error)

    async def _cluster_batch(self, prepared: list[tuple[str, list[str], list]],
                             raise_on_error: bool) -> list:
        """A batch on a Redis Cluster: one pipeline, which redis-py splits per
        master, each part in batch order (its `evalsha` method is refused in a
        cluster pipeline; the raw command is routed by its first key).

        A master may lack the script (a promoted replica, a fresh cluster) while
        the others ran their part: only the events refused with NOSCRIPT are sent
        again, after loading the script everywhere, so nothing is published twice.
        """
        results = await self._cluster_pipeline(prepared)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await self._redis.script_load(PUBLISH_LUA)
            again = await self._cluster_pipeline([prepared[i] for i in missing])
            for index, result in zip(missing, again, strict=True):
                results[index] = result
        if raise_on_error:
            for result in results:
                if isinstance(result, Exception):
                    raise result
        return results

    async def _cluster_pipeline(self, prepared: list[tuple[str, list[str], list]]) -> list:
        async with self._redis.pipeline(transaction=False) as pipe:
            for _topic, keys, args in prepared:
                pipe.execute_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
            return await pipe.execute(raise_on_error=False)

    async def publish_sequenced(self, events: list[Sequenced]) -> int:
        """Publish events at the epoch and seq they carry, in order, in one round trip.

        Idempotent: an event whose seq Redis already holds is skipped, so a
        restarted aggregator may go over its last events again and every
        region, fed the same events, ends up with the same bytes. Returns how
        many were published (the rest were there already). A seq beyond the
        next raises `SeqGap`, after the events before it were published.
        """
        prepared = [(e.topic, topic_keys(e.topic),
                     [e.topic, e.epoch, e.market, e.body, self._history_ms,
                      self._topic_ttl_ms, e.seq]) for e in events]
        if not prepared:
            return 0
        try:
            results = await self._pipeline(prepared, raise_on_error=False)
        except NoScriptError:
            await self._redis.script_load(PUBLISH_LUA)
            results = await self._pipeline(prepared, raise_on_error=False)
        if any(isinstance(r, NoScriptError) for r in results):  # flushed between the two
            await self._redis.script_load(PUBLISH_LUA)
            results = await self._pipeline(prepared, raise_on_error=False)
        published = 0
        for result in results:
            if isinstance(result, Exception):
                if "GAP" in str(result):
                    raise SeqGap(str(result)) from result
                raise result
            published += int(result[2])
        return published

    async def publish_stats(self, rows: Iterable[StatsEvent]) -> list[Published]:
        """Publish partners' statistics rows (PROTOCOL.md §12) in one round trip.

        The same script and keys as odds, with the event type `stats` and the
        row's key in the market's place, so a stats topic gets every rule of
        sections 3 and 5 (seqs, history, latest state per key, lifetime) from
        the one publish path.
        """
        epoch = new_epoch()
        prepared = []
        for row in rows:
            if not is_stats_topic(row.topic):
                raise ValueError(f"{row.topic!r} is not a stats topic")
            prepared.append((row.topic, topic_keys(row.topic),
                             [row.topic, epoch, row.key, row.body, self._history_ms,
                              self._topic_ttl_ms, 0, "stats", *self._known(row.topic)]))
        if not prepared:
            return []
        try:
            results = await self._pipeline(prepared)
        except NoScriptError:
            await self._redis.script_load(PUBLISH_LUA)
            results = await self._pipeline(prepared)
        return self._remember([
            Published(topic, _text(epoch), int(seq))
            for (topic, _k, _a), (epoch, seq, _) in zip(prepared, results, strict=True)
        ])

    async def publish_many(self, updates: Iterable[PriceUpdate]) -> list[Published]:
        """Publish in order in one round trip; all are validated before any is sent."""
        # One candidate epoch per call: fresh enough that a seq space lost
        # between two calls never gets its old name back.
        epoch = new_epoch()
        prepared = [(u.topic, *self._args(u, epoch)) for u in updates]
        if not prepared:
            return []
        try:
            results = await self._pipeline(prepared)
        except NoScriptError:  # Redis restarted or its script cache was flushed
            await self._redis.script_load(PUBLISH_LUA)
            results = await self._pipeline(prepared)
        return self._remember([
            Published(topic, _text(epoch), int(seq))
            for (topic, _k, _a), (epoch, seq, _) in zip(prepared, results, strict=True)
        ])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
