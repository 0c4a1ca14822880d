"""The worker's two ways to Redis: one pub/sub connection, and commands.

The pub/sub side is a plain asyncio protocol over hiredis rather than
redis-py's PubSub object: each socket read is parsed in C and every message
in it is handed to the hub in the same callback, so the events of one read
reach players in one loop turn (one frame per player) and nothing awaits per
event. It reconnects on a fixed delay, resubscribes every topic it had, and
then tells its owner, who checks each topic for events missed meanwhile:
pub/sub is at-most-once, history is not.

Commands (the replay and snapshot reads) go through redis-py. Their Lua
scripts (feed/contract.py, which owns the Redis side of a topic) only read:
a topic nobody published to reads as `UNPUBLISHED_EPOCH`, seq 0, no markets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import BlockingConnectionPool, parse_url
from redis.exceptions import NoScriptError

from redis_contract import (
    LOAD_STATE_LUA,
    READ_SINCE_LUA,
    UNPUBLISHED_EPOCH,
    history_key,
    latest_key,
    meta_key,
)

log = logging.getLogger("oddsgate.broker")

@dataclass(frozen=True, slots=True)
class TopicState:
    """A topic as of one seq: its epoch and the newest event of every market."""

    epoch: str
    seq: int
    markets: list[bytes]


@dataclass(frozen=True, slots=True)
class History:
    """What history holds after a seq; `events` is None when it no longer reaches it."""

    epoch: str
    head: int
    events: list[bytes] | None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _PubSubProtocol(asyncio.Protocol):
    def __init__(self, broker: RedisBroker) -> None:
        self._broker = broker
        self._reader = hiredis.Reader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._broker._on_connected(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        on_reply = self._broker._on_reply
        while (reply := reader.gets()) is not False:
            on_reply(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._broker._on_lost(exc)


def _command(*parts: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class RedisBroker:
    """Owns the worker's Redis connections and which channels it subscribes."""

    def __init__(
        self,
        url: str,
        on_message: Callable[[str, bytes], None],
        *,
        on_resubscribed: Callable[[], None] = lambda: None,
        reconnect_delay: float = 0.5,
    ) -> None:
        self.url = url
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._reconnect_delay = reconnect_delay
        self._conn_kwargs = parse_url(url)
        # A full pool makes a command wait for a connection instead of failing
        # ("Too many connections") in a burst of replays or snapshot reads.
        self.commands = aioredis.Redis(connection_pool=BlockingConnectionPool.from_url(
            url, max_connections=64, timeout=5.0, socket_timeout=5.0))
        self._load_state = self.commands.register_script(LOAD_STATE_LUA)
        self._read_since = self.commands.register_script(READ_SINCE_LUA)
        self._loads: dict[str, list[asyncio.Future[TopicState]]] = {}
        self._loads_scheduled = False
        self._batches: set[asyncio.Task] = set()
        self._transport: asyncio.Transport | None = None
        self._topics: set[str] = set()
        self._confirmed: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._resubscribing: set[str] = set()
        self._closing = False
        self._reconnect_task: asyncio.Task | None = None
        self.connected = asyncio.Event()
        self.messages_in = 0
        self.reconnects = 0

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        """Connect, retrying on the fixed delay until Redis answers."""
        while not self._closing:
            try:
                await self._connect()
                await self._warm_commands()
                return
            except (OSError, ConnectionError) as exc:
                log.warning("redis pub/sub connect to %s failed: %s", self.url, exc)
                await asyncio.sleep(self._reconnect_delay)

    async def _warm_commands(self, connections: int = 4) -> None:
        """Open a few pooled command connections and load the scripts now, before the
        first players: the first subscribes of a cold start otherwise paid for the
        connects and a NOSCRIPT round trip (subscribe-to-snapshot p99 ~45 ms there).
        Best effort: the lazy path still works if this fails."""
        try:
            await asyncio.gather(*(self.commands.ping() for _ in range(connections)))
            for source in (LOAD_STATE_LUA, READ_SINCE_LUA):
                await self.commands.script_load(source)
        except Exception as exc:
            log.warning("redis command connections not warmed: %s", exc)

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        kw = self._conn_kwargs
        if "path" in kw:
            await loop.create_unix_connection(lambda: _PubSubProtocol(self), kw["path"])
        else:
            await loop.create_connection(
                lambda: _PubSubProtocol(self), kw.get("host", "127.0.0.1"), kw.get("port", 6379)
            )

    async def close(self) -> None:
        self._closing = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        if self._transport is not None:
            self._transport.close()
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(ConnectionError("broker closed"))
        with contextlib.suppress(Exception):
            await self.commands.aclose()
            await self.commands.connection_pool.disconnect()

    # -- subscriptions ----------------------------------------------------

    async def subscribe(self, topic: str) -> None:
        """Subscribe the channel; return once Redis confirmed it."""
        if topic in self._confirmed:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(topic, []).append(fut)
        if topic not in self._topics:
            self._topics.add(topic)
            if self._transport is not None:
                self._transport.write(_command("SUBSCRIBE", topic))
        await fut

    def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)
        self._confirmed.discard(topic)
        for fut in self._waiters.pop(topic, []):
            if not fut.done():
                fut.set_exception(ConnectionError(f"unsubscribed from {topic}"))
        if self._transport is not None:
            self._transport.write(_command("UNSUBSCRIBE", topic))

    @property
    def subscriptions(self) -> int:
        return len(self._confirmed)

    # -- protocol callbacks -----------------------------------------------

    def _on_connected(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        kw = self._conn_kwargs
        if kw.get("password"):
            auth = ["AUTH"] + ([kw["username"]] if kw.get("username") else []) + [kw["password"]]
            transport.write(_command(*auth))
        self._resubscribing = set(self._topics)
        if self._topics:
            transport.write(_command("SUBSCRIBE", *sorted(self._topics)))
        self.connected.set()
        log.info("redis pub/sub connected (%d topics to subscribe)", len(self._topics))

    def _on_reply(self, reply: object) -> None:
        if type(reply) is list and len(reply) == 3:
            kind = reply[0]
            if kind == b"message":
                self.messages_in += 1
                self._on_message(reply[1].decode(), reply[2])
                return
            if kind == b"subscribe":
                self._on_subscribe_confirmed(reply[1].decode())
                return
            if kind == b"unsubscribe":
                return
        if isinstance(reply, hiredis.ReplyError):
            log.error("redis pub/sub error: %s", reply)
            if self._transport is not None:
                self._transport.close()

    def _on_subscribe_confirmed(self, topic: str) -> None:
        if topic not in self._topics:
            return  # unsubscribed while the confirmation was on its way
        self._confirmed.add(topic)
        for fut in self._waiters.pop(topic, []):
            if not fut.done():
                fut.set_result(None)
        if self._resubscribing:
            self._resubscribing.discard(topic)
            if not self._resubscribing:
                self._on_resubscribed()

    def _on_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._confirmed.clear()
        self.connected.clear()
        if self._closing:
            return
        log.warning("redis pub/sub connection lost (%s); reconnecting", exc or "closed")
        self._reconnect_task = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        self.reconnects += 1
        while not self._closing:
            await asyncio.sleep(self._reconnect_delay)
            try:
                await self._connect()
                return
            except (OSError, ConnectionError) as exc:
                log.warning("redis pub/sub reconnect failed: %s", exc)

    # -- reads ------------------------------------------------------------

    async def load_state(self, topic: str) -> TopicState:
        """The topic's state as of one seq; loads asked for in one turn share a round trip.

        A subscribe storm (a drained worker's crowd, a cold start) opens
        hundreds of topics at once: one pipeline per loop turn instead of a
        command, and a pooled connection, per topic.
        """
        fut: asyncio.Future[TopicState] = asyncio.get_running_loop().create_future()
        self._loads.setdefault(topic, []).append(fut)
        if not self._loads_scheduled:
            self._loads_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_load_batch)
        return await fut

    def _start_load_batch(self) -> None:
        self._loads_scheduled = False
        batch, self._loads = self._loads, {}
        task = asyncio.get_running_loop().create_task(self._load_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _load_batch(self, batch: dict[str, list[asyncio.Future[TopicState]]]) -> None:
        topics = list(batch)
        try:
            replies = await self._pipeline_loads(topics)
            if any(isinstance(r, NoScriptError) for r in replies):
                # Redis restarted and lost its script cache: nothing ran; again.
                await self.commands.script_load(LOAD_STATE_LUA)
                replies = await self._pipeline_loads(topics)
        except Exception as exc:
            replies = [exc] * len(topics)
        for topic, reply in zip(topics, replies, strict=True):
            for fut in batch[topic]:
                if fut.done():
                    continue
                if isinstance(reply, Exception):
                    fut.set_exception(ConnectionError(f"load of {topic} failed: {reply}"))
                else:
                    epoch, seq, markets = reply
                    if epoch is None:  # no seq space yet: nothing to show
                        fut.set_result(TopicState(UNPUBLISHED_EPOCH, 0, []))
                    else:
                        fut.set_result(TopicState(_text(epoch), int(seq), list(markets)))

    async def _pipeline_loads(self, topics: list[str]) -> list:
        async with self.commands.pipeline(transaction=False) as pipe:
            for topic in topics:
                pipe.evalsha(self._load_state.sha, 2, meta_key(topic), latest_key(topic))
            return await pipe.execute(raise_on_error=False)

    async def read_since(self, topic: str, seq: int, most: int) -> History:
        """Every event of `topic` after `seq`, if history still holds them all."""
        reply = await self._read_since(keys=[meta_key(topic), history_key(topic)], args=[seq, most])
        if reply[0] is None:  # no seq space: at seq 0 of the unpublished epoch, nothing after
            return History(UNPUBLISHED_EPOCH, 0, [])
        events = list(reply[3:]) if reply[2] == 1 else None
        return History(_text(reply[0]), int(reply[1]), events)
