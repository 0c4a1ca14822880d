"""`oddsgate stats run`: the asyncio shell around attribution/stats.py.

Two readers, one per stream (`og:clicks`, `og:conversions`), in the consumer
group `stats`: each first re-reads what it was handed before and never
acknowledged (a restart after a crash or a `kill -9`), then new records.
A record is acknowledged only after its counting script ran, so a crash
between the two re-reads it, and the script's counted-id set makes that
re-read add nothing: each record is counted exactly once.

One publisher loop: every `OG_STATS_PUBLISH_MS` it recomputes the rows of
the partners counted since (and, at each new minute, of every partner
active in the last hour, whose sliding windows and per-minute series move)
and publishes the rows that changed through
`feed.publisher.Publisher.publish_stats`. Changes between two runs
coalesce, so a row goes out at most a few times a second whatever the click
rate, and a click is in its rows within one interval plus a round trip.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from attribution import keys
from attribution.stats import (
    COUNT_LUA,
    DAY_KEYS_TTL_MS,
    MINUTE_KEYS_TTL_MS,
    NS_PER_MINUTE,
    BadRecord,
    StatsBoard,
    Tally,
    partner_rows,
    row_body,
    row_value,
    tally_click,
    tally_conversion,
    utc_day,
)
from feed.publisher import Publisher, StatsEvent
from gateway.config import EnvSettings, setting
from gateway.topics import PartitionMap, stats_topic
from redis_contract import latest_key, target

log = logging.getLogger("oddsgate.stats")

ACTIVE_NS = 61 * NS_PER_MINUTE  # a partner counted this recently has sliding rows


@dataclass
class StatsSettings(EnvSettings):
    consumer: str = setting(
        "OG_STATS_CONSUMER", "", "this statistics process's name in the streams' consumer "
        "group (keep it across restarts: its unacknowledged records are re-read); empty: "
        "the host name")
    publish_ms: int = setting(
        "OG_STATS_PUBLISH_MS", 250, "changed rows are published at most this often "
        "(changes in between coalesce); keep it well under 1000", minimum=50)
    batch: int = setting(
        "OG_STATS_BATCH", 500, "records read per stream per round trip", minimum=1)
    claim_idle_ms: int = setting(
        "OG_STATS_CLAIM_IDLE_MS", 60000, "at start, records another consumer was handed "
        "and left unacknowledged this long are taken over (a renamed or retired node's)",
        minimum=0)

    @property
    def consumer_name(self) -> str:
        return self.consumer or socket.gethostname()


class StatsService:
    def __init__(self, redis: aioredis.Redis, settings: StatsSettings,
                 *, clock: Callable[[], int] = time.time_ns) -> None:
        self.redis = redis
        self.settings = settings
        self.clock = clock
        self.publisher = Publisher(redis, PartitionMap.load(None), validate=False)
        self._count = redis.register_script(COUNT_LUA)
        self.board = StatsBoard()
        self.dirty: set[str] = set()
        self.active: dict[str, int] = {}  # partner -> ns of its newest counted record
        self.counted = 0
        self.repeats = 0  # records whose id was counted before (redeliveries)
        self.malformed = 0
        self._minute = -1

    async def ensure_groups(self) -> None:
        """The group on both streams, from their start the first time (MKSTREAM)."""
        for stream in (keys.CLICKS_STREAM, keys.CONVERSIONS_STREAM):
            try:
                await self.redis.xgroup_create(stream, keys.STATS_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _load_active(self) -> None:
        since_ms = (self.clock() - ACTIVE_NS) // 1_000_000
        for partner, score in await self.redis.zrangebyscore(
                keys.STATS_PARTNERS, since_ms, "+inf", withscores=True):
            name = partner.decode() if isinstance(partner, bytes) else partner
            self.active[name] = int(score) * 1_000_000
            self.dirty.add(name)

    async def run(self, stop: asyncio.Event) -> None:
        await self.ensure_groups()
        await self._load_active()
        tasks = [
            asyncio.create_task(self._consume(keys.CLICKS_STREAM, tally_click, stop)),
            asyncio.create_task(self._consume(keys.CONVERSIONS_STREAM, tally_conversion, stop)),
            asyncio.create_task(self._publish_loop(stop)),
        ]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- counting ---------------------------------------------------------------

    async def _consume(self, stream: str, tally: Callable[[dict], Tally | None],
                       stop: asyncio.Event) -> None:
        claimed = False
        start = "0"  # first what this consumer was handed and never acknowledged
        while not stop.is_set():
            try:
                if not claimed:
                    await self._claim_abandoned(stream)
                    claimed = True
                reply = await self.redis.xreadgroup(
                    keys.STATS_GROUP, self.settings.consumer_name, {stream: start},
                    count=self.settings.batch, block=None if start == "0" else 1000)
                messages = reply[0][1] if reply else []
                if start == "0" and not messages:
                    start = ">"
                    continue
                await self.count(stream, messages, tally)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: the records wait in the stream
                log.warning("reading %s failed: %s; retrying", stream, exc)
                start = "0"
                await asyncio.sleep(0.5)

    async def _claim_abandoned(self, stream: str) -> None:
        """Take over what a consumer that is gone left unacknowledged: it is then
        this consumer's, and the pending read after this counts it."""
        cursor = "0-0"
        while True:
            reply = await self.redis.xautoclaim(
                stream, keys.STATS_GROUP, self.settings.consumer_name,
                self.settings.claim_idle_ms, cursor, count=self.settings.batch)
            cursor = _text(reply[0])
            if cursor == "0-0":
                return

    async def count(self, stream: str, messages: list,
                    tally: Callable[[dict], Tally | None]) -> None:
        """Count each message once, then acknowledge them all."""
        ids = []
        latest: dict[str, int] = {}
        for message_id, fields in messages:
            ids.append(message_id)
            try:
                raw = fields.get(keys.RECORD_FIELD.encode(), fields.get(keys.RECORD_FIELD))
                if raw is None:
                    raise BadRecord(f"no `{keys.RECORD_FIELD}` field")
                counted = tally(orjson.loads(raw))
            except (BadRecord, orjson.JSONDecodeError) as exc:
                self.malformed += 1
                log.error("not counting %s %s: %s", stream, _text(message_id), exc)
                continue
            if counted is None:
                continue
            added = await self._count(
                keys=[keys.stats_seen_key(counted.partner, counted.day),
                      keys.stats_day_key(counted.partner, counted.day),
                      keys.stats_minute_key(counted.partner, counted.minute)],
                args=[counted.record_id, DAY_KEYS_TTL_MS, MINUTE_KEYS_TTL_MS,
                      *[x for pair in counted.increments for x in pair]])
            if added:
                self.counted += 1
            else:
                self.repeats += 1
            self.dirty.add(counted.partner)
            ms = counted.ts_ns // 1_000_000
            latest[counted.partner] = max(latest.get(counted.partner, 0), ms)
            self.active[counted.partner] = max(self.active.get(counted.partner, 0),
                                               counted.ts_ns)
        if latest:
            await self.redis.zadd(keys.STATS_PARTNERS, latest, gt=True)
        if ids:
            await self.redis.xack(stream, keys.STATS_GROUP, *ids)

    # -- publishing -------------------------------------------------------------

    async def _publish_loop(self, stop: asyncio.Event) -> None:
        interval = self.settings.publish_ms / 1000
        while not stop.is_set():
            try:
                await self.publish_changes()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("publishing statistics failed: %s; retrying", exc)
            await asyncio.sleep(interval)

    async def publish_changes(self) -> int:
        """Publish the changed rows of every partner that may have changed; how many."""
        now = self.clock()
        minute = now // NS_PER_MINUTE
        partners = set(self.dirty)
        self.dirty.clear()
        if minute != self._minute:  # the sliding windows moved
            self._minute = minute
            partners |= {p for p, ts in self.active.items() if now - ts < ACTIVE_NS}
            for p in [p for p, ts in self.active.items() if now - ts >= ACTIVE_NS]:
                partners.add(p)  # once more: its last sliding rows go to zero
                del self.active[p]
        events = []
        for partner in sorted(partners):
            current = await self._rows(partner, now)
            if not self.board.known(partner):
                self.board.seed(partner, await self._published(partner))
            for key, value in self.board.changes(partner, current):
                events.append(StatsEvent(stats_topic(partner), key, row_body(key, now, value)))
        if events:
            await self.publisher.publish_stats(events)
        return len(events)

    async def _rows(self, partner: str, now: int) -> dict[str, dict]:
        minute = now // NS_PER_MINUTE
        minutes = list(range(minute - 59, minute + 1))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.stats_day_key(partner, utc_day(now)))
            for m in minutes:
                pipe.hgetall(keys.stats_minute_key(partner, m))
            replies = await pipe.execute()
        day = _ints(replies[0])
        return partner_rows(
            day, {m: _ints(r) for m, r in zip(minutes, replies[1:], strict=True) if r}, minute)

    async def _published(self, partner: str) -> dict[str, dict]:
        """The rows the topic holds now (a restart must not forget what to zero)."""
        latest = await self.redis.hgetall(latest_key(stats_topic(partner)))
        out = {}
        for key, event in latest.items():
            try:
                out[_text(key)] = row_value(_text(key), orjson.loads(event))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue
        return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ints(reply: dict) -> dict[str, int]:
    return {_text(k): int(v) for k, v in reply.items()}


async def serve(redis_url: str, settings: StatsSettings) -> None:
    """Run until SIGTERM or SIGINT."""
    import signal

    redis = target.async_client(redis_url)
    service = StatsService(redis, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("statistics service counting %s and %s as %s", keys.CLICKS_STREAM,
             keys.CONVERSIONS_STREAM, settings.consumer_name)
    try:
        await service.run(stop)
    finally:
        await redis.aclose()
