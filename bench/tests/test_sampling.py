"""Checked and counted players (issue 14, point 4): the §5 check and latency on a
sample, counts on every player. No timing is asserted, only what is counted."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from bench.adapters import CHECK_SHARE, OddsgateConn, PlainConn, Wake, is_checked
from bench.counters import Counters
from bench.harness import figures
from bench.loadgen import LoadGen, LoadSpec, split_plans
from gateway.protocol import batch, mark_coalesced

TOPIC = "odds:1:39:1"


def _event(seq: int, **extra) -> bytes:
    """As the publish script writes it: `{"type":"odds","topic":..` first."""
    return orjson.dumps({"type": "odds", "topic": TOPIC, "epoch": "e1", "seq": seq,
                         "market": "1:39:1", "event_id": "m", "ts": 1, "status": "open",
                         "prices": {"home": "1.50"}, **extra})


def _stream() -> list[bytes]:
    """Subscribed, a snapshot at seq 4, then 6 events, one of them out of order (seq 9
    twice) and one gap marked coalesced: one violation, 6 deliveries."""
    return [
        orjson.dumps({"type": "subscribed", "id": 1, "topics": [TOPIC]}),
        orjson.dumps({"type": "snapshot", "topic": TOPIC, "epoch": "e1", "seq": 4,
                      "markets": []}),
        _event(5),
        batch([_event(6), mark_coalesced(_event(9)), _event(9), _event(10)]),
        _event(11),
    ]


def _play(checked: bool) -> tuple[Counters, OddsgateConn]:
    async def run() -> tuple[Counters, OddsgateConn]:
        c = Counters()
        conn = OddsgateConn("h", 1, c, [TOPIC], checked=checked)
        conn.pending = {TOPIC}
        conn.requests = {1: [TOPIC]}
        for frame in _stream():
            conn.on_message(frame)
        return c, conn

    return asyncio.run(run())


def test_a_violation_on_a_checked_player_is_caught():
    c, conn = _play(checked=True)
    assert c.violations == {"seq_order": 1}
    assert c.coalesced == 1
    assert c.deliveries == 6
    assert c.latency.count == 6
    assert conn.synced.done()


def test_a_counted_player_counts_every_event_and_frame_without_checking():
    checked, _ = _play(checked=True)
    c, conn = _play(checked=False)
    assert c.deliveries == checked.deliveries == 6
    assert c.frames == checked.frames == 5
    assert c.bytes_in == checked.bytes_in
    assert c.violations == {}  # not checked: its seq 9 twice goes unseen
    assert c.latency.count == 0
    # its control frames take the full path: subscribed and synced like any other
    assert conn.synced.done() and conn.held[TOPIC] == ["e1", 4]
    assert c.subscribe.count == 1


def test_a_counted_peer_player_counts_events():
    async def run() -> Counters:
        c = Counters()
        conn = PlainConn("h", 1, c, [TOPIC], checked=False)
        for seq in (3, 2, 5):
            conn.on_message(_event(seq))
        return c

    c = asyncio.run(run())
    assert c.deliveries == 3 and c.violations == {} and c.latency.count == 0


def test_the_sample_is_deterministic_and_spread_over_processes():
    assert all(is_checked(i, 1.0) for i in range(100))
    assert not any(is_checked(i, 0.0) for i in range(100))
    indices = list(range(20_000))
    picked = [i for i in indices if is_checked(i, CHECK_SHARE)]
    assert abs(len(picked) - 2_000) < 200
    assert picked == [i for i in indices if is_checked(i, CHECK_SHARE)]
    for processes in (2, 3, 7):  # the load generator deals players round-robin
        shares = split_plans([(i, []) for i in indices], processes)
        for share in shares:
            sampled = sum(1 for i, _ in share if is_checked(i, CHECK_SHARE))
            assert abs(sampled - len(share) * CHECK_SHARE) < 0.2 * len(share) * CHECK_SHARE


def test_only_checked_players_wake_or_follow_hints():
    async def run() -> None:
        conn = OddsgateConn("h", 1, Counters(), [TOPIC], checked=False)
        with pytest.raises(RuntimeError, match="checked"):
            conn.wake(Wake(0, 0, {}))
        gen = LoadGen(LoadSpec("oddsgate", [("h", 1)], ["127.0.0.2"], [], check_share=0.5))
        with pytest.raises(RuntimeError, match="checked"):
            await gen.cmd_follow_hints(True)
        gen = LoadGen(LoadSpec("oddsgate", [("h", 1)], ["127.0.0.2"], []))
        await gen.cmd_follow_hints(True)  # every player checked: fine

    asyncio.run(run())


def test_figures_say_how_many_players_were_checked():
    part = Counters().to_dict() | {"cpu_s": 1.0, "wall_s": 1.0, "open": 100,
                                   "checked_open": 10}
    fig = figures([part, part], 1.0, server_cpu=0.5, redis_cpu=0.1,
                  machine_cpu=(1.0, 0.0, 0.0), feed0=None, feed1=None, connections=200,
                  rss=0, rss_base=0, followers=None)
    assert fig["open_connections"] == 200
    assert fig["checked_connections"] == 20


def test_the_cost_tool_samples_as_the_bench_does_and_says_what_one_process_drives():
    from bench import wsclient_cost

    assert wsclient_cost.CHECK_SHARE == CHECK_SHARE
    assert wsclient_cost.drives(5.0, 1) == (200_000, 200_000)
    assert wsclient_cost.drives(0.5, 10) == (200_000, 2_000_000)
    assert wsclient_cost.drives(0.0, 1) == (0.0, 0.0)


def test_the_report_says_how_many_players_were_checked():
    from bench.harness import Result
    from bench.report import checked_lines

    results = [Result("oddsgate", "steady", "ok", figures={"checked_connections": 1000,
                                                          "open_connections": 10000,
                                                          "deliveries_per_s": 30000,
                                                          "loadgen_cores": 0.25}),
               Result("oddsgate", "spike", "ok", figures={"checked_connections": 2000}),
               Result("plain-ws", "saturation", "ok", figures={})]
    (line,) = checked_lines(results)
    assert line.startswith("Players checked (PROTOCOL.md §5 and latency;")
    assert line.endswith(": steady / oddsgate 1,000 of 10,000, load generators 120,000 "
                         "deliveries per CPU-s.")
    assert checked_lines([]) == []
