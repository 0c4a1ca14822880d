"""The aggregator's whole decision: merged provider messages in, events out.

`Engine` is a deterministic function of its configuration and the ordered
input (issue 16, point 3; PROTOCOL.md section 8): every region runs it on the
same merged sequence and publishes byte-identical events with the same epoch
and seqs, so a player can move between regions and resume without a reset.
It is a plain object: it never awaits, never reads a clock and never talks to
Redis; the runner around it publishes what it returns.

- `epoch` comes from the stream name and a generation number the operator
  bumps when the seq space must start over (`f"{stream}-g{generation}"`):
  never random, so all regions name the seq space alike, and never "0" (the
  unpublished topic) nor a `feed.publisher.new_epoch` name ("r" + 8 hex +
  "-" + date), whose last part is all digits where ours starts with "g".
- `seq` is counted here, per topic, from 1; the publish script is told the
  seq it must have. A restarted engine continues from its checkpoint
  (`snapshot` / `restore`), so a seq is never reused.
- `ts` is the `pts` of the input that caused the change, never the time of
  publishing, so the bytes do not depend on when a region gets to them.
- `body` is exactly `feed.events.PriceUpdate.body()` for the market (prices
  sorted by outcome) plus a trailing `"providers":[...]`, the sorted names
  of the providers the state rests on, written by orjson from a dict built in
  a fixed key order.
- An event is published only when the market's published state (status,
  prices, providers) changes.

Inputs that cannot become a valid event are refused and counted by reason in
`EngineCounters.rejected`, and change nothing else (not even data time);
nothing raises past `process`. The reasons: `invalid_input` (fails
`aggregator.inputs.validate`: malformed market id, provider, value...),
`zero_pts` (ts 0 means "now" to `PriceUpdate`), `outside_partition_map` (a
sport the map does not know), `unknown_market_type` (no overround
configured), `identity_changed` (a market's event id or type differs from
its first message's), `invalid_event` (fails `PriceUpdate.validate`),
`bad_quote` (values that are no book, e.g. one outcome).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from aggregator.consensus import ConsensusBook, ConsensusRules, Decision, InvalidView, Verdict, View
from aggregator.inputs import InvalidInput, ProviderMessage, validate
from aggregator.margin import Margins
from feed.events import InvalidEvent, PriceUpdate
from gateway.topics import PartitionMap, topic_for_market
from redis_contract import UNPUBLISHED_EPOCH

SNAPSHOT_FORMAT = 1
_STREAM = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_EPOCH = re.compile(r"[a-z0-9-]{1,40}")
_PUBLISHER_EPOCH = re.compile(r"r[0-9a-f]{8}-[0-9]{8}")  # feed.publisher.new_epoch()


def epoch_for(stream: str, generation: int) -> str:
    """The seq space's name: `{stream}-g{generation}`, validated.

    `stream`: lower-case letters, digits and inner hyphens; `generation`: an
    int >= 0. The result is at most 40 characters of [a-z0-9-].
    """
    if not isinstance(stream, str) or not _STREAM.fullmatch(stream):
        raise ValueError(f"stream {stream!r} must be [a-z0-9-], not starting or ending with '-'")
    if type(generation) is not int or generation < 0:
        raise ValueError(f"generation must be an int >= 0, not {generation!r}")
    epoch = f"{stream}-g{generation}"
    if not _EPOCH.fullmatch(epoch):
        raise ValueError(f"epoch {epoch!r} is longer than 40 characters")
    # Both hold by construction (the "-g" part); checked so that a change of
    # either format cannot make the seq spaces collide unnoticed.
    if epoch == UNPUBLISHED_EPOCH or _PUBLISHER_EPOCH.fullmatch(epoch):
        raise ValueError(f"epoch {epoch!r} collides with another epoch scheme")
    return epoch


def event_body(
    market: str,
    event_id: str,
    ts: int,
    status: str,
    prices: tuple[tuple[str, str], ...],
    providers: tuple[str, ...],
) -> bytes:
    """`PriceUpdate.body()` of the market, plus `"providers":[...]` at the end.

    orjson keeps the dict's insertion order, so the key order is the one
    written here, the same as `PriceUpdate.body()`'s; prices are sorted by
    outcome. No whitespace, UTF-8: one market state has one byte string.
    """
    return orjson.dumps(
        {
            "market": market,
            "event_id": event_id,
            "ts": ts,
            "status": status,
            "prices": dict(sorted(prices)),
            "providers": sorted(providers),
        }
    )[1:]


@dataclass(frozen=True, slots=True)
class Output:
    """One event to publish: the script adds type, topic, epoch and this seq."""

    topic: str
    market: str
    seq: int
    ts: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Published:
    """What a market last published; the next event must differ from it."""

    status: str
    prices: tuple[tuple[str, str], ...]
    providers: tuple[str, ...]
    seq: int
    ts: int
    body: bytes

    def same_state(self, status: str, prices: tuple, providers: tuple) -> bool:
        return (self.status, self.prices, self.providers) == (status, prices, providers)


@dataclass(slots=True)
class MarketRecord:
    """A market's identity, fixed by its first accepted message, and its last event."""

    topic: str
    event_id: str
    market_type: str
    last: Published | None = None


