"""A real worker's HTTP endpoints and its handshake (PROTOCOL.md §2, §6)."""

from __future__ import annotations

import subprocess

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from feed.events import PriceUpdate
from tests.conftest import http_get, token


def test_healthz_and_unknown_path(worker) -> None:
    status, _, body = http_get(worker.http + "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert http_get(worker.http + "/nope")[0] == 404


def test_topics_serves_the_partition_map(worker, pmap) -> None:
    status, headers, body = http_get(worker.http + "/v1/topics")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert orjson.loads(body) == pmap.to_dict()


async def test_snapshot_over_http_matches_published_state(worker, publisher) -> None:
    for home in ("1.50", "1.60"):
        await publisher.publish(PriceUpdate("odds:1:39:7", "1:39:7", "m-7", {"home": home}))
    auth = {"Cookie": f"og_session={token()}"}
    status, _, body = http_get(worker.http + "/v1/snapshot?topic=odds:1:39:7", auth)
    assert status == 200
    snap = orjson.loads(body)
    assert snap["type"] == "snapshot" and snap["topic"] == "odds:1:39:7" and snap["seq"] == 2
    assert [m["prices"]["home"] for m in snap["markets"]] == ["1.60"]


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [("", 400, "bad_request"), ("?topic=odds:9:9", 404, "unknown_topic"),
     ("?topic=odds:1:39:1&topic=odds:1:39:2", 400, "bad_request")],
)
def test_snapshot_refusals(worker, query: str, status: int, code: str) -> None:
    got, _, body = http_get(worker.http + "/v1/snapshot" + query,
                            {"Cookie": f"og_session={token()}"})
    assert got == status
    assert orjson.loads(body)["code"] == code


def test_snapshot_needs_a_token(worker) -> None:
    assert http_get(worker.http + "/v1/snapshot?topic=odds:1:39:1")[0] == 401
    forbidden = token(topics=["odds:2:"])
    got, _, body = http_get(worker.http + f"/v1/snapshot?topic=odds:1:39:1&token={forbidden}")
    assert got == 403 and orjson.loads(body)["code"] == "forbidden"


@pytest.mark.parametrize(
    "bad_token",
    [None, "not-a-jwt", token(ttl=-60), token()[:-4] + "AAAA"],
    ids=["missing", "garbage", "expired", "forged"],
)
async def test_bad_tokens_are_refused_before_the_upgrade(worker, bad_token) -> None:
    url = worker.url + (f"?token={bad_token}" if bad_token else "")
    with pytest.raises(InvalidStatus) as info:
        async with connect(url):
            pass
    assert info.value.response.status_code == 401


async def test_token_by_cookie_or_query_gets_welcome(worker) -> None:
    async with connect(worker.url, additional_headers={"Cookie": f"og_session={token()}"}) as ws:
        welcome = orjson.loads(await ws.recv())
    assert welcome["type"] == "welcome"
    assert welcome["node"] == "test-node" and welcome["worker"] == 0
    assert isinstance(welcome["conn"], str) and welcome["heartbeat_ms"] > 0
    async with connect(worker.url + f"?token={token()}") as ws:
        assert orjson.loads(await ws.recv())["type"] == "welcome"


async def test_anonymous_mode(worker_factory) -> None:
    open_worker = worker_factory(OG_ALLOW_ANONYMOUS="1")
    async with connect(open_worker.url) as ws:
        assert orjson.loads(await ws.recv())["type"] == "welcome"
    with pytest.raises(InvalidStatus):  # a bad token is still refused
        async with connect(open_worker.url + "?token=forged"):
            pass


def test_a_worker_listens_with_the_configured_backlog(worker_factory) -> None:
    worker = worker_factory(OG_LISTEN_BACKLOG="777")
    out = subprocess.run(["ss", "-ltnH", f"sport = :{worker.port}"], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[2] == "777"  # Send-Q of a listening socket: its backlog
