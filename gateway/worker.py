"""Run one worker process on uvloop until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import uvloop

from gateway.config import Settings
from gateway.fleet import FleetTable
from gateway.reporter import FleetReporter
from gateway.server import Worker

log = logging.getLogger("oddsgate.worker")


async def serve_worker(settings: Settings, stop: asyncio.Event | None = None) -> int:
    """Serve until `stop` is set or the process is told to stop; the exit code."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = Worker(settings)
    table = FleetTable.attach(settings.fleet) if settings.fleet else None
    reporter = reporter_task = gc_task = None
    if settings.gc_managed:
        worker.gc.install()
        gc_task = asyncio.create_task(worker.gc.run(
            lambda: len(worker.connections),
            hold=lambda: worker.draining and bool(worker.connections)))
    try:
        if table is not None:
            reporter = FleetReporter(worker, table.worker_writer(settings.fleet_slot),
                                     table=table)
            reporter.start()
            reporter_task = asyncio.create_task(reporter.run())
        try:
            await worker.start()
        except OSError as exc:
            log.error("worker %d cannot listen on %s:%d%s: %s", settings.worker_index,
                      settings.host, settings.port,
                      f" and :{settings.click_port} (clicks)" if settings.click_port else "",
                      exc.strerror or exc)
            return 1
        log.info("worker %d listening on %s:%d%s (redis %s)", settings.worker_index,
                 settings.host, worker.port,
                 f", clicks on :{worker.clicks.port}" if worker.clicks is not None else "",
                 settings.redis_url)
        await stop.wait()
        log.info("worker %d stopping", settings.worker_index)
        await worker.stop()
        return 0
    finally:
        for task in (reporter_task, gc_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        worker.gc.uninstall()
        if reporter is not None:
            reporter.publish()  # the last word: STOPPING, final counters
        if table is not None:
            table.close()


def run(settings: Settings) -> int:
    return uvloop.run(serve_worker(settings))
