"""One connection class per wire protocol the load generator speaks.

Each reads its system's frames as cheaply as it can (one orjson parse per
frame, nothing else decoded twice) and feeds every event to the same check
and the same latency histogram, so systems are compared on equal terms:

- `OddsgateConn`: PROTOCOL.md (welcome, subscribe, snapshot, odds, batch).
- `PlainConn`: the hand-rolled baseline (bench/peers/plain_ws.py): one JSON
  subscribe, one event per frame.
- `SocketIOConn`: Engine.IO v4 / Socket.IO v5 over a direct WebSocket
  (python-socketio and Node's socket.io both speak it).
- `NatsConn`: the NATS client protocol inside WebSocket frames.

The §5 check per topic: seq strictly increasing within an epoch, a gap only
on an event marked `coalesced`, an event only after its topic's snapshot
(peers have no snapshots: their first event of a topic sets the base).
`ready` resolves when the connection is usable, `synced` when its
subscriptions are all in place (for oddsgate: every snapshot received).

A stalled player that reads again (bench spike) watches what it is shown
through a `Wake`: only woken players pay for it, per event.

Checked and counted connections (issue 14, point 4: a load generator that is
not the ceiling): the §5 check and the latency histogram cost ~0.6 us an
event and one `orjson.loads` a frame more, so only a sample of connections
is checked (`checked=True`; `is_checked()` picks them from the player's
index, spread evenly over the load-generator processes). Every other one
only counts: its frames, its bytes and its events (an `odds` frame is one;
a `batch` holds as many as the `{"type":"odds"` prefixes the publish script
writes, counted in the bytes without decoding them). Its control frames
(welcome, subscribed, snapshot, error, reset, reconnect) take the full path,
so it subscribes, retries a `shed` and is synced like every other. A
counted connection cannot be woken (spike) or follow hints (drain): both
need every event seen, so those scenarios check every connection.

An oddsgate player can follow a `reconnect` hint (PROTOCOL.md §4) when the
load generator asks it to (`on_hint`): the load generator opens a new
connection after `after_ms` and the new `OddsgateConn` `resume()`s every
topic from the `{"epoch","seq"}` the old one held, sharing its check state,
so the §5 check runs across the move. What the move took is kept in a
`Move`, written only on control frames (never per event).
"""

from __future__ import annotations

import asyncio
import fcntl
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from bench.counters import BAD_SNAPSHOT, EPOCH, SEQ_ORDER, SILENT_GAP, UNEXPECTED, Counters
from bench.wsclient import WsClient

_loads = orjson.loads
_time_ns = time.time_ns
_ODDS = b'{"type":"odds"'  # how the publish script begins every event (feed/events.py)
_BATCH = b'{"type":"batch"'  # gateway/protocol.py batch()
_GOLDEN = 0x9E3779B1  # Knuth's multiplicative hash: a sample spread over any index pattern

CHECK_SHARE = 0.1  # default share of connections checked (§5 and latency); the rest count


def is_checked(index: int, share: float) -> bool:
    """Whether player `index` is in the checked sample of `share` (0..1).

    Deterministic (the same players every run) and independent of how
    players are dealt to processes (round-robin by index): a hash, not
    `index % n`, which would put every checked player in the same process.
    """
    if share >= 1.0:
        return True
    if share <= 0.0:
        return False
    return ((index * _GOLDEN) & 0xFFFFFFFF) < share * 2**32


@dataclass(slots=True)
class Move:
    """One player sent elsewhere by a `reconnect` hint, as its load generator saw it.

    Times are `time.time_ns()` of the load-generator process. `due_ns` is the
    hint's receipt plus its `after_ms`; the player counts as resumed once the
    new connection's `subscribed` came and every topic that got a `reset` (or
    had no resume point) has its snapshot: `resumed_ns` is the later of those.
    """

    index: int
    from_worker: int | None
    after_ms: int
    hint_ns: int
    to_worker: int | None = None
    attempts: int = 0
    connected_ns: int = 0
    subscribed_ns: int = 0
    snapshot_ns: int = 0
    resets: int = 0
    failure: str = ""  # why the last attempt failed
    abandoned: bool = False  # the load generator stopped following before it resumed
    conn: OddsgateConn | None = None

    @property
    def due_ns(self) -> int:
        return self.hint_ns + self.after_ms * 1_000_000

    @property
    def resumed_ns(self) -> int:
        conn = self.conn
        if not self.subscribed_ns or conn is None or conn.pending or conn.reset_pending:
            return 0
        return max(self.subscribed_ns, self.snapshot_ns)

    def record(self) -> dict:
        return {"index": self.index, "from_worker": self.from_worker,
                "to_worker": self.to_worker, "after_ms": self.after_ms,
                "hint_ns": self.hint_ns, "connected_ns": self.connected_ns,
                "resumed_ns": self.resumed_ns, "resets": self.resets,
                "attempts": self.attempts, "failure": self.failure,
                "abandoned": self.abandoned}


