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



class ChildService:
    """One `oddsgate` subcommand the node runs beside its workers, restarted when it dies.

    A growing backoff between restarts (0.5 s doubling to 30 s); `stopped_for_good`
    says when an exit must not be restarted. Each service names its command and
    what it is for the log; the region, when given, is passed as OG_REGION.
    """

    command: tuple[str, ...] = ()
    what = ""

    def __init__(self, redis_url: str, region: str = "", log_path: Path | None = None) -> None:
        self.redis_url = redis_url
        self.region = region
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._watch: asyncio.Task | None = None
        self._stopping = False

    @property
    def label(self) -> str:
        return f"{self.what} of region {self.region}" if self.region else self.what

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    async def _launch(self) -> None:
        import os
        import sys

        env = {**os.environ, "OG_REDIS_URL": self.redis_url}
        if self.region:
            env["OG_REGION"] = self.region
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "supervisor.cli", *self.command, env=env,
                stdout=out, stderr=asyncio.subprocess.STDOUT if out else None)
        finally:
            if out is not None:
                out.close()
        log.info("%s started (pid %d)", self.label, self.proc.pid)

    async def start(self) -> None:
        await self._launch()
        self._watch = asyncio.create_task(self._supervise())

    def stopped_for_good(self, code: int) -> bool:
        """Whether exit `code` ends this service until an operator acts (never, by default)."""
        return False

    async def _supervise(self) -> None:
        backoff = 0.5
        while not self._stopping and self.proc is not None:
            code = await self.proc.wait()
            if self._stopping or self.stopped_for_good(code):
                return
            log.error("%s exited with %s; restarting in %.1fs", self.label, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(30.0, backoff * 2)
            try:
                await self._launch()
                self.restarts += 1
            except OSError as exc:
                log.error("%s restart failed: %s", self.label, exc)

    async def stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class AggregatorService(ChildService):
    """The region's aggregator (`oddsgate aggregate`) on the node configured to host it.

    Restarted when it dies, with a growing backoff, except after exit 4: a
    diverged region must stay stopped (its workers fail /healthz, its
    players go to other regions) until an operator rebuilds it.
    """

    command = ("aggregate",)
    what = "aggregator"

    def __init__(self, redis_url: str, region: str, log_path: Path | None = None) -> None:
        super().__init__(redis_url, region, log_path)
        self.diverged = False
        # Its latest status (aggregator.service's status key), read every second for
        # /metrics; `status_at` the monotonic time it was read (0: never).
        self.status: dict = {}
        self.status_at = 0.0
        self._poll: asyncio.Task | None = None

    async def start(self) -> None:
        await super().start()
        self._poll = asyncio.create_task(self._follow_status())

    def stopped_for_good(self, code: int) -> bool:
        from aggregator.service import EXIT_DIVERGED

        if code != EXIT_DIVERGED:
            return False
        self.diverged = True
        log.error("aggregator of region %s stopped: its stream may differ from the "
                  "other regions' (exit %d); not restarted. Rebuild the region: "
                  "`oddsgate aggregate --rebuild`", self.region, code)
        return True

    async def _follow_status(self, interval_s: float = 1.0) -> None:
        import time

        import orjson

        from aggregator.service import status_key
        from aggregator.settings import AggregatorSettings
        from redis_contract import target

        try:
            stream = AggregatorSettings.from_env().stream
        except ValueError:
            return  # the aggregator itself says why, exit 2, in the log
        client = target.async_client(self.redis_url)
        try:
            while not self._stopping:
                try:
                    raw = await client.get(status_key(stream))
                    if raw is not None:
                        self.status = orjson.loads(raw)
                        self.status_at = time.monotonic()
                except Exception as exc:  # /metrics shows the status ageing
                    log.debug("aggregator status unreadable: %s", exc)
                await asyncio.sleep(interval_s)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
        await super().stop()


class WebhookDispatcherService(ChildService):
    """The region's webhook dispatcher (`oddsgate webhooks run`) on the node set to host it.

    Restarted when it dies, with a growing backoff. A kill loses nothing:
    what it was delivering is due again in Redis once its lease ends
    (webhooks/store.py), and what it had read of the conversions stream
    without enqueueing is still pending in its consumer group.
    """

    command = ("webhooks", "run")
    what = "webhook dispatcher"

    def __init__(self, redis_url: str, log_path: Path | None = None) -> None:
        super().__init__(redis_url, "", log_path)


class StatsService(ChildService):
    """The partner statistics service (`oddsgate stats run`) on a node with OG_STATS=1.

    Restarted with a growing backoff: a restarted service re-reads what it had
    not acknowledged and counts nothing twice (attribution/stats_service.py).
    """

    command = ("stats", "run")
    what = "statistics service"
