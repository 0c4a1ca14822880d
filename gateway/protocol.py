"""The wire codec of PROTOCOL.md §3-§4: requests in, frames out.

Decoding never trusts the client: anything that is not one of the four
requests, well formed, is a `bad_request` ProtocolError carrying the request
id when one could be read. Encoding builds server frames as bytes; the ones
that carry events splice the events' JSON as published (PROTOCOL.md §1),
so an event is never decoded and encoded again on its way to players.

`id` is echoed on every reply to a request that carried one and left out
otherwise; an `error` frame always has an `id` key, null when the request
had none or could not be read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson

from gateway.errors import ErrorCode, ProtocolError

MAX_ID_LENGTH = 128
MAX_EPOCH_LENGTH = 64
MAX_SEQ = 2**63 - 1


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """The last event of a topic the client holds."""

    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    id: object
    topics: dict[str, ResumePoint | None]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    id: object
    topics: list[str]


@dataclass(frozen=True, slots=True)
class Ack:
    id: object
    topics: dict[str, int]


@dataclass(frozen=True, slots=True)
class Ping:
    id: object


Request = Subscribe | Unsubscribe | Ack | Ping


def _bad(message: str, request_id: object = None) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message, request_id=request_id)


def _is_seq(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_SEQ


def _read_id(obj: dict) -> object:
    request_id = obj.get("id")
    if request_id is None:
        return None
    if type(request_id) is int and abs(request_id) <= MAX_SEQ:
        return request_id
    if isinstance(request_id, str) and len(request_id) <= MAX_ID_LENGTH:
        return request_id
    raise _bad(f"id must be a string of at most {MAX_ID_LENGTH} characters or an integer")


def _read_resume(topic: str, value: object, request_id: object) -> ResumePoint | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(f"resume point of {topic!r} must be null or {{epoch, seq}}", request_id)
    epoch, seq = value.get("epoch"), value.get("seq")
    if not isinstance(epoch, str) or not 0 < len(epoch) <= MAX_EPOCH_LENGTH:
        raise _bad(f"resume point of {topic!r}: epoch must be a non-empty string", request_id)
    if not _is_seq(seq):
        raise _bad(f"resume point of {topic!r}: seq must be a non-negative integer", request_id)
    return ResumePoint(epoch, seq)


def decode_request(data: str | bytes) -> Request:
    """Parse one client frame; raise ProtocolError(bad_request) on anything else."""
    if isinstance(data, bytes):
        raise _bad("binary frames are not accepted; send UTF-8 JSON text frames")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _bad("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise _bad("frame must be a JSON object")
    request_id = _read_id(obj)
    op = obj.get("op")
    if op == "subscribe":
        topics = obj.get("topics")
        if not isinstance(topics, dict) or not topics:
            raise _bad("subscribe: topics must be a non-empty object", request_id)
        return Subscribe(
            request_id,
            {str(t): _read_resume(t, point, request_id) for t, point in topics.items()},
        )
    if op == "unsubscribe":
        topics = obj.get("topics")
        if not isinstance(topics, list) or not topics:
            raise _bad("unsubscribe: topics must be a non-empty list", request_id)
        if not all(isinstance(t, str) for t in topics):
            raise _bad("unsubscribe: topics must be strings", request_id)
        return Unsubscribe(request_id, list(dict.fromkeys(topics)))
    if op == "ack":
        topics = obj.get("topics")
        if not isinstance(topics, dict) or not all(_is_seq(s) for s in topics.values()):
            raise _bad("ack: topics must map topic to a non-negative seq", request_id)
        return Ack(request_id, topics)
    if op == "ping":
        return Ping(request_id)
    if op is None:
        raise _bad("missing op", request_id)
    raise _bad(f"unknown op {str(op)[:32]!r}", request_id)


def peek_id(data: str | bytes) -> object:
    """The request id of a frame refused before decoding (rate limit), if readable."""
    try:
        obj = orjson.loads(data)
        return _read_id(obj) if isinstance(obj, dict) else None
    except (orjson.JSONDecodeError, ProtocolError):
        return None


# -- server frames ----------------------------------------------------------


def _with_id(obj: dict, request_id: object) -> dict:
    if request_id is not None:
        obj["id"] = request_id
    return obj


def welcome(conn: str, node: str, worker: int, heartbeat_ms: int, region: str) -> bytes:
    return orjson.dumps(
        {"type": "welcome", "conn": conn, "node": node, "worker": worker,
         "heartbeat_ms": heartbeat_ms, "region": region}
    )


def subscribed(request_id: object, topics: Sequence[str]) -> bytes:
    return orjson.dumps(_with_id({"type": "subscribed", "topics": list(topics)}, request_id))


def unsubscribed(request_id: object, topics: Sequence[str]) -> bytes:
    return orjson.dumps(_with_id({"type": "unsubscribed", "topics": list(topics)}, request_id))


def pong(request_id: object, ts: int) -> bytes:
    return orjson.dumps(_with_id({"type": "pong", "ts": ts}, request_id))


def error(exc: ProtocolError) -> bytes:
    obj: dict = {"type": "error", "id": exc.request_id, "code": str(exc.code),
                 "message": exc.message}
    if exc.topics is not None:
        obj["topics"] = exc.topics
    if exc.retry_after_ms is not None:
        obj["retry_after_ms"] = exc.retry_after_ms
    return orjson.dumps(obj)


def reset(topic: str, reason: str) -> bytes:
    return orjson.dumps({"type": "reset", "topic": topic, "reason": reason})


def reconnect(after_ms: int, reason: str) -> bytes:
    return orjson.dumps({"type": "reconnect", "after_ms": after_ms, "reason": reason})


def snapshot(topic: str, epoch: str, seq: int, markets: Iterable[bytes]) -> bytes:
    """The snapshot object of §3; `markets` are event JSON as published."""
    head = orjson.dumps({"type": "snapshot", "topic": topic, "epoch": epoch, "seq": seq})
    return b"".join((head[:-1], b',"markets":[', b",".join(markets), b"]}"))


def batch(events: Sequence[bytes]) -> bytes:
    """Several events, in order, in one frame (§4)."""
    return b'{"type":"batch","events":[' + b",".join(events) + b"]}"


def mark_coalesced(event: bytes) -> bytes:
    """The event with `"coalesced":true`: the first one after skipped seqs (§5.3)."""
    return event[:-1] + b',"coalesced":true}'