@dataclass(slots=True)
class Wake:
    """A stalled player reading again: the old prices it is shown before the current ones.

    `owed` is, per (topic, market), the seq of the market's newest event when
    the player woke (the feed's heads), for the markets where that is newer
    than what the player held. An event read after waking with a lower seq
    than its market's owed one is old: superseded before the player woke, so
    it only delays the price it will be replaced by. The player holds the
    current prices once every owed market got an event at least that new;
    `current_ns` is when (`time.time_ns()` of the load generator, as
    `woke_ns`).
    """

    index: int
    woke_ns: int
    owed: dict[tuple[str, str], int]
    old_events: int = 0  # events read after waking, superseded before it
    events: int = 0  # every event read after waking, until current
    current_ns: int = 0
    conn: BenchConn | None = None
    # The player's own kernel receive queue when it woke (FIONREAD): bytes
    # that had left the server, which no server can take back or coalesce.
    own_bytes: int = 0
    read_bytes: int = 0  # wire bytes of the frames read since waking
    frame_start: int = 0  # where the frame being read began, in those bytes
    own_old_events: int = 0  # old events that were in the player's own queue

    @classmethod
    def start(cls, conn: BenchConn, heads: dict[str, dict[str, int]], now_ns: int) -> Wake:
        """What `conn` owes, from the feed's heads and the seqs it holds per topic."""
        owed = {}
        for topic in conn.topics:
            held = conn.held.get(topic)
            for market, seq in heads.get(topic, {}).items():
                if held is None or seq > held[1]:
                    owed[(topic, market)] = seq
        return cls(conn.index, now_ns, owed, current_ns=0 if owed else now_ns, conn=conn)

    def see(self, ev: dict, now_ns: int) -> None:
        if self.current_ns:
            return
        self.events += 1
        key = (ev["topic"], ev.get("market"))
        seq = self.owed.get(key)
        if seq is None:
            return
        if ev["seq"] < seq:
            self.old_events += 1
            if self.frame_start < self.own_bytes:
                self.own_old_events += 1
            return
        self._paid(key, now_ns)

    def frame(self, payload_bytes: int) -> None:
        """A frame read after waking: its bytes on the wire (a server frame is unmasked)."""
        self.frame_start = self.read_bytes
        head = 2 if payload_bytes < 126 else 4 if payload_bytes < 65536 else 10
        self.read_bytes += head + payload_bytes

    def see_snapshot(self, msg: dict, now_ns: int) -> None:
        """A snapshot (after a `reset`) holds each market's newest state: none of it old."""
        if self.current_ns:
            return
        topic = msg["topic"]
        for market in msg["markets"]:
            key = (topic, market.get("market"))
            seq = self.owed.get(key)
            if seq is not None and market["seq"] >= seq:
                self._paid(key, now_ns)

    def _paid(self, key: tuple[str, str], now_ns: int) -> None:
        del self.owed[key]
        if not self.owed:
            self.current_ns = now_ns

    @property
    def waiting(self) -> bool:
        """Not current yet, and still connected: it may get there."""
        return not self.current_ns and self.conn is not None and not self.conn.closed

    def record(self) -> dict:
        return {"index": self.index, "woke_ns": self.woke_ns, "current_ns": self.current_ns,
                "old_events": self.old_events, "events": self.events,
                "own_bytes": self.own_bytes, "own_old_events": self.own_old_events,
                "owed_left": len(self.owed),
                "closed": self.conn is not None and self.conn.closed}


