"""Records clicks in Redis before their 302 leaves, sharing round trips (PROTOCOL.md §9).

Every click asked for in one loop turn goes into one pipeline (no MULTI:
each click's script is atomic on its own, and one click failing must not
fail the others), sent in one round trip; each waiter gets its verdict
when the pipeline returns. Under a storm the batches grow and the round
trips per click shrink, so the worker's cost per click falls as load rises.

A click whose script did not run (Redis down, a timeout, an error reply)
raises `ClickNotRecorded`, and the route answers 503: a 302 never leaves
for a click that is not in `og:clicks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

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
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        self._pending.append((click, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._start_batch)
        return await fut

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
        self.round_trips += 1
        async with self.redis.pipeline(transaction=False) as pipe:
            for click in clicks:
                # execute_command, not pipe.evalsha: redis-py's cluster pipeline refuses
                # the method but routes the command by its first key (one slot per click)
                pipe.execute_command("EVALSHA", self._script.sha, 3, *click.script_keys(),
                                     *click.script_args(self.dedupe_window_ms,
                                                        self.attribution_window_ms))
            return await pipe.execute(raise_on_error=False)
