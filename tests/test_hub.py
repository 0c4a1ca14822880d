"""The hub's fan-out and back-pressure moves, without sockets or Redis.

A channel is installed by hand (as `Hub._load` would after a snapshot read),
players are sessions writing into lists, and events go through
`Hub.on_message` as the Redis reader hands them over.
"""

from __future__ import annotations

import asyncio

import orjson

from client.rules import RuleChecker
from gateway.broker import History, TopicState
from gateway.counters import WorkerCounters
from gateway.effects import LagDeadline, OpenTopic, ReadHistory
from gateway.fanout import Fanout
from gateway.hub import Hub
from gateway.hub_runner import HubRunner
from gateway.protocol import ResumePoint
from gateway.session import Session

TOPIC = "odds:5:8"


def _event(seq: int, market: int) -> bytes:
    return orjson.dumps({"type": "odds", "topic": TOPIC, "epoch": "e", "seq": seq,
                         "market": f"5:8:{market}", "ts": 1, "prices": {"home": f"{seq}.0"}})


class Player:
    """A session whose written frames are decoded and checked like a client would."""

    def __init__(self, hub: Hub, name: str) -> None:
        self.frames: list[dict] = []  # every message written to it, decoded
        self.checker = RuleChecker()
        self.checker.feed({"type": "subscribed", "topics": [TOPIC]})
        self.session = Session(name, player=name, write=self._write, scheduler=hub.fanout,
                               write_frame=self._write_frame,
                               on_pressure=HubRunner(hub).pressure_changed)  # needs no broker

    def _write(self, payload: bytes) -> None:
        msg = orjson.loads(payload)
        self.frames.append(msg)
        self.checker.feed(msg)

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


# -- a resume from another region, ahead of this one (PROTOCOL.md §8) ----------


async def _resumed_ahead(lag_wait_s: float) -> tuple[Hub, Player, object]:
    """A player holding seq 5 (from another region) resumes where the region is at 3."""
    hub = Hub(Fanout(WorkerCounters()), lag_wait_s=lag_wait_s)
    channel, _ = hub.hold(TOPIC)
    hub.loaded(channel, TopicState("e", 3, [_event(3, 0)]))
    player = Player(hub, "p")
    player.checker.feed({"type": "snapshot", "topic": TOPIC, "epoch": "e", "seq": 5,
                         "markets": [orjson.loads(_event(s, s % 3)) for s in (3, 4, 5)]})
    channel, _ = hub.hold(TOPIC)
    [read] = hub.join(player.session, channel, ResumePoint("e", 5))
    assert isinstance(read, ReadHistory) and read.replay is not None
    # Redis (this region's) has published up to 3: nothing after 5 to read.
    effects = hub.history_read(read, History("e", 3, []))
    return hub, player, effects


async def test_a_resume_ahead_of_the_region_is_held_until_it_catches_up() -> None:
    hub, player, effects = await _resumed_ahead(2.0)
    [deadline] = effects
    assert isinstance(deadline, LagDeadline) and deadline.after_s == 2.0
    assert hub.counters.resumes_held == 1 and hub.counters.resumes_reset == 0
    for seq in range(4, 9):  # the region catches up: 4 and 5 the player holds already
        hub.on_message(TOPIC, _event(seq, seq % 3))
    await turn()
    assert player.checker.violations == []
    assert [e["seq"] for f in player.frames for e in f.get("events", [f])] == [6, 7, 8]
    assert player.checker.topics[TOPIC].seq == 8
    assert player.session in hub.channels[TOPIC].aligned  # on the fast path once level
    assert hub.lag_expired(deadline) == ()  # caught up in time: nothing to do
    assert not [f for f in player.frames if f["type"] == "reset"]


