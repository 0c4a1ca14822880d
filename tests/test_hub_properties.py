"""The real hub, driven through arbitrary interleavings, keeps PROTOCOL.md §5 for everyone.

The hub is a plain object that returns effects (gateway/effects.py); this test
is its runner, with a model Redis (seq space, history, latest state) behind
it. Reads are executed against the model and answered when the test chooses,
and may fail, so every race the worker meets is reachable: live events
published before a read but delivered after it, pub/sub losing messages,
reads failing and retried on a timer, history trimmed under a reader, Redis
losing its data (a new epoch) while the pub/sub connection is down, players
joining with a snapshot or resuming from what they hold, leaving, and going
in and out of back-pressure. Each player's frames go through the client-side RuleChecker;
once everything settles, every player holds exactly Redis's newest state.
"""

from __future__ import annotations

import asyncio
from collections import deque

import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from client.rules import RuleChecker
from gateway import protocol
from gateway.broker import History, TopicState
from gateway.channel import TopicChannel
from gateway.counters import WorkerCounters
from gateway.effects import (
    AtTurnEnd,
    CloseTopic,
    Effect,
    LoadState,
    OpenTopic,
    ReadHistory,
    RetryRepair,
)
from gateway.fanout import Fanout
from gateway.hub import Hub
from gateway.protocol import ResumePoint
from gateway.session import Session
from redis_contract import UNPUBLISHED_EPOCH

TOPIC = "odds:5:8"
MARKETS = 3
PLAYERS = 3


class ModelRedis:
    """One topic's keys as publish.lua and the read scripts see them."""

    def __init__(self) -> None:
        self.epochs = 0
        self.lose_data()

    def lose_data(self) -> None:
        self.epoch: str | None = None
        self.seq = 0
        self.history: deque[tuple[int, bytes]] = deque()
        self.latest: dict[str, bytes] = {}

    def publish(self, market: int) -> bytes:
        if self.epoch is None:
            self.epochs += 1
            self.epoch = f"r{self.epochs}"
        self.seq += 1
        event = orjson.dumps({"type": "odds", "topic": TOPIC, "epoch": self.epoch,
                              "seq": self.seq, "market": f"5:8:{market}", "ts": 1,
                              "prices": {"home": f"{self.seq}.00"}})
        self.history.append((self.seq, event))
        self.latest[f"5:8:{market}"] = event
        return event

    def trim(self, keep: int) -> None:
        while len(self.history) > keep:
            self.history.popleft()

    def load_state(self) -> TopicState:
        if self.epoch is None:
            return TopicState(UNPUBLISHED_EPOCH, 0, [])
        return TopicState(self.epoch, self.seq, list(self.latest.values()))

    def read_since(self, since: int, most: int) -> History:
        if self.epoch is None:
            return History(UNPUBLISHED_EPOCH, 0, [])
        want = self.seq - since
        if want <= 0:
            return History(self.epoch, self.seq, [])
        if want > most or want > len(self.history):
            return History(self.epoch, self.seq, None)
        return History(self.epoch, self.seq, [e for _, e in list(self.history)[-want:]])


