"""The drain scenario's pieces: a player following a `reconnect` hint, and the figures.

The load generator's move is driven against a small scripted WebSocket
server (websockets), not a worker: it says `welcome` with its worker number,
answers subscribes, sends events, then a hint and close 1012, so the test
decides exactly what the player sees before and after the move. No timing is
asserted beyond what the hint itself asks for.
"""

from __future__ import annotations

import asyncio
import contextlib

import orjson
import pytest
from websockets.asyncio.server import serve

from bench.loadgen import LoadGen, LoadSpec
from bench.scenarios.drain import drain_figures
from gateway.auth import COOKIE_NAME

TOPIC = "odds:1:39:1"
SECRET = "bench-test-secret-long-enough-for-hs256"


def _event(seq: int, **extra) -> dict:
    return {"type": "odds", "topic": TOPIC, "epoch": "e1", "seq": seq, "market": "1:39:1",
            "ts": 1, **extra}


class ScriptedNode:
    """Connection n gets `welcome` worker n; `after_move` is what the second one sends."""

    def __init__(self, after_move: list[dict]) -> None:
        self.after_move = after_move
        self.subscribes: list[dict] = []
        self.cookies: list[str | None] = []
        self.connections = 0

    async def handler(self, ws) -> None:
        worker = self.connections
        self.connections += 1
        self.cookies.append(ws.request.headers.get("Cookie"))
        await ws.send(orjson.dumps({"type": "welcome", "conn": f"c{worker}", "node": "t",
                                    "worker": worker, "heartbeat_ms": 20000}).decode())
        request = orjson.loads(await ws.recv())
        self.subscribes.append(request)
        await ws.send(orjson.dumps({"type": "subscribed", "id": request["id"],
                                    "topics": list(request["topics"])}).decode())
        if worker == 0:
            await ws.send(orjson.dumps({"type": "snapshot", "topic": TOPIC, "epoch": "e1",
                                        "seq": 5, "markets": [_event(5)]}).decode())
            await ws.send(orjson.dumps(_event(6)).decode())
            await ws.send(orjson.dumps({"type": "reconnect", "after_ms": 80,
                                        "reason": "drain"}).decode())
            await ws.close(1012, "drain")
            return
        for frame in self.after_move:
            await ws.send(orjson.dumps(frame).decode())
        with contextlib.suppress(Exception):
            await ws.wait_closed()


