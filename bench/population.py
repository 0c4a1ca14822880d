"""Who follows what: seeded Zipf draws of topics per connection.

Topics are ranked by their share of the feed (busiest first, from the same
synthetic universe the feed publishes), and each connection follows
`per_conn` distinct topics drawn with weight 1/(rank+1)^s. From the plan and
the feed's shares the bench knows how many deliveries a rate should produce,
so a run can say what fraction of them actually arrived (exactly, from
what the feed published per topic in the interval, times each topic's
followers).
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass

from bench.feedproc import bench_feed
from feed.synthetic import ZIPF_EXPONENT


@dataclass(frozen=True)
class Universe:
    topics: list[str]  # busiest first
    shares: dict[str, float]  # of the feed's normal rate

    @classmethod
    def build(cls, seed: int) -> Universe:
        feed = bench_feed(seed)
        return cls(feed.topics_by_popularity(), feed.topic_shares())

    @property
    def market_topics(self) -> int:
        return sum(1 for t in self.topics if t.count(":") == 3)


def plan(universe: Universe, connections: int, per_conn: int, seed: int,
         exponent: float = ZIPF_EXPONENT) -> list[list[str]]:
    rng = random.Random(seed)
    topics = universe.topics
    per_conn = min(per_conn, len(topics))
    cum = list(itertools.accumulate(1.0 / (rank + 1) ** exponent for rank in range(len(topics))))
    total = cum[-1]
    plans = []
    for _ in range(connections):
        chosen: list[str] = []
        while len(chosen) < per_conn:
            topic = topics[min(bisect.bisect_right(cum, rng.random() * total), len(topics) - 1)]
            if topic not in chosen:
                chosen.append(topic)
        plans.append(chosen)
    return plans


def follower_counts(plans: list[list[str]]) -> dict[str, int]:
    """How many of these players follow each topic."""
    counts: dict[str, int] = {}
    for topics in plans:
        for topic in topics:
            counts[topic] = counts.get(topic, 0) + 1
    return counts


def followers(plans: list[list[str]], topic: str) -> list[int]:
    return [i for i, topics in enumerate(plans) if topic in topics]