class ModelRunner:
    """Performs the hub's effects the way gateway/hub_runner.py does, at the test's pace.

    A read is executed against the model (Redis runs it) and replied to later
    (the reply reaches the worker), or fails; retries wait for `fire_timer`.
    """

    def __init__(self, hub: Hub, redis: ModelRedis) -> None:
        self.hub = hub
        self.redis = redis
        self.reads: deque[Effect] = deque()  # asked, not yet run by Redis
        self.replies: deque[tuple[Effect, object]] = deque()  # run, reply on its way
        self.timers: deque[TopicChannel] = deque()
        self.subscribed: set[str] = set()
        self.waiting: dict[TopicChannel, list] = {}  # joiners waiting for a load

    def perform(self, effects) -> None:
        for effect in effects:
            if isinstance(effect, OpenTopic):
                self.subscribed.add(effect.channel.topic)
                self.reads.append(effect)
            elif isinstance(effect, CloseTopic):
                self.subscribed.discard(effect.topic)
            elif isinstance(effect, ReadHistory | LoadState):
                self.reads.append(effect)
            elif isinstance(effect, RetryRepair):
                self.timers.append(effect.channel)
            elif isinstance(effect, AtTurnEnd):
                asyncio.get_running_loop().call_soon(self._apply_pressure, effect.session)
            else:
                raise AssertionError(f"unknown effect {effect!r}")

    def _apply_pressure(self, session: Session) -> None:
        self.perform(self.hub.apply_pressure(session))

    def execute_one(self) -> None:
        if not self.reads:
            return
        effect = self.reads.popleft()
        if isinstance(effect, ReadHistory):
            self.replies.append((effect, self.redis.read_since(effect.after, effect.most)))
        else:
            self.replies.append((effect, self.redis.load_state()))

    def reply_one(self, fail: bool) -> None:
        if not self.replies:
            return
        effect, reply = self.replies.popleft()
        error = ConnectionError("redis went away") if fail else None
        if isinstance(effect, OpenTopic):
            channel = effect.channel
            if error is None:
                self.perform(self.hub.loaded(channel, reply))
            else:
                self.perform(self.hub.load_failed(channel, error))
            for join in self.waiting.pop(channel, []):
                join(error is None and channel.ready)
        elif isinstance(effect, ReadHistory):
            self.perform(self.hub.history_failed(effect, error) if error
                         else self.hub.history_read(effect, reply))
        else:
            self.perform(self.hub.resync_failed(effect, error) if error
                         else self.hub.resync_loaded(effect, reply))

    def fire_timer(self) -> None:
        if self.timers:
            self.perform(self.hub.repair_timer(self.timers.popleft()))

    @property
    def busy(self) -> bool:
        return bool(self.reads or self.replies or self.timers)


