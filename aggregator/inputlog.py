"""A region's copy of each provider's stream, in the region's own Redis.

Every provider's messages reach every region directly (never through another
region): the provider's adapter appends them to `og:in:{og:in}:<provider>` in each
region's Redis, one stream per provider whose entry ids are the provider's
own seqs. So a copy is idempotent (a resent message is skipped), gap-checked
(a hole is refused, `input_append.lua`), and readable from any position: the
aggregator re-reads it after its checkpoint's positions when it restarts, and
a region that was away is caught up by the adapter resending from the copy's
last pseq. docs/aggregator.md, "One input order in every region".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from aggregator.inputs import ProviderMessage, encode, parse

APPEND_LUA = (Path(__file__).parent / "input_append.lua").read_text()
DEFAULT_KEEP = 2_000_000  # entries per provider copy (~hours at a busy provider's pace)


class CopyGap(RuntimeError):
    """The region's copy holds a lower pseq than the message before a hole: it needs a backfill."""


# Every copy carries one hash tag, so on a Redis Cluster they share a slot: the
# aggregator reads all of them in one XREAD, which a cluster takes only within one
# slot. The cost: a region's whole input log lives on one shard (it is read by one
# aggregator, in one merged order, anyway). Before the cluster this was og:in:<provider>.
INPUT_PREFIX = "og:in:{og:in}:"


def input_key(provider: str) -> str:
    return f"{INPUT_PREFIX}{provider}"


class InputLog:
    """One region's copies of the providers' streams (the append and the read side)."""

    def __init__(self, redis: aioredis.Redis, keep: int = DEFAULT_KEEP) -> None:
        self.redis = redis
        self.keep = keep
        self._append = redis.register_script(APPEND_LUA)

    async def append(self, messages: Sequence[ProviderMessage]) -> int:
        """Append each provider's next messages in one round trip; returns how many were new."""
        by_provider: dict[str, list] = {}
        for msg in messages:
            by_provider.setdefault(msg.provider, []).extend((msg.pseq, encode(msg)))
        if not by_provider:
            return 0
        try:
            results = await self._run(by_provider)
        except NoScriptError:
            await self.redis.script_load(APPEND_LUA)
            results = await self._run(by_provider)
        added = 0
        for result in results:
            if isinstance(result, ResponseError) and str(result).startswith("GAP"):
                raise CopyGap(str(result))
            if isinstance(result, Exception):
                raise result
            added += int(result)
        return added

    async def _run(self, by_provider: dict[str, list]) -> list:
        async with self.redis.pipeline(transaction=False) as pipe:
            for provider, args in by_provider.items():
                # execute_command, not pipe.evalsha: redis-py's cluster pipeline refuses
                # the method but routes the command by its key
                pipe.execute_command("EVALSHA", self._append.sha, 1, input_key(provider),
                                     self.keep, *args)
            results = await pipe.execute(raise_on_error=False)
        if any(isinstance(r, NoScriptError) for r in results):
            raise NoScriptError("script flushed")
        return results

    async def last_pseq(self, provider: str) -> int:
        """The newest pseq this region's copy holds (0: none)."""
        top = await self.redis.xrevrange(input_key(provider), count=1)
        return int(top[0][0].split(b"-")[0]) if top else 0

    async def read(self, after: dict[str, int], count: int = 2000,
                   block_ms: int | None = None) -> list[ProviderMessage]:
        """Messages after each provider's pseq in `after`, per provider in pseq order."""
        streams = {input_key(p): f"{seq}-0" for p, seq in after.items()}
        reply = await self.redis.xread(streams, count=count, block=block_ms)
        out: list[ProviderMessage] = []
        for _key, entries in reply or ():
            for _id, fields in entries:
                out.append(parse(fields[b"m"]))
        return out

    async def read_all(self, providers: Iterable[str]) -> dict[str, list[ProviderMessage]]:
        """Every message of each copy (tests and rebuilds)."""
        out = {}
        for provider in providers:
            entries = await self.redis.xrange(input_key(provider))
            out[provider] = [parse(fields[b"m"]) for _id, fields in entries]
        return out
