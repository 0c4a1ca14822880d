"""The aggregator engine (aggregator/engine.py): merged inputs in, publishable events out.

What every region relies on: the same inputs give the same bytes, seqs per
topic from 1 without gaps, `ts` from the input, the epoch from the stream and
generation, and a restart from any checkpoint that continues exactly as the
engine that never stopped.
"""

from __future__ import annotations

import decimal
from decimal import ROUND_DOWN, Decimal

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.consensus import ConsensusRules, StaleLimits
from aggregator.engine import Engine, Output, epoch_for, event_body
from aggregator.inputs import ProviderMessage
from aggregator.margin import Margins
from feed.events import PriceUpdate
from feed.publisher import new_epoch
from gateway.topics import PartitionMap
from redis_contract import UNPUBLISHED_EPOCH

S = 1_000_000_000
T0 = 1_763_800_000_123_456_789
PMAP = PartitionMap.load(None)
EVEN = (("away", "0.25"), ("draw", "0.25"), ("home", "0.5"))


def quote(provider: str, pts: int, market: str = "1:39:1", values: tuple = EVEN, *,
          kind: str = "probabilities", status: str = "open", event_id: str = "m-77812",
          market_type: str = "1x2", pseq: int = 1) -> ProviderMessage:
    return ProviderMessage(provider, pseq, pts, kind, market, event_id, market_type, status,
                           values if status == "open" else ())


def beat(provider: str, pts: int) -> ProviderMessage:
    return ProviderMessage(provider, 1, pts, "heartbeat")


def run(engine: Engine, inputs: list[ProviderMessage]) -> list[Output]:
    return [out for msg in inputs for out in engine.process(msg)]


def wire(epoch: str, out: Output) -> bytes:
    """The event as publish.lua writes it: its prefix, then the body."""
    return (f'{{"type":"odds","topic":"{out.topic}","epoch":"{epoch}","seq":{out.seq},'
            .encode() + out.body)


# -- epoch ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("stream", "generation", "epoch"),
    [
        pytest.param("live", 1, "live-g1", id="simple"),
        pytest.param("odds-eu", 0, "odds-eu-g0", id="generation 0"),
        pytest.param("r1", 7, "r1-g7", id="starts with r but is no publisher epoch"),
        pytest.param("a" * 36, 12, "a" * 36 + "-g12", id="40 characters"),
    ],
)
def test_epoch_from_stream_and_generation(stream: str, generation: int, epoch: str) -> None:
    assert epoch_for(stream, generation) == epoch
    assert Engine(stream, generation, PMAP).epoch == epoch
    assert epoch not in (UNPUBLISHED_EPOCH, new_epoch())


@pytest.mark.parametrize(
    ("stream", "generation"),
    [
        pytest.param("", 1, id="empty stream"),
        pytest.param("Live", 1, id="upper case"),
        pytest.param("live_1", 1, id="underscore"),
        pytest.param("-live", 1, id="leading hyphen"),
        pytest.param("live-", 1, id="trailing hyphen"),
        pytest.param("a" * 37, 12, id="41 characters"),
        pytest.param("live", -1, id="negative generation"),
        pytest.param("live", True, id="bool generation"),
        pytest.param("live", "1", id="string generation"),
    ],
)
def test_bad_epoch_parts_are_refused(stream: str, generation: int) -> None:
    with pytest.raises(ValueError):
        epoch_for(stream, generation)


# -- the bytes ----------------------------------------------------------------------------

GOLDEN_OPEN = (
    b'"market":"1:39:1","event_id":"m-77812","ts":1763800000123456789,"status":"open",'
    b'"prices":{"away":"3.75","draw":"3.75","home":"1.88"},"providers":["a","b"]}'
)
GOLDEN_SUSPENDED = (
    b'"market":"1:39:1","event_id":"m-77812","ts":1763800000123456799,"status":"suspended",'
    b'"prices":{},"providers":["a","b"]}'
)


def test_golden_bytes() -> None:
    """Checked by hand once: 0.5 x 1.06 = 0.53, 1/0.53 = 1.886 -> 1.88;
    0.25 x 1.06 = 0.265, 1/0.265 = 3.774 -> 3.75 (0.05 steps between 3 and 4)."""
    engine = Engine("live", 1, PMAP)
    outputs = run(engine, [
        quote("a", T0 - 1),
        quote("b", T0),
        quote("a", T0 + 5, status="suspended"),
        quote("b", T0 + 10, status="suspended"),
    ])
    assert outputs == [
        Output("odds:1:39:1", "1:39:1", 1, T0, GOLDEN_OPEN),
        Output("odds:1:39:1", "1:39:1", 2, T0 + 10, GOLDEN_SUSPENDED),
    ]
    assert wire("live-g1", outputs[0]) == (
        b'{"type":"odds","topic":"odds:1:39:1","epoch":"live-g1","seq":1,' + GOLDEN_OPEN
    )


