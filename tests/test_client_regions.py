"""The client's regions (PROTOCOL.md §8): the pure decisions, then scripted regions.

`RegionRing` and `moves_region` are tested as plain objects. The rest runs an
`OddsClient` against `FakeRegion`s: in-process WebSocket servers that each
serve one copy of the same stream of one topic (byte-identical, as §8 has
it), welcome with their region's name, and answer a subscribe with a snapshot
or a replay from the resume point, the way a region of the real gateway does.
They let a test drain a region with any `reconnect` reason, which the real
server does not send yet (`region_drain`), and break a region on purpose (a
new epoch, a gap) to show that a failover that resets or skips is caught.
The failover against real nodes is tests/test_regions.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidURI
from websockets.http11 import Request, Response

from client.odds import (
    REGION_DRAIN,
    ClientClosed,
    OddsClient,
    RegionRing,
    moves_region,
)
from supervisor.embedded_redis import free_port
from tests.conftest import eventually

T = "odds:1:39:1"
MARKET = "1:39:1"
EPOCH = "r1-20261127"


def event(seq: int, epoch: str = EPOCH) -> dict[str, Any]:
    return {"type": "odds", "topic": T, "epoch": epoch, "seq": seq, "market": MARKET,
            "event_id": "m-1", "ts": 1763800000000000000 + seq, "status": "open",
            "prices": {"home": f"1.{seq:02d}"}}


# -- the pure decisions ------------------------------------------------------------


def test_only_region_drain_moves_to_another_region() -> None:
    assert moves_region(REGION_DRAIN) is True
    for reason in ("drain", "restart", "overload", "", None, 1, "REGION_DRAIN"):
        assert moves_region(reason) is False, reason


def test_one_url_backs_off_after_every_failure_and_stays() -> None:
    ring = RegionRing(["ws://a/ws"])
    for _ in range(4):
        assert ring.failed() is True
        assert ring.current == "ws://a/ws"
    ring.leave()  # a drained lone region: there is nowhere else to go
    assert ring.current == "ws://a/ws"


def test_failures_try_every_region_at_once_then_back_off_and_wrap() -> None:
    ring = RegionRing(["ws://a/ws", "ws://b/ws", "ws://c/ws"])
    assert ring.current == "ws://a/ws"
    steps = []
    for _ in range(7):
        failed_at = ring.current
        steps.append((failed_at[5], ring.failed(), ring.current[5]))
    # A, B, C at once; back off; the next pass starts where the last ended.
    assert steps == [("a", False, "b"), ("b", False, "c"), ("c", True, "a"),
                     ("a", False, "b"), ("b", False, "c"), ("c", True, "a"),
                     ("a", False, "b")]


def test_a_welcome_starts_a_new_pass_from_the_region_that_answered() -> None:
    ring = RegionRing(["ws://a/ws", "ws://b/ws", "ws://c/ws"])
    assert ring.failed() is False  # A refused
    ring.connected()  # B answered
    assert (ring.current, ring.failed_in_a_row) == ("ws://b/ws", 0)
    # B's connection drops: B again first (the caller's choice: `current` is
    # unchanged by a drop), then C, then A, and only then a backoff.
    assert [ring.failed(), ring.failed(), ring.failed()] == [False, False, True]
    assert ring.current == "ws://b/ws"


def test_a_drained_region_is_left_without_counting_a_failure_and_comes_last() -> None:
    ring = RegionRing(["ws://a/ws", "ws://b/ws"])
    ring.leave()
    assert (ring.current, ring.failed_in_a_row) == ("ws://b/ws", 0)
    assert ring.failed() is False  # B down too: A, the drained one, is the last resort
    assert ring.current == "ws://a/ws"
    assert ring.failed() is True


def test_a_ring_needs_a_list_of_urls() -> None:
    for bad in ([], (), "ws://a/ws"):
        with pytest.raises(ValueError):
            RegionRing(bad)  # type: ignore[arg-type]


def test_the_client_takes_one_url_or_several() -> None:
    one = OddsClient("ws://127.0.0.1:1/ws")
    assert (one.urls, one.url, one.name) == (("ws://127.0.0.1:1/ws",), "ws://127.0.0.1:1/ws",
                                             "ws://127.0.0.1:1/ws")
    two = OddsClient(["ws://127.0.0.1:1/ws", "wss://b.example/ws"], token="t", token_in="query")
    assert two.urls == ("ws://127.0.0.1:1/ws", "wss://b.example/ws")
    assert two.url == "ws://127.0.0.1:1/ws"  # the first, until a region welcomes it
    assert (two.region, two.region_url, two.stats.failovers) == (None, None, 0)
    with pytest.raises(ValueError):
        OddsClient([])
    with pytest.raises(InvalidURI):
        OddsClient(["ws://127.0.0.1:1/ws", "http://b.example/ws"])
    with pytest.raises(ValueError):
        OddsClient(["ws://127.0.0.1:1/ws"], token="t", token_in="header")  # type: ignore[arg-type]


def test_region_is_what_the_last_welcome_names() -> None:
    client = OddsClient(["ws://127.0.0.1:1/ws", "ws://127.0.0.1:2/ws"])
    welcome = {"type": "welcome", "conn": "c1", "node": "n", "worker": 0, "heartbeat_ms": 1000}
    client._handle_frame(orjson.dumps({**welcome, "region": "eu-west"}))
    assert client.region == "eu-west"
    client._handle_frame(orjson.dumps(welcome))  # a server that names none
    assert client.region is None
    client._handle_frame(orjson.dumps({**welcome, "region": 7}))  # not a name
    assert client.region is None


# -- scripted regions --------------------------------------------------------------------


class FakeRegion:
    """One region's frontend, reduced to one topic whose events live in `stream`.

    Several regions share one `stream` list: the same events, the same bytes.
    A subscribe with no resume point gets the snapshot at the head; one with
    the stream's epoch gets every event after its seq; another epoch gets
    ``reset`` and the snapshot. `epoch` and `skip` break a region on purpose.
    """

    def __init__(self, name: str | None, stream: list[dict], *, epoch: str = EPOCH,
                 skip: set[int] | None = None, refuse_status: int | None = None) -> None:
        self.name = name
        self.stream = stream
        self.epoch = epoch
        self.skip = skip or set()
        self.refuse_status = refuse_status
        self.port = free_port()
        self.connections = 0
        self.subscribes: list[dict] = []
        self.live: set[ServerConnection] = set()
        self.server: Server | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> FakeRegion:
        self.server = await serve(self._handle, "127.0.0.1", self.port,
                                  process_request=self._refuse)
        return self

    async def stop(self) -> None:
        """Close every connection (1006-like: no reconnect frame) and stop listening."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        self.live.clear()

    async def drain(self, reason: str, after_ms: int = 20) -> None:
        """What a draining gateway does: ``reconnect``, then close 1012."""
        for ws in list(self.live):
            await ws.send(orjson.dumps({"type": "reconnect", "after_ms": after_ms,
                                        "reason": reason}).decode())
            await ws.close(1012, reason)

    async def send_live(self, ev: dict) -> None:
        if ev["seq"] in self.skip:
            return
        for ws in list(self.live):
            with contextlib.suppress(ConnectionClosed):  # a drained one, not yet gone
                await ws.send(orjson.dumps(self._as_served(ev)).decode())

    def _as_served(self, ev: dict) -> dict:
        ev = {**ev, "epoch": self.epoch}
        if ev["seq"] - 1 in self.skip:
            ev.pop("coalesced", None)  # a broken region: a gap with no flag
        return ev

    def _refuse(self, conn: ServerConnection, request: Request) -> Response | None:
        if self.refuse_status is None:
            return None
        return conn.respond(self.refuse_status, "refused\n")

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        welcome = {"type": "welcome", "conn": f"c{self.connections}", "node": "fake",
                   "worker": 0, "heartbeat_ms": 20000}
        if self.name is not None:
            welcome["region"] = self.name
        await ws.send(orjson.dumps(welcome).decode())
        try:
            async for raw in ws:
                request = orjson.loads(raw)
                if request.get("op") != "subscribe":
                    continue
                self.subscribes.append(request)
                point = request["topics"][T]
                await ws.send(orjson.dumps({"type": "subscribed", "id": request["id"],
                                            "topics": [T]}).decode())
                if point is not None and point["epoch"] == self.epoch:
                    for ev in self.stream:
                        if ev["seq"] > point["seq"] and ev["seq"] not in self.skip:
                            await ws.send(orjson.dumps(self._as_served(ev)).decode())
                else:
                    if point is not None:
                        await ws.send(orjson.dumps({"type": "reset", "topic": T,
                                                    "reason": "epoch"}).decode())
                    head = self.stream[-1]["seq"] if self.stream else 0
                    markets = [self._as_served(self.stream[-1])] if self.stream else []
                    await ws.send(orjson.dumps({"type": "snapshot", "topic": T, "epoch": self.epoch,
                                                "seq": head, "markets": markets}).decode())
                self.live.add(ws)
        except ConnectionClosed:
            pass
        finally:
            self.live.discard(ws)


