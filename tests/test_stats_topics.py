"""`stats:{partner}` topics through a real worker (PROTOCOL.md §12).

Rows published through the one publish path get every rule of §3 and §5 with
`key` in the market's role: snapshot, live events, resume, coalescing under
back-pressure. Only the partner's own session may follow its topic, over
WebSocket and `GET /v1/snapshot` alike.
"""

from __future__ import annotations

import asyncio
import socket

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from websockets.asyncio.client import connect

from attribution.stats import event_body
from feed.publisher import PUBLISH_LUA, StatsEvent
from gateway.auth import issue_token, topic_granted
from redis_contract import history_key, meta_key, topic_keys
from tests.conftest import JWT_SECRET, http_get

TOPIC = "stats:42"
SMALL_BUFFERS = {
    "OG_SOCKET_SNDBUF_BYTES": "4096",
    "OG_HIGH_WATERMARK_BYTES": "8192",
    "OG_LOW_WATERMARK_BYTES": "2048",
}


def partner_token(partner: str | None = "42", topics: list[str] | None = None) -> str:
    return issue_token(JWT_SECRET, "u1", "s1", 3600, topics, partner=partner)


def row(key: str, clicks: int, topic: str = TOPIC) -> StatsEvent:
    counters = {"clicks": clicks, "unique_clicks": clicks, "bot_clicks": 0,
                "duplicate_clicks": 0, "registrations": 0, "ftds": 0, "deposits": "0.00",
                "currency": None}
    return StatsEvent(topic, key, event_body(key, 1_763_800_000_000_000_000 + clicks,
                                             counters))


async def _subscribe(ws, topics: dict) -> list[dict]:
    await ws.send(orjson.dumps({"op": "subscribe", "id": 1, "topics": topics}).decode())
    frames = [orjson.loads(await ws.recv())]
    while frames[-1]["type"] == "error":
        frames.append(orjson.loads(await ws.recv()))
    for _ in frames[-1].get("topics", []):
        frames.append(orjson.loads(await ws.recv()))
    return frames


def _events(frames: list[dict]) -> list[dict]:
    out = []
    for f in frames:
        out += f["events"] if f["type"] == "batch" else [f]
    return out


async def _recv_until(ws, predicate, timeout: float = 10) -> list[dict]:
    got: list[dict] = []
    async with asyncio.timeout(timeout):
        while not got or not predicate(got):
            got += _events([orjson.loads(await ws.recv())])
    return got


# -- the grant rule --------------------------------------------------------------

# (topics claim, partner claim, topic, allowed)
GRANTS = [
    (None, "42", "stats:42", True),
    (None, "42", "stats:43", False),
    (None, "42", "stats:420", False),
    (["stats:"], "42", "stats:43", False),
    (None, "42", "odds:1:39:1", False),
    (["odds:1:39"], "42", "odds:1:39:1", True),
    (None, None, "stats:42", False),
    (["stats:42"], None, "stats:42", False),
    (None, None, "odds:1:39:1", True),
]


@pytest.mark.parametrize(("grants", "partner", "topic", "allowed"), GRANTS)
def test_the_grant_rule_for_partners(grants, partner, topic, allowed) -> None:
    granted = topic_granted(None if grants is None else tuple(grants), topic, partner)
    assert granted is allowed


@pytest.mark.parametrize(("grants", "partner", "topic", "allowed"), GRANTS)
async def test_http_and_websocket_agree_on_partner_topics(worker, grants, partner, topic,
                                                          allowed) -> None:
    tok = partner_token(partner, grants)
    status, _, body = http_get(worker.http + f"/v1/snapshot?topic={topic}&token={tok}")
    assert status == (200 if allowed else 403), body
    if not allowed:
        assert orjson.loads(body)["code"] == "forbidden"
    async with connect(worker.url + f"?token={tok}") as ws:
        assert orjson.loads(await ws.recv())["type"] == "welcome"
        frames = await _subscribe(ws, {topic: None})
        if allowed:
            assert frames[0]["type"] == "subscribed" and frames[0]["topics"] == [topic]
        else:
            assert frames[0] == {"type": "error", "id": 1, "code": "forbidden",
                                 "message": frames[0]["message"], "topics": [topic]}


