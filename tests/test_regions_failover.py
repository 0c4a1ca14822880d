"""Issue 16, point 8: a whole region killed under 500 players with prices flowing.

Two full regions from `oddsgate demo --regions 2 --no-players --status-file`
(each its Redis with its input log, its aggregator, a node with HAProxy;
shared providers). 500 players hold both regions' URLs, half starting on
each; every process of region A is SIGKILLed. Every player of region A must
be resumed in region B (no reset: the regions' streams are the same bytes)
and get new prices there, with no PROTOCOL.md §5 violation anywhere. The
1 s p99 is the bench's to report (bench `failover`); here every player must
get there within the drill's 5 s.
"""

from __future__ import annotations

import pytest

from aggregator.providers import default_markets
from bench.failover import drill, start_regions
from gateway.topics import PartitionMap, topic_for_market
from supervisor.embedded_redis import free_port_range

TOPICS = sorted({topic_for_market(PartitionMap.load(None), *map(int, m.market.split(":")))
                 for m in default_markets()})


@pytest.mark.timeout(240)
async def test_a_region_killed_under_500_players_moves_them_all_without_a_reset(
        tmp_path) -> None:
    regions = start_regions(tmp_path, free_port_range(2))
    try:
        figures = await drill(regions, 500, TOPICS)
    finally:
        regions.stop()
    assert figures["violations"] == 0, figures["violation_samples"]
    assert figures["resets"] == 0
    moved = figures["on_killed_region"]
    assert moved >= 200  # about half of them started on region A
    assert figures["resumed"] == moved and figures["fresh_prices"] == moved, figures
    assert figures["failovers"] == moved
