"""The provider message format (aggregator/inputs.py): strict parse, canonical bytes."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.inputs import (
    MAX_INPUT_BYTES,
    InvalidInput,
    ProviderMessage,
    encode,
    parse,
    validate,
)

QUOTE = ProviderMessage(
    provider="atlas",
    pseq=7,
    pts=1_763_800_000_123_456_789,
    kind="prices",
    market="1:39:1",
    event_id="m-77812",
    market_type="1x2",
    status="open",
    values=(("away", "4.20"), ("draw", "3.40"), ("home", "1.85")),
)
QUOTE_BYTES = (
    b'{"provider":"atlas","pseq":7,"pts":1763800000123456789,"kind":"prices",'
    b'"market":"1:39:1","event_id":"m-77812","market_type":"1x2","status":"open",'
    b'"values":{"away":"4.20","draw":"3.40","home":"1.85"}}'
)
HEARTBEAT = ProviderMessage("atlas", 8, 1_763_800_000_200_000_000, "heartbeat")


def raw(**changes: object) -> bytes:
    """QUOTE as JSON with some keys changed (a value of ... removes the key)."""
    data = orjson.loads(QUOTE_BYTES)
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return orjson.dumps(data)


# -- round trip and canonical bytes ----------------------------------------------------


def test_quote_encodes_to_the_documented_bytes() -> None:
    assert encode(QUOTE) == QUOTE_BYTES
    assert parse(QUOTE_BYTES) == QUOTE


def test_heartbeat_has_exactly_four_keys() -> None:
    assert encode(HEARTBEAT) == (
        b'{"provider":"atlas","pseq":8,"pts":1763800000200000000,"kind":"heartbeat"}'
    )
    assert parse(encode(HEARTBEAT)) == HEARTBEAT
    assert HEARTBEAT.is_heartbeat and not QUOTE.is_heartbeat


def test_key_order_spaces_and_outcome_order_of_the_input_do_not_matter() -> None:
    shuffled = (
        b'{ "values": {"home": "1.85", "away": "4.20", "draw": "3.40"}, "status": "open",'
        b' "kind": "prices", "pts": 1763800000123456789, "pseq": 7, "provider": "atlas",'
        b' "market_type": "1x2", "event_id": "m-77812", "market": "1:39:1" }'
    )
    assert parse(shuffled) == QUOTE
    assert encode(parse(shuffled)) == QUOTE_BYTES


@pytest.mark.parametrize("status", ["suspended", "closed"])
def test_suspended_and_closed_may_carry_no_values(status: str) -> None:
    msg = parse(raw(status=status, values={}))
    assert msg.values == () and msg.status == status
    assert parse(encode(msg)) == msg


def test_probabilities_round_trip_and_one_is_a_probability() -> None:
    msg = parse(raw(kind="probabilities", values={"over": "0.45", "under": "1"}))
    assert msg.values == (("over", "0.45"), ("under", "1"))
    assert parse(encode(msg)) == msg


def test_non_ascii_event_id_round_trips_as_utf8() -> None:
    msg = parse(raw(event_id="Zürich·Genève"))
    assert "Zürich·Genève".encode() in encode(msg)
    assert parse(encode(msg)) == msg


_outcome = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-",
                   min_size=1, max_size=32)
_price = st.builds(lambda i, f: f"{i}.{f}" if f else str(i),
                   st.integers(1, 999_999), st.text("0123456789", max_size=6))
_probability = st.builds(lambda f: f"0.{f}",
                         st.text("0123456789", min_size=1, max_size=6).filter(
                             lambda f: f.strip("0") != ""))


@st.composite
def messages(draw: st.DrawFn) -> ProviderMessage:
    provider = draw(st.text("abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=32))
    pseq = draw(st.integers(1, 2**63 - 1))
    pts = draw(st.integers(0, 2**63 - 1))
    kind = draw(st.sampled_from(["prices", "probabilities", "heartbeat"]))
    if kind == "heartbeat":
        return ProviderMessage(provider, pseq, pts, kind)
    ids = st.integers(0, 999_999_999_999)
    market = f"{draw(ids)}:{draw(ids)}:{draw(ids)}"
    status = draw(st.sampled_from(["open", "suspended", "closed"]))
    outcomes = draw(st.lists(_outcome, min_size=1 if status == "open" else 0, max_size=64,
                             unique=True))
    value = _price if kind == "prices" else _probability
    values = tuple(sorted((o, draw(value)) for o in outcomes))
    event_id = draw(st.text(min_size=1, max_size=64))  # any text but lone surrogates
    return ProviderMessage(provider, pseq, pts, kind, market, event_id, draw(_outcome), status,
                           values)


@settings(max_examples=200, deadline=None)
@given(messages())
def test_parse_of_encode_is_the_message_and_encode_is_stable(msg: ProviderMessage) -> None:
    data = encode(msg)
    assert parse(data) == msg
    assert encode(parse(data)) == data


# -- refusals ------------------------------------------------------------------------

HB = {"provider": "atlas", "pseq": 1, "pts": 5, "kind": "heartbeat"}

BAD: list[tuple[str, bytes, str]] = [
    ("not json", b'{"provider":', "input: not JSON"),
    ("not an object", b'["atlas",1]', "input: must be a JSON object"),
    ("too big", b" " * (MAX_INPUT_BYTES + 1), "input: .* bytes, at most"),
    ("kind missing", raw(kind=...), "kind: None is not one of"),
    ("unknown kind", raw(kind="odds"), "kind: 'odds' is not one of"),
    ("key missing", raw(event_id=...), "event_id: missing"),
    ("status missing", raw(status=...), "status: missing"),
    ("unknown key", raw(colour="red"), "colour: not a field of a prices message"),
    ("heartbeat with a market", orjson.dumps({**HB, "market": "1:39:1"}),
     "market: not a field of a heartbeat message"),
    ("provider upper case", raw(provider="Atlas"), "provider: 'Atlas' is not"),
    ("provider empty", raw(provider=""), "provider: '' is not"),
    ("provider too long", raw(provider="a" * 33), "provider: 'a+' is not"),
    ("provider not a string", raw(provider=7), "provider: must be a string"),
    ("pseq zero", raw(pseq=0), "pseq: must be between 1"),
    ("pseq a string", raw(pseq="7"), "pseq: must be an integer, got str"),
    ("pseq a float", raw(pseq=7.0), "pseq: must be an integer, got float"),
    ("pseq a boolean", raw(pseq=True), "pseq: must be an integer, got bool"),
    ("pts negative", raw(pts=-1), "pts: must be between 0"),
    ("pts a float", raw(pts=1.5e18), "pts: must be an integer, got float"),
    ("pts beyond 64 bits", b'{"provider":"a","pseq":1,"pts":9223372036854775808,'
     b'"kind":"heartbeat"}', "pts: must be between 0 and 2\\*\\*63-1"),
    ("market grammar", raw(market="1:39"), "market: '1:39' is not 'sport:league:market'"),
    ("market leading zero", raw(market="1:039:1"), "market: '1:039:1' is not"),
    ("market not a string", raw(market=139), "market: must be a string"),
    ("event_id empty", raw(event_id=""), "event_id: must be a string of 1 to 64"),
    ("event_id too long", raw(event_id="m" * 65), "event_id: must be a string of 1 to 64"),
    ("market_type empty", raw(market_type=""), "market_type: '' is not"),
    ("market_type spaces", raw(market_type="1 x 2"), "market_type: '1 x 2' is not"),
    ("unknown status", raw(status="live"), "status: 'live' is not one of"),
    ("values a list", raw(values=[["home", "1.85"]]), "values: must be an object"),
    ("open without values", raw(values={}), "values: an open market needs at least one"),
    ("too many outcomes", raw(values={f"o{i}": "2.00" for i in range(65)}),
     "values: 65 outcomes, at most 64"),
    ("outcome with a space", raw(values={"home team": "1.85"}), "values: outcome 'home team'"),
    ("outcome too long", raw(values={"o" * 33: "1.85"}), "values: outcome 'o+'"),
    ("price a number", raw(values={"home": 1.85}), "values\\['home'\\]: must be a decimal "
     "string like \"1.85\", got float"),
    ("price with a comma", raw(values={"home": "1,85"}), "values\\['home'\\]: '1,85' is not a "
     "decimal string"),
    ("price with 7 decimals", raw(values={"home": "1.8500001"}), "is not a decimal string"),
    ("price with an exponent", raw(values={"home": "1e2"}), "is not a decimal string"),
    ("price negative", raw(values={"home": "-1.85"}), "is not a decimal string"),
    ("price leading zero", raw(values={"home": "01.85"}), "is not a decimal string"),
    ("price empty", raw(values={"home": ""}), "is not a decimal string"),
    ("price NaN", raw(values={"home": "NaN"}), "is not a decimal string"),
    ("price 7 integer digits", raw(values={"home": "1000000"}), "is not a decimal string"),
    ("price zero", raw(values={"home": "0"}), "a price is decimal odds, at least 1, got 0"),
    ("price below one", raw(values={"home": "0.95"}), "a price is decimal odds, at least 1"),
    ("probability zero", raw(kind="probabilities", values={"home": "0.000"}),
     "a probability must be in \\(0, 1\\], got 0.000"),
    ("probability above one", raw(kind="probabilities", values={"home": "1.01"}),
     "a probability must be in \\(0, 1\\], got 1.01"),
]


@pytest.mark.parametrize(("case", "data", "error"), BAD, ids=[case for case, _, _ in BAD])
def test_bad_input_is_refused_naming_the_field(case: str, data: bytes, error: str) -> None:
    with pytest.raises(InvalidInput, match=error):
        parse(data)


def test_invalid_input_is_a_value_error() -> None:
    assert issubclass(InvalidInput, ValueError)


def test_parse_wants_bytes() -> None:
    with pytest.raises(InvalidInput, match="input: must be bytes, got str"):
        parse(QUOTE_BYTES.decode())  # type: ignore[arg-type]


BAD_BUILT: list[tuple[str, ProviderMessage, str]] = [
    ("unsorted values", ProviderMessage("a", 1, 0, "prices", "1:2:3", "m", "ou", "open",
                                        (("under", "1.9"), ("over", "1.9"))),
     "values: outcome 'over' is out of order or repeated"),
    ("repeated outcome", ProviderMessage("a", 1, 0, "prices", "1:2:3", "m", "ou", "open",
                                         (("over", "1.9"), ("over", "1.8"))),
     "out of order or repeated"),
    ("values a list", ProviderMessage("a", 1, 0, "prices", "1:2:3", "m", "ou", "open",
                                      [("over", "1.9")]),  # type: ignore[arg-type]
     "values: must be a tuple"),
    ("heartbeat with values", ProviderMessage("a", 1, 0, "heartbeat", values=(("x", "2"),)),
     "kind: a heartbeat carries no market"),
    ("heartbeat suspended", ProviderMessage("a", 1, 0, "heartbeat", status="suspended"),
     "kind: a heartbeat carries no market"),
    ("lone surrogate in event_id", ProviderMessage("a", 1, 0, "prices", "1:2:3", "\ud800",
                                                   "ou", "closed"), "event_id: cannot be written"),
]


@pytest.mark.parametrize(("case", "msg", "error"), BAD_BUILT, ids=[c for c, _, _ in BAD_BUILT])
def test_encode_refuses_what_parse_would_refuse(case: str, msg: ProviderMessage,
                                                error: str) -> None:
    with pytest.raises(InvalidInput, match=error):
        encode(msg)


def test_validate_returns_the_message() -> None:
    assert validate(QUOTE) is QUOTE
