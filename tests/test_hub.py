"""The hub's fan-out and back-pressure moves, without sockets or Redis.

A channel is installed by hand (as `Hub._load` would after a snapshot read),
players are sessions writing into lists, and events go through
`Hub.on_message` as the Redis reader hands them over.
"""

from __future__ import annotations

import asyncio

import orjson

from client.rules import RuleChecker
from gateway.broker import TopicState
from gateway.counters import WorkerCounters
from gateway.effects import OpenTopic
from gateway.fanout import Fanout
from gateway.hub import Hub
from gateway.hub_runner import HubRunner
from gateway.session import Session

TOPIC = "odds:5:8"


def _event(seq: int, market: int) -> bytes:
    return orjson.dumps({"type": "odds", "topic": TOPIC, "epoch": "e", "seq": seq,
                         "market": f"5:8:{market}", "ts": 1, "prices": {"home": f"{seq}.0"}})


class Player:
    """A session whose written frames are decoded and checked like a client would."""

    def __init__(self, hub: Hub, name: str) -> None:
        self.checker = RuleChecker()
        self.checker.feed({"type": "subscribed", "topics": [TOPIC]})
        self.session = Session(name, player=name, write=self._write, scheduler=hub.fanout,
                               write_frame=self._write_frame,
                               on_pressure=HubRunner(hub).pressure_changed)  # needs no broker

    def _write(self, payload: bytes) -> None:
        self.checker.feed(orjson.loads(payload))

    def _write_frame(self, frame: bytes) -> None:
        header = 2 if frame[1] < 126 else 4 if frame[1] == 126 else 10
        self._write(frame[header:])


async def _hub_with_channel() -> Hub:
    """A hub with TOPIC open and loaded at seq 0, as its runner leaves it."""
    hub = Hub(Fanout(WorkerCounters()))
    channel, effects = hub.hold(TOPIC)
    assert effects == [OpenTopic(channel)]
    assert hub.loaded(channel, TopicState("e", 0, [])) == []
    return hub  # still held once: the channel stays while players come and go


async def _join(hub: Hub, player: Player) -> None:
    channel, _ = hub.hold(TOPIC)
    assert hub.join(player.session, channel, None) == ()


async def turn() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_events_arriving_between_resume_and_catch_up_keep_their_order() -> None:
    """Regression: the transport resumed before the hub drained the outbox; events
    of that gap went to the session's queue and were written before the older
    coalesced ones."""
    hub = await _hub_with_channel()
    player = Player(hub, "p")
    await _join(hub, player)
    seq = 0

    def publish(count: int) -> None:
        nonlocal seq
        for _ in range(count):
            seq += 1
            hub.on_message(TOPIC, _event(seq, seq % 3))

    publish(5)
    await turn()
    player.session.on_pause(0.0)  # past the high-water mark
    await turn()
    assert player.session in hub.pressured
    publish(20)  # coalesced: newest per market kept
    player.session.on_resume()  # drained under the low mark ...
    publish(7)  # ... and more events arrive before the hub acts on it
    await turn()
    publish(3)
    await turn()
    assert player.checker.violations == []
    assert player.checker.topics[TOPIC].seq == seq
    assert player.session in hub.channels[TOPIC].aligned  # back on the fast path


async def test_flapping_pressure_never_breaks_order_or_loses_the_newest_state() -> None:
    hub = await _hub_with_channel()
    players = [Player(hub, f"p{i}") for i in range(4)]
    for player in players:
        await _join(hub, player)
    seq = 0
    for step in range(300):
        seq += 1
        hub.on_message(TOPIC, _event(seq, seq % 5))
        target = players[step % 4].session
        if step % 7 == 0:
            target.on_pause(float(step))
        elif step % 11 == 0:
            target.on_resume()
        if step % 3 == 0:
            await asyncio.sleep(0)
    for player in players:
        player.session.on_resume()
    await turn()
    for player in players:
        assert player.checker.violations == []
        held = player.checker.topics[TOPIC]
        assert held.seq == seq
        assert {m: e["seq"] for m, e in held.markets.items()} == \
            {f"5:8:{m}": max(s for s in range(1, seq + 1) if s % 5 == m) for m in range(5)}