class Regions:
    """Fake regions sharing one stream; `publish` appends and sends live on each."""

    def __init__(self, *regions: FakeRegion) -> None:
        self.regions = regions
        self.stream = regions[0].stream

    async def publish(self, count: int = 1) -> None:
        for _ in range(count):
            ev = event(len(self.stream) + 1)
            self.stream.append(ev)
            for region in self.regions:
                if region.server is not None:
                    await region.send_live(ev)


@pytest.fixture
async def regions() -> AsyncIterator[Any]:
    started: list[FakeRegion] = []

    async def make(*names: str | None, **kw: Any) -> Regions:
        stream: list[dict] = [event(1), event(2)]
        made = []
        for name in names:
            region = await FakeRegion(name, stream, **kw.get(name or "", {})).start()
            started.append(region)
            made.append(region)
        return Regions(*made)

    yield make
    for region in started:
        await region.stop()


async def _following(urls: list[str]) -> OddsClient:
    client = OddsClient(urls, ws_options={"open_timeout": 2})
    await client.connect()
    assert (await client.subscribe([T])).accepted == [T]
    await client.wait_synced([T])
    return client


async def test_region_drain_moves_to_the_next_region_and_resumes_there(regions) -> None:
    fleet = await regions("a", "b")
    a, b = fleet.regions
    client = await _following([a.url, b.url])
    assert (client.region, client.region_url) == ("a", a.url)
    await fleet.publish(3)
    await eventually(lambda: client.topics[T].seq == 5)

    await a.drain(REGION_DRAIN)
    await fleet.publish(2)  # missed while moving: B replays them
    await client.wait_resumed(1)
    await fleet.publish(2)  # live in B
    await eventually(lambda: client.topics[T].seq == 9)

    assert (client.region, client.region_url, client.url) == ("b", b.url, b.url)
    assert (client.stats.failovers, client.stats.reconnects) == (1, 1)
    assert a.connections == 1  # not back to the drained region
    assert b.subscribes == [{"op": "subscribe", "id": 2,
                             "topics": {T: {"epoch": EPOCH, "seq": 5}}}]
    assert client.violations == []
    assert (client.stats.resets, client.stats.snapshots) == (0, 1)
    await client.close()


