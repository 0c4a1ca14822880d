"""Subscribe admission (gateway/admission.py): PROTOCOL.md §3's refusal order, limits, shedding."""

from __future__ import annotations

from gateway.admission import admit, refusals, refuse_unopened
from gateway.errors import ErrorCode
from gateway.protocol import ResumePoint
from gateway.topics import PartitionMap

PMAP = PartitionMap.load(None)
HIGH = "odds:1:39:1"  # high-value in the default map
RESUME = ResumePoint("r1", 5)


def judge(topics: dict, *, following=(), max_topics=200, allowed=lambda t: True,
          shedding=False):
    return admit(topics, following=set(following), max_topics=max_topics,
                 is_topic=PMAP.is_topic, allowed=allowed, shedding=shedding,
                 high_value=PMAP.high_value)


def test_every_reason_in_order_and_the_rest_wanted() -> None:
    admission = judge({"odds:1:39:7": None, "nope": None, "odds:2:12:1": None,
                       "odds:1:39:8": RESUME},
                      following=["odds:1:39:7"], allowed=lambda t: not t.startswith("odds:2"))
    assert admission.accepted == ["odds:1:39:7"]
    assert admission.refused == {ErrorCode.UNKNOWN_TOPIC: ["nope"],
                                 ErrorCode.FORBIDDEN: ["odds:2:12:1"]}
    assert admission.wanted == {"odds:1:39:8": RESUME}


def test_an_unknown_topic_is_unknown_before_it_is_forbidden() -> None:
    admission = judge({"odds:9:9": None}, allowed=lambda t: False)
    assert admission.refused == {ErrorCode.UNKNOWN_TOPIC: ["odds:9:9"]}


def test_the_topic_limit_counts_what_is_followed_and_what_this_request_adds() -> None:
    topics = {f"odds:1:39:{m}": None for m in range(10, 15)}
    admission = judge(topics, following=["odds:1:39:1", "odds:1:39:2"], max_topics=5)
    assert list(admission.wanted) == ["odds:1:39:10", "odds:1:39:11", "odds:1:39:12"]
    assert admission.refused == {ErrorCode.TOO_MANY_TOPICS: ["odds:1:39:13", "odds:1:39:14"]}


def test_shedding_spares_resumes_and_high_value_markets() -> None:
    admission = judge({"odds:1:39:7": None, "odds:1:39:8": RESUME, HIGH: None},
                      shedding=True)
    assert admission.refused == {ErrorCode.SHED: ["odds:1:39:7"]}
    assert admission.shed == 1
    assert admission.wanted == {"odds:1:39:8": RESUME, HIGH: None}


def test_nothing_is_shed_while_the_breaker_is_closed() -> None:
    assert judge({"odds:1:39:7": None}).refused == {}


def test_channels_that_could_not_open_are_shed_with_a_retry_hint() -> None:
    admission = judge({"odds:1:39:7": None, "odds:1:39:8": None, "nope": None})
    joined = refuse_unopened(admission, {"odds:1:39:7": object(), "odds:1:39:8": None})
    assert joined == ["odds:1:39:7"]
    errors = refusals(admission, 9, max_topics=200, shed_retry_ms=2000)
    assert [(e.code, e.topics, e.request_id) for e in errors] == [
        (ErrorCode.UNKNOWN_TOPIC, ["nope"], 9), (ErrorCode.SHED, ["odds:1:39:8"], 9)]
    assert errors[1].retry_after_ms == 2000 and errors[0].retry_after_ms is None


def test_the_limit_message_names_the_limit() -> None:
    admission = judge({"odds:1:39:7": None}, max_topics=0)
    [error] = refusals(admission, None, max_topics=0, shed_retry_ms=1)
    assert error.code is ErrorCode.TOO_MANY_TOPICS and "at most 0" in error.message
