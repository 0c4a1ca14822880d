"""Issue 16, point 8: the same input log gives identical bytes in every region.

End to end through the plain parts: synthetic providers (outages, stale
stretches, outliers, lone and market-wide suspensions, closures) make the
input log; each "region" receives every provider's copy at its own pace
(each message after a random delay within its provider's own delay, so
copies interleave differently), merges it and prices it. Every event, with
its topic and seq, must be the same bytes in both regions, whatever the
scenario and the pace.
"""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.engine import Engine
from aggregator.inputs import ProviderMessage
from aggregator.merge import Merger
from aggregator.providers import ProviderSet, TruthConfig, default_providers
from gateway.topics import PartitionMap

MS = 1_000_000
START_NS = 1_795_000_000_000_000_000
PMAP = PartitionMap.load(None)


def _providers(rnd: random.Random) -> list:
    """Each provider misbehaving at its own random rates."""
    return [replace(c, outage_every_ms=rnd.randint(2_000, 8_000),
                    outage_ms=(200, rnd.randint(300, 1_500)),
                    stale_every_ms=rnd.randint(2_000, 8_000), stale_ms=(300, 2_000),
                    lone_suspend_every_ms=rnd.randint(2_000, 8_000),
                    outlier_every=rnd.randint(5, 40))
            for c in default_providers()]


def _arrivals(rnd: random.Random, streams: dict[str, list[ProviderMessage]],
              delay_ms: dict[str, int]) -> list[ProviderMessage]:
    timed = []
    for name, stream in streams.items():
        arrived = 0
        for msg in stream:
            arrived = max(arrived + 1, msg.pts + rnd.randint(0, delay_ms[name]) * MS)
            timed.append((arrived, rnd.random(), msg))
    timed.sort(key=lambda t: (t[0], t[1]))
    return [msg for _, _, msg in timed]


def _region(order: list[ProviderMessage], names: tuple[str, ...], rnd: random.Random
            ) -> list[tuple[str, int, bytes]]:
    merger, engine = Merger(names), Engine("main", 1, PMAP)
    out = []
    for msg in order:
        merger.offer(msg)
        if rnd.randrange(8) == 0:
            for released in merger.release():
                out += [(o.topic, o.seq, o.body) for o in engine.process(released)]
    for released in merger.release():
        out += [(o.topic, o.seq, o.body) for o in engine.process(released)]
    assert not merger.diverged
    return out


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32), st.integers(0, 2**32), st.integers(0, 2**32))
def test_every_region_publishes_the_same_bytes(scenario: int, pace_a: int, pace_b: int) -> None:
    rnd = random.Random(scenario)
    providers = ProviderSet(scenario, providers=_providers(rnd), start_ns=START_NS,
                            truth=TruthConfig(suspend_every_ms=rnd.randint(3_000, 10_000),
                                              close_after_ms=(8_000, 30_000)))
    streams = providers.streams_between(START_NS, START_NS + 20_000 * MS)
    delay_ms = {c.name: c.delay_ms + c.jitter_ms for c in providers.providers}
    regions = []
    for pace in (pace_a, pace_b):
        pace_rnd = random.Random(pace)
        regions.append(_region(_arrivals(pace_rnd, streams, delay_ms), providers.names,
                               pace_rnd))
    a, b = regions
    assert len(a) >= 20, "the scenario published next to nothing"
    assert a == b  # every event, its topic and seq: the same bytes
    for topic in {t for t, _s, _b in a}:
        seqs = [s for t, s, _b in a if t == topic]
        assert seqs == list(range(1, len(seqs) + 1))