class BenchConn(WsClient):
    """Common bookkeeping: futures, the per-topic check, latency recording."""

    path = "/"
    base_on_first_event = True  # peers have no snapshot
    index = -1  # the player's global index (the load generator sets it)

    def __init__(self, host: str, port: int, counters: Counters, topics: list[str],
                 checked: bool = True) -> None:
        super().__init__(host, port, self.path)
        self.c = counters
        self.topics = topics
        self.checked = checked
        if not checked:  # events only counted: no §5 check, no latency
            self._event = self._count  # type: ignore[method-assign]
        self.held: dict[str, list] = {}  # topic -> [epoch, last seq]
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.synced: asyncio.Future[None] = loop.create_future()
        self.sub_sent_ns = 0
        self.stalled = False
        self.wanted_open = True

    # -- lifecycle --------------------------------------------------------

    def _set_ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def _set_synced(self) -> None:
        if not self.synced.done():
            self.synced.set_result(None)

    def on_lost(self, exc: Exception | None) -> None:
        why = self.handshake_error or (str(exc) if exc else "closed by server")
        for fut in (self.ready, self.synced):
            if not fut.done():
                fut.set_exception(ConnectionError(why))
                fut.exception()
        if self.wanted_open and self.upgraded:  # an attempt that failed is no loss
            self.c.lost += 1

    def subscribe(self) -> None:
        raise NotImplementedError

    def wake(self, wake: Wake) -> None:
        """Read again, every event from now on also shown to `wake`.

        The hook is an instance attribute over the class's `_event`, so the
        players that never stalled keep the plain path. Only a checked
        connection sees every event.
        """
        if not self.checked:
            raise RuntimeError("only a checked connection can be woken (check every one)")
        check = self._event
        see = wake.see
        message = self.on_message
        frame = wake.frame

        def event(ev: dict, now_ns: int) -> None:
            check(ev, now_ns)
            see(ev, now_ns)

        def on_message(payload: bytes) -> None:
            frame(len(payload))
            message(payload)

        wake.own_bytes = self.queued_in_kernel()
        self._event = event  # type: ignore[method-assign]
        self.on_message = on_message  # type: ignore[method-assign]
        self.stalled = False
        self.resume_reading()

    def queued_in_kernel(self) -> int:
        """Bytes waiting in this player's kernel receive queue (0 if unknown)."""
        sock = self.transport.get_extra_info("socket") if self.transport else None
        if sock is None:
            return 0
        try:
            raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        return int.from_bytes(raw, sys.byteorder)

    # -- the event path ---------------------------------------------------

    def _count(self, ev: dict, now_ns: int) -> None:
        """An unchecked connection's event: counted, nothing else."""
        self.c.deliveries += 1

    def _event(self, ev: dict, now_ns: int) -> None:
        c = self.c
        topic = ev["topic"]
        seq = ev["seq"]
        held = self.held.get(topic)
        if held is None:
            if self.base_on_first_event:
                self.held[topic] = [ev["epoch"], seq]
            else:
                c.violate(UNEXPECTED)
        elif ev["epoch"] != held[0]:
            c.violate(EPOCH)
        else:
            last = held[1]
            if seq <= last:
                c.violate(SEQ_ORDER)
            else:
                if seq != last + 1:
                    if ev.get("coalesced"):
                        c.coalesced += 1
                    else:
                        c.violate(SILENT_GAP)
                held[1] = seq
        us = (now_ns - ev["ts"]) // 1000
        if us < 64:
            c.latency.counts[us if us > 0 else 0] += 1
        else:
            shift = us.bit_length() - 6
            c.latency.counts[(shift << 5) + (us >> shift)] += 1
            if us > c.latency.max_us:
                c.latency.max_us = us
        c.deliveries += 1


