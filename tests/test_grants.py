"""A token's `topics` grants mean the same over every transport (PROTOCOL.md §2, §3, §6).

The rule lives in one function (gateway.auth.topic_granted); these tests hold
the WebSocket subscribe and `GET /v1/snapshot` of a real worker to the same
verdicts, including the cases a plain string prefix gets wrong.
"""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from gateway.auth import topic_granted
from tests.conftest import http_get, token

# (grants, topic, allowed)
CASES = [
    (["odds:1:3"], "odds:1:3:1", True),
    (["odds:1:3"], "odds:1:39:1", False),
    (["odds:1:3"], "odds:1:390", False),
    (["odds:1:39"], "odds:1:39:1", True),
    (["odds:1:39"], "odds:1:390", False),
    (["odds:1:"], "odds:1:390", True),
    ([""], "odds:1:39:1", False),
    ([], "odds:1:39:1", False),
    (["odds:2:", "odds:1:39:1"], "odds:1:39:1", True),
]


@pytest.mark.parametrize(("grants", "topic", "allowed"), CASES)
def test_the_rule(grants: list[str], topic: str, allowed: bool) -> None:
    assert topic_granted(tuple(grants), topic) is allowed


def test_no_topics_claim_allows_everything() -> None:
    assert topic_granted(None, "odds:1:39:1")


ids = st.integers(0, 500).map(str)


@given(st.lists(ids, min_size=1, max_size=4), st.lists(ids, min_size=1, max_size=4))
def test_a_grant_covers_only_whole_ids(grant_ids: list[str], topic_ids: list[str]) -> None:
    grant = ":".join(["odds", *grant_ids])
    topic = ":".join(["odds", *topic_ids])
    expected = topic_ids[: len(grant_ids)] == grant_ids
    assert topic_granted((grant,), topic) is expected


@pytest.mark.parametrize(("grants", "topic", "allowed"), CASES)
async def test_http_and_websocket_agree(worker, grants: list[str], topic: str,
                                        allowed: bool) -> None:
    tok = token(topics=grants)
    status, _, body = http_get(worker.http + f"/v1/snapshot?topic={topic}&token={tok}")
    assert status == (200 if allowed else 403), body
    if not allowed:
        assert orjson.loads(body)["code"] == "forbidden"
    async with connect(worker.url + f"?token={tok}") as ws:
        assert orjson.loads(await ws.recv())["type"] == "welcome"
        await ws.send(orjson.dumps({"op": "subscribe", "id": 1,
                                        "topics": {topic: None}}).decode())
        first = orjson.loads(await ws.recv())
        if allowed:
            assert first["type"] == "subscribed", first
            assert first["topics"] == [topic]
        else:
            assert first["type"] == "error" and first["code"] == "forbidden"
            assert first["topics"] == [topic]