@pytest.mark.parametrize("topic", ["stats:", "stats:a%20b", "stats:a.b", "stats:" + "x" * 33])
def test_a_malformed_stats_topic_is_unknown(worker, topic) -> None:
    status, _, body = http_get(worker.http + f"/v1/snapshot?topic={topic}"
                               f"&token={partner_token()}")
    assert status == 404 and orjson.loads(body)["code"] == "unknown_topic"


# -- the publish path -------------------------------------------------------------

async def test_a_stats_row_is_stored_and_published_as_the_protocol_says(
        publisher, redis_url) -> None:
    (published,) = await publisher.publish_stats([row("campaign:c7:today", 5)])
    client = aioredis.Redis.from_url(redis_url)
    try:
        _id, fields = (await client.xrange(history_key(TOPIC)))[-1]
        event = orjson.loads(fields[b"e"])
        assert list(event) == ["type", "topic", "epoch", "seq", "key", "ts", "counters"]
        assert (event["type"], event["topic"], event["seq"], event["key"]) == \
            ("stats", TOPIC, published.seq, "campaign:c7:today")
        # An unknown type is refused before the seq moves: no gap.
        with pytest.raises(ResponseError, match="TYPE"):
            await client.eval(PUBLISH_LUA, 3, *topic_keys(TOPIC), TOPIC, "e", "k",
                              b'"key":"k"}', 60000, 0, 0, "bogus")
        assert int(await client.hget(meta_key(TOPIC), "seq")) == published.seq
    finally:
        await client.aclose()


async def test_publish_stats_refuses_a_non_stats_topic(publisher) -> None:
    with pytest.raises(ValueError, match="not a stats topic"):
        await publisher.publish_stats([row("k", 1, topic="odds:1:39:1")])


# -- snapshot, live, resume ----------------------------------------------------------

async def test_snapshot_live_and_resume_of_a_partner_topic(worker, publisher) -> None:
    await publisher.publish_stats([row("campaign:c7:today", 1), row("creative:cr1:today", 1),
                                   row("campaign:c7:today", 2)])
    async with connect(worker.url + f"?token={partner_token()}") as ws:
        await ws.recv()
        frames = await _subscribe(ws, {TOPIC: None})
        snapshot = frames[1]
        assert snapshot["type"] == "snapshot" and snapshot["seq"] == 3
        assert {e["key"]: e["counters"]["clicks"] for e in snapshot["markets"]} == \
            {"campaign:c7:today": 2, "creative:cr1:today": 1}
        await publisher.publish_stats([row("campaign:c7:5m", 3)])
        live = await _recv_until(ws, lambda got: True)
        assert [(e["type"], e["seq"], e["key"]) for e in live] == [("stats", 4, "campaign:c7:5m")]
    await publisher.publish_stats([row("campaign:c7:today", 4), row("campaign:c7:today", 5)])
    async with connect(worker.url + f"?token={partner_token()}") as ws:
        await ws.recv()
        frames = await _subscribe(ws, {TOPIC: {"epoch": snapshot["epoch"], "seq": 4}})
        assert frames[0]["type"] == "subscribed"
        replay = _events(frames[1:])
        if replay[-1]["seq"] != 6:
            replay += await _recv_until(ws, lambda got: got[-1]["seq"] == 6)
        assert [(e["seq"], e["counters"]["clicks"]) for e in replay] == [(5, 4), (6, 5)]


