"""The worker's Redis broker at start (gateway/broker.py)."""

from __future__ import annotations

import hashlib

import redis

from gateway.broker import LOAD_STATE_LUA, READ_SINCE_LUA, RedisBroker


async def test_start_loads_the_scripts_before_the_first_player(redis_url: str) -> None:
    """A cold start's first subscribes used to pay for a NOSCRIPT round trip and the
    command connections' connects; both happen at start now."""
    admin = redis.Redis.from_url(redis_url)
    admin.script_flush()
    shas = [hashlib.sha1(s.encode()).hexdigest() for s in (LOAD_STATE_LUA, READ_SINCE_LUA)]
    assert admin.script_exists(*shas) == [False, False]
    broker = RedisBroker(redis_url, lambda topic, event: None)
    try:
        await broker.start()
        assert admin.script_exists(*shas) == [True, True]
    finally:
        await broker.close()
        admin.close()
