"""How the bench feed publishes into each system: one `publish_many` per kind.

`feed.synthetic.SyntheticFeed` paces the updates and hands each tick's batch
to one of these (duck-typed for `feed.publisher.Publisher`):

- `LuaEmitter`: oddsgate's own contract (PROTOCOL.md §7, `redis_contract/publish.lua`):
  history, latest state and PUBLISH on the topic's channel in one step. The
  plain websockets peer subscribes the same channels.
- `SocketIOPyEmitter`: what `socketio.AsyncRedisManager(write_only=True).emit`
  publishes (python-socketio 5.x: JSON on the `socketio` channel), pipelined.
- `SocketIONodeEmitter`: what `@socket.io/redis-emitter` publishes for
  `@socket.io/redis-adapter` 8.x: msgpack `[uid, packet, opts]` on
  `socket.io#/#<room>#`.
- `NatsEmitter`: `PUB` on the NATS client port.

The peers have no seq of their own, so `LocalSeq` numbers each topic's events
exactly as the Lua script does and builds the same JSON, with the `ts` set
when the batch is prepared (as `Publisher` does): latency is measured from
the same moment for every system.
"""

from __future__ import annotations

import asyncio
import secrets
import struct

import orjson
import redis.asyncio as aioredis

from feed.events import PriceUpdate
from feed.publisher import Publisher
from gateway.topics import PartitionMap


class Sent:
    """What an emitter has published: in all and per topic (for exact expectations), and
    each market's newest seq (what a woken player must end up holding, bench spike)."""

    def __init__(self) -> None:
        self.sent = 0
        self.by_topic: dict[str, int] = {}
        self.heads: dict[str, dict[str, int]] = {}  # topic -> market -> seq of its newest

    def count(self, updates: list[PriceUpdate], seqs: list[int]) -> None:
        self.sent += len(updates)
        by_topic = self.by_topic
        heads = self.heads
        for update, seq in zip(updates, seqs, strict=True):
            topic = update.topic
            by_topic[topic] = by_topic.get(topic, 0) + 1
            markets = heads.get(topic)
            if markets is None:
                markets = heads[topic] = {}
            markets[update.market] = seq


class LocalSeq:
    def __init__(self) -> None:
        self.epoch = f"bench-{secrets.token_hex(4)}"
        self.seqs: dict[str, int] = {}

    def event(self, update: PriceUpdate) -> bytes:
        seq = self.seqs.get(update.topic, 0) + 1
        self.seqs[update.topic] = seq
        head = b'{"type":"odds","topic":"%s","epoch":"%s","seq":%d,' % (
            update.topic.encode(), self.epoch.encode(), seq)
        return head + update.body()

    def events(self, updates: list[PriceUpdate]) -> tuple[list[bytes], list[int]]:
        """Each update's event, and its seq, in order."""
        events, seqs = [], []
        for update in updates:
            events.append(self.event(update))
            seqs.append(self.seqs[update.topic])
        return events, seqs


class LuaEmitter(Sent):
    def __init__(self, url: str, pmap: PartitionMap) -> None:
        self.redis = aioredis.Redis.from_url(url)
        self.publisher = Publisher(self.redis, pmap, validate=False)
        super().__init__()

    async def publish_many(self, updates: list[PriceUpdate]) -> None:
        published = await self.publisher.publish_many(updates)
        self.count(updates, [p.seq for p in published])

    async def close(self) -> None:
        await self.redis.aclose()


class _RedisPipelineEmitter(Sent):
    def __init__(self, url: str, pmap: PartitionMap) -> None:
        self.redis = aioredis.Redis.from_url(url)
        self.seq = LocalSeq()
        super().__init__()

    def message(self, topic: str, event: bytes) -> tuple[str, bytes]:
        raise NotImplementedError

    async def publish_many(self, updates: list[PriceUpdate]) -> None:
        events, seqs = self.seq.events(updates)
        async with self.redis.pipeline(transaction=False) as pipe:
            for update, event in zip(updates, events, strict=True):
                pipe.publish(*self.message(update.topic, event))
            await pipe.execute()
        self.count(updates, seqs)

    async def close(self) -> None:
        await self.redis.aclose()


