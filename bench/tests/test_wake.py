"""The spike's stalled players waking: what each is shown, and how the report says it.

The load generator's stall and wake run against a small scripted WebSocket
server (websockets): it sends a snapshot, then, while the player is stalled,
a known stream of events over two markets, so the test knows exactly which
of them are old when the player reads again. No timing is asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import orjson
from websockets.asyncio.server import serve

from bench.adapters import OddsgateConn, Wake
from bench.counters import Counters
from bench.emitters import LocalSeq, Sent
from bench.harness import Result
from bench.loadgen import LoadGen, LoadSpec
from bench.report import target_lines, wake_lines
from bench.scenarios.spike import wake_figures
from feed.events import PriceUpdate

TOPIC = "odds:1:39:1"
OTHER = "odds:1:39:2"


def _event(seq: int, market: str = "1:39:1", topic: str = TOPIC, **extra) -> dict:
    return {"type": "odds", "topic": topic, "epoch": "e1", "seq": seq, "market": market,
            "ts": 1, **extra}


def _synced(topics: list[str], seq: int = 4) -> OddsgateConn:
    conn = OddsgateConn("h", 1, Counters(), topics)
    conn.pending = set(topics)
    for topic in topics:
        conn.on_message(orjson.dumps({"type": "snapshot", "topic": topic, "epoch": "e1",
                                      "seq": seq, "markets": []}))
    return conn


def _frames(conn: OddsgateConn, *events: dict) -> None:
    conn.on_message(orjson.dumps({"type": "batch", "events": list(events)}))


async def test_old_events_are_the_ones_superseded_before_waking() -> None:
    conn = _synced([TOPIC, OTHER])
    # at waking, TOPIC's newest: market a at 9, market b at 7 (b at 3 is held already);
    # OTHER's newest, at 2, is held
    heads = {TOPIC: {"a": 9, "b": 7, "c": 3}, OTHER: {"x": 2}, "odds:9:9": {"z": 5}}
    wake = Wake.start(conn, heads, now_ns=100)
    assert wake.owed == {(TOPIC, "a"): 9, (TOPIC, "b"): 7}
    conn.wake(wake)
    _frames(conn, _event(5, "a"), _event(6, "b"), _event(7, "b"), _event(8, "a"))
    assert (wake.old_events, wake.current_ns) == (3, 0)
    _frames(conn, _event(9, "a"), _event(10, "a"))
    assert wake.old_events == 3 and wake.events == 5
    assert wake.current_ns > 0 and not wake.waiting
    assert conn.c.deliveries == 6 and conn.c.violations == {}  # the check still runs


async def test_a_player_holding_every_current_price_is_current_at_once() -> None:
    conn = _synced([TOPIC], seq=9)
    wake = Wake.start(conn, {TOPIC: {"a": 9, "b": 4}}, now_ns=100)
    assert wake.owed == {} and wake.current_ns == 100


async def test_only_a_woken_player_pays_for_the_watch() -> None:
    woken, other = _synced([TOPIC]), _synced([TOPIC])
    wake = Wake.start(woken, {TOPIC: {"a": 6}}, now_ns=1)
    woken.wake(wake)
    assert "_event" in vars(woken) and "_event" not in vars(other)
    _frames(other, _event(5, "a"), _event(6, "a"))
    assert wake.events == 0


async def _stall_then_wake(events: list[dict], heads: dict) -> dict:
    """A player stalls, the server sends `events`, the player wakes owing `heads`."""
    sent = asyncio.Event()
    stalled = asyncio.Event()

    async def handler(ws) -> None:
        await ws.send(orjson.dumps({"type": "welcome", "conn": "c", "node": "t", "worker": 0,
                                    "heartbeat_ms": 20000}).decode())
        request = orjson.loads(await ws.recv())
        await ws.send(orjson.dumps({"type": "subscribed", "id": request["id"],
                                    "topics": list(request["topics"])}).decode())
        await ws.send(orjson.dumps({"type": "snapshot", "topic": TOPIC, "epoch": "e1",
                                    "seq": 4, "markets": []}).decode())
        await stalled.wait()
        # No Nagle: every event reaches the player's kernel queue before it wakes.
        ws.transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for event in events:
            await ws.send(orjson.dumps(event).decode())
        sent.set()
        with contextlib.suppress(Exception):
            await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        gen = LoadGen(LoadSpec("oddsgate", [("127.0.0.1", port)], ["127.0.0.1"],
                               [(3, [TOPIC])]))
        assert (await gen.cmd_connect())["open"] == 1
        assert (await gen.cmd_subscribe(wait_s=5))["synced"] == 1
        assert (await gen.cmd_stall(indices=[3]))["stalled"] == 1
        stalled.set()
        await asyncio.wait_for(sent.wait(), 10)
        await asyncio.sleep(0.05)  # loopback delivery
        assert gen.counters.deliveries == 0  # nothing read while stalled
        assert (await gen.cmd_wake(indices=[3, 99], heads=heads))["woken"] == 1
        for _ in range(500):  # until it is current, or has read everything sent
            wakes = await gen.cmd_wakes()
            if not wakes["waiting"] or wakes["records"][0]["events"] == len(events):
                break
            await asyncio.sleep(0.02)
        await gen.cmd_close()
    return wakes


async def test_a_woken_player_counts_the_backlog_it_is_shown() -> None:
    # 40 events over two markets while stalled; the newest of each is current
    events = [_event(5 + i, market="ab"[i % 2]) for i in range(40)]
    wakes = await _stall_then_wake(events, {TOPIC: {"a": 43, "b": 44}})
    assert (wakes["woken"], wakes["waiting"]) == (1, 0)
    [record] = wakes["records"]
    assert record["old_events"] == 38 and record["events"] == 40
    # All 40 had reached the player's own receive queue before it woke: no
    # server held them, and the report counts them apart.
    assert record["own_bytes"] > 0 and record["own_old_events"] == 38
    assert record["current_ns"] >= record["woke_ns"] > 0
    assert record["owed_left"] == 0 and not record["closed"]


async def test_a_player_that_never_gets_the_current_price_keeps_waiting() -> None:
    wakes = await _stall_then_wake([_event(5, "a"), _event(6, "a")], {TOPIC: {"a": 50}})
    [record] = wakes["records"]
    assert wakes["waiting"] == 1 and record["current_ns"] == 0
    assert record["old_events"] == 2 and record["owed_left"] == 1


def _wake_record(old: int, ms: float | None, *, closed: bool = False, own: int = 0) -> dict:
    return {"index": 0, "woke_ns": 1_000_000, "old_events": old, "events": old + 1,
            "current_ns": 0 if ms is None else 1_000_000 + int(ms * 1e6),
            "owed_left": 0 if ms is not None else 1, "closed": closed,
            "own_bytes": own * 150, "own_old_events": own}


def test_old_events_from_the_players_own_queue_are_told_by_frame_offsets() -> None:
    wake = Wake(0, 0, {(TOPIC, "a"): 100}, own_bytes=300)
    for seq, size in ((1, 120), (2, 120), (3, 120), (4, 120)):
        wake.frame(size)  # 122 wire bytes each: frames 1-3 begin inside the 300
        wake.see({"topic": TOPIC, "market": "a", "seq": seq}, now_ns=1)
    assert (wake.old_events, wake.own_old_events) == (4, 3)
    assert wake.read_bytes == 4 * 122
    big = Wake(0, 0, {}, own_bytes=0)
    big.frame(200)
    big.frame(70_000)
    assert big.read_bytes == (4 + 200) + (10 + 70_000)


def test_wake_figures_hold_the_server_to_what_was_not_in_the_players_queue() -> None:
    fig = wake_figures([_wake_record(1500, 10.0, own=1200), _wake_record(900, 12.0, own=100)], 2)
    assert fig["old_events"]["max"] == 1500
    assert fig["server_old_events"] == {"p50": 300, "p99": 800, "max": 800}
    assert fig["own_queue_kb"]["max"] == round(1200 * 150 / 1024)


def test_wake_figures_per_stalled_player() -> None:
    records = [_wake_record(100 + i, 10.0 + i) for i in range(99)]
    records.append(_wake_record(5000, 900.0))
    fig = wake_figures(records, 100)
    assert (fig["current"], fig["never_current"]) == (100, 0)
    assert fig["old_events"] == {"p50": 149, "p99": 198, "max": 5000}
    assert fig["to_current_ms"] == {"p50": 59.0, "p99": 108.0, "max": 900.0}
    assert fig["old_events_target"] == 1000 and fig["to_current_target_ms"] == 1000.0


def test_wake_figures_count_a_player_never_current_as_never() -> None:
    records = [_wake_record(10, 5.0), _wake_record(20, None, closed=True)]
    fig = wake_figures(records, 2)
    assert (fig["current"], fig["never_current"], fig["closed"]) == (1, 1, 1)
    assert fig["to_current_ms"] == {"p50": 5.0, "p99": None, "max": None}
    assert fig["old_events"]["max"] == 20
    assert wake_figures([_wake_record(10, 5.0)], 3)["old_events"]["max"] is None


def _spike(system: str, wake: dict) -> Result:
    return Result(system, "spike", "ok", figures={"latency_ms": {}, "wake": wake})


def test_the_report_shows_the_wake_and_judges_the_worst_player() -> None:
    good = wake_figures([_wake_record(300, 20.0), _wake_record(800, 250.0)], 2)
    good |= {"stalled_s": 15.0, "spike_went_on": True}
    bad = wake_figures([_wake_record(16_000, 400.0), _wake_record(20, None)], 2)
    bad |= {"stalled_s": 4.0, "spike_went_on": False}
    lines = wake_lines([_spike("oddsgate", good), _spike("oddsgate-no-lowat", bad)])
    assert ("| oddsgate | 2 | 15 s (the spike went on) | 2 | 0 | 300 | 800 | 800 | 800 | 0 "
            "| 20.0 | 250.0 | 250.0 |") in lines
    assert ("| oddsgate-no-lowat | 2 | 4 s | 1 | **1** | 20 | 16,000 | 16,000 | 16,000 | 0 "
            "| 400.0 | never | never |") in lines
    met = "\n".join(target_lines([_spike("oddsgate", good)]))
    assert "beyond its own receive queue (spike, worst of 2 stalled players) | <= 1,000 | 800 " \
           "| **met** |" in met
    assert "| <= 1 s | 250.0 ms | **met** |" in met
    missed = "\n".join(target_lines([_spike("oddsgate", bad)]))
    assert "| 16,000 | **missed**, 16.0x off |" in missed
    assert "| never | **missed** (1 never held the current prices) |" in missed
    assert wake_lines([Result("oddsgate", "spike", "ok", figures={"latency_ms": {}})]) == []


def test_emitters_keep_each_markets_newest_seq() -> None:
    updates = [PriceUpdate(TOPIC, m, "e", {"home": "1.50"}) for m in ("1:39:1", "1:39:1")]
    updates.append(PriceUpdate(OTHER, "1:39:2", "e", {"home": "2.50"}))
    local = LocalSeq()
    events, seqs = local.events(updates)
    assert seqs == [1, 2, 1]
    assert [orjson.loads(e)["seq"] for e in events] == seqs
    sent = Sent()
    sent.count(updates, seqs)
    assert sent.heads == {TOPIC: {"1:39:1": 2}, OTHER: {"1:39:2": 1}}
    assert sent.by_topic == {TOPIC: 2, OTHER: 1} and sent.sent == 3


async def test_a_snapshot_after_a_reset_pays_what_it_holds() -> None:
    conn = _synced([TOPIC])
    wake = Wake.start(conn, {TOPIC: {"a": 9, "b": 7}}, now_ns=1)
    conn.wake(wake)
    conn.on_message(orjson.dumps({"type": "reset", "topic": TOPIC, "reason": "window"}))
    conn.on_message(orjson.dumps({"type": "snapshot", "topic": TOPIC, "epoch": "e1",
                                  "seq": 8, "markets": [_event(8, "a"), _event(7, "b")]}))
    assert wake.owed == {(TOPIC, "a"): 9} and wake.old_events == 0
    _frames(conn, _event(9, "a"))
    assert wake.current_ns and conn.c.violations == {}


def test_the_failover_report_judges_the_p99_and_any_player_left_behind() -> None:
    from bench.report import failover_lines

    good = {"players": 1000, "on_killed_region": 500, "resumed": 500, "fresh_prices": 500,
            "resumed_ms": {"p50": 470.0, "p99": 590.0, "max": 600.0},
            "fresh_ms": {"p50": 550.0, "p99": 870.0}, "failovers": 500, "resets": 0,
            "violations": 0, "violations_total": 0,
            "aggregator": {"inputs": 240, "published": 40, "input_to_publish_ms_p50": 87.7,
                           "input_to_publish_ms_p99": 133.8, "cpu_ms_per_1000_inputs": 285.0}}
    run = Result("oddsgate", "failover", "ok", figures=good)
    met = "\n".join(target_lines([run]))
    assert "| region lost: players resumed in another region, no reset (500 players) | " \
           "p99 <= 1 s | 590 ms, 0 resets | **met** |" in met
    lines = failover_lines([run])
    assert "| 1,000 | 500 | 500 | 470 | 590 | 600 | 550 | 870 | 500 | 0 | 0 |" in lines
    assert any("p99 133.8 ms" in line for line in lines)
    left = Result("oddsgate", "failover", "ok", figures={**good, "resumed": 498})
    assert "**missed** (2 never resumed)" in "\n".join(target_lines([left]))
    reset = Result("oddsgate", "failover", "ok", figures={**good, "resets": 3})
    assert "**missed** (3 resets)" in "\n".join(target_lines([reset]))


def test_the_report_judges_clicks_and_webhooks_against_their_targets() -> None:
    from bench.report import webhooks_lines

    clicks = Result("oddsgate", "clicks", "ok", figures={
        "worker_us": {"p50_us": 55.0, "p99_us": 115.0}, "ratio_to_static": 0.18,
        "clicks_lost": 0, "violations_total": 0})
    hooks = Result("oddsgate", "webhooks", "ok", params={"seconds": 20.0}, figures={
        "partners": 50, "failing": 3, "hanging": 2, "rate_per_s": 300,
        "healthy_conversions": 5400, "delivered_healthy": 5400, "lost": 0, "attempts": 6000,
        "latency_ms": {"p50": 31.0, "p99": 114.0, "max": 300.0},
        "cpu_s_per_1000_deliveries": 1.25})
    lines = "\n".join(target_lines([clicks, hooks]))
    assert "the worker's own time p99 (clicks storm) | <= 1 ms | 115.0 us | **met** |" in lines
    assert "| >= 0.3x | 0.18x | **missed**, 1.7x off |" in lines
    assert "| clicks lost (redirected but not recorded) | 0 | 0 | **met** |" in lines
    assert "| <= 500 ms | 114.0 ms | **met** |" in lines
    assert "| 50 (3, 2) | 300 | 20 s | 5,400 | 5,400 | 0 | 31.0 | 114.0 | 300.0 | 6,000 | 1.25 |" \
        in webhooks_lines([hooks])


def test_the_report_judges_click_to_stats_against_1_s() -> None:
    run = Result("oddsgate", "stats", "ok", variant="500 background clicks/s",
                 figures={"click_to_stats_ms": {"p50": 249.0, "p99": 309.0, "max": 320.0}})
    assert ("| click to its partner's stats row p99 (500 background clicks/s) | <= 1 s | "
            "309.0 ms | **met** |") in "\n".join(target_lines([run]))
