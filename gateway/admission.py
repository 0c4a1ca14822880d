"""Which topics of a `subscribe` a player gets, and why the others are refused.

PROTOCOL.md §3: a subscribe may be accepted in part; the server sends one
`error` per refusal reason naming its topics, then one `subscribed` listing
what it accepted, then the data. Each topic is judged in one fixed order,
the first failing rule refusing it:

1. already followed on this connection: accepted, its stream just goes on;
2. not a topic of the partition map: `unknown_topic`;
3. not covered by the token's grants: `forbidden`;
4. over the connection's topic limit: `too_many_topics`;
5. the node sheds (its breaker is open, §5) and this is a new subscription
   (no resume point) to a market that is not high-value: `shed`.

A resume point continues a subscription the player already had (it was
moved by a drain, a reload or a lost connection), so it is never shed. The
decision is a plain function of its inputs; the worker then opens the
admitted topics' channels, and a channel that cannot be opened (Redis away)
is refused as `shed` too (`refuse_unopened`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from gateway.errors import ErrorCode, ProtocolError
from gateway.protocol import ResumePoint

REFUSAL_MESSAGES = {
    ErrorCode.UNKNOWN_TOPIC: "not a topic of the partition map (GET /v1/topics)",
    ErrorCode.FORBIDDEN: "your session may not follow these topics",
    ErrorCode.TOO_MANY_TOPICS: "a connection follows at most {max_topics}",
    ErrorCode.SHED: "the node is overloaded or its upstream unavailable; retry later",
}


@dataclass(slots=True)
class Admission:
    accepted: list[str] = field(default_factory=list)  # followed already: nothing to open
    wanted: dict[str, ResumePoint | None] = field(default_factory=dict)  # to open and join
    refused: dict[ErrorCode, list[str]] = field(default_factory=dict)  # in §3's order

    def refuse(self, code: ErrorCode, topic: str) -> None:
        self.refused.setdefault(code, []).append(topic)

    @property
    def shed(self) -> int:
        return len(self.refused.get(ErrorCode.SHED, ()))


def admit(topics: Mapping[str, ResumePoint | None], *, following: Collection[str],
          max_topics: int, is_topic: Callable[[str], bool], allowed: Callable[[str], bool],
          shedding: bool, high_value: Collection[str]) -> Admission:
    """Judge every topic of one subscribe, in the order of the module's rules."""
    admission = Admission()
    for topic, resume in topics.items():
        if topic in following:
            admission.accepted.append(topic)
        elif not is_topic(topic):
            admission.refuse(ErrorCode.UNKNOWN_TOPIC, topic)
        elif not allowed(topic):
            admission.refuse(ErrorCode.FORBIDDEN, topic)
        elif len(following) + len(admission.wanted) >= max_topics:
            admission.refuse(ErrorCode.TOO_MANY_TOPICS, topic)
        elif shedding and resume is None and topic not in high_value:
            admission.refuse(ErrorCode.SHED, topic)
        else:
            admission.wanted[topic] = resume
    return admission


def refuse_unopened(admission: Admission, opened: Mapping[str, object | None]) -> list[str]:
    """Refuse as `shed` the wanted topics whose channel could not be opened; the
    topics that were, in the request's order."""
    joined = []
    for topic in admission.wanted:
        if opened.get(topic) is None:
            admission.refuse(ErrorCode.SHED, topic)
        else:
            joined.append(topic)
    return joined


def refusals(admission: Admission, request_id: object, *, max_topics: int,
             shed_retry_ms: int) -> list[ProtocolError]:
    """One error per refusal reason (PROTOCOL.md §3), in the order they arose."""
    return [
        ProtocolError(
            code,
            REFUSAL_MESSAGES[code].format(max_topics=max_topics),
            request_id=request_id,
            topics=topics,
            retry_after_ms=shed_retry_ms if code is ErrorCode.SHED else None,
        )
        for code, topics in admission.refused.items()
    ]
