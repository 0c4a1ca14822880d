"""Which connections a worker keeps, and how it ends the others.

Four ways a worker ends a connection on its own, each with its `Ending`
(gateway/errors.py): a peer that stops answering the heartbeat, a token that
expires, a player stalled over its high-water mark too long, and a drain that
sends every player elsewhere with a `reconnect` hint first. The decisions per
player are the session's (`Session.heartbeat`, `token_expired`); this module
walks the players on a timer and acts on them.

One heartbeat task for the worker, not websockets' keepalive task per
connection (a task and its coroutine are about 1.5 KB a player); each tick
looks at a slice of the players, so a whole pass takes about a second and no
tick holds the loop for long.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import secrets
import time
from typing import TYPE_CHECKING

from websockets.protocol import State

from gateway import protocol
from gateway.config import Settings
from gateway.errors import Ending
from gateway.session import Beat, Session

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

log = logging.getLogger("oddsgate.worker")

_HEARTBEAT_KEY = secrets.token_bytes(16)


def heartbeat_payload(session: Session) -> bytes:
    """The data of a heartbeat ping, which only its pong echoes.

    Derived from the connection and the moment the ping left (no slot on the
    session for it), keyed by a per-process secret so a peer that reads
    nothing cannot guess it.
    """
    text = f"{session.conn_id}:{session.ping_sent_at!r}".encode()
    return hashlib.blake2b(text, key=_HEARTBEAT_KEY, digest_size=8).digest()


def cut(conn: ServerConnection, ending: Ending) -> None:
    """End a connection whose peer reads nothing: say why, then drop it at once (no
    close handshake could finish)."""
    conn.protocol.fail(ending.code, ending.reason)
    conn.send_data()
    conn.transport.abort()


class Liveness:
    def __init__(self, settings: Settings, connections: dict[Session, ServerConnection],
                 pressured: set[Session]) -> None:
        self.settings = settings
        self.connections = connections  # the worker's: session -> its connection
        self.pressured = pressured  # the hub's: players over their high-water mark
        self.draining = False
        self._kick_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- heartbeat and token expiry -----------------------------------------

    async def heartbeat(self, tick_s: float = 0.1) -> None:
        """WebSocket pings every `heartbeat_ms`; no pong within the next interval: cut.
        Also closes connections whose token expired (4401). Runs until cancelled."""
        interval = self.settings.heartbeat_ms / 1000
        pass_s = min(1.0, interval)
        queue: list[tuple[Session, ServerConnection]] = []
        per_tick = 1
        while True:
            await asyncio.sleep(tick_s)
            if not queue:
                queue = list(self.connections.items())
                queue.reverse()  # pop() from the end walks it in order
                per_tick = max(1, math.ceil(len(queue) * tick_s / pass_s))
            now, wall = time.monotonic(), time.time()
            for _ in range(min(len(queue), per_tick)):
                session, conn = queue.pop()
                if not session.open:
                    continue
                try:
                    if session.token_expired(wall):
                        ending = Ending.TOKEN_EXPIRED
                        self._spawn(conn.close(ending.code, ending.reason))
                        continue
                    self.beat(session, conn, now, interval)
                except Exception:  # one broken connection must not stop the others
                    log.exception("heartbeat failed for a connection")

    @staticmethod
    def beat(session: Session, conn: ServerConnection, now: float, interval: float) -> None:
        if conn.protocol.state is not State.OPEN:
            return
        beat = session.heartbeat(now, interval)
        if beat is Beat.PING:
            conn.protocol.send_ping(heartbeat_payload(session))
            conn.send_data()
        elif beat is Beat.DEAD:  # a whole interval without a pong: a dead peer
            cut(conn, Ending.HEARTBEAT_TIMEOUT)

    # -- players stalled too long -------------------------------------------------

    def close_stalled(self, now: float) -> None:
        limit = self.settings.stall_timeout_s
        for session in list(self.pressured):
            since = session.pressured_since
            conn = self.connections.get(session)
            if since is None or conn is None or now - since < limit or not session.open:
                continue
            log.info("closing %s: over its high-water mark for %.0fs", session.conn_id, now - since,
                     extra={"conn_id": session.conn_id})
            session.close()
            cut(conn, Ending.TOO_SLOW)

    # -- drain ------------------------------------------------------------

    def begin_drain(self, window_ms: int, settle_ms: int, ending: Ending = Ending.DRAIN) -> bool:
        """Stop taking players, then send the ones here elsewhere, spread out.

        At once the worker stops accepting (`/healthz` 503, upgrades refused).
        After `settle_ms` (HAProxy has seen the drain by then), every player
        gets `reconnect` with `after_ms` drawn uniformly from [0, window_ms],
        then close 1012, so the crowd reaches the other workers spread over the
        window rather than all at once. False if a drain was under way already.
        """
        if self.draining:
            return False
        self.draining = True
        log.info("draining: %d players, window %d ms, after %d ms", len(self.connections),
                 window_ms, settle_ms)
        self._kick_task = asyncio.get_running_loop().create_task(
            self._send_players_away(window_ms, settle_ms, ending))
        return True

    def end_drain(self) -> None:
        """Take players again (an operator's undrain); players already told stay told."""
        if self._kick_task is not None:
            self._kick_task.cancel()
            self._kick_task = None
        self.draining = False
        log.info("drain ended; accepting players")

    async def _send_players_away(self, window_ms: int, settle_ms: int, ending: Ending,
                                 chunk: int = 256) -> None:
        await asyncio.sleep(settle_ms / 1000)
        rng = random.Random()
        pending = list(self.connections.items())
        closing: set[asyncio.Task] = set()
        for i in range(0, len(pending), chunk):
            for session, conn in pending[i : i + chunk]:
                if not session.open:
                    continue
                session.send(protocol.reconnect(int(rng.uniform(0, window_ms)), ending.reason))
                session.close()  # nothing after the hint but the close
                closing.add(asyncio.create_task(conn.close(ending.code, ending.reason)))
            await asyncio.sleep(0)  # let the loop breathe between chunks
        if closing:
            _, stuck = await asyncio.wait(closing, timeout=5)
            for task in stuck:  # peers that read nothing never finish the handshake
                task.cancel()
            for _session, conn in pending:
                if conn.protocol.state is not State.CLOSED:
                    conn.transport.abort()
