"""A population following topics and a feed: what steady, spike and saturation measure.

Setting up 10,000 players costs more than measuring them on this machine, so
the fan-out scenarios run as phases of a session (session.py) on one
population. One fresh Redis and one fresh server per session. Players connect; a few
extra connections then open every topic's channel, a few topics at a time
(the crowd finds them warm, as it would in production, where the popular
topics never close; cold opens are `subscribe`'s business); then the players
subscribe, before the feed starts, so every oddsgate player holds its
snapshot and a peer's first event of a topic sets its base. The warming
connections stay open but count in no figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench import population
from bench.feedproc import FeedProcess
from bench.harness import Harness
from bench.loadgen import LoadGenPool
from bench.systems import System, Target
from supervisor.embedded_redis import EmbeddedRedis

SUBSCRIBE_WAIT_S = 120.0


@dataclass
class Fanout:
    target: Target
    redis: EmbeddedRedis
    pool: LoadGenPool
    feed: FeedProcess
    feed_info: dict
    plans: list[list[str]]
    connected: int
    synced: int
    rss_base: int
    followers: dict[str, int]  # players following each topic, stalled and dropped ones out
    setup: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dropped: set[int] = field(default_factory=set)

    def measure(self, h: Harness, system: System, seconds: float) -> dict:
        return h.measure(self.pool, system, seconds, connections=self.connected - len(self.dropped),
                         rss_base=self.rss_base, feed=self.feed, redis=self.redis,
                         followers=self.followers)

    def exclude(self, indices: list[int]) -> None:
        """These players (stalled, dropped) no longer count in expected deliveries."""
        left = set(indices)
        self.followers = population.follower_counts(
            [t for i, t in enumerate(self.plans) if i not in left and i not in self.dropped])

    def drop(self, indices: list[int]) -> None:
        self.pool.call("drop", indices=indices)
        self.dropped.update(indices)
        self.exclude([])
