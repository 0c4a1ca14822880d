"""The bench's pure pieces, without servers: `python -m pytest bench/tests`.

No timing is asserted anywhere: only what the pieces compute.
"""

from __future__ import annotations

import asyncio
import struct

import orjson

from bench.adapters import NatsConn, OddsgateConn, SocketIOConn
from bench.counters import Counters, merge
from bench.emitters import msgpack
from bench.hist import Histogram, bucket_of, bucket_upper
from bench.profile import summarise


def test_histogram_buckets_are_contiguous_and_close():
    previous = -1
    for us in range(0, 200_000, 7):
        index = bucket_of(us)
        assert index >= previous
        previous = index
        assert us <= bucket_upper(index) <= max(us, us * 1.04 + 1)


def test_histogram_percentiles_and_merge():
    a, b = Histogram(), Histogram()
    for us in range(1, 1001):
        a.record(us)
    b.record(5_000_000)
    a.merge(Histogram.from_sparse(b.to_sparse()))
    assert a.count == 1001
    assert 480 <= a.percentile_us(0.5) <= 520
    assert a.observed_max_us() == 5_000_000
    assert Histogram().percentile_us(0.99) is None


def test_msgpack_matches_the_format():
    assert msgpack(["emitter", {"type": 2}, None, True]) == (
        b"\x94\xa7emitter\x81\xa4type\x02\xc0\xc3")
    assert msgpack(1_763_800_000_123_456_789) == b"\xcf" + struct.pack(
        ">Q", 1_763_800_000_123_456_789)
    assert msgpack("x" * 40)[:2] == b"\xd9\x28"


def _event(topic: str, seq: int, **extra) -> dict:
    return {"type": "odds", "topic": topic, "epoch": "e1", "seq": seq, "market": "1:39:1",
            "ts": 1, **extra}


def _feed(conn, *messages) -> None:
    for msg in messages:
        conn.on_message(orjson.dumps(msg))


def test_oddsgate_rules():
    async def run() -> Counters:
        c = Counters()
        conn = OddsgateConn("h", 1, c, ["odds:1:39:1"])
        conn.subscribe = lambda: None  # no transport here
        conn.pending = {"odds:1:39:1"}
        _feed(conn,
              _event("odds:1:39:1", 1),  # before the snapshot
              {"type": "subscribed", "id": 1, "topics": ["odds:1:39:1"]},
              {"type": "snapshot", "topic": "odds:1:39:1", "epoch": "e1", "seq": 4,
               "markets": [_event("odds:1:39:1", 4)]},
              _event("odds:1:39:1", 5),
              {"type": "batch", "events": [_event("odds:1:39:1", 6),
                                           _event("odds:1:39:1", 9, coalesced=True),
                                           _event("odds:1:39:1", 9),
                                           _event("odds:1:39:1", 12)]})
        return c

    c = asyncio.run(run())
    assert c.violations == {"unexpected": 1, "seq_order": 1, "silent_gap": 1}
    assert c.coalesced == 1
    assert c.deliveries == 6


def test_peers_take_their_first_event_as_base():
    async def run() -> Counters:
        c = Counters()
        sio = SocketIOConn("h", 1, c, ["odds:1:39:1"])
        for n in (7, 8, 10):
            sio.on_message(b"42" + orjson.dumps(["odds", _event("odds:1:39:1", n)]))
        nats = NatsConn("h", 1, c, ["odds:1:39:1"])
        body = orjson.dumps(_event("odds:1:39:1", 3))
        msg = b"MSG odds.1.39.1 1 %d\r\n%s\r\n" % (len(body), body)
        nats.on_message(msg[:10])
        nats.on_message(msg[10:] + msg[:5])  # and the start of a next one
        return c

    c = asyncio.run(run())
    assert c.deliveries == 4
    assert c.violations == {"silent_gap": 1}


def test_merge_sums_processes():
    one, two = Counters(), Counters()
    one.deliveries, two.deliveries = 3, 4
    one.violate("seq_order")
    two.latency.record(10)
    merged = merge([one.to_dict(), two.to_dict()])
    assert merged["deliveries"] == 7
    assert merged["violations"] == {"seq_order": 1}
    assert merged["latency"].count == 1


def test_profile_summary_from_collapsed_stacks():
    collapsed = (
        "process 1:\"python\";main (/x/a.py:3);write (/x/gateway/server.py:9) 30\n"
        "process 1:\"python\";main (/x/a.py:3);flush (/x/gateway/session.py:4) 10\n")
    summary = summarise(collapsed)
    assert summary["samples"] == 40
    assert summary["self"][0] == {"function": "write (/x/gateway/server.py)", "share": 0.75}
    assert summary["inclusive"][0]["share"] == 1.0
