"""`oddsgate providers`: the synthetic providers, appended to every region's input log.

It stands where real provider adapters stand: each provider's messages go to
each region's own Redis directly (`InputLog.append`), one writer per region,
so a region that is down or slow delays only its own copy. A writer that
lost its region keeps what it could not append (up to `buffer_s` of
messages) and, when the region is back, appends from the copy's last pseq:
the copy is the provider's stream exactly, or it says where it broke.

The simulation is a pure function of the seed and its origin time
(`aggregator.providers.ProviderSet`), so the origin is written to every
region (`og:in:origin`) and a restarted feeder takes it up from there:
the messages it produces again are the same, and the regions skip them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from aggregator.inputlog import CopyGap, InputLog
from aggregator.inputs import ProviderMessage
from aggregator.providers import ProviderSet
from redis_contract import target

log = logging.getLogger("oddsgate.providers")

ORIGIN_KEY = "og:in:origin"
TICK_S = 0.02


@dataclass
class RegionCopy:
    """The writer of one region's copies, and what it still owes that region."""

    name: str
    log: InputLog
    buffer_s: float
    pending: collections.deque  # ProviderMessage, oldest first
    broken: str = ""  # why this region's copy cannot be completed from here
    appended: int = 0
    connected: bool = False

    def owe(self, messages: list[ProviderMessage], now_ns: int) -> None:
        self.pending.extend(messages)
        horizon = now_ns - int(self.buffer_s * 1e9)
        dropped = 0
        while self.pending and self.pending[0].pts < horizon:
            self.pending.popleft()
            dropped += 1
        if dropped and not self.broken:
            self.broken = f"away longer than {self.buffer_s:g}s: {dropped} messages let go"
            log.error("region %s: %s; its copy needs a rebuild", self.name, self.broken)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self.pending:
                await asyncio.sleep(TICK_S)
                continue
            batch = list(self.pending)
            try:
                self.appended += await self.log.append(batch)
                for _ in batch:
                    self.pending.popleft()
                if not self.connected:
                    log.info("region %s: input copy up to date", self.name)
                self.connected = True
            except CopyGap as exc:
                self.broken = str(exc)
                log.error("region %s: %s", self.name, exc)
                await asyncio.sleep(1.0)
            except (RedisError, OSError) as exc:
                if self.connected:
                    log.warning("region %s unreachable (%s); keeping its messages", self.name,
                                exc)
                self.connected = False
                await asyncio.sleep(0.25)


async def origin_of(regions: list[RegionCopy], proposed_ns: int) -> int:
    """The simulation's origin every region agrees on (set by the first feeder)."""
    seen: set[int] = set()
    for region in regions:
        try:
            await region.log.redis.set(ORIGIN_KEY, proposed_ns, nx=True)
            value = await region.log.redis.get(ORIGIN_KEY)
            if value is not None:
                seen.add(int(value))
        except (RedisError, OSError) as exc:
            log.warning("region %s unreachable at start (%s)", region.name, exc)
    if len(seen) > 1:
        raise RuntimeError(f"regions disagree on the providers' origin ({sorted(seen)}): "
                           "their input logs are of different runs")
    if not seen:
        raise RuntimeError("no region reachable to agree on the providers' origin")
    return seen.pop()


async def feed_regions(urls: dict[str, str], seed: int, stop: asyncio.Event, *,
                       buffer_s: float = 600.0) -> list[RegionCopy]:
    """Run the providers in real time into every region until `stop`."""
    regions = [RegionCopy(name, InputLog(target.async_client(url)), buffer_s,
                          collections.deque()) for name, url in urls.items()]
    origin = await origin_of(regions, time.time_ns())
    providers = ProviderSet(seed, start_ns=origin)
    log.info("providers %s (seed %s, origin %d) into regions %s", ",".join(providers.names),
             seed, origin, ",".join(urls))
    writers = [asyncio.create_task(r.run(stop)) for r in regions]
    t = origin
    try:
        while not stop.is_set():
            now = time.time_ns()
            if now > t:
                messages = providers.messages_between(t, now)
                t = now
                for region in regions:
                    region.owe(messages, now)
            await asyncio.sleep(TICK_S)
    finally:
        stop.set()
        await asyncio.gather(*writers, return_exceptions=True)
        for region in regions:
            await region.log.redis.aclose()
    return regions