class Player:
    """One player across its connections: a session per connection, one checker."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.checker = RuleChecker()
        self.session: Session | None = None
        self.joining = False
        self.connections = 0

    def connect(self, runner: ModelRunner) -> Session:
        self.connections += 1
        self.session = Session(
            f"{self.name}-{self.connections}", player=self.name, write=self._write,
            scheduler=runner.hub.fanout, write_frame=self._write_frame,
            on_pressure=lambda s: runner.perform(runner.hub.pressure_changed(s)))
        self._write(protocol.welcome(self.session.conn_id, "n", 0, 1000, "r"))
        return self.session

    def _write(self, payload: bytes) -> None:
        self.checker.feed(orjson.loads(payload))

    def _write_frame(self, frame: bytes) -> None:
        header = 2 if frame[1] < 126 else 4 if frame[1] == 126 else 10
        self._write(frame[header:])


class HubMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis = ModelRedis()
        self.hub = Hub(Fanout(WorkerCounters(), max_batch=4), recent_capacity=6,
                       replay_max=12, replay_chunk=4)
        self.runner = ModelRunner(self.hub, self.redis)
        self.inflight: deque[bytes] = deque()  # published, not yet delivered by pub/sub
        self.connected = True
        self.players = [Player(f"p{i}") for i in range(PLAYERS)]

    def run(self, step) -> None:
        async def go() -> None:
            step()
            for _ in range(6):
                await asyncio.sleep(0)

        self.loop.run_until_complete(go())

    def teardown(self) -> None:
        self.loop.close()

    @initialize(published=st.integers(0, 4))
    def two_players_following(self, published: int) -> None:
        """Most runs are about what happens to players already following."""
        for i in range(published):
            self.redis.publish(i % MARKETS)
        self.join(0, False)
        self.join(1, False)
        self.execute_read()
        self.read_reply(False)

    # -- Redis and pub/sub ------------------------------------------------

    @rule(market=st.integers(0, MARKETS - 1), count=st.integers(1, 5),
          lost=st.booleans())
    def publish(self, market: int, count: int, lost: bool) -> None:
        for i in range(count):
            event = self.redis.publish((market + i) % MARKETS)
            if self.connected and not (lost and i == 0):
                self.inflight.append(event)

    @rule(count=st.integers(1, 6))
    def deliver(self, count: int) -> None:
        def step() -> None:
            for _ in range(min(count, len(self.inflight))):
                self.runner.perform(self.hub.on_message(TOPIC, self.inflight.popleft()))

        self.run(step)

    @rule()
    def execute_read(self) -> None:
        self.runner.execute_one()

    @rule(fail=st.booleans())
    def read_reply(self, fail: bool) -> None:
        self.run(lambda: self.runner.reply_one(fail))

    @rule()
    def retry_timer(self) -> None:
        self.run(self.runner.fire_timer)

    @rule(keep=st.integers(0, 8))
    def trim_history(self, keep: int) -> None:
        self.redis.trim(keep)

    @rule(lose_data=st.booleans())
    def redis_restart(self, lose_data: bool) -> None:
        """The pub/sub connection drops; what was in flight is gone."""
        self.connected = False
        self.inflight.clear()
        if lose_data:
            self.redis.lose_data()

    @precondition(lambda self: not self.connected)
    @rule()
    def redis_back(self) -> None:
        self.connected = True
        self.run(lambda: self.runner.perform(self.hub.on_resubscribed()))

    # -- players ----------------------------------------------------------

    @rule(i=st.integers(0, PLAYERS - 1), resume=st.booleans())
    def join(self, i: int, resume: bool) -> None:
        player = self.players[i]
        if player.session is not None:
            return
        session = player.connect(self.runner)
        point = player.checker.state(TOPIC).resume_point() if resume else None
        if point is None:
            player.checker.expect_snapshot(TOPIC)
        else:
            player.checker.expect_resume(TOPIC, point["epoch"], point["seq"])
        player.joining = True
        hub, runner = self.hub, self.runner

        def subscribed(channel: TopicChannel, ok: bool) -> None:
            """What the worker does once the channel is open (gateway/server.py)."""
            player.joining = False
            if not ok:
                runner.perform(hub.release(channel))
                if session.open:  # refused as `shed`: the player holds what it held
                    player.session = None
                return
            if not session.open:
                runner.perform(hub.release(channel))
                return
            session.send(protocol.subscribed(None, [TOPIC]))
            runner.perform(hub.join(session, channel,
                                    ResumePoint(point["epoch"], point["seq"]) if point else None))

        def step() -> None:
            channel, effects = hub.hold(TOPIC)
            runner.perform(effects)
            if channel.ready:
                subscribed(channel, True)
            else:
                runner.waiting.setdefault(channel, []).append(
                    lambda ok: subscribed(channel, ok))

        self.run(step)

    @rule(i=st.integers(0, PLAYERS - 1))
    def disconnect(self, i: int) -> None:
        player = self.players[i]
        session = player.session
        if session is None:
            return
        player.session = None

        def step() -> None:
            session.close()
            self.hub.leave_all(session)

        self.run(step)

    @rule(i=st.integers(0, PLAYERS - 1), pressed=st.booleans())
    def back_pressure(self, i: int, pressed: bool) -> None:
        session = self.players[i].session
        if session is None:
            return
        self.run(lambda: session.on_pause(0.0) if pressed else session.on_resume())

    # -- what must hold -----------------------------------------------------

    @invariant()
    def no_violation(self) -> None:
        for player in self.players:
            assert player.checker.violations == [], (player.name, player.checker.violations)

    def settle(self) -> None:
        if not self.connected:
            self.redis_back()
        # Pub/sub loses silently what nothing follows: the feed goes on, and the
        # next event it delivers reveals the gap.
        self.publish(0, 1, False)
        for player in self.players:
            if player.session is not None:
                self.run(player.session.on_resume)
        for _ in range(1000):
            if not self.inflight and not self.runner.busy:
                break
            self.deliver(len(self.inflight) or 1)
            self.execute_read()
            self.read_reply(False)
            self.retry_timer()
        else:
            raise AssertionError("the hub never settled")

    def check_final(self) -> None:
        self.settle()
        for player in self.players:
            if player.session is None or player.joining:
                continue
            held = player.checker.topics[TOPIC]
            epoch = self.redis.epoch or UNPUBLISHED_EPOCH
            assert (held.epoch, held.seq) == (epoch, self.redis.seq), player.name
            assert {m: e["seq"] for m, e in held.markets.items()} == \
                {m: orjson.loads(e)["seq"] for m, e in self.redis.latest.items()}, player.name
            assert player.checker.violations == []


class SettlingHubMachine(HubMachine):
    def teardown(self) -> None:
        try:
            self.check_final()
        finally:
            super().teardown()


TestHubInterleavings = SettlingHubMachine.TestCase
TestHubInterleavings.settings = settings(
    max_examples=1000, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