def test_body_is_the_price_update_body_plus_providers() -> None:
    prices = {"home": "1.88", "away": "3.75", "draw": "3.75"}
    update = PriceUpdate("odds:1:39:1", "1:39:1", "m-77812", dict(sorted(prices.items())),
                         "open", T0)
    update.validate(PMAP)
    body = event_body("1:39:1", "m-77812", T0, "open", tuple(prices.items()), ("b", "a"))
    assert body == update.body()[:-1] + b',"providers":["a","b"]}'
    assert body == GOLDEN_OPEN


def check_event(epoch: str, out: Output) -> dict:
    """The event parses as JSON and passes the publisher's validation."""
    event = orjson.loads(wire(epoch, out))
    assert list(event) == ["type", "topic", "epoch", "seq", "market", "event_id", "ts",
                           "status", "prices", "providers"]
    assert list(event["prices"]) == sorted(event["prices"])
    assert event["providers"] == sorted(event["providers"])
    PriceUpdate(out.topic, event["market"], event["event_id"], event["prices"],
                event["status"], event["ts"]).validate(PMAP)
    assert (event["topic"], event["seq"], event["ts"], event["market"]) == (
        out.topic, out.seq, out.ts, out.market)
    assert all(type(p) is str for p in event["prices"].values())
    return event


# -- seq, ts, changes ---------------------------------------------------------------------

def test_seq_counts_per_topic_from_1() -> None:
    engine = Engine("live", 1, PMAP)
    outputs = run(engine, [
        quote("a", T0, "1:39:1"), quote("b", T0 + 1, "1:39:1"),      # market-level topic
        quote("a", T0 + 2, "5:7:1"), quote("b", T0 + 3, "5:7:1"),    # league-level topic
        quote("a", T0 + 4, "5:7:2", event_id="m-2"),
        quote("b", T0 + 5, "5:7:2", event_id="m-2"),
        quote("a", T0 + 6, "1:39:1", status="suspended"),
        quote("b", T0 + 7, "1:39:1", status="suspended"),
    ])
    assert [(o.topic, o.market, o.seq) for o in outputs] == [
        ("odds:1:39:1", "1:39:1", 1),
        ("odds:5:7", "5:7:1", 1),
        ("odds:5:7", "5:7:2", 2),
        ("odds:1:39:1", "1:39:1", 2),
    ]
    assert (engine.seq("odds:1:39:1"), engine.seq("odds:5:7"), engine.seq("odds:2:1")) == (2, 2, 0)


def test_ts_is_the_pts_of_the_input_that_caused_the_change() -> None:
    engine = Engine("live", 1, PMAP)
    first = run(engine, [quote("a", T0), quote("b", T0 + 1), quote("c", T0 + 2),
                         beat("a", T0 + 8 * S), beat("b", T0 + 8 * S)])
    # c is quiet; the input that reveals it is a's heartbeat at 14 s.
    later = engine.process(beat("a", T0 + 14 * S))
    assert [o.ts for o in first] == [T0 + 1, T0 + 2]  # a+b open, then c joins
    assert [(o.ts, orjson.loads(wire(engine.epoch, o))["providers"]) for o in later] == [
        (T0 + 14 * S, ["a", "b"])]


def test_only_changes_are_published() -> None:
    engine = Engine("live", 1, PMAP)
    outputs = run(engine, [
        quote("a", T0), quote("b", T0 + 1),                              # open: published
        quote("a", T0 + 2),                                              # same quote
        quote("a", T0 + 3, values=(("away", "0.2501"), ("draw", "0.2499"), ("home", "0.5"))),
        quote("c", T0 + 4, values=(("away", "0.70"), ("draw", "0.20"), ("home", "0.10"))),
        quote("c", T0 + 5, values=EVEN),                                 # c joins the price
    ])
    # The second and third inputs move the consensus by less than a ladder
    # step: same prices, same providers, no event. The outlier changes
    # nothing; c agreeing changes `providers`, which is a change.
    assert [(o.seq, orjson.loads(wire("e", o))["providers"]) for o in outputs] == [
        (1, ["a", "b"]), (2, ["a", "b", "c"])]
    assert engine.counters.published == 2
    assert engine.consensus.counters.outlier == 1


