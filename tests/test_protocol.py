"""The wire codec (gateway/protocol.py) and the error mapping (gateway/errors.py).

Requests: every op decodes with and without `id`; every malformed frame is a
`bad_request` ProtocolError that keeps the request id whenever it could be read;
nothing but ProtocolError ever escapes `decode_request` (Hypothesis).
Frames: every server frame parses back to exactly the PROTOCOL.md §4 shape.
"""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import protocol
from gateway.errors import CloseCode, ErrorCode, ProtocolError, close_for_exception
from gateway.protocol import (
    MAX_EPOCH_LENGTH,
    MAX_ID_LENGTH,
    MAX_SEQ,
    Ack,
    Ping,
    ResumePoint,
    Subscribe,
    Unsubscribe,
    decode_request,
)

TOPIC = "odds:1:39:1"
EVENT = (
    b'{"type":"odds","topic":"odds:1:39:1","epoch":"r1","seq":7,"market":"1:39:1",'
    b'"event_id":"m-1","ts":1763800000123456789,"status":"open",'
    b'"prices":{"home":"1.85","draw":"3.40","away":"4.20"}}'
)


def frame(obj: object) -> str:
    """A client text frame; Python's json keeps integers beyond 64 bits exact."""
    return json.dumps(obj)


def refused(data: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_request(data)
    assert info.value.code is ErrorCode.BAD_REQUEST
    return info.value


# -- requests that decode ------------------------------------------------------


@pytest.mark.parametrize("request_id", ["req-1", 7, 0, -3, "", MAX_SEQ, "x" * MAX_ID_LENGTH])
def test_subscribe_decodes_topics_resume_points_and_id(request_id: object) -> None:
    request = decode_request(frame({
        "op": "subscribe", "id": request_id,
        "topics": {TOPIC: None, "odds:5:1": {"epoch": "r1", "seq": 42}},
    }))
    assert request == Subscribe(request_id, {TOPIC: None, "odds:5:1": ResumePoint("r1", 42)})


def test_subscribe_without_id_has_id_none() -> None:
    request = decode_request(frame({"op": "subscribe", "topics": {TOPIC: None}}))
    assert request == Subscribe(None, {TOPIC: None})


def test_null_id_is_the_same_as_no_id() -> None:
    assert decode_request(frame({"op": "ping", "id": None})) == Ping(None)


def test_resume_point_accepts_the_boundaries() -> None:
    epoch = "e" * MAX_EPOCH_LENGTH
    request = decode_request(frame({
        "op": "subscribe", "topics": {TOPIC: {"epoch": epoch, "seq": MAX_SEQ}, "b": {
            "epoch": "e", "seq": 0}},
    }))
    assert isinstance(request, Subscribe)
    assert request.topics == {TOPIC: ResumePoint(epoch, MAX_SEQ), "b": ResumePoint("e", 0)}


def test_unsubscribe_decodes_with_and_without_id_and_drops_repeats_in_order() -> None:
    with_id = decode_request(frame({"op": "unsubscribe", "id": "u", "topics": ["b", "a", "b"]}))
    assert with_id == Unsubscribe("u", ["b", "a"])
    assert decode_request(frame({"op": "unsubscribe", "topics": [TOPIC]})) == Unsubscribe(
        None, [TOPIC]
    )


def test_ack_decodes_with_and_without_id() -> None:
    assert decode_request(frame({"op": "ack", "id": 9, "topics": {TOPIC: 12}})) == Ack(
        9, {TOPIC: 12}
    )
    assert decode_request(frame({"op": "ack", "topics": {TOPIC: 0}})) == Ack(None, {TOPIC: 0})


def test_ping_decodes_with_and_without_id() -> None:
    assert decode_request(frame({"op": "ping", "id": "p"})) == Ping("p")
    assert decode_request(frame({"op": "ping"})) == Ping(None)


def test_unknown_fields_are_ignored() -> None:
    assert decode_request(frame({"op": "ping", "id": 1, "extra": [1, 2]})) == Ping(1)


# -- malformed requests -------------------------------------------------------

UNREADABLE_FRAMES = [
    pytest.param("", id="empty"),
    pytest.param("{", id="truncated-json"),
    pytest.param("ping", id="bare-word"),
    pytest.param('{"op":"ping",}', id="trailing-comma"),
    pytest.param('{"op":NaN}', id="nan"),
    pytest.param("[]", id="array"),
    pytest.param("[{\"op\":\"ping\",\"id\":1}]", id="array-of-request"),
    pytest.param("1", id="number"),
    pytest.param('"ping"', id="string"),
    pytest.param("null", id="null"),
    pytest.param("true", id="bool"),
    pytest.param(b'{"op":"ping","id":1}', id="binary-frame"),
    pytest.param(b"\xff\xfe\x00", id="binary-garbage"),
]


@pytest.mark.parametrize("data", UNREADABLE_FRAMES)
def test_unreadable_frame_is_bad_request_without_id(data: str | bytes) -> None:
    assert refused(data).request_id is None


@pytest.mark.parametrize(
    "bad_id",
    [1.5, 1.0, True, False, [], {}, ["a"], "x" * (MAX_ID_LENGTH + 1), MAX_SEQ + 1,
     -(MAX_SEQ + 1), 2**64, 2**70],
)
def test_bad_id_is_bad_request_without_id(bad_id: object) -> None:
    exc = refused(frame({"op": "ping", "id": bad_id}))
    assert exc.request_id is None
    assert "id" in exc.message


# Each body is a request with a readable id "r-7"; the refusal must carry it back.
BAD_REQUESTS_WITH_ID = {
    "missing-op": {},
    "null-op": {"op": None},
    "unknown-op": {"op": "publish"},
    "op-wrong-case": {"op": "Subscribe", "topics": {TOPIC: None}},
    "op-number": {"op": 5},
    "op-list": {"op": ["ping"]},
    "subscribe-no-topics": {"op": "subscribe"},
    "subscribe-topics-null": {"op": "subscribe", "topics": None},
    "subscribe-topics-list": {"op": "subscribe", "topics": [TOPIC]},
    "subscribe-topics-string": {"op": "subscribe", "topics": TOPIC},
    "subscribe-topics-empty": {"op": "subscribe", "topics": {}},
    "resume-is-list": {"op": "subscribe", "topics": {TOPIC: ["r1", 5]}},
    "resume-is-number": {"op": "subscribe", "topics": {TOPIC: 5}},
    "resume-is-string": {"op": "subscribe", "topics": {TOPIC: "r1"}},
    "resume-empty-object": {"op": "subscribe", "topics": {TOPIC: {}}},
    "resume-missing-epoch": {"op": "subscribe", "topics": {TOPIC: {"seq": 5}}},
    "resume-empty-epoch": {"op": "subscribe", "topics": {TOPIC: {"epoch": "", "seq": 5}}},
    "resume-null-epoch": {"op": "subscribe", "topics": {TOPIC: {"epoch": None, "seq": 5}}},
    "resume-number-epoch": {"op": "subscribe", "topics": {TOPIC: {"epoch": 1, "seq": 5}}},
    "resume-long-epoch": {
        "op": "subscribe", "topics": {TOPIC: {"epoch": "e" * (MAX_EPOCH_LENGTH + 1), "seq": 5}}
    },
    "resume-missing-seq": {"op": "subscribe", "topics": {TOPIC: {"epoch": "r1"}}},
    "resume-null-seq": {"op": "subscribe", "topics": {TOPIC: {"epoch": "r1", "seq": None}}},
    "resume-negative-seq": {"op": "subscribe", "topics": {TOPIC: {"epoch": "r1", "seq": -1}}},
    "resume-float-seq": {"op": "subscribe", "topics": {TOPIC: {"epoch": "r1", "seq": 1.5}}},
    "resume-integral-float-seq": {
        "op": "subscribe", "topics": {TOPIC: {"epoch": "r1", "seq": 5.0}}
    },
    "resume-bool-seq": {"op": "subscribe", "topics": {TOPIC: {"epoch": "r1", "seq": True}}},
    "resume-string-seq": {"op": "subscribe", "topics": {TOPIC: {"epoch": "r1", "seq": "5"}}},
    "resume-seq-over-int64": {
        "op": "subscribe", "topics": {TOPIC: {"epoch": "r1", "seq": MAX_SEQ + 1}}
    },
    "resume-seq-over-uint64": {
        "op": "subscribe", "topics": {TOPIC: {"epoch": "r1", "seq": 2**64}}
    },
    "resume-bad-after-good": {
        "op": "subscribe", "topics": {"a": None, TOPIC: {"epoch": "r1", "seq": -5}}
    },
    "unsubscribe-no-topics": {"op": "unsubscribe"},
    "unsubscribe-topics-object": {"op": "unsubscribe", "topics": {TOPIC: None}},
    "unsubscribe-topics-string": {"op": "unsubscribe", "topics": TOPIC},
    "unsubscribe-topics-empty": {"op": "unsubscribe", "topics": []},
    "unsubscribe-number-topic": {"op": "unsubscribe", "topics": [TOPIC, 5]},
    "unsubscribe-null-topic": {"op": "unsubscribe", "topics": [None]},
    "unsubscribe-nested-list": {"op": "unsubscribe", "topics": [[TOPIC]]},
    "ack-no-topics": {"op": "ack"},
    "ack-topics-list": {"op": "ack", "topics": [TOPIC]},
    "ack-string-seq": {"op": "ack", "topics": {TOPIC: "5"}},
    "ack-float-seq": {"op": "ack", "topics": {TOPIC: 5.5}},
    "ack-negative-seq": {"op": "ack", "topics": {TOPIC: -1}},
    "ack-bool-seq": {"op": "ack", "topics": {TOPIC: True}},
    "ack-null-seq": {"op": "ack", "topics": {TOPIC: None}},
    "ack-huge-seq": {"op": "ack", "topics": {TOPIC: 2**64}},
    "ack-bad-after-good": {"op": "ack", "topics": {"a": 1, TOPIC: "x"}},
}


@pytest.mark.parametrize("body", BAD_REQUESTS_WITH_ID.values(), ids=BAD_REQUESTS_WITH_ID.keys())
@pytest.mark.parametrize("request_id", ["r-7", 7])
def test_malformed_request_is_bad_request_keeping_the_id(body: dict, request_id: object) -> None:
    exc = refused(frame({**body, "id": request_id}))
    assert exc.request_id == request_id
    assert exc.close_code is None  # one bad request does not close; the session counts


@pytest.mark.parametrize("body", BAD_REQUESTS_WITH_ID.values(), ids=BAD_REQUESTS_WITH_ID.keys())
def test_malformed_request_without_id_has_id_none(body: dict) -> None:
    assert refused(frame(body)).request_id is None


def test_unknown_op_message_names_the_op_and_bounds_it() -> None:
    exc = refused(frame({"op": "publish" + "x" * 500}))
    assert "publish" in exc.message
    assert len(exc.message) < 100


def test_resume_error_names_the_topic() -> None:
    exc = refused(frame({"op": "subscribe", "topics": {TOPIC: {"epoch": "r1", "seq": -1}}}))
    assert TOPIC in exc.message


# -- nothing but ProtocolError escapes (Hypothesis) ----------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=20,
)
ops = st.sampled_from(["subscribe", "unsubscribe", "ack", "ping", "pong", ""]) | json_values
resume_points = st.none() | json_values | st.fixed_dictionaries(
    {},
    optional={
        "epoch": st.text(max_size=70) | json_values,
        "seq": st.integers(min_value=-5, max_value=2**64) | json_values,
    },
)
topics_values = (
    json_values
    | st.dictionaries(st.text(max_size=20), resume_points, max_size=4)
    | st.dictionaries(st.text(max_size=20), st.integers(-3, 2**64) | json_values, max_size=4)
    | st.lists(st.text(max_size=20) | json_values, max_size=4)
)
request_shaped = st.fixed_dictionaries(
    {}, optional={"op": ops, "id": json_values, "topics": topics_values}
)
readable_ids = st.text(st.characters(codec="utf-8"), max_size=MAX_ID_LENGTH) | st.integers(
    min_value=-MAX_SEQ, max_value=MAX_SEQ
)


