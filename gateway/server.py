"""The worker: a WebSocket server that moves bytes between players and the hub.

This is the asyncio shell around the plain objects (protocol codec, session,
hub): it reads client frames, hands decoded requests to them, and writes the
frames they produce. Event frames are written straight to the transport
(`gateway.wire`), bypassing websockets' per-send coroutine; everything the
handshake, pings and closes need stays with websockets.

What it does not decide: who gets which topic (gateway/admission.py), which
connections live (gateway/liveness.py), the HTTP answers (gateway/routes.py),
and anything about a topic's stream (gateway/hub.py, through its runner).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from gateway import protocol
from gateway.admission import admit, refusals, refuse_unopened
from gateway.auth import Claims, TokenVerifier
from gateway.breaker import Breaker
from gateway.broker import RedisBroker
from gateway.channel import TopicChannel
from gateway.clicklistener import ClickListener
from gateway.config import Settings
from gateway.counters import WorkerCounters
from gateway.errors import Ending, ProtocolError, close_for_exception
from gateway.fanout import Fanout
from gateway.gcpolicy import GcPolicy
from gateway.http import (
    SERVER_HEADER,
    without_body,
)
from gateway.hub import Hub
from gateway.hub_runner import HubRunner
from gateway.liveness import Liveness, cut, heartbeat_payload
from gateway.routes import HttpRoutes
from gateway.session import Session
from gateway.topics import PartitionMap
from gateway.wire import text_frame
from gateway.wsprotocol import PlayerProtocol
from redis_contract import REGION_ALIVE_KEY

log = logging.getLogger("oddsgate.worker")

OPEN_CHANNEL_TIMEOUT_S = 3.0


_HANDSHAKE_DONE = Request("/ws", Headers())

CONTROL_BUDGETED = frozenset({Opcode.PING, Opcode.PONG})

class _Writer:
    """Writes one connection's frames straight to its transport (gateway/wire.py)."""

    __slots__ = ("transport", "ws")

    def __init__(self, transport: asyncio.Transport, ws) -> None:
        self.transport = transport
        self.ws = ws

    def payload(self, payload: bytes) -> None:
        if self.ws.state is State.OPEN:
            self.transport.write(text_frame(payload))

    def frame(self, frame: bytes) -> None:
        if self.ws.state is State.OPEN:
            self.transport.write(frame)