def test_closed_market_is_final() -> None:
    engine = Engine("live", 1, PMAP)
    outputs = run(engine, [
        quote("a", T0), quote("b", T0 + 1),
        quote("a", T0 + 2, status="closed"), quote("b", T0 + 3, status="closed"),
        quote("a", T0 + 4), quote("b", T0 + 5),
    ])
    assert [check_event("e", o)["status"] for o in outputs] == ["open", "closed"]
    assert engine.counters.after_close == 2


# -- refusals ---------------------------------------------------------------------------

REFUSED = [
    pytest.param(quote("a", T0, "9:1:1"), "outside_partition_map", id="sport not in the map"),
    pytest.param(quote("a", T0, "1:039:1"), "invalid_input", id="id with a leading zero"),
    pytest.param(quote("a", T0, "1:39"), "invalid_input", id="not sport:league:market"),
    pytest.param(quote("a", T0, "1:39:5", market_type="ah"), "unknown_market_type",
                 id="market type with no margin"),
    pytest.param(quote("a", T0, event_id="m-other"), "identity_changed",
                 id="event id differs from the market's"),
    pytest.param(quote("a", T0, market_type="ou"), "identity_changed",
                 id="market type differs from the market's"),
    pytest.param(quote("a", T0, values=(("home", "0.5"),)), "bad_quote",
                 id="open with a single outcome"),
    pytest.param(quote("a", T0, values=(("away", 0.25), ("home", "0.5"))), "invalid_input",
                 id="a float value"),
    pytest.param(quote("A", T0), "invalid_input", id="provider name"),
    pytest.param(quote("a", 0), "zero_pts", id="pts 0 would mean 'now'"),
    pytest.param(ProviderMessage("a", 1, T0, "odds"), "invalid_input", id="unknown kind"),
    pytest.param(quote("a", T0, values=(("h\u00f6me", "0.5"), ("x", "0.5"))), "invalid_input",
                 id="outcome name"),
]


@pytest.mark.parametrize(("msg", "reason"), REFUSED)
def test_refused_inputs_are_counted_never_raised(msg: ProviderMessage, reason: str) -> None:
    engine = Engine("live", 1, PMAP)
    run(engine, [quote("b", T0 - 2), quote("c", T0 - 1)])  # 1:39:1 is m-77812, 1x2, open
    before = engine.snapshot()
    assert engine.process(msg) == []
    assert engine.counters.rejected == {reason: 1}
    after = orjson.loads(engine.snapshot())
    after["counters"]["rejected"] = {}
    assert after == orjson.loads(before)


# -- determinism and checkpoints ----------------------------------------------------------

PROVIDERS = ("a", "b", "c", "d")
MARKETS = (  # market, event id, market type: two topics of each level
    ("1:39:1", "m-1", "1x2"),
    ("1:39:2", "m-1", "ou"),
    ("5:7:1", "m-2", "1x2"),
    ("5:7:2", "m-3", "ou"),
)
BOOKS = {
    "1x2": [("0.50", "0.25", "0.25"), ("0.51", "0.25", "0.24"), ("0.40", "0.30", "0.30"),
            ("0.70", "0.20", "0.10")],
    "ou": [("0.5", "0.5"), ("0.52", "0.48"), ("0.60", "0.40")],
}
OUTCOMES = {"1x2": ("away", "draw", "home"), "ou": ("over", "under")}
RULES = ConsensusRules(stale=StaleLimits(silence_ns=5 * S, view_ns=20 * S))
GAPS = (0, 1, 10**6, S, S, 2 * S, 2 * S, 6 * S, 25 * S)  # 6 s: silence; 25 s: every view


def as_prices(probabilities: tuple[str, ...]) -> tuple[str, ...]:
    """A provider's prices for a book: 5% margin, two decimals, rounded down."""
    return tuple(str((Decimal(1) / (Decimal(p) * Decimal("1.05"))).quantize(
        Decimal("0.01"), rounding=ROUND_DOWN)) for p in probabilities)


