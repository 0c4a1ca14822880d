"""Keeps a worker's LinkCache in step with `og:links` (the shell around linkcache.py).

Its own pub/sub connection to `og:links:changed`, so attribution needs
nothing of the odds broker. Each (re)connection first waits for Redis to
confirm the subscription, then reads the whole hash: a change made after
the read arrives as a message, and one made before it is in the read, so
none falls between. Any error (Redis gone, restarted) drops the
connection and starts over after a fixed delay, with a full reload, since
messages published meanwhile were lost with the connection.

On a Redis Cluster (redis_contract/target.py) the subscription is a plain
SUBSCRIBE on the node serving the channel's slot: save_link.lua publishes
with plain PUBLISH, which every node relays over the cluster bus, so a
change made through any node reaches it; a failover of that node drops the
connection, and the reload after the reconnect covers what it missed.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from attribution import keys
from attribution.linkcache import LinkCache
from attribution.links import Link
from redis_contract import target

log = logging.getLogger("oddsgate.links")
CONFIRM_TIMEOUT_S = 5.0


class LinkSync:
    def __init__(self, url: str, cache: LinkCache, *, reconnect_delay: float = 0.5) -> None:
        self.url = url
        self.cache = cache
        self.reconnect_delay = reconnect_delay
        self.reloads = 0
        self.stopping = False
        # Admin changes made through this worker, waiting to be in its cache.
        self._waiting: dict[str, list[tuple[Link, asyncio.Future[None]]]] = {}

    async def caught_up(self, link: Link, timeout_s: float = 1.0) -> None:
        """Until this worker's cache holds `link`, which it just saved: its change comes
        back over `og:links:changed` like anyone's, so the admin API answers once the
        change is visible here too (an operator's pause then holds for the next click
        on this worker). Never longer than `timeout_s`: the message may have been lost
        with the connection, and the reload after the reconnect brings the change."""
        if self.cache.get(link.code) == link:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting = self._waiting.setdefault(link.code, [])
        waiting.append((link, fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            pass
        finally:
            waiting.remove((link, fut))
            if not waiting:
                self._waiting.pop(link.code, None)

    def _wake(self) -> None:
        for code, waiting in self._waiting.items():
            held = self.cache.get(code)
            for link, fut in waiting:
                if held == link and not fut.done():
                    fut.set_result(None)

    async def run(self) -> None:
        """Follow the links until cancelled (after `stopping` is set: a cancel that
        redis-py turns into an error mid-read must still end the loop)."""
        while not self.stopping:
            client = target.async_client(self.url)
            try:
                await self._follow(client)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.stopping:
                    return
                log.warning("link changes not followed (%s); reloading in %.1f s",
                            exc, self.reconnect_delay)
            finally:
                await client.aclose()
            await asyncio.sleep(self.reconnect_delay)

    async def _follow(self, client: aioredis.Redis | aioredis.RedisCluster) -> None:
        if isinstance(client, aioredis.RedisCluster):
            # its pub/sub picks the channel's node from the slot table, read here
            await client.initialize()
        async with client.pubsub() as pubsub:
            await pubsub.subscribe(keys.LINKS_CHANGED)
            while True:
                confirmed = await pubsub.get_message(timeout=CONFIRM_TIMEOUT_S)
                if confirmed is None:
                    raise ConnectionError("subscription not confirmed")
                if confirmed["type"] == "subscribe":
                    break
            self.cache.begin_reload()
            try:
                raw = await client.hgetall(keys.LINKS)
            except BaseException:
                self.cache.abandon_reload()
                raise
            self.cache.finish_reload(raw)
            self._wake()
            self.reloads += 1
            log.info("links loaded: %d", len(self.cache.links))
            while not self.stopping:
                message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=None)
                if message is not None and message["type"] == "message":
                    self.cache.apply(message["data"])
                    if self._waiting:
                        self._wake()