@pytest.mark.parametrize("reason", ["drain", "restart", "overload"])
async def test_a_worker_drain_comes_back_to_the_same_region(regions, reason) -> None:
    fleet = await regions("a", "b")
    a, b = fleet.regions
    client = await _following([a.url, b.url])
    await a.drain(reason)
    await client.wait_resumed(1)
    assert (client.region, a.connections, b.connections) == ("a", 2, 0)
    assert (client.stats.failovers, client.stats.connect_failures) == (0, 0)
    await client.close()


async def test_a_refused_region_is_passed_over_at_once_on_connect(regions) -> None:
    fleet = await regions("b")
    [b] = fleet.regions
    down = f"ws://127.0.0.1:{free_port()}/ws"  # nothing listens
    client = await _following([down, b.url])
    assert (client.region, client.region_url) == ("b", b.url)
    # The first connection is not a failover, wherever it lands.
    assert (client.stats.connect_failures, client.stats.failovers) == (1, 0)
    await client.close()


async def test_connect_raises_what_the_last_region_raised_when_none_answers(regions) -> None:
    fleet = await regions("b", b={"refuse_status": 503})
    [b] = fleet.regions
    client = OddsClient([f"ws://127.0.0.1:{free_port()}/ws", b.url])
    with pytest.raises(ClientClosed) as caught:
        await client.connect()
    assert caught.value.info.http_status == 503
    assert client.stats.connect_failures == 2
    assert not client.closed.is_set()  # not terminal: connect() may be called again
    b.refuse_status = None
    await client.connect()
    assert client.region == "b"
    await client.close()


