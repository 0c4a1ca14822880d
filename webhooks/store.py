"""The dispatcher's and the CLI's Redis reads and writes: endpoints, deliveries, dead letters.

Every change of a delivery's state is one atomic step (a Lua script or a
MULTI), so a dispatcher killed at any instant leaves each delivery in
exactly one place: due (the sorted set `keys.DUE`), or a dead letter, or
delivered and gone. Consuming a conversion is atomic the same way: the
script that INCRs the partner's sequence and enqueues the deliveries also
XACKs the stream entry, so an entry is either still pending (read again
after a restart) or fully enqueued, never half.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from attribution.keys import CONVERSIONS
from webhooks import keys
from webhooks.endpoints import Endpoint

_ENQUEUE = """
-- KEYS: seq, bodies, deliveries, due, stream
-- ARGV: group, entry id, due ms, head, tail, then (webhook-id, delivery JSON) pairs
local seq = 0
if #ARGV > 5 then
  seq = redis.call('INCR', KEYS[1])
  local body = ARGV[4] .. seq .. ARGV[5]
  for i = 6, #ARGV, 2 do
    redis.call('HSET', KEYS[2], ARGV[i], body)
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
    redis.call('ZADD', KEYS[4], ARGV[3], ARGV[i])
  end
end
redis.call('XACK', KEYS[5], ARGV[1], ARGV[2])
return seq
"""

_CLAIM = """
-- KEYS: due; ARGV: now ms, lease-until ms, limit. Due ids, each pushed back to its lease.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


@dataclass
class Claimed:
    webhook_id: str
    delivery: dict  # webhook_id, endpoint, partner, type, accepted_ns, first_attempt_s, attempts
    body: bytes


def new_delivery(webhook_id: str, endpoint: Endpoint, event_type: str, accepted_ns: int) -> dict:
    return {"webhook_id": webhook_id, "endpoint": endpoint.id, "partner": endpoint.partner,
            "type": event_type, "accepted_ns": accepted_ns, "first_attempt_s": None,
            "attempts": []}


class HookStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._enqueue = redis.register_script(_ENQUEUE)
        self._claim = redis.register_script(_CLAIM)

    # -- endpoints ---------------------------------------------------------------------

    async def endpoints(self) -> dict[str, Endpoint]:
        raw = await self.redis.hgetall(keys.ENDPOINTS)
        return {k.decode(): Endpoint.from_json(v) for k, v in raw.items()}

    async def endpoint(self, endpoint_id: str) -> Endpoint | None:
        raw = await self.redis.hget(keys.ENDPOINTS, endpoint_id)
        return Endpoint.from_json(raw) if raw is not None else None

    async def save_endpoint(self, endpoint: Endpoint) -> None:
        await self.redis.hset(keys.ENDPOINTS, endpoint.id, endpoint.to_json())

    async def stats(self, endpoint_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(keys.endpoint_stats(endpoint_id))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def set_breaker(self, endpoint_id: str, state: str) -> None:
        await self.redis.hset(keys.endpoint_stats(endpoint_id), "breaker", state)

    # -- consuming conversions --------------------------------------------------------------

    async def ensure_group(self) -> None:
        """The consumer group, from the stream's start: conversions accepted before the
        dispatcher first ran are delivered too."""
        try:
            await self.redis.xgroup_create(CONVERSIONS, keys.GROUP, id="0",
                                           mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(self, consumer: str, pending: bool, count: int,
                   block_ms: int) -> list[tuple[bytes, dict]]:
        answer = await self.redis.xreadgroup(
            keys.GROUP, consumer, {CONVERSIONS: "0" if pending else ">"}, count=count,
            block=None if pending else block_ms)
        return [(entry_id, fields) for _stream, entries in answer or []
                for entry_id, fields in entries if fields is not None]

    async def ack(self, entry_id: bytes) -> None:
        await self.redis.xack(CONVERSIONS, keys.GROUP, entry_id)

    async def enqueue(self, entry_id: bytes, partner: str, head: bytes, tail: bytes,
                      deliveries: list[dict], due_ms: int) -> int:
        """Number the event for its partner, enqueue one delivery per endpoint and ack the
        entry, atomically; the partner_seq used (0: no endpoint wanted it, none used)."""
        args: list[bytes | str | int] = [keys.GROUP, entry_id, due_ms, head, tail]
        for delivery in deliveries:
            args += [delivery["webhook_id"], orjson.dumps(delivery)]
        return int(await self._enqueue(
            keys=[keys.partner_seq(partner), keys.BODIES, keys.DELIVERIES, keys.DUE,
                  CONVERSIONS], args=args))

    # -- due deliveries -------------------------------------------------------------------

    async def claim(self, now_ms: int, lease_ms: int, limit: int) -> list[Claimed]:
        ids = await self._claim(keys=[keys.DUE], args=[now_ms, now_ms + lease_ms, limit])
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(keys.DELIVERIES, ids)
            pipe.hmget(keys.BODIES, ids)
            deliveries, bodies = await pipe.execute()
        claimed, stray = [], []
        for wid, delivery, body in zip(ids, deliveries, bodies, strict=True):
            if delivery is None or body is None:
                stray.append(wid)  # finished by a replay or an earlier process: not due
                continue
            claimed.append(Claimed(wid.decode(), orjson.loads(delivery), body))
        if stray:
            await self.redis.zrem(keys.DUE, *stray)
        return claimed

    async def delivered(self, claimed: Claimed) -> None:
        delivery = claimed.delivery
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.DUE, claimed.webhook_id)
            pipe.hdel(keys.DELIVERIES, claimed.webhook_id)
            pipe.hdel(keys.BODIES, claimed.webhook_id)
            stats = keys.endpoint_stats(delivery["endpoint"])
            pipe.hincrby(stats, "delivered", 1)
            if delivery.get("retrying"):
                pipe.hincrby(stats, "retrying", -1)
            await pipe.execute()

    async def retry(self, claimed: Claimed, due_ms: int) -> None:
        delivery = claimed.delivery
        counted = delivery.get("retrying", False)
        delivery["retrying"] = True  # counted once in the endpoint's `retrying`
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.DELIVERIES, claimed.webhook_id, orjson.dumps(delivery))
            pipe.zadd(keys.DUE, {claimed.webhook_id: due_ms})
            stats = keys.endpoint_stats(delivery["endpoint"])
            pipe.hincrby(stats, "failed", 1)
            if not counted:
                pipe.hincrby(stats, "retrying", 1)
            await pipe.execute()

    async def defer(self, webhook_id: str, due_ms: int) -> None:
        """Due again at `due_ms` with no attempt made (breaker open, endpoint limits)."""
        await self.redis.zadd(keys.DUE, {webhook_id: due_ms})

    async def dead(self, claimed: Claimed, failed_attempt: bool) -> None:
        """A dead letter, with its attempts; the body is kept for a replay."""
        delivery = claimed.delivery
        counted = delivery.pop("retrying", False)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.DUE, claimed.webhook_id)
            pipe.hdel(keys.DELIVERIES, claimed.webhook_id)
            pipe.hset(keys.DEAD, claimed.webhook_id, orjson.dumps(delivery))
            stats = keys.endpoint_stats(delivery["endpoint"])
            pipe.hincrby(stats, "dead", 1)
            if failed_attempt:
                pipe.hincrby(stats, "failed", 1)
            if counted:
                pipe.hincrby(stats, "retrying", -1)
            await pipe.execute()

    async def dead_letter_count(self) -> int:
        return int(await self.redis.hlen(keys.DEAD))

    async def due_count(self) -> int:
        return int(await self.redis.zcard(keys.DUE))

    # -- dead letters -----------------------------------------------------------------------

    async def dead_letters(self, partner: str | None = None) -> list[dict]:
        raw = await self.redis.hgetall(keys.DEAD)
        letters = [orjson.loads(v) for v in raw.values()]
        letters = [d for d in letters if partner is None or d["partner"] == partner]
        return sorted(letters, key=lambda d: d["webhook_id"])

    async def replay(self, webhook_ids: list[str], now_ms: int) -> list[str]:
        """Dead letters due again now, same webhook-id, a new retry period; the ids moved."""
        moved = []
        for wid in webhook_ids:
            raw = await self.redis.hget(keys.DEAD, wid)
            if raw is None:
                continue
            delivery = orjson.loads(raw)
            delivery["first_attempt_s"] = None  # a fresh retry period; attempts kept
            delivery["replays"] = delivery.get("replays", 0) + 1
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hdel(keys.DEAD, wid)
                pipe.hset(keys.DELIVERIES, wid, orjson.dumps(delivery))
                pipe.zadd(keys.DUE, {wid: now_ms})
                pipe.hincrby(keys.endpoint_stats(delivery["endpoint"]), "dead", -1)
                await pipe.execute()
            moved.append(wid)
        return moved
