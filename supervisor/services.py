"""What the supervisor runs beside its workers: HAProxy and the /metrics endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from prometheus_client.registry import CollectorRegistry

from supervisor.haproxy import HAProxyProcess, HAProxySettings
from supervisor.metrics import render

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


class MetricsServer:
    """GET /metrics in Prometheus text format; a tiny HTTP/1.0 server on asyncio."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry,
                 before_scrape: Callable[[], None] = lambda: None) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self._before = before_scrape
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  reuse_address=True)
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            if method != "GET":
                status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path.split("?")[0] == "/metrics":
                self._before()
                body = await asyncio.to_thread(render, self.registry)
                status, kind = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
            else:
                status, body, kind = "404 Not Found", b"try /metrics\n", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