async def test_a_resume_of_another_epoch_is_reset_with_a_snapshot(worker, publisher) -> None:
    await publisher.publish_stats([row("campaign:c7:today", 1)])
    async with connect(worker.url + f"?token={partner_token()}") as ws:
        await ws.recv()
        frames = await _subscribe(ws, {TOPIC: {"epoch": "r-gone", "seq": 9}})
        got = frames[1:] + (await _recv_until(ws, lambda g: g[-1]["type"] == "snapshot")
                            if len(frames) < 3 else [])
        assert [f["type"] for f in got] == ["reset", "snapshot"]
        assert got[1]["markets"][0]["key"] == "campaign:c7:today"


# -- back-pressure -------------------------------------------------------------------

async def test_a_stalled_partner_is_coalesced_per_key_and_ends_on_the_newest_rows(
        worker_factory, publisher) -> None:
    worker = worker_factory(**SMALL_BUFFERS)
    await publisher.publish_stats([row("campaign:c0:today", 0)])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", worker.port))
    sock.setblocking(False)
    keys = [f"campaign:c{i}:today" for i in range(20)]
    async with connect(worker.url + f"?token={partner_token()}", sock=sock,
                       max_queue=4) as ws:
        await ws.recv()
        frames = await _subscribe(ws, {TOPIC: None})
        base = frames[1]["seq"]
        ws.transport.pause_reading()
        last = None
        for start in range(0, 3000, 100):
            last = await publisher.publish_stats(
                [row(keys[(start + i) % 20], start + i) for i in range(100)])
            await asyncio.sleep(0.01)
        end = last[-1].seq
        ws.transport.resume_reading()
        received = await _recv_until(ws, lambda got: got[-1]["seq"] == end, timeout=30)
    seqs = [e["seq"] for e in received]
    assert seqs == sorted(set(seqs)) and seqs[0] > base  # never down, never repeated
    assert len(received) < 3000 - 100  # coalesced, not every event
    prev = base
    for e in received:  # every skip is announced on the event after it
        if e["seq"] != prev + 1:
            assert e.get("coalesced") is True, e
        prev = e["seq"]
    newest = {}
    for e in received:
        newest[e["key"]] = e["counters"]["clicks"]
    assert newest == {k: max(n for n in range(3000) if n % 20 == i) for i, k in enumerate(keys)}


async def test_the_stats_snapshot_over_http_lists_rows_under_markets(worker, publisher) -> None:
    await publisher.publish_stats([row("campaign:c7:1h", 3)])
    status, _, body = http_get(worker.http + f"/v1/snapshot?topic={TOPIC}"
                               f"&token={partner_token()}")
    snap = orjson.loads(body)
    assert status == 200 and snap["type"] == "snapshot" and snap["topic"] == TOPIC
    assert [(e["key"], e["counters"]["clicks"]) for e in snap["markets"]] == \
        [("campaign:c7:1h", 3)]


async def test_the_python_client_follows_a_partner_topic_by_its_rules(worker, publisher) -> None:
    """client.odds reads `stats` events, rows by `key`: snapshot, live rows, a
    resume after a reconnect, all through the §5 checker."""
    from client.odds import OddsClient

    await publisher.publish_stats([row("campaign:c7:today", 1), row("creative:cr1:today", 1)])
    client = OddsClient(worker.url, token=partner_token(), token_in="query")
    await client.connect()
    await client.subscribe([TOPIC])
    await client.wait_synced([TOPIC], timeout=10)
    assert set(client.topics[TOPIC].markets) == {"campaign:c7:today", "creative:cr1:today"}
    await publisher.publish_stats([row("campaign:c7:today", 2), row("campaign:c7:5m", 2)])
    deadline = asyncio.get_running_loop().time() + 10
    while client.topics[TOPIC].seq < 4:
        assert asyncio.get_running_loop().time() < deadline, client.topics[TOPIC].seq
        await asyncio.sleep(0.02)
    held = client.topics[TOPIC].markets
    assert held["campaign:c7:today"]["counters"]["clicks"] == 2
    assert "campaign:c7:5m" in held
    assert client.violations == [] and client.stats.events == 2
    await client.close()
