"""What the supervisor runs beside its workers: HAProxy (/metrics: supervisor/metrics.py)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import orjson

from haproxy.settings import HAProxySettings
from supervisor import logformat
from supervisor.haproxy import HAProxyProcess

log = logging.getLogger("oddsgate.services")
haproxy_log = logging.getLogger("oddsgate.haproxy")

# HAProxy's own diagnostics start with their severity; its request log lines
# (and the raw copies of server state changes) carry none and are INFO.
_DIAGNOSTIC_LEVELS = {"[NOTICE]": logging.INFO, "[WARNING]": logging.WARNING,
                      "[ALERT]": logging.ERROR, "[EMERG]": logging.CRITICAL}


def relay_haproxy_line(line: str, pid: int | None = None) -> None:
    """One line of HAProxy's output into this process's log, in its format.

    A JSON request line (OG_LOG_FORMAT=json, haproxy/render.py) becomes a
    record whose fields are the line's and whose message is the request and
    its status; any other line is the message as HAProxy wrote it. HAProxy
    redacted the request already; the log's redaction filter runs again.
    """
    level, message, fields = logging.INFO, line, {}
    if line.startswith("{"):
        try:
            parsed = orjson.loads(line)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            fields = parsed
            message = f"{parsed.get('request', '')} {parsed.get('status', '')}".strip()
    else:
        level = _DIAGNOSTIC_LEVELS.get(line.split(" ", 1)[0], logging.INFO)
    logformat.emit(haproxy_log, level, message, fields, role="haproxy", pid=pid)


class HAProxyService:
    """Starts HAProxy with the rendered file, and restarts it if it dies."""

    def __init__(self, settings: HAProxySettings, runtime_dir: Path) -> None:
        self.process = HAProxyProcess(settings, runtime_dir, on_line=relay_haproxy_line)
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

