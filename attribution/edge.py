"""The attribution endpoints of one worker: `/t/{code}` and the admin API, built once.

The worker's routes (gateway/routes.py) hand every request under `/t/` and
`/admin/` here; this object owns the link cache and its follower task, the
click recorder and the two handlers, so the worker itself knows nothing of
links. `start()` and `stop()` bracket the follower's life.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
from websockets.http11 import Request, Response

from attribution import tracking
from attribution.admin import AdminApi
from attribution.link_store import AsyncLinkStore
from attribution.linkcache import LinkCache
from attribution.linksync import LinkSync
from attribution.recorder import ClickRecorder
from attribution.settings import AttributionSettings
from attribution.verdicts import load_patterns


class AttributionEdge:
    PREFIXES = (tracking.PREFIX, "/admin/")

    def __init__(self, settings: AttributionSettings, redis_url: str, commands: aioredis.Redis,
                 *, reconnect_delay: float = 0.5) -> None:
        self.settings = settings
        self.cache = LinkCache()
        self.sync = LinkSync(redis_url, self.cache, reconnect_delay=reconnect_delay)
        self.recorder = ClickRecorder(
            commands, dedupe_window_ms=settings.dedupe_window_ms,
            attribution_window_ms=settings.attribution_window_s * 1000)
        self.tracking = tracking.TrackingRoute(settings, self.cache, self.recorder)
        self.admin = AdminApi(settings.admin_key, AsyncLinkStore(commands),
                              self.tracking.timing, self.sync.caught_up)
        self._task: asyncio.Task | None = None
        self._warm: asyncio.Task | None = None

    def start(self) -> None:
        load_patterns()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self.sync.run())
        self._warm = loop.create_task(self.recorder.warm())

    async def stop(self, grace_s: float = 2.0) -> None:
        """End the follower; a worker's stop never waits on it longer than `grace_s`."""
        task = self._task
        if task is None:
            return
        self.sync.stopping = True
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=grace_s)
        if task in done:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                task.result()

    def handles(self, path: str) -> bool:
        return path.startswith(self.PREFIXES)

    async def answer(self, request: Request, path: str, query: dict[str, list[str]],
                     peer: str | None,
                     body: bytes) -> Response:
        if path.startswith(tracking.PREFIX):
            return await self.tracking.answer(path, query, request.method,
                                              request.headers, peer)
        return await self.admin.answer(request.method, path, request.headers, body)
