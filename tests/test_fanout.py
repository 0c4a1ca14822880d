"""The end-of-turn fan-out (gateway/fanout.py): one frame per player per turn."""

from __future__ import annotations

import asyncio

import orjson

from gateway import protocol
from gateway.channel import TopicChannel
from gateway.counters import WorkerCounters
from gateway.fanout import Fanout
from gateway.session import Session
from gateway.wire import text_frame


def _event(topic: str, seq: int) -> bytes:
    return orjson.dumps({"type": "odds", "topic": topic, "epoch": "e", "seq": seq,
                         "market": "1:39:1"})


def _player(fanout: Fanout, name: str, framed: bool = True):
    payloads: list[bytes] = []
    frames: list[bytes] = []
    session = Session(name, player=name, write=payloads.append, scheduler=fanout,
                      write_frame=frames.append if framed else None)
    return session, payloads, frames


async def test_one_turn_of_one_topic_is_one_shared_frame_for_every_aligned_player() -> None:
    fanout = Fanout(WorkerCounters())
    channel = TopicChannel("odds:1:39:1", 8)
    players = [_player(fanout, f"p{i}") for i in range(3)]
    channel.aligned.update(p[0] for p in players)
    events = [_event("odds:1:39:1", s) for s in (1, 2, 3)]
    for e in events:
        fanout.channel_event(channel, e)
    assert all(frames == [] for _, _, frames in players)  # nothing before the turn ends
    await asyncio.sleep(0)
    expected = text_frame(protocol.batch(events))
    written = [frames for _, _, frames in players]
    assert written == [[expected]] * 3
    assert written[0][0] is written[1][0] is written[2][0]  # built once, same object
    assert fanout.counters.deliveries == 9


async def test_a_player_of_two_busy_topics_gets_one_batch_in_per_topic_order() -> None:
    fanout = Fanout(WorkerCounters())
    a, b = TopicChannel("odds:1:39:1", 8), TopicChannel("odds:1:39:2", 8)
    both, both_payloads, _ = _player(fanout, "both")
    only_a, _, only_a_frames = _player(fanout, "a")
    a.aligned.update({both, only_a})
    b.aligned.add(both)
    a_events = [_event(a.topic, 1), _event(a.topic, 2)]
    b_events = [_event(b.topic, 7)]
    fanout.channel_event(a, a_events[0])
    fanout.channel_event(b, b_events[0])
    fanout.channel_event(a, a_events[1])
    await asyncio.sleep(0)
    assert both_payloads == [protocol.batch(a_events + b_events)]
    assert only_a_frames == [text_frame(protocol.batch(a_events))]


async def test_flush_channel_before_joining_keeps_earlier_events_from_the_newcomer() -> None:
    fanout = Fanout(WorkerCounters())
    channel = TopicChannel("odds:1:39:1", 8)
    old, old_payloads, _ = _player(fanout, "old")
    new, _, new_frames = _player(fanout, "new")
    channel.aligned.add(old)
    fanout.channel_event(channel, _event(channel.topic, 1))
    fanout.flush_channel(channel)  # what the hub does before a snapshot attaches `new`
    channel.aligned.add(new)
    fanout.channel_event(channel, _event(channel.topic, 2))
    await asyncio.sleep(0)
    # two hand-overs in one turn merge into one batch for the old player
    assert old_payloads == [protocol.batch([_event(channel.topic, 1), _event(channel.topic, 2)])]
    assert new_frames == [text_frame(_event(channel.topic, 2))]


async def test_long_turns_are_cut_into_max_batch_frames_and_compressed_players_get_payloads(
) -> None:
    fanout = Fanout(WorkerCounters(), max_batch=2)
    channel = TopicChannel("odds:1:39:1", 8)
    plain, payloads, frames = _player(fanout, "deflate", framed=False)
    channel.aligned.add(plain)
    events = [_event(channel.topic, s) for s in range(1, 6)]
    for e in events:
        fanout.channel_event(channel, e)
    await asyncio.sleep(0)
    assert frames == []
    assert payloads == [protocol.batch(events[0:2]), protocol.batch(events[2:4]), events[4]]
    assert plain.events_out == 5 and plain.frames_out == 3


async def test_a_closed_player_gets_nothing() -> None:
    fanout = Fanout(WorkerCounters())
    channel = TopicChannel("odds:1:39:1", 8)
    gone, _, frames = _player(fanout, "gone")
    gone.close()
    channel.aligned.add(gone)
    fanout.channel_event(channel, _event(channel.topic, 1))
    await asyncio.sleep(0)
    assert frames == []



def _logged_player(fanout: Fanout, name: str, framed: bool):
    """A player whose payload and frame writes go to one list, in the order they happen."""
    log: list[bytes] = []
    session = Session(name, player=name, write=log.append, scheduler=fanout,
                      write_frame=log.append if framed else None)
    return session, log


def _seqs(log: list[bytes]) -> list[int]:
    """Every event seq a player was written, in order (control frames left out)."""
    out = []
    for raw in log:
        msg = orjson.loads(raw[raw.index(b"{"):])
        if msg["type"] == "batch":
            out += [e["seq"] for e in msg["events"]]
        elif msg["type"] == "odds":
            out.append(msg["seq"])
    return out


async def test_a_big_fan_out_goes_out_a_slice_per_loop_iteration() -> None:
    fanout = Fanout(WorkerCounters(), slice=2)
    turns = []
    fanout.after_run.append(lambda: turns.append(1))
    channel = TopicChannel("odds:1:39:1", 8)
    players = [_player(fanout, f"p{i}") for i in range(5)]
    channel.aligned.update(p[0] for p in players)
    fanout.channel_event(channel, _event(channel.topic, 1))
    written = []
    for _ in range(4):
        await asyncio.sleep(0)
        written.append(sum(bool(frames) for _, _, frames in players))
    assert written == [2, 4, 5, 5]  # other callbacks (requests, pings) run in between
    assert turns == [1]  # after the last slice, once


async def test_a_newer_event_joins_a_player_still_waiting_for_its_slice_in_order() -> None:
    fanout = Fanout(WorkerCounters(), slice=2)
    channel = TopicChannel("odds:1:39:1", 8)
    players = [_logged_player(fanout, f"p{i}", framed=i % 2 == 0) for i in range(6)]
    channel.aligned.update(p[0] for p in players)
    fanout.channel_event(channel, _event(channel.topic, 1))
    await asyncio.sleep(0)  # the first slice is written, four players wait
    fanout.channel_event(channel, _event(channel.topic, 2))
    players[5][0].send(b'{"type":"pong"}')  # a control frame flushes what waits first
    assert _seqs(players[5][1]) == [1] and players[5][1][-1] == b'{"type":"pong"}'
    for _ in range(6):
        await asyncio.sleep(0)
    for session, log in players:
        assert _seqs(log) == [1, 2], session.conn_id
        assert not session.has_output and not session.scheduled
