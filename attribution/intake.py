"""`POST /v1/conversions` on a worker: the asyncio shell around attribution/conversions.py.

Order of the answer's checks: the operator's key first (401 before anything
about the body, so a caller without a key learns nothing), then the body
(400 naming the field), then the click (never an error: a conversion that
credits nobody is stored with its reason). The parser has already refused
bodies over 16 KiB (413, gateway/http.py).

Redis is asked at most three things per conversion: og:keys when the
worker's copy is due (operator_keys.KeyCache), the click's index (skipped
for a forged or expired id), and the one script that stores the answer and
appends the record (record_conversion.lua). Should Redis fail, the answer
is 503 with Retry-After and nothing half-stored: the operator retries with
the same `id`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from ulid import ULID
from websockets.datastructures import Headers
from websockets.http11 import Response

from attribution import keys
from attribution.conversions import (
    Attribution,
    Conversion,
    ConversionError,
    attribute,
    check_click_id,
    outcome,
    reference_ns,
)
from attribution.operator_keys import KeyCache, bearer_key
from attribution.settings import AttributionSettings
from gateway.http import error_response, json_response

log = logging.getLogger("oddsgate.conversions")

RECORD_CONVERSION_LUA = (Path(__file__).parent / "record_conversion.lua").read_text()


def _error(status: int, code: str, message: str, field: str | None = None,
           headers: list[tuple[str, str]] | None = None) -> Response:
    """The worker's `error` shape (gateway/http.py), never cached, plus the bad `field`."""
    return error_response(status, code, message, headers or (), field=field, cache="no-store")


def _unauthorized(message: str) -> Response:
    return _error(401, "unauthorized", message, headers=[("WWW-Authenticate", "Bearer")])


def _text_fields(raw: dict) -> dict[str, str]:
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes)
                                                          else v) for k, v in raw.items()}


class ConversionIntake:
    """Answers POST /v1/conversions; one per worker, over the worker's Redis commands."""

    def __init__(self, settings: AttributionSettings, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.click_keys = settings.keys  # None: OG_CLICK_KEYS empty, click ids unverifiable
        self.window_s = settings.attribution_window_s
        self.operator_keys = KeyCache()
        self._keys_lock = asyncio.Lock()  # one read of og:keys at a time, not one per request
        self._record = redis.register_script(RECORD_CONVERSION_LUA)

    async def answer(self, headers: Headers, body: bytes) -> Response:
        try:
            return await self._answer(headers, body)
        except (RedisError, OSError, TimeoutError) as exc:  # nothing was stored
            log.warning("conversion not taken: %s", exc)
            return _error(503, "unavailable", "conversions cannot be stored now; retry with "
                          "the same id", headers=[("Retry-After", "1")])

    async def _answer(self, headers: Headers, body: bytes) -> Response:
        values = headers.get_all("Authorization")
        key = bearer_key(values[0]) if len(values) == 1 else None
        if key is None:
            return _unauthorized("an operator API key is required: "
                                 "Authorization: Bearer <key>")
        if await self._operator(key) is None:
            return _unauthorized("unknown or revoked operator API key")
        try:
            conversion = Conversion.parse(body)
        except ConversionError as exc:
            return _error(400, "bad_request", str(exc), field=exc.field)
        if self.click_keys is None:
            return _error(503, "unavailable", "click ids cannot be verified: this worker has "
                          "no OG_CLICK_KEYS", headers=[("Retry-After", "60")])
        received = time.time_ns()
        reference = reference_ns(conversion, received)
        decided = check_click_id(conversion.click_id, self.click_keys, reference,
                                 self.window_s)
        if not isinstance(decided, Attribution):
            click = await self.redis.hgetall(keys.click_index(conversion.click_id))
            decided = attribute(_text_fields(click) if click else None, reference,
                                self.window_s)
        result = outcome(conversion, decided, str(ULID()), received)
        _taken, answer = await self._record(
            keys=[keys.conversion_idempotency(conversion.id), keys.CONVERSIONS],
            args=[result.answer, result.record])
        return json_response(202, bytes(answer), cache="no-store")

    async def _operator(self, key: str) -> str | None:
        """The name of the operator's key, reading og:keys first when the copy is due."""
        name = self.operator_keys.match(key)
        if self.operator_keys.needs_reading(time.monotonic(), matched=name is not None):
            async with self._keys_lock:
                # another request may have read it while this one waited
                if self.operator_keys.needs_reading(time.monotonic(),
                                                    matched=name is not None):
                    raw = await self.redis.hgetall(keys.OPERATOR_KEYS)
                    self.operator_keys.replace(raw, time.monotonic())
            name = self.operator_keys.match(key)
        return name
