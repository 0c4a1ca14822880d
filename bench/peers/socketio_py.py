"""python-socketio with its Redis manager, served by aiohttp on uvloop.

The way its documentation scales Socket.IO across processes: an
`AsyncRedisManager` client manager; an aggregator publishes through a
write-only manager (here: bench.emitters.SocketIOPyEmitter, which sends the
same JSON message) and every server emits to its local room. A player joins
one room per topic with the `subscribe` event (acknowledged).

Runs from the bench's own virtualenv (bench/peers/.venv):

    bench/peers/.venv/bin/python bench/peers/socketio_py.py --port 8200 \
        --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio

import socketio
import uvloop
from aiohttp import web


def build_app(redis_url: str) -> web.Application:
    manager = socketio.AsyncRedisManager(redis_url)
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=manager,
                               transports=["websocket"], logger=False, engineio_logger=False,
                               cors_allowed_origins=None)

    @sio.on("subscribe")
    async def subscribe(sid: str, topics: list[str]) -> list[str]:
        for topic in topics:
            await sio.enter_room(sid, topic)
        return topics

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    sio.attach(app)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args()
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(build_app(args.redis_url), host="127.0.0.1", port=args.port, print=None,
                access_log=None, backlog=1024)
