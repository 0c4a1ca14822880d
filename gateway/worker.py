"""Run one worker process on uvloop until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop

from gateway.config import Settings
from gateway.server import Worker

log = logging.getLogger("oddsgate.worker")


async def serve_worker(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set or the process is told to stop."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = Worker(settings)
    await worker.start()
    log.info(
        "worker %d listening on %s:%d (redis %s)",
        settings.worker_index, settings.host, worker.port, settings.redis_url,
    )
    try:
        await stop.wait()
    finally:
        log.info("worker %d stopping", settings.worker_index)
        await worker.stop()


def run(settings: Settings) -> None:
    uvloop.run(serve_worker(settings))
