"""A player that stops reading, then reads again, is shown a bounded backlog.

Issue "Hardening", 7: without a bound on what the kernel queues unsent, a
stalled player's socket takes megabytes of old prices (the kernel's
autotuned send buffer, 4 MB) before the worker's watermarks notice, and on
waking the player reads every one of them before the current price. With
TCP_NOTSENT_LOWAT on player sockets (`OG_SOCKET_NOTSENT_LOWAT_BYTES`) the
backlog stays in the worker, which coalesces it; behind HAProxy, the
template's `tune.sndbuf.client` / `tune.rcvbuf.server` keep HAProxy's
sockets from being the place it piles up instead.

Real workers, real sockets, default settings; the player is a real client
whose app stops reading (`pause_reading`). What it reads on waking is
bounded by the buffers between it and the worker's coalescing, whatever
was published meanwhile: the bound below adds them up, it is not a timing.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import orjson
import pytest

from client.odds import OddsClient
from feed.events import PriceUpdate
from gateway.config import Settings
from tests.conftest import ROOT, eventually, token
from tests.node_harness import start_node

LEAGUE = "odds:5:8"
MARKETS = 20
EVENTS = 20_000  # about 3.5 MB of events: what the kernel alone would have queued
PLAYER_RCVBUF = 4096  # the player's own buffer, small so the worker's side shows
# What one send() may still add to the segment the kernel is filling when the
# unsent bytes are already past the low mark (TCP checks it per new segment;
# a segment grows to 64 KiB with GSO).
SEGMENT = 64 * 1024
# The events of the loop turn in which a player crosses its high mark still go
# to its transport: one read from Redis (uvloop reads at most 256,000 bytes).
TURN = 256_000
# HAProxy's own channel buffer (tune.bufsize, its default), and what the
# template sets its sockets to (the kernel doubles SO_SNDBUF / SO_RCVBUF).
HAPROXY_BUFSIZE = 16_384
TEMPLATE = ROOT / "haproxy" / "oddsgate.cfg.tmpl"
HAPROXY_TUNE = {"tune.sndbuf.client": 16_384, "tune.rcvbuf.server": 16_384}


def _worker_budget(player_rcvbuf: int) -> int:
    """Bytes that can sit between a stalled player's app and the worker's coalescing."""
    s = Settings(jwt_secret="x")  # the defaults
    return (player_rcvbuf + s.socket_notsent_lowat_bytes + SEGMENT
            + s.high_watermark_bytes + TURN)


def _haproxy_budget() -> int:
    """What HAProxy's hop adds: its client socket, its buffer, its worker-side socket."""
    return (2 * HAPROXY_TUNE["tune.sndbuf.client"] + SEGMENT + HAPROXY_BUFSIZE
            + 2 * HAPROXY_TUNE["tune.rcvbuf.server"])


async def _stall_publish_wake(url: str, port: int, publisher) -> tuple[list[dict], int]:
    """The odds events a stalled player reads on waking until it holds every newest price,
    and the receive buffer its kernel gave it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PLAYER_RCVBUF)
    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    player = OddsClient(url, token=token("sleepy", "sleepy"), reconnect=False,
                        ws_options={"sock": sock})
    await player.connect()
    assert (await player.subscribe([LEAGUE])).accepted == [LEAGUE]
    await player.wait_synced([LEAGUE])
    player._ws.transport.pause_reading()  # the app stops reading; TCP fills up
    newest: dict[str, int] = {}
    for start in range(0, EVENTS, 200):
        updates = [PriceUpdate(LEAGUE, f"5:8:{n % MARKETS}", f"m-{n % MARKETS}",
                               {"home": f"{1 + n % 97}.50"})
                   for n in range(start, start + 200)]
        for update, published in zip(updates, await publisher.publish_many(updates),
                                     strict=True):
            newest[update.market] = published.seq
    shown: list[dict] = []
    owed = dict(newest)

    def read(event: dict) -> None:
        if event.get("type") != "odds" or not owed:
            return
        shown.append(event)
        if event["seq"] >= owed.get(event["market"], event["seq"] + 1):
            del owed[event["market"]]

    player.on_message = read
    player._ws.transport.resume_reading()
    await eventually(lambda: not owed, timeout=60)
    assert player.violations == [], [str(v) for v in player.violations[:12]]
    await player.close()
    return shown, rcvbuf


def _bound(budget: int, shown: list[dict]) -> int:
    """Events that fit in `budget` bytes, plus the newest one of each market."""
    smallest = min(len(orjson.dumps(e)) for e in shown)
    return budget // smallest + MARKETS


async def test_a_stalled_player_wakes_to_a_bounded_backlog(worker_factory, publisher) -> None:
    worker = worker_factory()  # the defaults
    shown, rcvbuf = await _stall_publish_wake(worker.url, worker.port, publisher)
    count, bound = len(shown), _bound(_worker_budget(rcvbuf), shown)
    assert count <= bound, f"{count} events before the newest prices (bound {bound})"
    assert bound < EVENTS / 5  # the bound says something: it is not "everything published"


async def test_behind_haproxy_too(redis_url, publisher, tmp_path: Path) -> None:
    node = start_node(redis_url, tmp_path / "node", workers=1)
    try:
        shown, rcvbuf = await _stall_publish_wake(node.url, node.frontend_port, publisher)
    finally:
        node.stop()
    count, bound = len(shown), _bound(_worker_budget(rcvbuf) + _haproxy_budget(), shown)
    assert count <= bound, f"{count} events before the newest prices (bound {bound})"
    assert bound < EVENTS / 4


@pytest.mark.parametrize(("option", "value"), sorted(HAPROXY_TUNE.items()))
def test_the_template_bounds_haproxys_socket_buffers(option: str, value: int) -> None:
    """The bound above counts on these lines: without them the kernel autotunes to MBs."""
    lines = re.findall(rf"^\s*{re.escape(option)}\s+(\d+)\s*$", TEMPLATE.read_text(), re.M)
    assert lines == [str(value)]
