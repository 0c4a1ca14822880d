"""What the supervisor runs beside its workers: HAProxy (/metrics: supervisor/metrics.py)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from haproxy.settings import HAProxySettings
from supervisor.haproxy import HAProxyProcess

log = logging.getLogger("oddsgate.services")


class HAProxyService:
    """Starts HAProxy with the rendered file, and restarts it if it dies."""

    def __init__(self, settings: HAProxySettings, runtime_dir: Path) -> None:
        self.process = HAProxyProcess(settings, runtime_dir, inherit_output=True)
        self.stats_socket = self.process.settings.stats_socket
        self._watch: asyncio.Task | None = None
        self._stopping = False
        self.restarts = 0

    async def start(self) -> None:
        await asyncio.to_thread(self.process.start)
        log.info("haproxy listening on %s:%d (pid %s)", self.process.settings.bind_host,
                 self.process.settings.bind_port, self.process.pid)
        self._watch = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        backoff = 0.5
        while not self._stopping:
            await asyncio.sleep(0.5)
            if self.process.running or self._stopping:
                continue
            log.error("haproxy exited; restarting in %.1fs", backoff)
            await asyncio.sleep(backoff)
            try:
                await asyncio.to_thread(self.process.start)
                self.restarts += 1
                backoff = 0.5
            except Exception as exc:
                log.error("haproxy restart failed: %s", exc)
                backoff = min(30.0, backoff * 2)

    async def stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        await asyncio.to_thread(self.process.stop)