@dataclass(slots=True)
class EngineCounters:
    """`published` events; `rejected` inputs by reason; `after_close` updates of a
    closed market (kept for the provider's liveness, otherwise ignored)."""

    published: int = 0
    after_close: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "after_close": self.after_close,
            "rejected": dict(sorted(self.rejected.items())),
        }


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Engine:
    """Merged provider messages in order -> events (see the module docstring)."""

    def __init__(
        self,
        stream: str,
        generation: int,
        pmap: PartitionMap,
        rules: ConsensusRules | None = None,
        margins: Margins | None = None,
    ) -> None:
        self.epoch = epoch_for(stream, generation)
        self.stream = stream
        self.generation = generation
        self.pmap = pmap
        self.rules = rules or ConsensusRules()
        self.margins = margins or Margins()
        self.consensus = ConsensusBook(self.rules)
        self.counters = EngineCounters()
        self._seqs: dict[str, int] = {}  # topic -> last seq published
        self._markets: dict[str, MarketRecord] = {}

    # -- input --------------------------------------------------------------------

    def process(self, msg: ProviderMessage) -> list[Output]:
        """One merged input -> the events it causes (often none), in publish order.

        Markets whose providers went quiet before this input come first (see
        `aggregator.consensus`), then the input's own market.
        """
        try:
            view, record = self._admit(msg)
        except _Refused as refused:
            self.counters.reject(refused.reason)
            return []
        if record is not None:
            self._markets.setdefault(msg.market, record)
            if self.consensus.is_closed(msg.market):
                self.counters.after_close += 1
        decisions = self.consensus.apply(
            msg.provider, msg.pts, msg.market if view is not None else None, view
        )
        outputs = []
        for decision in decisions:
            output = self._publish(decision, msg.pts)
            if output is not None:
                outputs.append(output)
        return outputs

    def seq(self, topic: str) -> int:
        """The last seq published on `topic` (0: none yet)."""
        return self._seqs.get(topic, 0)

    def _admit(self, msg: ProviderMessage) -> tuple[View | None, MarketRecord | None]:
        """Check everything that could refuse the message, before any state changes.

        Returns the view read from the message (None for a heartbeat) and the
        record of its market (new, or the existing one).
        """
        try:
            validate(msg)  # the input format's own rules (aggregator.inputs)
        except (InvalidInput, TypeError, ValueError, AttributeError):
            raise _Refused("invalid_input") from None
        if msg.pts == 0:  # ts 0 would mean "now" to PriceUpdate: a wall clock
            raise _Refused("zero_pts")
        if msg.is_heartbeat:
            return None, None
        record = self._record_for(msg)
        try:
            view = View.from_message(msg)
        except InvalidView:
            raise _Refused("bad_quote") from None
        return view, record

    def _record_for(self, msg: ProviderMessage) -> MarketRecord:
        market = msg.market
        sport, league, number = (int(x) for x in market.split(":"))
        if sport not in self.pmap.sports:
            raise _Refused("outside_partition_map")
        known = self._markets.get(market)
        topic = known.topic if known else topic_for_market(self.pmap, sport, league, number)
        probe = PriceUpdate(
            topic=topic,
            market=market,
            event_id=msg.event_id,
            prices={outcome: "1.01" for outcome, _ in msg.values},
            status=msg.status,
            ts=msg.pts,
        )
        try:  # the publisher's own checks, so no event of this market can fail them
            probe.validate(self.pmap)
        except InvalidEvent:
            raise _Refused("invalid_event") from None
        if known is not None:
            if (msg.event_id, msg.market_type) != (known.event_id, known.market_type):
                raise _Refused("identity_changed")
            return known
        if not self.margins.knows(msg.market_type):
            raise _Refused("unknown_market_type")
        return MarketRecord(topic, msg.event_id, msg.market_type)

    # -- output -------------------------------------------------------------------

    def _publish(self, decision: Decision, ts: int) -> Output | None:
        if not decision.publishes:
            return None
        record = self._markets[decision.market]
        prices: tuple[tuple[str, str], ...] = ()
        if decision.verdict is Verdict.OPEN:
            prices = self.margins.prices(record.market_type, decision.probabilities)
        status = decision.verdict.value
        if record.last is not None and record.last.same_state(status, prices, decision.providers):
            return None
        seq = self._seqs.get(record.topic, 0) + 1
        self._seqs[record.topic] = seq
        body = event_body(
            decision.market, record.event_id, ts, status, prices, decision.providers
        )
        record.last = Published(status, prices, decision.providers, seq, ts, body)
        self.counters.published += 1
        return Output(record.topic, decision.market, seq, ts, body)

    # -- checkpoint ---------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The configuration the outputs depend on, as JSON-ready values."""
        return {
            "pmap": self.pmap.to_dict(),
            "rules": self.rules.to_dict(),
            "margins": self.margins.to_dict(),
        }

    def snapshot(self) -> bytes:
        """Canonical JSON of everything a restart needs (sorted keys, no spaces).

        Equal engines give equal bytes, so a checkpoint can be compared
        across regions as well as restored.
        """
        return orjson.dumps(
            {
                "format": SNAPSHOT_FORMAT,
                "stream": self.stream,
                "generation": self.generation,
                "epoch": self.epoch,
                "config": self.config(),
                "seqs": dict(sorted(self._seqs.items())),
                "markets": {
                    market: {
                        "topic": rec.topic,
                        "event_id": rec.event_id,
                        "market_type": rec.market_type,
                        "last": None if rec.last is None else _published_out(rec.last),
                    }
                    for market, rec in sorted(self._markets.items())
                },
                "consensus": self.consensus.to_dict(),
                "counters": self.counters.to_dict(),
            },
            option=orjson.OPT_SORT_KEYS,
        )

    @classmethod
    def restore(
        cls,
        data: bytes,
        pmap: PartitionMap,
        rules: ConsensusRules | None = None,
        margins: Margins | None = None,
    ) -> Engine:
        """The engine a snapshot was taken of; it goes on as if it never stopped.

        The configuration must be the one the snapshot was taken under
        (ValueError otherwise): under another, the restored engine would not
        publish the bytes the other regions publish. Changing it means a
        new generation, hence a new epoch.
        """
        saved = orjson.loads(data)
        if not isinstance(saved, dict) or saved.get("format") != SNAPSHOT_FORMAT:
            raise ValueError("not an aggregator engine snapshot of a known format")
        engine = cls(saved["stream"], saved["generation"], pmap, rules, margins)
        if engine.epoch != saved["epoch"]:
            raise ValueError(f"snapshot epoch {saved['epoch']!r} is not {engine.epoch!r}")
        if engine.config() != saved["config"]:
            raise ValueError("snapshot was taken under another configuration")
        engine._seqs = {str(t): int(s) for t, s in saved["seqs"].items()}
        for market, rec in saved["markets"].items():
            engine._markets[market] = MarketRecord(
                str(rec["topic"]),
                str(rec["event_id"]),
                str(rec["market_type"]),
                None if rec["last"] is None else _published_in(rec["last"]),
            )
        engine.consensus = ConsensusBook.from_dict(saved["consensus"], engine.rules)
        counters = saved["counters"]
        engine.counters = EngineCounters(
            int(counters["published"]),
            int(counters["after_close"]),
            {str(k): int(v) for k, v in counters["rejected"].items()},
        )
        return engine


def _published_out(last: Published) -> dict[str, Any]:
    return {
        "status": last.status,
        "prices": [list(pair) for pair in last.prices],
        "providers": list(last.providers),
        "seq": last.seq,
        "ts": last.ts,
        "body": last.body.decode(),
    }


def _published_in(saved: dict[str, Any]) -> Published:
    return Published(
        str(saved["status"]),
        tuple((str(o), str(p)) for o, p in saved["prices"]),
        tuple(str(p) for p in saved["providers"]),
        int(saved["seq"]),
        int(saved["ts"]),
        str(saved["body"]).encode(),
    )