async def _move_once(after_move: list[dict]) -> tuple[LoadGen, ScriptedNode]:
    node = ScriptedNode(after_move)
    async with serve(node.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        gen = LoadGen(LoadSpec("oddsgate", [("127.0.0.1", port)], ["127.0.0.1"],
                               [(7, [TOPIC])], token_secret=SECRET))
        await gen.cmd_follow_hints(on=True)
        opened = await gen.cmd_connect()
        assert opened["open"] == 1, opened
        await gen.cmd_subscribe(wait_s=5)
        for _ in range(100):  # the hint, 80 ms, the reconnect, the resume
            moves = await gen.cmd_moves(records=False)
            if moves["resumed"] and not moves["waiting"]:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # what the new worker sends after `subscribed`
        await gen.cmd_close()
    return gen, node


async def test_a_moved_player_resumes_from_its_last_seq_on_the_new_worker():
    gen, node = await _move_once([_event(7), {"type": "batch", "events": [_event(8)]}])
    assert node.connections == 2
    assert node.subscribes[0]["topics"] == {TOPIC: None}
    assert node.subscribes[1]["topics"] == {TOPIC: {"epoch": "e1", "seq": 6}}
    # the same session cookie both times (HAProxy's hash keeps the player's place)
    assert node.cookies[0] == node.cookies[1]
    assert node.cookies[0].startswith(f"{COOKIE_NAME}=")
    c = gen.counters
    assert c.violations == {}
    assert c.deliveries == 3  # 6 before the move, 7 and 8 after it (snapshots are not)
    assert c.lost == 0 and c.reconnect_frames == 1
    [record] = (await gen.cmd_moves())["records"]
    assert record["from_worker"] == 0 and record["to_worker"] == 1
    assert record["after_ms"] == 80 and record["resets"] == 0
    assert record["resumed_ns"] - record["hint_ns"] >= 80_000_000  # it waited as told
    assert record["resumed_ns"] >= record["connected_ns"] > 0


@pytest.mark.parametrize("after_move, violation", [
    ([_event(9)], "silent_gap"),  # seqs 7 and 8 skipped, no `coalesced`
    ([_event(6)], "seq_order"),  # the new worker replays what the player holds
])
async def test_the_rule_check_goes_on_across_the_move(after_move, violation):
    gen, _ = await _move_once(after_move)
    assert gen.counters.violations == {violation: 1}


async def test_a_reset_on_the_new_worker_counts_as_resumed_with_reset():
    gen, _ = await _move_once([
        {"type": "reset", "topic": TOPIC, "reason": "window"},
        {"type": "snapshot", "topic": TOPIC, "epoch": "e2", "seq": 40,
         "markets": [{**_event(40), "epoch": "e2"}]},
        {**_event(41), "epoch": "e2"},
    ])
    assert gen.counters.violations == {}
    [record] = (await gen.cmd_moves())["records"]
    assert record["resets"] == 1 and record["resumed_ns"]


def _record(index: int, hint_ms: float, after_ms: int, late_ms: float | None, *,
            resets: int = 0, to_worker: int = 1, failure: str = "") -> dict:
    hint_ns = int(hint_ms * 1e6)
    resumed = 0 if late_ms is None else hint_ns + int((after_ms + late_ms) * 1e6)
    return {"index": index, "from_worker": 0, "to_worker": to_worker, "after_ms": after_ms,
            "hint_ns": hint_ns, "connected_ns": resumed, "resumed_ns": resumed,
            "resets": resets, "attempts": 1 if late_ms is not None else 3,
            "failure": failure, "abandoned": late_ms is None}


def test_drain_figures_count_from_each_hint_and_missing_players_as_never():
    # 100 players: 97 back 100 ms after their hint, 1 at 900 ms, 1 with a reset, 1 never
    records = [_record(i, 600 + i, i * 5, 100.0) for i in range(97)]
    records.append(_record(97, 700, 10, 900.0))
    records.append(_record(98, 700, 10, 200.0, resets=2))
    records.append(_record(99, 700, 10, None, failure="ConnectionError: 503"))
    fig = drain_figures(records, 100, drain_ns=0, drained=[0], target_ms=500)
    assert fig["resumed"] == 99 and fig["not_resumed"] == 1
    assert fig["resumed_without_reset"] == 98 and fig["resumed_with_reset"] == 1
    assert fig["resumed_without_reset_share"] == 0.98
    assert fig["within_target"] == 98 and fig["within_target_share"] == 0.98
    assert not fig["target_met"]
    assert fig["resume_ms"]["p50"] == 100.0
    assert fig["resume_ms"]["p99"] == 900.0  # the 99th of 100, the missing one last
    assert fig["resume_ms"]["max"] == 900.0
    assert fig["moved_to_other_worker"] == 99
    assert fig["failures"] == {"given up (ConnectionError: 503)": 1}
    assert fig["first_hint_ms"] == 600.0
    hist = fig["histogram"]
    assert sum(hist["resumed"]) == 99 and sum(hist["due"]) == 100
    assert hist["start_ms"] <= 600 and hist["bucket_ms"] == 100


def test_drain_figures_p99_is_never_when_over_one_percent_is_missing():
    records = [_record(i, 0, 0, 50.0) for i in range(97)]
    records += [_record(97 + i, 0, 0, None) for i in range(3)]
    fig = drain_figures(records, 100, drain_ns=0, drained=[0])
    assert fig["resume_ms"]["p90"] == 50.0
    assert fig["resume_ms"]["p99"] is None and fig["resumed_99_ms"] is None
    assert not fig["target_met"]
    met = drain_figures(records[:97], 97, drain_ns=0, drained=[0])
    assert met["target_met"] and met["within_target_share"] == 1.0


def test_drain_figures_count_players_that_never_got_a_hint():
    fig = drain_figures([_record(0, 0, 0, 10.0)], players=4, drain_ns=0, drained=[0])
    assert fig["not_resumed"] == 3 and fig["within_target_share"] == 0.25
    assert fig["resume_ms"]["p50"] is None
    back_on_drained = drain_figures([_record(0, 0, 0, 10.0, to_worker=0)], 1, 0, [0])
    assert back_on_drained["moved_to_other_worker"] == 0