@st.composite
def merged_inputs(draw: st.DrawFn) -> list[ProviderMessage]:
    steps = draw(st.lists(st.tuples(
        st.sampled_from(GAPS), st.sampled_from(PROVIDERS),
        st.sampled_from(("heartbeat", "prices", "probabilities", "probabilities")),
        st.sampled_from((0, 0, 0, 1, 1, 2, 3)),  # market: most inputs on a few markets
        st.sampled_from(("open",) * 6 + ("suspended", "suspended", "closed", "closed")),
        st.sampled_from((0, 0, 0, 1, 1, 2, 3)),  # books 0 and 1 agree, 2 and 3 stand out
    ), min_size=8, max_size=50))
    pts, pseq, inputs = T0, dict.fromkeys(PROVIDERS, 0), []
    for gap, provider, kind, m, status, b in steps:
        pts += gap
        pseq[provider] += 1
        if kind == "heartbeat":
            inputs.append(ProviderMessage(provider, pseq[provider], pts, "heartbeat"))
            continue
        market, event_id, market_type = MARKETS[m]
        probabilities = BOOKS[market_type][b % len(BOOKS[market_type])]
        numbers = as_prices(probabilities) if kind == "prices" else probabilities
        values = tuple(zip(OUTCOMES[market_type], numbers, strict=True))
        inputs.append(quote(provider, pts, market, values, kind=kind, status=status,
                            event_id=event_id, market_type=market_type, pseq=pseq[provider]))
    return sorted(inputs, key=lambda msg: (msg.pts, msg.provider, msg.pseq))


def new_engine() -> Engine:
    return Engine("live", 3, PMAP, RULES)


def check_run(inputs: list[ProviderMessage], outputs_by_input: list[list[Output]]) -> None:
    """seq contiguous from 1 per topic, ts from the causing input, valid events,
    and every event a change of its market."""
    last_seq: dict[str, int] = {}
    last_state: dict[str, tuple] = {}
    for msg, outputs in zip(inputs, outputs_by_input, strict=True):
        for out in outputs:
            assert out.seq == last_seq.get(out.topic, 0) + 1
            last_seq[out.topic] = out.seq
            assert out.ts == msg.pts
            event = check_event("live-g3", out)
            state = (event["status"], event["prices"], event["providers"])
            assert last_state.get(out.market) != state
            last_state[out.market] = state


@settings(max_examples=150, deadline=None)
@given(inputs=merged_inputs())
def test_restore_at_any_point_continues_as_if_never_stopped(inputs: list) -> None:
    whole = new_engine()
    per_input = [whole.process(msg) for msg in inputs]
    check_run(inputs, per_input)
    expected = [out for outs in per_input for out in outs]
    final = whole.snapshot()
    for cut in range(len(inputs) + 1):
        first = new_engine()
        outputs = run(first, inputs[:cut])
        checkpoint = first.snapshot()
        second = Engine.restore(checkpoint, PMAP, RULES)
        assert second.epoch == "live-g3"
        assert second.snapshot() == checkpoint
        outputs += run(second, inputs[cut:])
        assert outputs == expected, f"restored after input {cut}"
        assert second.snapshot() == final


@settings(max_examples=50, deadline=None)
@given(inputs=merged_inputs())
def test_global_decimal_context_changes_no_byte(inputs: list) -> None:
    expected = run(new_engine(), inputs)
    with decimal.localcontext() as ctx:
        ctx.prec = 5
        ctx.rounding = decimal.ROUND_UP
        assert run(new_engine(), inputs) == expected


def test_restore_refuses_another_configuration() -> None:
    engine = new_engine()
    run(engine, [quote("a", T0), quote("b", T0 + 1)])
    checkpoint = engine.snapshot()
    with pytest.raises(ValueError, match="configuration"):
        Engine.restore(checkpoint, PMAP, RULES, Margins({"1x2": "1.07", "ou": "1.05"}))
    with pytest.raises(ValueError, match="configuration"):
        Engine.restore(checkpoint, PMAP)  # default rules, not RULES
    with pytest.raises(ValueError, match="format"):
        Engine.restore(b'{"format":99}', PMAP, RULES)
    restored = Engine.restore(checkpoint, PMAP, RULES)
    assert restored.seq("odds:1:39:1") == 1
    # No reused seq: the next change is 2, as in the engine that never stopped.
    assert [o.seq for o in restored.process(quote("a", T0 + 2, status="suspended"))] == []
    assert [o.seq for o in restored.process(quote("b", T0 + 3, status="suspended"))] == [2]


def test_snapshot_is_canonical_json() -> None:
    engine = new_engine()
    run(engine, [quote("a", T0), quote("b", T0 + 1), quote("a", T0 + 1, "9:1:1")])
    checkpoint = engine.snapshot()
    assert checkpoint == orjson.dumps(orjson.loads(checkpoint), option=orjson.OPT_SORT_KEYS)
    saved = orjson.loads(checkpoint)
    assert (saved["epoch"], saved["seqs"], saved["counters"]["rejected"]) == (
        "live-g3", {"odds:1:39:1": 1}, {"outside_partition_map": 1})
    assert saved["markets"]["1:39:1"]["last"]["body"].encode() == run(
        new_engine(), [quote("a", T0), quote("b", T0 + 1)])[0].body
