"""The obvious hand-rolled baseline: websockets + redis-py, one process, broadcast.

What a team writes in an afternoon: one Redis pub/sub connection, SUBSCRIBE
a topic's channel when its first player asks, and forward every Redis message
to each follower with `await websocket.send(...)`. No snapshot, no replay,
no batching, no back-pressure policy. Runs on uvloop so the comparison with
oddsgate is about design, not about the event loop.

Protocol (the bench's PlainConn speaks it): the client sends
`{"op":"subscribe","topics":[...]}`, the server answers
`{"type":"subscribed","topics":[...]}` once Redis confirmed the channels,
then forwards each event's JSON as one text frame.

    python bench/peers/plain_ws.py --port 8100 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal

import redis.asyncio as aioredis
import uvloop
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

KEEPALIVE_CHANNEL = "bench:plain:keepalive"  # so listen() has something from the start


class Broadcaster:
    def __init__(self, redis_url: str) -> None:
        self.redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
        self.pubsub = self.redis.pubsub()
        self.followers: dict[str, set[ServerConnection]] = {}
        self.confirmed: set[str] = set()
        self.waiters: dict[str, list[asyncio.Future]] = {}

    async def start(self) -> None:
        await self.pubsub.subscribe(KEEPALIVE_CHANNEL)
        asyncio.get_running_loop().create_task(self.forward())

    async def forward(self) -> None:
        async for message in self.pubsub.listen():
            kind = message["type"]
            if kind == "smessage":  # publish.lua sends with SPUBLISH
                for ws in list(self.followers.get(message["channel"], ())):
                    with contextlib.suppress(ConnectionClosed):
                        await ws.send(message["data"])
            elif kind == "ssubscribe":
                self.confirmed.add(message["channel"])
                for fut in self.waiters.pop(message["channel"], []):
                    if not fut.done():
                        fut.set_result(None)

    async def follow(self, ws: ServerConnection, topics: list[str]) -> None:
        new = []
        for topic in topics:
            self.followers.setdefault(topic, set()).add(ws)
            if topic not in self.confirmed:
                fut = asyncio.get_running_loop().create_future()
                self.waiters.setdefault(topic, []).append(fut)
                new.append(fut)
        unsent = [t for t in topics if t not in self.confirmed and len(self.waiters[t]) == 1]
        if unsent:
            await self.pubsub.ssubscribe(*unsent)
        if new:
            await asyncio.gather(*new)

    def leave(self, ws: ServerConnection, topics: list[str]) -> None:
        for topic in topics:
            self.followers.get(topic, set()).discard(ws)


async def main(port: int, redis_url: str) -> None:
    hub = Broadcaster(redis_url)
    await hub.start()

    async def handler(ws: ServerConnection) -> None:
        followed: list[str] = []
        try:
            async for raw in ws:
                request = json.loads(raw)
                if request.get("op") == "subscribe":
                    topics = [str(t) for t in request.get("topics", [])]
                    await hub.follow(ws, topics)
                    followed += topics
                    await ws.send(json.dumps({"type": "subscribed", "topics": topics}))
        except ConnectionClosed:
            pass
        finally:
            hub.leave(ws, followed)

    def health(conn: ServerConnection, request: Request) -> Response | None:
        if request.path == "/healthz":
            return conn.respond(200, "ok\n")
        return None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(handler, "127.0.0.1", port, process_request=health, compression=None,
                     max_queue=16):
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    uvloop.run(main(args.port, args.redis_url))