class PlayerConnection(ServerConnection):
    """websockets' connection, with its flow control reported to the session.

    The transport calls `pause_writing` past the high-water mark and
    `resume_writing` under the low one (`write_limit` of `serve`); the session
    turns those into coalescing and catching up (PROTOCOL.md §5).
    """

    sndbuf = 0  # SO_SNDBUF for player sockets; 0 leaves the kernel's autotuning
    # TCP_NOTSENT_LOWAT for player sockets (OG_SOCKET_NOTSENT_LOWAT_BYTES); 0: not set
    notsent_lowat = 0
    TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)  # 25 on Linux

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One attribute, set here: each one more grows every connection's
        # attribute table (at one point by 1.5 KB). The player's state lives
        # on its Session, which has slots.
        self.session: Session | None = None

    def acknowledge_pings(self, data: bytes) -> None:
        session = self.session
        if session is not None and session.ping_sent_at is not None \
                and data == heartbeat_payload(session):
            # Only the pong of our own ping proves the peer reads: an unsolicited
            # pong costs nothing to send without reading a byte.
            session.pong()
        super().acknowledge_pings(data)

    def process_event(self, event: Any) -> None:
        """Ping and pong frames are charged to the connection's request budget.

        websockets answered every ping with a pong as it parsed it, so a
        client sending pings as fast as it could (and never reading) took a
        worker's core and grew its memory by hundreds of MB. Pings now reach
        here unanswered (gateway/wsprotocol.py): within the budget they get
        their pong, over it none, and as many in a row over it as close a
        request flood (OG_RATE_LIMIT_CLOSE_AFTER) close the connection 4429.
        """
        if isinstance(event, Frame) and event.opcode in CONTROL_BUDGETED:
            session = self.session
            if session is not None:
                if not session.open:
                    return
                try:
                    session.admit(time.monotonic())
                except ProtocolError as exc:
                    if exc.close_code is not None:
                        self._close_flooding(session)
                    return
            if event.opcode is Opcode.PING and self.protocol.state is State.OPEN:
                self.protocol.send_pong(event.data)
                self.send_data()
        super().process_event(event)

    def _close_flooding(self, session: Session) -> None:
        log.info("closing %s: too many ping/pong frames", session.conn_id,
                 extra={"conn_id": session.conn_id})
        session.close()
        cut(self, Ending.CONTROL_FLOOD)

    def forget_handshake(self) -> None:
        """Drop the handshake's request and response once the connection is open.

        websockets keeps both for the connection's life (headers, cookie, key):
        about 4 KB a player that nothing reads after the upgrade. Its event
        loop only checks that a request was received, so a shared stand-in
        keeps that true; the request's headers are emptied in place because
        websockets' parser generator still holds the request object.
        """
        if self.request is not None:
            self.request.headers.clear()
        if self.response is not None:
            self.response.headers.clear()
        self.request = _HANDSHAKE_DONE
        self.response = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep a stalled player's backlog in user space, where it can be coalesced.

        Without a low mark the kernel takes unsent bytes until its autotuned
        send buffer (up to 4 MB) is full, and only then does the transport
        buffer and pass `write_limit`: a player that stops reading is later
        shown every old event the kernel held. With it, `send()` refuses more
        once this many bytes wait unsent, so the rest stays in the transport,
        its watermarks fire, and the hub keeps only the newest per market.
        """
        super().connection_made(transport)
        if not (self.sndbuf or self.notsent_lowat):
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        if self.sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        if self.notsent_lowat and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, self.TCP_NOTSENT_LOWAT, self.notsent_lowat)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.session is not None:
            self.session.on_pause(time.monotonic())

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.session is not None:
            self.session.on_resume()


class Worker:
    """One gateway process: its server, its hub, its Redis connections."""

    def __init__(self, settings: Settings, pmap: PartitionMap | None = None) -> None:
        self.settings = settings
        self.pmap = pmap or PartitionMap.load(settings.partition_map)
        self.verifier = TokenVerifier(
            settings.jwt_secret,
            leeway_s=settings.jwt_leeway_s,
            allow_anonymous=settings.allow_anonymous,
        )
        self.counters = WorkerCounters()
        self.fanout = Fanout(self.counters, max_batch=settings.max_batch,
                             slice=settings.fanout_slice)
        self.hub = Hub(self.fanout, recent_capacity=settings.recent_events,
                       replay_max=settings.replay_max, replay_chunk=settings.max_batch,
                       counters=self.counters, lag_wait_s=settings.lag_wait_ms / 1000)
        self.hub_runner = HubRunner(self.hub)  # performs what the hub decides
        self.broker = RedisBroker(
            settings.redis_url,
            self.hub_runner.on_message,
            on_resubscribed=self.hub_runner.on_resubscribed,
            reconnect_delay=settings.redis_reconnect_s,
        )
        self.hub_runner.attach_broker(self.broker)
        self.connections: dict[Session, ServerConnection] = {}
        # Heartbeat, token expiry, stall cut-off and drain over those connections.
        self.liveness = Liveness(settings, self.connections, self.hub.pressured)
        # A lone worker's breaker, on its own players. Under a supervisor the reporter
        # (gateway/reporter.py) drops it and points `breaker_open` at the node's decision.
        self.breaker: Breaker | None = Breaker(
            settings.breaker_trip_share, settings.breaker_recover_share,
            settings.breaker_min_players)
        # Installed by the process entry (gateway/worker.py): it owns process-wide state.
        self.gc = GcPolicy(closed_share=settings.gc_full_closed_share,
                           min_closed=settings.gc_full_min_closed,
                           interval_s=settings.gc_full_interval_s)
        # Whether new subscriptions are shed: the lone breaker's state, or the node's.
        self.breaker_open: Callable[[], bool] = self._own_breaker_open
        self._connection_class = type("PlayerConnection", (PlayerConnection,),
                                      {"sndbuf": settings.socket_sndbuf_bytes,
                                       "notsent_lowat": settings.socket_notsent_lowat_bytes})
        self._watch_task: asyncio.Task | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        # Claims of connections between their handshake and their handler.
        self._claims: weakref.WeakKeyDictionary[ServerConnection, Claims] = (
            weakref.WeakKeyDictionary())
        self.started = False  # listening, and Redis answered once
        self.stopping = False
        self.server: Server | None = None
        self._broker_task: asyncio.Task | None = None
        self._conn_seq = 0
        # Whether the region's aggregator showed progress lately (PROTOCOL.md §8);
        # always true when none is watched (OG_REGION_STALE_AFTER_MS=0).
        self.region_fresh = True
        self._region_task: asyncio.Task | None = None
        self._audit_task: asyncio.Task | None = None
        self.routes = HttpRoutes(settings, self.pmap, self.verifier, self.hub, self.broker,
                                 accepting=lambda: self.accepting,
                                 draining=lambda: self.draining,
                                 region_fresh=lambda: self.region_fresh)
        # GET /t/{code} on its own port, kept alive (gateway/clicklistener.py); None: off
        self.clicks: ClickListener | None = None
        if settings.click_port:
            self.clicks = ClickListener(self.routes.attribution.tracking,
                                        draining=lambda: self.draining or self.stopping)

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self._broker_task = asyncio.create_task(self.broker.start())
        self.server = await serve(
            self._handle,
            s.host,
            s.port,
            process_request=self._process_request,
            compression="deflate" if s.compression else None,
            open_timeout=s.handshake_timeout_s,
            ping_interval=None,  # one heartbeat task for all players, not one each

            close_timeout=5,
            max_size=s.max_frame_bytes,
            max_queue=4,
            server_header=SERVER_HEADER,
            reuse_port=s.reuse_port,
            # A drain sends thousands of players back through HAProxy within
            # seconds; asyncio's default backlog (100) overflowed on the bench,
            # dropped SYNs, failed HAProxy's health checks and 503'd the herd.
            backlog=s.listen_backlog,
            write_limit=(s.high_watermark_bytes, s.low_watermark_bytes),
            create_connection=self._create_connection,
        )
        if self.clicks is not None:
            try:
                await self.clicks.start(s.host, s.click_port, reuse_port=s.reuse_port,
                                        backlog=s.listen_backlog)
            except OSError:
                self.server.close()  # a worker that cannot take clicks takes nobody
                raise
        self.routes.attribution.start()  # follows og:links for /t/ (attribution/linksync.py)
        self._watch_task = asyncio.create_task(self._watch_pressure())
        self._heartbeat_task = asyncio.create_task(self.liveness.heartbeat())
        if s.audit_s > 0:
            self._audit_task = asyncio.create_task(self.hub_runner.audit(s.audit_s))
        if s.region_stale_after_ms > 0:
            self.region_fresh = False  # until the aggregator's mark is seen
            self._region_task = asyncio.create_task(self._watch_region(s.region_stale_after_ms))
        await self.broker.connected.wait()
        self.started = True

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    @property
    def accepting(self) -> bool:
        return self.broker.connected.is_set() and self.region_fresh and not self.draining

    async def _watch_region(self, stale_after_ms: int) -> None:
        """Follow the aggregator's liveness mark (`redis_contract.REGION_ALIVE_KEY`).

        The aggregator sets the key with a `stale_after_ms` expiry each time
        its input advances, so it exists exactly while the region publishes:
        no clock of this host is compared with another's.
        """
        interval_s = min(1.0, max(0.05, stale_after_ms / 4000))
        while True:
            try:
                fresh = bool(await self.broker.commands.exists(REGION_ALIVE_KEY))
            except Exception:
                fresh = False
            if fresh != self.region_fresh:
                log.warning("region %s %s", self.settings.region,
                            "serving again: its aggregator is making progress" if fresh
                            else f"cannot serve: no aggregator progress for {stale_after_ms} ms")
                self.region_fresh = fresh
            await asyncio.sleep(interval_s)

    def connections_in_backpressure(self) -> int:
        return len(self.hub.pressured)

    def _local_backpressure(self) -> tuple[int, int]:
        return len(self.hub.pressured), len(self.connections)

    def _own_breaker_open(self) -> bool:
        return self.breaker is not None and self.breaker.open

    async def _watch_pressure(self, interval_s: float = 0.1) -> None:
        """A lone worker's breaker follows its players; players stalled too long are cut off."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                breaker = self.breaker
                if breaker is not None and breaker.update(*self._local_backpressure()):
                    log.warning("breaker %s: %.1f%% of the worker's players in back-pressure",
                                "open, shedding new subscriptions" if breaker.open
                                else "closed", 100 * breaker.share)
                self.liveness.close_stalled(time.monotonic())
            except Exception:
                log.exception("back-pressure watch failed")

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- drain ------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.liveness.draining

    def begin_drain(self, window_ms: int, settle_ms: int, *, stop_listening: bool = False,
                    reason: str = "drain") -> None:
        """Stop taking players and send the ones here elsewhere (gateway/liveness.py).

        When this process is being replaced (`stop_listening`), the listening
        socket closes too, so the kernel hands new connections to its
        successor on the same port.
        """
        ending = {"restart": Ending.RETIRE, "region_drain": Ending.REGION_DRAIN}.get(
            reason, Ending.DRAIN)
        if self.liveness.begin_drain(window_ms, settle_ms, ending) and stop_listening:
            if self.server is not None:
                self.server.server.close()  # the asyncio listener only; players stay
            if self.clicks is not None:
                self.clicks.stop_listening()  # HAProxy's open connections are served on

    def end_drain(self) -> None:
        self.liveness.end_drain()

    async def stop(self, ending: Ending = Ending.SHUTDOWN, grace_s: float = 1.0) -> None:
        """Close every player (1012: reconnect and resume elsewhere), then Redis.

        Players get `grace_s` to answer the close handshake; a peer that does
        not is cut off rather than holding the process up.
        """
        self.stopping = True
        if self.clicks is not None:
            await self.clicks.close(grace_s)  # the clicks in flight get their answers
        if self.server is not None:
            self.server.close(close_connections=False)
            connections = list(self.server.connections)
            if connections:
                await asyncio.wait(
                    [asyncio.create_task(c.close(ending.code, ending.reason))
                     for c in connections],
                    timeout=grace_s,
                )
                for conn in connections:
                    conn.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), grace_s + 1)
        if self._broker_task is not None:
            self._broker_task.cancel()
        for task in (self._watch_task, self._heartbeat_task, self._region_task,
                     self._audit_task):
            if task is not None:
                task.cancel()
        await self.routes.attribution.stop()
        await self.broker.close()

    # -- HTTP and the handshake -------------------------------------------

    def _create_connection(self, protocol: ServerProtocol, server: Server,
                           **kwargs: Any) -> PlayerConnection:
        """serve()'s connection factory: oddsgate's request parsing under PlayerConnection."""
        return self._connection_class(PlayerProtocol.adopt(protocol), server, **kwargs)

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        """Answer a request the parser let through (wsprotocol.py): GET or HEAD without a
        body, or a POST with the body it read (gateway.http.RequestWithBody).

        HEAD gets GET's status and headers without the body; it never
        reaches /ws (a HEAD cannot upgrade: 405 in the parser).
        """
        answer = await self.routes.answer(conn, request)
        if isinstance(answer, Claims):
            self._claims[conn] = answer  # a player let in: for its handler, which runs next
            return None
        if request.method == "HEAD":
            return without_body(answer)
        return answer

    # -- a player connection ----------------------------------------------

    @staticmethod
    def _writers(conn: ServerConnection):
        """(payload writer, pre-framed writer or None) for one connection."""
        writer = _Writer(conn.transport, conn.protocol)
        if conn.protocol.extensions:  # compression negotiated: websockets frames messages

            def write_framed(payload: bytes) -> None:
                if conn.protocol.state is State.OPEN:
                    conn.protocol.send_text(payload)
                    conn.send_data()

            return write_framed, None
        return writer.payload, writer.frame

    async def _handle(self, conn: PlayerConnection) -> None:
        claims = self._claims.pop(conn)
        conn.forget_handshake()
        s = self.settings
        self._conn_seq += 1
        conn_id = f"{s.worker_index}-{self._conn_seq}-{secrets.token_hex(3)}"
        write, write_frame = self._writers(conn)
        session = Session(
            conn_id,
            player=claims.player,
            write=write,
            write_frame=write_frame,
            scheduler=self.fanout,
            topic_prefixes=claims.topic_prefixes,
            partner=claims.partner,
            max_topics=s.max_topics,
            rate=s.rate_limit_rps,
            burst=s.rate_limit_burst,
            max_refused_in_a_row=s.rate_limit_close_after,
            max_bad_requests=s.max_bad_requests,
            max_batch=s.max_batch,
            counters=self.counters,
            on_pressure=self.hub_runner.pressure_changed,
            # the heartbeat closes it 4401 when this passes
            expires_at=None if claims.expires_at is None else claims.expires_at + s.jwt_leeway_s,
        )
        self.connections[session] = conn
        conn.session = session
        self.counters.connections_accepted += 1
        loop = asyncio.get_running_loop()
        try:
            session.send(protocol.welcome(conn_id, s.node_name, s.worker_index, s.heartbeat_ms,
                                          s.region))
            while True:  # not `async for`: its async generator is ~0.5 KB a player
                message = await conn.recv()
                try:
                    await self._dispatch(session, message, loop.time())
                except ProtocolError as exc:
                    session.send(protocol.error(exc))
                    if exc.close_code is not None:
                        code, reason = close_for_exception(exc)
                        await conn.close(code, reason)
                        break
        except ConnectionClosed:
            pass
        except Exception as exc:
            log.exception("connection %s failed", conn_id, extra={"conn_id": conn_id})
            code, reason = close_for_exception(exc)
            with contextlib.suppress(Exception):
                await conn.close(code, reason)
        finally:
            session.close()
            self.hub_runner.leave_all(session)
            self.connections.pop(session, None)
            self.gc.connection_closed()

    async def _dispatch(self, session: Session, message: str | bytes, now: float) -> None:
        try:
            session.admit(now)
        except ProtocolError as exc:
            exc.request_id = protocol.peek_id(message)
            raise
        try:
            request = protocol.decode_request(message)
        except ProtocolError as exc:
            raise session.count_bad_request(exc) from None
        if isinstance(request, protocol.Subscribe):
            await self._subscribe(session, request)
        elif isinstance(request, protocol.Unsubscribe):
            for topic in request.topics:
                self.hub_runner.leave(session, topic)
            session.send(protocol.unsubscribed(request.id, request.topics))
        elif isinstance(request, protocol.Ack):
            session.ack(request.topics)
        else:
            session.send(protocol.pong(request.id, time.time_ns()))

    async def _subscribe(self, session: Session, request: protocol.Subscribe) -> None:
        """PROTOCOL.md §3: errors per reason, then `subscribed`, then the data
        (who gets which topic: gateway/admission.py)."""
        admission = admit(request.topics, following=session.cursors,
                          max_topics=session.max_topics, is_topic=self.pmap.is_topic,
                          allowed=session.allowed, shedding=self.breaker_open(),
                          high_value=self.pmap.high_value)
        self.counters.shed += admission.shed
        opened = await self._open_channels(list(admission.wanted))
        if not session.open:
            self._abandon(opened)
            return
        joined = refuse_unopened(admission, opened)
        for refusal in refusals(admission, request.id, max_topics=session.max_topics,
                                shed_retry_ms=self.settings.shed_retry_ms):
            session.send(protocol.error(refusal))
        session.send(protocol.subscribed(request.id, admission.accepted + joined))
        for topic in joined:
            channel = opened[topic]
            assert channel is not None
            self.hub_runner.join(session, channel, admission.wanted[topic])

    async def _open_channels(self, topics: list[str]) -> dict[str, TopicChannel | None]:
        async def open_one(topic: str) -> TopicChannel | None:
            try:
                return await asyncio.wait_for(self.hub_runner.open_channel(topic),
                                              OPEN_CHANNEL_TIMEOUT_S)
            except (ConnectionError, TimeoutError):
                return None

        opened: dict[str, TopicChannel | None] = {}
        cold = []
        for topic in topics:  # open channels need no task, no timeout, no await
            channel = self.hub_runner.take_open_channel(topic)
            if channel is None:
                cold.append(topic)
            else:
                opened[topic] = channel
        if cold:
            results = await asyncio.gather(*(open_one(t) for t in cold))
            opened.update(zip(cold, results, strict=True))
        return {topic: opened[topic] for topic in topics}

    def _abandon(self, opened: dict[str, TopicChannel | None]) -> None:
        for channel in opened.values():
            if channel is not None:
                self.hub_runner.abandon(channel)
