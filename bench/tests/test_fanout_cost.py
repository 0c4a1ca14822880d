"""bench.fanout_cost drives the real hub: every event reaches each of its followers."""

from __future__ import annotations

import asyncio

from bench.fanout_cost import measure


def test_every_event_reaches_its_followers_and_costs_something() -> None:
    delivered, cpu_s = asyncio.run(measure(players=40, topics=4, turns=20, seed=2))
    # 40 players x 3 of 4 topics: each event reaches 30 followers on average
    assert 40 * 20 * 2 * 3 // 4 // 2 < delivered <= 40 * 20 * 2
    assert cpu_s > 0
