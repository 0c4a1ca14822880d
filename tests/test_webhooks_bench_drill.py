"""The webhook drill, small: every healthy partner's conversion is delivered, none lost,
while 3 partners fail and 2 hang. What it counts, not how fast."""

from __future__ import annotations

from bench.webhooks import FAILING, HANGING, PARTNERS, drill
from tests.conftest import ROOT


async def test_the_drill_loses_nothing_for_healthy_partners(redis_url: str) -> None:
    figures = await drill(redis_url, ROOT, rate=100, seconds=1.0, drain_s=30.0, timeout_s=1.0)
    healthy = PARTNERS - FAILING - HANGING
    assert figures["healthy_conversions"] == 100 * healthy // PARTNERS
    assert figures["lost"] == 0
    assert figures["delivered_healthy"] == figures["healthy_conversions"]
    assert figures["latency_ms"]["p99"] is not None
    assert figures["attempts"] >= 100
