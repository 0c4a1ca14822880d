"""What a client may rely on (PROTOCOL.md §5), checked on what a client receives.

Pure: no I/O, no asyncio, no clock. `RuleChecker` is fed every decoded server
message of one client in arrival order, across reconnects, and is also that
client's record of what it holds (epoch, last seq and newest state per market of
each topic), so the checks are made against exactly the state a resume starts
from. `verify_coalescing` is the truth-based half of rule 3, for tests that know
every published event.

Rule names (`Violation.rule`):

- ``seq_order`` (§5 rule 1): within an epoch an event's seq is not above the
  topic's last seq (repeated or going down), or a snapshot moved it back.
- ``market_regression`` (§5 rule 2): a market's state would be replaced by an
  older one (lower seq, same epoch). A repeat of the very same event (equal seq)
  is not older; it is reported as ``seq_order`` only.
- ``silent_gap`` (§5 rule 3): seqs were skipped and the first event after the
  gap lacks ``"coalesced": true``.
- ``lost_event`` (§5 rule 3, `verify_coalescing` only): a skipped event was not
  superseded by a later event of the same market that the client received.
- ``final_state`` (§5 rule 3, `verify_coalescing` only): with the stream
  complete, a market's last received state is not its newest published one.
- ``altered_event`` (`verify_coalescing` only): a received event is not the
  published event of that seq, field for field.
- ``unexpected`` (§3, §4): an event, snapshot or reset for a topic the
  connection has not been told is subscribed (no ``subscribed`` yet on this
  connection, or ``unsubscribed``), or an event for a topic with no base
  (no snapshot yet, or a ``reset`` whose snapshot has not come).
- ``epoch`` (§1, §3): an event or snapshot of another epoch than the one held,
  with no ``reset`` before it.
- ``bad_snapshot``: a snapshot market whose seq is above the snapshot's seq or
  whose epoch is not the snapshot's.
- ``malformed``: a message lacking a field the rules need.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SEQ_ORDER = "seq_order"
MARKET_REGRESSION = "market_regression"
SILENT_GAP = "silent_gap"
LOST_EVENT = "lost_event"
FINAL_STATE = "final_state"
ALTERED_EVENT = "altered_event"
UNEXPECTED = "unexpected"
EPOCH = "epoch"
BAD_SNAPSHOT = "bad_snapshot"
MALFORMED = "malformed"

# Keys a server adds to a published event in transit; not part of the state.
TRANSPORT_KEYS = frozenset({"coalesced"})

Event = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Violation:
    """One breach of the contract, named by one of the rule constants above."""

    rule: str
    topic: str
    detail: str


@dataclass(slots=True)
class TopicState:
    """What the client holds for one topic.

    `epoch` and `seq` are the resume point (`seq` is the seq of the last event
    held); `markets` maps a market to the newest event held for it. `has_base`
    is false until a snapshot arrives (or a resume point is adopted) and again
    from a ``reset`` until its snapshot: while false the other fields say
    nothing. `live` is true between ``subscribed`` and ``unsubscribed`` on the
    current connection; a new ``welcome`` clears it and keeps the rest, which
    is what the next resume continues from.
    """

    epoch: str | None = None
    seq: int | None = None
    markets: dict[str, Event] = field(default_factory=dict)
    has_base: bool = False
    live: bool = False
    after_reset: bool = False

    @property
    def synced(self) -> bool:
        """True when events of this topic can be applied on this connection."""
        return self.live and self.has_base

    def resume_point(self) -> dict[str, Any] | None:
        """The value for this topic in a ``subscribe`` request (§3)."""
        if not self.has_base:
            return None
        return {"epoch": self.epoch, "seq": self.seq}


# A subscribe the client sent and the server has not answered yet: either the
# resume point it announced, or None for "no resume point" (wants a snapshot).
_Announced = tuple[str, int] | None


class RuleChecker:
    """Checks §5 on one client's received messages, across its reconnects.

    Feed every decoded server message, in arrival order, to `feed` (``batch``
    frames are unpacked here); after a reconnect keep feeding the same
    instance, starting with the new ``welcome``. A topic listed in
    ``subscribed`` continues from the state held for it, which is what a
    client resuming with `TopicState.resume_point` announces. A client that
    subscribes with another resume point, or with none while it holds one,
    says so first with `expect_resume` / `expect_snapshot`; that takes effect
    when the ``subscribed`` naming the topic arrives, so events still in flight
    before it are checked against the old state.

    After a violation the state keeps the newer of what was held and what
    arrived, as a defensive client would, so one fault is reported once rather
    than cascading. At most `max_recorded` violations are kept in
    `violations`; `counts` counts them all, by rule.
    """

    def __init__(self, *, max_recorded: int = 1000) -> None:
        self.topics: dict[str, TopicState] = {}
        self.violations: list[Violation] = []
        self.counts: dict[str, int] = {}
        self.max_recorded = max_recorded
        self._announced: dict[str, _Announced] = {}

    @property
    def ok(self) -> bool:
        """True while no violation at all has been seen."""
        return not self.counts

    def state(self, topic: str) -> TopicState:
        """The held state of `topic`, created empty on first use."""
        st = self.topics.get(topic)
        if st is None:
            st = self.topics[topic] = TopicState()
        return st

    def synced(self, topic: str) -> bool:
        """True when `topic` is subscribed on this connection and has a base."""
        st = self.topics.get(topic)
        return st is not None and st.live and st.has_base

    # -- what the client announces -----------------------------------------

    def expect_resume(self, topic: str, epoch: str, seq: int) -> None:
        """The client subscribes `topic` resuming after (`epoch`, `seq`).

        When that differs from what is held (a client restored from elsewhere,
        or replaying from an older point on purpose) the held state is rewound
        to it at ``subscribed``: markets newer than `seq` are dropped.
        """
        self._announced[topic] = (epoch, seq)

    def expect_snapshot(self, topic: str) -> None:
        """The client subscribes `topic` with no resume point.

        At ``subscribed`` the held state is forgotten, so the snapshot may
        start anywhere and no event is accepted before it.
        """
        self._announced[topic] = None

    # -- feeding -----------------------------------------------------------

    def feed(self, msg: Mapping[str, Any]) -> None:
        """Take one decoded server message, in arrival order."""
        kind = msg.get("type")
        if kind == "odds" or kind == "stats":  # a partner's rows follow the same rules (§12)
            self.feed_event(msg)
        elif kind == "batch":
            for event in msg.get("events") or ():
                self.feed_event(event)
        elif kind == "snapshot":
            self._on_snapshot(msg)
        elif kind == "reset":
            self._on_reset(msg)
        elif kind == "subscribed":
            self._on_subscribed(msg)
        elif kind == "unsubscribed":
            self._on_unsubscribed(msg)
        elif kind == "welcome":
            self._on_welcome()
        elif kind == "error":
            # A refused topic keeps whatever it had; drop the announcement.
            for topic in _topic_names(msg.get("topics")):
                self._announced.pop(topic, None)
        # pong, reconnect and unknown types carry nothing §5 speaks of.

    def feed_all(self, msgs: Iterable[Mapping[str, Any]]) -> None:
        """Feed a whole recorded stream."""
        for msg in msgs:
            self.feed(msg)

    def feed_event(self, event: Event) -> None:
        """Take one ``odds`` (or ``stats``) event (already out of its batch).

        A ``stats`` event names its row by ``key`` where an ``odds`` event
        names its market (PROTOCOL.md §12): the rules are the same.

        The hot path of a client: a few dict lookups, no allocation unless
        something is wrong.
        """
        try:
            topic = event["topic"]
            seq = event["seq"]
            market = event["market"] if "market" in event else event["key"]
            epoch = event["epoch"]
        except (KeyError, TypeError):
            self._violate(MALFORMED, str(_get(event, "topic")), f"event lacks a field: {event!r}")
            return
        if type(seq) is not int:
            self._violate(MALFORMED, str(topic), f"odds seq is not an integer: {seq!r}")
            return
        st = self.topics.get(topic)
        if st is None or not st.live or not st.has_base:
            why = (
                "topic not subscribed on this connection"
                if st is None or not st.live
                else "no snapshot or resume base yet"
            )
            self._violate(UNEXPECTED, topic, f"odds seq {seq}: {why}")
            return
        if epoch != st.epoch:
            self._violate(
                EPOCH, topic, f"odds seq {seq} of epoch {epoch!r} while holding {st.epoch!r}"
            )
            return
        last = st.seq
        held = st.markets.get(market)
        held_seq = held["seq"] if held is not None else -1
        if seq <= last:
            what = "repeated" if seq == last else f"went down from {last}"
            self._violate(SEQ_ORDER, topic, f"seq {seq} {what}")
            if seq < held_seq:
                self._violate(
                    MARKET_REGRESSION,
                    topic,
                    f"market {market}: seq {seq} would replace newer seq {held_seq}",
                )
            return
        if seq != last + 1 and not event.get("coalesced"):
            self._violate(SILENT_GAP, topic, f"seq {last} -> {seq} without coalesced flag")
        st.seq = seq
        if seq < held_seq:
            # Only reachable when the base itself was inconsistent.
            self._violate(
                MARKET_REGRESSION,
                topic,
                f"market {market}: seq {seq} would replace newer seq {held_seq}",
            )
            return
        st.markets[market] = event

    # -- control messages --------------------------------------------------

    def _on_welcome(self) -> None:
        # A new connection: nothing is subscribed on it yet; held state stays.
        for st in self.topics.values():
            st.live = False

    def _on_subscribed(self, msg: Mapping[str, Any]) -> None:
        for topic in _topic_names(msg.get("topics")):
            st = self.state(topic)
            if topic in self._announced:
                self._adopt(st, self._announced.pop(topic))
            st.live = True

    def _adopt(self, st: TopicState, announced: _Announced) -> None:
        if announced is None:
            st.epoch = None
            st.seq = None
            st.markets = {}
            st.has_base = False
            st.after_reset = False
            return
        epoch, seq = announced
        if st.has_base and st.epoch == epoch and st.seq == seq:
            return
        if st.has_base and st.epoch == epoch:
            st.markets = {m: ev for m, ev in st.markets.items() if ev["seq"] <= seq}
        else:
            st.markets = {}
        st.epoch = epoch
        st.seq = seq
        st.has_base = True
        st.after_reset = False

    def _on_unsubscribed(self, msg: Mapping[str, Any]) -> None:
        # The client stops following the topic; its state would go stale.
        for topic in _topic_names(msg.get("topics")):
            self.topics.pop(topic, None)
            self._announced.pop(topic, None)

    def _on_reset(self, msg: Mapping[str, Any]) -> None:
        topic = msg.get("topic")
        if not isinstance(topic, str):
            self._violate(MALFORMED, str(topic), f"reset lacks a topic: {msg!r}")
            return
        st = self.state(topic)
        if not st.live:
            self._violate(UNEXPECTED, topic, "reset for a topic not subscribed on this connection")
        st.has_base = False
        st.after_reset = True
        st.markets = {}

    def _on_snapshot(self, msg: Mapping[str, Any]) -> None:
        try:
            topic = msg["topic"]
            epoch = msg["epoch"]
            seq = msg["seq"]
            markets = msg["markets"]
        except (KeyError, TypeError):
            self._violate(MALFORMED, str(_get(msg, "topic")), "snapshot lacks a field")
            return
        if not isinstance(topic, str) or type(seq) is not int:
            self._violate(MALFORMED, str(topic), f"snapshot topic/seq malformed: {seq!r}")
            return
        st = self.state(topic)
        if not st.live:
            self._violate(
                UNEXPECTED, topic, f"snapshot seq {seq} for a topic not subscribed here"
            )
        fresh: dict[str, Event] = {}
        for event in markets:
            market = event.get("market", event.get("key"))
            ev_seq = event.get("seq")
            if not isinstance(market, str) or not isinstance(ev_seq, int):
                self._violate(MALFORMED, topic, f"snapshot market lacks a field: {event!r}")
                continue
            if ev_seq > seq or event.get("epoch", epoch) != epoch:
                self._violate(
                    BAD_SNAPSHOT,
                    topic,
                    f"market {market} seq {ev_seq} epoch {event.get('epoch')!r} "
                    f"in snapshot seq {seq} epoch {epoch!r}",
                )
            fresh[market] = event
        continues = st.has_base and not st.after_reset
        if continues and epoch != st.epoch:
            self._violate(
                EPOCH, topic, f"snapshot of epoch {epoch!r} while holding {st.epoch!r}, no reset"
            )
        elif continues:
            if seq < st.seq:
                self._violate(SEQ_ORDER, topic, f"snapshot seq {seq} below held seq {st.seq}")
                seq = st.seq
            for market, held in st.markets.items():
                new = fresh.get(market)
                if new is not None and new["seq"] < held["seq"]:
                    self._violate(
                        MARKET_REGRESSION,
                        topic,
                        f"market {market}: snapshot seq {new['seq']} older than held "
                        f"{held['seq']}",
                    )
                    fresh[market] = held
        st.epoch = epoch
        st.seq = seq
        st.markets = fresh
        st.has_base = True
        st.after_reset = False

    def _violate(self, rule: str, topic: str, detail: str) -> None:
        self.counts[rule] = self.counts.get(rule, 0) + 1
        if len(self.violations) < self.max_recorded:
            self.violations.append(Violation(rule, topic, detail))


def _topic_names(topics: Any) -> Iterable[str]:
    # `subscribed`/`unsubscribed`/`error` list topics; an object keyed by
    # topic (as in the subscribe request) is accepted too.
    if topics is None:
        return ()
    if isinstance(topics, Mapping):
        return list(topics)
    if isinstance(topics, str):
        return (topics,)
    return list(topics)


def _get(msg: Any, key: str) -> Any:
    return msg.get(key) if isinstance(msg, Mapping) else None


def _row(event: Event) -> str:
    """What an event supersedes: its market (odds) or its row's key (stats, §12)."""
    return event["market"] if "market" in event else event["key"]