async def test_a_resume_still_ahead_when_the_wait_ends_is_reset_ahead() -> None:
    hub, player, effects = await _resumed_ahead(2.0)
    [deadline] = effects
    hub.on_message(TOPIC, _event(4, 1))  # the region moves, but not to 5
    await turn()
    assert player.frames == []  # held: it has 4 already
    assert hub.lag_expired(deadline) == ()
    await turn()
    frames = player.frames
    assert [f["type"] for f in frames] == ["reset", "snapshot"]
    assert frames[0]["reason"] == "ahead" and frames[1]["seq"] == 4
    assert hub.counters.resumes_reset == 1


async def test_without_a_lag_wait_a_resume_ahead_is_reset_at_once() -> None:
    hub, player, effects = await _resumed_ahead(0.0)
    assert effects == () and hub.counters.resumes_reset == 1
    assert [f["type"] for f in player.frames] == ["reset", "snapshot"]
    assert player.frames[0]["reason"] == "ahead"


# -- Redis went back in time (a failover to a replica that was behind) ---------


async def test_redis_found_behind_the_channel_after_a_reconnect_resets_its_players() -> None:
    """The channel delivered up to 5; after the reconnect Redis's head is 3 in the
    same epoch (acknowledged writes lost). Seqs 4 and 5 will name other events:
    the players are reset to Redis's state, never left waiting past seq 5."""
    hub = await _hub_with_channel()
    player = Player(hub, "p")
    await _join(hub, player)
    for seq in range(1, 6):
        hub.on_message(TOPIC, _event(seq, seq % 3))
    await turn()
    [read] = hub.on_resubscribed()
    assert isinstance(read, ReadHistory) and read.replay is None
    [load] = hub.history_read(read, History("e", 3, []))
    assert load.reason == "rewound"
    hub.resync_loaded(load, TopicState("e", 3, [_event(3, 0)]))
    hub.on_message(TOPIC, _event(4, 1))  # the new seq 4, another event than the lost one
    await turn()
    kinds = [f["type"] for f in player.frames]
    assert kinds[-3:] == ["reset", "snapshot", "odds"], kinds
    assert player.frames[-3]["reason"] == "rewound" and player.frames[-2]["seq"] == 3
    assert player.frames[-1]["seq"] == 4
    assert player.checker.violations == []


# -- the audit: a subscription lost without notice ------------------------------


async def test_a_channel_behind_redis_at_two_audits_is_repaired_and_subscribed_again() -> None:
    from gateway.effects import Resubscribe

    hub = await _hub_with_channel()
    player = Player(hub, "p")
    await _join(hub, player)
    hub.on_message(TOPIC, _event(1, 1))
    channel = hub.channels[TOPIC]
    assert hub.audit_targets() == [channel]
    # Redis is at 3; 2 and 3 never came (and no later event will tell).
    assert hub.audited([(channel, "e", 3)]) == []  # a suspect: they may be in flight
    effects = hub.audited([(channel, "e", 3)])
    [read, again] = effects
    assert isinstance(read, ReadHistory) and read.after == 1 and again == Resubscribe(TOPIC)
    assert hub.counters.silent_losses == 1
    hub.history_read(read, History("e", 3, [_event(2, 2), _event(3, 1)]))
    await turn()
    assert player.checker.topics[TOPIC].seq == 3 and player.checker.violations == []


async def test_events_in_flight_at_an_audit_are_not_a_loss() -> None:
    hub = await _hub_with_channel()
    hub.on_message(TOPIC, _event(1, 1))
    channel = hub.channels[TOPIC]
    assert hub.audited([(channel, "e", 2)]) == []
    hub.on_message(TOPIC, _event(2, 1))  # it was on its way
    assert hub.audited([(channel, "e", 4)]) == []  # 3, 4 in flight now: a new suspect
    hub.on_message(TOPIC, _event(3, 1))
    hub.on_message(TOPIC, _event(4, 1))
    assert hub.audited([(channel, "e", 4)]) == [] and hub.counters.silent_losses == 0
    assert hub.audited([(channel, None, 0)]) == []  # Redis lost the topic: not the audit's