def decode_or_bad_request(data: str | bytes) -> protocol.Request | ProtocolError:
    """Decode; only a bad_request ProtocolError may come out instead of a request."""
    try:
        request = decode_request(data)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.BAD_REQUEST
        assert isinstance(exc.message, str) and exc.message
        return exc
    assert isinstance(request, Subscribe | Unsubscribe | Ack | Ping)
    assert request.id is None or type(request.id) in (int, str)
    return request


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_refused_as_binary(data: bytes) -> None:
    assert isinstance(decode_or_bad_request(data), ProtocolError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_as_text_raise_only_protocol_error(data: bytes) -> None:
    decode_or_bad_request(data.decode("utf-8", "surrogateescape"))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_protocol_error(text: str) -> None:
    decode_or_bad_request(text)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_arbitrary_json_values_raise_only_protocol_error(value: object) -> None:
    decode_or_bad_request(json.dumps(value))


@settings(max_examples=300, deadline=None)
@given(request_shaped)
def test_request_shaped_objects_raise_only_protocol_error(obj: dict) -> None:
    decode_or_bad_request(json.dumps(obj))


@settings(max_examples=200, deadline=None)
@given(request_shaped, readable_ids)
def test_refusal_of_a_request_with_a_readable_id_keeps_it(obj: dict, request_id: object) -> None:
    outcome = decode_or_bad_request(json.dumps({**obj, "id": request_id}))
    if isinstance(outcome, ProtocolError):
        assert outcome.request_id == request_id
    else:
        assert outcome.id == request_id


# -- server frames (PROTOCOL.md §4) -------------------------------------------


def parsed(data: bytes) -> object:
    assert isinstance(data, bytes)
    return orjson.loads(data)


def test_welcome_frame() -> None:
    assert parsed(protocol.welcome("c-1", "node-a", 3, 20_000, "eu-west")) == {
        "type": "welcome", "conn": "c-1", "node": "node-a", "worker": 3, "heartbeat_ms": 20_000,
        "region": "eu-west",
    }


@pytest.mark.parametrize("encode, kind", [(protocol.subscribed, "subscribed"),
                                          (protocol.unsubscribed, "unsubscribed")])
def test_subscribed_and_unsubscribed_frames_echo_the_id_only_when_given(encode, kind) -> None:
    assert parsed(encode("r1", [TOPIC, "odds:5:1"])) == {
        "type": kind, "id": "r1", "topics": [TOPIC, "odds:5:1"],
    }
    assert parsed(encode(0, (TOPIC,))) == {"type": kind, "id": 0, "topics": [TOPIC]}
    assert parsed(encode(None, [])) == {"type": kind, "topics": []}


def test_pong_frame_with_and_without_id() -> None:
    assert parsed(protocol.pong(5, 1_763_800_000_123_456_789)) == {
        "type": "pong", "id": 5, "ts": 1_763_800_000_123_456_789,
    }
    assert parsed(protocol.pong(None, 1)) == {"type": "pong", "ts": 1}


def test_error_frame_has_null_id_and_no_optional_keys_when_unset() -> None:
    exc = ProtocolError(ErrorCode.BAD_REQUEST, "frame is not valid JSON")
    assert parsed(protocol.error(exc)) == {
        "type": "error", "id": None, "code": "bad_request", "message": "frame is not valid JSON",
    }


def test_error_frame_carries_id_topics_and_retry_after() -> None:
    exc = ProtocolError(ErrorCode.SHED, "retry later", request_id="s1", topics=[TOPIC],
                        retry_after_ms=1500)
    assert parsed(protocol.error(exc)) == {
        "type": "error", "id": "s1", "code": "shed", "message": "retry later",
        "topics": [TOPIC], "retry_after_ms": 1500,
    }


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_frame_code_is_the_protocol_word(code: ErrorCode) -> None:
    obj = parsed(protocol.error(ProtocolError(code, "m", request_id=1)))
    assert obj["code"] == code.value
    assert obj["code"] in {"bad_request", "unknown_topic", "forbidden", "too_many_topics",
                           "rate_limited", "shed"}


def test_reset_frame() -> None:
    assert parsed(protocol.reset(TOPIC, "window")) == {
        "type": "reset", "topic": TOPIC, "reason": "window",
    }


@pytest.mark.parametrize("reason", ["drain", "restart", "overload"])
def test_reconnect_frame(reason: str) -> None:
    assert parsed(protocol.reconnect(2500, reason)) == {
        "type": "reconnect", "after_ms": 2500, "reason": reason,
    }


def test_snapshot_frame_splices_event_bytes_verbatim() -> None:
    other = b'{"type":"odds", "seq":5,"market":"1:39:2"}'  # odd spacing survives only if spliced
    data = protocol.snapshot(TOPIC, "r1", 7, [EVENT, other])
    assert EVENT in data and other in data
    assert parsed(data) == {
        "type": "snapshot", "topic": TOPIC, "epoch": "r1", "seq": 7,
        "markets": [orjson.loads(EVENT), orjson.loads(other)],
    }


def test_snapshot_frame_of_a_topic_without_markets() -> None:
    data = protocol.snapshot(TOPIC, "r1", 0, iter([]))
    assert parsed(data) == {"type": "snapshot", "topic": TOPIC, "epoch": "r1", "seq": 0,
                            "markets": []}


def test_batch_frame_keeps_events_in_order_and_verbatim() -> None:
    events = [EVENT.replace(b'"seq":7', b'"seq":%d' % n) for n in (7, 8, 9)]
    data = protocol.batch(events)
    assert b",".join(events) in data
    obj = parsed(data)
    assert obj["type"] == "batch"
    assert [e["seq"] for e in obj["events"]] == [7, 8, 9]
    assert obj["events"] == [orjson.loads(e) for e in events]
    assert parsed(protocol.batch([EVENT])) == {"type": "batch", "events": [orjson.loads(EVENT)]}


def test_mark_coalesced_adds_the_flag_and_keeps_every_field() -> None:
    assert parsed(protocol.mark_coalesced(EVENT)) == {**orjson.loads(EVENT), "coalesced": True}


def test_mark_coalesced_event_fits_in_a_batch() -> None:
    obj = parsed(protocol.batch([protocol.mark_coalesced(EVENT), EVENT]))
    assert [e.get("coalesced") for e in obj["events"]] == [True, None]


# -- close codes (gateway/errors.py) ------------------------------------------


def test_internal_failure_closes_1011_and_hides_details() -> None:
    code, reason = close_for_exception(RuntimeError("redis password is hunter2"))
    assert code == CloseCode.INTERNAL == 1011
    assert "hunter2" not in reason
    assert reason == "internal error"


def test_protocol_error_without_close_code_is_not_shown_as_a_close_reason() -> None:
    exc = ProtocolError(ErrorCode.BAD_REQUEST, "frame is not valid JSON")
    assert close_for_exception(exc) == (CloseCode.INTERNAL, "internal error")


@pytest.mark.parametrize("close", [CloseCode.REPEATED_BAD_REQUESTS, CloseCode.RATE_LIMITED,
                                   CloseCode.UNAUTHORIZED, CloseCode.POLICY])
def test_protocol_error_close_code_and_message_pass_through(close: CloseCode) -> None:
    exc = ProtocolError(ErrorCode.BAD_REQUEST, "too many bad requests", close_code=close)
    assert close_for_exception(exc) == (close, "too many bad requests")


def test_close_codes_are_the_protocol_numbers() -> None:
    assert {c.name: int(c) for c in CloseCode} == {
        "NORMAL": 1000, "POLICY": 1008, "TOO_BIG": 1009, "INTERNAL": 1011, "RESTART": 1012,
        "TRY_LATER": 1013, "REPEATED_BAD_REQUESTS": 4400, "UNAUTHORIZED": 4401,
        "RATE_LIMITED": 4429,
    }


def test_long_ascii_close_reason_fits_a_close_frame() -> None:
    exc = ProtocolError(ErrorCode.BAD_REQUEST, "x" * 500, close_code=CloseCode.POLICY)
    assert len(close_for_exception(exc)[1].encode()) <= 123


def test_close_reason_fits_a_close_frame_even_with_non_ascii_client_text() -> None:
    exc = refused(frame({"op": "subscribe", "topics": {"é" * 200: {"epoch": "", "seq": 1}}}))
    exc.close_code = CloseCode.REPEATED_BAD_REQUESTS  # what Session.count_bad_request does
    code, reason = close_for_exception(exc)
    assert code == CloseCode.REPEATED_BAD_REQUESTS
    assert len(reason.encode("utf-8")) <= 123  # RFC 6455 §5.5: 125-byte control payload