class SocketIOPyEmitter(_RedisPipelineEmitter):
    HOST_ID = "oddsgate-bench-feed"

    def message(self, topic: str, event: bytes) -> tuple[str, bytes]:
        body = (b'{"method":"emit","event":"odds","data":[' + event
                + b'],"binary":false,"namespace":"/","room":' + orjson.dumps(topic)
                + b',"skip_sid":null,"callback":null,"host_id":"' + self.HOST_ID.encode()
                + b'"}')
        return "socketio", body


class SocketIONodeEmitter(_RedisPipelineEmitter):
    UID = "emitter"  # what @socket.io/redis-emitter sends as its uid

    def message(self, topic: str, event: bytes) -> tuple[str, bytes]:
        packet = {"type": 2, "data": ["odds", orjson.loads(event)], "nsp": "/"}
        opts = {"rooms": [topic], "except": [], "flags": {}}
        return f"socket.io#/#{topic}#", msgpack([self.UID, packet, opts])


class NatsEmitter(Sent):
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None
        self.seq = LocalSeq()
        super().__init__()

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        info = await self.reader.readline()
        if not info.startswith(b"INFO"):
            raise ConnectionError(f"nats-server said {info[:80]!r}")
        self.writer.write(b'CONNECT {"verbose":false,"pedantic":false,"name":"bench-feed"}\r\n')
        asyncio.get_running_loop().create_task(self._answer_pings())

    async def _answer_pings(self) -> None:
        assert self.reader is not None and self.writer is not None
        while line := await self.reader.readline():
            if line.startswith(b"PING"):
                self.writer.write(b"PONG\r\n")

    async def publish_many(self, updates: list[PriceUpdate]) -> None:
        if self.writer is None:
            await self._connect()
        assert self.writer is not None
        events, seqs = self.seq.events(updates)
        out = []
        for update, event in zip(updates, events, strict=True):
            subject = update.topic.replace(":", ".").encode()
            out.append(b"PUB %s %d\r\n%s\r\n" % (subject, len(event), event))
        self.writer.write(b"".join(out))
        await self.writer.drain()
        self.count(updates, seqs)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def msgpack(value: object) -> bytes:
    """MessagePack for the shapes a Socket.IO packet has: nil, bool, int, str, list, dict."""
    out: list[bytes] = []
    _pack(value, out)
    return b"".join(out)


def _pack(value: object, out: list[bytes]) -> None:
    if value is None:
        out.append(b"\xc0")
    elif value is True:
        out.append(b"\xc3")
    elif value is False:
        out.append(b"\xc2")
    elif isinstance(value, int):
        if 0 <= value < 128:
            out.append(bytes((value,)))
        elif 0 <= value < 2**32:
            out.append(b"\xce" + struct.pack(">I", value))
        elif 0 <= value < 2**64:
            out.append(b"\xcf" + struct.pack(">Q", value))
        elif -32 <= value < 0:
            out.append(struct.pack(">b", value))
        else:
            out.append(b"\xd3" + struct.pack(">q", value))
    elif isinstance(value, str):
        raw = value.encode()
        n = len(raw)
        if n < 32:
            out.append(bytes((0xA0 | n,)))
        elif n < 256:
            out.append(b"\xd9" + bytes((n,)))
        elif n < 65536:
            out.append(b"\xda" + struct.pack(">H", n))
        else:
            out.append(b"\xdb" + struct.pack(">I", n))
        out.append(raw)
    elif isinstance(value, list | tuple):
        n = len(value)
        out.append(bytes((0x90 | n,)) if n < 16 else b"\xdc" + struct.pack(">H", n))
        for item in value:
            _pack(item, out)
    elif isinstance(value, dict):
        n = len(value)
        out.append(bytes((0x80 | n,)) if n < 16 else b"\xde" + struct.pack(">H", n))
        for key, item in value.items():
            _pack(key, out)
            _pack(item, out)
    else:
        raise TypeError(f"msgpack: cannot pack {type(value).__name__}")


def make_emitter(kind: str, address: str, pmap: PartitionMap):
    """`address`: a Redis URL, or host:port of nats-server's client port."""
    if kind == "lua":
        return LuaEmitter(address, pmap)
    if kind == "socketio_py":
        return SocketIOPyEmitter(address, pmap)
    if kind == "socketio_node":
        return SocketIONodeEmitter(address, pmap)
    if kind == "nats":
        host, port = address.rsplit(":", 1)
        return NatsEmitter(host, int(port))
    raise ValueError(f"unknown emitter {kind!r}")