def _state_of(event: Event) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in TRANSPORT_KEYS}


def verify_coalescing(
    received: Sequence[Event],
    published: Sequence[Event],
    *,
    after_seq: int | None = None,
    complete: bool = True,
) -> list[Violation]:
    """The half of §5 rule 3 that needs the truth: nothing lost but superseded.

    Assumes, for one topic and one epoch (a ValueError says otherwise):

    - `published` holds every event published on the topic with seq above
      `after_seq`, in seq order with no hole (the source has none, §1); more
      before it is ignored. With `complete` it runs up to the last event ever
      published, i.e. the feed has stopped and the client has drained.
    - `received` holds the ``odds`` events the client received after its base,
      in arrival order, out of their batches, snapshots excluded; all of them
      of this topic and epoch (split a stream at each ``reset`` first).
    - `after_seq` is the seq of the base those events continue from: the
      snapshot's seq, or the resume point's. By default, just before the
      first published event, i.e. the client must account for all of it.

    Checks: every received event is the published event of its seq, apart
    from transport keys like ``coalesced`` (``altered_event``). With
    `complete`: every published seq the client did not receive was superseded
    by a later event of the same market that it did receive (``lost_event``),
    and each market's last received state, in arrival order, is its newest
    published one (``final_state``). Without `complete` (a stream cut short,
    `published` covering at least everything published before the last event
    received) the superseding event may still be on its way, so a seq skipped
    below the last received one is reported only when no later event of its
    market was published at all: a server skips an event only for a newer one
    it already holds. Order, repeats and the ``coalesced`` flag are
    `RuleChecker`'s business, not checked here.
    """
    if not published:
        return []
    topic = published[0]["topic"]
    epoch = published[0]["epoch"]
    if after_seq is None:
        after_seq = published[0]["seq"] - 1
    by_seq: dict[int, Event] = {}
    expected = None
    for event in published:
        if event["topic"] != topic or event["epoch"] != epoch:
            raise ValueError(f"published mixes topics or epochs: {event!r}")
        if expected is not None and event["seq"] != expected:
            raise ValueError(f"published has a hole or disorder at seq {event['seq']}")
        expected = event["seq"] + 1
        if event["seq"] > after_seq:
            by_seq[event["seq"]] = event
    if not by_seq:
        return []
    first, last_published = min(by_seq), max(by_seq)
    if first != after_seq + 1:
        raise ValueError(f"published starts at {first}, not after after_seq {after_seq}")

    out: list[Violation] = []
    # Latest received seq per market, and each market's last state in arrival order.
    newest_received: dict[str, int] = {}
    last_received_state: dict[str, Event] = {}
    received_seqs: set[int] = set()
    for event in received:
        if event.get("topic") != topic or event.get("epoch") != epoch:
            raise ValueError(f"received mixes topics or epochs: {event!r}")
        seq = event["seq"]
        truth = by_seq.get(seq)
        if truth is None or _state_of(event) != _state_of(truth):
            out.append(
                Violation(ALTERED_EVENT, topic, f"seq {seq} is not the published event {truth!r}")
            )
            continue
        received_seqs.add(seq)
        market = _row(event)
        if seq > newest_received.get(market, -1):
            newest_received[market] = seq
        last_received_state[market] = event

    newest_published: dict[str, Event] = {}
    for seq in range(first, last_published + 1):
        newest_published[_row(by_seq[seq])] = by_seq[seq]
    horizon = last_published if complete else max(received_seqs, default=after_seq)
    for seq in range(first, horizon + 1):
        if seq in received_seqs:
            continue
        market = _row(by_seq[seq])
        if newest_received.get(market, -1) > seq:
            continue
        if not complete and newest_published[market]["seq"] > seq:
            continue  # superseded; the superseding event may still be on its way
        out.append(
            Violation(
                LOST_EVENT,
                topic,
                f"seq {seq} (market {market}) skipped and not superseded by a received event",
            )
        )

    if complete:
        for market, truth in newest_published.items():
            held = last_received_state.get(market)
            if held is None or held["seq"] != truth["seq"]:
                out.append(
                    Violation(
                        FINAL_STATE,
                        topic,
                        f"market {market}: holds seq {held and held['seq']}, "
                        f"newest published {truth['seq']}",
                    )
                )
    return out