class OddsgateConn(BenchConn):
    """PROTOCOL.md's player: a `shed` topic is asked for again after `retry_after_ms`."""

    path = "/ws"
    base_on_first_event = False
    MAX_RETRIES = 30

    def __init__(self, host: str, port: int, counters: Counters, topics: list[str],
                 checked: bool = True) -> None:
        super().__init__(host, port, counters, topics, checked)
        if not checked:
            self.on_message = self._count_frame  # type: ignore[method-assign]
        self.pending: set[str] = set()  # topics whose snapshot has not come yet
        self.reset_pending: set[str] = set()
        self.requests: dict[int, list[str]] = {}
        self.retrying: set[str] = set()
        self.retries = 0
        self.worker: int | None = None  # from `welcome`
        # called with (self, after_ms, now_ns) on a `reconnect` frame; None: not followed
        self.on_hint: Callable[[OddsgateConn, int, int], None] | None = None
        self.move: Move | None = None  # set on the connection that resumes a moved player

    def subscribe(self) -> None:
        self.pending = set(self.topics)
        self.sub_sent_ns = _time_ns()
        self._request(self.topics)

    def wake(self, wake: Wake) -> None:
        """As every player's, and snapshots shown to `wake` too (a `reset` brings one)."""
        check = self._snapshot
        see = wake.see_snapshot

        def snapshot(msg: dict, now_ns: int) -> None:
            check(msg, now_ns)
            see(msg, now_ns)

        self._snapshot = snapshot  # type: ignore[method-assign]
        super().wake(wake)

    def resume(self) -> None:
        """Subscribe every topic again from the last event held (PROTOCOL.md §3).

        `held` is the moved player's check state (shared with its previous
        connection); a topic with nothing held (its snapshot never came, or
        a `reset` was pending) asks for a snapshot instead.
        """
        held = self.held
        points = {t: {"epoch": held[t][0], "seq": held[t][1]} if t in held else None
                  for t in self.topics}
        self.pending = {t for t, point in points.items() if point is None}
        self.sub_sent_ns = _time_ns()
        self._request(self.topics, points)

    def _request(self, topics: list[str], points: dict | None = None) -> None:
        request_id = len(self.requests) + 1
        self.requests[request_id] = topics
        self.send_text(orjson.dumps({"op": "subscribe", "id": request_id,
                                     "topics": points or dict.fromkeys(topics)}))

    def _retry(self) -> None:
        topics, self.retrying = sorted(self.retrying), set()
        if topics and self.open:
            self._request(topics)

    def _count_frame(self, payload: bytes) -> None:
        """An unchecked connection's frame: events counted in the bytes, no decoding;
        anything else (control frames) as a checked connection reads it."""
        c = self.c
        c.frames += 1
        c.bytes_in += len(payload)
        if payload.startswith(_ODDS):
            c.deliveries += 1
        elif payload.startswith(_BATCH):
            c.deliveries += payload.count(_ODDS)
        else:
            self._message(payload)

    def on_message(self, payload: bytes) -> None:
        c = self.c
        c.frames += 1
        c.bytes_in += len(payload)
        self._message(payload)

    def _message(self, payload: bytes) -> None:
        c = self.c
        now = _time_ns()
        msg = _loads(payload)
        kind = msg["type"]
        if kind == "batch":
            event = self._event
            for ev in msg["events"]:
                event(ev, now)
        elif kind == "odds":
            self._event(msg, now)
        elif kind == "snapshot":
            self._snapshot(msg, now)
        elif kind == "welcome":
            self.worker = msg.get("worker")
            self._set_ready()
        elif kind == "subscribed":
            asked = self.requests.get(msg.get("id"), ())
            refused = set(asked) - set(msg["topics"]) - self.retrying
            self.pending -= refused
            if self.move is not None and not self.move.subscribed_ns:
                self.move.subscribed_ns = now
            if not self.pending:
                self._set_synced()
        elif kind == "error":
            self._error(msg)
        elif kind == "reset":
            c.resets += 1
            self.held.pop(msg["topic"], None)
            self.reset_pending.add(msg["topic"])
            if self.move is not None:
                self.move.resets += 1
        elif kind == "reconnect":
            c.reconnect_frames += 1
            if self.on_hint is not None:
                after_ms = msg.get("after_ms")
                self.on_hint(self, after_ms if isinstance(after_ms, int) else 0, now)

    def _error(self, msg: dict) -> None:
        code = str(msg.get("code"))
        self.c.error(code)
        topics = msg.get("topics") or ()
        if code == "shed" and topics and self.retries < self.MAX_RETRIES:
            self.retries += 1
            if not self.retrying:
                delay = (msg.get("retry_after_ms") or 1000) / 1000
                asyncio.get_running_loop().call_later(delay, self._retry)
            self.retrying.update(topics)
            return
        for topic in topics:
            self.pending.discard(topic)

    def _snapshot(self, msg: dict, now: int) -> None:
        topic = msg["topic"]
        epoch = msg["epoch"]
        seq = msg["seq"]
        held = self.held.get(topic)
        if held is not None and held[0] == epoch and seq < held[1] \
                and topic not in self.reset_pending:
            self.c.violate(SEQ_ORDER)
        self.reset_pending.discard(topic)
        for market in msg["markets"]:
            if market["seq"] > seq or market["epoch"] != epoch:
                self.c.violate(BAD_SNAPSHOT)
        self.held[topic] = [epoch, seq]
        if self.move is not None:
            self.move.snapshot_ns = now
        if topic in self.pending:
            self.pending.discard(topic)
            self.c.subscribe.record((now - self.sub_sent_ns) // 1000)
            if not self.pending:
                self._set_synced()


class PlainConn(BenchConn):
    path = "/ws"

    def on_open(self) -> None:
        self._set_ready()

    def subscribe(self) -> None:
        self.sub_sent_ns = _time_ns()
        self.send_text(orjson.dumps({"op": "subscribe", "topics": self.topics}))

    def on_message(self, payload: bytes) -> None:
        c = self.c
        c.frames += 1
        c.bytes_in += len(payload)
        now = _time_ns()
        msg = _loads(payload)
        if msg["type"] == "odds":
            self._event(msg, now)
        elif msg["type"] == "subscribed":
            self._set_synced()


class SocketIOConn(BenchConn):
    path = "/socket.io/?EIO=4&transport=websocket"

    def subscribe(self) -> None:
        self.sub_sent_ns = _time_ns()
        self.send_text(b'421["subscribe",' + orjson.dumps(self.topics) + b"]")

    def on_message(self, payload: bytes) -> None:
        c = self.c
        c.frames += 1
        c.bytes_in += len(payload)
        if payload[:2] == b"42":
            now = _time_ns()
            name_and_data = _loads(payload[2:])
            if name_and_data[0] == "odds":
                self._event(name_and_data[1], now)
            return
        head = payload[:1]
        if head == b"2":  # Engine.IO ping
            self.send_text(b"3")
        elif head == b"0":  # Engine.IO open: join the default namespace
            self.send_text(b"40")
        elif payload[:2] == b"40":
            self._set_ready()
        elif payload[:2] == b"43":  # the subscribe's ack
            self._set_synced()
        elif payload[:2] == b"44":
            c.error("connect_error")
            self.abort()


def nats_subject(topic: str) -> str:
    """`odds:1:39:1` as a NATS subject: tokens separated by dots."""
    return topic.replace(":", ".")


class NatsConn(BenchConn):
    CONNECT = (b'CONNECT {"verbose":false,"pedantic":false,"protocol":1,"echo":false,'
               b'"headers":false,"name":"oddsgate-bench"}\r\nPING\r\n')

    def __init__(self, host: str, port: int, counters: Counters, topics: list[str],
                 checked: bool = True) -> None:
        super().__init__(host, port, counters, topics, checked)
        self._stream = b""
        self._need = 0
        self._pongs = 0

    def _send(self, data: bytes) -> None:
        self.send_binary(data)

    def subscribe(self) -> None:
        self.sub_sent_ns = _time_ns()
        lines = [f"SUB {nats_subject(t)} {i + 1}\r\n".encode() for i, t in enumerate(self.topics)]
        self._send(b"".join(lines) + b"PING\r\n")

    def on_message(self, payload: bytes) -> None:
        c = self.c
        c.frames += 1
        c.bytes_in += len(payload)
        buf = self._stream + payload if self._stream else payload
        pos = 0
        now = 0
        while True:
            need = self._need
            if need:
                if len(buf) - pos < need + 2:
                    break
                if not now:
                    now = _time_ns()
                self._event(_loads(buf[pos : pos + need]), now)
                pos += need + 2
                self._need = 0
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            line = buf[pos:eol]
            pos = eol + 2
            if line[:4] == b"MSG ":
                self._need = int(line[line.rfind(b" ") + 1 :])
            elif line == b"PING":
                self._send(b"PONG\r\n")
            elif line == b"PONG":
                self._pongs += 1
                if self._pongs == 1:
                    self._set_ready()
                else:
                    self._set_synced()
            elif line[:4] == b"INFO":
                self._send(self.CONNECT)
            elif line[:4] == b"-ERR":
                c.error(line[5:60].decode(errors="replace"))
        self._stream = buf[pos:] if pos < len(buf) else b""


PROTOCOLS: dict[str, type[BenchConn]] = {
    "oddsgate": OddsgateConn,
    "plain": PlainConn,
    "socketio": SocketIOConn,
    "nats": NatsConn,
}
