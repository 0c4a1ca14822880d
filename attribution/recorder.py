"""Records clicks in Redis before their 302 leaves, sharing round trips (PROTOCOL.md §9).

Every click asked for in one loop turn goes into one pipeline (no MULTI:
each click's script is atomic on its own, and one click failing must not
fail the others), sent in one round trip; each waiter gets its verdict
when the pipeline returns. Under a storm the batches grow and the round
trips per click shrink, so the worker's cost per click falls as load rises.

A click whose script did not run (Redis down, a timeout, an error reply)
raises `ClickNotRecorded`, and the route answers 503: a 302 never leaves
for a click that is not in `og:clicks`.

The round trip is redis-py's connection without its pipeline: the batch's
EVALSHA commands are packed by hiredis (in C) and written at once on one
connection of the client's pool, and the replies are read in order. Once
the click listener (gateway/clicklistener.py) took websockets out of a
click, py-spy put a third of the worker's samples in redis-py (its
pipeline's bookkeeping, its Python packing of each click's 27 arguments,
the socket write); packing in C and skipping the pipeline cut the client's
CPU for a batch of one click from ~86 to ~30 us in a micro-benchmark, and
the worker's CPU per click by about a fifth in the bench (README "Tracking
links"). On a Redis Cluster the batch goes through redis-py's cluster
pipeline instead, which sends each click to the node of its slot. A click
whose arguments cannot be packed fails alone. A batch
whose connection breaks before any reply is read (a connection left over
from before a Redis restart, say) is sent once more on a fresh connection,
as redis-py's pipeline retries; once a reply was read, the rest of the
batch is not resent, since Redis may have run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from hiredis import pack_command
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from attribution.clicks import RECORD_CLICK_LUA, Click

log = logging.getLogger("oddsgate.clicks")


class ClickNotRecorded(ConnectionError):
    """Redis did not record the click (it gets a 503, never a 302)."""


class ClickRecorder:
    def __init__(self, redis: Redis, *, dedupe_window_ms: int,
                 attribution_window_ms: int) -> None:
        self.redis = redis
        self.dedupe_window_ms = dedupe_window_ms
        self.attribution_window_ms = attribution_window_ms
        self._script = redis.register_script(RECORD_CLICK_LUA)
        # A single server's pool, where the batch goes as one write; None for a cluster
        # client, whose pipeline routes each click to the node of its slot.
        self._pool = None if isinstance(redis, RedisCluster) else redis.connection_pool
        self._pending: list[tuple[Click, asyncio.Future[str]]] = []
        self._scheduled = False
        self._batches: set[asyncio.Task] = set()
        self.recorded = 0
        self.failed = 0
        self.round_trips = 0

    async def warm(self) -> None:
        """Load the script before the first click, which would otherwise pay a NOSCRIPT
        round trip more. Best effort: a batch reloads it whenever Redis lost it."""
        with contextlib.suppress(Exception):
            await self.redis.script_load(RECORD_CLICK_LUA)

    async def record(self, click: Click) -> str:
        """The click's verdict once it is in og:clicks; ClickNotRecorded otherwise."""
        return await self.submit(click)

    def submit(self, click: Click) -> asyncio.Future[str]:
        """`record` without a coroutine: the future of the click's verdict, for a
        caller that answers from a callback (gateway/clicklistener.py)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        self._pending.append((click, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._start_batch)
        return fut

    def _start_batch(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._record_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _record_batch(self, batch: list[tuple[Click, asyncio.Future[str]]]) -> None:
        clicks = [click for click, _ in batch]
        try:
            replies = await self._pipeline(clicks)
            retry = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if retry:  # Redis restarted and lost its script cache: those did not run
                await self.redis.script_load(RECORD_CLICK_LUA)
                again = await self._pipeline([clicks[i] for i in retry])
                for i, reply in zip(retry, again, strict=True):
                    replies[i] = reply
        except Exception as exc:
            replies = [exc] * len(batch)
        for (click, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue
            if isinstance(reply, Exception):
                self.failed += 1
                fut.set_exception(ClickNotRecorded(f"click {click.click_id} not recorded: "
                                                   f"{reply}"))
            else:
                self.recorded += 1
                verdict = reply[0]
                click.verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
                fut.set_result(click.verdict)
        failures = [reply for reply in replies if isinstance(reply, Exception)]
        if failures:
            log.warning("%d clicks not recorded (answered 503): %s", len(failures), failures[0])

    async def _pipeline(self, clicks: list[Click]) -> list:
        """Each click's reply (a list) or exception, in order, from one round trip."""
        self.round_trips += 1
        if self._pool is None:
            return await self._routed_pipeline(clicks)
        replies: list = [None] * len(clicks)
        packed: list[bytes] = []
        sent: list[int] = []
        for i, click in enumerate(clicks):
            try:
                packed.append(pack_command((
                    "EVALSHA", self._script.sha, 3, *click.script_keys(),
                    *click.script_args(self.dedupe_window_ms, self.attribution_window_ms))))
            except Exception as exc:  # this click's arguments only: the others go on
                replies[i] = exc
            else:
                sent.append(i)
        if sent:
            data = b"".join(packed)
            for attempt in (1, 2):
                read = await self._round_trip(data, sent, replies)
                if read is None:
                    break
                exc, got = read
                if got or attempt == 2:
                    for i in sent[got:]:
                        replies[i] = exc
                    break
        return replies

    async def _round_trip(self, data: bytes, sent: list[int], replies: list
                          ) -> tuple[Exception, int] | None:
        """Write `data` on a pooled connection and read one reply per click of `sent`;
        None when all came, else the connection's error and how many replies came first."""
        pool = self._pool
        assert pool is not None
        got = 0
        try:
            conn = await pool.get_connection()
        except Exception as exc:
            return exc, 0
        try:
            await conn.send_packed_command(data, check_health=False)
            for i in sent:
                try:
                    replies[i] = await conn.read_response()
                except ResponseError as exc:  # the script's error, NOSCRIPT: this click only
                    replies[i] = exc
                got += 1
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
            await conn.disconnect()
            return exc, got
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        return None

    async def _routed_pipeline(self, clicks: list[Click]) -> list:
        """A cluster client's round trips: redis-py's cluster pipeline sends each click's
        script to the node of its slot."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for click in clicks:
                # execute_command, not pipe.evalsha: redis-py's cluster pipeline refuses
                # the method but routes the command by its first key (one slot per click)
                pipe.execute_command("EVALSHA", self._script.sha, 3, *click.script_keys(),
                                     *click.script_args(self.dedupe_window_ms,
                                                        self.attribution_window_ms))
            return await pipe.execute(raise_on_error=False)
