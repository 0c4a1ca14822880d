"""The plain HTTP a worker answers (PROTOCOL.md §6), inside the WebSocket handshake.

websockets hands every request to the worker's `process_request` before
upgrading; the parser (gateway/wsprotocol.py) has already refused what is not
a GET or HEAD without a body. These routes answer the rest: `/healthz`,
`/v1/topics`, `/v1/snapshot` (rate limited per client and on this worker's
reads from Redis, gateway/ratelimit.py), the player shell, the token
check of `/ws`, whose claims go back to the worker for the player's handler,
and the attribution endpoints (`/t/{code}`, `/admin/...`), which
attribution/edge.py answers, and `POST /v1/conversions` (attribution/intake.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from attribution.edge import AttributionEdge
from attribution.intake import ConversionIntake
from attribution.settings import AttributionSettings
from gateway import protocol
from gateway.auth import AuthError, Claims, TokenVerifier, token_from_request
from gateway.broker import RedisBroker
from gateway.config import Settings
from gateway.errors import ErrorCode
from gateway.http import (
    CONVERSIONS_PATH,
    error_response,
    json_response,
    rate_limited,
    request_body,
    response,
)
from gateway.hub import Hub
from gateway.ratelimit import ClientBuckets, client_key, retry_after_s
from gateway.session import RateLimiter
from gateway.static import StaticSite
from gateway.topics import PartitionMap

log = logging.getLogger("oddsgate.worker")


class HttpRoutes:
    def __init__(self, settings: Settings, pmap: PartitionMap, verifier: TokenVerifier,
                 hub: Hub, broker: RedisBroker, *, accepting: Callable[[], bool],
                 draining: Callable[[], bool],
                 region_fresh: Callable[[], bool] = lambda: True,
                 attribution: AttributionSettings | None = None) -> None:
        self.pmap = pmap
        self.verifier = verifier
        self.hub = hub  # its loaded channels answer snapshots from memory
        self.broker = broker
        self.accepting = accepting
        self.draining = draining
        self.region_fresh = region_fresh
        # the player shell: `/` and `/static/`
        self.static_site = StaticSite.load(connect_origins=settings.shell_connect_origins)
        # GET /v1/snapshot: a bucket per client, and one for this worker's reads from Redis.
        self.snapshot_clients = ClientBuckets(settings.snapshot_rate_limit_rps,
                                              settings.snapshot_rate_limit_burst,
                                              settings.snapshot_rate_limit_clients)
        self.snapshot_reads = RateLimiter(settings.snapshot_redis_reads_per_s,
                                          settings.snapshot_redis_reads_per_s)
        # tracking links and the admin API; started and stopped with the worker
        self.attribution = AttributionEdge(
            attribution or AttributionSettings.from_env(), settings.redis_url,
            broker.commands, reconnect_delay=settings.redis_reconnect_s)
        self.conversions = ConversionIntake(self.attribution.settings, broker.commands)

    async def answer(self, conn: ServerConnection, request: Request) -> Response | Claims:
        """The response to a GET, HEAD or POST, or the claims of a player let in on /ws."""
        url = urlsplit(request.path)
        path, query = url.path, parse_qs(url.query)
        if path == "/ws":
            if not self.accepting():
                return response(503, "not accepting players now\n", headers=[("Retry-After", "1")])
            return self._authenticate(request, query)
        if path == "/healthz":
            if self.accepting():
                return response(200, "ok\n")
            if self.draining():
                return response(503, "draining\n")
            if not self.region_fresh():  # PROTOCOL.md §8: the region cannot serve
                return response(503, "region stale: no aggregator progress\n")
            return response(503, "starting\n")
        if path == "/v1/topics":
            return json_response(200, self.pmap.to_dict())
        if path == "/v1/snapshot":
            claims = self._authenticate(request, query)
            refused = self._limit_snapshot(conn, request, claims)
            if refused is not None:
                return refused
            return await self._snapshot(request, query, claims)
        if path == CONVERSIONS_PATH:  # POST only (gateway/http.py)
            return await self.conversions.answer(request.headers, request_body(request))
        if self.attribution.handles(path):
            peer = conn.remote_address
            return await self.attribution.answer(request, path, query,
                                                 peer[0] if peer else None,
                                                 request_body(request))
        return self.static_site.respond(path, request.headers)

    def _authenticate(self, request: Request, query: dict) -> Claims | Response:
        token = token_from_request(request.headers.get_all("Cookie"), query)
        try:
            return self.verifier.verify(token)
        except AuthError as exc:
            return response(401, f"{exc}\n", headers=[("WWW-Authenticate", "Bearer")])

    def _limit_snapshot(self, conn: ServerConnection, request: Request,
                        claims: Claims | Response) -> Response | None:
        """429 for a client over its snapshot rate (gateway/ratelimit.py), else None.

        Asked before a bad token's 401 is answered: requests with bad tokens
        count against their address, so a flood of them is refused too.
        """
        peer = conn.remote_address
        key = client_key(claims if isinstance(claims, Claims) else None,
                         peer[0] if peer else None,
                         request.headers.get_all("X-Forwarded-For"))
        wait_s = self.snapshot_clients.admit(key, time.monotonic())
        if wait_s is None:
            return None
        return rate_limited("too many snapshot requests from this client; retry later", wait_s)

    async def _snapshot(self, request: Request, query: dict,
                        claims: Claims | Response) -> Response:
        if isinstance(claims, Response):
            return claims
        topics = query.get("topic", [])
        if len(topics) != 1:
            return error_response(400, ErrorCode.BAD_REQUEST, "give exactly one topic=")
        topic = topics[0]
        if not self.pmap.is_topic(topic):
            return error_response(404, ErrorCode.UNKNOWN_TOPIC, f"{topic[:80]!r} is not a topic")
        if not claims.allows(topic):
            return error_response(403, ErrorCode.FORBIDDEN, "topic not allowed for this token")
        channel = self.hub.channels.get(topic)
        if channel is not None and channel.ready:
            return json_response(200, channel.snapshot())
        if not self.snapshot_reads.allow(time.monotonic()):  # Redis is every worker's
            return rate_limited("this worker reads too many snapshots now; retry later",
                                retry_after_s(self.snapshot_reads))
        try:
            state = await self.broker.load_state(topic)
        except Exception as exc:
            log.warning("snapshot read of %s failed: %s", topic, exc, extra={"topic": topic})
            return error_response(503, "unavailable", "upstream unavailable, retry")
        return json_response(200, protocol.snapshot(topic, state.epoch, state.seq, state.markets))