async def test_a_terminal_refusal_is_not_taken_to_another_region(regions) -> None:
    fleet = await regions("a", "b", a={"refuse_status": 401})
    a, b = fleet.regions
    client = OddsClient([a.url, b.url])
    with pytest.raises(ClientClosed):
        await client.connect()
    assert client.closed.is_set() and client.closed_reason.http_status == 401
    assert b.connections == 0


async def test_every_region_down_backs_off_per_pass_then_recovers(regions) -> None:
    fleet = await regions("a", "b")
    a, b = fleet.regions
    client = await _following([a.url, b.url])
    await a.stop()
    await b.stop()
    await eventually(lambda: client.stats.backoffs >= 3, timeout=10)
    stats = client.stats
    # Both regions tried in each pass, and a backoff after each pass: no hot loop.
    assert stats.connect_failures >= 2 * stats.backoffs
    assert stats.connect_failures <= 2 * (stats.backoffs + 1)
    await fleet.publish(2)  # while everything was down
    await b.start()  # back on its port
    await client.wait_resumed(1, timeout=15)
    await eventually(lambda: client.topics[T].seq == 4)
    assert (client.region, client.stats.failovers) == ("b", 1)
    assert client.violations == [] and client.stats.resets == 0
    await client.close()


async def test_a_region_that_resets_the_resume_shows_as_a_reset(regions) -> None:
    """The checks that make a failover test worth running: a region whose stream
    is not the same (another epoch) resets the player, and the client counts it."""
    fleet = await regions("a", "b", b={"epoch": "r9-other"})
    a, _ = fleet.regions
    client = await _following([fleet.regions[0].url, fleet.regions[1].url])
    await a.drain(REGION_DRAIN)
    await client.wait_resumed(1)
    await client.wait_synced([T])
    assert client.region == "b"
    assert (client.stats.resets, client.stats.snapshots) == (1, 2)
    await client.close()


async def test_a_region_that_skips_an_event_shows_as_a_violation(regions) -> None:
    fleet = await regions("a", "b", b={"skip": {4}})
    a, _ = fleet.regions
    client = await _following([fleet.regions[0].url, fleet.regions[1].url])
    await fleet.publish(1)  # seq 3, in A
    await eventually(lambda: client.topics[T].seq == 3)
    await a.drain(REGION_DRAIN)
    await fleet.publish(2)  # seq 4 (B drops it, unflagged), seq 5
    await client.wait_resumed(1)
    await eventually(lambda: client.topics[T].seq == 5)
    assert [v.rule for v in client.violations] == ["silent_gap"]
    await client.close()

