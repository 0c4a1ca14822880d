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
from redis.crc import REDIS_CLUSTER_HASH_SLOTS as SLOTS
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError

from redis_contract import (
    LOAD_STATE_LUA,
    READ_SINCE_LUA,
    UNPUBLISHED_EPOCH,
    history_key,
    latest_key,
    meta_key,
)
from redis_contract.target import async_client, cluster_nodes, is_cluster

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


CONNECT_TIMEOUT_S = 2.0
CONFIRM_TIMEOUT_S = 2.0  # subscriptions not confirmed by then are sent again

# A server: a unix socket's path, or (host, port).
Address = str | tuple[str, int]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _shown(address: Address) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


async def _ask(host: str, port: int, command: bytes, timeout: float = 2.0) -> object:
    """One command on a short-lived connection: the slot map must be readable
    from any node while the command client may be the thing that is stuck."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(command)
        parser = hiredis.Reader()
        while True:
            data = await asyncio.wait_for(reader.read(65536), timeout)
            if not data:
                raise ConnectionError(f"{host}:{port} closed the connection")
            parser.feed(data)
            reply = parser.gets()
            if reply is not False:
                return reply
    finally:
        writer.close()


class _Link(asyncio.Protocol):
    """One pub/sub connection to one Redis server (a shard's master on a cluster)."""

    def __init__(self, broker: RedisBroker, address: Address) -> None:
        self._broker = broker
        self._reader = hiredis.Reader()
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.closed = False
        # SUNSUBSCRIBEs we sent whose confirmation is still on its way: any other
        # `sunsubscribe` is the server dropping the topic (its slot moved away).
        self.leaving: dict[str, int] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._broker._link_up(self)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        on_reply = self._broker._on_reply
        while (reply := reader.gets()) is not False:
            on_reply(self, reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closed = True
        self._broker._link_lost(self, exc)

    def write(self, *parts: str | bytes) -> None:
        if self.transport is not None:
            self.transport.write(_command(*parts))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _command(*parts: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class RedisBroker:
    """Owns the worker's Redis connections and which channels it subscribes.

    Topics are followed with SSUBSCRIBE (publish.lua sends with SPUBLISH). On
    one server there is one link. On a Redis Cluster there is one link per
    master, and each topic rides the link of the master that owns its slot;
    the slot map comes from CLUSTER SLOTS and is read again after anything
    that may have moved a slot: a link lost (a master died, its replica took
    over), an error reply (MOVED), or a `sunsubscribe` we did not ask for
    (Redis 7 drops a shard channel's subscribers when its slot leaves).

    Any such disturbance makes the topics it touched unconfirmed, and one
    healing task (`_heal`) routes them again, waits for every confirmation,
    then calls `on_resubscribed`, whose owner checks every topic against
    history: whatever pub/sub lost meanwhile, or a client library would have
    lost silently, is found by seq and filled, or the topic is reset.
    """

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
        self.cluster = is_cluster(url)
        if self.cluster:
            self._conn_kwargs: dict = {}
            self._seeds: list[Address] = list(cluster_nodes(url))
            self.commands = async_client(url, max_connections=64, socket_timeout=5.0)
        else:
            self._conn_kwargs = parse_url(url)
            kw = self._conn_kwargs
            self._seeds = [kw["path"] if "path" in kw
                           else (kw.get("host", "127.0.0.1"), kw.get("port", 6379))]
            # A full pool makes a command wait for a connection instead of failing
            # ("Too many connections") in a burst of replays or snapshot reads.
            self.commands = aioredis.Redis(connection_pool=BlockingConnectionPool.from_url(
                url, max_connections=64, timeout=5.0, socket_timeout=5.0))
        self._load_state = self.commands.register_script(LOAD_STATE_LUA)
        self._read_since = self.commands.register_script(READ_SINCE_LUA)
        self._loads: dict[str, list[asyncio.Future[TopicState]]] = {}
        self._loads_scheduled = False
        self._batches: set[asyncio.Task] = set()
        # The one owner of what is subscribed where:
        self._topics: set[str] = set()  # wanted
        self._where: dict[str, Address] = {}  # the link a wanted topic rides
        self._confirmed: set[str] = set()
        self._lost: set[str] = set()  # unconfirmed by a disturbance: check history after
        self._links: dict[Address, _Link] = {}
        self._masters: list[Address] = list(self._seeds) if not self.cluster else []
        self._slot_owner: list[int] = []  # slot -> index into _masters (cluster)
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._closing = False
        self._heal_task: asyncio.Task | None = None
        self._heal_again = False
        self._healed_at = float("-inf")
        self.connected = asyncio.Event()
        self.messages_in = 0
        self.reconnects = 0
        self.slot_map_reads = 0

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        """Connect, retrying on the fixed delay until Redis answers."""
        while not self._closing:
            try:
                await self._open_links()
                self._route_all()  # any topic asked for before the links were up
                self.connected.set()
                await self._warm_commands()
                return
            except (OSError, ConnectionError, RedisError) as exc:
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

    async def _open_links(self) -> None:
        """Read the slot map (cluster), then make sure every master has an open link;
        links to servers that are no longer masters are closed."""
        if self.cluster:
            await self._read_slot_map()
        for address in list(self._links):
            if address not in self._masters:
                self._links.pop(address).close()
        for address in self._masters:
            link = self._links.get(address)
            if link is None or link.closed:
                await self._connect(address)

    async def _connect(self, address: Address) -> None:
        loop = asyncio.get_running_loop()
        link = _Link(self, address)
        self._links[address] = link
        try:
            if isinstance(address, str):
                connect = loop.create_unix_connection(lambda: link, address)
            else:
                connect = loop.create_connection(lambda: link, address[0], address[1])
            await asyncio.wait_for(connect, CONNECT_TIMEOUT_S)
        except BaseException:
            if self._links.get(address) is link:
                del self._links[address]
            raise

    async def _read_slot_map(self) -> None:
        """CLUSTER SLOTS from the first node that answers: known masters, then seeds."""
        last: Exception | None = None
        for host, port in dict.fromkeys([*self._masters, *self._seeds]):  # type: ignore[misc]
            try:
                reply = await _ask(host, port, b"*2\r\n$7\r\nCLUSTER\r\n$5\r\nSLOTS\r\n")
            except (TimeoutError, OSError, ConnectionError) as exc:
                last = exc
                continue
            if isinstance(reply, hiredis.ReplyError) or not isinstance(reply, list):
                last = ConnectionError(f"CLUSTER SLOTS at {host}:{port}: {reply}")
                continue
            masters: list[Address] = []
            owner = [-1] * SLOTS
            for first, last_slot, master, *_replicas in reply:
                address = (_text(master[0]) or host, int(master[1]))
                if address not in masters:
                    masters.append(address)
                index = masters.index(address)
                for slot in range(int(first), int(last_slot) + 1):
                    owner[slot] = index
            if -1 in owner:
                last = ConnectionError(f"{host}:{port} does not cover every slot")
                continue
            self._masters, self._slot_owner = masters, owner
            self.slot_map_reads += 1
            return
        raise ConnectionError(f"no cluster node gave its slot map: {last}")

    def _route(self, topic: str) -> Address:
        if not self.cluster:
            return self._masters[0]
        return self._masters[self._slot_owner[key_slot(topic.encode())]]

    async def close(self) -> None:
        self._closing = True
        if self._heal_task is not None:
            self._heal_task.cancel()
        for link in list(self._links.values()):
            link.close()
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(ConnectionError("broker closed"))
        with contextlib.suppress(Exception):
            await self.commands.aclose()
            if not self.cluster:
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
            if self._masters:
                address = self._route(topic)
                self._where[topic] = address
                link = self._links.get(address)
                if link is not None and link.transport is not None:
                    link.write("SSUBSCRIBE", topic)
                elif self._heal_task is not None and not self._heal_task.done():
                    self._heal_again = True  # its link is (re)connecting: route it again
        await fut

    def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)
        self._confirmed.discard(topic)
        self._lost.discard(topic)
        for fut in self._waiters.pop(topic, []):
            if not fut.done():
                fut.set_exception(ConnectionError(f"unsubscribed from {topic}"))
        address = self._where.pop(topic, None)
        link = self._links.get(address) if address is not None else None
        if link is not None and link.transport is not None:
            link.leaving[topic] = link.leaving.get(topic, 0) + 1
            link.write("SUNSUBSCRIBE", topic)

    def resubscribe(self, topic: str) -> None:
        """Subscribe a followed topic again (the audit found it silent): it is
        treated as lost, routed anew and confirmed, then history is checked."""
        if topic in self._topics:
            self._disturbed([topic])

    @property
    def subscriptions(self) -> int:
        return len(self._confirmed)

    # -- link callbacks ---------------------------------------------------

    def _link_up(self, link: _Link) -> None:
        kw = self._conn_kwargs
        if kw.get("password"):
            auth = ["AUTH"] + ([kw["username"]] if kw.get("username") else []) + [kw["password"]]
            link.write(*auth)
        # Its topics are subscribed by whoever opened it (`start`, `_heal`), once
        # the links are up: one place sends SSUBSCRIBE for a topic after a loss.
        log.info("redis pub/sub connected to %s", _shown(link.address))

    def _on_reply(self, link: _Link, reply: object) -> None:
        if type(reply) is list and len(reply) == 3:
            kind = reply[0]
            if kind == b"smessage":
                self.messages_in += 1
                self._on_message(reply[1].decode(), reply[2])
                return
            if kind == b"ssubscribe":
                self._on_subscribe_confirmed(link, reply[1].decode())
                return
            if kind == b"sunsubscribe":
                self._on_unsubscribed(link, reply[1].decode())
                return
        if isinstance(reply, hiredis.ReplyError):
            # MOVED (the slot map changed) or anything else unexpected: drop the
            # link; healing reads the map again and routes every topic anew.
            log.error("redis pub/sub error from %s: %s", _shown(link.address), reply)
            link.close()

    def _on_subscribe_confirmed(self, link: _Link, topic: str) -> None:
        if topic not in self._topics or self._where.get(topic) != link.address:
            return  # unsubscribed, or moved, while the confirmation was on its way
        self._confirmed.add(topic)
        for fut in self._waiters.pop(topic, []):
            if not fut.done():
                fut.set_result(None)
        self._maybe_healed()

    def _on_unsubscribed(self, link: _Link, topic: str) -> None:
        pending = link.leaving.get(topic, 0)
        if pending:
            if pending == 1:
                del link.leaving[topic]
            else:
                link.leaving[topic] = pending - 1
            return
        if topic in self._topics and self._where.get(topic) == link.address:
            log.warning("redis dropped %s from %s (its slot moved); routing it again",
                        topic, _shown(link.address), extra={"topic": topic})
            self._disturbed([topic])

    def _link_lost(self, link: _Link, exc: Exception | None) -> None:
        if self._links.get(link.address) is not link or self._closing:
            return  # closed on purpose (no longer a master), its topics routed elsewhere
        del self._links[link.address]
        riding = [t for t, a in self._where.items() if a == link.address]
        log.warning("redis pub/sub connection to %s lost (%s); %d topics to route again",
                    _shown(link.address), exc or "closed", len(riding))
        self.connected.clear()
        self._disturbed(riding, link_lost=True)

    # -- healing ----------------------------------------------------------

    def _disturbed(self, topics: list[str], *, link_lost: bool = False) -> None:
        for topic in topics:
            self._confirmed.discard(topic)
            self._lost.add(topic)
        if self._heal_task is None or self._heal_task.done():
            self.reconnects += 1
            self._heal_task = asyncio.get_running_loop().create_task(self._heal())
        else:
            self._heal_again = True

    async def _heal(self) -> None:
        """Until every wanted topic is confirmed on its master's link: read the map,
        open links, route topics, wait; then tell the owner to check history."""
        # A cluster moves slots in milliseconds: look again at once, unless the
        # last healing was just now (a link that keeps failing backs off).
        quick = self.cluster and asyncio.get_running_loop().time() - self._healed_at > 1.0
        delay = 0.05 if quick else self._reconnect_delay
        while not self._closing:
            self._heal_again = False
            await asyncio.sleep(delay)
            delay = self._reconnect_delay
            try:
                await self._open_links()
            except (TimeoutError, OSError, ConnectionError, RedisError) as exc:
                log.warning("redis pub/sub: cannot reach %s yet: %s", self.url, exc)
                continue
            self._route_all()
            deadline = asyncio.get_running_loop().time() + CONFIRM_TIMEOUT_S
            while (len(self._confirmed) < len(self._topics) and not self._heal_again
                   and asyncio.get_running_loop().time() < deadline
                   and all(not link.closed for link in self._links.values())):
                await asyncio.sleep(0.01)
            if len(self._confirmed) == len(self._topics) and not self._heal_again \
                    and len(self._links) == len(self._masters):
                self._healed_at = asyncio.get_running_loop().time()
                self.connected.set()
                self._maybe_healed()
                return

    def _route_all(self) -> None:
        """Every wanted topic onto the link of its slot's master; a topic that
        changes link is unsubscribed from the old one and checked afterwards."""
        by_link: dict[Address, list[str]] = {}
        for topic in self._topics:
            address = self._route(topic)
            old = self._where.get(topic)
            if old == address and topic in self._confirmed:
                continue
            if old is not None and old != address:
                previous = self._links.get(old)
                if previous is not None and previous.transport is not None \
                        and topic in self._confirmed:
                    previous.leaving[topic] = previous.leaving.get(topic, 0) + 1
                    previous.write("SUNSUBSCRIBE", topic)
                self._confirmed.discard(topic)
                self._lost.add(topic)
            self._where[topic] = address
            by_link.setdefault(address, []).append(topic)
        for address, topics in by_link.items():
            link = self._links.get(address)
            if link is not None:
                for group in self._ssubscribe_groups(topics):
                    link.write("SSUBSCRIBE", *group)

    def _ssubscribe_groups(self, topics: list[str]) -> list[list[str]]:
        """SSUBSCRIBE's channels must share a slot on a cluster (CROSSSLOT otherwise)."""
        if not self.cluster:
            ordered = sorted(topics)
            return [ordered[i:i + 512] for i in range(0, len(ordered), 512)]
        by_slot: dict[int, list[str]] = {}
        for topic in topics:
            by_slot.setdefault(key_slot(topic.encode()), []).append(topic)
        return [group for _slot, group in sorted(by_slot.items())]

    def _maybe_healed(self) -> None:
        """The last lost topic is confirmed again: the owner checks history."""
        if not self._lost or not self._lost <= self._confirmed:
            return
        if self._heal_task is not None and not self._heal_task.done() and \
                asyncio.current_task() is not self._heal_task:
            return  # the healing task decides when it is over
        self._lost.clear()
        self._on_resubscribed()

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
        if self.cluster:
            # A cluster pipeline is split per master; its `evalsha` method is
            # refused there, the raw command is routed by its first key.
            async with self.commands.pipeline(transaction=False) as pipe:
                for topic in topics:
                    pipe.execute_command("EVALSHA", self._load_state.sha, 2,
                                         meta_key(topic), latest_key(topic))
                return await pipe.execute(raise_on_error=False)
        async with self.commands.pipeline(transaction=False) as pipe:
            for topic in topics:
                pipe.evalsha(self._load_state.sha, 2, meta_key(topic), latest_key(topic))
            return await pipe.execute(raise_on_error=False)

    async def read_heads(self, topics: list[str]) -> list[tuple[str | None, int]]:
        """(epoch, seq) of each topic's seq space as Redis has it now; (None, 0)
        for a topic with none. One round trip per server."""
        async with self.commands.pipeline(transaction=False) as pipe:  # split per master
            for topic in topics:
                pipe.hmget(meta_key(topic), "epoch", "seq")
            replies = await pipe.execute()
        return [(None, 0) if epoch is None else (_text(epoch), int(seq or 0))
                for epoch, seq in replies]

    async def read_since(self, topic: str, seq: int, most: int) -> History:
        """Every event of `topic` after `seq`, if history still holds them all."""
        reply = await self._read_since(keys=[meta_key(topic), history_key(topic)], args=[seq, most])
        if reply[0] is None:  # no seq space: at seq 0 of the unpublished epoch, nothing after
            return History(UNPUBLISHED_EPOCH, 0, [])
        events = list(reply[3:]) if reply[2] == 1 else None
        return History(_text(reply[0]), int(reply[1]), events)
